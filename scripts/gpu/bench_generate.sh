#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu/build.sh with hybrid-train and hybrid-generate: how fast
# hybrid-generate continues prompts with a model of configs/sizes/1b.yaml's size (GGGA; weights
# after one training step on synthetic tokens: the speed does not depend on what they learned).
# Each run: PROMPT random prompt tokens a row, NEW new tokens (greedy), for each batch size in
# BATCHES, in float32 and under bf16 autocast with each step's kernels launched one by one
# (--no-cuda-graph), and under bf16 with the step replayed as a CUDA graph (the default), for more
# than one row also with prompts of different lengths (bf16-graph-ragged: PROMPT the longest). The
# table gives hybrid-generate's own figures (the prompt's forward with the first token's choice;
# then the one-token steps: time a step, new tokens a second over all rows) and the process's wall
# time (the model's loading included); then a bf16 run traced, eager and graphed. Logs, the traces
# and their summaries in $OUT/generate/.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
PROMPT=${PROMPT:-512} NEW=${NEW:-256} BATCHES=${BATCHES:-"1 8"}
mkdir -p "$OUT/generate" /tmp/syn
[ -f /tmp/syn/train.npy ] || python3 -c "import numpy as np; np.save('/tmp/syn/train.npy', np.random.default_rng(0).integers(0, 100278, size=20_000_000, dtype=np.uint32))"
run=/tmp/generate-1b
rm -rf "$run"
build-gpu/hybrid-train --config configs/sizes/1b.yaml --run-dir "$run" --set "data.sources=[{paths: [/tmp/syn/train.npy]}]" \
  --set data.eos_id=100257 --set model.layer_pattern=GGGA --set trainer.global_batch_size=1 \
  --set trainer.micro_batch_size=1 --set trainer.max_steps=1 --set checkpoint.interval=1 >"$OUT/generate/train.log" 2>&1 ||
  { echo "training the model failed: $(tail -1 "$OUT/generate/train.log")"; exit 1; }
model=$(ls -d "$run"/checkpoints/step* | tail -1)
echo "| rows | prompt tokens | new tokens a row | precision | prompt + first token s | ms a step | new tokens/s (all rows) | wall s |"
echo "|---|---|---|---|---|---|---|---|"
for rows in $BATCHES; do
  python3 -c "import numpy as np, sys; np.save(sys.argv[1], np.random.default_rng(1).integers(0, 100000, size=($rows, $PROMPT), dtype=np.int64))" \
    "/tmp/prompt_$rows.npy"
  # Ragged: row b's prompt PROMPT - b PROMPT / (2 rows) tokens, right-padded (one packed forward).
  python3 -c "import numpy as np, sys; p = np.load(sys.argv[1]); r = p.shape[0]
for b in range(r): p[b, p.shape[1] - b * p.shape[1] // (2 * r):] = 100100
np.save(sys.argv[2], p)" "/tmp/prompt_$rows.npy" "/tmp/prompt_${rows}_ragged.npy"
  for precision in float32 bf16 bf16-graph $([ "$rows" -gt 1 ] && echo bf16-graph-ragged); do
    log="$OUT/generate/generate_${rows}_$precision.log"
    flag=$(case "$precision" in float32) echo --no-cuda-graph ;; bf16) echo --bf16 --no-cuda-graph ;; bf16-graph) echo --bf16 ;;
      bf16-graph-ragged) echo --bf16 --pad-id 100100 ;; esac)
    prompt=/tmp/prompt_$rows$([ "$precision" = bf16-graph-ragged ] && echo _ragged).npy
    start=$SECONDS
    build-gpu/hybrid-generate --checkpoint "$model" --prompt "$prompt" --new-tokens "$NEW" --device cuda $flag \
      >/dev/null 2>"$log" || { echo "| $rows | $PROMPT | $NEW | $precision | failed: $(tail -1 "$log") | | | |"; continue; }
    figure() { sed -nE "s|.*$1.*|\1|p" "$log"; }  # the number the pattern's group matches
    echo "| $rows | $PROMPT | $NEW | $precision | $(figure 'first new token in ([0-9.]+) s') | $(figure '\(([0-9.]+) ms a step') | $(figure ' ([0-9.]+) new tokens/s') | $((SECONDS - start)) |"
  done
done
# Where a step's time goes under bf16 with the first batch size, eager and graphed: 32 new tokens
# traced (the host's ops and the kernels, those a graph replays too), then the GPU's idle time
# between kernels by what the host was doing (trace_summary.py --gaps; launch-bound steps show the
# host behind in every gap) and the GPU time by kernel.
rows=${BATCHES%% *}
for mode in eager graph; do
  trace="$OUT/generate/trace_${rows}_bf16_$mode.json"
  build-gpu/hybrid-generate --checkpoint "$model" --prompt "/tmp/prompt_$rows.npy" --new-tokens 32 --device cuda --bf16 \
    $([ $mode = eager ] && echo --no-cuda-graph) --profile "$trace" >/dev/null 2>"$OUT/generate/profiled_$mode.log" &&
    python3 scripts/gpu/trace_summary.py --gaps "$trace" 12 >"$OUT/generate/gaps_${rows}_bf16_$mode.md" &&
    python3 scripts/gpu/trace_summary.py "$trace" 30 >"$OUT/generate/kernels_${rows}_bf16_$mode.md" &&
    { echo "$mode:"; head -3 "$OUT/generate/gaps_${rows}_bf16_$mode.md"; } ||
    echo "the profiled $mode run failed: $(tail -1 "$OUT/generate/profiled_$mode.log")"
done
rm -rf "$run"  # a 1.6B checkpoint with its optimizer state is about 19 GB
