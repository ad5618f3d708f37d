#!/usr/bin/env bash
# On the GPU machine: 1b.yaml training steps (bench_1b.sh) of the working tree (A) against the same
# tree with one overlay folder laid over it (B: e.g. `scripts/gpu/pending_overlays.sh
# docs/pending/NAME.patch` here, whose folder travels untracked), in one call, for
# changes to the trainer, the optimizer or the loss that ab_bench.sh's op and layer timings do not
# see. Both sides' hybrid-train are built and kept aside, both sides' tests (TESTS, a gtest filter
# over test_ops, default AdamW*) run before any timing (B's failure stops the call; A's is
# reported), then the unprofiled runs alternate A, B, A, B (ROUNDS pairs, default 2) so that drift between them shows as spread,
# and with PROFILE_STEPS=N one traced run a side follows (GPU time by kernel, idle gaps:
# bench_1b.sh). SANITIZE=1 also runs B's tests under compute-sanitizer memcheck. RUNS holds
# bench_1b.sh's arguments (default GGGA:false). Logs under $OUT/<side><round>/; ab_train.md last.
# The tree's files are A's again at the end (build-gpu holds B's build).
set -uo pipefail
{ # read whole before running: the overlay may replace this file
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
[ $# -eq 1 ] && [ -d "$1" ] || { echo "usage: $0 OVERLAY_FOLDER" >&2; exit 2; }
overlay=${1%/}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
BIN=/tmp/ab_train
rm -rf "$BIN" && mkdir -p "$BIN/a" "$BIN/b" "$BIN/a_files"
read -r -a runs <<<"${RUNS:-GGGA:false}"
targets="hybrid-train test_ops"
# The TESTS filter on build-gpu's test_ops as side $1: the log, a summary line, gtest's status.
run_tests() {
  build-gpu/tests/test_ops --gtest_filter="${TESTS:-AdamW*}" >"$OUT/test_$1.log" 2>&1
  local rc=$?
  echo "$1's tests: $(grep -E "^\[ +(PASSED|FAILED) " "$OUT/test_$1.log" | tr '\n' ' ')"
  return $rc
}

HYBRID_TARGETS=$targets OUT="$OUT/a" scripts/gpu/build.sh || exit 1
cp build-gpu/hybrid-train "$BIN/a/"
run_tests a  # reported; only B's failure stops the call
# A's versions of the files the overlay replaces, to put back; the ones it adds, to remove.
added=()
while IFS= read -r file; do
  if [ -e "$file" ]; then mkdir -p "$BIN/a_files/$(dirname "$file")" && cp -p "$file" "$BIN/a_files/$file"
  else added+=("$file"); fi
done < <(cd "$overlay" && find . -type f | sed 's|^\./||')
cp -r "$overlay/." .
HYBRID_TARGETS=$targets OUT="$OUT/b" scripts/gpu/build.sh
built=$?
[ $built -ne 0 ] || cp build-gpu/hybrid-train "$BIN/b/"
tests_rc=0
if [ $built -eq 0 ]; then
  run_tests b
  tests_rc=$?
  if [ -n "${SANITIZE:-}" ]; then
    compute-sanitizer --tool memcheck --error-exitcode 3 build-gpu/tests/test_ops --gtest_filter="${TESTS:-AdamW*}" \
      >"$OUT/memcheck_b.log" 2>&1
    echo "b's memcheck: exit $? ($(grep "ERROR SUMMARY" "$OUT/memcheck_b.log" | head -1))"
  fi
fi
cp -rp "$BIN/a_files/." .
for file in "${added[@]}"; do rm -f "$file"; done
[ $built -eq 0 ] || { echo "b did not build: $OUT/b/build.log"; exit 1; }
[ $tests_rc -eq 0 ] || { echo "b's tests failed: $OUT/test_b.log; no timing"; exit 1; }

for round in $(seq 1 "${ROUNDS:-2}"); do
  for side in a b; do
    PROFILE_STEPS= HYBRID_TRAIN="$BIN/$side/hybrid-train" OUT="$OUT/$side$round" scripts/gpu/bench_1b.sh "${runs[@]}" |
      sed "s/^/$side$round /" | tee -a "$OUT/ab_train.md"
  done
done
if [ -n "${PROFILE_STEPS:-}" ]; then
  for side in a b; do
    HYBRID_TRAIN="$BIN/$side/hybrid-train" OUT="$OUT/${side}_profiled" scripts/gpu/bench_1b.sh "${runs[@]}" |
      sed "s/^/${side} traced: /" | tee -a "$OUT/ab_train.md"
    for gaps in "$OUT/${side}_profiled"/profile_gaps_1b_*.md; do
      echo "$side $(basename "$gaps"): $(head -1 "$gaps")" | tee -a "$OUT/ab_train.md"
    done
  done
fi
echo "--- ab_train.md"
cat "$OUT/ab_train.md"
exit 0
}
