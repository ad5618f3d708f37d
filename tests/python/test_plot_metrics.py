#!/usr/bin/env python3
"""scripts/plot_metrics.py on a made-up run: training_hours counts each step's time from its tokens
and tokens/s (not the time between a run's invocations), and both axes write a PNG, validation
points (one set, or several by name), task scores (an evaluation line without a validation loss
too) and gradient norms by weight kind included."""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "plot_metrics.py")
spec = importlib.util.spec_from_file_location("plot_metrics", SCRIPT)
plot_metrics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_metrics)

# 1,000 tokens a step: 10 steps at 1,000 tokens/s (1 s each), then a resumed invocation's 10 at
# 500 tokens/s (2 s each): 30 s of training, however long the run waited in between.
steps = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3, "tokens": 1000 * s, "tokens_per_s": 1000.0 if s <= 10 else 500.0,
          "grad_norms": {"gdn": 1.0 / s, "mlp": 0.5}} for s in range(1, 21)]
hours = plot_metrics.training_hours(steps)
assert abs(hours[10] * 3600 - 10) < 1e-9, hours[10] * 3600
assert abs(hours[20] * 3600 - 30) < 1e-9, hours[20] * 3600

with tempfile.TemporaryDirectory() as tmp:
    run = os.path.join(tmp, "run")
    os.makedirs(run)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        for r in steps:
            f.write(json.dumps(r) + "\n")
        scores = {"items": 4, "acc": 0.5, "acc_norm": 0.25, "acc_per_token": 0.5, "bpb": 1.5, "chance": 0.25}
        f.write(json.dumps({"step": 10, "tokens": 10000, "tasks": {"t": scores}}) + "\n")
        f.write(json.dumps({"step": 20, "tokens": 20000, "val_loss": 3.2, "val_perplexity": 24.5, "tasks": {"t": scores}}) + "\n")
    several = os.path.join(tmp, "several")
    os.makedirs(several)
    with open(os.path.join(several, "metrics.jsonl"), "w") as f:
        for r in steps:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps({"step": 20, "tokens": 20000, "val_loss": 3.2, "val_losses": {"a": 3.2, "b": 3.5}}) + "\n")
    assert len(plot_metrics.read_run(run)[1]) == 2
    for axis in ("tokens", "hours"):
        out = os.path.join(tmp, f"{axis}.png")
        subprocess.run([sys.executable, SCRIPT, run, "--output", out, "--x", axis], check=True, capture_output=True)
        assert os.path.getsize(out) > 1000, axis
    out = os.path.join(tmp, "several.png")
    subprocess.run([sys.executable, SCRIPT, run, several, "--output", out], check=True, capture_output=True)
    assert os.path.getsize(out) > 1000
    out = os.path.join(tmp, "bpb.png")
    subprocess.run([sys.executable, SCRIPT, run, "--output", out, "--task-metric", "bpb"], check=True, capture_output=True)
    assert os.path.getsize(out) > 1000
print("ok: training hours from tokens/s; both axes and the task panel plotted")
