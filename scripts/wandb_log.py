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


def read_rows(run_dir):
    """The complete lines of metrics.jsonl as history rows (a line cut mid-write is left for the next pass)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [history_row(line) for line in f if line.endswith("\n") and line.strip()]


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
    while True:
        for step, kind, values in read_rows(args.run_dir):
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
