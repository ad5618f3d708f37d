#!/usr/bin/env bash
# On the GPU machine: the working tree (A) against the same tree with some files replaced (B), in
# one call, so that a kernel experiment is judged against its base on the same GPU and clocks:
# both built, B's GPU tests run, then the delta-rule op (no accuracy pass) and the layer
# comparison timed for A and B in alternation, two rounds each. B's files come as a folder laid
# over the tree (no patch tool needed there); made here, e.g. for a branch's own changes:
#   mkdir -p .ab && git archive wip/raw-bf16-keys $(git diff --name-only main...wip/raw-bf16-keys) | tar -x -C .ab
#   (.ab untracked and not ignored, so it travels with the working tree), then there:
#   scripts/gpu/ab_bench.sh .ab
# Results in $OUT: a/build.log, b/build.log, test_b.log, ab.md (every round's lines).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
[ $# -eq 1 ] && [ -d "$1" ] || { echo "usage: $0 FOLDER_OF_B_FILES" >&2; exit 2; }
overlay=$(realpath "$1")
mkdir -p "$OUT/a" "$OUT/b"
OUT=$(realpath "$OUT")
B=/tmp/ab_b
rm -rf "$B" && mkdir -p "$B"
tar --exclude=./.git --exclude=./build-gpu --exclude=./build --exclude=./gpu-out --exclude="./$(basename "$overlay")" -cf - . |
  tar -xf - -C "$B"
cp -r "$overlay"/. "$B"/
echo "B: $(cd "$overlay" && find . -type f | wc -l) files replaced"

targets="test_ops hybrid-bench-delta-rule hybrid-bench-layers"
HYBRID_TARGETS="$targets" OUT="$OUT/a" scripts/gpu/build.sh || exit 1
HYBRID_TARGETS="$targets" OUT="$OUT/b" "$B/scripts/gpu/build.sh" || exit 1
"$B/build-gpu/tests/test_ops" --gtest_filter='DeltaRule*:Shapes/*:ChunkLayout*:ModelCuda*' >"$OUT/test_b.log" 2>&1
echo "B's GPU tests: $(grep -E "^\[ +(PASSED|FAILED) " "$OUT/test_b.log" | tr '\n' ' ')"

for round in 1 2; do
  for side in a b; do
    root=$([ "$side" = a ] && echo . || echo "$B")
    "$root/build-gpu/hybrid-bench-delta-rule" --no-accuracy --json "/tmp/ab_op_$side$round.json" 2>&1 |
      grep "fwd+bwd" | sed "s/^/$side$round op: /"
    "$root/build-gpu/hybrid-bench-layers" --json "/tmp/ab_layers_$side$round.json" 2>&1 |
      grep -E "^\| (GDN|attention) |ratio" | sed "s/^/$side$round layers: /"
  done
done | tee "$OUT/ab.md"
