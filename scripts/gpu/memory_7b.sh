#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu/build.sh (hybrid-train): configs/7b.yaml's width and
# recipe (micro batch 2 x 8192 tokens, bf16, activation checkpointing, ZeRO-2 at world size 1)
# with 4 and with 8 layers, 8 steps each on synthetic tokens: measured peak memory next to the
# dry-run estimate of the same model, and the per-layer difference; then the steps' time (steps 3
# on: the first ones warm up) and what the two give for 32 layers at one rank, the step time and
# MFU a 7b.yaml rank would reach without communication (a layer's time and FLOPs from the
# difference, both linear in the layers). Logs to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" /tmp/syn
[ -f /tmp/syn/train.npy ] || python3 -c "import numpy as np; np.save('/tmp/syn/train.npy', np.random.default_rng(0).integers(0, 100278, size=20_000_000, dtype=np.uint32))"
for layers in 4 8; do
  args=(--config configs/7b.yaml --set "data.sources=[{paths: [/tmp/syn/train.npy]}]" --set model.n_layers=$layers
        --set trainer.global_batch_size=2 --set trainer.max_steps=8 --set trainer.log_interval=1
        --set trainer.eval_interval=0 --set checkpoint.interval=0 --set checkpoint.save_final=false)
  build-gpu/hybrid-train "${args[@]}" --dry-run >"$OUT/memory_7b_${layers}_layers_estimate.txt" 2>&1
  build-gpu/hybrid-train "${args[@]}" --run-dir /tmp/m7b-$layers >"$OUT/memory_7b_${layers}_layers.log" 2>&1
  cp /tmp/m7b-$layers/metrics.jsonl "$OUT/memory_7b_${layers}_layers_metrics.jsonl" 2>/dev/null
done
python3 - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
measured, estimated, step_s, flops = {}, {}, {}, {}
tokens = 2 * 8192
for n in (4, 8):
    try:
        rows = [json.loads(l) for l in open(f"{out}/memory_7b_{n}_layers_metrics.jsonl") if '"tokens_per_s"' in l]
        measured[n] = max(r.get("peak_mem_gb", float("nan")) for r in rows) * 1e9 / 2**30  # the log's GB are 1e9 bytes
        timed = [r for r in rows if r["step"] >= 3]
        step_s[n] = sum(tokens / r["tokens_per_s"] for r in timed) / len(timed)
        flops[n] = sum(r["mfu"] / r["tokens_per_s"] for r in timed) / len(timed)  # FLOPs a token / peak
    except (OSError, ValueError, KeyError, ZeroDivisionError):
        measured[n] = step_s[n] = flops[n] = float("nan")
    m = re.search(r"total \(before allocator overhead\)\s+([\d.]+) GiB", open(f"{out}/memory_7b_{n}_layers_estimate.txt").read())
    estimated[n] = float(m.group(1)) if m else float("nan")
    print(f"7b width, {n} layers: peak {measured[n]:.2f} GiB measured (allocator peak), {estimated[n]:.2f} GiB estimated; "
          f"{step_s[n]:.3f} s a step of {tokens} tokens ({tokens / step_s[n]:,.0f} tokens/s, MFU {100 * flops[n] * tokens / step_s[n]:.1f}%)")
print(f"per layer: {(measured[8] - measured[4]) / 4:.3f} GiB measured, {(estimated[8] - estimated[4]) / 4:.3f} GiB estimated; "
      f"{1e3 * (step_s[8] - step_s[4]) / 4:.1f} ms a step")
layer_s, layer_flops = (step_s[8] - step_s[4]) / 4, (flops[8] - flops[4]) / 4
s32, f32 = step_s[4] + 28 * layer_s, flops[4] + 28 * layer_flops
print(f"32 layers at one rank, from the two: {s32:.3f} s a step, {tokens / s32:,.0f} tokens/s, MFU {100 * f32 * tokens / s32:.1f}% "
      f"(no communication; peak {measured[4] + 28 * (measured[8] - measured[4]) / 4:.1f} GiB unsharded)")
PY
