#!/usr/bin/env bash
# On an 8-GPU machine (nvidia-h200-x8; fewer GPUs do what they can): configs/7b.yaml for
# ${STEPS_7B:-50} steps on all GPUs (at least 2) (ZeRO-2, activation checkpointing, 8192-token sequences,
# one 2 x 8192 micro batch per GPU and step) with peak memory, tokens/s per GPU and MFU, every
# block checkpointed and then the first ${CHECKPOINTED_7B:-16} only (what the dry run's table says
# fits an H200 at 8 ranks: the recompute it saves against the memory it costs); then
# configs/sizes/1b.yaml at the same global batch (32 x 4096 tokens) on 1, 2, 4 and 8 GPUs for
# the scaling efficiency. With SAVES_7B=1 also 7b.yaml's checkpoint saves, synchronous and
# asynchronous (checkpoint.async: the pause to copy to host memory, and the write), into /tmp
# (about 83 GiB each; the disk must hold one). Synthetic tokens; NVLink multicast off. Longer
# than one device call: start it with setsid and poll $OUT/eight_gpus.log. Build first
# (scripts/gpu/build.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" /tmp/syn
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi topo -m >"$OUT/topology.txt" 2>&1
[ -f /tmp/syn/train.npy ] || python3 -c "import numpy as np; np.save('/tmp/syn/train.npy', np.random.default_rng(0).integers(0, 100278, size=50_000_000, dtype=np.uint32))"
data=(--set "data.sources=[{paths: [/tmp/syn/train.npy]}]" --set checkpoint.interval=0 --set checkpoint.save_final=false
      --set trainer.eval_interval=0 --set trainer.log_interval=1)

if [ "$gpus" -ge 2 ]; then
  build-gpu/hybrid-train --config configs/7b.yaml "${data[@]}" --set trainer.global_batch_size=$((2 * gpus)) \
    --dry-run --world-size "$gpus" >"$OUT/7b_${gpus}gpu_estimate.txt" 2>&1
  grep -E "total| of 32 " "$OUT/7b_${gpus}gpu_estimate.txt"
  for layers in -1 ${CHECKPOINTED_7B:-16}; do
    build-gpu/hybrid-train --config configs/7b.yaml "${data[@]}" --set trainer.global_batch_size=$((2 * gpus)) \
      --set trainer.checkpointed_layers=$layers --set trainer.max_steps=${STEPS_7B:-50} --run-dir /tmp/seven_b_$layers \
      --nproc-per-node "$gpus" >"$OUT/7b_${gpus}gpu_ckpt$layers.log" 2>&1
    cp /tmp/seven_b_$layers/metrics.jsonl "$OUT/7b_${gpus}gpu_ckpt${layers}_metrics.jsonl"
    grep -E "gradient reduction|step ${STEPS_7B:-50}/|error" "$OUT/7b_${gpus}gpu_ckpt$layers.log" | head -5
  done
fi

if [ "$gpus" -ge 2 ] && [ "${SAVES_7B:-0}" = 1 ]; then
  for async in false true; do  # a save at step 2, then the final one at step 4 (its wait included)
    build-gpu/hybrid-train --config configs/7b.yaml "${data[@]}" --set trainer.global_batch_size=$((2 * gpus)) \
      --set trainer.max_steps=4 --set checkpoint.interval=2 --set checkpoint.save_final=true \
      --set checkpoint.keep_last=1 --set checkpoint.async=$async --run-dir /tmp/seven_b_saves \
      --nproc-per-node "$gpus" >"$OUT/7b_${gpus}gpu_saves_async_$async.log" 2>&1
    grep -E "copied to host memory|saved checkpoint|step [0-9]/|error" "$OUT/7b_${gpus}gpu_saves_async_$async.log"
    rm -rf /tmp/seven_b_saves
  done
fi

for n in 1 2 4 8; do
  [ "$n" -le "$gpus" ] || continue
  build-gpu/hybrid-train --config configs/sizes/1b.yaml "${data[@]}" --set data.eos_id=100257 \
    --set trainer.global_batch_size=32 --set trainer.micro_batch_size=4 --set trainer.max_steps=${STEPS_1B:-8} \
    --run-dir /tmp/one_b_$n --nproc-per-node $n >"$OUT/1b_${n}gpu.log" 2>&1
  cp /tmp/one_b_$n/metrics.jsonl "$OUT/1b_${n}gpu_metrics.jsonl"
done

python3 - "$OUT" "$gpus" <<'PY'
import glob, json, os, statistics, sys
out, gpus = sys.argv[1], int(sys.argv[2])
def rows(path):
    return [json.loads(l) for l in open(path) if '"loss"' in l] if os.path.exists(path) else []
for path in sorted(glob.glob(f"{out}/7b_{gpus}gpu_ckpt*_metrics.jsonl")):
    seven = rows(path)
    if not seven:
        continue
    layers = path.split("ckpt")[-1].split("_")[0]
    later = seven[3:] or seven
    tps = statistics.median(r["tokens_per_s"] for r in later)
    print(f"7b.yaml on {gpus} GPUs, {'every block' if layers == '-1' else 'the first ' + layers + ' blocks'} "
          f"checkpointed, {len(seven)} steps: {tps / gpus:,.0f} tokens/s per GPU, MFU "
          f"{statistics.median(r.get('mfu', float('nan')) for r in later):.1%}, peak "
          f"{max(r.get('peak_mem_gb', float('nan')) for r in seven) * 1e9 / 2**30:.1f} GiB on rank 0, "
          f"loss {seven[0]['loss']:.4f} -> {seven[-1]['loss']:.4f}")
base = None
print("| GPUs | tokens/s | per GPU | scaling efficiency | final loss |\n|---|---|---|---|---|")
for n in (1, 2, 4, 8):
    r = rows(f"{out}/1b_{n}gpu_metrics.jsonl")
    if not r:
        continue
    tps = statistics.median(x["tokens_per_s"] for x in (r[3:] or r))
    base = base or tps
    print(f"| {n} | {tps:,.0f} | {tps / n:,.0f} | {tps / (n * base):.1%} | {r[-1]['loss']:.4f} |")
PY
