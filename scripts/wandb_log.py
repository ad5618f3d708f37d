#!/usr/bin/env python3
"""Sends a run folder's metrics to Weights & Biases.

Every line of RUN_DIR/metrics.jsonl goes to W&B at its step: a training step's numbers under
train/ (loss, z_loss, grad_norm and grad_norms/<kind>, lr, tokens, tokens_per_s, mfu,
peak_mem_gb, filtered_instances, skipped), an evaluation's under eval/ (val_loss, val_losses/<set>,
tasks/<task>/<score>); RUN_DIR/config.yaml, the resolved config, is the run's W&B config. Run it
beside the training (--follow: until FINISHED.json appears and every line is sent) or afterwards.
Run again, it goes on where it stopped: the W&B run id and the last step sent are kept in
RUN_DIR/wandb.json, so a resumed training's new lines join the same W&B run (the steps a resumed
run trains again after its checkpoint are not sent twice).

  scripts/wandb_log.py runs/7b --project hybrid --follow &   # beside hybrid-train
  WANDB_MODE=offline scripts/wandb_log.py runs/7b             # no network: `wandb sync` later
"""
import argparse
import json
import os
import secrets
import sys
import time


def flatten(prefix, value, out):
    """Numbers of a nested dict under '/'-joined keys; booleans as 0/1, strings left out."""
    if isinstance(value, dict):
        for key, inner in value.items():
            flatten(f"{prefix}/{key}", inner, out)
    elif isinstance(value, bool):
        out[prefix] = int(value)
    elif isinstance(value, (int, float)):
        out[prefix] = value
    return out


def history_row(line):
    """(step, kind, values) of one metrics.jsonl line: kind 'train' for a step, 'eval' for an evaluation."""
    record = json.loads(line)
    step = record.pop("step")
    kind = "train" if "loss" in record else "eval"
    return step, kind, flatten(kind, record, {})


class MetricsReader:
    """The complete lines metrics.jsonl has gained since the last call, as history rows (a line cut
    mid-write waits for the next call). From the start again when the file was rewritten (a resumed
    training cuts it back to its checkpoint's step: a new file, or a shorter one)."""

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.inode, self.offset = None, 0

    def new_rows(self):
        if not os.path.exists(self.path):
            return []
        stat = os.stat(self.path)
        if stat.st_ino != self.inode or stat.st_size < self.offset:
            self.inode, self.offset = stat.st_ino, 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [history_row(line) for line in complete.decode().splitlines() if line.strip()]


def read_config(run_dir):
    import yaml  # a dependency of wandb's

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}


def load_state(run_dir):
    path = os.path.join(run_dir, "wandb.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_state(run_dir, state):
    path = os.path.join(run_dir, "wandb.json")
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--project", default="hybrid-train")
    parser.add_argument("--entity", default=None)
    parser.add_argument("--name", default=None, help="the W&B run's name (default: the run folder's)")
    parser.add_argument("--follow", action="store_true", help="keep sending new lines until FINISHED.json appears")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between passes with --follow")
    args = parser.parse_args()
    if not os.path.isdir(args.run_dir):
        sys.exit(f"error: {args.run_dir}: no such run folder")
    try:
        import wandb
    except ImportError:
        sys.exit("error: the wandb package is missing (scripts/setup.sh's virtualenv has it)")

    state = load_state(args.run_dir) or {"id": secrets.token_hex(6), "last_step": 0, "kinds_at_last_step": []}
    run = wandb.init(project=args.project, entity=args.entity, id=state["id"], resume="allow",
                     name=args.name or os.path.basename(os.path.abspath(args.run_dir)), config=read_config(args.run_dir),
                     dir=args.run_dir)
    sent = 0
    reader = MetricsReader(args.run_dir)
    while True:
        for step, kind, values in reader.new_rows():
            if step < state["last_step"] or (step == state["last_step"] and kind in state["kinds_at_last_step"]):
                continue
            if step > state["last_step"]:
                state["last_step"], state["kinds_at_last_step"] = step, []
            run.log(values, step=step)
            state["kinds_at_last_step"].append(kind)
            sent += 1
        save_state(args.run_dir, state)
        finished = os.path.exists(os.path.join(args.run_dir, "FINISHED.json"))
        if not args.follow or finished:
            break
        time.sleep(args.interval)
    run.finish()
    print(f"{args.run_dir}: {sent} rows sent to W&B run {state['id']} (last step {state['last_step']})")


if __name__ == "__main__":
    main()
