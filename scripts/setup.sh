#!/usr/bin/env bash
# One-time (and idempotent) set-up for hybrid-train on Debian 12:
#   - Debian packages for the C++ build (yaml-cpp, spdlog, CLI11, GoogleTest, ccache, ...)
#   - a Python virtualenv holding the pinned torch wheel (our LibTorch) plus the
#     edge tools (transformers for parity tests, tokenizers for data prep, matplotlib for plots,
#     wandb for scripts/wandb_log.py).
# The virtualenv lives outside the checkout (HYBRID_CACHE, default ~/.cache/hybrid-train)
# so every clone on this machine reuses it. Prints the venv path on its last line.
set -euo pipefail

TORCH_VERSION=2.11.0          # the H200 test machine runs 2.11.0+cu130; PyPI's wheel is the cu130 build
TRANSFORMERS_VERSION=5.23.0   # first line with olmo_hybrid we pin; parity tests need it
WANDB_VERSION=0.31.0          # scripts/wandb_log.py, tested offline
CACHE=${HYBRID_CACHE:-$HOME/.cache/hybrid-train}
VENV=$CACHE/venv-torch-$TORCH_VERSION
STAMP=$VENV/.hybrid-setup-v2

apt_packages=(cmake ninja-build g++ ccache pkg-config libyaml-cpp-dev libspdlog-dev libfmt-dev
              libcli11-dev libgtest-dev libgmock-dev nlohmann-json3-dev zlib1g-dev libgloo-dev python3-venv)

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if [ ! -f "$STAMP" ]; then
  echo "setup: creating $VENV (torch $TORCH_VERSION, a few GB the first time)" >&2
  mkdir -p "$CACHE"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q --upgrade pip >&2
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" \
      tokenizers safetensors numpy matplotlib "wandb==$WANDB_VERSION" >&2
  touch "$STAMP"
fi
echo "$VENV"
