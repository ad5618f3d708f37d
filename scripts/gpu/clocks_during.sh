#!/usr/bin/env bash
# On the GPU machine: runs the command given while nvidia-smi samples the GPU every 20 ms (SM and
# memory clocks, power, temperature, the active clock-event reasons: power cap, thermal, ...), then
# prints one line of the samples taken while it ran: the SM clock's median and range, the power's
# median and peak, and the share of samples with each event reason. For telling a kernel's change
# from a clock's (a long timed loop can run at lower clocks than a short traced one).
# Samples in $OUT/clocks_<label>.csv; label from CLOCKS_LABEL (default "run").
set -uo pipefail
OUT=${OUT:-gpu-out}
label=${CLOCKS_LABEL:-run}
csv="$OUT/clocks_$label.csv"
mkdir -p "$OUT"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
  --format=csv,noheader,nounits -lms 20 >"$csv" 2>&1 &
sampler=$!
"$@"
status=$?
kill "$sampler" 2>/dev/null
wait "$sampler" 2>/dev/null
python3 - "$csv" "$label" <<'PY'
import statistics, sys
# The reasons bit mask (nvml's clocksEventReasons): which limit held the clocks down.
REASONS = {0x1: "idle", 0x2: "app setting", 0x4: "power cap", 0x8: "hw slowdown", 0x20: "sw thermal",
           0x40: "hw thermal", 0x80: "power brake"}
rows = []
for line in open(sys.argv[1]):
    f = [x.strip() for x in line.split(",")]
    try:
        rows.append((float(f[1]), float(f[3]), int(f[5], 16)))
    except (IndexError, ValueError):
        continue
if not rows:
    sys.exit(f"{sys.argv[2]}: no nvidia-smi samples ({sys.argv[1]})")
busy = [r for r in rows if not r[2] & 0x1] or rows
sm = [r[0] for r in busy]
power = [r[1] for r in busy]
share = ", ".join(f"{name} {100 * sum(1 for r in busy if r[2] & bit) / len(busy):.0f}%"
                  for bit, name in REASONS.items() if bit != 0x1 and any(r[2] & bit for r in busy))
print(f"{sys.argv[2]}: {len(busy)} busy samples of {len(rows)}; SM clock median {statistics.median(sm):.0f} MHz "
      f"({min(sm):.0f}-{max(sm):.0f}); power median {statistics.median(power):.0f} W, peak {max(power):.0f} W; "
      f"clock events: {share or 'none'}")
PY
exit $status
