#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu/build.sh (hybrid-train): configs/7b.yaml's width and
# recipe (micro batch 2 x 8192 tokens, bf16, activation checkpointing, ZeRO-2 at world size 1)
# with 4 and with 8 layers, a few steps each on synthetic tokens: measured peak memory next to
# the dry-run estimate of the same model, and the per-layer difference. Logs to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" /tmp/syn
[ -f /tmp/syn/train.npy ] || python3 -c "import numpy as np; np.save('/tmp/syn/train.npy', np.random.default_rng(0).integers(0, 100278, size=20_000_000, dtype=np.uint32))"
for layers in 4 8; do
  args=(--config configs/7b.yaml --set "data.sources=[{paths: [/tmp/syn/train.npy]}]" --set model.n_layers=$layers
        --set trainer.global_batch_size=2 --set trainer.max_steps=4 --set trainer.log_interval=1
        --set trainer.eval_interval=0 --set checkpoint.interval=0 --set checkpoint.save_final=false)
  build-gpu/hybrid-train "${args[@]}" --dry-run >"$OUT/memory_7b_${layers}_layers_estimate.txt" 2>&1
  build-gpu/hybrid-train "${args[@]}" --run-dir /tmp/m7b-$layers >"$OUT/memory_7b_${layers}_layers.log" 2>&1
  cp /tmp/m7b-$layers/metrics.jsonl "$OUT/memory_7b_${layers}_layers_metrics.jsonl" 2>/dev/null
done
python3 - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
measured, estimated = {}, {}
for n in (4, 8):
    try:
        rows = [json.loads(l) for l in open(f"{out}/memory_7b_{n}_layers_metrics.jsonl") if '"peak_mem_gb"' in l]
        measured[n] = max(r["peak_mem_gb"] for r in rows) * 1e9 / 2**30  # the log's GB are 1e9 bytes
    except (OSError, ValueError):
        measured[n] = float("nan")
    m = re.search(r"total \(before allocator overhead\)\s+([\d.]+) GiB", open(f"{out}/memory_7b_{n}_layers_estimate.txt").read())
    estimated[n] = float(m.group(1)) if m else float("nan")
    print(f"7b width, {n} layers: peak {measured[n]:.2f} GiB measured (allocator peak), {estimated[n]:.2f} GiB estimated")
print(f"per layer: {(measured[8] - measured[4]) / 4:.3f} GiB measured, {(estimated[8] - estimated[4]) / 4:.3f} GiB estimated")
PY
