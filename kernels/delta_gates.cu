// The log-gates and betas into the chunk layout (src/ops/delta_gates.h), forward and backward, the
// per-element math of delta_gates_math.h:
//   forward   g[h, c, r] = -exp(A_log[h]) softplus(a[token, h] + dt_bias[h]),  beta = s sigmoid(b)
//   backward  da = dg d g/da, db = dbeta s sigmoid'(b); dA_log[h] = sum dg g, ddt_bias[h] = sum da
// for the token each layout row (c, r) holds (padding rows: g = beta = 0). One thread a row and head:
// blocks of 256 rows of the layout for one head (blockIdx.y), so each block's sums for
// A_log's and dt_bias's gradients are one head's, written as partials [H, blocks] and summed on
// the host in a fixed order (no atomics: the same bits every run).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../src/ops/delta_gates.h"
#include "reductions.cuh"

namespace hybrid::ops::detail {
namespace {

constexpr int kGateThreads = 256;

struct GateArgs {
  int64_t T, rows, C, chunks_a_row, tokens;  // rows: NC C, the layout's rows a head
  const int64_t* gather;
  int64_t a_strides[3], b_strides[3];  // [B, T, H]
  GateOptions options;
};

template <class In, class S>
__global__ void __launch_bounds__(kGateThreads) gates_forward_kernel(GateArgs args, const In* a, const In* b,
                                                                     const S* A_log, const S* dt_bias, S* g_out,
                                                                     S* beta_out) {
  const int h = blockIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGateThreads + threadIdx.x;
  if (row >= args.rows) return;
  const int64_t token = token_of_row(row / args.C, row % args.C, args.C, args.T, args.chunks_a_row, args.gather,
                                     args.tokens);
  const int64_t at = h * args.rows + row;
  if (token < 0) {  // padding: zeros, inert (the outputs are not zero-filled beforehand)
    g_out[at] = S(0), beta_out[at] = S(0);
    return;
  }
  const S decay = args.options.log_gate ? exp(A_log[h]) : S(0), bias = args.options.dt_bias ? dt_bias[h] : S(0);
  g_out[at] = gate_of(static_cast<S>(a[token_head_offset(args.a_strides, token, args.T, h)]), bias, decay,
                      args.options.log_gate);
  beta_out[at] = beta_of(static_cast<S>(b[token_head_offset(args.b_strides, token, args.T, h)]),
                         static_cast<S>(args.options.beta_scale), args.options.from_logit);
}

// da, db into [B, T, H] contiguous; partial sums of dg g and da a block into partials[h, block].
template <class In, class S>
__global__ void __launch_bounds__(kGateThreads) gates_backward_kernel(GateArgs args, const In* a, const In* b,
                                                                      const S* A_log, const S* dt_bias, const S* dg,
                                                                      const S* dbeta, In* da, In* db, S* partial_decay,
                                                                      S* partial_bias) {
  const int h = blockIdx.y, H = gridDim.y;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGateThreads + threadIdx.x;
  const int64_t token = row < args.rows ? token_of_row(row / args.C, row % args.C, args.C, args.T, args.chunks_a_row,
                                                        args.gather, args.tokens)
                                        : -1;
  S sum_decay = 0, sum_bias = 0;
  if (token >= 0) {
    const S decay = args.options.log_gate ? exp(A_log[h]) : S(0), bias = args.options.dt_bias ? dt_bias[h] : S(0);
    const int64_t at = h * args.rows + row;
    const S x = static_cast<S>(a[token_head_offset(args.a_strides, token, args.T, h)]);
    const S d = gate_input_grad(dg[at], x, bias, decay, args.options.log_gate);
    da[token * H + h] = static_cast<In>(d);
    const S y = static_cast<S>(b[token_head_offset(args.b_strides, token, args.T, h)]);
    const S scale = static_cast<S>(args.options.beta_scale);
    db[token * H + h] = static_cast<In>(beta_input_grad(dbeta[at], y, scale, args.options.from_logit));
    if (args.options.log_gate) {
      sum_decay = dg[at] * gate_of(x, bias, decay, true);
      sum_bias = d;
    }
  }
  if (!args.options.log_gate) return;  // the same for the whole block
  __shared__ S scratch[kGateThreads / 32];
  sum_decay = block_sum(sum_decay, scratch);
  sum_bias = block_sum(sum_bias, scratch);
  if (threadIdx.x == 0) {
    partial_decay[h * gridDim.x + blockIdx.x] = sum_decay;
    partial_bias[h * gridDim.x + blockIdx.x] = sum_bias;
  }
}

GateArgs gate_args(const GateProblem& p, const at::Tensor& g, const at::Tensor& beta) {
  GateArgs args{p.T, p.NC * p.C, p.C, p.chunks_a_row, p.B * p.T,
                p.gather.defined() ? p.gather.data_ptr<int64_t>() : nullptr, {}, {}, p.options};
  for (int d = 0; d < 3; ++d) args.a_strides[d] = g.stride(d), args.b_strides[d] = beta.stride(d);
  return args;
}

dim3 gate_grid(const GateProblem& p) {
  return dim3(static_cast<unsigned>((p.NC * p.C + kGateThreads - 1) / kGateThreads), static_cast<unsigned>(p.H));
}

template <class S>
const S* data_or_null(const at::Tensor& x) { return x.defined() ? x.data_ptr<S>() : nullptr; }

at::Tensor in_compute(const at::Tensor& x, at::ScalarType compute) {
  return x.defined() ? x.to(compute).contiguous() : at::Tensor();
}

}  // namespace

// The inputs bf16, half, float32 or float64 (b cast to a's dtype where they differ), A_log and
// dt_bias any floating dtype, all computed in p.compute (float32, or float64 for the references).
void gates_forward_cuda(const GateProblem& p, const at::Tensor& g, const at::Tensor& beta, const at::Tensor& A_log,
                        const at::Tensor& dt_bias, at::Tensor& g_out, at::Tensor& beta_out) {
  const c10::cuda::CUDAGuard guard(g.device());
  const at::Tensor b = beta.scalar_type() == g.scalar_type() ? beta : beta.to(g.scalar_type());
  const at::Tensor decay = in_compute(A_log, p.compute), bias = in_compute(dt_bias, p.compute);
  if (p.NC == 0) return;
  AT_DISPATCH_FLOATING_TYPES(p.compute, "gates_forward_cuda", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gates_forward_cuda", [&] {
      gates_forward_kernel<scalar_t, S><<<gate_grid(p), kGateThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          gate_args(p, g, b), g.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), data_or_null<S>(decay),
          data_or_null<S>(bias), g_out.data_ptr<S>(), beta_out.data_ptr<S>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gates_backward_cuda(const GateProblem& p, const at::Tensor& g, const at::Tensor& beta, const at::Tensor& A_log,
                         const at::Tensor& dt_bias, const at::Tensor& dg, const at::Tensor& dbeta, at::Tensor& dg_in,
                         at::Tensor& dbeta_in, at::Tensor& dA_log, at::Tensor& ddt_bias) {
  const c10::cuda::CUDAGuard guard(g.device());
  const at::Tensor b = beta.scalar_type() == g.scalar_type() ? beta : beta.to(g.scalar_type());
  const at::Tensor decay = in_compute(A_log, p.compute), bias = in_compute(dt_bias, p.compute);
  const at::Tensor dgc = dg.contiguous(), dbc = dbeta.contiguous();
  // Every token is some row's: the gradients need no zero fill.
  at::Tensor da = at::empty({p.B, p.T, p.H}, g.options()), db = at::empty({p.B, p.T, p.H}, g.options());
  const dim3 grid = gate_grid(p);
  const auto partials = g.options().dtype(p.compute);
  at::Tensor partial_decay = at::empty({p.H, grid.x}, partials), partial_bias = at::empty({p.H, grid.x}, partials);
  if (p.NC > 0) {
    AT_DISPATCH_FLOATING_TYPES(p.compute, "gates_backward_cuda", [&] {
      using S = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gates_backward_cuda", [&] {
        gates_backward_kernel<scalar_t, S><<<grid, kGateThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            gate_args(p, g, b), g.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), data_or_null<S>(decay),
            data_or_null<S>(bias), dgc.data_ptr<S>(), dbc.data_ptr<S>(), da.data_ptr<scalar_t>(),
            db.data_ptr<scalar_t>(), partial_decay.data_ptr<S>(), partial_bias.data_ptr<S>());
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  dg_in = da, dbeta_in = b.scalar_type() == beta.scalar_type() ? db : db.to(beta.scalar_type());
  if (A_log.defined()) dA_log = partial_decay.sum(1).to(A_log.scalar_type());
  if (dt_bias.defined()) ddt_bias = partial_bias.sum(1).to(dt_bias.scalar_type());
}

}  // namespace hybrid::ops::detail
