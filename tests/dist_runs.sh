#!/usr/bin/env bash
# Data parallelism on CPU with Gloo, 1 to 3 processes: the same global batch gives the same
# training at any world size, ZeRO stage and bucket size (reductions overlapped with backward),
# checkpoints saved at 2 ranks resume at 2 (bit for bit), 1 and 3, asynchronous saves, each rank
# writing its share of the checkpoint (kills at random moments included), ranks that do not share
# the run folder, stop signals, and a dead rank stops the others with an error instead of a hang.
# usage: dist_runs.sh SOURCE_DIR PYTHON   (HYBRID_TRAIN set by ctest)
set -u
src=$1 py=$2
bin=${HYBRID_TRAIN:?}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail=0
check() { if eval "$2"; then echo "ok: $1"; else echo "FAIL: $1"; fail=1; fi; }

"$py" -c "
import numpy as np
rng = np.random.default_rng(0)
phrases = [rng.integers(1, 256, size=rng.integers(3, 9)) for _ in range(40)]
np.save('train.npy', np.concatenate([phrases[i] for i in rng.integers(0, 40, size=3000)]).astype(np.uint16))
"
cat >dp.yaml <<YAML
base: $src/tests/micro_model.yaml
name: dp
data: {sources: [{paths: [train.npy]}], seq_len: 32}
optimizer: {lr: 0.01}
schedule: {warmup_steps: 2}
trainer: {max_steps: 8, global_batch_size: 12, micro_batch_size: 2, device: cpu, log_interval: 4}
checkpoint: {interval: 4, keep_last: 3}
distributed: {timeout_s: 20}
YAML
# Largest difference between two runs' logged losses (and the number of steps each logged).
compare() {
  "$py" - "$1" "$2" <<'PY'
import json, sys
def losses(d): return [json.loads(l)["loss"] for l in open(d + "/metrics.jsonl") if '"loss"' in l]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
print(max(abs(x - y) for x, y in zip(a, b)) if len(a) == len(b) and a else f"lengths {len(a)} vs {len(b)}")
PY
}
close() { "$py" -c "import sys; v=sys.argv[1]; sys.exit(0 if v.replace('.','',1).replace('e-','',1).isdigit() and float(v) < $2 else 1)" "$1"; }

"$bin" --config dp.yaml --run-dir one >one.log 2>&1
for zero in 0 1 2; do
  "$bin" --config dp.yaml --run-dir two_z$zero --nproc-per-node 2 --set distributed.zero_stage=$zero >two_z$zero.log 2>&1
done
d=$(compare one two_z0); check "2 ranks follow 1 rank at the same global batch (max loss diff $d)" 'close "$d" 1e-4'
threads=$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))
check "--nproc-per-node 2: each rank takes half the CPUs for its threads ($threads), unless OMP_NUM_THREADS says" \
  '[ "$(grep -c "$threads intra-op threads a rank" two_z0.log)" = 2 ] && OMP_NUM_THREADS=$((threads + 1)) "$bin" --config dp.yaml --run-dir omp --nproc-per-node 2 --set trainer.max_steps=1 2>&1 | grep -q "$((threads + 1)) intra-op threads a rank"'
d=$(compare two_z0 two_z1); check "ZeRO-1 step equals the unsharded step (max loss diff $d)" 'close "$d" 1e-6'
d=$(compare two_z0 two_z2); check "ZeRO-2 step equals the unsharded step (max loss diff $d)" 'close "$d" 1e-5'
# The gradient norm by weight kind: sharded or not, the kinds' squares add up to the global norm's,
# and 2 ranks' follow 1 rank's.
check "gradient norms by weight kind add up to the global norm, at every ZeRO stage" '"$py" -c "
import json, sys
def rows(d): return [json.loads(l) for l in open(d + \"/metrics.jsonl\") if \"grad_norms\" in l]
one = rows(\"one\")
for d in (\"one\", \"two_z0\", \"two_z1\", \"two_z2\"):
    r = rows(d)
    assert len(r) == 8 and set(r[0][\"grad_norms\"]) == {\"embedding\", \"gdn\", \"attention\", \"mlp\", \"norms\", \"lm_head\"}, d
    for a, b in zip(r, one):
        assert abs(sum(v * v for v in a[\"grad_norms\"].values()) - a[\"grad_norm\"] ** 2) <= 1e-6 * a[\"grad_norm\"] ** 2, d
        assert all(abs(a[\"grad_norms\"][k] - b[\"grad_norms\"][k]) <= 1e-3 * b[\"grad_norm\"] for k in b[\"grad_norms\"]), d
"'
# Small buckets: reductions start from backward's gradient hooks, one bucket at a time.
# ZeRO-2 also with activation checkpointing: the hooks then fire inside the recomputed blocks' backward.
for zero in 0 2; do
  "$bin" --config dp.yaml --run-dir small_z$zero --nproc-per-node 2 --set distributed.zero_stage=$zero \
    --set distributed.bucket_mb=0.002 --set trainer.activation_checkpointing=$([ $zero = 2 ] && echo true || echo false) \
    >small_z$zero.log 2>&1
  d=$(compare one small_z$zero); check "ZeRO-$zero with small buckets$([ $zero = 2 ] && echo " and checkpointing") follows 1 rank (max loss diff $d)" 'close "$d" 1e-4'
  line=$(grep -o "gradient reduction: [0-9]* buckets, [0-9]* started during backward" small_z$zero.log | head -n1)
  check "... the buckets start during backward ($line)" \
    '[[ "$line" =~ ([0-9]+)\ buckets,\ ([0-9]+)\ started ]] && [ "${BASH_REMATCH[1]}" -gt 3 ] && [ "${BASH_REMATCH[2]}" -gt 1 ]'
done
"$bin" --config dp.yaml --run-dir three --nproc-per-node 3 --set distributed.zero_stage=1 >three.log 2>&1
d=$(compare one three); check "3 ranks follow 1 rank (max loss diff $d)" 'close "$d" 1e-4'
# (Newton-Schulz in float32 here: in bfloat16 the reductions' other order, a float32 rounding in a
# gradient, can move a matrix's update by a bfloat16 rounding, and the losses apart by 1e-4.)
muon="--set optimizer.type=muon --set optimizer.muon.ns_dtype=float32"
"$bin" --config dp.yaml --run-dir muon_one $muon >muon_one.log 2>&1
for zero in 1 2; do
  "$bin" --config dp.yaml --run-dir muon_two_z$zero $muon --nproc-per-node 2 --set distributed.zero_stage=$zero >muon_two_z$zero.log 2>&1
  d=$(compare muon_one muon_two_z$zero); check "muon, ZeRO-$zero: 2 ranks follow 1 rank (max loss diff $d)" 'close "$d" 1e-4'
done
warmup="trainer.batch_size_warmup=[{until_step: 3, global_batch_size: 4}, {until_step: 6, global_batch_size: 8}]"
"$bin" --config dp.yaml --run-dir warm_one --set "$warmup" >warm_one.log 2>&1
"$bin" --config dp.yaml --run-dir warm_two --set "$warmup" --nproc-per-node 2 --set distributed.zero_stage=1 >warm_two.log 2>&1
d=$(compare warm_one warm_two); check "batch-size warmup: 2 ranks follow 1 rank (max loss diff $d)" 'close "$d" 1e-4'
"$bin" --config dp.yaml --run-dir warm_bad --set 'trainer.batch_size_warmup=[{until_step: 3, global_batch_size: 2}]' --nproc-per-node 2 >warm_bad.log 2>&1
check "batch-size warmup: a phase's batch that 2 ranks cannot split is named before the first step" \
  'grep -q "error: \[rank 0\] trainer.batch_size_warmup\[0\].global_batch_size 2 is not a multiple of world size 2 x trainer.micro_batch_size 2" warm_bad.log && [ ! -e warm_bad/metrics.jsonl ]'
check "logs carry the rank" 'grep -q "\[rank 0\]" two_z1.log'
# The instance filter at 2 ranks: the loss is the mean over the rows that count of the whole step
# (every rank's), so 2 ranks still follow 1 rank.
"$py" -c "
import numpy as np
t = np.load('train.npy')
for i in range(0, t.size // 32, 5):
    t[32 * i:32 * i + 32] = 7
np.save('rep.npy', t)
"
for n in 1 2; do
  "$bin" --config dp.yaml --run-dir filtered$n --nproc-per-node $n --set 'data.sources=[{paths: [rep.npy]}]' \
    --set 'data.instance_filter={enabled: true, max_count: 16}' >filtered$n.log 2>&1
done
d=$(compare filtered1 filtered2)
check "instance filter: 2 ranks follow 1 rank (max loss diff $d)" \
  'close "$d" 1e-4 && grep -q filtered_instances filtered1/metrics.jsonl && ! cmp -s filtered1/metrics.jsonl one/metrics.jsonl'
# A multiple-choice task scored in the loop at 3 ranks, each its share of the 10 items, and the
# validation loss, each its share of 5 batches: what hybrid-eval gives in one process on the final
# weights.
"$py" -c "
import json, numpy as np
rng = np.random.default_rng(1)
with open('task.jsonl', 'w') as f:
    f.write(json.dumps({'format': 'hybrid-choice-task-v1'}) + '\\n')
    for _ in range(10):
        n = int(rng.integers(2, 5))
        f.write(json.dumps({'context': rng.integers(0, 256, size=int(rng.integers(1, 40))).tolist(),
                            'choices': [rng.integers(0, 256, size=int(rng.integers(1, 6))).tolist() for _ in range(n)],
                            'choice_bytes': rng.integers(1, 20, size=n).tolist(), 'label': int(rng.integers(0, n))}) + '\\n')
"
"$bin" --config dp.yaml --run-dir three_tasks --nproc-per-node 3 --set 'data.tasks=[{name: t, path: task.jsonl}]' \
  --set 'data.validation={paths: [train.npy]}' --set trainer.eval_batches=5 >three_tasks.log 2>&1
"$(dirname "$bin")/hybrid-eval" --checkpoint three_tasks/checkpoints/step0000008 --task task.jsonl >three_tasks_eval.log 2>&1
val=$("$(dirname "$bin")/hybrid-eval" --checkpoint three_tasks/checkpoints/step0000008 --data train.npy --batches 5 | cut -d" " -f2)
check "3 ranks' validation loss is one process's ($val)" '"$py" -c "
import json, sys
v = [json.loads(l)[\"val_loss\"] for l in open(\"three_tasks/metrics.jsonl\") if \"val_loss\" in l][-1]
sys.exit(0 if abs(v - float(sys.argv[1])) <= 1e-6 * v else 1)" "$val"'
check "3 ranks score a task as one process does" '"$py" -c "
import json, sys
t = [json.loads(l)[\"tasks\"][\"t\"] for l in open(\"three_tasks/metrics.jsonl\") if \"tasks\" in l][-1]
f = open(\"three_tasks_eval.log\").read().split(); got = dict(zip(f[2::2], map(float, f[3::2])))
sys.exit(0 if t[\"items\"] == got[\"items\"] == 10 and all(abs(got[k] - t[k]) <= 1e-5 * max(abs(t[k]), 1e-3) for k in t) else 1)"'
# hybrid-eval on 3 processes: each rank its share of the items and batches, the same numbers.
eval3() { "$(dirname "$bin")/hybrid-eval" --checkpoint three_tasks/checkpoints/step0000008 --nproc-per-node 3 "$@" 2>&1; }
eval3 --task task.jsonl >three_procs_eval.log
check "hybrid-eval --nproc-per-node 3 --task: one line, one process's scores" '[ "$(wc -l <three_procs_eval.log)" = 1 ] && "$py" -c "
one, three = (open(f).read().split() for f in (\"three_tasks_eval.log\", \"three_procs_eval.log\"))
assert one[:4] == three[:4] and all(abs(float(a) - float(b)) <= 1e-6 * max(abs(float(a)), 1e-3) for a, b in zip(one[5::2], three[5::2]))"'
val3=$(eval3 --data train.npy --batches 5 | cut -d" " -f2)
check "hybrid-eval --nproc-per-node 3 --data: one process's loss ($val3)" '"$py" -c "import sys; a, b = map(float, sys.argv[1:]); sys.exit(0 if abs(a - b) <= 1e-6 * a else 1)" "$val" "$val3"'
check "hybrid-eval --nproc-per-node with --tokens: a usage error" '! "$(dirname "$bin")/hybrid-eval" --checkpoint three_tasks/checkpoints/step0000008 --tokens x.npy --nproc-per-node 2 >/dev/null 2>&1'
# The same under torchrun (from the torch wheel's virtualenv).
"$(dirname "$py")/torchrun" --nproc-per-node=2 --no-python "$bin" --config dp.yaml --run-dir torchrun >torchrun.log 2>&1
d=$(compare two_z0 torchrun); check "torchrun launches the same training (max loss diff $d)" 'close "$d" 1e-6'

# Saves at 2 ranks under ZeRO-1: each rank writes its share of the weights and of the optimizer
# state in place (its CRC-32s joined by rank 0, which alone writes the rest); nothing else is left
# in the folder.
check "ZeRO-1 saves: rank 1 writes its share of the checkpoint" \
  'grep -q "\[rank 0\] .*saved checkpoint step 8 (.*; the other ranks. shares: slowest .* s (rank 1))" two_z1.log && [ "$(ls two_z1/checkpoints/step0000008 | wc -l)" = 5 ]'
# Asynchronous saves at 2 ranks (each rank copies its own share to host memory, then a thread
# writes it): the same checkpoint as the run with synchronous saves.
"$bin" --config dp.yaml --run-dir async2 --nproc-per-node 2 --set distributed.zero_stage=1 --set checkpoint.async=true \
  >async2.log 2>&1
check "2 ranks, asynchronous saves: written in the background" 'grep -q "writing it in the background" async2.log'
same() { cmp -s "two_z1/checkpoints/step0000008/$1" "async2/checkpoints/step0000008/$1"; }
check "... the same checkpoint as synchronous saves" 'same model.safetensors && same optim.safetensors && same trainer.json'

# Save at 2 ranks (ZeRO-1: sharded optimizer state), resume at 2 (bit for bit the uninterrupted
# run's final checkpoint), at 1 and at 3 ranks.
"$bin" --config dp.yaml --run-dir saved --nproc-per-node 2 --set distributed.zero_stage=1 --stop-after 4 >saved.log 2>&1
cp -r saved resumed2
"$bin" --config dp.yaml --run-dir resumed2 --nproc-per-node 2 --set distributed.zero_stage=1 >resumed2.log 2>&1
check "resumed at 2 ranks: the uninterrupted run's weights and optimizer state, bit for bit" \
  'grep -q "resumed from" resumed2.log && cmp -s {two_z1,resumed2}/checkpoints/step0000008/model.safetensors &&
   cmp -s {two_z1,resumed2}/checkpoints/step0000008/optim.safetensors'
for n in 1 3; do
  cp -r saved resumed$n
  "$bin" --config dp.yaml --run-dir resumed$n --nproc-per-node $n --set distributed.zero_stage=1 >resumed$n.log 2>&1
  check "resumed at $n ranks from a 2-rank checkpoint" 'grep -q "saved at world size 2" resumed$n.log'
  d=$(compare two_z1 resumed$n); check "... and continues like the uninterrupted run (max loss diff $d)" 'close "$d" 1e-4'
done

# Kills at random moments with a save every step (2 ranks, ZeRO-1, 24 steps): six times a rank is
# killed -9 (the launcher stops the other) within 0.1 s after the run's next step, in the middle
# of the shared writes too; each restart resumes from the last whole checkpoint, and the run ends
# with the uninterrupted run's files, bit for bit.
sed 's/interval: 4, keep_last: 3/interval: 1, keep_last: 2/; s/max_steps: 8/max_steps: 24/' dp.yaml >every.yaml
"$bin" --config every.yaml --run-dir every_whole --nproc-per-node 2 --set distributed.zero_stage=1 >every_whole.log 2>&1
steps_logged() { cat killed2/metrics.jsonl 2>/dev/null | wc -l; }
for i in 1 2 3 4 5 6; do
  before=$(steps_logged)
  "$bin" --config every.yaml --run-dir killed2 --nproc-per-node 2 --set distributed.zero_stage=1 >>killed2.log 2>&1 &
  launcher=$!
  until [ "$(steps_logged)" -gt "$before" ] || ! kill -0 $launcher 2>/dev/null; do sleep 0.02; done
  sleep "0.0$((RANDOM % 10))"  # a step takes tens of ms here: later kills could find the run done
  victim=$(pgrep -P $launcher | shuf -n1)
  [ -n "$victim" ] && kill -9 "$victim"
  wait $launcher
done
"$bin" --config every.yaml --run-dir killed2 --nproc-per-node 2 --set distributed.zero_stage=1 >>killed2.log 2>&1
resumes=$(grep "\[rank 0\] .*resumed from" killed2.log | grep -vc "at step 24")
check "2 ranks killed at random moments, saves included ($resumes resumes mid-run): the uninterrupted run's final files" \
  '[ "$resumes" -ge 3 ] && cmp -s {every_whole,killed2}/checkpoints/step0000024/model.safetensors &&
   cmp -s {every_whole,killed2}/checkpoints/step0000024/optim.safetensors && ! ls killed2/checkpoints | grep -q tmp'

# A full disk during a save at 2 ranks without the launcher (as under torchrun or srun): every rank
# ends with the save's error at once (none waits out distributed.timeout_s at the save's end), and
# the previous checkpoint stays LATEST.
"$bin" --config dp.yaml --run-dir full2 --nproc-per-node 2 --set distributed.zero_stage=1 --stop-after 4 >/dev/null 2>&1
port=$(( 20000 + RANDOM % 20000 ))
SECONDS=0
for r in 0 1; do
  ( trap '' XFSZ; ulimit -f 40
    RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$bin" --config dp.yaml --run-dir full2 \
      --set distributed.zero_stage=1 >full2_$r.log 2>&1; echo $? >full2_$r.rc ) &
done
wait
check "full disk at 2 ranks: both ranks stop with the save's error (exits $(cat full2_0.rc) $(cat full2_1.rc) after ${SECONDS}s)" \
  '[ "$(cat full2_0.rc)" != 0 ] && [ "$(cat full2_1.rc)" != 0 ] && [ $SECONDS -lt 15 ] &&
   grep -q "^error: \[rank 0\] checkpoint at step 8 not saved: .*File too large.*previous checkpoint .*step0000004 is intact" full2_0.log &&
   grep -q "^error: \[rank 1\] checkpoint at step 8 not saved: " full2_1.log && [ "$(cat full2/checkpoints/LATEST)" = step0000004 ]'

# Bad input met by a rank (token ids are checked as they are read): the run stops at once,
# non-zero, with the file and offset.
"$py" -c "import numpy as np; t = np.load('train.npy'); t[::400] = 300; np.save('bad.npy', t)"
SECONDS=0
"$bin" --config dp.yaml --run-dir bad --nproc-per-node 2 --set 'data.sources=[{paths: [bad.npy]}]' >bad.log 2>&1; rc=$?
check "bad input stops the run with the message (exit $rc after ${SECONDS}s)" \
  '[ $rc -ne 0 ] && [ $SECONDS -lt 30 ] && grep -qE "^error: \[rank [01]\] bad.npy: token id 300 at token offset [0-9]+ is outside the vocabulary" bad.log'

# A rank killed mid-run: the launcher stops the others and says which rank died.
cp dp.yaml slow.yaml && sed -i 's/max_steps: 8/max_steps: 100000/' slow.yaml
"$bin" --config slow.yaml --run-dir killed --nproc-per-node 2 >killed.log 2>&1 &
launcher=$!
for _ in $(seq 50); do grep -q "step 4/" killed.log 2>/dev/null && break; sleep 0.2; done
victim=$(pgrep -P $launcher | tail -n1)
kill -9 "$victim"
SECONDS=0; wait $launcher; rc=$?
check "a killed rank stops the run (exit $rc after ${SECONDS}s)" '[ $rc -ne 0 ] && [ $SECONDS -lt 30 ] && grep -q "was killed by signal 9; stopping the other ranks" killed.log'

# A stop signal to the launcher goes on to every rank: all stop after the same step, with a
# checkpoint there, exit 0. A launcher killed outright (no forwarding) still stops its ranks so.
for how in TERM 9; do
  run=signalled_$how
  "$bin" --config slow.yaml --run-dir $run --nproc-per-node 2 >$run.log 2>&1 &
  launcher=$!
  for _ in $(seq 50); do grep -q "step 4/" $run.log 2>/dev/null && break; sleep 0.2; done
  kill -$how $launcher
  SECONDS=0; wait $launcher; rc=$?
  alive() { pgrep -f -- "--run-dir $run( |$)" >/dev/null; }
  for _ in $(seq 100); do alive || break; sleep 0.1; done  # the ranks, after a kill -9
  step=$(grep -o "stopping after step [0-9]*" $run.log | grep -o "[0-9]*$")
  check "launcher $([ $how = TERM ] && echo "sent SIGTERM: exit $rc" || echo "killed: its ranks") stop after step ${step:-none} with a checkpoint (${SECONDS}s)" \
    '{ [ $how = 9 ] || [ $rc -eq 0 ]; } && [ -n "$step" ] && [ "$(cat $run/checkpoints/LATEST)" = "$(printf step%07d "$step")" ] && ! alive'
done

# Ranks that do not share the run folder (as on machines with folders of their own; here each
# rank is given another): the run stops before the first step, each rank with the same error.
port=$(( 20000 + RANDOM % 20000 ))
for r in 0 1; do
  RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$bin" --config dp.yaml --run-dir apart$r >apart$r.log 2>&1 &
  eval "pid$r=$!"
done
wait $pid0; rc0=$?; wait $pid1; rc1=$?
check "ranks that see different run folders: both stop with the error (exit $rc0, $rc1)" \
  '[ $rc0 -ne 0 ] && [ $rc1 -ne 0 ] && ! grep -q "step 1/" apart0.log &&
   grep -q "^error: \[rank 0\] apart0: rank 1 does not see the files rank 0 writes in this run folder" apart0.log &&
   grep -q "^error: \[rank 1\] apart1: rank 1 does not see the files rank 0 writes in this run folder" apart1.log'

# Without the launcher (as under torchrun or srun), a surviving rank times out with an error.
cp dp.yaml timeout.yaml && sed -i 's/max_steps: 8/max_steps: 100000/; s/timeout_s: 20/timeout_s: 5/' timeout.yaml
port=$(( 20000 + RANDOM % 20000 ))
for r in 0 1; do
  RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$bin" --config timeout.yaml --run-dir manual >manual$r.log 2>&1 &
  eval "pid$r=$!"
done
for _ in $(seq 50); do grep -q "step 4/" manual0.log 2>/dev/null && break; sleep 0.2; done
kill -9 $pid1
SECONDS=0; wait $pid0; rc=$?
check "the surviving rank errors out within the timeout (exit $rc after ${SECONDS}s)" '[ $rc -ne 0 ] && [ $SECONDS -lt 30 ] && grep -q "^error: " manual0.log'
exit $fail
