# Sourced by ab_bench.sh (SANITIZE=1) and bench_kernels.sh: the GPU tests on small shapes that
# compute-sanitizer's memcheck and racecheck run, as one gtest filter. The delta rule's kernels
# (the op on small shapes, the wide value tiles and the one-an-SM tiles, whose state passes have a
# producer warpgroup; the passes with the state in registers, under memcheck only (below);
# wy_backward, the finish kernel, T's split), the chunk layout (o's gradient with add), RoPE, the
# norms and the conv (the column slices they read in place). Racecheck of all of them took about
# 510 s for one tree (twenty-fifth session): SANITIZE_FILTER narrows an A/B's.
SANITIZER_TESTS='DeltaRuleCuda.Small*:DeltaRuleCuda.WideValueTiles:DeltaRuleCuda.OneBlockAnSM'
SANITIZER_TESTS+=':DeltaRuleCuda.RegistersPassMatchesTheWarpPass:DeltaRuleCuda.KeptInBf16'
SANITIZER_TESTS+=':DeltaRuleChunkTermsCuda.WyBackward*:DeltaRuleChunkTermsCuda.Finish*:DeltaRuleChunkTermsCuda.SplitT'
SANITIZER_TESTS+=':ChunkLayoutCuda.*:RopeCuda.*:RMSNormCuda.Small*:RMSNormCuda.ColumnSlice*:GatedRMSNormCuda.Small*:GatedRMSNormCuda/GatedRMSNormGateSlices.*'
SANITIZER_TESTS+=':CausalConvCuda.Small*:CausalConvCuda.ColumnSlice*:AddRMSNormCuda.*:AddNormedCuda.*'

# Racecheck does not follow mbarrier ordering: on the passes with the state in registers, whose
# producer warp and computing warpgroups meet only at mbarriers (arrive releases, wait acquires),
# it reports every read of a, b and e against the producer's writes of them (33 "hazards" a run,
# thirty-seventh session), and the same 33 where the producer's lanes wrote those rows with plain
# stores before arriving instead of bulk copies. So racecheck runs with HYBRID_STATE_PASS=warps
# (every pass the registers kernel would take goes to the mma.sync one, which it does follow: the
# op tests whose shapes pick the registers kernel, e.g. WideValueTiles' 64-column cases at K = 128,
# drew 6 such reports without it, forty-second session), and the tests that name the registers
# kernel run under memcheck only. WyBackwardIsDeterministic reruns the kernels the other WyBackward
# tests check (20 runs of three paths): under racecheck it had not finished after 700 s (forty-first
# session).
# WyBesideTheReversePass spins on the pass's counters, which racecheck's serialisation makes
# crawl: 512 s for it alone (fifty-sixth session), past the call; memcheck runs it (17-37 s).
RACECHECK_SKIPS='DeltaRuleCuda.RegistersPassMatchesTheWarpPass:DeltaRuleCuda.KeptInBf16'
RACECHECK_SKIPS+=':DeltaRuleChunkTermsCuda.WyBackwardIsDeterministic:DeltaRuleCuda.WyBesideTheReversePass'
# compute-sanitizer's tool $1 on the test binary $2, over the gtest filter $3 (default
# SANITIZER_TESTS; for racecheck without RACECHECK_SKIPS and with HYBRID_STATE_PASS=warps), its log
# in $4; prints one line with the exit code and the tool's summary, prefixed by $5. A run past
# SANITIZE_TIMEOUT seconds (default 420) is stopped (exit 124), so that one slow test cannot take
# the rest of a device call.
run_sanitizer() {
  local filter=${3:-$SANITIZER_TESTS} env=()
  if [ "$1" = racecheck ]; then
    env=(HYBRID_STATE_PASS=warps)
    if [[ $filter == *-* ]]; then filter+=":$RACECHECK_SKIPS"; else filter+="-$RACECHECK_SKIPS"; fi
  fi
  timeout "${SANITIZE_TIMEOUT:-420}" env "${env[@]}" compute-sanitizer --tool "$1" --error-exitcode 3 "$2" \
    --gtest_filter="$filter" >"$4" 2>&1
  local rc=$?
  [ $rc -ne 124 ] || echo "stopped after ${SANITIZE_TIMEOUT:-420} s (SANITIZE_TIMEOUT)" >>"$4"
  echo "${5:-}compute-sanitizer $1: exit $rc ($(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^stopped after" "$4" | head -1))"
}
