#!/usr/bin/env bash
# hybrid-train as users run it: a bad config or flag gives one "error:" line naming the
# file and key, exit code 2, and creates no run directory. The same for hybrid-bench-delta-rule's
# shapes where the build has it (HYBRID_BENCH_DELTA_RULE).
set -u
src=$1
bin=${HYBRID_TRAIN:?}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail=0

expect_error() {  # expect_error <substring> <args...>
  local want=$1; shift
  "$bin" "$@" >out.txt 2>err.txt
  local rc=$?
  local lines; lines=$(wc -l <err.txt)
  if [ $rc -ne 2 ] || [ "$lines" -ne 1 ] || ! grep -qF -- "$want" err.txt || [ -e runs ]; then
    echo "FAIL: $* -> rc=$rc lines=$lines: $(cat err.txt)"; fail=1
  else
    echo "ok: $(cat err.txt)"
  fi
}

printf 'model:\n  d_modle: 64\n' >typo.yaml
printf 'model: {n_layers: [1\n' >syntax.yaml
printf 'optimizer: {lr: -1}\n' >neg.yaml
expect_error "typo.yaml:2:12: unknown key 'model.d_modle' (did you mean 'd_model'?)" --config typo.yaml --dry-run
expect_error "syntax.yaml:2:1: YAML syntax error" --config syntax.yaml
expect_error "neg.yaml:1:17: optimizer.lr: must be positive" --config neg.yaml
expect_error "model.attention.n_heads: 7 heads do not divide d_model 3840" --config "$src/configs/7b.yaml" --set model.attention.n_heads=7 --dry-run
expect_error "cannot open config file" --config nothere.yaml
expect_error "data.tasks[1].name: 'a' twice" --config "$src/configs/tiny.yaml" --set 'data.tasks=[{name: a, path: x}, {name: a, path: y}]' --dry-run
expect_error "data.tasks[0]: needs a path" --config "$src/configs/tiny.yaml" --set 'data.tasks=[{name: a}]' --dry-run
expect_error "trainer.batch_size_warmup[1].until_step: must be after the phase before's (4)" --config "$src/configs/tiny.yaml" --set 'trainer.batch_size_warmup=[{until_step: 4, global_batch_size: 8}, {until_step: 4, global_batch_size: 8}]' --dry-run
expect_error "trainer.spike_skip.window: must be at least 20 (the guard judges a step once 20 are known), got 8" --config "$src/configs/tiny.yaml" --set trainer.spike_skip.window=8 --dry-run
expect_error "trainer.batch_size_warmup[0].global_batch_size: 12 is not a multiple of trainer.micro_batch_size 8" --config "$src/configs/tiny.yaml" --set 'trainer.batch_size_warmup=[{until_step: 4, global_batch_size: 12}]' --dry-run
expect_error "optimizer.muon.ns_dtype: 'bf16' is not one of bfloat16, float32" --config "$src/configs/tiny.yaml" --set optimizer.type=muon --set optimizer.muon.ns_dtype=bf16 --dry-run
expect_error "--bogus" --config "$src/configs/tiny.yaml" --bogus
expect_error "--stop-after: must be above 0, got 0" --config "$src/configs/tiny.yaml" --stop-after 0

# Durations for --time-limit: 3h50m, 90m, 5400; not 3h50 (which unit?), 0 or words.
for bad in 3h50 0 soon 5x; do
  expect_error "--time-limit: must be a duration like 3h50m, 90m or 5400 (seconds), got $bad" --config typo.yaml --time-limit $bad
done
# The dry run of 7b.yaml prints OLMo Hybrid 7B's exact parameter count.
"$bin" --config "$src/configs/7b.yaml" --dry-run --world-size 8 >dry.txt || { echo "FAIL: 7b dry run"; fail=1; }
grep -q "total .* 7,430,870,688" dry.txt || { echo "FAIL: 7b total not in:"; cat dry.txt; fail=1; }
# ... and what a checkpoint of it takes: 12 bytes a parameter (weights, AdamW's two moments), an
# eighth of it written by each rank.
grep -q "^checkpoint: 83.05 GiB a save (weights 27.68, optimizer state 55.36), about 10.38 GiB written by each rank$" dry.txt || { echo "FAIL: 7b checkpoint size not in:"; cat dry.txt; fail=1; }
# ... and the run's tokens and compute (6e12 tokens in 1,430,512 steps), with a batch-size warmup
# the tokens of each phase's steps.
grep -q "^run: 1,430,512 steps of 512 x 8192 tokens: 6.00T tokens, 2.65e+23 training FLOPs$" dry.txt || { echo "FAIL: 7b run size not in:"; cat dry.txt; fail=1; }
# ... and under Muon what its Newton-Schulz iterations add: a rank's eighth of them under ZeRO, all
# of them on every rank without it.
"$bin" --config "$src/configs/7b.yaml" --dry-run --world-size 8 --set optimizer.type=muon | grep -q \
  "^muon: Newton-Schulz (5 iterations, products in bfloat16) 7.82e+13 FLOPs a step, a rank's share of 8: 0.3% of the rank's training FLOPs a step$" \
  || { echo "FAIL: the dry run's Muon cost under ZeRO"; fail=1; }
"$bin" --config "$src/configs/7b.yaml" --dry-run --world-size 8 --set optimizer.type=muon --set distributed.zero_stage=0 | \
  grep -q "^muon: Newton-Schulz (5 iterations, products in bfloat16) 6.25e+14 FLOPs a step on every rank (ZeRO stage 0" \
  || { echo "FAIL: the dry run's Muon cost without ZeRO"; fail=1; }
"$bin" --config "$src/configs/tiny.yaml" --dry-run --set trainer.global_batch_size=32 \
  --set 'trainer.batch_size_warmup=[{until_step: 100, global_batch_size: 8}, {until_step: 200, global_batch_size: 16}]' | \
  grep -q "^run: 300 steps (batch-size warmup: steps 1-100 at 8 instances, 101-200 at 16, then 32): 1.43M tokens, " \
  || { echo "FAIL: the dry run's tokens with a batch-size warmup"; fail=1; }
# ... and the memory its checkpointing trades: the estimate with none to all of its 32 blocks
# checkpointed, the last the configured total (7b.yaml checkpoints every block), falling.
awk '/total \(before allocator overhead\)/ {total = $(NF - 1)} / of 32 / {n++; if (prev != "" && $(NF - 1) + 0 >= prev + 0) bad = 1; prev = last = $(NF - 1)}
     END {exit !(n == 5 && !bad && last == total)}' dry.txt || { echo "FAIL: 7b checkpointing table:"; cat dry.txt; fail=1; }
# --print-config round-trips: its output loads back to the same YAML.
"$bin" --config "$src/configs/sizes/1b.yaml" --print-config >r1.yaml && "$bin" --config r1.yaml --print-config >r2.yaml \
  && cmp -s r1.yaml r2.yaml || { echo "FAIL: --print-config does not round-trip"; fail=1; }
# hybrid-bench-delta-rule's own shapes (CUDA builds only), refused before any GPU is asked for.
if [ -n "${HYBRID_BENCH_DELTA_RULE:-}" ]; then
  bin=$HYBRID_BENCH_DELTA_RULE
  expect_error "--shape: 1,2,3,4 is not B,T,H,K,V, five positive integers" --shape 1,2,3,4
  expect_error "--shape: 1,2,x,4,5 is not B,T,H,K,V" --shape 1,2,x,4,5
  expect_error "--shape: 0,1,1,1,1 is not B,T,H,K,V" --shape 0,1,1,1,1
  expect_error "--shapes excludes --shape" --shape 1,64,1,16,16 --shapes 2
fi
exit $fail
