#!/usr/bin/env bash
# On the GPU machine: build into build-gpu with the machine's own torch (CUDA kernels for
# sm_90a), using the headers carried in .deps. Log in $OUT/build.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" .deps/lib
[ -e /usr/lib/x86_64-linux-gnu/libz.so ] || ln -sf /usr/lib/x86_64-linux-gnu/libz.so.1 .deps/lib/libz.so
start=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PWD/.deps" \
      -DPython3_EXECUTABLE="$(command -v python3)" >"$OUT/build.log" 2>&1 &&
  ninja -C build-gpu -j16 ${HYBRID_TARGETS:-} >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
