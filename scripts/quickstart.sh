#!/usr/bin/env bash
# The main job: set-up, build, the embedded corpus, then configs/tiny.yaml trained from scratch
# (on the GPU if there is one, else on the CPU: a few minutes on 2 cores), and its loss plot.
# Extra arguments go to hybrid-train (e.g. --set trainer.max_steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=$(HYBRID_TARGETS=hybrid-train scripts/build.sh)
VENV=$(scripts/setup.sh)
scripts/prepare_corpus.sh
RUN=${RUN_DIR:-runs/tiny}
"$BUILD/hybrid-train" --config configs/tiny.yaml --run-dir "$RUN" "$@"
"$VENV/bin/python" scripts/plot_metrics.py "$RUN" --output "$RUN/loss.png"
