#!/usr/bin/env bash
# On a GPU machine (the H200 the device tool lends): build with the machine's own torch, run the
# whole test suite (CUDA tests included), train configs/tiny.yaml on the GPU, and time training
# steps of configs/sizes/1b.yaml on synthetic tokens. Results go to $OUT (default ./gpu-out).
# Needs data/corpus (scripts/prepare_corpus.sh) and, where the machine lacks them, the
# nlohmann/json and zlib headers under .deps/include.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/device.txt"

scripts/gpu/build.sh || exit 1

ctest --test-dir build-gpu -j8 --output-on-failure >"$OUT/ctest.log" 2>&1
tail -4 "$OUT/ctest.log"

build-gpu/hybrid-train --config configs/tiny.yaml --run-dir /tmp/tiny-gpu --set trainer.device=cuda >"$OUT/tiny_gpu.log" 2>&1
tail -3 "$OUT/tiny_gpu.log"

mkdir -p /tmp/syn
python3 -c "import numpy as np; np.save('/tmp/syn/train.npy', np.random.default_rng(0).integers(0, 100278, size=20_000_000, dtype=np.uint32))"
# 1b at the end-to-end anchor's shape (4 x 4096 tokens a step): transformer (A) and hybrid
# (GGGA), with and without activation checkpointing (GGGA needs it while GDN runs on ATen ops).
for run in A:false A:true GGGA:true; do
  pattern=${run%:*} ckpt=${run#*:}
  {
    log="$OUT/bench_1b_${pattern}_ckpt_$ckpt.log"
    build-gpu/hybrid-train --config configs/sizes/1b.yaml --run-dir /tmp/b1-$pattern-$ckpt \
      --set "data.sources=[{paths: [/tmp/syn/train.npy]}]" --set data.eos_id=100257 --set model.layer_pattern=$pattern \
      --set trainer.global_batch_size=4 --set trainer.micro_batch_size=4 --set trainer.max_steps=12 \
      --set trainer.activation_checkpointing=$ckpt --set checkpoint.interval=0 --set trainer.log_interval=1 \
      --stop-after 12 >"$log" 2>&1
    echo "1b $pattern checkpointing=$ckpt: $(grep -E "step 12/|error" "$log" | head -1)"
    rm -rf /tmp/b1-$pattern-$ckpt  # a 1.6B checkpoint is 19 GB
  }
done
