#!/usr/bin/env bash
# On the GPU machine: Nsight Compute's counters for the state pass (forward and reverse launch)
# at the OLMo shape, in 3xTF32 and in plain TF32 (--tf32-state-pass), to see what bounds a chunk
# step: memory throughput, L2 hits, pipe use, instructions, the warps' stall reasons (cycles per
# issued instruction, by reason). Clocks left alone (device README). Reports in
# $OUT/ncu_state_pass{,_tf32}.txt; the lines that matter printed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
HYBRID_TARGETS=hybrid-bench-delta-rule scripts/gpu/build.sh || exit 1
for variant in "" _tf32; do
  flag=$([ -n "$variant" ] && echo --tf32-state-pass)
  ncu --clock-control none --kernel-name regex:state_pass --launch-skip 2 --launch-count 2 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
      --section LaunchStats --section InstructionStats --section ComputeWorkloadAnalysis \
      --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
      build-gpu/hybrid-bench-delta-rule $flag --shapes 1 --no-accuracy --warmup 1 --reps 1 \
      >"$OUT/ncu_state_pass$variant.txt" 2>&1
  echo "== ncu state pass${variant:- 3xTF32}: exit $?"
  grep -E "state_pass_kernel|Duration|DRAM Throughput|L2 Hit Rate|Compute \(SM\) Throughput|Executed Ipc Active|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Executed Instructions  " "$OUT/ncu_state_pass$variant.txt" | head -24
  # Stall reasons above 0.1 cycles per issued instruction, largest first.
  grep -E "smsp__average_warps_issue_stalled_" "$OUT/ncu_state_pass$variant.txt" |
    awk '$NF+0 > 0.1 {sub("smsp__average_warps_issue_stalled_", "", $1); sub("_per_issue_active.ratio", "", $1); print $NF, $1}' |
    sort -rn | head -24
done
