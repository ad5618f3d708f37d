// The chunk-local kernels of the chunked delta rule (chunk_terms, wy_backward, finish_gradients) against their
// float64 ATen versions on the same inputs, output by output, so a failure names the term. The
// whole op is checked against float64 by test_delta_rule_cuda.cpp. Skips without a CUDA device.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cstdio>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "../src/ops/delta_chunk_terms.h"

namespace {
using hybrid::ops::detail::chunk_terms;
using hybrid::ops::detail::ChunkTerms;
using hybrid::ops::detail::finish_gradients;
using hybrid::ops::detail::FinishInputs;
using hybrid::ops::detail::FinishTokens;
using hybrid::ops::detail::wy_backward;
using hybrid::ops::detail::WyGrads;

// float64 inputs in the chunk layout [H, NC, 64, K], unit-norm q and k rows, beta in (0, 2).
struct Chunks {
  at::Tensor q, k, g, beta;
};

Chunks make(int64_t H, int64_t NC, int64_t K, double g_lo, double g_hi, uint64_t seed) {
  at::manual_seed(seed);
  auto opt = at::TensorOptions().dtype(at::kDouble).device(at::kCUDA);
  auto unit = [](at::Tensor x) { return x / x.norm(2, -1, true); };
  return {unit(at::randn({H, NC, 64, K}, opt)), unit(at::randn({H, NC, 64, K}, opt)),
          at::rand({H, NC, 64}, opt) * (g_hi - g_lo) + g_lo, at::rand({H, NC, 64}, opt) * 1.98 + 0.01};
}

at::Tensor f32(const at::Tensor& x) { return x.to(at::kFloat); }

// That call() is refused with an error naming `message` (`taken`: what it must not accept).
template <class F>
void expect_refused(F&& call, const char* taken, const char* message) {
  try {
    call();
    ADD_FAILURE() << taken << " was taken";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << e.what();
  }
}

// Relative RMS of got (float32) against ref (float64), checked and added to the printed line.
void expect_close(const char* name, const at::Tensor& got, const at::Tensor& ref, double tol, std::string& line) {
  ASSERT_TRUE(got.defined()) << name;
  EXPECT_EQ(got.scalar_type(), at::kFloat) << name;
  EXPECT_TRUE(at::isfinite(got).all().item<bool>()) << name << " has NaN or inf";
  const double err = ((got.to(at::kDouble) - ref).norm() / (ref.norm() + 1e-300)).item<double>();
  EXPECT_LT(err, tol) << name;
  char buf[48];
  std::snprintf(buf, sizeof buf, " %s %.1e", name, err);
  line += buf;
}

// The terms made of products (and the inverse), against the float64 ones.
void expect_products_close(const ChunkTerms& got, const ChunkTerms& ref, std::string& line) {
  expect_close("QKG", got.QKG, ref.QKG, 1e-5, line);
  expect_close("KKG", got.KKG, ref.KKG, 1e-5, line);
  expect_close("QG", got.QG, ref.QG, 5e-5, line);  // gamma's bound
  expect_close("Ag", got.Ag, ref.Ag, 1e-4, line);
  expect_close("T", got.T, ref.T, 1e-4, line);
}

// wy_backward's incoming gradients as their factors (dT = dV' W^T, dP = dO V'^T), [H, NC, 64, V]
// each, rounded to bf16 so that TF32 products of them (the kernel's, cuBLAS's) are exact: the
// comparison then sees the terms' own error.
hybrid::ops::detail::WyFactors make_factors(const at::Tensor& like, int64_t V) {
  auto factor = [&] {
    return at::randn({like.size(0), like.size(1), 64, V}, like.options()).to(at::kBFloat16).to(at::kDouble);
  };
  return {factor(), factor(), factor(), factor()};
}
hybrid::ops::detail::WyFactors f32(const hybrid::ops::detail::WyFactors& f) {
  return {f32(f.dvnew), f32(f.W), f32(f.dO), f32(f.vnew)};
}

struct Regime {
  double g_lo, g_hi;
};
constexpr Regime kRegimes[] = {{-0.5, 0}, {-1e-4, 0}, {-30, 0}};

TEST(DeltaRuleChunkTermsCuda, MatchFloat64) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for (int64_t K : {16, 48, 96, 128, 256})
    for (const Regime& r : kRegimes) {
      const Chunks x = make(3, 5, K, r.g_lo, r.g_hi, K);
      const ChunkTerms ref = chunk_terms(x.q, x.k, x.g, x.beta, /*for_backward=*/true);
      const ChunkTerms got = chunk_terms(f32(x.q), f32(x.k), f32(x.g), f32(x.beta), /*for_backward=*/true);
      std::string line = "K" + std::to_string(K) + " g in [" + std::to_string(r.g_lo) + ", 0]:";
      expect_close("gc", got.gc, ref.gc, 5e-5, line);
      // exp amplifies gc's float32 rounding by |gc| (up to 1900 here): the gates' own bound.
      expect_close("gamma", got.gamma, ref.gamma, 5e-5, line);
      expect_close("eta", got.eta, ref.eta, 5e-5, line);
      expect_close("last", got.last, ref.last, 5e-5, line);
      expect_products_close(got, ref, line);
      std::printf("[ errors   ] %s\n", line.c_str());
      // The forward asks for less, and gets the same T.
      const ChunkTerms fwd = chunk_terms(f32(x.q), f32(x.k), f32(x.g), f32(x.beta), /*for_backward=*/false);
      EXPECT_FALSE(fwd.Ag.defined() || fwd.KKG.defined());
      EXPECT_TRUE(at::equal(fwd.T, got.T) && at::equal(fwd.QKG, got.QKG));
    }
}

// With raw rows (bf16 inputs: q = diag(sq) q_raw with q_raw exact in bf16, as the chunk layout
// writes them) the kernel's products take q_raw and k_raw instead of q and k: the same terms, the
// float64 reference computed from what the raw rows stand for.
// With PassSplits the kernel writes T in split rows for the forward state pass, and T^T for the
// reverse one, in place of T, and QKG's split rows beside QKG: bit for bit split_chunk_matrices'
// layout of the T and QKG it would have written (a row's hi bf16 pairs, then its lo pairs; hi =
// bf16(x), lo = bf16(x - hi), both rounded to nearest even, as ATen rounds; word w of row r
// stored at w ^ 4 (r % 8), bf16_split.cuh's swizzle).
TEST(DeltaRuleChunkTermsCuda, SplitT) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  auto split = [](const at::Tensor& x) {
    const at::Tensor hi = x.to(at::kBFloat16), lo = (x - hi.to(at::kFloat)).to(at::kBFloat16);
    const at::Tensor rows = at::cat({hi.view(at::kInt), lo.view(at::kInt)}, -1);
    const at::Tensor r = at::arange(64, rows.options().dtype(at::kLong)).view({64, 1});
    const at::Tensor w = at::arange(64, rows.options().dtype(at::kLong)).view({1, 64});
    return rows.gather(-1, at::bitwise_xor(w, (r % 8) * 4).expand_as(rows));
  };
  const Chunks x = make(2, 5, 64, -0.5, 0, 29);
  for (bool for_backward : {false, true}) {
    const ChunkTerms whole = chunk_terms(f32(x.q), f32(x.k), f32(x.g), f32(x.beta), for_backward);
    hybrid::ops::detail::PassSplits splits;
    splits.T = splits.QKG = true;
    const ChunkTerms split_T = chunk_terms(f32(x.q), f32(x.k), f32(x.g), f32(x.beta), for_backward, true, {}, splits);
    EXPECT_FALSE(split_T.T.defined());
    EXPECT_TRUE(at::equal(split_T.T_split, split(whole.T)));
    EXPECT_EQ(split_T.Tt_split.defined(), for_backward);
    if (for_backward) EXPECT_TRUE(at::equal(split_T.Tt_split, split(whole.T.mT().contiguous())));
    EXPECT_TRUE(at::equal(split_T.QKG, whole.QKG));
    EXPECT_TRUE(at::equal(split_T.QKG_split, split(whole.QKG)));
    EXPECT_FALSE(whole.QKG_split.defined());
  }
}

TEST(DeltaRuleChunkTermsCuda, RawRowsMatchFloat64) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for (int64_t K : {16, 48, 96, 128, 256})
    for (const Regime& r : {kRegimes[0], kRegimes[1]}) {
      const Chunks x = make(3, 5, K, r.g_lo, r.g_hi, K + 1);
      auto raw_rows = [](const at::Tensor& unit) { return (unit * 3).to(at::kBFloat16); };  // not unit norm
      const at::Tensor q_raw = raw_rows(x.q), k_raw = raw_rows(x.k);
      const at::Tensor q_scale = q_raw.to(at::kFloat).norm(2, -1).reciprocal(),
                       k_scale = k_raw.to(at::kFloat).norm(2, -1).reciprocal();
      const at::Tensor q = q_raw.to(at::kDouble) * q_scale.to(at::kDouble).unsqueeze(-1),
                       k = k_raw.to(at::kDouble) * k_scale.to(at::kDouble).unsqueeze(-1);
      const ChunkTerms ref = chunk_terms(q, k, x.g, x.beta, /*for_backward=*/true);
      const hybrid::ops::detail::RawRows raw{k_raw, k_scale, q_raw, q_scale};
      const ChunkTerms got =
          chunk_terms(f32(q), f32(k), f32(x.g), f32(x.beta), /*for_backward=*/true, /*want_QG=*/true, raw);
      std::string line = "raw K" + std::to_string(K) + " g in [" + std::to_string(r.g_lo) + ", 0]:";
      expect_products_close(got, ref, line);
      std::printf("[ errors   ] %s\n", line.c_str());
    }
}

// With raw rows the kernel also writes the state passes' row factors (PassSplits::factors): the
// same floats ATen's products of gamma, eta and the scales give, which the passes took before.
TEST(DeltaRuleChunkTermsCuda, PassFactors) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const Chunks x = make(2, 5, 96, -0.5, 0, 31);
  const at::Tensor q_raw = (x.q * 3).to(at::kBFloat16), k_raw = (x.k * 3).to(at::kBFloat16);
  const at::Tensor q_scale = q_raw.to(at::kFloat).norm(2, -1).reciprocal(),
                   k_scale = k_raw.to(at::kFloat).norm(2, -1).reciprocal();
  const hybrid::ops::detail::RawRows raw{k_raw, k_scale, q_raw, q_scale};
  const at::Tensor q = q_raw.to(at::kFloat) * q_scale.unsqueeze(-1), k = k_raw.to(at::kFloat) * k_scale.unsqueeze(-1);
  hybrid::ops::detail::PassSplits splits;
  splits.T = splits.factors = true, splits.scale = 0.1;
  const ChunkTerms c = chunk_terms(q, k, f32(x.g), f32(x.beta), /*for_backward=*/true, /*want_QG=*/false, raw, splits);
  EXPECT_TRUE(at::equal(c.neg_gamma_k, -c.gamma * k_scale));
  EXPECT_TRUE(at::equal(c.eta_k, c.eta * k_scale));
  EXPECT_TRUE(at::equal(c.query_factor, c.gamma * q_scale * 0.1));
  splits.factors = false;  // not asked, or without raw rows: not made
  EXPECT_FALSE(chunk_terms(q, k, f32(x.g), f32(x.beta), true, false, raw, splits).neg_gamma_k.defined());
  splits.factors = true;
  EXPECT_FALSE(chunk_terms(q, k, f32(x.g), f32(x.beta), true, false, {}, splits).query_factor.defined());
}

TEST(DeltaRuleChunkTermsCuda, WyBackwardMatchesFloat64) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  // K = 48: a column half of 24 ends in an 8-column tile; K = 40 is not tiled and K = 256 would
  // hold one block an SM (batched products); K = 128 takes them in the queries' late place.
  for (const Regime& r : kRegimes) {
    for (int64_t K : {96, 128, 48, 40, 256}) {
      const Chunks x = make(2, 7, K, r.g_lo, r.g_hi, 17);
      const ChunkTerms ref_terms = chunk_terms(x.q, x.k, x.g, x.beta, /*for_backward=*/true);
      const auto factors = make_factors(x.q, 72);
      const WyGrads ref = wy_backward(ref_terms, factors, x.beta, 0.3, x.q, x.k, /*tf32=*/false);
      // The same terms in float32, so the comparison sees the kernel's error alone.
      ChunkTerms terms;
      terms.gc = f32(ref_terms.gc), terms.QKG = f32(ref_terms.QKG), terms.Ag = f32(ref_terms.Ag),
      terms.KKG = f32(ref_terms.KKG);
      // dq = dQK K and dk = dQK^T Q + dKK K in the kernel: 3xTF32, and plain TF32 (the op's default,
      // as its batched products: about 1e-3 relative error a product).
      for (bool tf32 : {false, true}) {
        const WyGrads got = wy_backward(terms, f32(factors), f32(x.beta), 0.3, f32(x.q), f32(x.k), tf32);
        std::string line = "wy backward K" + std::to_string(K) + (tf32 ? " (TF32 products)" : "") + ", g in [" +
                           std::to_string(r.g_lo) + ", 0]:";
        expect_close("dq", got.dq, ref.dq, tf32 ? 3e-3 : 1e-4, line);
        expect_close("dk", got.dk, ref.dk, tf32 ? 3e-3 : 1e-4, line);
        expect_close("dbeta", got.dbeta, ref.dbeta, 1e-4, line);
        expect_close("dgc", got.dgc, ref.dgc, 1e-4, line);
        std::printf("[ errors   ] %s\n", line.c_str());
      }
    }
  }
}

// A missing factor is named before any product reads it (on any device: the check comes first).
TEST(DeltaRuleChunkTerms, WyBackwardNamesAMissingFactor) {
  const at::Tensor rows = at::zeros({1, 1, 64, 16}), beta = at::zeros({1, 1, 64});
  const hybrid::ops::detail::WyFactors factors{rows, at::Tensor(), rows, rows};
  expect_refused([&] { wy_backward(ChunkTerms{}, factors, beta, 1.0, rows, rows, /*tf32=*/false); },
                 "a missing factor", "every factor (dvnew, W, dO, vnew)");
}

// The TF32 path from q and k's raw bf16 rows and scales (bf16 products with the C x C operands
// split, the scales folded in): more accurate than TF32 products of the float32 rows (16 bits of
// the C x C operand kept, the rows exact). K = 48: a column half of 24 ends in an 8-column tile.
// dT and dP formed in the kernel (wgmma on TMA slices) from V = 192, 128, 40, 36 and 12 (partial
// last slices, or at 12 one slice wider than V, filled with zeros past V), and by batched products
// at V = 30 (rows of no multiple of 16 bytes for TMA).
TEST(DeltaRuleChunkTermsCuda, WyBackwardFromRawRowsMatchesFloat64) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for (const Regime& r : kRegimes) {
    for (auto [K, V] : {std::pair<int64_t, int64_t>{96, 192}, {128, 128}, {48, 40}, {128, 36}, {96, 30}, {128, 12}}) {
      const Chunks x = make(2, 7, K, r.g_lo, r.g_hi, 19);
      const at::Tensor q_raw = (x.q * 3).to(at::kBFloat16), k_raw = (x.k * 3).to(at::kBFloat16);  // not unit norm
      const at::Tensor q_scale = q_raw.to(at::kFloat).norm(2, -1).reciprocal(),
                       k_scale = k_raw.to(at::kFloat).norm(2, -1).reciprocal();
      const at::Tensor q = q_raw.to(at::kDouble) * q_scale.to(at::kDouble).unsqueeze(-1),
                       k = k_raw.to(at::kDouble) * k_scale.to(at::kDouble).unsqueeze(-1);
      const ChunkTerms ref_terms = chunk_terms(q, k, x.g, x.beta, /*for_backward=*/true);
      const auto factors = make_factors(q, V);
      const WyGrads ref = wy_backward(ref_terms, factors, x.beta, 0.3, q, k, /*tf32=*/false);
      ChunkTerms terms;
      terms.gc = f32(ref_terms.gc), terms.QKG = f32(ref_terms.QKG), terms.Ag = f32(ref_terms.Ag),
      terms.KKG = f32(ref_terms.KKG);
      const hybrid::ops::detail::RawRows raw{k_raw, k_scale, q_raw, q_scale};
      const WyGrads got =
          wy_backward(terms, f32(factors), f32(x.beta), 0.3, f32(q), f32(k), /*tf32=*/true, &raw);
      std::string line = "wy backward raw K" + std::to_string(K) + " V" + std::to_string(V) + ", g in [" +
                         std::to_string(r.g_lo) + ", 0]:";
      expect_close("dq", got.dq, ref.dq, 1e-4, line);
      expect_close("dk", got.dk, ref.dk, 1e-4, line);
      expect_close("dbeta", got.dbeta, ref.dbeta, 1e-4, line);
      expect_close("dgc", got.dgc, ref.dgc, 1e-4, line);
      std::printf("[ errors   ] %s\n", line.c_str());
    }
  }
}

// The products inside the kernel (K up to 128; V = 40 and 72 end in a partial slice, also on
// wgmma at K = 128 and 96 with TF32, whose TMA boxes fill past V with zeros, and V = 8 is less than
// one slice there, a box wider than its tensor; K = 48 gives each warp three column tiles), and
// given to it at K = 256; 3xTF32 and TF32 products. The wgmma instances also form <dS_C, S0>
// from their slices where no state_dot is given (against the float64 <dS_C, S0>).
TEST(DeltaRuleChunkTermsCuda, FinishGradientsMatchFloat64) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for (auto [K, V] : {std::pair<int64_t, int64_t>{96, 192}, {128, 128}, {16, 32}, {48, 40}, {256, 64}, {128, 40},
                      {96, 72}, {128, 8}, {96, 8}}) {
    for (bool tf32 : {false, true}) {
      const Chunks x = make(2, 3, K, -0.5, 0, 23);
      const ChunkTerms terms = chunk_terms(x.q, x.k, x.g, x.beta, /*for_backward=*/false);
      auto values = [&](int64_t rows) { return at::randn({2, 3, rows, V}, x.q.options()); };
      FinishInputs ref;
      ref.q = x.q, ref.k = x.k, ref.dO = values(64), ref.dW = values(64), ref.vnew = values(64);
      ref.h = values(K), ref.dhC = values(K);
      ref.gamma = terms.gamma, ref.eta = terms.eta, ref.wy_dgc = at::randn_like(terms.gamma), ref.last = terms.last;
      ref.state_dot = at::randn({2, 3, V / 16 + 1}, x.q.options());  // partial sums, as the state pass gives them
      ref.scale = 0.3;
      FinishInputs in = ref;
      in.tf32 = tf32;
      for (at::Tensor* t : {&in.q, &in.k, &in.dO, &in.dW, &in.vnew, &in.h, &in.dhC, &in.gamma, &in.eta, &in.wy_dgc,
                            &in.last, &in.state_dot})
        *t = f32(*t);
      at::Tensor dq_ref = at::randn_like(x.q), dk_ref = at::randn_like(x.q);
      at::Tensor dq = f32(dq_ref), dk = f32(dk_ref);
      const at::Tensor dgc_ref = finish_gradients(ref, dq_ref, dk_ref), dgc = finish_gradients(in, dq, dk);
      std::string line = "finish K" + std::to_string(K) + " V" + std::to_string(V) + (tf32 ? " (TF32 products):" : ":");
      const double tol = tf32 ? 3e-3 : 1e-5;
      expect_close("dq", dq, dq_ref, tol, line);
      expect_close("dk", dk, dk_ref, tol, line);
      expect_close("dgc", dgc, dgc_ref, tol, line);
      if (tf32 && (K == 96 || K == 128)) {  // <dS_C, S0> formed by the wgmma instances from their slices
        FinishInputs ref_formed = ref, formed = in;
        ref_formed.state_dot = formed.state_dot = at::Tensor();
        at::Tensor dq_ref2 = at::randn_like(x.q), dk_ref2 = at::randn_like(x.q);
        at::Tensor dq2 = f32(dq_ref2), dk2 = f32(dk_ref2);
        const at::Tensor want = finish_gradients(ref_formed, dq_ref2, dk_ref2), got = finish_gradients(formed, dq2, dk2);
        expect_close("dgc (dot formed)", got, want, tol, line);
      }
      std::printf("[ errors   ] %s\n", line.c_str());
    }
  }
}

// Into the tokens (the op's path from bf16 tokens): dv = dW from the finish kernel's slices, bit
// for bit dW rounded to bf16 in each chunk row's token (one batch row: token 64 c + r is chunk
// c's row r); a dv it cannot write, or one without dq and dk, is refused with a message.
TEST(DeltaRuleChunkTermsCuda, FinishWritesDvIntoTheTokens) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  // Both slice widths (32 columns at K = 96, 16 at 128: the wgmma instances' two swizzles), the
  // second ending in a partial slice.
  for (auto [K, V] : {std::pair<int64_t, int64_t>{96, 192}, {128, 72}}) {
    const int64_t H = 2, NC = 3, T = NC * 64;
    const Chunks x = make(H, NC, K, -0.5, 0, 29);
    const ChunkTerms terms = chunk_terms(x.q, x.k, x.g, x.beta, /*for_backward=*/false);
    auto values = [&](int64_t rows) { return at::randn({H, NC, rows, V}, x.q.options().dtype(at::kFloat)); };
    FinishInputs in;
    in.q = f32(x.q), in.k = f32(x.k), in.dO = values(64), in.dW = values(64), in.vnew = values(64);
    in.h = values(K), in.dhC = values(K);
    in.gamma = f32(terms.gamma), in.eta = f32(terms.eta), in.wy_dgc = at::randn_like(in.gamma);
    in.last = f32(terms.last);
    in.state_dot = at::randn({H, NC, 4}, in.q.options());
    in.tf32 = true;
    const auto bf16 = in.q.options().dtype(at::kBFloat16);
    in.tokens.dq = at::empty({1, T, H, K}, bf16), in.tokens.dk = at::empty({1, T, H, K}, bf16);
    in.tokens.dv = at::full({1, T, H, V}, std::numeric_limits<float>::quiet_NaN(), bf16);
    at::Tensor dq = at::randn_like(in.q), dk = at::randn_like(in.q);
    finish_gradients(in, dq, dk);
    const at::Tensor expected = in.dW.reshape({H, T, V}).transpose(0, 1).unsqueeze(0).to(at::kBFloat16);
    EXPECT_TRUE(at::equal(in.tokens.dv, expected)) << "K " << K << " V " << V;

    FinishInputs wrong_dtype = in;
    wrong_dtype.tokens.dv = at::empty({1, T, H, V}, in.q.options());
    expect_refused([&] { finish_gradients(wrong_dtype, dq, dk); }, "a float32 dv", "dv into the tokens only where");
    FinishInputs without_dq = in;
    without_dq.tokens = FinishTokens{};
    without_dq.tokens.dv = in.tokens.dv;
    expect_refused([&] { finish_gradients(without_dq, dq, dk); }, "dv without dq and dk",
                   "dv into the tokens only beside dq and dk");
  }
}

// The row pass from q and k's raw bf16 rows and their scales (the op's path at K = 96 and 128)
// writes the same token gradients and dgc, bit for bit, as from the float32 rows q = raw s; with
// the norm's backward and without it. A partial set of raw rows is refused with a message.
TEST(DeltaRuleChunkTermsCuda, FinishFromRawRowsEqualsFloatRows) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for (const int64_t K : {96, 128}) {
    for (const bool norm : {true, false}) {
      const int64_t H = 2, NC = 3, V = 64, T = NC * 64;
      const Chunks x = make(H, NC, K, -0.5, 0, 31);
      const ChunkTerms terms = chunk_terms(x.q, x.k, x.g, x.beta, /*for_backward=*/false);
      const auto opt = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
      const at::Tensor q_raw = at::randn({H, NC, 64, K}, opt).to(at::kBFloat16),
                       k_raw = at::randn({H, NC, 64, K}, opt).to(at::kBFloat16);
      auto scale_of = [&](const at::Tensor& raw) {
        return norm ? raw.to(at::kFloat).norm(2, -1).reciprocal() : at::ones({H, NC, 64}, opt);
      };
      const at::Tensor q_scale = scale_of(q_raw), k_scale = scale_of(k_raw);
      FinishInputs in;
      in.q = q_raw.to(at::kFloat) * q_scale.unsqueeze(-1), in.k = k_raw.to(at::kFloat) * k_scale.unsqueeze(-1);
      auto values = [&](int64_t rows) { return at::randn({H, NC, rows, V}, opt); };
      in.dO = values(64), in.dW = values(64), in.vnew = values(64), in.h = values(K), in.dhC = values(K);
      in.gamma = f32(terms.gamma), in.eta = f32(terms.eta), in.wy_dgc = at::randn_like(in.gamma);
      in.last = f32(terms.last), in.state_dot = at::randn({H, NC, 4}, opt), in.scale = 0.3, in.tf32 = true;
      const auto bf16 = opt.dtype(at::kBFloat16);
      if (norm) in.tokens.q_scale = q_scale, in.tokens.k_scale = k_scale;
      const at::Tensor dq0 = at::randn({H, NC, 64, K}, opt), dk0 = at::randn({H, NC, 64, K}, opt);
      auto run = [&](const FinishInputs& f) {
        FinishInputs g = f;
        g.tokens.dq = at::empty({1, T, H, K}, bf16), g.tokens.dk = at::empty({1, T, H, K}, bf16);
        g.tokens.dv = at::empty({1, T, H, V}, bf16);
        at::Tensor dq = dq0.clone(), dk = dk0.clone();
        const at::Tensor dgc = finish_gradients(g, dq, dk);
        return std::vector<at::Tensor>{g.tokens.dq, g.tokens.dk, g.tokens.dv, dgc};
      };
      FinishInputs raw = in;
      raw.tokens.q_raw = q_raw, raw.tokens.k_raw = k_raw, raw.tokens.q_raw_scale = q_scale;
      raw.tokens.k_raw_scale = k_scale;
      const std::vector<at::Tensor> want = run(in), got = run(raw);
      const char* names[] = {"dq", "dk", "dv", "dgc"};
      for (int i = 0; i < 4; ++i)
        EXPECT_TRUE(at::equal(got[i], want[i])) << names[i] << " K " << K << (norm ? " with the norm" : "");

      FinishInputs partial = raw;
      partial.tokens.k_raw_scale = at::Tensor();
      expect_refused([&] { run(partial); }, "raw rows without the keys' scales", "raw rows bf16");
    }
  }
}

// The op's path into the finish kernel: q and k as raw bf16 rows (three times unit rows) and their
// norms' scales, the chunk terms of q, k and float32 WY factors, for chunks of H heads.
struct RawRowsCase {
  Chunks x;
  at::Tensor q_raw, k_raw, q_scale, k_scale, q, k;
  ChunkTerms terms;
  hybrid::ops::detail::RawRows raw;
  hybrid::ops::detail::WyFactors factors;
};
RawRowsCase raw_rows_case(int64_t H, int64_t NC, int64_t K, int64_t V, uint64_t seed) {
  RawRowsCase c;
  c.x = make(H, NC, K, -0.5, 0, seed);
  c.q_raw = (c.x.q * 3).to(at::kBFloat16), c.k_raw = (c.x.k * 3).to(at::kBFloat16);
  c.q_scale = c.q_raw.to(at::kFloat).norm(2, -1).reciprocal(), c.k_scale = c.k_raw.to(at::kFloat).norm(2, -1).reciprocal();
  c.q = c.q_raw.to(at::kFloat) * c.q_scale.unsqueeze(-1), c.k = c.k_raw.to(at::kFloat) * c.k_scale.unsqueeze(-1);
  c.terms = chunk_terms(c.q, c.k, f32(c.x.g), f32(c.x.beta), /*for_backward=*/true);
  c.raw = hybrid::ops::detail::RawRows{c.k_raw, c.k_scale, c.q_raw, c.q_scale};
  c.factors = f32(make_factors(c.x.q, V));
  return c;
}

// The op's path at K = 96 and 128: wy_backward leaves dq and dk's products to the finish kernel
// (WyGrads::split), which forms them on its own accumulators; the tokens and dgc match the path
// where wy_backward writes float32 dq, dk for the finish kernel to read (the same products in
// another order: to a bf16 rounding of the tokens, float32 rounding of dgc). The split operands
// are refused where the kernel cannot take them.
TEST(DeltaRuleChunkTermsCuda, FinishFormsTheWyProducts) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for (auto [K, V] : {std::pair<int64_t, int64_t>{96, 192}, {128, 128}, {128, 40}}) {
    const int64_t H = 2, NC = 3, T = NC * 64;
    const RawRowsCase r = raw_rows_case(H, NC, K, V, 37);
    const auto opt = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
    FinishInputs in;
    in.q = r.q, in.k = r.k, in.dO = r.factors.dO, in.vnew = r.factors.vnew;
    in.dW = at::randn({H, NC, 64, V}, opt), in.h = at::randn({H, NC, K, V}, opt), in.dhC = at::randn({H, NC, K, V}, opt);
    in.gamma = r.terms.gamma, in.eta = r.terms.eta, in.last = r.terms.last, in.state_dot = at::randn({H, NC, 4}, opt);
    in.scale = 0.3, in.tf32 = true;
    in.tokens.q_scale = r.q_scale, in.tokens.k_scale = r.k_scale;
    in.tokens.q_raw = r.q_raw, in.tokens.k_raw = r.k_raw, in.tokens.q_raw_scale = r.q_scale, in.tokens.k_raw_scale = r.k_scale;
    auto run = [&](bool leave_products, bool dot_given) {
      WyGrads wy = wy_backward(r.terms, r.factors, f32(r.x.beta), 0.3, r.q, r.k, /*tf32=*/true, &r.raw, leave_products);
      EXPECT_EQ(wy.split.defined(), leave_products) << "K " << K << " V " << V;
      FinishInputs f = in;
      if (!dot_given) f.state_dot = at::Tensor();  // formed from the slices, as in the op
      f.wy_dgc = wy.dgc, f.wy_split = wy.split;
      const auto bf16 = opt.dtype(at::kBFloat16);
      f.tokens.dq = at::empty({1, T, H, K}, bf16), f.tokens.dk = at::empty({1, T, H, K}, bf16);
      const at::Tensor dgc = finish_gradients(f, wy.dq, wy.dk);
      return std::vector<at::Tensor>{f.tokens.dq, f.tokens.dk, dgc};
    };
    for (const bool dot_given : {true, false}) {
      const std::vector<at::Tensor> want = run(false, dot_given), got = run(true, dot_given);
      std::string line = "finish with the WY products K" + std::to_string(K) + " V" + std::to_string(V) +
                         (dot_given ? ":" : " (dot formed):");
      expect_close("dq", got[0].to(at::kFloat), want[0].to(at::kDouble), 2e-3, line);
      expect_close("dk", got[1].to(at::kFloat), want[1].to(at::kDouble), 2e-3, line);
      expect_close("dgc", got[2], want[2].to(at::kDouble), 1e-5, line);
      std::printf("[ errors   ] %s\n", line.c_str());
    }

    FinishInputs float_rows = in;  // the instance without the raw rows cannot take them
    float_rows.tokens.q_raw = float_rows.tokens.k_raw = float_rows.tokens.q_raw_scale = float_rows.tokens.k_raw_scale =
        at::Tensor();
    float_rows.wy_dgc = at::zeros_like(in.gamma), float_rows.wy_split = at::zeros({H, NC, 2, 64, 64}, opt);
    float_rows.tokens.dq = at::empty({1, T, H, K}, opt.dtype(at::kBFloat16)), float_rows.tokens.dk = float_rows.tokens.dq;
    at::Tensor none;
    expect_refused([&] { finish_gradients(float_rows, none, none); }, "the WY split operands without the raw rows",
                   "the WY split operands");
  }
}

// The state passes keep dW, V', h and dS_C in bf16 where the op's finish kernel takes them
// (finish_takes_bf16_kept: the instances with the WY products, K = 96 and 128), and dO comes in
// bf16 with them: its bf16 products match the TF32 products from the same values in float32 (exact
// in TF32), to a bf16 rounding of the tokens; dv, dW copied, bit for bit; a partial last slice (V =
// 40) included. Where only some of the five are bf16, finish_gradients takes all five in float32:
// the same result, bit for bit.
TEST(DeltaRuleChunkTermsCuda, FinishTakesBf16Kept) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  ASSERT_TRUE(hybrid::ops::detail::finish_takes_bf16_kept(128, 128, /*tf32=*/true));
  ASSERT_TRUE(hybrid::ops::detail::finish_takes_bf16_kept(96, 192, /*tf32=*/true));
  EXPECT_FALSE(hybrid::ops::detail::finish_takes_bf16_kept(64, 64, /*tf32=*/true));
  EXPECT_FALSE(hybrid::ops::detail::finish_takes_bf16_kept(128, 128, /*tf32=*/false));
  for (const auto [K, V] : {std::pair<int64_t, int64_t>{128, 128}, {128, 40}, {96, 192}, {96, 40}}) {
    const int64_t H = 2, NC = 3, T = NC * 64;
    const RawRowsCase r = raw_rows_case(H, NC, K, V, 41);
    const auto opt = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
    const auto bf16 = opt.dtype(at::kBFloat16);
    auto half = [&](std::vector<int64_t> sizes) { return at::randn(sizes, opt).to(at::kBFloat16); };
    const std::vector<at::Tensor> kept16 = {r.factors.dO.to(at::kBFloat16), half({H, NC, 64, V}),
                                            r.factors.vnew.to(at::kBFloat16), half({H, NC, K, V}),
                                            half({H, NC, K, V})};  // dO, dW, V', h, dhC
    FinishInputs in;
    in.q = r.q, in.k = r.k;
    in.gamma = r.terms.gamma, in.eta = r.terms.eta, in.last = r.terms.last, in.scale = 0.3, in.tf32 = true;
    in.tokens.q_scale = r.q_scale, in.tokens.k_scale = r.k_scale;
    in.tokens.q_raw = r.q_raw, in.tokens.k_raw = r.k_raw, in.tokens.q_raw_scale = r.q_scale, in.tokens.k_raw_scale = r.k_scale;
    const WyGrads wy = wy_backward(r.terms, r.factors, f32(r.x.beta), 0.3, r.q, r.k, /*tf32=*/true, &r.raw,
                                   /*leave_products=*/true);
    auto run = [&](const std::vector<at::Tensor>& kept) {
      FinishInputs f = in;
      f.dO = kept[0], f.dW = kept[1], f.vnew = kept[2], f.h = kept[3], f.dhC = kept[4];
      f.wy_dgc = wy.dgc, f.wy_split = wy.split;  // <dS_C, S0> formed, as in the op
      f.tokens.dq = at::empty({1, T, H, K}, bf16), f.tokens.dk = at::empty({1, T, H, K}, bf16);
      f.tokens.dv = at::empty({1, T, H, V}, bf16);
      at::Tensor dq = wy.dq, dk = wy.dk;
      const at::Tensor dgc = finish_gradients(f, dq, dk);
      return std::vector<at::Tensor>{f.tokens.dq, f.tokens.dk, dgc, f.tokens.dv};
    };
    std::vector<at::Tensor> kept32;
    for (const at::Tensor& x : kept16) kept32.push_back(f32(x));
    const std::vector<at::Tensor> want = run(kept32), got = run(kept16);
    std::string line = "finish from bf16 kept operands K" + std::to_string(K) + " V" + std::to_string(V) + ":";
    expect_close("dq", got[0].to(at::kFloat), want[0].to(at::kDouble), 2e-3, line);
    expect_close("dk", got[1].to(at::kFloat), want[1].to(at::kDouble), 2e-3, line);
    expect_close("dgc", got[2], want[2].to(at::kDouble), 1e-4, line);
    std::printf("[ errors   ] %s\n", line.c_str());
    EXPECT_TRUE(at::equal(got[3], want[3])) << "dv K " << K << " V " << V;
    for (const int float_one : {4, 0}) {  // dhC, or dO alone in float32
      std::vector<at::Tensor> some = kept16;
      some[float_one] = kept32[float_one];
      const std::vector<at::Tensor> mixed = run(some);
      for (int i = 0; i < 4; ++i)
        EXPECT_TRUE(at::equal(mixed[i], want[i]))
            << "mixed (" << float_one << " float32), output " << i << " K " << K << " V " << V;
    }
  }
}

// From bf16 factors wy_backward leaves R alone where the finish kernel's instance that forms dP fits
// (finish_forms_wy_dp), and that instance forms dP = dO V'^T, S and dP's share of dgc itself, from
// dO and V' (the same bf16 values as the factors'), gc and QKG: the tokens, dgc and dv as where
// wy_backward forms S from float32 factors of the same values and the finish kernel takes S and R
// (the same products in another order); dbeta as there. V = 40: a partial slice; V = 256 at K = 96
// does not fit, so S and R both come out as before. A split of R alone is refused where the
// finish's operands are float32.
TEST(DeltaRuleChunkTermsCuda, FinishFormsDpFromBf16Factors) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  using hybrid::ops::detail::finish_forms_wy_dp;
  ASSERT_TRUE(finish_forms_wy_dp(96, 192));
  ASSERT_TRUE(finish_forms_wy_dp(128, 128));
  EXPECT_FALSE(finish_forms_wy_dp(96, 256));
  EXPECT_FALSE(finish_forms_wy_dp(64, 64));
  for (const auto [K, V] : {std::pair<int64_t, int64_t>{96, 192}, {128, 128}, {96, 40}, {128, 40}, {96, 256}}) {
    const int64_t H = 2, NC = 3, T = NC * 64;
    const RawRowsCase r = raw_rows_case(H, NC, K, V, 53);
    const auto opt = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
    const auto bf16 = opt.dtype(at::kBFloat16);
    auto low = [](const at::Tensor& x) { return x.to(at::kBFloat16); };
    hybrid::ops::detail::WyFactors f16 = r.factors;
    f16.dO = low(r.factors.dO), f16.vnew = low(f16.vnew), f16.dvnew = low(f16.dvnew), f16.W = low(f16.W);
    FinishInputs in;
    in.q = r.q, in.k = r.k, in.dO = f16.dO, in.vnew = f16.vnew;
    in.dW = low(at::randn({H, NC, 64, V}, opt)), in.h = low(at::randn({H, NC, K, V}, opt));
    in.dhC = low(at::randn({H, NC, K, V}, opt));
    in.gamma = r.terms.gamma, in.eta = r.terms.eta, in.last = r.terms.last, in.scale = 0.3, in.tf32 = true;
    in.gc = r.terms.gc, in.QKG = r.terms.QKG;
    in.tokens.q_scale = r.q_scale, in.tokens.k_scale = r.k_scale;
    in.tokens.q_raw = r.q_raw, in.tokens.k_raw = r.k_raw, in.tokens.q_raw_scale = r.q_scale, in.tokens.k_raw_scale = r.k_scale;
    auto run = [&](const hybrid::ops::detail::WyFactors& factors, int64_t planes) {
      const WyGrads wy = wy_backward(r.terms, factors, f32(r.x.beta), 0.3, r.q, r.k, /*tf32=*/true, &r.raw,
                                     /*leave_products=*/true);
      EXPECT_EQ(wy.split.size(2), planes) << "K " << K << " V " << V;
      FinishInputs f = in;
      f.wy_dgc = wy.dgc, f.wy_split = wy.split;
      f.tokens.dq = at::empty({1, T, H, K}, bf16), f.tokens.dk = at::empty({1, T, H, K}, bf16);
      f.tokens.dv = at::empty({1, T, H, V}, bf16);
      at::Tensor dq = wy.dq, dk = wy.dk;
      const at::Tensor dgc = finish_gradients(f, dq, dk);
      return std::vector<at::Tensor>{f.tokens.dq, f.tokens.dk, dgc, f.tokens.dv, wy.dbeta};
    };
    const bool fits = finish_forms_wy_dp(K, V);
    const std::vector<at::Tensor> want = run(f32(f16), 2), got = run(f16, fits ? 1 : 2);
    std::string line = "finish forming dP from bf16 factors K" + std::to_string(K) + " V" + std::to_string(V) +
                       (fits ? ":" : " (S and R given):");
    expect_close("dq", got[0].to(at::kFloat), want[0].to(at::kDouble), 2e-3, line);
    expect_close("dk", got[1].to(at::kFloat), want[1].to(at::kDouble), 2e-3, line);
    expect_close("dgc", got[2], want[2].to(at::kDouble), 1e-4, line);
    expect_close("dbeta", got[4], want[4].to(at::kDouble), 1e-5, line);
    std::printf("[ errors   ] %s\n", line.c_str());
    EXPECT_TRUE(at::equal(got[3], want[3])) << "dv K " << K << " V " << V;
    if (!fits) continue;
    FinishInputs float_kept = in;  // R alone with float32 operands: no instance takes it
    for (at::Tensor* x : {&float_kept.dO, &float_kept.dW, &float_kept.vnew, &float_kept.h, &float_kept.dhC}) *x = f32(*x);
    float_kept.wy_dgc = at::zeros_like(in.gamma), float_kept.wy_split = at::zeros({H, NC, 1, 64, 64}, opt);
    float_kept.tokens.dq = at::empty({1, T, H, K}, bf16), float_kept.tokens.dk = float_kept.tokens.dq;
    at::Tensor none;
    expect_refused([&] { finish_gradients(float_kept, none, none); }, "R alone with float32 operands",
                   "a WY split of R alone");
  }
}

// wy_backward's factor products take V', dV' and W in bf16 (the state passes' kept copies) and dO
// (o's bf16 gradient): the same dq, dk, dbeta and dgc as from those values in float32 (exact in
// TF32 there, the products in another order), V = 128 and a partial slice (V = 40); with only some
// of them bf16 (W, or dO, in float32), all in float32: the float32 result, bit for bit.
TEST(DeltaRuleChunkTermsCuda, WyBackwardTakesBf16Factors) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  for (const int64_t V : {128, 40}) {
    const int64_t H = 2, NC = 3, K = 128;
    const RawRowsCase r = raw_rows_case(H, NC, K, V, 43);
    auto low = [](const at::Tensor& x) { return x.to(at::kBFloat16); };
    hybrid::ops::detail::WyFactors f16 = r.factors;
    f16.dO = low(r.factors.dO), f16.vnew = low(f16.vnew), f16.dvnew = low(f16.dvnew), f16.W = low(f16.W);
    const hybrid::ops::detail::WyFactors f32s = f32(f16);
    auto run = [&](const hybrid::ops::detail::WyFactors& f) {
      const WyGrads w = wy_backward(r.terms, f, f32(r.x.beta), 0.3, r.q, r.k, /*tf32=*/true, &r.raw);
      return std::vector<at::Tensor>{w.dq, w.dk, w.dbeta, w.dgc};
    };
    const std::vector<at::Tensor> want = run(f32s), got = run(f16);
    std::string line = "wy_backward from bf16 factors V" + std::to_string(V) + ":";
    const char* names[] = {"dq", "dk", "dbeta", "dgc"};
    for (int i = 0; i < 4; ++i) expect_close(names[i], got[i], want[i].to(at::kDouble), 1e-5, line);
    std::printf("[ errors   ] %s\n", line.c_str());
    for (const bool dO_float : {false, true}) {
      hybrid::ops::detail::WyFactors some = f16;
      if (dO_float) some.dO = f32s.dO;
      else some.W = f32s.W;
      const std::vector<at::Tensor> mixed = run(some);
      for (int i = 0; i < 4; ++i)
        EXPECT_TRUE(at::equal(mixed[i], want[i]))
            << "mixed factors (" << (dO_float ? "dO" : "W") << " float32), " << names[i] << " V " << V;
    }
  }
}

// wy_backward gives the same dbeta and dgc, bit for bit, at every run: its column sums add the
// warps' parts in a fixed order (shared-memory atomics added them in the order the warps came,
// which varied between runs). Each path: the float32 rows, the raw rows, and the factor products
// (the op's at K = 128) with dq, dk's products left to the finish kernel, from float32 factors and
// from bf16 ones (R alone); 1,024 blocks, 20 runs.
TEST(DeltaRuleChunkTermsCuda, WyBackwardIsDeterministic) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const int64_t H = 8, NC = 128, K = 128, V = 128;
  const RawRowsCase r = raw_rows_case(H, NC, K, V, 47);
  const at::Tensor beta = f32(r.x.beta);
  hybrid::ops::detail::WyFactors f16 = r.factors;
  for (at::Tensor* x : {&f16.dO, &f16.vnew, &f16.dvnew, &f16.W}) *x = x->to(at::kBFloat16);
  struct Path {
    const char* name;
    const hybrid::ops::detail::RawRows* raw;
    bool leave_products;
    const hybrid::ops::detail::WyFactors* factors;
  };
  for (const Path& path : {Path{"float32 rows", nullptr, false, &r.factors}, Path{"raw rows", &r.raw, false, &r.factors},
                           Path{"raw rows, products left", &r.raw, true, &r.factors},
                           Path{"bf16 factors, R alone", &r.raw, true, &f16}}) {
    auto run = [&] {
      const WyGrads w =
          wy_backward(r.terms, *path.factors, beta, 0.3, r.q, r.k, /*tf32=*/true, path.raw, path.leave_products);
      return std::vector<at::Tensor>{w.dbeta, w.dgc, path.leave_products ? w.split : w.dq};
    };
    const std::vector<at::Tensor> first = run();
    for (int i = 0; i < 20; ++i) {
      const std::vector<at::Tensor> again = run();
      EXPECT_TRUE(at::equal(again[0], first[0])) << path.name << ": dbeta differs at run " << i + 1;
      EXPECT_TRUE(at::equal(again[1], first[1])) << path.name << ": dgc differs at run " << i + 1;
      EXPECT_TRUE(at::equal(again[2], first[2])) << path.name << ": dq (or S and R) differs at run " << i + 1;
    }
  }
}

}  // namespace
