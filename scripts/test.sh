#!/usr/bin/env bash
# The test command: set-up, build, then every test under ctest (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=$(scripts/build.sh)
ctest --test-dir "$BUILD" --output-on-failure -j "$(nproc)" "$@"
