#!/usr/bin/env bash
# On a 2-GPU machine: configs/sizes/1b.yaml (GGGA, activation checkpointing) on 1 GPU, on 2
# GPUs (ZeRO-1 as configured, and ZeRO-2), and on 2 GPUs with NCCL over sockets (a simulated
# two-node run; NCCL's default one socket thread, and 4 threads x 4 sockets), at the same global
# batch (8 x 4096 tokens), 10 steps on synthetic tokens: the loss curves side by side and the
# scaling efficiency (2-GPU tokens/s over twice 1-GPU tokens/s). Then the checkpoint path over
# NCCL on tiny.yaml (a ZeRO-2 save, synchronous against asynchronous, a resume at 1 GPU) and
# hybrid-eval on 2 processes against 1.
# Build as validate.sh does; NVLink multicast stays off. Results to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" .deps/lib
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
nvidia-smi topo -m >>"$OUT/device.txt" 2>&1
[ -e /usr/lib/x86_64-linux-gnu/libz.so ] || ln -sf /usr/lib/x86_64-linux-gnu/libz.so.1 .deps/lib/libz.so
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PWD/.deps" \
      -DPython3_EXECUTABLE="$(command -v python3)" >"$OUT/build.log" 2>&1 &&
  ninja -C build-gpu -j32 hybrid-train hybrid-eval $( [ -n "${SKIP_TESTS:-}" ] || echo test_ops ) >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
grep -q HYBRID_NCCL build-gpu/build.ninja && echo "built with NCCL" || echo "built WITHOUT NCCL"
[ -n "${SKIP_TESTS:-}" ] || build-gpu/tests/test_ops --gtest_filter='*Cuda*' 2>&1 | grep -E "^\[  (PASSED|FAILED)|OK \]|FAILED \]"

mkdir -p /tmp/syn
python3 -c "import numpy as np; np.save('/tmp/syn/train.npy', np.random.default_rng(0).integers(0, 100278, size=20_000_000, dtype=np.uint32))"
common=(--config configs/sizes/1b.yaml --set "data.sources=[{paths: [/tmp/syn/train.npy]}]" --set data.eos_id=100257
        --set trainer.global_batch_size=8 --set trainer.micro_batch_size=4 --set trainer.max_steps=${STEPS:-10}
        --set trainer.log_interval=1 --set checkpoint.interval=0 --set checkpoint.save_final=false)
build-gpu/hybrid-train "${common[@]}" --run-dir /tmp/g1 >"$OUT/gpu1.log" 2>&1
build-gpu/hybrid-train "${common[@]}" --run-dir /tmp/g2 --nproc-per-node 2 >"$OUT/gpu2.log" 2>&1
build-gpu/hybrid-train "${common[@]}" --set distributed.zero_stage=2 --run-dir /tmp/g2z2 --nproc-per-node 2 >"$OUT/gpu2z2.log" 2>&1
# Two nodes simulated: the same two processes, NCCL over sockets (no NVLink, no shared memory).
NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 \
  build-gpu/hybrid-train "${common[@]}" --run-dir /tmp/g2net --nproc-per-node 2 >"$OUT/gpu2net.log" 2>&1
NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 NCCL_SOCKET_NTHREADS=4 NCCL_NSOCKS_PERTHREAD=4 \
  build-gpu/hybrid-train "${common[@]}" --run-dir /tmp/g2net4 --nproc-per-node 2 >"$OUT/gpu2net4.log" 2>&1
for run in g1 g2 g2z2 g2net g2net4; do cp /tmp/$run/metrics.jsonl "$OUT/${run}_metrics.jsonl"; done
grep -h "gradient reduction" "$OUT"/gpu2*.log | sort -u
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
runs = {"1 GPU": "g1", "2 GPUs": "g2", "2 GPUs, ZeRO-2": "g2z2", "2 GPUs, sockets": "g2net",
        "2 GPUs, sockets 4x4": "g2net4"}
rows = {name: [json.loads(l) for l in open(f"{out}/{run}_metrics.jsonl") if '"loss"' in l] for name, run in runs.items()}
print("| step | " + " | ".join(f"loss, {n}" for n in runs) + " | " + " | ".join(f"tokens/s, {n}" for n in runs) + " |")
print("|---" * (2 * len(runs) + 1) + "|")
for step_rows in zip(*rows.values()):
    print(f"| {step_rows[0]['step']} | " + " | ".join(f"{r['loss']:.5f}" for r in step_rows) + " | " +
          " | ".join(f"{r['tokens_per_s']:,.0f}" for r in step_rows) + " |")
median = {n: statistics.median(r["tokens_per_s"] for r in rows[n][3:]) for n in runs}
for n in list(runs)[1:]:
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(rows["1 GPU"], rows[n]))
    print(f"{n}: median tokens/s from step 4 {median[n]:,.0f} against {median['1 GPU']:,.0f} on 1 GPU, "
          f"scaling efficiency {median[n] / (2 * median['1 GPU']):.1%}, max |loss difference| {diff:.2e}")
PY

# The checkpoint path with GPUs (tiny.yaml): at ZeRO-2 on 2 ranks each rank writes its share of
# the weights and of the AdamW state from its GPU into the two files; the same run with
# asynchronous saves must write the same files; resumed at 1 GPU from it, the run goes on;
# hybrid-eval on 2 processes gives one process's validation loss.
python3 -c "import numpy as np; np.save('/tmp/syn/tiny.npy', np.random.default_rng(1).integers(0, 4096, size=2_000_000, dtype=np.uint16))"
tiny=(--config configs/tiny.yaml --set trainer.device=cuda --set trainer.max_steps=6 --set checkpoint.interval=3
      --set "data.sources=[{paths: [/tmp/syn/tiny.npy]}]" --set "data.validation=[]" --set "data.tasks=[]"
      --set distributed.zero_stage=2 --set distributed.bucket_mb=0.05)
build-gpu/hybrid-train "${tiny[@]}" --run-dir /tmp/t2 --nproc-per-node 2 --stop-after 3 >"$OUT/tiny2.log" 2>&1
build-gpu/hybrid-train "${tiny[@]}" --run-dir /tmp/t2a --nproc-per-node 2 --stop-after 3 --set checkpoint.async=true >"$OUT/tiny2a.log" 2>&1
cmp -s /tmp/t2/checkpoints/step0000003/optim.safetensors /tmp/t2a/checkpoints/step0000003/optim.safetensors &&
  cmp -s /tmp/t2/checkpoints/step0000003/model.safetensors /tmp/t2a/checkpoints/step0000003/model.safetensors &&
  echo "NCCL save: asynchronous = synchronous weights and optimizer files" || echo "NCCL save: FAILED (files differ or missing)"
grep -h "saved checkpoint" "$OUT/tiny2.log" "$OUT/tiny2a.log"
build-gpu/hybrid-train "${tiny[@]}" --run-dir /tmp/t2 >"$OUT/tiny2_resumed1.log" 2>&1 &&
  grep -q "saved at world size 2" "$OUT/tiny2_resumed1.log" && echo "NCCL save: resumed at 1 GPU" || echo "NCCL save: resume FAILED"
for n in 1 2; do
  build-gpu/hybrid-eval --checkpoint /tmp/t2/checkpoints/step0000006 --device cuda --data /tmp/syn/tiny.npy \
    --batches 4 --nproc-per-node $n 2>&1 | tail -1 | tee "$OUT/eval_$n.txt"
done
