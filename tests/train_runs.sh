#!/usr/bin/env bash
# hybrid-train end to end on a micro model and synthetic data: exact resume, kills at random
# moments (also during saves), a full disk during a save, asynchronous saves (the same three),
# stop signals, a time limit, corrupted and mismatched checkpoints, and bad data; a multiple-choice
# task scored in the loop; hybrid-eval and hybrid-generate on its checkpoints.
# usage: train_runs.sh SOURCE_DIR PYTHON   (HYBRID_TRAIN, HYBRID_EVAL, HYBRID_GENERATE set by ctest)
set -u
src=$1 py=$2
bin=${HYBRID_TRAIN:?} eval_bin=${HYBRID_EVAL:?} generate_bin=${HYBRID_GENERATE:?}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fail=0
check() { if eval "$2"; then echo "ok: $1"; else echo "FAIL: $1"; fail=1; fi; }

"$py" - <<'PY'
import json, numpy as np, os
rng = np.random.default_rng(0)
os.makedirs("data", exist_ok=True)
# A learnable stream: repeated random phrases, EOS (0) between documents.
phrases = [rng.integers(1, 256, size=rng.integers(3, 9)) for _ in range(40)]
docs = [np.concatenate([phrases[i] for i in rng.integers(0, 40, size=30)] + [[0]]) for _ in range(300)]
np.save("data/train.npy", np.concatenate(docs[:280]).astype(np.uint16))
np.save("data/valid.npy", np.concatenate(docs[280:]).astype(np.uint16))
bad = np.concatenate(docs[:10]).astype(np.uint16); bad[1234] = 300
np.save("data/bad.npy", bad)
# A multiple-choice task in prepare_task.py's format: 24 tokens of a validation document, then its
# next 8 tokens among three runs of random tokens (which a model that learned the phrases rejects).
valid = np.load("data/valid.npy").astype(np.int64)
with open("data/phrases.jsonl", "w") as f:
    f.write(json.dumps({"format": "hybrid-choice-task-v1", "items": 40}) + "\n")
    made = 0
    while made < 40:
        s = int(rng.integers(0, valid.size - 32))
        if (valid[s:s + 32] == 0).any():
            continue
        label = int(rng.integers(0, 4))
        choices = [rng.integers(1, 256, size=8).tolist() for _ in range(3)]
        choices.insert(label, valid[s + 24:s + 32].tolist())
        f.write(json.dumps({"context": valid[s:s + 24].tolist(), "choices": choices, "choice_bytes": [8] * 4, "label": label}) + "\n")
        made += 1
with open("data/badtask.jsonl", "w") as f:
    f.write(json.dumps({"format": "hybrid-choice-task-v1"}) + "\n")
    f.write(json.dumps({"context": [1, 2], "choices": [[3], [300]], "choice_bytes": [1, 1], "label": 0}) + "\n")
PY
cat >micro.yaml <<YAML
base: $src/tests/micro_model.yaml
name: micro
data:
  sources: [{paths: [data/train.npy]}]
  validation: {paths: [data/valid.npy]}
  tasks: [{name: phrases, path: data/phrases.jsonl}]
  seq_len: 32
optimizer: {lr: 0.01}
schedule: {warmup_steps: 3}
trainer: {max_steps: 20, global_batch_size: 8, micro_batch_size: 4, log_interval: 5, eval_interval: 10, eval_batches: 2,
          device: cpu}  # bit-exact resume is a CPU guarantee (GPU kernels may use atomics)
checkpoint: {interval: 5, keep_last: 2, permanent_interval: 10}
YAML
losses() { grep -v val_loss "$1/metrics.jsonl" | sed 's/.*"loss":\([^,]*\).*/\1/'; }
# killed_runs CONFIG DIR N: N runs into DIR, each killed (-9) at a random moment; logs in DIR.log.
killed_runs() {
  for i in $(seq "$3"); do
    "$bin" --config "$1" --run-dir "$2" >>"$2.log" 2>&1 &
    pid=$!
    sleep "0.$((RANDOM % 9 + 1))"
    kill -9 $pid 2>/dev/null
    wait $pid 2>/dev/null
  done
}
# wait_for_steps DIR PID: until DIR's run has logged 5 lines of metrics (or process PID ended).
wait_for_steps() {
  until { [ -f "$1/metrics.jsonl" ] && [ "$(wc -l <"$1/metrics.jsonl")" -ge 5 ]; } || ! kill -0 "$2" 2>/dev/null; do
    sleep 0.05
  done
}
# full_disk_run CONFIG DIR: 5 steps, then on under a 64 KiB file size limit (the step-10 save
# fails as on a full disk); its log in DIR.log, its exit status returned.
full_disk_run() {
  "$bin" --config "$1" --run-dir "$2" --stop-after 5 >/dev/null 2>&1
  ( trap '' XFSZ; ulimit -f 64; "$bin" --config "$1" --run-dir "$2" >"$2.log" 2>&1 )
}

# 1. Exact resume: 20 steps in one go == 10 steps, stop, resume, 10 more: the same losses and bytes.
"$bin" --config micro.yaml --run-dir whole >whole.log 2>&1
check "uninterrupted run finishes" '[ -f whole/checkpoints/step0000020/MANIFEST.json ]'
"$bin" --config micro.yaml --run-dir split --stop-after 10 >split1.log 2>&1
"$bin" --config micro.yaml --run-dir split >split2.log 2>&1
check "resume starts where it stopped" 'grep -q "resumed from .*step0000010 at step 10" split2.log'
check "20 losses in both runs" '[ "$(losses whole | wc -l)" = 20 ] && [ "$(losses split | wc -l)" = 20 ]'
check "losses bit-identical after resume" 'diff <(losses whole) <(losses split) >/dev/null'
check "weights bit-identical after resume" 'cmp -s whole/checkpoints/step0000020/model.safetensors split/checkpoints/step0000020/model.safetensors'
check "optimizer state bit-identical after resume" 'cmp -s whole/checkpoints/step0000020/optim.safetensors split/checkpoints/step0000020/optim.safetensors'
"$bin" --config micro.yaml --resume split/checkpoints/step0000010 --run-dir ramp --set trainer.global_batch_size=12 --stop-after 2 >ramp.log 2>&1
check "resume with another global batch size: the data goes on at the next instance (80, no whole number of 12s)" \
  'grep -q "resumed from .*step0000010 at step 10 (global batch size 8 -> 12, the data going on at instance 80)" ramp.log && [ "$(grep -c "\"tokens\":$(( (80 + 12) * 32 ))," ramp/metrics.jsonl)" = 1 ]'
# optimizer.type: muon: it trains, and a resume is bit for bit as with AdamW.
"$bin" --config micro.yaml --run-dir muon_whole --set optimizer.type=muon >muon_whole.log 2>&1
"$bin" --config micro.yaml --run-dir muon_split --set optimizer.type=muon --stop-after 10 >muon_split.log 2>&1
"$bin" --config micro.yaml --run-dir muon_split --set optimizer.type=muon >>muon_split.log 2>&1
check "muon: the loss falls, and below AdamW's at step 20 here" '"$py" -c "import sys; m=[float(x) for x in open(sys.argv[1]).read().split()]; a=[float(x) for x in open(sys.argv[2]).read().split()]; sys.exit(0 if len(m) == 20 and m[-1] < m[0] - 0.5 and m[-1] < a[-1] else 1)" <(losses muon_whole) <(losses whole)'
check "muon: the run says what its Newton-Schulz iterations cost" 'grep -q "info muon: Newton-Schulz (5 iterations, products in bfloat16) [0-9.e+]* FLOPs a step: [0-9.]*% of the rank.s training FLOPs a step" muon_whole.log'
check "muon: resumed, the same weights and state, bit for bit" 'cmp -s muon_whole/checkpoints/step0000020/model.safetensors muon_split/checkpoints/step0000020/model.safetensors && cmp -s muon_whole/checkpoints/step0000020/optim.safetensors muon_split/checkpoints/step0000020/optim.safetensors'
"$bin" --config micro.yaml --resume split/checkpoints/step0000010 --run-dir to_muon --set optimizer.type=muon >to_muon.log 2>&1; rc=$?
check "muon: an AdamW checkpoint resumed under Muon is named" '[ $rc -ne 0 ] && grep -q "^error: .*optim.safetensors: optimizer state .momentum.model.layers.0.* is missing (the checkpoint holds AdamW.s state for it: saved under another optimizer.type)" to_muon.log'
# Batch-size warmup: 4 steps of 4 instances, 4 of 12, then trainer.global_batch_size (8); the same
# weights as the phases run by hand (stopped and resumed with another global batch each time), and
# as the run stopped inside a phase and at a phase's end and resumed.
warmup="trainer.batch_size_warmup=[{until_step: 4, global_batch_size: 4}, {until_step: 8, global_batch_size: 12}]"
"$bin" --config micro.yaml --run-dir warm --set "$warmup" --set trainer.max_steps=12 >warm.log 2>&1
check "batch-size warmup: the tokens of 4, 12, then 8 instances a step" \
  '[ "$(grep -v val_loss warm/metrics.jsonl | grep -o "\"tokens\":[0-9]*" | cut -d: -f2 | tr "\n" " ")" = "$(for b in 4 4 4 4 12 12 12 12 8 8 8 8; do t=$((${t:-0} + b * 32)); printf "%s " $t; done)" ] && grep -q "step 9 on: global batch size 12 -> 8" warm.log'
"$bin" --config micro.yaml --run-dir by_hand --set trainer.max_steps=12 --set trainer.global_batch_size=4 --stop-after 4 >by_hand.log 2>&1
"$bin" --config micro.yaml --run-dir by_hand --set trainer.max_steps=12 --set trainer.global_batch_size=12 --stop-after 4 >>by_hand.log 2>&1
"$bin" --config micro.yaml --run-dir by_hand --set trainer.max_steps=12 >>by_hand.log 2>&1
check "batch-size warmup = its phases run by hand, bit for bit" 'cmp -s warm/checkpoints/step0000012/model.safetensors by_hand/checkpoints/step0000012/model.safetensors'
for stop in 4 6; do
  "$bin" --config micro.yaml --run-dir "warm$stop" --set "$warmup" --set trainer.max_steps=12 --stop-after $stop >"warm$stop.log" 2>&1
  "$bin" --config micro.yaml --run-dir "warm$stop" --set "$warmup" --set trainer.max_steps=12 >>"warm$stop.log" 2>&1
done
check "batch-size warmup resumed at a phase's end and inside one: bit for bit" 'cmp -s warm/checkpoints/step0000012/model.safetensors warm4/checkpoints/step0000012/model.safetensors && cmp -s warm/checkpoints/step0000012/model.safetensors warm6/checkpoints/step0000012/model.safetensors && ! grep -q "global batch size .* the data going on" warm4.log warm6.log'
"$bin" --config micro.yaml --resume split/checkpoints/step0000010 --run-dir reseeded --set data.seed=99 --stop-after 1 >reseeded.log 2>&1
check "resume with another data.seed: warned, and the new seed recorded" \
  'grep -q "warn.*data.seed 99 differs from the checkpoint.s 1234: the data goes on in another order" reseeded.log && grep -q "\"seed\": 99" reseeded/checkpoints/step0000011/trainer.json'
check "keep_last 2 plus permanent step 10" '[ "$(ls whole/checkpoints | tr "\n" " ")" = "LATEST step0000010 step0000015 step0000020 " ]'
check "loss falls" '"$py" -c "import sys; l=[float(x) for x in open(sys.argv[1]).read().split()]; sys.exit(0 if sum(l[-5:])/5 < sum(l[:5])/5 - 0.5 else 1)" <(losses whole)'
check "hybrid-eval reads a checkpoint" '"$py" -c "import numpy as np; np.save(\"t.npy\", np.load(\"data/valid.npy\")[:64].astype(np.int64))" && "$eval_bin" --checkpoint whole/checkpoints/step0000020 --tokens t.npy | grep -q "^loss "'
check "hybrid-eval --data recomputes the run's val_loss" '"$py" -c "import json, sys; v = [json.loads(l)[\"val_loss\"] for l in open(\"whole/metrics.jsonl\") if \"val_loss\" in l][-1]; e = float(sys.argv[1]); sys.exit(0 if abs(e - v) <= 1e-7 * abs(v) else 1)" "$("$eval_bin" --checkpoint whole/checkpoints/step0000020 --data data/valid.npy --batches 2 | cut -d" " -f2)"'
last_task() { "$py" -c "import json, sys; print(json.dumps([json.loads(l)[\"tasks\"][\"phrases\"] for l in open(sys.argv[1]) if \"tasks\" in l][-1]))" "$1/metrics.jsonl"; }
check "the task is scored in the loop: acc $(last_task whole | "$py" -c "import json, sys; print(json.load(sys.stdin)[\"acc\"])") (40 items, chance 0.25)" \
  'last_task whole | "$py" -c "import json, sys; t = json.load(sys.stdin); sys.exit(0 if t[\"items\"] == 40 and t[\"acc\"] >= 0.9 and t[\"chance\"] == 0.25 else 1)"'
check "hybrid-eval --task recomputes the run's task scores" '"$eval_bin" --checkpoint whole/checkpoints/step0000020 --task data/phrases.jsonl >task.log && "$py" -c "
import json, sys
t = json.loads(sys.argv[1]); f = open(\"task.log\").read().split()
got = dict(zip(f[2::2], map(float, f[3::2])))
sys.exit(0 if f[1] == \"phrases\" and all(abs(got[k] - t[k]) <= 1e-7 * abs(t[k]) for k in (\"items\", \"acc\", \"acc_norm\", \"acc_per_token\", \"bpb\", \"chance\")) else 1)" "$(last_task whole)"'
printf '%s\n' '{"context": "abc", "choices": [" d", " e"], "label": 1}' '{"context": "xy ", "choices": ["z", "w"], "label": 0}' >text_task.jsonl
check "scripts/prepare_task.py writes what hybrid-eval --task reads" '"$py" $src/scripts/prepare_task.py text_task.jsonl --tokenizer bytes --output text_task_ids.jsonl >/dev/null && "$eval_bin" --checkpoint whole/checkpoints/step0000020 --task text_task_ids.jsonl | grep -q "^task text_task_ids items 2 acc "'
"$bin" --config micro.yaml --run-dir two_sets --set trainer.max_steps=10 \
  --set 'data.validation=[{name: held_out, paths: [data/valid.npy]}, {name: seen, paths: [data/train.npy]}]' >two_sets.log 2>&1
check "two validation sets: each by name, the first as val_loss, each = hybrid-eval --data" '"$py" -c "
import json, sys
e = [json.loads(l) for l in open(\"two_sets/metrics.jsonl\") if \"val_losses\" in l][-1]; f = json.load(open(\"two_sets/FINISHED.json\"))
held, seen = map(float, sys.argv[1:])
sys.exit(0 if e[\"val_loss\"] == e[\"val_losses\"][\"held_out\"] and f[\"val_losses\"] == e[\"val_losses\"] and seen != held
         and abs(e[\"val_losses\"][\"held_out\"] - held) <= 1e-7 * held and abs(e[\"val_losses\"][\"seen\"] - seen) <= 1e-7 * seen else 1)" \
  "$("$eval_bin" --checkpoint two_sets/checkpoints/step0000010 --data data/valid.npy --batches 2 | cut -d" " -f2)" \
  "$("$eval_bin" --checkpoint two_sets/checkpoints/step0000010 --data data/train.npy --batches 2 | cut -d" " -f2)"'
"$bin" --config micro.yaml --run-dir badtask --set 'data.tasks=[{name: bad, path: data/badtask.jsonl}]' >badtask.log 2>&1; rc=$?
check "a bad task file: its line and the id named, nothing written" '[ $rc -ne 0 ] && grep -q "^error: data/badtask.jsonl:2: choices\[1\]: token id 300 is outside" badtask.log && [ ! -e badtask ]'
"$eval_bin" --checkpoint whole/checkpoints/step0000020 --data "data/nothing*.npy" >badeval.log 2>&1; rc=$?
check "hybrid-eval --data: a glob without files is named" '[ $rc -ne 0 ] && grep -q "^error: .*data/nothing\*.npy" badeval.log'
gen() { "$generate_bin" --checkpoint whole/checkpoints/step0000020 "$@"; }
check "hybrid-generate: 6 new ids a row" '[ "$(gen --prompt t.npy --new-tokens 6 --output g.npy 2>gen.log | wc -w)" = 6 ]'
check "hybrid-generate: past model.max_seq_len (64) it warns" 'grep -q "70 positions go past model.max_seq_len 64" gen.log'
check "hybrid-generate: within it, no warning" '! gen --prompt t.npy --new-tokens 0 2>&1 >/dev/null | grep -q "max_seq_len"'
check "hybrid-generate: prompt and continuation written" '"$py" -c "import numpy as np; a = np.load(\"g.npy\"); assert a.shape == (1, 70) and (a[0, :64] == np.load(\"t.npy\")).all()"'
check "hybrid-generate: sampling is reproducible" '[ "$(gen --prompt-ids 5,9 --temperature 1 --seed 4 2>/dev/null)" = "$(gen --prompt-ids 5,9 --temperature 1 --seed 4 2>/dev/null)" ]'
gen --prompt-ids 5,300 >badgen.log 2>&1; rc=$?
check "hybrid-generate: bad id named with its offset" '[ $rc -ne 0 ] && grep -q "^error: --prompt-ids: token id 300 at offset 1 is outside the vocabulary \[0, 256)" badgen.log'
"$py" -c "import numpy as np; np.save(\"ragged.npy\", np.array([[5, 9, 3], [7, 255, 255]], dtype=np.int64))"
check "hybrid-generate --pad-id: each row goes on as it does alone" '[ "$(gen --prompt ragged.npy --pad-id 255 --new-tokens 5 2>/dev/null)" = "$(gen --prompt-ids 5,9,3 --new-tokens 5 2>/dev/null; gen --prompt-ids 7 --new-tokens 5 2>/dev/null)" ]'
"$py" -c "import numpy as np; np.save(\"padonly.npy\", np.array([[5, 9], [255, 255]], dtype=np.int64))"
gen --prompt padonly.npy --pad-id 255 >badpad.log 2>&1; rc=$?
check "hybrid-generate --pad-id: a row of padding alone is named" '[ $rc -ne 0 ] && grep -q "^error: --pad-id 255: row 1 of the prompt is all padding" badpad.log'
check "hybrid-generate --profile: a trace of the generation's ops" '[ "$(gen --prompt-ids 5,9 --new-tokens 3 --profile trace.json 2>/dev/null | wc -w)" = 3 ] && "$py" -c "import json; e = json.load(open(\"trace.json\"))[\"traceEvents\"]; assert any(x.get(\"name\", \"\").startswith(\"aten::\") for x in e)"'
gen --prompt-ids 5,9 --profile nowhere/trace.json >badtrace.log 2>&1; rc=$?
check "hybrid-generate --profile: a folder that is not there is named before generating" '[ $rc -ne 0 ] && [ "$(grep -c "^error: --profile nowhere/trace.json: its folder does not exist or cannot be written" badtrace.log)" = 1 ] && [ "$(wc -l <badtrace.log)" = 1 ]'
check "hybrid-generate --cuda-graph: the same tokens (fixed-shape steps; no graph on the CPU)" '[ "$(gen --prompt ragged.npy --pad-id 255 --new-tokens 6 --cuda-graph 2>/dev/null)" = "$(gen --prompt ragged.npy --pad-id 255 --new-tokens 6 2>/dev/null)" ] && [ "$(gen --prompt-ids 5,9 --temperature 1 --seed 2 --new-tokens 6 --cuda-graph 2>/dev/null)" = "$(gen --prompt-ids 5,9 --temperature 1 --seed 2 --new-tokens 6 2>/dev/null)" ]'
gen --prompt-ids 5 --cuda-graph --no-cuda-graph >bothgraph.log 2>&1; rc=$?
check "hybrid-generate --cuda-graph with --no-cuda-graph is a usage error" '[ $rc -eq 2 ] && grep -q "excludes" bothgraph.log'
check "hybrid-generate: a row ends at its stop id" '[ "$(gen --prompt-ids 5,9 --new-tokens 8 --stop-id "$(gen --prompt-ids 5,9 --new-tokens 1 2>/dev/null)" 2>/dev/null | wc -w)" = 1 ]'
gen --prompt-ids 5 --bf16 >bf16gen.log 2>&1; rc=$?
check "hybrid-generate --bf16 on the CPU is a usage error" '[ $rc -eq 2 ] && grep -q "^error: --bf16 needs --device cuda" bf16gen.log'
gen >nogen.log 2>&1; rc=$?
check "hybrid-generate: no prompt is a usage error" '[ $rc -eq 2 ] && grep -q "give the prompt" nogen.log'
# A byte-level tokenizer of the micro model's 256 ids (no merges), for the text wrapper: EOS
# (which generate.py stops at) is id 0, the micro data's document separator, in place of byte 0.
"$py" -c "
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
symbols = ['<|endoftext|>'] + [c for c in sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord) if c != chr(256)]  # chr(256): byte 0
t = Tokenizer(models.BPE({s: i for i, s in enumerate(symbols)}, [])); t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
t.add_special_tokens(['<|endoftext|>']); t.decoder = decoders.ByteLevel(); t.save('tok.json')"
check "scripts/generate.py: text in, text out" 'HYBRID_GENERATE=$generate_bin "$py" $src/scripts/generate.py --checkpoint whole/checkpoints/step0000020 --tokenizer tok.json --prompt "Hello, world" --new-tokens 5 2>/dev/null | grep -q "^Hello, world"'
textgen() { HYBRID_GENERATE=$generate_bin "$py" $src/scripts/generate.py --checkpoint whole/checkpoints/step0000020 --tokenizer tok.json --new-tokens 5 --stop-id -1 "$@" 2>/dev/null; }
check "scripts/generate.py: a batch of prompts, each as it goes alone" '[ "$(textgen --prompt "Hello, world" --prompt "Hi")" = "$(textgen --prompt "Hello, world"; echo; textgen --prompt "Hi")" ]'

# 2. kill -9 at random moments, saves included (a checkpoint every step): each restart resumes
#    from the last complete checkpoint and the run still finishes with the uninterrupted result.
cp micro.yaml kill.yaml
sed -i 's/interval: 5, keep_last: 2/interval: 1, keep_last: 2/' kill.yaml
killed_runs kill.yaml killed 8
mkdir -p killed/checkpoints/step0000099.tmp && echo junk >killed/checkpoints/step0000099.tmp/model.safetensors
"$bin" --config kill.yaml --run-dir killed >killed_final.log 2>&1
check "runs killed 8 times still finish" '[ -f killed/checkpoints/step0000020/MANIFEST.json ]'
check "partial saves are removed" '[ ! -e killed/checkpoints/step0000099.tmp ]'
check "killed run ends with the uninterrupted weights" 'cmp -s whole/checkpoints/step0000020/model.safetensors killed/checkpoints/step0000020/model.safetensors'

# 3. A full disk during a save (file size limit): the save fails with a clear error, the
#    previous checkpoint stays LATEST and loads.
full_disk_run micro.yaml full; rc=$?
check "full disk: non-zero exit" '[ $rc -ne 0 ]'
check "full disk: says what happened" 'grep -q "checkpoint at step 10 not saved: .*File too large.*previous checkpoint .*step0000005 is intact" full.log'
check "full disk: no partial folder, LATEST unchanged" '[ "$(cat full/checkpoints/LATEST)" = step0000005 ] && ! ls full/checkpoints | grep -q tmp'
check "full disk: previous checkpoint still resumes" '"$bin" --config micro.yaml --run-dir full --stop-after 1 >/dev/null 2>&1'

# 3b. Asynchronous saves (checkpoint.async): the run pauses only to copy, a thread writes. The same
#    checkpoints as synchronous saves; kills during background saves leave the previous one; a
#    failed background save ends the run with its error at the next save.
sed 's/^checkpoint: {/checkpoint: {async: true, /' micro.yaml >async.yaml
"$bin" --config async.yaml --run-dir async >async.log 2>&1
same_saves() {  # the tensors and trainer state of every kept step, and the kept steps themselves
  [ "$(ls "$1/checkpoints")" = "$(ls "$2/checkpoints")" ] || return 1
  for s in 10 15 20; do
    for f in model.safetensors optim.safetensors trainer.json; do
      cmp -s "$1/checkpoints/step00000$s/$f" "$2/checkpoints/step00000$s/$f" || return 1
    done
  done
}
check "async: written in the background" 'grep -q "writing it in the background" async.log && grep -q "saved checkpoint step 20" async.log'
check "async: the same checkpoints as synchronous saves" 'same_saves whole async'
sed 's/^checkpoint: {/checkpoint: {async: true, /' kill.yaml >kill_async.yaml
killed_runs kill_async.yaml killed_async 4
"$bin" --config kill_async.yaml --run-dir killed_async >killed_async_final.log 2>&1
check "async: killed runs still finish with the uninterrupted weights" 'cmp -s whole/checkpoints/step0000020/model.safetensors killed_async/checkpoints/step0000020/model.safetensors'
full_disk_run async.yaml full_async; rc=$?
check "async full disk: non-zero exit" '[ $rc -ne 0 ]'
check "async full disk: says what happened" 'grep -q "checkpoint at step 10 not saved: .*File too large.*previous checkpoint .*step0000005 is intact" full_async.log'
check "async full disk: no partial folder, LATEST unchanged" '[ "$(cat full_async/checkpoints/LATEST)" = step0000005 ] && ! ls full_async/checkpoints | grep -q tmp'

# 3c. A stop signal (SIGTERM; SIGUSR1, as Slurm's --signal=USR1@SECONDS sends it) ends the run
#    after the step in progress with a checkpoint there and exit 0; the same command resumes, and
#    the run ends with the uninterrupted weights.
sed 's/max_steps: 20,/max_steps: 300,/; s/^checkpoint: {.*/checkpoint: {interval: 100, keep_last: 2}/' micro.yaml >long.yaml
"$bin" --config long.yaml --run-dir long_whole >long_whole.log 2>&1
for signal in USR1 TERM; do
  run=stopped_$signal
  "$bin" --config long.yaml --run-dir $run >$run.log 2>&1 &
  pid=$!
  wait_for_steps $run $pid
  kill -$signal $pid
  wait $pid; rc=$?
  step=$(grep -o "stopping after step [0-9]*" $run.log | grep -o "[0-9]*$")
  check "SIG$signal: exit 0, a checkpoint at the step it stopped after (${step:-none})" \
    '[ $rc -eq 0 ] && [ -n "$step" ] && [ "$(cat $run/checkpoints/LATEST)" = "$(printf step%07d "$step")" ]'
  "$bin" --config long.yaml --run-dir $run >>$run.log 2>&1
  check "... the same command finishes it with the uninterrupted weights" \
    'cmp -s long_whole/checkpoints/step0000300/model.safetensors $run/checkpoints/step0000300/model.safetensors'
done

# ... also during set-up (here its open of a task file, a FIFO, waits for a writer): set-up goes on,
#    the run takes one step and stops there with a checkpoint, exit 0.
mkfifo setup.fifo
"$bin" --config long.yaml --run-dir stopped_setup --set 'data.tasks=[{name: t, path: setup.fifo}]' >stopped_setup.log 2>&1 &
pid=$!
for i in $(seq 100); do [ "$(cat /proc/$pid/wchan 2>/dev/null)" = wait_for_partner ] && break; sleep 0.1; done
kill -USR1 $pid
sleep 0.2
cat data/phrases.jsonl >setup.fifo
wait $pid; rc=$?
check "SIGUSR1 during set-up: exit 0 after one step, with its checkpoint" \
  '[ $rc -eq 0 ] && grep -q "SIGUSR1: stopping after step 1 with a checkpoint" stopped_setup.log && [ "$(cat stopped_setup/checkpoints/LATEST)" = step0000001 ]'

# 3d. --time-limit: the run stops, with a checkpoint, before a step would end past the limit;
#    resumed, it ends with the uninterrupted weights.
SECONDS=0
"$bin" --config long.yaml --run-dir limited --time-limit 1.5s >limited.log 2>&1; rc=$?
took=$SECONDS
step=$(grep -o "time-limit 1.5 s: stopping after step [0-9]*" limited.log | grep -o "[0-9]*$")
check "--time-limit 1.5s: exit 0 after ${took}s, a checkpoint at step ${step:-none}" \
  '[ $rc -eq 0 ] && [ -n "$step" ] && [ "$step" -lt 300 ] && [ "$(cat limited/checkpoints/LATEST)" = "$(printf step%07d "$step")" ]'
"$bin" --config long.yaml --run-dir limited >>limited.log 2>&1
check "... the same command finishes it with the uninterrupted weights" \
  'cmp -s long_whole/checkpoints/step0000300/model.safetensors limited/checkpoints/step0000300/model.safetensors'

# 4. Corrupted, truncated and mismatched checkpoints are named.
cp -r whole corrupt
printf '\x01' | dd of=corrupt/checkpoints/step0000020/model.safetensors bs=1 seek=2000 conv=notrunc 2>/dev/null
"$bin" --config micro.yaml --run-dir corrupt --set trainer.max_steps=25 >corrupt.log 2>&1; rc=$?
check "corrupted file: error names it" '[ $rc -ne 0 ] && grep -q "step0000020/model.safetensors: checksum does not match the MANIFEST (corrupted)" corrupt.log'
"$eval_bin" --checkpoint corrupt/checkpoints/step0000020 --data data/valid.npy --batches 2 >corrupt_eval.log 2>&1; rc=$?
check "... and hybrid-eval names it too" '[ $rc -ne 0 ] && grep -q "step0000020/model.safetensors: checksum does not match the MANIFEST (corrupted)" corrupt_eval.log'
check "hybrid-eval --checkpoint RUN_FOLDER scores its latest checkpoint" \
  '[ "$("$eval_bin" --checkpoint whole --data data/valid.npy --batches 2)" = "$("$eval_bin" --checkpoint whole/checkpoints/step0000020 --data data/valid.npy --batches 2)" ]'
"$eval_bin" --checkpoint data --data data/valid.npy >nockpt_eval.log 2>&1; rc=$?
check "hybrid-eval --checkpoint: a folder without a model named" '[ $rc -ne 0 ] && grep -q "^error: data: neither a checkpoint, a run folder with one, nor a model folder" nockpt_eval.log'
cp -r whole missing && rm missing/checkpoints/step0000020/optim.safetensors
"$bin" --config micro.yaml --run-dir missing --set trainer.max_steps=25 >corrupt2.log 2>&1
check "missing file: error names it" 'grep -q "optim.safetensors: missing from the checkpoint" corrupt2.log'
"$bin" --config micro.yaml --run-dir whole --set trainer.max_steps=25 --set model.mlp_hidden=48 >arch.log 2>&1; rc=$?
check "architecture change: error names the key" '[ $rc -ne 0 ] && grep -q "architecture differs (checkpoint .mlp_hidden: 64., config .mlp_hidden: 48.)" arch.log'
"$bin" --config micro.yaml --run-dir branch --load whole/checkpoints/step0000010 --set trainer.max_steps=2 >branch.log 2>&1
check "--load branches from weights with a fresh schedule" 'grep -q "loaded weights from" branch.log && [ -f branch/checkpoints/step0000002/MANIFEST.json ]'
# ... also from a model folder: our checkpoint to HF and back with hybrid-convert, then --load.
convert_bin=$(dirname "$bin")/hybrid-convert
"$convert_bin" ours-to-hf whole/checkpoints/step0000020 as_hf >/dev/null 2>&1 && "$convert_bin" hf-to-ours as_hf as_ours >/dev/null 2>&1
"$bin" --config micro.yaml --run-dir branch2 --load as_ours --set trainer.max_steps=2 >branch2.log 2>&1
check "--load takes a hybrid-convert model folder" 'grep -q "loaded weights from as_ours/model.safetensors" branch2.log && [ -f branch2/FINISHED.json ]'
# hybrid-convert average (model souping): each weight the float64 mean of the inputs' rounded once,
# a model folder that --load takes; another architecture among the inputs is named, nothing written.
"$convert_bin" average whole/checkpoints/step0000015 whole/checkpoints/step0000020 muon_whole/checkpoints/step0000020 soup >soup.log 2>&1
check "hybrid-convert average: the float64 mean of three checkpoints' weights" '"$py" -c "
from safetensors.torch import load_file
ins = [load_file(d + \"/model.safetensors\") for d in (\"whole/checkpoints/step0000015\", \"whole/checkpoints/step0000020\", \"muon_whole/checkpoints/step0000020\")]
out = load_file(\"soup/model.safetensors\")
assert sorted(out) == sorted(ins[0]) and all(out[k].equal((sum(f[k].double() for f in ins) / 3).float()) for k in out)"'
"$bin" --config micro.yaml --run-dir souped --load soup --set trainer.max_steps=1 >souped.log 2>&1
check "... and --load takes it" 'grep -q "loaded weights from soup/model.safetensors" souped.log && [ -f souped/FINISHED.json ]'
"$bin" --config micro.yaml --run-dir other_arch --set model.mlp_hidden=48 --set trainer.max_steps=1 >/dev/null 2>&1
"$convert_bin" average whole/checkpoints/step0000020 other_arch/checkpoints/step0000001 bad_soup >bad_soup.log 2>&1; rc=$?
check "hybrid-convert average: another architecture named, nothing written" \
  '[ $rc -ne 0 ] && grep -q "^error: other_arch/checkpoints/step0000001: another architecture than whole/checkpoints/step0000020.s" bad_soup.log && [ ! -e bad_soup ]'
# --load-optimizer: AdamW's moments and step counts come too (an annealing run), the schedule and data anew.
"$bin" --config micro.yaml --run-dir anneal --load whole/checkpoints/step0000010 --load-optimizer --set trainer.max_steps=1 >anneal.log 2>&1
optim_steps() { "$py" -c "
import sys
from safetensors.numpy import load_file
print(sorted({int(v) for k, v in load_file(sys.argv[1]).items() if k.startswith('step.')}))" "$1/optim.safetensors"; }
check "--load-optimizer: AdamW's step counts go on from the checkpoint's (10 + 1; --load alone: 2 after 2)" 'grep -q "loaded weights and optimizer state from" anneal.log && [ "$(optim_steps anneal/checkpoints/step0000001)" = "[11]" ] && [ "$(optim_steps branch/checkpoints/step0000002)" = "[2]" ]'
"$bin" --config micro.yaml --run-dir anneal2 --load as_ours --load-optimizer >anneal2.log 2>&1; rc=$?
check "--load-optimizer on a model folder: one error line, nothing written" '[ $rc -ne 0 ] && grep -q "as_ours: --load-optimizer needs a checkpoint" anneal2.log && [ ! -e anneal2/checkpoints ]'

# 5. Bad data stops the run with file and offset, before anything is written.
"$bin" --config micro.yaml --run-dir baddata --set 'data.sources=[{paths: [data/bad.npy]}]' >bad.log 2>&1; rc=$?
check "bad token id: file and offset" '[ $rc -ne 0 ] && grep -q "bad.npy: token id 300 at token offset 1234 is outside the vocabulary \[0, 256)" bad.log'
check "bad token id: no checkpoint" '[ ! -e baddata/checkpoints ]'
# 5b. The instance filter (data.instance_filter): every tenth instance made a run of one token, 7 in
#    one copy of the data, 9 in another. With the filter the runs take no part in training (the
#    two copies train to the same bits); without it they do.
"$py" -c "
import numpy as np
t = np.load('data/train.npy')
for token, name in ((7, 'rep_a'), (9, 'rep_b')):
    u = t.copy()
    for i in range(0, u.size // 32, 10):
        u[32 * i:32 * i + 32] = token
    np.save(f'data/{name}.npy', u)
"
for copy in rep_a rep_b; do
  for on in true false; do
    "$bin" --config micro.yaml --run-dir ${copy}_$on --set "data.sources=[{paths: [data/$copy.npy]}]" --set 'data.validation=[]' \
      --set data.tasks=[] --set data.instance_filter="{enabled: $on, max_count: 16}" >${copy}_$on.log 2>&1
  done
done
check "instance filter: runs of one token left out of training (the two copies train alike)" \
  'cmp -s rep_a_true/checkpoints/step0000020/model.safetensors rep_b_true/checkpoints/step0000020/model.safetensors'
check "... without it they count (the copies train apart)" \
  '! cmp -s rep_a_false/checkpoints/step0000020/model.safetensors rep_b_false/checkpoints/step0000020/model.safetensors'
check "... metrics.jsonl and the log count them" '"$py" -c "
import json
n = sum(json.loads(l).get(\"filtered_instances\", 0) for l in open(\"rep_a_true/metrics.jsonl\"))
assert n > 0, n" && grep -q "instances filtered" rep_a_true.log'

# 6. A sweep: two patterns x two learning rates, run one after another, then a summary table;
#    a second invocation skips the finished runs; a stop signal ends it with the run in progress.
cat >sweep.yaml <<'YAML'
name: micro-sweep
grid:
  model.layer_pattern: [GA, G]
  optimizer.lr: [0.01, 0.003]
set:
  trainer.max_steps: 4
YAML
sweep_bin=$(dirname "$bin")/hybrid-sweep
"$sweep_bin" --config micro.yaml --sweep sweep.yaml --run-root sweep >sweep.log 2>&1; rc=$?
check "sweep runs all four" '[ $rc -eq 0 ] && [ "$(grep -c "| finished |" sweep/summary.md)" = 4 ] && [ "$(wc -l <sweep/summary.csv)" = 5 ]'
check "sweep summary: the task's scores" 'grep -q "| phrases acc / acc_norm |" sweep/summary.md && head -1 sweep/summary.csv | grep -q ",phrases_acc,phrases_acc_norm,status$"'
"$sweep_bin" --config micro.yaml --sweep sweep.yaml --run-root sweep >sweep2.log 2>&1
check "sweep skips finished runs" '[ "$(grep -c "finished already, skipped" sweep2.log)" = 4 ]'
"$sweep_bin" --config micro.yaml --sweep sweep.yaml --run-root sweep --slurm sweep.sbatch >/dev/null 2>&1
check "sweep writes a Slurm array script (SIGUSR1 before the time limit)" 'grep -q "#SBATCH --array=0-3" sweep.sbatch && grep -q "#SBATCH --signal=B:USR1@120" sweep.sbatch && bash -n sweep.sbatch'
# A stop signal to a sweep goes on to the run in progress, which stops with a checkpoint, and no
# later run starts.
sed 's/trainer.max_steps: 4/trainer.max_steps: 100000/' sweep.yaml >sweep_long.yaml
"$sweep_bin" --config micro.yaml --sweep sweep_long.yaml --run-root sweep_stop >sweep_stop.log 2>&1 &
pid=$!
until first=$(grep -o '^\[1/4\] [^ ]*' sweep_stop.log | cut -d' ' -f2) && [ -n "$first" ] || ! kill -0 $pid 2>/dev/null; do
  sleep 0.05
done
wait_for_steps "sweep_stop/$first" $pid
kill -TERM $pid
wait $pid; rc=$?
check "sweep: SIGTERM stops the run in progress with a checkpoint and starts no other" \
  '[ $rc -eq 0 ] && [ -f "sweep_stop/$first/checkpoints/LATEST" ] && grep -q "stopped during $first" sweep_stop.log && ! grep -q "^\[2/4\]" sweep_stop.log'
# 7. Data preparation (scripts/prepare_data.py) into shards hybrid-train reads, EOS from its
#    metadata.json, with intra-document masking on.
mkdir -p text
for i in $(seq 30); do printf 'Document %s. The quick brown fox jumps over the lazy dog %s times.\n' $i $i >"text/doc$i.txt"; done
printf '{"text": "a json line"}\n{"text": "another one"}\n' >text/more.jsonl
"$py" "$src/scripts/prepare_data.py" text --output prepared --tokenizer bpe:300 --valid-fraction 0.1 >prep.log 2>&1
check "prepare_data writes shards and metadata" '[ -f prepared/train-00000.npy ] && grep -q "\"eos_id\": 0" prepared/metadata.json && grep -q sha256 prepared/metadata.json'
"$bin" --config micro.yaml --run-dir prepared_run --set "data.sources=[{paths: [prepared/train-*.npy]}]" \
  --set data.validation.paths=[] --set data.seq_len=16 --set data.document_masking=true --set trainer.max_steps=3 \
  --set model.vocab_size=320 >prep_run.log 2>&1
check "training on prepared shards with document masking" '[ -f prepared_run/FINISHED.json ]'
"$py" "$src/scripts/prepare_data.py" text --output prepared_small --tokenizer prepared/tokenizer.json --valid-fraction 0.1 \
  --shard-tokens 100 >prep_small.log 2>&1
check "prepare_data --shard-tokens 100: several shards, together the same tokens" '"$py" -c "
import glob, numpy as np
small = sorted(glob.glob(\"prepared_small/train-*.npy\"))
assert len(small) > 2 and (np.concatenate([np.load(f) for f in small]) == np.load(\"prepared/train-00000.npy\")).all()"'
"$py" "$src/scripts/prepare_data.py" nothere --output x >missing.log 2>&1; rc=$?
check "prepare_data: a missing input is one clear error" '[ $rc -ne 0 ] && grep -q "error: nothere: no files match" missing.log'
# 8. --profile-steps: a trace of the steps after two of warm-up, with the model's ops and the
# blocks' named scopes in it; a run too short for it says so and writes none.
"$bin" --config micro.yaml --run-dir traced --stop-after 5 --profile-steps 2 >traced.log 2>&1
trace_has() {  # the trace's CPU ops include an aten op and these named scopes
  "$py" - "$@" <<'PY'
import json, sys
events = json.load(open("traced/trace_rank0.json"))["traceEvents"]
scopes = {e["name"] for e in events if e.get("cat") == "user_annotation"}
ops = any(e.get("cat") == "cpu_op" and e["name"].startswith("aten::") for e in events)
sys.exit(not (ops and set(sys.argv[1:]) <= scopes))
PY
}
check "--profile-steps writes a trace of steps 3-4" 'grep -q "trace of this run.s steps 3-4 in traced/trace_rank0.json" traced.log &&
  trace_has "block 0 (GDN)" "block 1 (attention)" "backward" "clipping and optimizer step"'
"$bin" --config micro.yaml --run-dir untraced --stop-after 2 --profile-steps 2 >untraced.log 2>&1
check "--profile-steps: a run of two steps writes no trace" 'grep -q "no trace, this run took 2 steps" untraced.log && [ ! -e untraced/trace_rank0.json ]'
exit $fail
