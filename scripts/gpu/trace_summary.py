"""GPU time by kernel in a Kineto/Chrome trace (hybrid-bench-delta-rule or hybrid-bench-layers
--profile): first by part of the GDN layer (the kernel names' patterns below), then the kernels
that take the most time, with their share. Times are per step when STEPS (the fwd+bwd calls the
trace holds; both benchmarks record 3) is given.

With --compare, the same kernels side by side in traces of several trees (ab_bench.sh's PROFILE=1:
one trace a side, same benchmark and shape), each side's time and its difference from the first
side's, largest differences first: which kernel a change moved (the twenty-third session's bulk
copies sped up the state pass and slowed the prep kernel, which the op's time alone hid).

With --ops, GPU time by kernel and the CPU op that launched it (with its input shapes, where the
trace recorded them) and the autograd node it ran under: where a copy or an add comes from.

With --timeline, every kernel in the order it started, on which stream, when it started and ended
(us from the trace's first kernel), how long the GPU had run nothing before it (the host behind:
a kernel's start then says when it was launched, not when it could have run; the fifty-fifth
session's profiled run so showed wy_backward starting 196 us into the pass it ran beside) and how
long it ran beside kernels of other streams, then those overlaps summed by pair of kernels: what
ran at once (the per-kernel times above cannot say; the fifty-fourth session's wy_backward beside
the reverse pass needed it).

With --gaps, where the GPU waits: its idle time between kernels, summed by the scope or autograd
node of the kernel that ends each gap, then the longest gaps with the kernels on either side, how
long into the gap the host launched the next one (above zero: the GPU had run dry, the host
behind), and the CPU op the launching thread was in when the gap began (an aten::item there is a
sync: the host waited for the GPU, then had to launch again); last, for the longest gaps the host
ended late, the host's ops from the gap's start to its launch (what to make cheaper or move).

usage: trace_summary.py TRACE.json [TOP [STEPS]]
       trace_summary.py --ops TRACE.json [TOP [STEPS]]
       trace_summary.py --gaps TRACE.json [TOP [STEPS]]
       trace_summary.py --timeline TRACE.json [TOP]
       trace_summary.py --compare SIDE=TRACE.json SIDE=TRACE.json [...] [--steps STEPS] [--top TOP]"""
import argparse, collections, json, re, sys

# Parts of a layer's or a training step's GPU time, by kernel name; the first pattern that
# matches wins.
PARTS = [
    ("delta rule: state pass", r"state_pass"),
    ("delta rule: TF32 products", r"tf32|s1688gemm"),
    ("delta rule: chunk kernels",
     r"chunk_prep|wy_backward|finish_kernel|finish_products|output_grad|split_rows|split_transposed"),
    ("delta rule: chunk layout", r"to_chunks|from_chunks"),
    ("bf16 matmuls (projections)", r"nvjet|gemm"),
    ("attention (SDPA)", r"sdpa|flash|fmha"),
    ("short conv", r"causal_conv"),
    ("norms", r"rms_norm"),
    ("SwiGLU, RoPE", r"swiglu|rope_kernel"),
    ("optimizer (AdamW)", r"adam|multi_tensor"),
    ("loss (cross entropy, z-loss)", r"lm_loss|softmax|logsumexp|nll|cross_entropy"),
    ("NCCL", r"nccl"),
    ("copies, casts, concatenations", r"copy|Cat|cast"),
]


def short_name(name):
    """A kernel's name without our namespaces, cut at 110 characters: cut with them, the state
    pass's forward and reverse instances (which differ only in their template arguments, past
    `(hybrid::ops::detail::(anonymous namespace)::Queries)`) were one row (twenty-fourth session)."""
    return re.sub(r"hybrid::ops::detail::|\(anonymous namespace\)::", "", name)[:110]


def gpu_work(e):
    """A kernel, copy or fill of the traced calls: not the spin kernel (ATen's sleep) that
    write_cuda_profile runs first so that the host queues the calls ahead of the GPU."""
    return e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e and "spin_kernel" not in e["name"]


def kernel_times(path, steps):
    """(us by kernel name, calls by name, busy us, span us), per step."""
    trace = json.load(open(path))
    total, count = collections.Counter(), collections.Counter()
    first, last = float("inf"), 0.0
    for e in trace.get("traceEvents", []):
        if gpu_work(e):
            name = short_name(e["name"])
            total[name] += e["dur"] / steps
            count[name] += 1
            first, last = min(first, e["ts"]), max(last, e["ts"] + e["dur"])
    # The span from the first kernel's start to the last one's end, per step: what it has beyond
    # the busy time is the GPU waiting (on launches, or between the recorded calls).
    span = (last - first) / steps if last > first else 0.0
    return total, count, sum(total.values()), span


def summary(path, top, steps):
    total, count, all_us, span_us = kernel_times(path, steps)
    per = " a step" if steps > 1 else ""
    print(f"GPU busy {all_us / 1e3:.2f} ms{per} over {sum(count.values())} kernels, "
          f"span {span_us / 1e3:.2f} ms{per} (idle {max(span_us - all_us, 0) / 1e3:.2f})")
    parts = collections.Counter()
    for name, us in total.items():
        parts[next((label for label, pattern in PARTS if re.search(pattern, name)), "other")] += us
    print(f"\n| part | us{per} | share |\n|---|---|---|")
    for part, us in parts.most_common():
        print(f"| {part} | {us:.0f} | {100 * us / all_us:.1f}% |")
    print(f"\n| us{per} | share | calls | kernel |\n|---|---|---|---|")
    for name, us in total.most_common(top):
        print(f"| {us:.0f} | {100 * us / all_us:.1f}% | {count[name]} | `{name}` |")


def compare(sides, top, steps):
    times = {}
    for side in sides:
        label, sep, path = side.partition("=")
        if not sep:
            sys.exit(f"trace_summary: --compare takes SIDE=TRACE.json, not {side}")
        times[label] = kernel_times(path, steps)
    labels = list(times)
    base = labels[0]
    per = " a step" if steps > 1 else ""
    print(f"GPU busy (us{per}): " + ", ".join(f"{s} {times[s][2]:.0f}" for s in labels))
    names = set().union(*(times[s][0] for s in labels))
    delta = {n: max(abs(times[s][0][n] - times[base][0][n]) for s in labels) for n in names}
    head = " | ".join(f"{s}" if s == base else f"{s} | {s} - {base}" for s in labels)
    print(f"\n| kernel | {head} |\n|---|" + "---|" * (2 * len(labels) - 1))
    for name in sorted(names, key=lambda n: -delta[n])[:top]:
        cells = [f"{times[base][0][name]:.0f}"]
        for s in labels[1:]:
            cells += [f"{times[s][0][name]:.0f}", f"{times[s][0][name] - times[base][0][name]:+.0f}"]
        print(f"| `{name}` | " + " | ".join(cells) + " |")


def launching_ops(events):
    """For each kernel's correlation id, the CPU ops and named scopes around its launch, outermost
    first: the launch (a cuda_runtime event with the kernel's correlation) lies inside them on its
    thread."""
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops_by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e:
            ops_by_thread[e["tid"]].append(e)
    queries = collections.defaultdict(list)
    for corr, launch in launches.items():
        queries[launch["tid"]].append((launch["ts"], corr))
    chains = {}
    for tid, asks in queries.items():
        ops = sorted(ops_by_thread[tid], key=lambda e: (e["ts"], -e["dur"]))
        stack, i = [], 0
        for ts, corr in sorted(asks):
            while i < len(ops) and ops[i]["ts"] <= ts:
                while stack and stack[-1]["ts"] + stack[-1]["dur"] < ops[i]["ts"]:
                    stack.pop()
                stack.append(ops[i])
                i += 1
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < ts:
                stack.pop()
            chains[corr] = [op for op in stack if op["ts"] + op["dur"] >= ts]
    return chains


def scope_of(chain):
    """The autograd node (backward) a launch ran under, else the innermost scope the code named
    (hybrid-train's "block 3 (GDN)", "clipping and optimizer step"), else the outermost op."""
    scopes = [op["name"] for op in chain if op.get("cat") == "user_annotation"]
    node = next((op["name"] for op in chain if op["name"].startswith("autograd::engine")),
                scopes[-1] if scopes else chain[0]["name"] if chain else "-")
    return node.replace("autograd::engine::evaluate_function: ", "backward: ")


def gaps(path, top, steps, shortest=1.0):
    """The GPU's idle intervals (no kernel, copy or fill running on any stream) of at least
    `shortest` us, by the scope of the kernel after each, and the longest of them."""
    events = json.load(open(path)).get("traceEvents", [])
    chains = launching_ops(events)
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    kernels = sorted((e for e in events if gpu_work(e)),
                     key=lambda e: e["ts"])
    found, busy_end, before = [], None, None
    for e in kernels:
        if busy_end is not None and e["ts"] - busy_end >= shortest:
            found.append((e["ts"] - busy_end, busy_end, before, e))
        if busy_end is None or e["ts"] + e["dur"] > busy_end:
            busy_end, before = e["ts"] + e["dur"], e
    per = " a step" if steps > 1 else ""
    idle = sum(g[0] for g in found)
    print(f"GPU idle {idle / steps / 1e3:.2f} ms{per} in {len(found)} gaps of at least {shortest:g} us")
    by_scope, count = collections.Counter(), collections.Counter()
    for us, _, _, after in found:
        scope = scope_of(chains.get(after.get("args", {}).get("correlation"), []))[:70]
        by_scope[scope] += us / steps
        count[scope] += 1
    print(f"\n| idle us{per} | gaps | the next kernel under |\n|---|---|---|")
    for scope, us in by_scope.most_common(top):
        print(f"| {us:.0f} | {count[scope]} | {scope} |")
    ops_by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op" and "dur" in e:
            ops_by_thread[e["tid"]].append(e)
    print("\n| us | before | after | launched, us into the gap | host op at the gap's start | after's scope |\n"
          "|---|---|---|---|---|---|")
    for us, start, prev, after in sorted(found, key=lambda g: -g[0])[:top]:
        corr = after.get("args", {}).get("correlation")
        launch = launches.get(corr)
        into = f"{launch['ts'] - start:+.0f}" if launch else "?"
        tid = launch["tid"] if launch else None
        around = [op for op in ops_by_thread.get(tid, []) if op["ts"] <= start <= op["ts"] + op["dur"]]
        host = max(around, key=lambda op: op["ts"])["name"] if around else "-"
        print(f"| {us:.0f} | `{short_name(prev['name'])[:50]}` | `{short_name(after['name'])[:50]}` | {into} | "
              f"{host[:40]} | {scope_of(chains.get(corr, []))[:50]} |")
    host_in_gaps(sorted(found, key=lambda g: -g[0])[:min(top, 8)], launches, ops_by_thread)


def host_in_gaps(longest, launches, ops_by_thread):
    """For each gap the host ended late (its launch inside the gap), what the launching thread did
    from the gap's start to that launch: its outermost CPU ops by name (time inside the window,
    calls), and the time in none of them (the program's own code between ATen calls)."""
    print("\n| gap us | host from the gap's start to the launch: outermost ops (us, calls); outside ops |\n|---|---|")
    for us, start, _, after in longest:
        launch = launches.get(after.get("args", {}).get("correlation"))
        if not launch or launch["ts"] <= start:
            continue
        end, ops = launch["ts"], sorted(ops_by_thread.get(launch["tid"], []), key=lambda e: (e["ts"], -e["dur"]))
        spent, calls, outer_end = collections.Counter(), collections.Counter(), -1.0
        for op in ops:
            op_end = op["ts"] + op["dur"]
            if op_end <= start or op["ts"] >= end or op_end <= outer_end:
                continue  # outside the window, or inside an op already counted
            outer_end = op_end
            inside = min(op_end, end) - max(op["ts"], start)
            spent[op["name"]] += inside
            calls[op["name"]] += 1
        outside = (end - start) - sum(spent.values())
        parts = [f"{name} {t:.0f} ({calls[name]})" for name, t in spent.most_common(6)]
        print(f"| {us:.0f} | {', '.join(parts) or '-'}; outside ops {outside:.0f} |")


def timeline(path, top):
    """The kernels in start order with their streams and spans, the time each ran beside kernels of
    other streams, and those overlaps summed by pair (the TOP largest)."""
    events = json.load(open(path)).get("traceEvents", [])
    kernels = sorted((e for e in events if gpu_work(e)),
                     key=lambda e: e["ts"])
    if not kernels:
        sys.exit(f"trace_summary: no kernels in {path}")
    t0 = kernels[0]["ts"]
    stream = lambda e: e.get("args", {}).get("stream", e.get("tid"))
    pairs, beside = collections.Counter(), collections.Counter()
    for i, a in enumerate(kernels):
        for j in range(i + 1, len(kernels)):
            b = kernels[j]
            if b["ts"] >= a["ts"] + a["dur"]:
                break  # (in start order: no later kernel overlaps a either)
            if stream(a) == stream(b):
                continue
            both = min(a["ts"] + a["dur"], b["ts"] + b["dur"]) - b["ts"]
            beside[i] += both
            beside[j] += both
            pairs[tuple(sorted((short_name(a["name"])[:60], short_name(b["name"])[:60])))] += both
    print("| start us | end us | us | stream | GPU idle before, us | beside other streams, us | kernel |\n"
          "|---|---|---|---|---|---|---|")
    busy_until = t0
    for i, e in enumerate(kernels):
        idle = max(0.0, e["ts"] - busy_until)
        busy_until = max(busy_until, e["ts"] + e["dur"])
        print(f"| {e['ts'] - t0:.0f} | {e['ts'] + e['dur'] - t0:.0f} | {e['dur']:.0f} | {stream(e)} | {idle:.0f} | "
              f"{beside[i]:.0f} | `{short_name(e['name'])[:70]}` |")
    print("\n| us at once | kernel | kernel |\n|---|---|---|")
    for (a, b), us in pairs.most_common(top):
        print(f"| {us:.0f} | `{a}` | `{b}` |")


def by_op(path, top, steps):
    """GPU time by (kernel, the op that launched it, its input shapes, the autograd node or named
    scope it ran under): which copy or add in a profile comes from where (a trace from
    hybrid-train --profile-steps records the ops' shapes and names each block's forward)."""
    events = json.load(open(path)).get("traceEvents", [])
    chains = launching_ops(events)
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if gpu_work(e):
            chain = chains.get(e.get("args", {}).get("correlation"), [])
            inner = chain[-1] if chain else {"name": "-", "args": {}}
            node = scope_of(chain)
            dims = json.dumps(inner.get("args", {}).get("Input Dims", ""), separators=(",", ":"))
            key = (short_name(e["name"])[:70], inner["name"], dims[:60], node[:70])
            total[key] += e["dur"] / steps
            count[key] += 1
    per = " a step" if steps > 1 else ""
    print(f"| us{per} | calls | kernel | launched by | its input dims | under |\n|---|---|---|---|---|---|")
    for key, us in total.most_common(top):
        kernel, op, dims, node = key
        print(f"| {us:.0f} | {count[key]} | `{kernel}` | {op} | {dims} | {node} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--timeline":
        timeline(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 10)
    elif len(sys.argv) > 1 and sys.argv[1] in ("--ops", "--gaps"):
        report = by_op if sys.argv[1] == "--ops" else gaps
        report(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 40, int(sys.argv[4]) if len(sys.argv) > 4 else 1)
    elif len(sys.argv) > 1 and sys.argv[1] == "--compare":
        parser = argparse.ArgumentParser()
        parser.add_argument("--compare", nargs="+", required=True)
        parser.add_argument("--steps", type=int, default=1)
        parser.add_argument("--top", type=int, default=15)
        args = parser.parse_args()
        compare(args.compare, args.top, args.steps)
    else:
        top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
        summary(sys.argv[1], top, int(sys.argv[3]) if len(sys.argv) > 3 else 1)
