// The chunked delta rule against the token-by-token recurrence, in float64: outputs, final
// states and every gradient, over the shapes and regimes that break chunked algorithms.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>

#include "hybrid/ops/delta_rule.h"

namespace {
using hybrid::ops::DeltaRuleArgs;
using hybrid::ops::DeltaRuleOutput;

struct Inputs {
  at::Tensor q, k, v, g, beta, h0;
  std::vector<at::Tensor> all() const { return {q, k, v, g, beta, h0}; }
};

// Random inputs as the GDN layer produces them: unit-norm q and k, beta in (0, 2),
// log-gates in [g_lo, g_hi] (<= 0).
Inputs make_inputs(int64_t B, int64_t T, int64_t Hk, int64_t Hv, int64_t K, int64_t V, double g_lo, double g_hi,
                   int64_t n_states = -1, uint64_t seed = 0) {
  at::manual_seed(seed);
  auto opt = at::TensorOptions().dtype(at::kDouble);
  auto unit = [&](at::Tensor x) { return x / x.norm(2, -1, true); };
  Inputs in;
  in.q = unit(at::randn({B, T, Hk, K}, opt));
  in.k = unit(at::randn({B, T, Hk, K}, opt));
  in.v = at::randn({B, T, Hv, V}, opt);
  in.g = at::rand({B, T, Hv}, opt) * (g_hi - g_lo) + g_lo;
  in.beta = at::rand({B, T, Hv}, opt) * 1.98 + 0.01;
  in.h0 = at::randn({n_states < 0 ? B : n_states, Hv, K, V}, opt) * 0.5;
  for (auto* t : {&in.q, &in.k, &in.v, &in.g, &in.beta, &in.h0}) t->requires_grad_(true);
  return in;
}

DeltaRuleOutput run(bool chunked, const Inputs& in, std::optional<at::Tensor> cu = std::nullopt, bool keep = true) {
  DeltaRuleArgs args;
  args.keep_intermediates = keep;
  args.initial_state = in.h0;
  args.output_final_state = true;
  args.cu_seqlens = cu;
  auto f = chunked ? hybrid::ops::chunk_gated_delta_rule : hybrid::ops::recurrent_gated_delta_rule;
  return f(in.q, in.k, in.v, in.g, in.beta, args);
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return ((a - b).norm() / (b.norm() + 1e-30)).item<double>();
}

// A fixed random projection of both outputs: its gradients exercise every path.
at::Tensor loss_of(const DeltaRuleOutput& out) {
  at::manual_seed(99);
  auto wo = at::randn(out.o.sizes(), out.o.options().requires_grad(false));
  auto ws = at::randn(out.final_state.sizes(), out.final_state.options().requires_grad(false));
  return (out.o * wo).sum() + (out.final_state * ws).sum();
}

std::vector<at::Tensor> grads(const DeltaRuleOutput& out, const Inputs& in) {
  return torch::autograd::grad({loss_of(out)}, in.all());
}

void expect_same(const Inputs& in, double tol, std::optional<at::Tensor> cu = std::nullopt) {
  auto ref = run(false, in, cu), got = run(true, in, cu);
  EXPECT_LT(rel_err(got.o, ref.o), tol);
  EXPECT_LT(rel_err(got.final_state, ref.final_state), tol);
  auto gr = grads(ref, in), gg = grads(got, in);
  const char* names[] = {"dq", "dk", "dv", "dg", "dbeta", "dh0"};
  for (size_t i = 0; i < gr.size(); ++i) EXPECT_LT(rel_err(gg[i], gr[i]), tol) << names[i];
}

struct Shape { int64_t B, T, Hk, Hv, K, V; double g_lo, g_hi; };

class ChunkedVsRecurrent : public ::testing::TestWithParam<Shape> {};

TEST_P(ChunkedVsRecurrent, OutputsStatesAndGradientsAgree) {
  const Shape s = GetParam();
  expect_same(make_inputs(s.B, s.T, s.Hk, s.Hv, s.K, s.V, s.g_lo, s.g_hi), 1e-10);
}

INSTANTIATE_TEST_SUITE_P(Shapes, ChunkedVsRecurrent, ::testing::Values(
    Shape{1, 1, 1, 1, 8, 8, -0.5, 0},        // a single token
    Shape{2, 63, 2, 2, 16, 24, -0.5, 0},     // one short chunk, K != V
    Shape{1, 64, 1, 1, 8, 16, -0.5, 0},      // exactly one chunk
    Shape{2, 130, 2, 4, 8, 12, -0.5, 0},     // T not a multiple of 64, GVA
    Shape{1, 200, 1, 3, 12, 8, -1e-4, 0},    // gates near 0: almost no decay
    Shape{1, 150, 2, 2, 8, 8, -20, -5}),     // very negative gates: the state forgets at once
    [](const ::testing::TestParamInfo<Shape>& p) {
      const Shape& s = p.param;
      return "B" + std::to_string(s.B) + "T" + std::to_string(s.T) + "Hk" + std::to_string(s.Hk) + "Hv" +
             std::to_string(s.Hv) + "K" + std::to_string(s.K) + "V" + std::to_string(s.V) + "_" + std::to_string(p.index);
    });

TEST(DeltaRule, VarlenEqualsSeparateSequences) {
  const std::vector<int64_t> lens = {5, 64, 1, 90, 33};
  int64_t T = 0;
  for (auto l : lens) T += l;
  auto in = make_inputs(1, T, 2, 2, 8, 16, -0.7, 0, lens.size(), 3);
  std::vector<int64_t> offsets = {0};
  for (auto l : lens) offsets.push_back(offsets.back() + l);
  auto cu = at::tensor(offsets, at::kLong);
  auto packed = run(true, in, cu);
  expect_same(in, 1e-10, cu);
  for (size_t n = 0; n < lens.size(); ++n) {
    Inputs one;
    auto part = [&](const at::Tensor& x) { return x.narrow(1, offsets[n], lens[n]); };
    one.q = part(in.q), one.k = part(in.k), one.v = part(in.v), one.g = part(in.g), one.beta = part(in.beta);
    one.h0 = in.h0.narrow(0, n, 1);
    auto alone = run(true, one);
    EXPECT_LT(rel_err(packed.o.narrow(1, offsets[n], lens[n]), alone.o), 1e-12) << "document " << n;
    EXPECT_LT(rel_err(packed.final_state.narrow(0, n, 1), alone.final_state), 1e-12) << "document " << n;
  }
}

// Kept and recomputed intermediates are the same numbers: the backward must not tell them apart.
TEST(DeltaRule, KeptAndRecomputedIntermediatesGiveTheSameGradients) {
  auto in = make_inputs(1, 200, 1, 2, 8, 16, -0.7, 0, 3, 4);
  // Documents first (three states), then one row (one state).
  for (auto cu : {std::optional<at::Tensor>{at::tensor({0, 70, 71, 200}, at::kLong)}, std::optional<at::Tensor>{}}) {
    if (!cu) in.h0 = in.h0.narrow(0, 0, 1).detach().requires_grad_(true);
    auto kept = run(true, in, cu, true), recomputed = run(true, in, cu, false);
    EXPECT_TRUE(at::equal(kept.o, recomputed.o));
    auto gk = grads(kept, in), gr = grads(recomputed, in);
    for (size_t i = 0; i < gk.size(); ++i) EXPECT_TRUE(at::equal(gk[i], gr[i])) << "gradient " << i;
  }
  // A loss of the final state alone: no gradient reaches o.
  for (bool keep : {true, false}) {
    auto out = run(true, in, std::nullopt, keep);
    auto from_state = torch::autograd::grad({out.final_state.sum()}, in.all(), {}, std::nullopt, false, true);
    auto ref = torch::autograd::grad({run(false, in).final_state.sum()}, in.all(), {}, std::nullopt, false, true);
    for (size_t i = 0; i < ref.size(); ++i) {
      if (!ref[i].defined()) {  // q: the final state does not depend on it
        EXPECT_TRUE(!from_state[i].defined() || from_state[i].abs().max().item<double>() == 0) << "gradient " << i;
        continue;
      }
      EXPECT_LT(rel_err(from_state[i], ref[i]), 1e-10) << "gradient " << i;
    }
  }
}

// output_dtype float32 from bf16 v is the op on v cast to float32 first (what the GDN layer did
// before), to the bit; v's gradient is then that one rounded to bf16.
TEST(DeltaRule, Float32OutputFromBf16ValuesEqualsCastingFirst) {
  auto in = make_inputs(1, 100, 1, 1, 8, 16, -0.5, 0, -1, 6);
  auto low = [](const at::Tensor& x) { return x.detach().to(at::kBFloat16).requires_grad_(true); };
  const at::Tensor q = low(in.q), k = low(in.k), v = low(in.v), g = in.g.detach().to(at::kFloat),
                   beta = in.beta.detach().to(at::kFloat), v32 = v.detach().to(at::kFloat).requires_grad_(true);
  for (auto op : {hybrid::ops::chunk_gated_delta_rule, hybrid::ops::recurrent_gated_delta_rule}) {
    DeltaRuleArgs args;
    at::Tensor cast_first = op(q, k, v32, g, beta, args).o;
    args.output_dtype = at::kFloat;
    at::Tensor direct = op(q, k, v, g, beta, args).o;
    EXPECT_EQ(direct.scalar_type(), at::kFloat);
    EXPECT_TRUE(at::equal(direct, cast_first));
    const at::Tensor w = at::randn_like(direct);
    const at::Tensor dv = torch::autograd::grad({(direct * w).sum()}, {v})[0];
    const at::Tensor dv32 = torch::autograd::grad({(cast_first * w).sum()}, {v32})[0];
    EXPECT_TRUE(at::equal(dv, dv32.to(at::kBFloat16)));
  }
}

TEST(DeltaRule, StateCarriedAcrossHalvesEqualsTheWhole) {
  auto in = make_inputs(2, 150, 1, 2, 8, 8, -0.3, 0, -1, 5);
  auto whole = run(true, in);
  Inputs a = in, b = in;
  for (auto [half, start, len] : {std::tuple{&a, 0, 77}, std::tuple{&b, 77, 73}}) {
    half->q = in.q.narrow(1, start, len), half->k = in.k.narrow(1, start, len), half->v = in.v.narrow(1, start, len);
    half->g = in.g.narrow(1, start, len), half->beta = in.beta.narrow(1, start, len);
  }
  auto first = run(true, a);
  b.h0 = first.final_state;
  auto second = run(true, b);
  EXPECT_LT(rel_err(at::cat({first.o, second.o}, 1), whole.o), 1e-12);
  EXPECT_LT(rel_err(second.final_state, whole.final_state), 1e-12);
}

TEST(DeltaRule, GradientsMatchFiniteDifferences) {
  auto in = make_inputs(1, 70, 1, 2, 4, 6, -0.8, -0.01, -1, 11);
  auto analytic = grads(run(true, in), in);
  const double eps = 1e-6;
  auto inputs = in.all();
  for (size_t i = 0; i < inputs.size(); ++i) {
    at::Tensor flat = inputs[i].detach().view(-1);
    for (int64_t idx : {int64_t{0}, flat.numel() / 2, flat.numel() - 1}) {
      at::NoGradGuard no_grad;
      double orig = flat[idx].item<double>();
      flat[idx] = orig + eps;
      double up = loss_of(run(true, in)).item<double>();
      flat[idx] = orig - eps;
      double down = loss_of(run(true, in)).item<double>();
      flat[idx] = orig;
      double numeric = (up - down) / (2 * eps);
      double a = analytic[i].reshape(-1)[idx].item<double>();
      EXPECT_NEAR(a, numeric, 1e-6 * std::max(1.0, std::abs(numeric))) << "input " << i << " index " << idx;
    }
  }
}

TEST(DeltaRule, Float32StaysCloseToFloat64) {
  auto in = make_inputs(1, 300, 2, 2, 32, 64, -0.2, 0, -1, 7);
  auto ref = run(true, in);
  DeltaRuleArgs args;
  args.initial_state = in.h0.to(at::kFloat);
  args.output_final_state = true;
  auto f = [](const at::Tensor& x) { return x.detach().to(at::kFloat); };
  auto got = hybrid::ops::chunk_gated_delta_rule(f(in.q), f(in.k), f(in.v), f(in.g), f(in.beta), args);
  EXPECT_EQ(got.o.scalar_type(), at::kFloat);
  EXPECT_LT(rel_err(got.o.to(at::kDouble), ref.o), 1e-5);
  EXPECT_LT(rel_err(got.final_state.to(at::kDouble), ref.final_state), 1e-5);
}

TEST(DeltaRule, BadShapesAreRejected) {
  auto in = make_inputs(1, 10, 2, 3, 8, 8, -0.5, 0);  // 3 value heads over 2 key heads
  EXPECT_THROW(run(true, in), std::invalid_argument);
  auto ok = make_inputs(2, 10, 1, 1, 8, 8, -0.5, 0);
  EXPECT_THROW(run(true, ok, at::tensor({0, 10}, at::kLong)), std::invalid_argument);  // batch 2 with cu_seqlens
  auto one = make_inputs(1, 10, 1, 1, 8, 8, -0.5, 0);
  EXPECT_THROW(run(true, one, at::tensor({0, 5}, at::kLong)), std::invalid_argument);      // offsets end before T
  EXPECT_THROW(run(true, one, at::tensor({0, 6, 4, 10}, at::kLong)), std::invalid_argument);  // decreasing
  auto two_states = make_inputs(1, 10, 1, 1, 8, 8, -0.5, 0, 2);  // h0 for 2 sequences, 1 given
  EXPECT_THROW(run(true, two_states), std::invalid_argument);
  DeltaRuleArgs integer_output;
  integer_output.output_dtype = at::kLong;
  for (auto op : {hybrid::ops::chunk_gated_delta_rule, hybrid::ops::recurrent_gated_delta_rule})
    EXPECT_THROW(op(one.q, one.k, one.v, one.g, one.beta, integer_output), std::invalid_argument);
}

// The preprocessing options (q/k L2 norm, gate from A_log/dt_bias, beta from a logit) equal
// doing the same before the op, for both implementations, values and every gradient
// (including A_log and dt_bias), with grouped values so the norm is taken before expanding; the
// chunked one also with the tokens as documents of one row (the gates formed into the chunk
// layout through its gather map: delta_gates.h).
TEST(DeltaRule, PreprocessingOptionsEqualPreprocessedInputs) {
  at::manual_seed(5);
  auto opt = at::TensorOptions().dtype(at::kDouble);
  const int64_t B = 2, T = 70, Hk = 1, Hv = 2, K = 8, V = 8;
  std::vector<at::Tensor> raw = {at::randn({B, T, Hk, K}, opt), at::randn({B, T, Hk, K}, opt), at::randn({B, T, Hv, V}, opt),
                                 at::randn({B, T, Hv}, opt), at::randn({B, T, Hv}, opt), at::randn({Hv}, opt) * 0.5,
                                 at::randn({Hv}, opt), at::randn({B, Hv, K, V}, opt) * 0.5};
  for (auto& t : raw) t.requires_grad_(true);
  const at::Tensor &q = raw[0], &k = raw[1], &v = raw[2], &a = raw[3], &b = raw[4], &A_log = raw[5], &dt_bias = raw[6];
  for (bool chunked : {false, true}) {
    auto f = chunked ? hybrid::ops::chunk_gated_delta_rule : hybrid::ops::recurrent_gated_delta_rule;
    DeltaRuleArgs args;
    args.initial_state = raw[7];
    args.output_final_state = true;
    DeltaRuleArgs with = args;
    with.qk_l2norm = with.beta_from_logit = with.allow_neg_eigval = true;
    with.A_log = A_log, with.dt_bias = dt_bias;
    auto l2 = [](const at::Tensor& x) { return x * at::rsqrt(x.pow(2).sum(-1, true) + 1e-6); };
    const at::Tensor g = -A_log.exp() * at::softplus(a + dt_bias);
    auto ref = f(l2(q), l2(k), v, g, 2 * at::sigmoid(b), args);
    auto got = f(q, k, v, a, b, with);
    EXPECT_LT(rel_err(got.o, ref.o), 1e-12) << "chunked " << chunked;
    EXPECT_LT(rel_err(got.final_state, ref.final_state), 1e-12) << "chunked " << chunked;
    auto gr = torch::autograd::grad({loss_of(ref)}, raw), gg = torch::autograd::grad({loss_of(got)}, raw);
    for (size_t i = 0; i < raw.size(); ++i) EXPECT_LT(rel_err(gg[i], gr[i]), 1e-12) << "chunked " << chunked << " input " << i;
    if (!chunked) continue;
    // The same tokens as two documents of one row (the layout's gather map, not its rows).
    auto row = [](const at::Tensor& x) { return x.flatten(0, 1).unsqueeze(0); };
    args.cu_seqlens = with.cu_seqlens = at::tensor(std::vector<int64_t>{0, T, 2 * T}, at::kLong);
    auto ref_docs = f(row(l2(q)), row(l2(k)), row(v), row(-A_log.exp() * at::softplus(a + dt_bias)),
                      row(2 * at::sigmoid(b)), args);
    auto got_docs = f(row(q), row(k), row(v), row(a), row(b), with);
    EXPECT_LT(rel_err(got_docs.o, ref_docs.o), 1e-12) << "documents";
    auto gr_docs = torch::autograd::grad({loss_of(ref_docs)}, raw), gg_docs = torch::autograd::grad({loss_of(got_docs)}, raw);
    for (size_t i = 0; i < raw.size(); ++i) EXPECT_LT(rel_err(gg_docs[i], gr_docs[i]), 1e-12) << "documents, input " << i;
  }
  DeltaRuleArgs bad;
  bad.A_log = at::zeros({3}, opt);  // Hv is 2
  EXPECT_THROW(hybrid::ops::chunk_gated_delta_rule(q, k, v, a, b, bad), std::invalid_argument);
  DeltaRuleArgs bias_alone;
  bias_alone.dt_bias = at::zeros({Hv}, opt);
  EXPECT_THROW(hybrid::ops::chunk_gated_delta_rule(q, k, v, a, b, bias_alone), std::invalid_argument);
}

}  // namespace

namespace {

// Decoding token by token with the step op reproduces the recurrence over the whole sequence.
void check_steps(const at::Device& device, at::ScalarType dtype, int64_t Hk, int64_t Hv, int64_t K, int64_t V, double tol) {
  auto in = make_inputs(3, 12, Hk, Hv, K, V, -0.7, 0, -1, 31);
  auto ref = run(false, in);  // float64 recurrence over all 12 tokens
  at::Tensor state = in.h0.detach().to(at::kFloat).to(device).contiguous();
  if (dtype == at::kDouble) state = in.h0.detach().clone().contiguous();
  for (int64_t t = 0; t < 12; ++t) {
    auto at_t = [&](const at::Tensor& x) { return x.detach().select(1, t).to(device, dtype == at::kDouble ? at::kDouble : dtype); };
    auto gb = [&](const at::Tensor& x) { return x.detach().select(1, t).to(device, dtype == at::kDouble ? at::kDouble : at::kFloat); };
    at::Tensor o = hybrid::ops::recurrent_gated_delta_rule_step(at_t(in.q), at_t(in.k), at_t(in.v), gb(in.g), gb(in.beta), state);
    EXPECT_LT(rel_err(o.cpu().to(at::kDouble), ref.o.select(1, t)), tol) << "token " << t;
  }
  EXPECT_LT(rel_err(state.cpu().to(at::kDouble), ref.final_state), tol);
}

TEST(DeltaRuleStep, CpuStepsEqualTheRecurrence) { check_steps(at::kCPU, at::kDouble, 2, 4, 12, 20, 1e-12); }

TEST(DeltaRuleStepCuda, KernelStepsMatchFloat64) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  // Each of the kernel's row counts a thread (K up to 32, 64, 128, 256) and value tiles cut by V.
  for (auto [Hk, Hv, K, V] : {std::tuple{2, 2, 96, 192}, std::tuple{2, 2, 128, 128}, std::tuple{1, 3, 48, 80},
                              std::tuple{1, 2, 256, 64}, std::tuple{2, 2, 16, 40}}) {
    check_steps(at::kCUDA, at::kFloat, Hk, Hv, K, V, 1e-5);
    check_steps(at::kCUDA, at::kBFloat16, Hk, Hv, K, V, 2e-2);  // inputs rounded to bf16
  }
}

// What generation runs a token at a time: the decoding step on GDN's packed qkv with the layer's
// input options (grouped values, the gate from A_log and dt_bias, beta from its logit times 2,
// q and k L2-normalised), token after token, against the chunked op over the whole sequence in
// float64 on the same (rounded) inputs: o (in qkv's dtype: bf16 rounds it, RMS about 1.5e-3) and
// the final state (float32 on the GPU for either dtype).
void check_decode(const at::Device& device, at::ScalarType dtype, double o_tol, double state_tol,
                  bool gates_in_qkv_dtype = false) {
  at::manual_seed(17);
  const hybrid::ops::QkvHeads heads{2, 16, 4, 32};
  const int64_t B = 2, T = 9, Hv = heads.v_heads;
  const at::ScalarType compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor qkv = at::randn({B, T, 2 * 2 * 16 + 4 * 32}, f64).to(dtype).to(at::kDouble);
  // The gates' raw inputs side by side, as GDN's projection output holds them; in qkv's dtype
  // (rounded alike for the reference) where the step reads them in place.
  at::Tensor gates = at::randn({B, T, 2 * Hv}, f64);
  if (gates_in_qkv_dtype) gates = gates.to(dtype).to(at::kDouble);
  const at::Tensor a = gates.narrow(-1, 0, Hv), b = gates.narrow(-1, Hv, Hv);
  const at::ScalarType gate_dtype = gates_in_qkv_dtype ? dtype : compute;
  DeltaRuleArgs args;
  args.qk_l2norm = args.beta_from_logit = args.allow_neg_eigval = true;
  args.A_log = at::rand({Hv}, f64) * 2;
  args.dt_bias = at::randn({Hv}, f64) * 0.5;
  DeltaRuleArgs whole_args = args;
  whole_args.output_final_state = true;
  const DeltaRuleOutput whole = hybrid::ops::chunk_gated_delta_rule_packed(qkv, heads, a, b, whole_args);

  auto on = [&](const at::Tensor& x, at::ScalarType t) { return x.to(device, t); };
  DeltaRuleArgs step_args = args;
  step_args.A_log = on(*args.A_log, compute), step_args.dt_bias = on(*args.dt_bias, compute);
  at::Tensor state = at::zeros({B, Hv, heads.k_dim, heads.v_dim}, at::TensorOptions().device(device).dtype(compute));
  std::vector<at::Tensor> o;
  for (int64_t t = 0; t < T; ++t) {
    auto token = [&](const at::Tensor& x, at::ScalarType type) { return on(x.narrow(1, t, 1), type); };
    const at::Tensor gates_now = token(gates, gate_dtype);
    o.push_back(hybrid::ops::gated_delta_rule_decode_step(token(qkv, dtype), heads, gates_now.narrow(-1, 0, Hv),
                                                          gates_now.narrow(-1, Hv, Hv), state, step_args)
                    .cpu()
                    .to(at::kDouble));
  }
  EXPECT_LT(rel_err(at::cat(o, 1), whole.o), o_tol) << c10::toString(dtype);
  EXPECT_LT(rel_err(state.cpu().to(at::kDouble), whole.final_state), state_tol) << c10::toString(dtype);

  auto decode = [&](const at::Tensor& x, at::Tensor& s, const DeltaRuleArgs& with) {
    return hybrid::ops::gated_delta_rule_decode_step(on(x, dtype), heads, on(a.narrow(1, 0, x.size(1)), compute),
                                                     on(b.narrow(1, 0, x.size(1)), compute), s, with);
  };
  EXPECT_THROW(decode(qkv.narrow(1, 0, 2), state, step_args), std::invalid_argument);  // two tokens
  at::Tensor other_dtype = state.to(compute == at::kDouble ? at::kFloat : at::kDouble);
  EXPECT_THROW(decode(qkv.narrow(1, 0, 1), other_dtype, step_args), std::invalid_argument);
  DeltaRuleArgs with_initial = step_args;
  with_initial.initial_state = state;
  EXPECT_THROW(decode(qkv.narrow(1, 0, 1), state, with_initial), std::invalid_argument);
}

TEST(DeltaRuleDecode, StepsEqualTheChunkedOp) { check_decode(at::kCPU, at::kDouble, 1e-12, 1e-12); }

TEST(DeltaRuleDecodeCuda, StepsEqualTheChunkedOp) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  check_decode(at::kCUDA, at::kFloat, 1e-5, 1e-5);
  check_decode(at::kCUDA, at::kBFloat16, 4e-3, 1e-5);  // the reference takes the same rounded qkv
  check_decode(at::kCUDA, at::kBFloat16, 4e-3, 1e-5, /*gates_in_qkv_dtype=*/true);  // read in place
  check_decode(at::kCUDA, at::kFloat, 1e-5, 1e-5, /*gates_in_qkv_dtype=*/true);
}

}  // namespace

namespace {

// q, k and v packed as one tensor's columns give the op's results on its windows: o, the final
// state and the gradients of qkv, g and beta (the CUDA path writes qkv's gradient in one tensor;
// a wrong window or offset would move whole heads). With the GDN layer's preprocessing options.
void check_packed(at::Device device, at::ScalarType dtype, int64_t Hk, int64_t Hv, bool documents, double tol) {
  at::manual_seed(21);
  const int64_t B = documents ? 1 : 2, T = 150, K = 32, V = 48, W = 2 * Hk * K + Hv * V;
  auto opt = at::TensorOptions().device(device);
  std::vector<at::Tensor> leaves = {at::randn({B, T, W}, opt.dtype(dtype)), at::randn({B, T, Hv}, opt),
                                    at::randn({B, T, Hv}, opt)};
  for (auto& t : leaves) t.requires_grad_(true);
  DeltaRuleArgs args;
  args.qk_l2norm = args.beta_from_logit = args.allow_neg_eigval = true;
  args.A_log = at::randn({Hv}, opt) * 0.5;
  args.output_final_state = true;
  if (documents) args.cu_seqlens = at::tensor({int64_t{0}, int64_t{7}, int64_t{90}, T}, at::kLong);
  const hybrid::ops::QkvHeads heads{Hk, K, Hv, V};
  auto packed = hybrid::ops::chunk_gated_delta_rule_packed(leaves[0], heads, leaves[1], leaves[2], args);
  auto windows = leaves[0].split_with_sizes({Hk * K, Hk * K, Hv * V}, -1);
  auto sliced = hybrid::ops::chunk_gated_delta_rule(windows[0].unflatten(-1, {Hk, K}), windows[1].unflatten(-1, {Hk, K}),
                                                    windows[2].unflatten(-1, {Hv, V}), leaves[1], leaves[2], args);
  auto d = [](const at::Tensor& x) { return x.to(at::kDouble); };
  EXPECT_LT(rel_err(d(packed.o), d(sliced.o)), tol);
  EXPECT_LT(rel_err(d(packed.final_state), d(sliced.final_state)), tol);
  auto loss = [](const DeltaRuleOutput& out) { return (out.o.to(at::kFloat).sin().sum() + out.final_state.sum()); };
  auto gp = torch::autograd::grad({loss(packed)}, leaves), gs = torch::autograd::grad({loss(sliced)}, leaves);
  const char* names[] = {"dqkv", "dg", "dbeta"};
  for (size_t i = 0; i < gp.size(); ++i) EXPECT_LT(rel_err(d(gp[i]), d(gs[i])), tol) << names[i];
}

TEST(DeltaRule, PackedQkvEqualsItsWindows) {
  check_packed(at::kCPU, at::kDouble, 2, 2, false, 1e-12);
  check_packed(at::kCPU, at::kDouble, 1, 2, true, 1e-12);  // grouped values: the windows' path
  auto qkv = at::zeros({1, 8, 2 * 16 + 24});
  EXPECT_THROW(hybrid::ops::chunk_gated_delta_rule_packed(qkv, {1, 16, 1, 16}, at::zeros({1, 8, 1}), at::zeros({1, 8, 1})),
               std::invalid_argument);  // v's columns are 24, not 16
}

// The CUDA node that takes all three windows and writes their gradients side by side; the same
// kernels on both sides, so only the order of float atomics in the backward may differ.
TEST(DeltaRuleCuda, PackedQkvEqualsItsWindows) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for (bool documents : {false, true}) check_packed(at::kCUDA, at::kBFloat16, 2, 2, documents, 1e-4);
  check_packed(at::kCUDA, at::kBFloat16, 1, 2, false, 1e-4);  // grouped values: the windows' path
}

}  // namespace
