#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu/build.sh: training steps of configs/sizes/1b.yaml on
# synthetic tokens at the end-to-end anchor's shape (4 x 4096 tokens a step), one run per
# argument PATTERN:CHECKPOINTING (e.g. A:false GGGA:true GGGA:8), CHECKPOINTING being true, false
# or a number N of blocks checkpointed from the first (trainer.checkpointed_layers). Logs in
# $OUT/bench_1b_*.log. PROFILE_STEPS=N: each run also traces N steps (--profile-steps: steps 3 to
# N + 2) and sums their GPU time by kernel into $OUT/profile_1b_*.md (scripts/gpu/trace_summary.py),
# by kernel and launching op (with its input shapes and autograd node) into profile_ops_1b_*.md,
# and the GPU's idle gaps (with what the host was doing) into profile_gaps_1b_*.md.
# Each run's line gives the mean tokens/s and MFU of steps 3-12 (after the traced steps with
# PROFILE_STEPS), then the log's step-12 line. SET='key=value ...' adds --set overrides to every
# run, named by TAG in the logs' names (e.g. SET=optimizer.type=muon TAG=muon).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
TRAIN=${HYBRID_TRAIN:-build-gpu/hybrid-train}  # another build's, e.g. ab_train.sh's sides
mkdir -p "$OUT" /tmp/syn
[ -f /tmp/syn/train.npy ] || python3 -c "import numpy as np; np.save('/tmp/syn/train.npy', np.random.default_rng(0).integers(0, 100278, size=20_000_000, dtype=np.uint32))"
for run in "$@"; do
  pattern=${run%:*} ckpt=${run#*:} layers=-1
  case $ckpt in true|false) ;; *) layers=$ckpt ckpt=true ;; esac
  name=${pattern}_ckpt_${run#*:}${TAG:+_$TAG}
  log="$OUT/bench_1b_$name.log"
  args=(--config configs/sizes/1b.yaml --run-dir /tmp/b1-$pattern-${run#*:}
    --set "data.sources=[{paths: [/tmp/syn/train.npy]}]" --set data.eos_id=100257 --set model.layer_pattern=$pattern
    --set trainer.global_batch_size=4 --set trainer.micro_batch_size=4 --set trainer.max_steps=12
    --set trainer.activation_checkpointing=$ckpt --set trainer.checkpointed_layers=$layers --set checkpoint.interval=0
    --set trainer.log_interval=1)
  for kv in ${SET:-}; do args+=(--set "$kv"); done
  profile=()
  [ -z "${PROFILE_STEPS:-}" ] || profile=(--profile-steps "$PROFILE_STEPS")
  "$TRAIN" "${args[@]}" --stop-after 12 "${profile[@]}" >"$log" 2>&1
  if [ -n "${PROFILE_STEPS:-}" ]; then
    trace=/tmp/b1-$pattern-${run#*:}/trace_rank0.json
    python3 scripts/gpu/trace_summary.py "$trace" 60 "$PROFILE_STEPS" >"$OUT/profile_1b_$name.md"
    python3 scripts/gpu/trace_summary.py --ops "$trace" 80 "$PROFILE_STEPS" >"$OUT/profile_ops_1b_$name.md"
    python3 scripts/gpu/trace_summary.py --gaps "$trace" 30 "$PROFILE_STEPS" >"$OUT/profile_gaps_1b_$name.md"
  fi
  estimate=$("$TRAIN" "${args[@]}" --dry-run | grep -oE "total \(before allocator overhead\) +[0-9.]+ GiB" | grep -oE "[0-9.]+ GiB")
  # The figure the benchmarks document reports: means of steps 3-12, from the first step after the
  # traced ones (and their export) with PROFILE_STEPS.
  first=$((3 + ${PROFILE_STEPS:-0}))
  mean=$(sed -nE 's/.* step +([0-9]+)\/12 .* ([0-9]+) tok\/s +MFU ([0-9.]+)%.*/\1 \2 \3/p' "$log" |
    awk -v first="$first" '$1 >= first {t += $2; m += $3; n++} END {if (n) printf "%.0f tokens/s, %.1f%% MFU (mean of steps %d-12)", t / n, m / n, first}')
  echo "1b $pattern checkpointing=${run#*:}${SET:+ ($SET)}: ${mean:-no steps} | $(grep -E "step 12/|error" "$log" | head -1) (dry-run estimate $estimate; the log's GB are 1e9 bytes)"
  rm -rf /tmp/b1-$pattern-${run#*:}  # a 1.6B checkpoint is 19 GB
done
