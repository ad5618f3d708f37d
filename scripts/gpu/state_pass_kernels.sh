#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu/build.sh with hybrid-bench-delta-rule: the op's fwd+bwd at
# each shape (B,T,H,K,V, e.g. 1,8192,30,96,192) with each state-pass kernel forced in turn
# (HYBRID_STATE_PASS: the mma.sync pass, the registers pass in pairs of chains and alone) and
# with the default choice, one trace each: the table gives each run's fwd+bwd (queued, ms) and its
# state passes' GPU time a fwd+bwd (us, the kernels whose names hold state_pass), for the step
# times kernels/delta_state_pass.cu's fastest_pass_kernel weighs. Logs and traces in $OUT/state_pass/.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT/state_pass"
echo "| shape | kernel | fwd+bwd queued ms | state passes us | forward pass us | reverse pass us |"
echo "|---|---|---|---|---|---|"
for shape in "$@"; do
  for kernel in warps registers registers-single default; do
    name="${shape//,/_}_$kernel" log="$OUT/state_pass/$name.log" trace="/tmp/state_pass_$name.json"
    env_kernel=$([ "$kernel" = default ] || echo "$kernel")
    HYBRID_STATE_PASS=$env_kernel build-gpu/hybrid-bench-delta-rule --no-accuracy --shape "$shape" \
      --json "$OUT/state_pass/$name.json" --profile "$trace" >"$log" 2>&1 || { echo "| $shape | $kernel | failed: $(tail -1 "$log") |"; continue; }
    python3 scripts/gpu/trace_summary.py "$trace" 40 3 >"$OUT/state_pass/$name.md"
    queued=$(python3 -c "import json,sys; print('%.3f' % json.load(open(sys.argv[1]))['shapes'][0]['fwdbwd_queued_ms'])" \
      "$OUT/state_pass/$name.json")
    # Per-kernel rows: "| us | share | calls | `name` |"; the forward's pass has whole-output
    # queries ((Queries)3) or is the registers kernel's <true, ...> instance.
    python3 - "$OUT/state_pass/$name.md" "$shape" "$kernel" "$queued" <<'PY'
import re, sys
total = fwd = rev = 0.0
for line in open(sys.argv[1]):
    m = re.match(r"\| (\d+) \| [\d.]+% \| \d+ \| `(.*)` \|", line)
    if not m or "state_pass" not in m.group(2): continue
    us, name = float(m.group(1)), m.group(2)
    total += us
    if "(Queries)3" in name or "registers_kernel<true" in name: fwd += us
    else: rev += us
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {total:.0f} | {fwd:.0f} | {rev:.0f} |")
PY
  done
done
