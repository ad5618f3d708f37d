#!/usr/bin/env python3
"""scripts/wandb_log.py: what it sends, first through a stand-in wandb module that records its calls
(every line at its step under train/ or eval/, the config, one run id across invocations, a line cut
mid-write held back, the steps a resumed training writes again not sent twice, --follow reading
what is new and what a resume rewrote, ending at FINISHED.json), then through the real wandb in offline mode (its API as installed takes the calls)."""
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "wandb_log.py")

STAND_IN = '''
import json, os
def _record(entry):
    with open(os.environ["WANDB_CALLS"], "a") as f:
        f.write(json.dumps(entry) + "\\n")
class _Run:
    def log(self, values, step):
        _record({"call": "log", "step": step, "values": values})
    def finish(self):
        _record({"call": "finish"})
def init(**kwargs):
    _record({"call": "init", **{k: v for k, v in kwargs.items() if k != "dir"}})
    return _Run()
'''


def step(s, **extra):
    return {"step": s, "loss": 5.0 - 0.1 * s, "z_loss": 1e-4, "grad_norm": 1.0, "grad_norms": {"gdn": 0.5, "mlp": 0.25},
            "lr": 1e-3, "tokens": 100 * s, "tokens_per_s": 1000.0, "skipped": False, **extra}


def evaluation(s):
    return {"step": s, "tokens": 100 * s, "val_loss": 4.0, "val_losses": {"a": 4.0, "b": 4.5},
            "tasks": {"t": {"items": 10, "acc": 0.5, "chance": 0.25}}}


def write(run, rows, tail=""):
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(tail)


def calls(path):
    with open(path) as f:
        out = [json.loads(line) for line in f]
    os.remove(path)
    return out


with tempfile.TemporaryDirectory() as tmp:
    stand_in = os.path.join(tmp, "stand_in")
    os.makedirs(stand_in)
    with open(os.path.join(stand_in, "wandb.py"), "w") as f:
        f.write(STAND_IN)
    record = os.path.join(tmp, "calls.jsonl")
    env = dict(os.environ, PYTHONPATH=stand_in, WANDB_CALLS=record)
    run = os.path.join(tmp, "run")
    os.makedirs(run)
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write("name: r\noptimizer:\n  lr: 0.001\n")

    def send(*flags):
        return subprocess.run([sys.executable, SCRIPT, run, "--project", "p", *flags], env=env, check=True,
                              capture_output=True, text=True).stdout

    # Steps 1-4 with evaluations at 2 and 4, and a line cut mid-write.
    write(run, [step(1), step(2), evaluation(2), step(3, filtered_instances=2), step(4), evaluation(4)], tail='{"step": 5, "lo')
    out = send()
    first = calls(record)
    init = first[0]
    assert init["call"] == "init" and init["project"] == "p" and init["resume"] == "allow" and init["name"] == "run", init
    assert init["config"] == {"name": "r", "optimizer": {"lr": 0.001}}, init["config"]
    logs = [c for c in first if c["call"] == "log"]
    assert [c["step"] for c in logs] == [1, 2, 2, 3, 4, 4], logs
    assert logs[0]["values"]["train/loss"] == 4.9 and logs[0]["values"]["train/grad_norms/gdn"] == 0.5, logs[0]
    assert logs[0]["values"]["train/skipped"] == 0 and "train/step" not in logs[0]["values"], logs[0]
    assert logs[2]["values"] == {"eval/tokens": 200, "eval/val_loss": 4.0, "eval/val_losses/a": 4.0, "eval/val_losses/b": 4.5,
                                 "eval/tasks/t/items": 10, "eval/tasks/t/acc": 0.5, "eval/tasks/t/chance": 0.25}, logs[2]
    assert logs[3]["values"]["train/filtered_instances"] == 2
    assert first[-1]["call"] == "finish" and "6 rows sent" in out, out

    # The training resumed from a checkpoint at step 2: metrics.jsonl cut back to it, steps 3-6
    # written again. Only what is new goes, to the same W&B run.
    write(run, [step(1), step(2), evaluation(2), step(3), step(4), evaluation(4), step(5), step(6), evaluation(6)])
    send()
    second = calls(record)
    assert second[0]["id"] == init["id"], (second[0], init)
    assert [(c["step"], sorted(c["values"])[0].split("/")[0]) for c in second if c["call"] == "log"] == \
        [(5, "train"), (6, "train"), (6, "eval")], second

    # --follow: sends what appears until FINISHED.json does.
    follower = subprocess.Popen([sys.executable, SCRIPT, run, "--follow", "--interval", "0.2"], env=env,
                                stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert follower.poll() is None, "--follow ended before FINISHED.json"
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(step(7)) + "\n")
    time.sleep(1.0)
    # The training resumes from step 6 meanwhile: metrics.jsonl replaced (a new file) by its lines
    # to step 6, then steps 7 and 8 again. Only step 8 is new.
    resumed = os.path.join(run, "metrics.jsonl.new")
    with open(resumed, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in [step(s) for s in range(1, 9)])
    os.replace(resumed, os.path.join(run, "metrics.jsonl"))
    time.sleep(1.0)
    with open(os.path.join(run, "FINISHED.json"), "w") as f:
        f.write("{}\n")
    assert follower.wait(timeout=30) == 0
    assert [c["step"] for c in calls(record) if c["call"] == "log"] == [7, 8]

    # The real wandb, offline: the calls as made above go through its API.
    real = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    os.remove(os.path.join(run, "wandb.json"))
    done = subprocess.run([sys.executable, SCRIPT, run], env=real, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(os.path.join(run, "wandb.json")) as f:
        run_id = json.load(f)["id"]
    assert "8 rows sent" in done.stdout, done.stdout
    assert glob.glob(os.path.join(run, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb")), os.listdir(run)
print("ok")
