#!/usr/bin/env python3
"""scripts/gpu/trace_summary.py on made-up Kineto traces: GPU time by kernel a step (three recorded
steps), the parts of a GDN layer by kernel name, --compare's side-by-side table with the largest
differences first (ab_bench.sh's PROFILE=1), --ops's kernels by the CPU op that launched them, and
--gaps's idle intervals with what the host was doing, and its ops over the longest gaps, and
--timeline's kernels in start order with the GPU's idle time before each and what ran at once on
other streams.
No GPU needed: the traces are written here."""
import json
import os
import subprocess
import sys
import tempfile

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "gpu", "trace_summary.py")


def trace(path, kernels):
    """Three steps of the given (name, us) kernels, back to back."""
    events, ts = [], 0.0
    for _ in range(3):
        for name, us in kernels:
            events.append({"cat": "kernel", "name": name, "ts": ts, "dur": us})
            ts += us
    events.append({"cat": "cpu_op", "name": "aten::add", "ts": 0.0, "dur": 1e6})  # not GPU time
    with open(path, "w") as f:
        json.dump({"traceEvents": events}, f)


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], check=True, capture_output=True, text=True).stdout


def main():
    with tempfile.TemporaryDirectory() as d:
        a, b = os.path.join(d, "a.json"), os.path.join(d, "b.json")
        trace(a, [("state_pass_kernel<48>", 1300.0), ("chunk_prep_kernel<true>", 216.0),
                  ("finish_products_kernel<false, true>", 640.0)])
        trace(b, [("state_pass_kernel<48>", 1280.0), ("chunk_prep_kernel<true>", 255.0),
                  ("finish_products_kernel<false, true>", 640.0), ("split_rows_kernel", 5.0)])

        out = run(a, "10", "3")
        assert "GPU busy 2.16 ms a step over 9 kernels" in out, out
        assert "| delta rule: state pass | 1300 | 60.3% |" in out, out
        assert "| delta rule: chunk kernels | 856 | 39.7% |" in out, out  # prep and finish_products

        out = run("--compare", f"a={a}", f"b={b}", "--steps", "3")
        assert "GPU busy (us a step): a 2156, b 2180" in out, out
        rows = [line for line in out.splitlines() if line.startswith("| `")]
        assert rows[0] == "| `chunk_prep_kernel<true>` | 216 | 255 | +39 |", rows  # largest difference first
        assert rows[1] == "| `state_pass_kernel<48>` | 1300 | 1280 | -20 |", rows
        assert rows[2] == "| `split_rows_kernel` | 0 | 5 | +5 |", rows  # on one side only
        assert rows[3] == "| `finish_products_kernel<false, true>` | 640 | 640 | +0 |", rows

        # Two instances whose full names differ only past 110 characters stay two rows.
        ns = "hybrid::ops::detail::(anonymous namespace)::"
        instance = f"void {ns}state_pass_kernel<48, true, ({ns}Queries){{}}, 96>({ns}Params)"
        c = os.path.join(d, "c.json")
        trace(c, [(instance.format(3), 588.0), (instance.format(1), 674.0)])
        out = run(c, "10", "3")
        assert "| 674 | 53.4% | 3 | `void state_pass_kernel<48, true, (Queries)1, 96>(Params)` |" in out, out
        assert "| 588 | 46.6% | 3 | `void state_pass_kernel<48, true, (Queries)3, 96>(Params)` |" in out, out

        # --ops: each kernel under the op that launched it (the innermost one around its launch on
        # the launching thread) and the autograd node or innermost named scope around that; two
        # steps recorded.
        events = []
        for step in range(2):
            t = 1000.0 * step
            events += [
                {"cat": "cpu_op", "name": "autograd::engine::evaluate_function: AccumulateGrad", "tid": 7,
                 "ts": t, "dur": 100.0},
                {"cat": "cpu_op", "name": "aten::add_", "tid": 7, "ts": t + 10, "dur": 20.0,
                 "args": {"Input Dims": [[2048, 8192], [2048, 8192], []]}},
                {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 7, "ts": t + 15, "dur": 3.0,
                 "args": {"correlation": 10 + step}},
                {"cat": "kernel", "name": "elementwise_kernel<CUDAFunctor_add<float>>", "ts": t + 20, "dur": 220.0,
                 "args": {"correlation": 10 + step}},
                {"cat": "user_annotation", "name": "forward and loss", "tid": 1, "ts": t + 35, "dur": 50.0},
                {"cat": "user_annotation", "name": "block 3 (GDN)", "tid": 1, "ts": t + 38, "dur": 20.0},
                {"cat": "cpu_op", "name": "aten::copy_", "tid": 1, "ts": t + 40, "dur": 5.0, "args": {}},
                {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": t + 41, "dur": 2.0,
                 "args": {"correlation": 20 + step}},
                {"cat": "kernel", "name": "direct_copy_kernel", "ts": t + 300, "dur": 80.0,
                 "args": {"correlation": 20 + step}},
            ]
        o = os.path.join(d, "ops.json")
        with open(o, "w") as f:
            json.dump({"traceEvents": events}, f)
        rows = [line for line in run("--ops", o, "10", "2").splitlines() if line.startswith("| ") and "`" in line]
        assert rows == [
            "| 220 | 2 | `elementwise_kernel<CUDAFunctor_add<float>>` | aten::add_ | [[2048,8192],[2048,8192],[]] | "
            "backward: AccumulateGrad |",
            '| 80 | 2 | `direct_copy_kernel` | aten::copy_ | "" | block 3 (GDN) |'], rows

        # --gaps: the GPU idle 120 us between a forward kernel and an optimizer kernel that the host
        # launched 110 us into the gap, from inside an aten::item (a sync) when the gap began; a
        # 0.5 us gap after it is below the threshold.
        g = os.path.join(d, "gaps.json")
        with open(g, "w") as f:
            json.dump({"traceEvents": [
                {"cat": "user_annotation", "name": "forward and loss", "tid": 1, "ts": -10.0, "dur": 8.0},
                {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": -5.0, "dur": 2.0,
                 "args": {"correlation": 1}},
                {"cat": "kernel", "name": "kernel_a", "ts": 0.0, "dur": 100.0, "args": {"correlation": 1}},
                {"cat": "cpu_op", "name": "aten::item", "tid": 1, "ts": 90.0, "dur": 110.0},
                {"cat": "cpu_op", "name": "aten::_local_scalar_dense", "tid": 1, "ts": 150.0, "dur": 20.0},
                {"cat": "user_annotation", "name": "clipping and optimizer step", "tid": 1, "ts": 205.0, "dur": 100.0},
                {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 210.0, "dur": 2.0,
                 "args": {"correlation": 2}},
                {"cat": "kernel", "name": "kernel_b", "ts": 220.0, "dur": 50.0, "args": {"correlation": 2}},
                {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 215.0, "dur": 2.0,
                 "args": {"correlation": 3}},
                {"cat": "kernel", "name": "kernel_c", "ts": 270.5, "dur": 10.0, "args": {"correlation": 3}}]}, f)
        out = run("--gaps", g, "5")
        assert "GPU idle 0.12 ms in 1 gaps of at least 1 us" in out, out
        assert "| 120 | 1 | clipping and optimizer step |" in out, out
        assert "| 120 | `kernel_a` | `kernel_b` | +110 | aten::item | clipping and optimizer step |" in out, out
        # From the gap's start (100) to the launch (210): 100 us in aten::item (the op inside it
        # not counted again), 10 outside any op.
        assert "| 120 | aten::item 100 (1); outside ops 10 |" in out, out

        # --timeline: a pass on stream 7 with wy_backward beside it on stream 13 (290 us at once, 3
        # more with the gate before it), then the finish kernel after both; kernels of one stream
        # never count as beside each other; the spin kernel the host queues the calls behind is no
        # part of them.
        t = os.path.join(d, "timeline.json")
        with open(t, "w") as f:
            json.dump({"traceEvents": [
                {"cat": "kernel", "name": "finish", "ts": 1335.0, "dur": 100.0, "args": {"stream": 7}},
                {"cat": "kernel", "name": "state_pass", "ts": 1000.0, "dur": 300.0, "args": {"stream": 7}},
                {"cat": "kernel", "name": "gate", "ts": 1005.0, "dur": 3.0, "args": {"stream": 13}},
                {"cat": "kernel", "name": "wy_backward", "ts": 1010.0, "dur": 320.0, "args": {"stream": 13}},
                {"cat": "kernel", "name": "output_grad", "ts": 900.0, "dur": 95.0, "args": {"stream": 7}},
                {"cat": "kernel", "name": "void at::cuda::(anonymous namespace)::spin_kernel(long)", "ts": 0.0,
                 "dur": 890.0, "args": {"stream": 7}}]}, f)
        lines = run("--timeline", t).splitlines()
        rows = [line for line in lines if line.startswith("| ") and "`" in line]
        assert rows[:5] == ["| 0 | 95 | 95 | 7 | 0 | 0 | `output_grad` |",
                            "| 100 | 400 | 300 | 7 | 5 | 293 | `state_pass` |",
                            "| 105 | 108 | 3 | 13 | 0 | 3 | `gate` |",
                            "| 110 | 430 | 320 | 13 | 0 | 290 | `wy_backward` |",
                            "| 435 | 535 | 100 | 7 | 5 | 0 | `finish` |"], rows
        assert rows[5:] == ["| 290 | `state_pass` | `wy_backward` |", "| 3 | `gate` | `state_pass` |"], rows

        bad = subprocess.run([sys.executable, SCRIPT, "--compare", a], capture_output=True, text=True)
        assert bad.returncode != 0 and "SIDE=TRACE.json" in bad.stderr, bad
    print("trace_summary: ok")


if __name__ == "__main__":
    main()
