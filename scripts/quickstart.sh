#!/usr/bin/env bash
# The main job: set-up, build, then configs/tiny.yaml as far as the trainer goes today.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=$(scripts/build.sh)
"$BUILD/hybrid-train" --config configs/tiny.yaml --dry-run "$@"
