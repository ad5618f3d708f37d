#!/usr/bin/env bash
# On the GPU machine: the working tree (A) against the same tree with the files of one or more
# folders laid over it (B, C, ...), in one call, so that kernel experiments are judged against
# their base on the same GPU and clocks. One build directory serves all sides: A is built, then
# each overlay is laid over a copy of A's tree and build directory and rebuilt incrementally (only
# what it changes, where a second tree took 80 s from scratch), all overlays at once where mount
# namespaces allow (side_by_side below; SEQUENTIAL_BUILDS=1 or without them: in turn, in this
# tree), every side's executables copied aside. Each
# side's GPU tests run (A's too; each side's in the background from its build on, beside the other
# sides' builds and tests), then the delta-rule op (no accuracy pass) and the layer comparison are
# timed for every side in turn, two rounds (ROUNDS=n: n, e.g. where a shape's times are bimodal).
# Overlays are made here, e.g. for a branch's changes:
#   mkdir -p .ab && git archive wip/x $(git diff --name-only main...wip/x) | tar -x -C .ab
#   (untracked and not ignored, so they travel with the working tree), then there:
#   scripts/gpu/ab_bench.sh .ab [.ab2 ...]
# An overlay replaces or adds files; it cannot delete one. The tree is A's again at the end (its
# build directory is brought back to A by the next scripts/gpu/build.sh); to profile an overlay
# afterwards: cp -r .ab/. . && scripts/gpu/build.sh (incremental).
# Results in $OUT: <side>/build.log, test_<side>.log, ab.md (every round's lines; side b is the
# first overlay, c the second, ...), ab_summary.md (each side's means over the rounds, printed
# last). For timing-only probes (overlays that break results on purpose): NO_TESTS=1 skips the
# GPU tests, OP_ONLY=1 the layer comparison. SANITIZE=1 also runs every overlay's delta-rule,
# norm, conv and RoPE tests on small shapes (and wy_backward's, whose copies are the state pass's,
# the prep kernel's split outputs, SplitT, the wide value tiles, the only tiles whose forward
# pass takes bulk copies, and OneBlockAnSM) under compute-sanitizer memcheck and racecheck, at the
# end, all at once.
# TESTS_LAST_ONLY=1 tests only A and the last overlay (for cumulative overlays, where the last
# holds all the others). A side whose tests run past TEST_TIMEOUT seconds (default 240, about five
# times their 46 s beside the other sides' builds: a kernel that hangs, e.g. on a barrier's phase or
# a counter never filled, cost 900 s of a session's 1,800 at the old default) is left out of the
# timing, and the call goes on; a timed
# run past BENCH_TIMEOUT seconds (default 300) is stopped and named at the end.
# ACCURACY=1 ends with each side's errors against float64 (ab_errors.md), for overlays that
# trade precision for time. PROFILE=1 also records each side's GPU time by kernel (one profiled
# run a side, after the timing) and prints them side by side, largest differences first
# (ab_profile.md; ab_profile_2.md, ... for the other shapes; without OP_ONLY also the layer's
# mixer and both blocks, ab_profile_layers_*.md): which kernels a change moved; and each side's
# kernels in start order with their streams and what ran at once (ab_timeline_<side>*.md).
# LAYERS_ARGS goes to every hybrid-bench-layers call (e.g.
# "--documents 8" for document masking), OP_ARGS to every hybrid-bench-delta-rule call (e.g.
# "--shape 1,8192,30,96,192 --shape 4,4096,16,96,192" for shapes of one's own).
set -uo pipefail
{ # bash reads the whole block before running it: an overlay laid over this tree may replace this file
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
[ $# -ge 1 ] || { echo "usage: $0 OVERLAY_FOLDER [OVERLAY_FOLDER ...]" >&2; exit 2; }
for overlay in "$@"; do [ -d "$overlay" ] || { echo "$0: no folder $overlay" >&2; exit 2; }; done
[ $# -le 6 ] || { echo "$0: at most six overlays" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
BIN=/tmp/ab_bin
names=(b c d e f g)
rm -rf "$BIN"
executables="build-gpu/tests/test_ops build-gpu/hybrid-bench-delta-rule build-gpu/hybrid-bench-layers"

# Builds the tree as it stands (log in $OUT/$1/build.log) and copies the executables aside.
build_side() {
  HYBRID_TARGETS="test_ops hybrid-bench-delta-rule hybrid-bench-layers" OUT="$OUT/$1" scripts/gpu/build.sh &&
    mkdir -p "$BIN/$1" && cp $executables "$BIN/$1/"
}

last_side=${names[$(($# - 1))]}
gpu_tests() {
  [ -z "${NO_TESTS:-}" ] || return 0
  [ -z "${TESTS_LAST_ONLY:-}" ] || [ "$1" = a ] || [ "$1" = "$last_side" ] || return 0
  timeout "${TEST_TIMEOUT:-240}" "$BIN/$1/test_ops" --gtest_filter='DeltaRule*:Shapes/*:ChunkLayout*:CausalConv*:GatedRMSNorm*:RMSNorm*:AddRMSNorm*:AddNormed*:ModelCuda*:SwiGLU*:Rope*:ColumnWindow*:WeightCasts*:AdamWCuda*:LmLossCuda*:ChoiceScoresCuda*' >"$OUT/test_$1.log" 2>&1
  [ $? -ne 124 ] || { echo "$1's GPU tests: still running after ${TEST_TIMEOUT:-240} s (a kernel that hangs?): $1 left out"; return 124; }
  echo "$1's GPU tests: $(grep -E "^\[ +(PASSED|FAILED) " "$OUT/test_$1.log" | tr '\n' ' ')"
}

# One side's tests on small shapes under compute-sanitizer's `tool` (memcheck or racecheck);
# SANITIZE_FILTER (a gtest filter) narrows them to the tests of the kernels an overlay changes
# (racecheck of them all took 512 s for one overlay, twenty-fifth session).
source scripts/gpu/sanitizer_tests.sh
sanitize() {
  run_sanitizer "$2" "$BIN/$1/test_ops" "${SANITIZE_FILTER:-}" "$OUT/sanitizer_$1_$2.log" "$1 "
}

# Whether builds can run side by side: each overlay's tree is a copy of A's (its build directory
# too) bind-mounted over this folder in a mount namespace of its own, so that every build sees
# the paths A's build directory was configured with and compiles only what its overlay changes,
# all at once (one after the other the builds were over half of a call's time). Needs root's
# mount namespaces; without them the overlays are built in turn in this tree.
side_by_side() {
  [ -z "${SEQUENTIAL_BUILDS:-}" ] || return 1
  local probe=/tmp/ab_probe
  mkdir -p "$probe/a" "$probe/b" && touch "$probe/b/seen"
  unshare -m bash -c "mount --bind '$probe/b' '$probe/a' && [ -e '$probe/a/seen' ]" 2>/dev/null
}

# Each side's GPU tests run in the background as soon as it is built (their times are not measured,
# and one after the other they held the call for about a minute a side): A's beside the overlays'
# builds, each overlay's beside the others'. start_tests SIDE; then finish_tests SIDE waits for
# them, prints their line and returns gpu_tests' status.
declare -A test_pids
start_tests() {
  gpu_tests "$1" >"/tmp/ab_tests_$1.txt" 2>&1 &
  test_pids[$1]=$!
}
finish_tests() {
  wait "${test_pids[$1]}"
  local rc=$?
  cat "/tmp/ab_tests_$1.txt"
  return $rc
}

stage() { echo "[$SECONDS s] $1"; }  # where the device time goes, for planning the next call
build_side a || exit 1
stage "A built"
start_tests a
overlays=("$@")
sides=(a)
built=()
here=$(pwd)
if side_by_side; then
  echo "building the overlays side by side"
  build_pids=()
  for i in "${!overlays[@]}"; do
    side=${names[$i]} overlay=$(realpath "${overlays[$i]}")
    tree=/tmp/ab_tree_$side
    rm -rf "$tree" && mkdir -p "$tree" && cp -a "$here/." "$tree/" && cp -r "$overlay/." "$tree/"
    echo "$side = ${overlays[$i]} ($(cd "$overlay" && find . -type f | wc -l) files)"
    unshare -m bash -c "mount --bind '$tree' '$here' && cd '$here' && $(declare -f build_side) && OUT='$OUT' BIN='$BIN' \
      executables='$executables' build_side $side" >"/tmp/ab_build_$side.log" 2>&1 &
    build_pids+=($!)
  done
  wait "${build_pids[@]}"
  for i in "${!overlays[@]}"; do
    side=${names[$i]}
    cat "/tmp/ab_build_$side.log"
    rm -rf "/tmp/ab_tree_$side"
    if [ ! -x "$BIN/$side/test_ops" ]; then
      echo "$side did not build: $OUT/$side/build.log"
      continue
    fi
    start_tests "$side" && built+=("$side")
  done
else
  for i in "${!overlays[@]}"; do
    overlay=${overlays[$i]}
    side=${names[$i]}
    mapfile -t files < <(cd "$overlay" && find . -type f)
    existing=()
    for f in "${files[@]}"; do [ -e "$f" ] && existing+=("$f"); done
    saved=/tmp/ab_saved_$side.tar
    tar -cf "$saved" --files-from /dev/null "${existing[@]}"
    cp -r "$overlay"/. .
    echo "$side = $overlay (${#files[@]} files)"
    build_side "$side"
    status=$?
    # A's files back, touched so that the next build compiles them again; the overlay's new files out.
    rm -f "${files[@]}"
    tar -xf "$saved"
    [ ${#existing[@]} -eq 0 ] || touch "${existing[@]}"
    if [ $status -ne 0 ]; then
      echo "$side did not build: $OUT/$side/build.log"
      continue
    fi
    start_tests "$side" && built+=("$side")
  done
fi
stage "overlays built"
finish_tests a || [ $? -ne 124 ] || exit 1
for side in "${built[@]}"; do
  finish_tests "$side" || [ $? -ne 124 ] && sides+=("$side")
done
stage "tests done"

# Every timed run under a limit (BENCH_TIMEOUT seconds, default 300; a run takes under a minute):
# an overlay whose kernel hangs only at the benchmark's shapes, which the tests' shapes missed,
# then loses its numbers instead of the call's remaining time (named in $OUT/timeouts.md, printed
# at the end: the callers' pipes filter the runs' own output).
bench() {
  timeout "${BENCH_TIMEOUT:-300}" "$@"
  local rc=$?
  [ $rc -ne 124 ] || echo "$*: still running after ${BENCH_TIMEOUT:-300} s (a kernel that hangs?), stopped" >>"$OUT/timeouts.md"
  return $rc
}
rm -f "$OUT/timeouts.md"
for round in $(seq 1 "${ROUNDS:-2}"); do
  for side in "${sides[@]}"; do
    bench "$BIN/$side/hybrid-bench-delta-rule" ${OP_ARGS:-} --no-accuracy --json "/tmp/ab_op_$side$round.json" 2>&1 |
      grep "fwd+bwd" | sed "s/^/$side$round op: /"
    [ -n "${OP_ONLY:-}" ] || bench "$BIN/$side/hybrid-bench-layers" ${LAYERS_ARGS:-} --json "/tmp/ab_layers_$side$round.json" 2>&1 |
      grep -E "^\| (GDN|attention) |ratio|against float64" | sed "s/^/$side$round layers: /"
  done
done | tee "$OUT/ab.md"
stage "timed"
python3 scripts/gpu/ab_summary.py "$OUT/ab.md" | tee "$OUT/ab_summary.md"
# PROFILE=1: every side's GPU time by kernel, compared (trace_summary.py --compare).
if [ -n "${PROFILE:-}" ]; then
  for side in "${sides[@]}"; do
    bench "$BIN/$side/hybrid-bench-delta-rule" ${OP_ARGS:-} --no-accuracy --profile "/tmp/ab_trace_$side.json" >/dev/null 2>&1
  done
  for suffix in "" _2 _3 _4 _5 _6; do
    [ -f "/tmp/ab_trace_a$suffix.json" ] || continue
    traces=()
    for side in "${sides[@]}"; do traces+=("$side=/tmp/ab_trace_$side$suffix.json"); done
    python3 scripts/gpu/trace_summary.py --compare "${traces[@]}" --steps 3 >"$OUT/ab_profile$suffix.md"
    # What ran at once, where a side runs kernels on more than one stream.
    for side in "${sides[@]}"; do
      python3 scripts/gpu/trace_summary.py --timeline "/tmp/ab_trace_$side$suffix.json" >"$OUT/ab_timeline_$side$suffix.md"
    done
  done
  head -12 "$OUT/ab_profile.md"
  # Without OP_ONLY the layer too (the norms, the conv and the projections run there, not in the
  # op): ab_profile_layers_mixer.md, ab_profile_layers_gdn_block.md, _attention_block.md.
  if [ -z "${OP_ONLY:-}" ]; then
    rm -f /tmp/ab_layers_*_mixer.json /tmp/ab_layers_*_gdn_block.json /tmp/ab_layers_*_attention_block.json
    for side in "${sides[@]}"; do
      bench "$BIN/$side/hybrid-bench-layers" ${LAYERS_ARGS:-} --profile "/tmp/ab_layers_${side}_mixer.json" \
        --profile-blocks "/tmp/ab_layers_$side" >/dev/null 2>&1
    done
    for part in mixer gdn_block attention_block; do
      traces=()
      for side in "${sides[@]}"; do
        [ -f "/tmp/ab_layers_${side}_$part.json" ] && traces+=("$side=/tmp/ab_layers_${side}_$part.json")
      done
      [ ${#traces[@]} -lt 2 ] ||
        python3 scripts/gpu/trace_summary.py --compare "${traces[@]}" --steps 3 >"$OUT/ab_profile_layers_$part.md"
    done
  fi
  stage "profiled"
fi
# ACCURACY=1: every side's errors against float64 (one short run each, after the timing).
[ -z "${ACCURACY:-}" ] || for side in "${sides[@]}"; do
  bench "$BIN/$side/hybrid-bench-delta-rule" ${OP_ARGS:-} --warmup 1 --reps 3 2>&1 | grep -o "B[0-9].*" |
    sed -E "s/: fwd .*rel RMS vs float64:/:/; s/^/$side errors: /"
done | tee "$OUT/ab_errors.md"
# SANITIZE=1: every overlay's sanitizer runs (SANITIZE_TOOLS, default "memcheck racecheck": racecheck
# sees shared memory alone, so a change without shared-memory accesses needs memcheck only), last
# (nothing timed is running then) and all at once,
# each a process of its own, overlapping where the GPU and the 16 cores have room (in turn,
# memcheck and racecheck took 860 s for two overlays, twenty-fourth session; started together
# for one overlay, memcheck 37 s and racecheck 512 s, twenty-fifth session). Each stops after
# SANITIZE_TIMEOUT seconds (default 420; sanitizer_tests.sh), its test processes with it: in the
# fifty-sixth session racechecks left running (and stopped by hand) kept their tests on the GPU
# and halved the next run's training speed.
if [ -n "${SANITIZE:-}" ]; then
  rm -f /tmp/ab_sanitize_*.txt
  for side in "${sides[@]}"; do
    [ "$side" = a ] && continue
    for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do sanitize "$side" "$tool" >"/tmp/ab_sanitize_${side}_$tool.txt" & done
  done
  wait
  cat /tmp/ab_sanitize_*.txt 2>/dev/null | sort
fi
[ ! -f "$OUT/timeouts.md" ] || cat "$OUT/timeouts.md"
stage "done"
exit
}
