#!/usr/bin/env bash
# On the GPU machine: Nsight Compute's counters for the state pass (forward and reverse launch)
# at the OLMo shape, to see what bounds a chunk step: memory throughput, L2 hits, the warps'
# stall reasons. Clocks left alone (device README). Report in $OUT/ncu_state_pass.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
HYBRID_TARGETS=hybrid-bench-delta-rule scripts/gpu/build.sh || exit 1
ncu --clock-control none --kernel-name regex:state_pass --launch-skip 2 --launch-count 2 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
    --section LaunchStats build-gpu/hybrid-bench-delta-rule --shapes 1 --no-accuracy --warmup 1 --reps 1 \
    >"$OUT/ncu_state_pass.txt" 2>&1
echo "ncu: exit $?"
grep -E "state_pass_kernel|Duration|Memory Throughput|DRAM Throughput|L2 Hit Rate|L1/TEX Hit|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued" "$OUT/ncu_state_pass.txt" | head -60
