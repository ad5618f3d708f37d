// See delta_gates.h. The CPU loop and the autograd function; the CUDA kernels in
// kernels/delta_gates.cu run the same per-element math (delta_gates_math.h).
#include "delta_gates.h"

#include <ATen/Dispatch.h>
#include <torch/csrc/autograd/custom_function.h>

#include <vector>

namespace hybrid::ops::detail {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Each head's A_log and dt_bias in S (exp(A_log) as the decay; 0 bias without dt_bias).
template <class S>
std::pair<std::vector<S>, std::vector<S>> head_terms(const GateProblem& p, const at::Tensor& A_log,
                                                     const at::Tensor& dt_bias) {
  std::vector<S> decay(p.H, S(0)), bias(p.H, S(0));
  if (A_log.defined()) {
    const at::Tensor a = A_log.detach().to(at::kCPU, at::CppTypeToScalarType<S>::value).contiguous();
    for (int64_t h = 0; h < p.H; ++h) decay[h] = std::exp(a.data_ptr<S>()[h]);
  }
  if (dt_bias.defined()) {
    const at::Tensor d = dt_bias.detach().to(at::kCPU, at::CppTypeToScalarType<S>::value).contiguous();
    for (int64_t h = 0; h < p.H; ++h) bias[h] = d.data_ptr<S>()[h];
  }
  return {decay, bias};
}

// f(h, position in the layout, token) for every row of the layout that holds a token.
template <class F>
void for_each_token_row(const GateProblem& p, F&& f) {
  const at::Tensor gather = p.gather.defined() ? p.gather.to(at::kCPU).contiguous() : at::Tensor();
  const int64_t* map = gather.defined() ? gather.data_ptr<int64_t>() : nullptr;
  for (int64_t c = 0; c < p.NC; ++c)
    for (int64_t r = 0; r < p.C; ++r) {
      const int64_t token = token_of_row(c, r, p.C, p.T, p.chunks_a_row, map, p.B * p.T);
      if (token < 0) continue;
      for (int64_t h = 0; h < p.H; ++h) f(h, (h * p.NC + c) * p.C + r, token);
    }
}

// A [B, T, H] input's element (token, h) through its strides, in S.
template <class S>
struct TokenHeads {
  at::Tensor x;  // in S, on the CPU
  S operator()(int64_t token, int64_t h, int64_t T) const {
    return x.data_ptr<S>()[token_head_offset(x.strides().data(), token, T, h)];
  }
};

template <class S>
void forward_cpu(const GateProblem& p, const at::Tensor& g, const at::Tensor& beta, const at::Tensor& A_log,
                 const at::Tensor& dt_bias, at::Tensor& g_out, at::Tensor& beta_out) {
  const auto [decay, bias] = head_terms<S>(p, A_log, dt_bias);
  const TokenHeads<S> a{g.to(at::CppTypeToScalarType<S>::value)}, b{beta.to(at::CppTypeToScalarType<S>::value)};
  S *go = g_out.data_ptr<S>(), *bo = beta_out.data_ptr<S>();
  const S scale = static_cast<S>(p.options.beta_scale);
  for_each_token_row(p, [&](int64_t h, int64_t at, int64_t token) {
    go[at] = gate_of(a(token, h, p.T), bias[h], decay[h], p.options.log_gate);
    bo[at] = beta_of(b(token, h, p.T), scale, p.options.from_logit);
  });
}

template <class S>
void backward_cpu(const GateProblem& p, const at::Tensor& g, const at::Tensor& beta, const at::Tensor& A_log,
                  const at::Tensor& dt_bias, const at::Tensor& dg, const at::Tensor& dbeta, at::Tensor& dg_in,
                  at::Tensor& dbeta_in, at::Tensor& dA_log, at::Tensor& ddt_bias) {
  const auto [decay, bias] = head_terms<S>(p, A_log, dt_bias);
  const TokenHeads<S> a{g.to(at::CppTypeToScalarType<S>::value)}, b{beta.to(at::CppTypeToScalarType<S>::value)};
  const at::Tensor dgc = dg.contiguous(), dbc = dbeta.contiguous();
  const S *dgo = dgc.data_ptr<S>(), *dbo = dbc.data_ptr<S>();
  // The inputs' gradients in S with the inputs' own strides' order: [B, T, H] contiguous.
  at::Tensor da = at::zeros({p.B, p.T, p.H}, dgc.options()), db = at::zeros({p.B, p.T, p.H}, dgc.options());
  std::vector<S> sum_decay(p.H, S(0)), sum_bias(p.H, S(0));
  const S scale = static_cast<S>(p.options.beta_scale);
  for_each_token_row(p, [&](int64_t h, int64_t at, int64_t token) {
    const S x = a(token, h, p.T), d = gate_input_grad(dgo[at], x, bias[h], decay[h], p.options.log_gate);
    da.data_ptr<S>()[token * p.H + h] = d;
    db.data_ptr<S>()[token * p.H + h] = beta_input_grad(dbo[at], b(token, h, p.T), scale, p.options.from_logit);
    if (p.options.log_gate) {
      sum_decay[h] += dgo[at] * gate_of(x, bias[h], decay[h], true);
      sum_bias[h] += d;
    }
  });
  dg_in = da.to(g.scalar_type()), dbeta_in = db.to(beta.scalar_type());
  if (A_log.defined()) dA_log = at::tensor(std::vector<S>(sum_decay)).to(A_log.options());
  if (dt_bias.defined()) ddt_bias = at::tensor(std::vector<S>(sum_bias)).to(dt_bias.options());
}

void save(AutogradContext* ctx, const GateProblem& p) {
  ctx->saved_data["sizes"] = std::vector<int64_t>{p.B, p.T, p.H, p.NC, p.C, p.chunks_a_row};
  if (p.gather.defined()) ctx->saved_data["gather"] = p.gather;
  ctx->saved_data["compute"] = p.compute;
  ctx->saved_data["flags"] = std::vector<int64_t>{p.options.log_gate, p.options.dt_bias, p.options.from_logit};
  ctx->saved_data["beta_scale"] = p.options.beta_scale;
}
GateProblem saved_problem(AutogradContext* ctx) {
  GateProblem p;
  const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector(), flags = ctx->saved_data["flags"].toIntVector();
  p.B = sizes[0], p.T = sizes[1], p.H = sizes[2], p.NC = sizes[3], p.C = sizes[4], p.chunks_a_row = sizes[5];
  if (ctx->saved_data.count("gather")) p.gather = ctx->saved_data["gather"].toTensor();
  p.compute = ctx->saved_data["compute"].toScalarType();
  p.options = GateOptions{flags[0] != 0, flags[1] != 0, flags[2] != 0, ctx->saved_data["beta_scale"].toDouble()};
  return p;
}

// params: {} or {A_log} or {A_log, dt_bias} (autograd functions take no undefined tensor).
struct GatesInChunks : torch::autograd::Function<GatesInChunks> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& beta,
                               at::TensorList params, GateProblem p) {
    const at::Tensor A_log = params.size() > 0 ? params[0] : at::Tensor(),
                     dt_bias = params.size() > 1 ? params[1] : at::Tensor();
    const auto options = g.options().dtype(p.compute);
    // Padding rows are zeros (inert: no decay, no update): the CUDA kernel writes them with the
    // others (no fill launched before it), the CPU loop visits only the rows that hold tokens.
#ifdef HYBRID_CUDA_KERNELS
    const bool on_kernel = g.is_cuda();
#else
    const bool on_kernel = false;
#endif
    const auto rows = [&] {
      return on_kernel ? at::empty({p.H, p.NC, p.C}, options) : at::zeros({p.H, p.NC, p.C}, options);
    };
    at::Tensor g_out = rows(), beta_out = rows();
#ifdef HYBRID_CUDA_KERNELS
    if (on_kernel) gates_forward_cuda(p, g, beta, A_log, dt_bias, g_out, beta_out);
    else
#endif
      AT_DISPATCH_FLOATING_TYPES(p.compute, "gates_in_chunks", [&] {
        forward_cpu<scalar_t>(p, g, beta, A_log, dt_bias, g_out, beta_out);
      });
    ctx->save_for_backward({g, beta, A_log, dt_bias});
    save(ctx, p);
    return {g_out, beta_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &g = saved[0], &beta = saved[1], &A_log = saved[2], &dt_bias = saved[3];
    const GateProblem p = saved_problem(ctx);
    const auto options = g.options().dtype(p.compute);
    const at::Tensor dg = grads[0].defined() ? grads[0] : at::zeros({p.H, p.NC, p.C}, options),
                     dbeta = grads[1].defined() ? grads[1] : at::zeros({p.H, p.NC, p.C}, options);
    at::Tensor dg_in, dbeta_in, dA_log, ddt_bias;
#ifdef HYBRID_CUDA_KERNELS
    if (g.is_cuda())
      gates_backward_cuda(p, g, beta, A_log, dt_bias, dg, dbeta, dg_in, dbeta_in, dA_log, ddt_bias);
    else
#endif
      AT_DISPATCH_FLOATING_TYPES(p.compute, "gates_in_chunks_backward", [&] {
        backward_cpu<scalar_t>(p, g, beta, A_log, dt_bias, dg, dbeta, dg_in, dbeta_in, dA_log, ddt_bias);
      });
    variable_list out{dg_in, dbeta_in};
    if (A_log.defined()) out.push_back(dA_log);
    if (dt_bias.defined()) out.push_back(ddt_bias);
    out.push_back(at::Tensor());  // the problem
    return out;
  }
};

}  // namespace

std::pair<at::Tensor, at::Tensor> gates_in_chunks(const at::Tensor& g, const at::Tensor& beta,
                                                  const DeltaRuleArgs& args, const ChunkLayout& lay,
                                                  at::ScalarType compute) {
  GateProblem p;
  p.B = lay.B, p.T = lay.T, p.H = g.size(2), p.NC = lay.n_chunks, p.C = kChunk;
  p.chunks_a_row = lay.rows ? lay.n_chunks / lay.B : 0;
  p.gather = lay.rows ? at::Tensor() : lay.gather;
  p.compute = compute;
  p.options.log_gate = args.A_log.has_value();
  p.options.dt_bias = args.A_log.has_value() && args.dt_bias.has_value();
  p.options.from_logit = args.beta_from_logit;
  p.options.beta_scale = args.beta_from_logit && args.allow_neg_eigval ? 2.0 : 1.0;
  std::vector<at::Tensor> params;
  if (p.options.log_gate) params.push_back(*args.A_log);
  if (p.options.dt_bias) params.push_back(*args.dt_bias);
  const variable_list out = GatesInChunks::apply(g, beta, at::TensorList(params), p);
  return {out[0], out[1]};
}

}  // namespace hybrid::ops::detail
