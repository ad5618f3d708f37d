#!/usr/bin/env bash
# Configure and build hybrid-train into build/ (set-up first; fast when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(scripts/setup.sh)
BUILD=${HYBRID_BUILD_DIR:-build}
export CCACHE_DIR=${CCACHE_DIR:-${HYBRID_CACHE:-$HOME/.cache/hybrid-train}/ccache}
if [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DPython3_EXECUTABLE="$VENV/bin/python" "$@" >&2
fi
cmake --build "$BUILD" -j "$(nproc)" >&2
echo "$BUILD"
