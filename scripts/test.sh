#!/usr/bin/env bash
# The test command: set-up, build, then every test under ctest (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=$(scripts/build.sh)
# Float64 results can differ past rounding between CPUs (test_model.cpp's kSameLogits): say
# which CPU and which of ATen's vector paths these results come from.
VENV=$(scripts/setup.sh)
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores;" \
  "ATen CPU capability: $("$VENV/bin/python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())' 2>/dev/null || echo unknown)"
ctest --test-dir "$BUILD" --output-on-failure -j "$(nproc)" "$@"
