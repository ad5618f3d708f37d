#!/usr/bin/env bash
# On a 2-GPU machine: configs/sizes/1b.yaml (GGGA, activation checkpointing) on 1 and on 2
# GPUs at the same global batch (8 x 4096 tokens), 10 steps on synthetic tokens: the loss
# curves side by side and the scaling efficiency (2-GPU tokens/s over twice 1-GPU tokens/s).
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
  ninja -C build-gpu -j32 hybrid-train $( [ -n "${SKIP_TESTS:-}" ] || echo test_ops ) >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
grep -q HYBRID_NCCL build-gpu/build.ninja && echo "built with NCCL" || echo "built WITHOUT NCCL"
[ -n "${SKIP_TESTS:-}" ] || build-gpu/tests/test_ops --gtest_filter='*Cuda*' 2>&1 | grep -E "^\[  (PASSED|FAILED)|OK \]|FAILED \]"

mkdir -p /tmp/syn
python3 -c "import numpy as np; np.save('/tmp/syn/train.npy', np.random.default_rng(0).integers(0, 100278, size=20_000_000, dtype=np.uint32))"
common=(--config configs/sizes/1b.yaml --set "data.sources=[{paths: [/tmp/syn/train.npy]}]" --set data.eos_id=100257
        --set trainer.global_batch_size=8 --set trainer.micro_batch_size=4 --set trainer.max_steps=${STEPS:-10}
        --set trainer.log_interval=1 --set checkpoint.interval=0 --set checkpoint.save_final=false)
build-gpu/hybrid-train "${common[@]}" --run-dir /tmp/g1 >"$OUT/gpu1.log" 2>&1
build-gpu/hybrid-train "${common[@]}" --run-dir /tmp/g2 --nproc-per-node 2 >"$OUT/gpu2.log" 2>&1
cp /tmp/g1/metrics.jsonl "$OUT/gpu1_metrics.jsonl"; cp /tmp/g2/metrics.jsonl "$OUT/gpu2_metrics.jsonl"
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
rows = {n: [json.loads(l) for l in open(f"{out}/gpu{n}_metrics.jsonl") if '"loss"' in l] for n in (1, 2)}
print("step  loss(1 GPU)  loss(2 GPUs)  tok/s(1)  tok/s(2)")
for a, b in zip(rows[1], rows[2]):
    print(f"{a['step']:4d}  {a['loss']:.5f}  {b['loss']:.5f}  {a['tokens_per_s']:9.0f} {b['tokens_per_s']:9.0f}")
t1 = statistics.median(r["tokens_per_s"] for r in rows[1][3:])
t2 = statistics.median(r["tokens_per_s"] for r in rows[2][3:])
print(f"median tokens/s from step 4: 1 GPU {t1:.0f}, 2 GPUs {t2:.0f}, scaling efficiency {t2 / (2 * t1):.1%}")
print(f"max |loss difference| {max(abs(a['loss'] - b['loss']) for a, b in zip(rows[1], rows[2])):.2e}")
PY
