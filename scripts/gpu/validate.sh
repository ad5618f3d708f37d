#!/usr/bin/env bash
# On a GPU machine (the H200 the device tool lends): build with the machine's own torch, run the
# whole test suite (CUDA tests included), train configs/tiny.yaml on the GPU, and time training
# steps of configs/sizes/1b.yaml on synthetic tokens. Results go to $OUT (default ./gpu-out).
# Needs data/corpus (scripts/prepare_corpus.sh) and, where the machine lacks them, the
# nlohmann/json and zlib headers under .deps/include.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/device.txt"

scripts/gpu/build.sh || exit 1

ctest --test-dir build-gpu -j8 --output-on-failure >"$OUT/ctest.log" 2>&1
tail -4 "$OUT/ctest.log"

build-gpu/hybrid-train --config configs/tiny.yaml --run-dir /tmp/tiny-gpu --set trainer.device=cuda >"$OUT/tiny_gpu.log" 2>&1
tail -3 "$OUT/tiny_gpu.log"

scripts/gpu/bench_1b.sh A:false A:true GGGA:true GGGA:false
