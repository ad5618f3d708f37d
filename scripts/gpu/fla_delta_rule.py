"""flash-linear-attention's chunk_gated_delta_rule (Triton) on the inputs hybrid-bench-delta-rule
dumped: time forward and forward+backward the same two ways (CUDA events, medians: the host
waiting for each call, and the calls queued with the host ahead, as do_bench times), measure its error
against the same float64 reference, and print the side-by-side table with ratios.

FLA refuses its gated backward on Hopper with Triton < 3.7.1 (a miscompile, FLA issue 640); the
guard is bypassed here for timing, as shared/anchors/fla_kernels.py does, and its errors say
whether that backward is right on this machine.
With --profile DIR, also a Kineto trace of three fwd+bwd calls a shape (DIR/fla_trace_<i>.json,
i from 0 in the benchmark's shape order) for trace_summary.py: FLA's GPU time by kernel beside
ours (hybrid-bench-delta-rule --profile), so that each of our kernels can be set against the FLA
kernels doing its part.
usage: fla_delta_rule.py DUMP_DIR OUR_JSON OUT_JSON [--warmup N --reps N] [--profile DIR]"""
import argparse, json, os

import numpy as np
import torch

import fla.ops.common.chunk_o as chunk_o
from fla.ops.gated_delta_rule import chunk_gated_delta_rule

chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only, see above

NAMES = ["o", "final", "dq", "dk", "dv", "dg", "dbeta", "dh0"]


def median_ms(fn, warmup, reps, queued=False):
    """Median ms a call; queued: the calls back to back, the host waiting only at the end
    (hybrid::cli::median_cuda_ms with queued), else waiting for each."""
    for _ in range(warmup):
        fn()
    events = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        if not queued:
            stop.synchronize()
        events.append((start, stop))
    torch.cuda.synchronize()
    times = [start.elapsed_time(stop) for start, stop in events]
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dump")
    ap.add_argument("ours")
    ap.add_argument("out")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--profile", help="folder for a Kineto trace a shape (fla_trace_<i>.json)")
    a = ap.parse_args()
    ours = json.load(open(a.ours))
    results = []
    for i, row in enumerate(ours["shapes"]):
        load = lambda n: torch.from_numpy(np.load(os.path.join(a.dump, f"{i}_{n}.npy"))).cuda()
        q, k, v = (load(n).bfloat16().requires_grad_() for n in ("q", "k", "v"))
        g, beta = load("g").requires_grad_(), load("beta").bfloat16().requires_grad_()
        h0, wo, ws = load("h0").requires_grad_(), load("wo"), load("ws")
        K = q.shape[-1]
        fwd = lambda: chunk_gated_delta_rule(q, k, v, g, beta, scale=K ** -0.5)[0]
        do = wo.bfloat16()
        t_f = median_ms(fwd, a.warmup, a.reps)
        t_fb = median_ms(lambda: fwd().backward(do), a.warmup, a.reps)
        t_fq = median_ms(fwd, a.warmup, a.reps, queued=True)
        t_fbq = median_ms(lambda: fwd().backward(do), a.warmup, a.reps, queued=True)
        if a.profile:  # three steps, as our benchmark's trace holds (trace_summary.py's STEPS)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fwd().backward(do)
                torch.cuda.synchronize()
            prof.export_chrome_trace(os.path.join(a.profile, f"fla_trace_{i}.json"))
        for x in (q, k, v, g, beta, h0):
            x.grad = None
        o, final = chunk_gated_delta_rule(q, k, v, g, beta, scale=K ** -0.5, initial_state=h0, output_final_state=True)
        loss = (o.double() * wo.double()).sum() + (final.double() * ws.double()).sum()
        loss.backward()
        got = [o, final, q.grad, k.grad, v.grad, g.grad, beta.grad, h0.grad]
        errors = {}
        for n, x in zip(NAMES, got):
            ref = load("ref_" + n).double()
            errors[n] = float((x.double() - ref).norm() / ref.norm())
        results.append({"shape": row["shape"], "fwd_ms": t_f, "fwdbwd_ms": t_fb, "fwd_queued_ms": t_fq,
                        "fwdbwd_queued_ms": t_fbq, "errors": errors})
        del q, k, v, g, beta, h0, o, final, got
        torch.cuda.empty_cache()
    json.dump({"fla": results}, open(a.out, "w"), indent=1)

    print(f"\nbf16 matmul ceiling {ours['matmul_bf16_tflops']:.0f} TFLOP/s; times in ms (median of {a.reps}); "
          "ratio = FLA time / ours (above 1: we are faster)")
    print(f"| shape | ours fwd | FLA fwd | ratio | ours fwd+bwd | FLA fwd+bwd | ratio | ours fwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for o_, f_ in zip(ours["shapes"], results):
        print(f"| {o_['shape']} | {o_['fwd_ms']:.3f} | {f_['fwd_ms']:.3f} | {f_['fwd_ms'] / o_['fwd_ms']:.2f} | "
              f"{o_['fwdbwd_ms']:.3f} | {f_['fwdbwd_ms']:.3f} | {f_['fwdbwd_ms'] / o_['fwdbwd_ms']:.2f} | {o_['fwd_tflops']:.1f} |")
    if all("fwd_queued_ms" in o_ for o_ in ours["shapes"]):
        print("\nthe same with the calls queued (the host ahead of the GPU, as in training and in do_bench: "
              "the GPU's time, launch gaps hidden)")
        print("| shape | ours fwd | FLA fwd | ratio | ours fwd+bwd | FLA fwd+bwd | ratio |")
        print("|---|---|---|---|---|---|---|")
        for o_, f_ in zip(ours["shapes"], results):
            print(f"| {o_['shape']} | {o_['fwd_queued_ms']:.3f} | {f_['fwd_queued_ms']:.3f} | "
                  f"{f_['fwd_queued_ms'] / o_['fwd_queued_ms']:.2f} | {o_['fwdbwd_queued_ms']:.3f} | "
                  f"{f_['fwdbwd_queued_ms']:.3f} | {f_['fwdbwd_queued_ms'] / o_['fwdbwd_queued_ms']:.2f} |")
    print("\nrelative RMS error against float64 on identical inputs (ours / FLA)")
    print("| shape | " + " | ".join(NAMES) + " |")
    print("|---|" + "---|" * len(NAMES))
    for o_, f_ in zip(ours["shapes"], results):
        print(f"| {o_['shape']} | " + " | ".join(f"{o_['errors'][n]:.1e} / {f_['errors'][n]:.1e}" for n in NAMES) + " |")


if __name__ == "__main__":
    main()
