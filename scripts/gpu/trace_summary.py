"""GPU time by kernel in a Kineto/Chrome trace (hybrid-bench-delta-rule or hybrid-bench-layers
--profile): first by part of the GDN layer (the kernel names' patterns below), then the kernels
that take the most time, with their share. Times are per step when STEPS (the fwd+bwd calls the
trace holds; both benchmarks record 3) is given. usage: trace_summary.py TRACE.json [TOP [STEPS]]"""
import collections, json, re, sys

# Parts of a GDN layer's step, by kernel name; the first pattern that matches wins.
PARTS = [
    ("delta rule: state pass", r"state_pass"),
    ("delta rule: TF32 products", r"tf32|s1688gemm"),
    ("delta rule: chunk kernels", r"chunk_prep|wy_backward|finish_kernel|split_rows|split_transposed"),
    ("delta rule: chunk layout", r"to_chunks|from_chunks"),
    ("bf16 matmuls (projections)", r"nvjet|gemm"),
    ("short conv", r"causal_conv"),
    ("norms", r"rms_norm"),
    ("copies, casts, concatenations", r"copy|Cat|cast"),
]

trace = json.load(open(sys.argv[1]))
top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 1
total = collections.Counter()
count = collections.Counter()
first, last = float("inf"), 0.0
for e in trace.get("traceEvents", []):
    if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e:
        name = e["name"][:110]
        total[name] += e["dur"] / steps
        count[name] += 1
        first, last = min(first, e["ts"]), max(last, e["ts"] + e["dur"])
all_us = sum(total.values())
per = " a step" if steps > 1 else ""
# The span from the first kernel's start to the last one's end, per step: what it has beyond the
# busy time is the GPU waiting (on launches, or between the recorded calls).
span_us = (last - first) / steps if last > first else 0.0
print(f"GPU busy {all_us / 1e3:.2f} ms{per} over {sum(count.values())} kernels, "
      f"span {span_us / 1e3:.2f} ms{per} (idle {max(span_us - all_us, 0) / 1e3:.2f})")

parts = collections.Counter()
for name, us in total.items():
    part = next((label for label, pattern in PARTS if re.search(pattern, name)), "other")
    parts[part] += us
print(f"\n| part | us{per} | share |\n|---|---|---|")
for part, us in parts.most_common():
    print(f"| {part} | {us:.0f} | {100 * us / all_us:.1f}% |")

print(f"\n| us{per} | share | calls | kernel |\n|---|---|---|---|")
for name, us in total.most_common(top):
    print(f"| {us:.0f} | {100 * us / all_us:.1f}% | {count[name]} | `{name}` |")
