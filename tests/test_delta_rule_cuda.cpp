// The chunked delta rule on the GPU (the CUDA state-pass kernel) against float64 on the same
// inputs, with REFERENCE.md's thresholds (relative RMS): o and final state 0.005; dq, dk, dv,
// dh0 0.008; dbeta, dg 0.02. Every test skips without a CUDA device. The float64 reference is
// the same op in float64 (its ATen state pass, checked against the token recurrence on the CPU
// by test_delta_rule.cpp), and the recurrence itself for short sequences.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/GradMode.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "../src/ops/delta_chunk_terms.h"
#include "../src/ops/delta_state_pass.h"
#include "../src/ops/reverse_pass_order.h"
#include "hybrid/ops/delta_rule.h"

namespace {
using hybrid::ops::DeltaRuleArgs;
using hybrid::ops::DeltaRuleOutput;

struct Case {
  int64_t B, T, Hk, Hv, K, V;
  double g_lo, g_hi;                 // log-gates uniform in [g_lo, g_hi]
  std::vector<int64_t> documents;    // cu_seqlens lengths (B = 1), empty for none
  at::ScalarType dtype = at::kBFloat16;  // of q, k, v (g, beta, h0 stay float32)
  bool tf32_products = true;             // DeltaRuleArgs::tf32_products
  bool keep_intermediates = true;        // DeltaRuleArgs::keep_intermediates
  bool l2norm = false;                   // DeltaRuleArgs::qk_l2norm (q and k rows then not unit)
};

// Inputs in float64 holding values exactly representable in the low precision.
struct Inputs {
  at::Tensor q, k, v, g, beta, h0, cu;
  bool l2norm = false;
  std::vector<at::Tensor> all() const { return {q, k, v, g, beta, h0}; }
};

Inputs make(const Case& c, uint64_t seed) {
  at::manual_seed(seed);
  auto opt = at::TensorOptions().dtype(at::kDouble).device(at::kCUDA);
  auto low = [&](at::Tensor x, at::ScalarType dt) { return x.to(dt).to(at::kDouble); };
  // Unit rows, or with the op's norm rows of norms in [0.3, 3).
  auto unit = [&](at::Tensor x) {
    x = x / x.norm(2, -1, true);
    return c.l2norm ? x * (at::rand({c.B, c.T, c.Hk, 1}, opt) * 2.7 + 0.3) : x;
  };
  const int64_t N = c.documents.empty() ? c.B : static_cast<int64_t>(c.documents.size());
  Inputs in;
  in.l2norm = c.l2norm;
  in.q = low(unit(at::randn({c.B, c.T, c.Hk, c.K}, opt)), c.dtype);
  in.k = low(unit(at::randn({c.B, c.T, c.Hk, c.K}, opt)), c.dtype);
  in.v = low(at::randn({c.B, c.T, c.Hv, c.V}, opt), c.dtype);
  in.g = low(at::rand({c.B, c.T, c.Hv}, opt) * (c.g_hi - c.g_lo) + c.g_lo, at::kFloat);
  in.beta = low(at::rand({c.B, c.T, c.Hv}, opt) * 1.98 + 0.01, at::kFloat);  // (0, 2): negative eigenvalues allowed
  in.h0 = low(at::randn({N, c.Hv, c.K, c.V}, opt) * 0.5, at::kFloat);
  if (!c.documents.empty()) {
    std::vector<int64_t> offsets = {0};
    for (int64_t len : c.documents) offsets.push_back(offsets.back() + len);
    in.cu = at::tensor(offsets, at::kLong);
  }
  return in;
}

DeltaRuleOutput run(const Inputs& in, at::ScalarType dt, bool recurrent, bool tf32, bool keep) {
  DeltaRuleArgs args;
  args.tf32_products = tf32;
  args.keep_intermediates = keep;
  args.initial_state = dt == at::kDouble ? in.h0 : in.h0.to(at::kFloat);
  args.output_final_state = true;
  args.qk_l2norm = in.l2norm;
  if (in.cu.defined()) args.cu_seqlens = in.cu;
  auto f = [&](const at::Tensor& x, at::ScalarType t) { return dt == at::kDouble ? x : x.to(t); };
  auto op = recurrent ? hybrid::ops::recurrent_gated_delta_rule : hybrid::ops::chunk_gated_delta_rule;
  return op(f(in.q, dt), f(in.k, dt), f(in.v, dt), f(in.g, at::kFloat), f(in.beta, at::kFloat), args);
}

double rel_rms(const at::Tensor& got, const at::Tensor& ref) {
  return ((got.to(at::kDouble) - ref).norm() / (ref.norm() + 1e-300)).item<double>();
}

// o, final state and the six gradients of a fixed random projection of both outputs.
std::vector<at::Tensor> outputs_and_grads(const Inputs& in, at::ScalarType dt, bool recurrent = false, bool tf32 = true,
                                          bool keep = true) {
  Inputs leaf = in;
  for (auto* t : {&leaf.q, &leaf.k, &leaf.v, &leaf.g, &leaf.beta, &leaf.h0}) *t = t->detach().requires_grad_(true);
  auto out = run(leaf, dt, recurrent, tf32, keep);
  at::manual_seed(99);
  auto wo = at::randn(out.o.sizes(), out.o.options().dtype(at::kDouble));
  auto ws = at::randn(out.final_state.sizes(), out.final_state.options().dtype(at::kDouble));
  at::Tensor loss = (out.o.to(at::kDouble) * wo).sum() + (out.final_state.to(at::kDouble) * ws).sum();
  auto g = torch::autograd::grad({loss}, leaf.all());
  std::vector<at::Tensor> all = {out.o.detach(), out.final_state.detach()};
  for (auto& x : g) all.push_back(x);
  return all;
}

const char* kNames[] = {"o", "final", "dq", "dk", "dv", "dg", "dbeta", "dh0"};
const double kThresholds[] = {0.005, 0.005, 0.008, 0.008, 0.008, 0.02, 0.02, 0.008};

// Checks the float32/bf16 GPU result against float64 and prints the errors on one line.
void check(const Case& c, uint64_t seed, bool recurrent_reference = false) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  Inputs in = make(c, seed);
  auto ref = outputs_and_grads(in, at::kDouble, recurrent_reference);
  auto got = outputs_and_grads(in, c.dtype, false, c.tf32_products, c.keep_intermediates);
  std::string line = "B" + std::to_string(c.B) + " T" + std::to_string(c.T) + " H" + std::to_string(c.Hk) + "/" +
                     std::to_string(c.Hv) + " K" + std::to_string(c.K) + " V" + std::to_string(c.V) +
                     (c.documents.empty() ? "" : " docs " + std::to_string(c.documents.size())) + ":";
  for (size_t i = 0; i < ref.size(); ++i) {
    EXPECT_TRUE(at::isfinite(got[i]).all().item<bool>()) << kNames[i] << " has NaN or inf";
    const double err = rel_rms(got[i], ref[i]);
    EXPECT_LT(err, kThresholds[i]) << kNames[i];
    char buf[48];
    std::snprintf(buf, sizeof buf, " %s %.1e", kNames[i], err);
    line += buf;
  }
  std::printf("[ errors   ] %s\n", line.c_str());
}

TEST(DeltaRuleCuda, HeadDims) {
  for (auto [K, V] : {std::pair{64, 64}, {96, 192}, {128, 128}, {256, 256}, {16, 32}, {48, 80}})
    check({1, 300, 2, 2, K, V, -0.5, 0, {}}, K * 1000 + V);
}

TEST(DeltaRuleCuda, LengthsNotMultiplesOfTheChunk) {
  for (int64_t T : {1, 2, 63, 64, 65, 127, 1000, 4097}) check({2, T, 2, 2, 64, 64, -0.5, 0, {}}, T);
}

TEST(DeltaRuleCuda, LongSequences) {
  check({1, 16384, 2, 2, 128, 128, -0.1, 0, {}}, 1);
  check({1, 8192, 2, 2, 96, 192, -1, 0, {}}, 2);
}

// Where 32-column blocks of the state pass would share SMs, it takes 48-column blocks of 12 warps
// (one an SM), or 64-column blocks of 16 warps where V is no multiple of 48, and there the forward
// pass forms the whole output o (and the reverse pass `extra`, also at K = 128): heads enough for
// that on this GPU, one sequence and three (one empty); with float32 products the pass leaves o's
// intra-chunk share to the product as elsewhere. The 48-column tiles at K = 96 and 128 keep the
// intermediates in bf16 for the backward (WarpPassKeepsBf16WhereBoxed), so those cases run the
// finish kernel's and wy_backward's bf16 instances too.
TEST(DeltaRuleCuda, WideValueTiles) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t H48 = sms / 6 + 1, H64 = sms / 4 + 1;  // more 32-column blocks (V / 32 a head) than SMs
  const at::Device gpu(at::kCUDA);
  for (int64_t K : {96, 128}) {
    EXPECT_EQ(hybrid::ops::detail::state_pass_value_tile(gpu, H48, K, 192, 1, true), 48) << "K " << K;
    EXPECT_TRUE(hybrid::ops::detail::state_pass_forms_output(gpu, H48, K, 192, 1)) << "K " << K;
    EXPECT_EQ(hybrid::ops::detail::state_pass_value_tile(gpu, H64, K, 128, 1, true), 64) << "K " << K;
    EXPECT_TRUE(hybrid::ops::detail::state_pass_forms_output(gpu, H64, K, 128, 1)) << "K " << K;
    EXPECT_TRUE(hybrid::ops::detail::state_pass_takes_queries(gpu, H64, K, 128, 1, true)) << "K " << K;
  }
  check({1, 200, H48, H48, 96, 192, -0.5, 0, {}}, 14);
  check({1, 390, H48, H48, 96, 192, -0.5, 0, {100, 0, 290}}, 15);
  check({1, 150, H48, H48, 128, 192, -0.5, 0, {}}, 16);
  check({1, 150, H48, H48, 64, 192, -0.5, 0, {}}, 19);  // K = 64: the instance with K at run time
  check({1, 200, H64, H64, 128, 128, -0.5, 0, {}}, 20);
  check({1, 390, H64, H64, 128, 128, -0.5, 0, {100, 0, 290}}, 21);
  check({1, 150, H64, H64, 96, 128, -0.5, 0, {}}, 22);
  check({1, 150, H64, H64, 64, 128, -0.5, 0, {}}, 23);
  Case float32_products{1, 200, H48, H48, 96, 192, -0.5, 0, {}};
  float32_products.tf32_products = false;
  check(float32_products, 18);
}

// Where the registers passes take both directions by default at K = 128 (between half the SMs and
// all of them in heads), they keep h, W, V' and dS_C, dV', dW in bf16 for
// the finish kernel and wy_backward (finish_takes_bf16_kept; o and its gradient bf16): the op
// against float64, one sequence and three (one empty); and with the forward recomputed in the
// backward, where all six stay float32 (the recomputed forward's pass is the mma.sync one).
TEST(DeltaRuleCuda, KeptInBf16) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const int64_t H = at::cuda::getCurrentDeviceProperties()->multiProcessorCount / 2 + 1;
  const at::Device gpu(at::kCUDA);
  for (const bool reverse : {false, true})
    EXPECT_TRUE(hybrid::ops::detail::state_pass_on_registers(gpu, H, 128, 128, 1, reverse));
  EXPECT_TRUE(hybrid::ops::detail::finish_takes_bf16_kept(128, 128, /*tf32=*/true));
  check({1, 200, H, H, 128, 128, -0.5, 0, {}}, 24);
  check({1, 390, H, H, 128, 128, -0.5, 0, {100, 0, 290}}, 25);
  Case recomputed{1, 200, H, H, 128, 128, -0.5, 0, {}};
  recomputed.keep_intermediates = false;
  check(recomputed, 26);
}

// Where 16-column blocks would share SMs and 32-column ones fit one an SM (B2 T16384 H16 K128
// V128 on 132 SMs), 32 columns, and the queries' fusions and the whole output there although
// their shared memory leaves room for one block an SM only (those passes keep their intermediates
// in bf16 for the backward: WarpPassKeepsBf16WhereBoxed). There the registers passes, one chain a
// block, take both directions by default (their step is the shorter; RegistersPassMatchesTheWarpPass
// checks them against the 32-column pass).
TEST(DeltaRuleCuda, OneBlockAnSM) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const int64_t H = at::cuda::getCurrentDeviceProperties()->multiProcessorCount / 4;  // 4 H 32-column blocks
  const at::Device gpu(at::kCUDA);
  EXPECT_EQ(hybrid::ops::detail::state_pass_value_tile(gpu, H, 128, 128, 1, true), 32);
  EXPECT_TRUE(hybrid::ops::detail::state_pass_takes_queries(gpu, H, 128, 128, 1, true));
  EXPECT_TRUE(hybrid::ops::detail::state_pass_takes_queries(gpu, H, 128, 128, 1, false));
  EXPECT_TRUE(hybrid::ops::detail::state_pass_forms_output(gpu, H, 128, 128, 1));
  for (const bool reverse : {false, true})
    EXPECT_TRUE(hybrid::ops::detail::state_pass_on_registers(gpu, H, 128, 128, 1, reverse));
  check({1, 200, H, H, 128, 128, -0.5, 0, {}}, 25);
}

// A layout of sequences of these lengths into chunks of 64, as chunk_layout makes it: each
// sequence's first chunk, the token of each chunk row (`padding` for rows past a sequence) and each
// chunk's run (first token, tokens). Sequence n starts at token n stride, or with stride 0 right
// after the one before (documents).
struct ChunkRuns {
  std::vector<int64_t> chunk_offsets = {0}, gather, runs;
};
ChunkRuns chunk_runs(const std::vector<int64_t>& lengths, int64_t stride, int64_t padding) {
  constexpr int64_t C = 64;
  ChunkRuns layout;
  for (int64_t n = 0, next = 0; n < static_cast<int64_t>(lengths.size()); ++n) {
    const int64_t first = stride ? n * stride : next, length = lengths[n];
    for (int64_t c = 0; c * C < length; ++c) {
      for (int64_t r = 0; r < C; ++r) layout.gather.push_back(c * C + r < length ? first + c * C + r : padding);
      layout.runs.push_back(first + c * C), layout.runs.push_back(std::min(C, length - c * C));
    }
    next = first + length;
    layout.chunk_offsets.push_back(static_cast<int64_t>(layout.gather.size()) / C);
  }
  return layout;
}

// A state pass's inputs on raw keys, random, for H heads of K x V states over the chunks of
// chunk_offsets (`add` and the queries left to the caller).
hybrid::ops::detail::StatePassInputs random_pass_inputs(int64_t H, int64_t K, int64_t V,
                                                        const std::vector<int64_t>& chunk_offsets) {
  constexpr int64_t C = 64;
  const int64_t NC = chunk_offsets.back(), N = static_cast<int64_t>(chunk_offsets.size()) - 1;
  const auto opt = at::TensorOptions().device(at::kCUDA);
  hybrid::ops::detail::StatePassInputs in;
  in.k_raw = (at::randn({H, NC, C, K}, opt) / std::sqrt(static_cast<double>(K))).to(at::kBFloat16);
  in.k_scale = at::rand({H, NC, C}, opt) + 0.5;
  in.k = in.k_raw.to(at::kFloat) * in.k_scale.unsqueeze(-1);
  in.a = -at::rand({H, NC, C}, opt), in.b = at::rand({H, NC, C}, opt), in.last = at::rand({H, NC}, opt);
  in.M = at::tril(at::randn({H, NC, C, C}, opt) * 0.1);
  in.init = at::randn({N, H, K, V}, opt);
  in.chunk_offsets = chunk_offsets;
  return in;
}

// The forward pass reading V straight from the tokens (add_tokens: bf16 rows of a column window,
// padding past T or past each document) gives the bits it gives on the float32 chunk layout of
// the same values: at 16-column tiles over two batch rows, at 48 columns with the queries and the
// whole output into the tokens, at 64 columns, and over documents (one empty) by their runs.
TEST(DeltaRuleCuda, ValuesFromTheTokens) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  namespace d = hybrid::ops::detail;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount, C = 64;
  struct Shape {
    int64_t B, T, H, K, V;
    std::vector<int64_t> documents;  // lengths (B = 1), or none: the batch's rows
  };
  for (const Shape& s : {Shape{2, 100, 2, 32, 48, {}}, Shape{1, 200, sms / 6 + 1, 96, 192, {}},
                         Shape{1, 130, sms / 4 + 1, 128, 128, {}}, Shape{1, 259, 3, 96, 192, {100, 0, 29, 130}},
                         Shape{1, 259, sms / 6 + 1, 96, 192, {100, 0, 29, 130}}}) {
    at::manual_seed(31);
    const auto opt = at::TensorOptions().device(at::kCUDA);
    const int64_t H = s.H, K = s.K, V = s.V;
    const ChunkRuns layout = s.documents.empty() ? chunk_runs(std::vector<int64_t>(s.B, s.T), s.T, s.B * s.T)
                                                 : chunk_runs(s.documents, 0, s.T);
    const std::vector<int64_t>&chunk_offsets = layout.chunk_offsets, &gather = layout.gather, &runs = layout.runs;
    const int64_t NC = chunk_offsets.back(), N = static_cast<int64_t>(chunk_offsets.size()) - 1;
    // v as a column window (16 columns in) of a wider bf16 tensor, and the same values in the
    // chunk layout, padding rows zero.
    const at::Tensor wide = at::randn({s.B, s.T, H * V + 32}, opt).to(at::kBFloat16);
    const at::Tensor v_tokens = wide.narrow(-1, 16, H * V).unflatten(-1, {H, V});
    const at::Tensor rows = at::cat({v_tokens.to(at::kFloat).reshape({s.B * s.T, H, V}), at::zeros({1, H, V}, opt)});
    const at::Tensor gather_t = at::tensor(gather, at::kLong).to(at::kCUDA);
    const at::Tensor v_chunks = rows.index_select(0, gather_t).view({NC, C, H, V}).permute({2, 0, 1, 3}).contiguous();
    d::StatePassInputs in = random_pass_inputs(H, K, V, chunk_offsets);
    const bool whole_output = d::state_pass_forms_output(at::Device(at::kCUDA), H, K, V, N);
    if (whole_output) {
      in.q_raw = (at::randn({H, NC, C, K}, opt) / std::sqrt(static_cast<double>(K))).to(at::kBFloat16);
      in.q_factor = at::rand({H, NC, C}, opt);
      in.QKG = at::tril(at::randn({H, NC, C, C}, opt) * 0.1), in.output_scale = 0.3;
      in.o_tokens.wanted = true, in.o_tokens.B = s.B, in.o_tokens.T = s.T;
      if (!s.documents.empty()) in.o_tokens.gather = gather_t;
    }
    ASSERT_TRUE(d::state_pass_takes_value_tokens(v_tokens));
    // Rows the pass's 16-byte copies cannot take stay with the layout's float32 copy: a window 4
    // columns in (8-byte rows), a token stride not a multiple of 8, float32 values.
    EXPECT_FALSE(d::state_pass_takes_value_tokens(wide.narrow(-1, 4, H * V).unflatten(-1, {H, V})));
    EXPECT_FALSE(d::state_pass_takes_value_tokens(
        at::zeros({s.B, s.T, H * V + 4}, wide.options()).narrow(-1, 0, H * V).unflatten(-1, {H, V})));
    EXPECT_FALSE(d::state_pass_takes_value_tokens(v_tokens.to(at::kFloat)));
    in.add = v_chunks;
    // The mma.sync pass both times: by default the registers pass could take the second call (values
    // from the tokens, o into them) but not the first, and the two kernels agree to float32
    // rounding, not bit for bit (RegistersPassMatchesTheWarpPass holds them together).
    in.kernel = d::StatePassKernel::kWarps;
    const d::StatePassOutputs from_chunks = d::state_pass(in, true);
    // add only a shape now: a NaN broadcast, which would show in every output if it were read
    in.add = at::full({1}, std::numeric_limits<float>::quiet_NaN(), opt).expand({H, NC, C, V});
    in.add_tokens = v_tokens;
    if (!s.documents.empty()) in.add_token_runs = at::tensor(runs, at::kLong).to(at::kCUDA).view({NC, 2});
    const d::StatePassOutputs from_tokens = d::state_pass(in, true);
    const std::string shape = "B" + std::to_string(s.B) + " H" + std::to_string(H) + " K" + std::to_string(K) +
                              (s.documents.empty() ? "" : " documents");
    for (auto [name, x, y] : {std::tuple{"before", from_chunks.before, from_tokens.before},
                              std::tuple{"X", from_chunks.X, from_tokens.X}, std::tuple{"Y", from_chunks.Y, from_tokens.Y},
                              std::tuple{"final", from_chunks.final_state, from_tokens.final_state},
                              std::tuple{"o", from_chunks.o, from_tokens.o}}) {
      EXPECT_EQ(x.defined(), y.defined()) << name << " " << shape;
      if (x.defined()) EXPECT_TRUE(at::equal(x, y)) << name << " " << shape;
    }
    EXPECT_EQ(from_tokens.o.defined(), whole_output) << shape;
  }
}

// The kernel a name picks (HYBRID_STATE_PASS's values); any other name is one error naming where it
// came from and what it may be.
TEST(StatePassKernel, Names) {
  namespace d = hybrid::ops::detail;
  EXPECT_EQ(d::state_pass_kernel_named(nullptr, "X"), d::StatePassKernel::kFastest);
  EXPECT_EQ(d::state_pass_kernel_named("", "X"), d::StatePassKernel::kFastest);
  EXPECT_EQ(d::state_pass_kernel_named("warps", "X"), d::StatePassKernel::kWarps);
  EXPECT_EQ(d::state_pass_kernel_named("registers", "X"), d::StatePassKernel::kRegisters);
  EXPECT_EQ(d::state_pass_kernel_named("registers-single", "X"), d::StatePassKernel::kRegistersSingle);
  try {
    d::state_pass_kernel_named("wgmma", "HYBRID_STATE_PASS");
    ADD_FAILURE() << "no error for an unknown name";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("HYBRID_STATE_PASS must be warps, registers or registers-single, not wgmma"),
              std::string::npos)
        << e.what_without_backtrace();
  }
}

// At K = 96 or 128 where the mma.sync pass takes its wide tiles or 32-column blocks alone on their
// SMs, both passes can run with the state in registers (state_pass_on_registers), in blocks of two 64-column chains or of one: each
// gives what the mma.sync pass gives on the same inputs to float32 rounding, every output (o to
// the bf16 roundings its products take): the forward with V and o in the tokens (one row, two rows
// of a batch, documents with an empty one, and without before and X kept; V 256 wide, a bf16 o,
// V a column window of wider token rows) or in the chunk layout, the reverse with the queries'
// extra (V 128 and 256); at K = 96 (TMA's zero-filled keys past K, the n = 96 products) V 192 (in
// pairs, a head's last chain alone in its block) and 64; with heads few enough for 32-column blocks
// alone on their SMs (K = 128 V 128, K = 96 V 192). Asked for the kept intermediates in bf16, the
// registers pass stores its own float32 before, X and Y rounded.
TEST(DeltaRuleCuda, RegistersPassMatchesTheWarpPass) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  namespace d = hybrid::ops::detail;
  const int64_t C = 64, sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const at::Device gpu(at::kCUDA);
  const auto opt = at::TensorOptions().device(at::kCUDA);
  struct Shape {
    int64_t T;
    std::vector<int64_t> documents;  // lengths (B = 1), or none: B rows of T tokens
    bool reverse, keep;
    bool tokens = true;  // forward: V and o in the tokens, else in the chunk layout
    int64_t B = 1;
    int64_t V = 128;  // 256: two blocks of 128 columns a head
    at::ScalarType o_dtype = at::kFloat;  // of o in the tokens
    bool window = false;  // V from the tokens as a column window of wider rows (packed q, k, v)
    int64_t K = 128;
    bool narrow = false;  // heads few enough for the mma.sync pass's 32-column blocks, one an SM
  };
  // Heads enough for the mma.sync pass's wide tiles: 64 columns (K = 128 and V = 64) or 48 (K = 96,
  // V = 192) one block an SM, where 32-column blocks would be more than the SMs; or as many
  // 32-column blocks as SMs (narrow, one sequence).
  auto heads = [&](const Shape& s) {
    if (s.narrow) return sms / (s.V / 32);
    return s.K == 128 ? sms / 4 + 1 : s.V == 64 ? sms / 2 + 1 : sms / 4;
  };
  for (const d::StatePassKernel kernel : {d::StatePassKernel::kRegisters, d::StatePassKernel::kRegistersSingle})
  for (const Shape& s : {Shape{300, {}, false, true}, Shape{390, {100, 0, 290}, false, true},
                         Shape{300, {}, false, false}, Shape{300, {}, false, true, false},
                         Shape{200, {}, false, true, true, 2}, Shape{300, {}, true, true},
                         Shape{390, {100, 0, 290}, true, true}, Shape{200, {}, false, true, true, 2, 256},
                         Shape{300, {}, true, true, true, 1, 256},
                         Shape{390, {100, 0, 290}, false, true, true, 1, 128, at::kBFloat16},
                         Shape{200, {}, false, true, true, 2, 128, at::kFloat, true},
                         Shape{390, {100, 0, 290}, false, true, true, 1, 192, at::kBFloat16, false, 96},
                         Shape{300, {}, true, true, true, 1, 192, at::kFloat, false, 96},
                         Shape{200, {}, false, true, true, 2, 64, at::kFloat, false, 96},
                         Shape{390, {100, 0, 290}, true, true, true, 1, 64, at::kFloat, false, 96},
                         Shape{300, {}, false, true, true, 1, 128, at::kFloat, false, 128, true},
                         Shape{300, {}, true, true, true, 1, 128, at::kFloat, false, 128, true},
                         Shape{300, {}, false, true, true, 1, 192, at::kBFloat16, false, 96, true},
                         Shape{300, {}, true, true, true, 1, 192, at::kFloat, false, 96, true},
                         // Rows of whole chunks, o in bf16: the one-chain forward stores o by tiles.
                         Shape{256, {}, false, true, true, 2, 192, at::kBFloat16, false, 96},
                         Shape{256, {}, false, false, true, 2, 128, at::kBFloat16, false, 128}}) {
    const int64_t V = s.V, K = s.K, H = heads(s);
    at::manual_seed(41);
    const ChunkRuns layout = s.documents.empty() ? chunk_runs(std::vector<int64_t>(s.B, s.T), s.T, s.B * s.T)
                                                 : chunk_runs(s.documents, 0, s.T);
    const std::vector<int64_t>&chunk_offsets = layout.chunk_offsets, &gather = layout.gather, &runs = layout.runs;
    const int64_t NC = chunk_offsets.back(), N = static_cast<int64_t>(chunk_offsets.size()) - 1;
    ASSERT_TRUE(d::state_pass_on_registers(gpu, H, K, V, N, s.reverse));
    if (s.narrow) ASSERT_EQ(d::state_pass_value_tile(gpu, H, K, V, N, true), 32);
    d::StatePassInputs in = random_pass_inputs(H, K, V, chunk_offsets);
    in.reverse = s.reverse, in.want_before = s.keep;
    in.q_raw = (at::randn({H, NC, C, K}, opt) / std::sqrt(static_cast<double>(K))).to(at::kBFloat16);
    in.q_factor = at::rand({H, NC, C}, opt);
    in.add = at::randn({H, NC, C, V}, opt);
    if (s.reverse) {
      in.dO = at::randn({H, NC, C, V}, opt).to(at::kBFloat16).to(at::kFloat);  // bf16 values: taken in bf16 below
      in.add = in.add.to(at::kBFloat16).to(at::kFloat);                        // likewise
    } else {
      in.QKG = at::tril(at::randn({H, NC, C, C}, opt) * 0.1), in.output_scale = 0.3;
      if (s.tokens) {
        // A window: the values after 2 K columns of other heads' data in each token's row.
        const int64_t before_v = s.window ? 2 * K : 0;
        in.add_tokens = at::randn({s.B, s.T, before_v + H * V}, opt)
                            .to(at::kBFloat16)
                            .narrow(2, before_v, H * V)
                            .view({s.B, s.T, H, V});
        ASSERT_TRUE(d::state_pass_takes_value_tokens(in.add_tokens));
        if (!s.documents.empty()) in.add_token_runs = at::tensor(runs, at::kLong).to(at::kCUDA).view({NC, 2});
        in.o_tokens.wanted = true, in.o_tokens.B = s.B, in.o_tokens.T = s.T, in.o_tokens.dtype = s.o_dtype;
        if (!s.documents.empty()) in.o_tokens.gather = at::tensor(gather, at::kLong).to(at::kCUDA);
      }
    }
    in.kernel = d::StatePassKernel::kWarps;
    const d::StatePassOutputs warps = d::state_pass(in, s.keep);
    in.kernel = kernel;
    const d::StatePassOutputs registers = d::state_pass(in, s.keep);
    const std::string shape = std::string(kernel == d::StatePassKernel::kRegisters ? "pairs, " : "single, ") +
                              (s.reverse ? "reverse" : "forward") + (s.B > 1 ? ", two rows" : "") +
                              ", K " + std::to_string(K) + ", V " + std::to_string(V) +
                              (s.documents.empty() ? "" : ", documents") + (s.keep ? "" : ", nothing kept") +
                              (s.tokens ? "" : ", chunk layout") + (s.o_dtype == at::kFloat ? "" : ", bf16 o") +
                              (s.window ? ", V a window of the tokens" : "");
    for (auto [name, x, y] :
         {std::tuple{"before", registers.before, warps.before}, std::tuple{"X", registers.X, warps.X},
          std::tuple{"Y", registers.Y, warps.Y}, std::tuple{"final", registers.final_state, warps.final_state},
          std::tuple{"o", registers.o, warps.o}}) {
      ASSERT_EQ(x.defined(), y.defined()) << name << ", " << shape;
      if (!x.defined()) continue;
      EXPECT_TRUE(at::isfinite(x).all().item<bool>()) << name << ", " << shape;
      // o's products take S and Y rounded to bf16: where the two passes' S or Y differ by float32
      // rounding, a rounding can flip (2^-9 of that element); a bf16 o's own rounding likewise.
      const double bound = std::string(name) != "o" ? 2e-5 : s.o_dtype == at::kFloat ? 2e-4 : 1e-3;
      EXPECT_LT(rel_rms(x.to(at::kDouble), y.to(at::kDouble)), bound) << name << ", " << shape;
    }
    if (!s.keep) {
      // The forward forming o whole with nothing kept, asked for no Y: none stored, o and the final
      // state as with it (the mma.sync pass, asked the same, stores it).
      if (s.reverse) continue;
      in.want_y = false;
      const d::StatePassOutputs without_y = d::state_pass(in, s.keep);
      in.want_y = true;
      EXPECT_FALSE(without_y.Y.defined()) << shape;
      EXPECT_TRUE(at::equal(without_y.o, registers.o) && at::equal(without_y.final_state, registers.final_state))
          << "without Y, " << shape;
      continue;
    }
    // The kept intermediates in bf16 where asked (StatePassInputs::kept_bf16), reversed beside dO in
    // bf16 (the same values): the same values rounded, bit for bit, the final state and o as
    // before; the mma.sync pass keeps float32. Reversed, add comes in bf16 too (the same values,
    // Params::add16): the same results, bit for bit, on both kernels.
    in.kept_bf16 = true;
    if (s.reverse) {
      in.dO = in.dO.to(at::kBFloat16), in.add = in.add.to(at::kBFloat16);
      in.kept_bf16 = false;  // bf16 dO and add alone: read as float32, the same results
      const d::StatePassOutputs dO16 = d::state_pass(in, s.keep);
      EXPECT_TRUE(at::equal(dO16.Y, registers.Y) && at::equal(dO16.final_state, registers.final_state))
          << "bf16 dO and add without bf16 kept, " << shape;
      in.kept_bf16 = true;
    }
    const d::StatePassOutputs halves = d::state_pass(in, s.keep);
    for (auto [name, x, y] : {std::tuple{"before", halves.before, registers.before},
                              std::tuple{"X", halves.X, registers.X}, std::tuple{"Y", halves.Y, registers.Y}}) {
      ASSERT_EQ(x.scalar_type(), at::kBFloat16) << name << ", " << shape;
      EXPECT_TRUE(at::equal(x, y.to(at::kBFloat16))) << "bf16 " << name << ", " << shape;
    }
    EXPECT_TRUE(at::equal(halves.final_state, registers.final_state)) << "final with bf16 kept, " << shape;
    if (registers.o.defined()) EXPECT_TRUE(at::equal(halves.o, registers.o)) << "o with bf16 kept, " << shape;
    // The mma.sync pass asked for bf16: float32 on K = 128's 64-column tiles; at K = 96 and on
    // 32-column tiles alone on their SMs it boxes all three kept intermediates and keeps bf16
    // (WarpPassKeepsBf16WhereBoxed holds those).
    if (K == 96 || s.narrow) continue;
    in.kernel = d::StatePassKernel::kWarps;
    const d::StatePassOutputs warps_asked = d::state_pass(in, s.keep);
    EXPECT_EQ(warps_asked.before.scalar_type(), at::kFloat) << shape;
    EXPECT_EQ(warps_asked.Y.scalar_type(), at::kFloat) << shape;
    if (s.reverse)
      EXPECT_TRUE(at::equal(warps_asked.Y, warps.Y) && at::equal(warps_asked.final_state, warps.final_state))
          << "mma.sync pass with bf16 add, " << shape;
  }
}

// A reverse pass given no init (the op's backward without the final state's gradient) starts from
// zero in its kernel: every output bit for bit what zeros given as init give, on the mma.sync pass
// and on the registers kernel, over two documents.
TEST(DeltaRuleCuda, PassWithoutInitStartsAtZero) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  namespace d = hybrid::ops::detail;
  const int64_t C = 64, K = 96, V = 192, H = at::cuda::getCurrentDeviceProperties()->multiProcessorCount / 4;
  const auto opt = at::TensorOptions().device(at::kCUDA);
  const std::vector<int64_t> chunk_offsets = {0, 2, 5};
  const int64_t NC = chunk_offsets.back();
  at::manual_seed(47);
  d::StatePassInputs in = random_pass_inputs(H, K, V, chunk_offsets);
  in.reverse = true;
  in.q_raw = (at::randn({H, NC, C, K}, opt) / std::sqrt(static_cast<double>(K))).to(at::kBFloat16);
  in.q_factor = at::rand({H, NC, C}, opt);
  in.dO = at::randn({H, NC, C, V}, opt).to(at::kBFloat16);
  in.add = at::randn({H, NC, C, V}, opt).to(at::kBFloat16);
  in.kept_bf16 = true;
  const at::Tensor zero_init = at::zeros_like(in.init);
  for (const d::StatePassKernel kernel : {d::StatePassKernel::kWarps, d::StatePassKernel::kRegistersSingle}) {
    in.kernel = kernel;
    in.init = zero_init;
    const d::StatePassOutputs zeros = d::state_pass(in, true);
    in.init = at::Tensor();
    const d::StatePassOutputs none = d::state_pass(in, true);
    const std::string name = kernel == d::StatePassKernel::kWarps ? "mma.sync pass" : "registers pass";
    for (auto [what, x, y] : {std::tuple{"before", none.before, zeros.before}, std::tuple{"X", none.X, zeros.X},
                              std::tuple{"Y", none.Y, zeros.Y},
                              std::tuple{"final", none.final_state, zeros.final_state}}) {
      ASSERT_TRUE(x.defined() && y.defined()) << what << ", " << name;
      EXPECT_TRUE(at::equal(x, y)) << what << ", " << name;
    }
  }
}

// One pass of WarpPassKeepsBf16WhereBoxed (below) at a shape whose value tile is `tile`.
void keeps_bf16_where_boxed(int64_t H, int64_t K, int64_t V, int tile, bool reverse) {
  namespace d = hybrid::ops::detail;
  const int64_t C = 64;
  const auto opt = at::TensorOptions().device(at::kCUDA);
  const std::vector<int64_t> chunk_offsets = {0, 5};
  const int64_t NC = chunk_offsets.back();
  ASSERT_EQ(d::state_pass_value_tile(at::Device(at::kCUDA), H, K, V, 1, true), tile) << "K " << K;
  ASSERT_TRUE(d::state_pass_forms_output(at::Device(at::kCUDA), H, K, V, 1)) << "K " << K;
  at::manual_seed(43);
  d::StatePassInputs in = random_pass_inputs(H, K, V, chunk_offsets);
  in.reverse = reverse;
  in.q_raw = (at::randn({H, NC, C, K}, opt) / std::sqrt(static_cast<double>(K))).to(at::kBFloat16);
  in.q_factor = at::rand({H, NC, C}, opt);
  in.add = at::randn({H, NC, C, V}, opt);
  // dO (and add) of bf16 values, as o's gradient is where the op keeps bf16: float32 here, bf16 below.
  if (reverse) {
    in.dO = at::randn({H, NC, C, V}, opt).to(at::kBFloat16).to(at::kFloat);
    in.add = in.add.to(at::kBFloat16).to(at::kFloat);
  }
  else in.QKG = at::tril(at::randn({H, NC, C, C}, opt) * 0.1), in.output_scale = 0.3;
  in.kernel = d::StatePassKernel::kWarps;
  const d::StatePassOutputs full = d::state_pass(in, true);
  in.kept_bf16 = true;
  if (reverse) {  // the reverse pass keeps bf16 only beside dO in bf16
    const d::StatePassOutputs float_dO = d::state_pass(in, true);
    EXPECT_EQ(float_dO.Y.scalar_type(), at::kFloat) << "reverse with float32 dO";
    in.dO = in.dO.to(at::kBFloat16), in.add = in.add.to(at::kBFloat16);
  }
  const d::StatePassOutputs halves = d::state_pass(in, true);
  const std::string shape = (reverse ? "reverse K" : "forward K") + std::to_string(K);
  for (auto [name, x, y] : {std::tuple{"before", halves.before, full.before}, std::tuple{"X", halves.X, full.X},
                            std::tuple{"Y", halves.Y, full.Y}}) {
    ASSERT_EQ(x.scalar_type(), at::kBFloat16) << name << ", " << shape;
    EXPECT_TRUE(at::equal(x, y.to(at::kBFloat16))) << "bf16 " << name << ", " << shape;
  }
  EXPECT_TRUE(at::equal(halves.final_state, full.final_state)) << "final, " << shape;
  if (full.o.defined()) EXPECT_TRUE(at::equal(halves.o, full.o)) << "o, " << shape;
}

// Where the mma.sync pass boxes all three kept intermediates for its bulk stores (the 32-column
// tiles alone on their SM at K = 128, B2 T16384's; the 48-column tiles at K = 96, the OLMo
// shape's), it keeps them in bf16 when asked: its own float32 before, X and Y rounded, bit for bit,
// the final state and o unchanged; forward (the whole output) and reverse (the queries' extra,
// reading dO in bf16, beside which alone it keeps bf16, and add in bf16), one sequence of five
// chunks.
TEST(DeltaRuleCuda, WarpPassKeepsBf16WhereBoxed) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  struct Shape {
    int64_t H, K, V;
    int tile;
  };
  for (const Shape& s : {Shape{sms / 4, 128, 128, 32}, Shape{sms / 6 + 1, 96, 192, 48}})
    for (const bool reverse : {false, true}) keeps_bf16_where_boxed(s.H, s.K, s.V, s.tile, reverse);
}

// The pass writes o straight into the tokens, in o's dtype: a float32 o (output_dtype) from bf16
// inputs rounds to the bf16 one exactly, in rows and in documents (one empty).
TEST(DeltaRuleCuda, OutputIntoTheTokensInItsDtype) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  EXPECT_TRUE(hybrid::ops::detail::state_pass_forms_output(at::Device(at::kCUDA), 2, 64, 64, 3));
  for (const Case& c : {Case{2, 200, 2, 2, 64, 64, -0.5, 0, {}}, Case{1, 390, 2, 2, 64, 64, -0.5, 0, {100, 0, 290}}}) {
    const Inputs in = make(c, 26);
    const DeltaRuleOutput bf16 = run(in, at::kBFloat16, false, true, true);
    DeltaRuleArgs args;
    args.initial_state = in.h0.to(at::kFloat);
    args.output_dtype = at::kFloat;
    if (in.cu.defined()) args.cu_seqlens = in.cu;
    auto low = [](const at::Tensor& x) { return x.to(at::kBFloat16); };
    const at::Tensor o = hybrid::ops::chunk_gated_delta_rule(low(in.q), low(in.k), low(in.v), in.g.to(at::kFloat),
                                                             in.beta.to(at::kFloat), args)
                             .o;
    EXPECT_EQ(o.scalar_type(), at::kFloat);
    EXPECT_TRUE(at::equal(o.to(at::kBFloat16), bf16.o)) << (c.documents.empty() ? "rows" : "documents");
  }
}

TEST(DeltaRuleCuda, GroupedValueHeads) { check({2, 200, 2, 6, 64, 128, -0.5, 0, {}}, 3); }

TEST(DeltaRuleCuda, GateRegimes) {
  check({1, 500, 2, 2, 64, 64, -1e-4, 0, {}}, 4);   // almost no decay
  check({1, 500, 2, 2, 64, 64, -30, -5, {}}, 5);    // the state forgets at once
  check({1, 500, 2, 2, 64, 64, -30, 0, {}}, 6);     // both in one sequence
}

TEST(DeltaRuleCuda, VarlenManyShortDocuments) {
  std::vector<int64_t> docs;
  for (int i = 0; i < 120; ++i) docs.push_back(1 + (i * 37) % 90);
  docs.insert(docs.begin() + 7, 0);  // an empty document too
  int64_t T = 0;
  for (auto d : docs) T += d;
  check({1, T, 2, 2, 64, 128, -0.5, 0, docs}, 7);
}

TEST(DeltaRuleCuda, Float32Inputs) {
  Case c{1, 700, 2, 2, 96, 192, -0.5, 0, {}};
  c.dtype = at::kFloat;
  check(c, 8);
}

TEST(DeltaRuleCuda, Float32Products) {
  Case c{1, 700, 2, 2, 96, 192, -0.5, 0, {}};
  c.tf32_products = false;
  check(c, 8);
}

TEST(DeltaRuleCuda, RecomputedIntermediates) {
  Case c{1, 390, 2, 2, 96, 192, -0.5, 0, {100, 0, 290}};
  c.keep_intermediates = false;
  check(c, 10);
  Case rows{2, 200, 2, 2, 96, 192, -0.5, 0, {}};  // the recomputed forward pass reads v from the tokens too
  rows.keep_intermediates = false;
  check(rows, 27);
}

// q and k's L2 norm inside the op: with bf16 inputs its gradient comes from the finish kernel,
// written straight into the tokens (FinishTokens), where float32 inputs take the layout kernel's.
TEST(DeltaRuleCuda, NormInsideTheOp) {
  for (const std::vector<int64_t>& docs : {std::vector<int64_t>{}, {100, 0, 290}}) {
    for (at::ScalarType dtype : {at::kBFloat16, at::kFloat}) {
      Case c{docs.empty() ? 2 : 1, 390, 2, 2, 96, 192, -0.5, 0, docs};
      c.l2norm = true, c.dtype = dtype;
      check(c, 11);
    }
  }
  Case k256{1, 200, 2, 2, 256, 64, -0.5, 0, {}};  // the finish kernel's rows of two pieces a lane
  k256.l2norm = true;
  check(k256, 12);
}

// The gate (A_log, dt_bias, softplus) and beta (sigmoid, times 2) formed inside the op on their
// way into the chunk layout (delta_gates.h's kernels) against the same op given them formed by
// ATen in float32: o and every gradient (A_log's and dt_bias's too), rows of a batch and documents
// with an empty one, the raw inputs bf16 column windows of a wider tensor as the GDN layer's
// projection hands them over.
TEST(DeltaRuleCuda, GatesFormedInTheLayout) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  const int64_t H = 3, K = 64, V = 64;
  for (const bool documents : {false, true}) {
    at::manual_seed(61);
    const int64_t B = documents ? 1 : 2, T = 390;
    const at::Tensor q = at::randn({B, T, H, K}, cuda).to(at::kBFloat16), k = at::randn({B, T, H, K}, cuda).to(at::kBFloat16),
                     v = at::randn({B, T, H, V}, cuda).to(at::kBFloat16);
    const at::Tensor wide = (at::randn({B, T, 2 * H + 5}, cuda) * 2).to(at::kBFloat16);
    const at::Tensor a = wide.narrow(-1, 1, H), b = wide.narrow(-1, 1 + H, H);  // windows, stride 2 H + 5
    at::Tensor A_log = (at::rand({H}, cuda) * 2).requires_grad_(true), dt_bias = at::randn({H}, cuda).requires_grad_(true);
    at::Tensor a_leaf = a.detach().requires_grad_(true), b_leaf = b.detach().requires_grad_(true);
    DeltaRuleArgs args;
    args.qk_l2norm = true;
    if (documents) args.cu_seqlens = at::tensor(std::vector<int64_t>{0, 100, 100, 390}, at::kLong);
    DeltaRuleArgs fused = args;
    fused.A_log = A_log, fused.dt_bias = dt_bias, fused.beta_from_logit = fused.allow_neg_eigval = true;
    const at::Tensor dO = at::randn({B, T, H, V}, cuda).to(at::kBFloat16);
    auto grads = [&](const DeltaRuleOutput& out) {
      return torch::autograd::grad({out.o}, {a_leaf, b_leaf, A_log, dt_bias}, {dO});
    };
    const DeltaRuleOutput got = hybrid::ops::chunk_gated_delta_rule(q, k, v, a_leaf, b_leaf, fused);
    const auto got_grads = grads(got);
    const at::Tensor g = -A_log.exp() * at::softplus(a_leaf.to(at::kFloat) + dt_bias),
                     beta = 2 * at::sigmoid(b_leaf.to(at::kFloat));
    const DeltaRuleOutput ref = hybrid::ops::chunk_gated_delta_rule(q, k, v, g, beta, args);
    const auto ref_grads = grads(ref);
    const std::string layout = documents ? "documents" : "rows";
    EXPECT_LT(rel_rms(got.o.to(at::kDouble), ref.o.to(at::kDouble)), 1e-3) << layout;  // bf16 o: a rounding apart
    const char* names[] = {"a", "b", "A_log", "dt_bias"};
    for (int i = 0; i < 4; ++i) {
      ASSERT_EQ(got_grads[i].scalar_type(), ref_grads[i].scalar_type()) << names[i];
      EXPECT_LT(rel_rms(got_grads[i].to(at::kDouble), ref_grads[i].to(at::kDouble)), 1e-2) << names[i] << ", " << layout;
    }
  }
}

TEST(DeltaRuleCuda, MatchesTheTokenRecurrence) { check({1, 333, 1, 2, 32, 64, -0.3, 0, {}}, 9, true); }

// Fills the memory the caching allocator hands out next with NaN: an element a kernel forgets to
// write, or reads before it is written, then shows up as a NaN.
void poison_free_memory() {
  c10::cuda::CUDACachingAllocator::emptyCache();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<at::Tensor> junk;
  for (int64_t bytes = 512; bytes <= (int64_t{1} << 28); bytes *= 2)
    for (int i = 0; i < 4; ++i) junk.push_back(at::full({bytes / 4}, nan, at::TensorOptions().device(at::kCUDA)));
}
// Every output over memory poisoned with NaN first.
TEST(DeltaRuleCuda, OutputsAreFullyWrittenOverPoisonedMemory) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  poison_free_memory();
  check({1, 390, 2, 2, 96, 192, -0.5, 0, {100, 0, 290}}, 10);
}

// Where the last wave of the reverse pass's blocks leaves as many SMs idle as it holds (a chain a
// block on the registers kernel, bf16 kept, sequences of equal lengths: 20 heads of 96 / 192 and
// B2 T16384's 16 of 128 / 128 in one wave, 7b.yaml's micro batch of two rows of 30 heads of 96 /
// 192 in two on 132 SMs), wy_backward runs beside it on a stream of its own, taking each chunk's
// dV' as the pass hands it over: the same outputs and gradients bit for bit as with wy_backward
// after the pass (HYBRID_WY_BESIDE_PASS=0), each run over memory poisoned with NaN first, so that a
// chunk read before the pass wrote it cannot pass.
TEST(DeltaRuleCuda, WyBesideTheReversePass) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const at::Device gpu(at::kCUDA);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  for (const Case& c : {Case{1, 2048, 20, 20, 96, 192, -0.5, 0, {}}, Case{2, 2000, 16, 16, 128, 128, -0.3, 0, {}},
                        Case{2, 1000, 30, 30, 96, 192, -0.5, 0, {}}}) {
    ASSERT_TRUE(hybrid::ops::detail::state_pass_on_registers(gpu, c.Hv, c.K, c.V, c.B, /*reverse=*/true));
    if (2 * hybrid::ops::detail::last_wave_blocks(c.Hv * c.B, c.V / 64, sms) > sms) {
      std::printf("[ skipped  ] B%lld H%lld V%lld: the last wave leaves too few of %lld SMs\n", static_cast<long long>(c.B),
                  static_cast<long long>(c.Hv), static_cast<long long>(c.V), static_cast<long long>(sms));
      continue;
    }
    const Inputs in = make(c, 31);
    setenv("HYBRID_WY_BESIDE_PASS", "0", 1);
    const std::vector<at::Tensor> after = outputs_and_grads(in, c.dtype);
    unsetenv("HYBRID_WY_BESIDE_PASS");
    for (int run = 0; run < 3; ++run) {
      poison_free_memory();
      const std::vector<at::Tensor> beside = outputs_and_grads(in, c.dtype);
      for (size_t i = 0; i < after.size(); ++i)
        EXPECT_TRUE(at::equal(beside[i], after[i])) << kNames[i] << " K" << c.K << " run " << run;
    }
  }
}

// A forward without grad (inference, the first forward under activation checkpointing) keeps
// nothing, and where the pass adds the queries' share of o it writes no h either: o and the final
// state are those of a forward that keeps everything.
TEST(DeltaRuleCuda, ForwardWithoutGradEqualsWithGrad) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for (const Case& c : {Case{1, 640, 3, 3, 96, 192, -0.5, 0, {}}, Case{1, 300, 2, 2, 128, 128, -0.5, 0, {120, 180}}}) {
    const Inputs in = make(c, 13);
    Inputs leaf = in;
    for (auto* t : {&leaf.q, &leaf.k, &leaf.v, &leaf.g, &leaf.beta, &leaf.h0}) *t = t->detach().requires_grad_(true);
    const DeltaRuleOutput kept = run(leaf, c.dtype, false, true, true);
    DeltaRuleOutput bare;
    {
      c10::NoGradGuard no_grad;
      bare = run(in, c.dtype, false, true, true);
    }
    EXPECT_LT(rel_rms(bare.o, kept.o.detach().to(at::kDouble)), 1e-6) << "K " << c.K;
    EXPECT_LT(rel_rms(bare.final_state, kept.final_state.detach().to(at::kDouble)), 1e-6) << "K " << c.K;
  }
}

// Small shapes for compute-sanitizer (memcheck, racecheck): --gtest_filter=DeltaRuleCuda.Small*
TEST(DeltaRuleCuda, SmallForSanitizer) {
  check({1, 130, 1, 2, 32, 48, -0.5, 0, {}}, 11);
  check({1, 70, 1, 1, 16, 16, -0.5, 0, {3, 67}}, 12);
  if (!at::hasCUDA()) return;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  check({1, 70, sms / 6 + 1, sms / 6 + 1, 96, 192, -0.5, 0, {}}, 17);  // 48-column blocks
  check({1, 70, sms / 4 + 1, sms / 4 + 1, 128, 128, -0.5, 0, {}}, 24);  // 64-column blocks
}

}  // namespace
