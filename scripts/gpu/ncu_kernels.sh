#!/usr/bin/env bash
# On the GPU machine: Nsight Compute's counters for the kernels whose names match REGEX (default
# state_pass), to see what bounds them before changing them: memory throughput, L2 hits, issue
# rate, occupancy, registers, instructions, the warps' stall reasons (cycles per issued
# instruction, by reason). BENCH=op (default) profiles the delta-rule op at the OLMo shape,
# BENCH=layers a GDN layer of 7b.yaml's width (conv, norms, projections too). SKIP launches are
# passed over first (default 2, past the warm-up) and COUNT profiled (default 2); SHAPE=B,T,H,K,V
# profiles the op at that shape instead (e.g. SHAPE=8,4096,16,128,128; BENCH=op). Clocks left
# alone (device README). Report in $OUT/ncu_kernels.txt; the lines that matter printed. SOURCE=1
# also keeps the report ($OUT/ncu_kernels.ncu-rep) and writes every SASS instruction's counters
# (executions, stall samples by reason, excessive sectors) to $OUT/ncu_source.csv, for reading
# where a kernel's instructions and stalls go with scripts/gpu/ncu_source_summary.py, and by source
# line with scripts/gpu/sass_census.py OBJECT KERNEL --lines --executed ncu_source.csv (run on this
# machine, on build-gpu's object: the CSV's instructions must be that build's).
#   scripts/gpu/ncu_kernels.sh 'causal_conv' (BENCH=layers)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
REGEX=${1:-state_pass}
BENCH=${BENCH:-op}
mkdir -p "$OUT"
# How busy the tensor pipe is while the SM is active (a pass set by its products or by its chain),
# and the shared-memory pipe beside it.
PIPES=sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_hmma.sum,smsp__inst_executed.sum,sm__cycles_active.avg,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed_op_ldsm.sum,sm__warps_active.avg.pct_of_peak_sustained_active
case "$BENCH" in
  op) target=hybrid-bench-delta-rule
     args=($([ -n "${SHAPE:-}" ] && echo "--shape $SHAPE" || echo "--shapes 1") --no-accuracy --warmup 1 --reps 1) ;;
  layers) target=hybrid-bench-layers; args=(--warmup 1 --reps 1) ;;
  *) echo "BENCH must be op or layers" >&2; exit 2 ;;
esac
HYBRID_TARGETS=$target scripts/gpu/build.sh || exit 1
ncu --clock-control none --kernel-name "regex:$REGEX" --launch-skip "${SKIP:-2}" --launch-count "${COUNT:-2}" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
    --section LaunchStats --section InstructionStats --section ComputeWorkloadAnalysis --section SchedulerStats \
    --section SourceCounters ${SOURCE:+--import-source no -o $OUT/ncu_kernels -f} --metrics "$PIPES,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    "build-gpu/$target" "${args[@]}" >"$OUT/ncu_kernels.txt" 2>&1
echo "ncu: exit $?"
if [ -n "${SOURCE:-}" ]; then
  ncu -i "$OUT/ncu_kernels.ncu-rep" --page source --print-source sass --csv >"$OUT/ncu_source.csv" 2>&1
  echo "ncu source page: exit $?, $(wc -l <"$OUT/ncu_source.csv") lines"
  ncu -i "$OUT/ncu_kernels.ncu-rep" --page details >"$OUT/ncu_kernels.txt" 2>&1
fi
grep -E "^  [a-z_ ]*void |^  [a-z_:<>]+\(|Duration|DRAM Throughput|L2 Hit Rate|Compute \(SM\) Throughput|Issued Warp Per Scheduler|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Executed Instructions  " \
  "$OUT/ncu_kernels.txt" | cut -c1-160 | head -40
grep -E "sm__pipe_tensor|sm__inst_executed_pipe_tensor|smsp__inst_executed\.sum|sm__cycles_active|lsu_wavefronts_mem_shared|inst_executed_op_ldsm|sm__warps_active" "$OUT/ncu_kernels.txt" | head -28
# Stall reasons above 0.1 cycles per issued instruction, largest first (over all profiled launches).
grep -E "smsp__average_warps_issue_stalled_" "$OUT/ncu_kernels.txt" |
  awk '$NF+0 > 0.1 {sub("smsp__average_warps_issue_stalled_", "", $1); sub("_per_issue_active.ratio", "", $1); print $NF, $1}' |
  sort -rn | head -24
