#!/usr/bin/env bash
# On the GPU machine: Nsight Compute's counters for the state pass (forward and reverse launch)
# at the OLMo shape, to see what bounds a chunk step: memory throughput, L2 hits, pipe use,
# instructions, the warps' stall reasons (cycles per issued instruction, by reason). Clocks left
# alone (device README). Report in $OUT/ncu_state_pass.txt; the lines that matter printed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
HYBRID_TARGETS=hybrid-bench-delta-rule scripts/gpu/build.sh || exit 1
ncu --clock-control none --kernel-name regex:state_pass --launch-skip 2 --launch-count 2 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
    --section LaunchStats --section InstructionStats --section ComputeWorkloadAnalysis --section SourceCounters \
    --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
    build-gpu/hybrid-bench-delta-rule --shapes 1 --no-accuracy --warmup 1 --reps 1 \
    >"$OUT/ncu_state_pass.txt" 2>&1
echo "ncu: exit $?"
grep -E "state_pass_kernel|Duration|DRAM Throughput|L2 Hit Rate|Compute \(SM\) Throughput|Executed Ipc Active|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Executed Instructions  " "$OUT/ncu_state_pass.txt" | head -24
# Stall reasons above 0.1 cycles per issued instruction, largest first.
grep -E "smsp__average_warps_issue_stalled_" "$OUT/ncu_state_pass.txt" |
  awk '$NF+0 > 0.1 {sub("smsp__average_warps_issue_stalled_", "", $1); sub("_per_issue_active.ratio", "", $1); print $NF, $1}' |
  sort -rn | head -24
