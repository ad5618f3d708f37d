#!/usr/bin/env python3
"""What rounding the delta rule's kept intermediates costs the gradients (CPU, float64).

The chunked backward reads six tensors that the state passes keep: the forward's h (S0, the state
entering each chunk), W = V - diag(gamma) K S0 and V' = T W; the reverse's dS_C (the gradient of the
state leaving each chunk), dV' and dW. Each is read by the finish kernel or wy_backward as an
operand of a product whose gradient goes to q, k, v, g or beta; the passes themselves carry the
state in float32. This script runs the chunked algorithm (the formulas at the top of
src/ops/delta_rule_chunked.cpp) in float64 under autograd, with each kept tensor rounded only where
a reader of the kept copy uses it (a product's value is exact; its gradient towards the other
operand sees the rounded copy), and prints each gradient's relative error (Frobenius, as
hybrid-bench-delta-rule) against the unrounded float64 gradients. It measures the error a storage
format adds, not the kernels' other roundings (TF32 products elsewhere, bf16 outputs); added to
today's errors roughly in quadrature. A seventh, `add` = s QKG^T dO (the reverse pass's input,
which output_grad stores), is rounded where it enters the reverse pass: the gradient V' gets
through o's intra-chunk product.

Usage: scripts/kept_precision.py [--tokens 2048] [--heads 4] [--k 128] [--v 128]
Rounding modes: tf32 (the 13 low mantissa bits of float32 dropped, as wgmma's TF32 operands) and
bf16 (round to nearest).
"""
import argparse

import torch

KEPT = ("h", "W", "vnew", "dS", "dvnew", "dW", "add")


def round_to(x, mode):
    if mode is None:
        return x
    if mode == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    if mode == "tf32":
        bits = x.to(torch.float32).view(torch.int32) & ~0x1FFF
        return bits.view(torch.float32).to(x.dtype)
    raise ValueError(mode)


class RoundGradient(torch.autograd.Function):
    """Identity forward; the gradient rounded on its way back (a kept gradient's stored copy)."""

    @staticmethod
    def forward(ctx, x, mode):
        ctx.mode = mode
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return round_to(grad, ctx.mode), None


def kept_product(a, b, kept_b, grad_mode=None):
    """a @ b with its exact value, where the gradient towards a sees kept_b (b's stored copy)
    and, with grad_mode, the gradient arriving at the product is rounded on the way to a (the
    kept copy of that gradient); the gradient towards b is exact (the passes form it)."""
    towards_a = RoundGradient.apply(a @ kept_b.detach(), grad_mode)
    towards_b = a.detach() @ b
    return towards_a + towards_b - (a @ b).detach()


def forward(q, k, v, g, beta, h0, modes, C=64):
    """o and the final state of the chunked gated delta rule, [H, T, .] inputs, one sequence."""
    H, T, K = k.shape
    s = K ** -0.5
    S = h0
    outs = []
    for c0 in range(0, T, C):
        Q, Kc, V = q[:, c0:c0 + C], k[:, c0:c0 + C], v[:, c0:c0 + C]
        gc = torch.cumsum(g[:, c0:c0 + C], -1)
        gamma = torch.exp(gc)
        gamma_C = gamma[:, -1:]
        eta = gamma_C / gamma
        Gamma = torch.tril(torch.exp(gc[:, :, None] - gc[:, None, :]))
        b = beta[:, c0:c0 + C]
        KKG = (Kc @ Kc.transpose(-1, -2)) * Gamma
        Lg = torch.tril(b[:, :, None] * KKG, -1)
        Ag = torch.linalg.inv(torch.eye(C, dtype=q.dtype) + Lg)
        Tm = Ag * b[:, None, :]
        h = round_to(S, modes["h"])
        # W = V - diag(gamma) K S0: its gradient is dW (kept), which meets S0 (kept) towards K, gamma.
        GK = gamma[:, :, None] * Kc
        W = RoundGradient.apply(V, modes["dW"]) - kept_product(GK, S, h, modes["dW"])
        Wk = round_to(W, modes["W"])
        # V' = T W: dV' (kept) meets W (kept) towards T.
        vnew = kept_product(Tm, W, Wk, modes["dvnew"])
        vk = round_to(vnew, modes["vnew"])
        # O = s (diag(gamma) Q S0 + (Q K^T * Gamma) V'): dO is exact (the tokens' gradient).
        GQ = gamma[:, :, None] * Q
        QKG = (Q @ Kc.transpose(-1, -2)) * Gamma
        # The reverse pass's `add` = s QKG^T dO (output_grad forms and stores it): the gradient
        # V' gets through this product, rounded where add is stored.
        outs.append(s * (kept_product(GQ, S, h) + kept_product(QKG, RoundGradient.apply(vnew, modes["add"]), vk)))
        # S_C = gamma_C S0 + K^T diag(eta) V': dS_C (kept) meets S0 and V' (kept) towards the gates, K.
        EK = (eta[:, :, None] * Kc).transpose(-1, -2)
        decay = kept_product(gamma_C[:, :, None], S.reshape(H, 1, -1), h.reshape(H, 1, -1), modes["dS"])
        S = decay.reshape(S.shape) + kept_product(EK, vnew, vk, modes["dS"])
    return torch.cat(outs, 1), S


def inputs(T, H, K, V, seed=0):
    torch.manual_seed(seed)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    bf = lambda x: x.to(torch.bfloat16).double()
    q, k = bf(unit(torch.randn(H, T, K))), bf(unit(torch.randn(H, T, K)))
    v = bf(torch.randn(H, T, V))
    g = torch.nn.functional.logsigmoid(torch.randn(H, T)).double()
    beta = bf(torch.rand(H, T) * 1.98 + 0.01)
    h0 = torch.randn(H, K, V, dtype=torch.float64) * 0.5
    wo, ws = torch.randn(H, T, V, dtype=torch.float64), torch.randn(H, K, V, dtype=torch.float64)
    return (q, k, v, g, beta, h0), (wo, ws)


def gradients(leaves, weights, modes):
    leaves = [x.clone().requires_grad_(True) for x in leaves]
    o, final = forward(*leaves, modes)
    loss = (o * weights[0]).sum() + (final * weights[1]).sum()
    return torch.autograd.grad(loss, leaves)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--v", type=int, default=128)
    args = parser.parse_args()
    leaves, weights = inputs(args.tokens, args.heads, args.k, args.v)
    none = dict.fromkeys(KEPT)
    exact = gradients(leaves, weights, none)
    # The unrounded run through the kept-copy plumbing against plain autograd: the plumbing is exact.
    plain = [x.clone().requires_grad_(True) for x in leaves]
    o, final = forward(*plain, none)
    reference = torch.autograd.grad((o * weights[0]).sum() + (final * weights[1]).sum(), plain)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(exact, reference))
    tf32 = {**dict.fromkeys(KEPT, "tf32"), "add": None}  # add: float32 today
    cases = {
        "all kept in TF32 (today's operands)": tf32,
        "h, dS_C in bf16": {**tf32, "h": "bf16", "dS": "bf16"},
        "W, V' in bf16": {**tf32, "W": "bf16", "vnew": "bf16"},
        "dV', dW in bf16": {**tf32, "dvnew": "bf16", "dW": "bf16"},
        "h, dS_C, W, V' in bf16": {**tf32, "h": "bf16", "dS": "bf16", "W": "bf16", "vnew": "bf16"},
        "all six in bf16": {**dict.fromkeys(KEPT, "bf16"), "add": None},
        "all six and add in bf16": dict.fromkeys(KEPT, "bf16"),
        "add alone in bf16": {**dict.fromkeys(KEPT), "add": "bf16"},
    }
    names = ("dq", "dk", "dv", "dg", "dbeta", "dh0")
    print(f"T {args.tokens} H {args.heads} K {args.k} V {args.v}: relative error each rounding adds")
    print("| kept tensors | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, modes in cases.items():
        grads = gradients(leaves, weights, modes)
        errors = [((a - b).norm() / b.norm()).item() for a, b in zip(grads, exact)]
        print(f"| {label} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")


if __name__ == "__main__":
    main()
