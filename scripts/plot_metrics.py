#!/usr/bin/env python3
"""Plot training curves from one or more run folders (their metrics.jsonl) into a PNG.

usage: plot_metrics.py RUN_DIR [RUN_DIR ...] [--output loss.png] [--smooth 20] [--x tokens|hours]
                      [--task-metric acc|acc_norm|acc_per_token|bpb]
Panels: training loss (raw and smoothed) and each validation set's loss against tokens (or training hours),
the multiple-choice tasks' scores when the runs have any (data.tasks), the gradient norm by weight
kind (embedding, gdn, attention, mlp, norms, lm_head), throughput, and learning rate. Runs are labelled by folder name, so sweeps compare on one figure.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_run(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    steps, evals = [], []
    try:
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                (evals if "val_loss" in row or "tasks" in row else steps).append(row)
    except OSError as e:
        sys.exit(f"error: {path}: {e.strerror}")
    if not steps:
        sys.exit(f"error: {path}: no training steps logged")
    return steps, evals


def training_hours(steps):
    """Hours of training up to each logged step (by step number): each step's time from its
    tokens and tokens/s, so time between a run's invocations (a kill, a queue) is not counted."""
    hours, total, tokens = {}, 0.0, 0
    for r in steps:
        if r["tokens_per_s"] > 0:
            total += (r["tokens"] - tokens) / r["tokens_per_s"] / 3600
        tokens = r["tokens"]
        hours[r["step"]] = total
    return hours


def smooth(values, window):
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--output", default=None, help="PNG path (default: <first run>/loss.png)")
    ap.add_argument("--smooth", type=int, default=20)
    ap.add_argument("--x", choices=["tokens", "hours"], default="tokens",
                    help="the loss and task panels' axis: tokens, or hours of training (training_hours)")
    ap.add_argument("--task-metric", choices=["acc", "acc_norm", "acc_per_token", "bpb"], default="acc",
                    help="what the task panel shows (acc_norm: per byte of the choice, lm-eval's)")
    args = ap.parse_args()

    runs = [(run, *read_run(run)) for run in args.runs]
    with_tasks = any("tasks" in e for _, _, evals in runs for e in evals)
    with_norms = any("grad_norms" in r for _, steps, _ in runs for r in steps)
    panels = ["loss"] + ["tasks"] * with_tasks + ["norms"] * with_norms + ["speed", "lr"]
    rows = (len(panels) + 2) // 3
    fig, grid = plt.subplots(rows, 3, figsize=(16, 4.5 * rows), squeeze=False)
    for ax in grid.flat[len(panels):]:
        ax.remove()
    axes = dict(zip(panels, grid.flat))
    loss_ax, task_ax, norm_ax, speed_ax, lr_ax = (axes.get(p) for p in ("loss", "tasks", "norms", "speed", "lr"))
    for run, steps, evals in runs:
        name = os.path.basename(os.path.normpath(run))
        hours = training_hours(steps)
        x = (lambda r: hours.get(r["step"], float("nan"))) if args.x == "hours" else (lambda r: r["tokens"] / 1e6)
        kept = [r for r in steps if not r.get("skipped")]
        loss = [r["loss"] for r in kept]
        line, = loss_ax.plot([x(r) for r in kept], smooth(loss, args.smooth), label=f"{name} train")
        loss_ax.plot([x(r) for r in kept], loss, color=line.get_color(), alpha=0.2, linewidth=0.8)
        # Several validation sets come by name in val_losses; one alone as val_loss.
        sets = sorted({s for e in evals for s in e.get("val_losses", {})}) or ["validation"]
        for vset, style in zip(sets, ["o--", "s:", "^-.", "v--", "D:", "P-."] * 10):
            points = [(x(e), e["val_losses"][vset] if "val_losses" in e else e["val_loss"]) for e in evals
                      if vset in e.get("val_losses", {}) or ("val_losses" not in e and "val_loss" in e)]
            if points:
                loss_ax.plot(*zip(*points), style, color=line.get_color(),
                             label=f"{name} {vset}" if vset == "validation" else f"{name} validation {vset}")
        tasks = sorted({t for e in evals for t in e.get("tasks", {})})
        for task, style in zip(tasks, ["o-", "s--", "^-.", "v:", "D-", "P--"] * 10):
            scored = [e for e in evals if task in e.get("tasks", {})]
            task_ax.plot([x(e) for e in scored], [e["tasks"][task][args.task_metric] for e in scored], style,
                         color=line.get_color(), label=f"{name} {task}")
            if args.task_metric.startswith("acc") and "chance" in scored[-1]["tasks"][task]:
                task_ax.axhline(scored[-1]["tasks"][task]["chance"], color="gray", linestyle=":", linewidth=0.8)
        kinds = sorted({k for r in steps for k in r.get("grad_norms", {})})
        for k, (kind, style) in enumerate(zip(kinds, ["-", "--", "-.", ":", (0, (1, 3)), (0, (5, 1))])):
            normed = [r for r in steps if kind in r.get("grad_norms", {})]
            # One run: a colour a kind; several: the run's colour, a line style a kind.
            norm_ax.plot([r["step"] for r in normed], smooth([r["grad_norms"][kind] for r in normed], args.smooth),
                         linestyle="-" if len(runs) == 1 else style, color=f"C{k}" if len(runs) == 1 else line.get_color(),
                         label=kind if len(runs) == 1 else f"{name} {kind}")
        speed_ax.plot([r["step"] for r in steps], smooth([r["tokens_per_s"] for r in steps], args.smooth),
                      color=line.get_color(), label=name)
        lr_ax.plot([r["step"] for r in steps], [r["lr"] for r in steps], color=line.get_color(), label=name)
    x_label = "tokens (M)" if args.x == "tokens" else "hours of training"
    loss_ax.set(xlabel=x_label, ylabel="loss", title="loss")
    if task_ax is not None:
        task_ax.set(xlabel=x_label, ylabel=args.task_metric, title=f"tasks ({args.task_metric})")
    if norm_ax is not None:
        norm_ax.set(xlabel="step", ylabel="gradient norm", yscale="log", title="gradient norm by weight kind (smoothed)")
    speed_ax.set(xlabel="step", ylabel="tokens/s", title="throughput (smoothed)")
    lr_ax.set(xlabel="step", ylabel="learning rate", title="schedule")
    for ax in axes.values():
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = args.output or os.path.join(args.runs[0], "loss.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
