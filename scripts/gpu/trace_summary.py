"""GPU time by kernel in a Kineto/Chrome trace (hybrid-bench-delta-rule --profile): the kernels
that take the most time, with their share. usage: trace_summary.py TRACE.json [TOP]"""
import collections, json, sys

trace = json.load(open(sys.argv[1]))
top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
total = collections.Counter()
count = collections.Counter()
for e in trace.get("traceEvents", []):
    if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e:
        name = e["name"][:110]
        total[name] += e["dur"]
        count[name] += 1
all_us = sum(total.values())
print(f"GPU busy {all_us / 1e3:.2f} ms over {sum(count.values())} kernels")
print("| us | share | calls | kernel |\n|---|---|---|---|")
for name, us in total.most_common(top):
    print(f"| {us:.0f} | {100 * us / all_us:.1f}% | {count[name]} | `{name}` |")
