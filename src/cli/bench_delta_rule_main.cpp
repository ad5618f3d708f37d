// hybrid-bench-delta-rule: times chunk_gated_delta_rule forward and forward+backward on the GPU
// at the shapes (bf16 q, k, v; float32 g, beta), measures its error against float64 on
// the same inputs, and the bf16 matmul ceiling of the device. Optionally dumps the inputs and
// the float64 reference as .npy so scripts/gpu/fla_delta_rule.py measures flash-linear-attention
// on identical inputs in the same run. Timing: CUDA events around each call, medians, twice:
// with the host waiting for each call (its latency, host launch work included) and with the calls
// queued (the host ahead of the GPU, as in training and in the anchors' do_bench).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "hybrid/cli/common.h"
#include "hybrid/cli/gpu_timing.h"
#include "hybrid/io/npy.h"
#include "hybrid/ops/delta_rule.h"

using namespace hybrid;

namespace {

struct Shape { int64_t B, T, H, K, V; };

// The matmul FLOPs of the chunked algorithm's forward, the formula shared/anchors/fla_kernels.py uses.
double forward_flops(const Shape& s) {
  const double C = 64, K = s.K, V = s.V;
  return s.B * s.H * s.T * 2 * (C * K + C * C / 3 + C * (K + V) + 3 * K * V + C * K + C * V);
}

struct Inputs { at::Tensor q, k, v, g, beta, h0, wo, ws; };

Inputs make_inputs(const Shape& s) {
  at::manual_seed(0);
  auto f32 = at::TensorOptions().device(at::kCUDA).dtype(at::kFloat);
  auto unit = [](const at::Tensor& x) { return x / x.norm(2, -1, true); };
  Inputs in;
  in.q = unit(at::randn({s.B, s.T, s.H, s.K}, f32)).to(at::kBFloat16);
  in.k = unit(at::randn({s.B, s.T, s.H, s.K}, f32)).to(at::kBFloat16);
  in.v = at::randn({s.B, s.T, s.H, s.V}, f32).to(at::kBFloat16);
  in.g = at::log_sigmoid(at::randn({s.B, s.T, s.H}, f32));
  in.beta = (at::rand({s.B, s.T, s.H}, f32) * 1.98 + 0.01).to(at::kBFloat16).to(at::kFloat);  // (0, 2), bf16 values
  in.h0 = at::randn({s.B, s.H, s.K, s.V}, f32) * 0.5;
  in.wo = at::randn({s.B, s.T, s.H, s.V}, f32);
  in.ws = at::randn({s.B, s.H, s.K, s.V}, f32);
  return in;
}

// o, final state and the gradients of sum(o wo) + sum(final ws), in `dt` (float64 for the reference).
std::vector<at::Tensor> outputs_and_grads(const Inputs& in, at::ScalarType dt, ops::DeltaRuleArgs args) {
  auto cast = [&](const at::Tensor& x) { return (dt == at::kDouble ? x.to(at::kDouble) : x).detach().requires_grad_(true); };
  std::vector<at::Tensor> leaves = {cast(in.q), cast(in.k), cast(in.v), cast(in.g), cast(in.beta), cast(in.h0)};
  args.initial_state = leaves[5];
  args.output_final_state = true;
  auto out = ops::chunk_gated_delta_rule(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], args);
  at::Tensor loss = (out.o.to(at::kDouble) * in.wo.to(at::kDouble)).sum() +
                    (out.final_state.to(at::kDouble) * in.ws.to(at::kDouble)).sum();
  auto grads = torch::autograd::grad({loss}, leaves);
  std::vector<at::Tensor> all = {out.o.detach(), out.final_state.detach()};
  all.insert(all.end(), grads.begin(), grads.end());
  return all;
}

const char* kNames[] = {"o", "final", "dq", "dk", "dv", "dg", "dbeta", "dh0"};

// The benchmark's shapes: OLMo Hybrid's, then the two at K = V = 128 (the issue's).
constexpr Shape kStandardShapes[] = {{1, 8192, 30, 96, 192}, {8, 4096, 16, 128, 128}, {2, 16384, 16, 128, 128}};

// "B,T,H,K,V": five positive integers, or nothing.
std::optional<Shape> parse_shape(const std::string& spec) {
  std::vector<int64_t> v;
  size_t start = 0;
  while (start <= spec.size()) {
    const size_t end = std::min(spec.find(',', start), spec.size());
    const std::string part = spec.substr(start, end - start);
    if (part.empty() || part.find_first_not_of("0123456789") != std::string::npos || part.size() > 12)
      return std::nullopt;
    v.push_back(std::stoll(part));
    start = end + 1;
  }
  if (v.size() != 5 || *std::min_element(v.begin(), v.end()) <= 0) return std::nullopt;
  return Shape{v[0], v[1], v[2], v[3], v[4]};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"hybrid-bench-delta-rule: time and accuracy of the chunked gated delta rule on the GPU"};
  int warmup = 10, reps = 50;
  std::string json_path = "delta_rule_bench.json", dump_dir;
  app.add_option("--warmup", warmup, "untimed calls first");
  app.add_option("--reps", reps, "timed calls (median reported)");
  app.add_option("--json", json_path, "where to write the results");
  bool accuracy = true;
  app.add_option("--dump", dump_dir, "write inputs and float64 reference as .npy under this folder");
  app.add_flag("!--no-accuracy", accuracy, "time only (for profilers): no float64 reference");
  bool tf32 = true;
  app.add_flag("!--float32-products", tf32, "all batched products in float32 (DeltaRuleArgs::tf32_products off)");
  bool keep = true;
  app.add_flag("!--recompute", keep, "recompute the forward's intermediates in the backward (DeltaRuleArgs::keep_intermediates off)");
  size_t n_shapes = 3;
  auto* first = app.add_option("--shapes", n_shapes, "time the first N of the three shapes")->check(CLI::Range(1, 3));
  std::vector<std::string> shape_specs;
  app.add_option("--shape", shape_specs, "time this shape instead, B,T,H,K,V (repeatable; e.g. 1b.yaml's 4,4096,16,96,192)")
      ->excludes(first)
      ->check(CLI::Validator(
          [](std::string& spec) {
            return parse_shape(spec) ? std::string() : spec + " is not B,T,H,K,V, five positive integers";
          },
          "B,T,H,K,V"));
  std::string profile_path;
  app.add_option("--profile", profile_path,
                 "write Kineto traces (Chrome JSON) of 3 fwd+bwd at each timed shape: this path for the first, "
                 "_2, _3, ... before its extension for the others");
  std::string forward_profile_path;
  app.add_option("--profile-forward", forward_profile_path,
                 "the same for 3 forwards with grad (what a training step runs before its backward)");
  if (auto code = cli::parse(app, argc, argv)) return *code;
  return cli::run_reporting_errors([&] {
    std::vector<Shape> shapes;
    for (const std::string& spec : shape_specs) shapes.push_back(*parse_shape(spec));  // checked by the option
    if (shapes.empty()) shapes.assign(kStandardShapes, kStandardShapes + n_shapes);
    if (!at::hasCUDA()) throw std::runtime_error("hybrid-bench-delta-rule needs a CUDA device");
    std::ofstream json(json_path);
    json << "{\n";
    {
      auto a = at::randn({8192, 8192}, at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16)), b = at::randn_like(a);
      const double ms = cli::median_cuda_ms([&] { at::matmul(a, b); }, 20, 100);
      const double tflops = 2.0 * 8192 * 8192 * 8192 / ms / 1e9;
      std::printf("bf16 matmul 8192^3: %.1f TFLOP/s\n", tflops);
      json << "  \"matmul_bf16_tflops\": " << tflops << ",\n";
    }
    ops::DeltaRuleArgs args;
    args.tf32_products = tf32;
    args.keep_intermediates = keep;
    json << "  \"shapes\": [\n";
    for (size_t si = 0; si < shapes.size(); ++si) {
      const Shape s = shapes[si];
      char name[64];
      std::snprintf(name, sizeof name, "B%ld T%ld H%ld K%ld V%ld", s.B, s.T, s.H, s.K, s.V);
      Inputs in = make_inputs(s);
      std::vector<at::Tensor> leaves = {in.q, in.k, in.v, in.g, in.beta};
      for (auto& x : leaves) x = x.detach().requires_grad_(true);
      auto forward = [&] { return ops::chunk_gated_delta_rule(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], args).o; };
      at::Tensor dO = in.wo.to(at::kBFloat16);
      const double fwd = cli::median_cuda_ms([&] { forward(); }, warmup, reps);
      // As at inference and in the first forward under activation checkpointing: nothing kept.
      const double fwd_no_grad = cli::median_cuda_ms([&] { c10::NoGradGuard no_grad; forward(); }, warmup, reps);
      auto shape_path = [&](std::string path) {  // _2, _3 before the file name's extension, if it has one
        if (si > 0) {
          const size_t dot = path.rfind('.'), slash = path.rfind('/');
          const bool extension = dot != std::string::npos && (slash == std::string::npos || dot > slash);
          path.insert(extension ? dot : path.size(), "_" + std::to_string(si + 1));
        }
        return path;
      };
      if (!profile_path.empty())
        cli::write_cuda_profile(shape_path(profile_path), [&] { torch::autograd::backward({forward()}, {dO}); }, 3);
      if (!forward_profile_path.empty())
        cli::write_cuda_profile(shape_path(forward_profile_path), [&] { forward(); }, 3);
      cli::reset_peak_memory();
      const double fwdbwd = cli::median_cuda_ms([&] { torch::autograd::backward({forward()}, {dO}); }, warmup, reps);
      const double peak_gb = cli::peak_memory_gb();
      // And with the host running ahead (as in training, and as the anchors' do_bench times FLA).
      const double fwd_queued = cli::median_cuda_ms([&] { forward(); }, warmup, reps, /*queued=*/true);
      const double fwdbwd_queued =
          cli::median_cuda_ms([&] { torch::autograd::backward({forward()}, {dO}); }, warmup, reps, /*queued=*/true);
      const double fwdbwd_host =
          cli::median_host_ms([&] { torch::autograd::backward({forward()}, {dO}); }, warmup, reps);

      std::printf("%s: fwd %.3f ms (%.1f TFLOP/s; %.3f ms without grad), fwd+bwd %.3f ms, peak %.2f GB; queued: fwd "
                  "%.3f, fwd+bwd %.3f ms; host issues a fwd+bwd in %.3f ms",
                  name, fwd, forward_flops(s) / fwd / 1e9, fwd_no_grad, fwdbwd, peak_gb, fwd_queued, fwdbwd_queued,
                  fwdbwd_host);
      json << "    {\"shape\": \"" << name << "\", \"fwd_ms\": " << fwd << ", \"fwd_no_grad_ms\": " << fwd_no_grad
           << ", \"fwdbwd_ms\": " << fwdbwd << ", \"fwd_queued_ms\": " << fwd_queued
           << ", \"fwdbwd_queued_ms\": " << fwdbwd_queued << ", \"fwdbwd_host_ms\": " << fwdbwd_host
           << ", \"fwd_tflops\": " << forward_flops(s) / fwd / 1e9 << ", \"peak_gb\": " << peak_gb << ", \"errors\": {";
      if (!accuracy) {
        std::printf("\n");
        json << "}}" << (si + 1 < shapes.size() ? "," : "") << "\n";
        continue;
      }
      auto got = outputs_and_grads(in, at::kFloat, args);
      auto ref = outputs_and_grads(in, at::kDouble, args);
      std::printf("; rel RMS vs float64:");
      for (size_t i = 0; i < ref.size(); ++i) {
        const double err = ((got[i].to(at::kDouble) - ref[i]).norm() / ref[i].norm()).item<double>();
        std::printf(" %s %.1e", kNames[i], err);
        json << (i ? ", " : "") << "\"" << kNames[i] << "\": " << err;
      }
      std::printf("\n");
      json << "}}" << (si + 1 < shapes.size() ? "," : "") << "\n";
      if (!dump_dir.empty()) {
        const std::string dir = dump_dir + "/" + std::to_string(si) + "_";
        const std::vector<std::pair<std::string, at::Tensor>> inputs = {
            {"q", in.q}, {"k", in.k}, {"v", in.v}, {"g", in.g}, {"beta", in.beta}, {"h0", in.h0}, {"wo", in.wo}, {"ws", in.ws}};
        for (const auto& [n, t] : inputs) io::write_npy(dir + n + ".npy", t.to(at::kFloat).cpu());
        for (size_t i = 0; i < ref.size(); ++i) io::write_npy(dir + "ref_" + kNames[i] + ".npy", ref[i].cpu());
      }
    }
    json << "  ]\n}\n";
    return 0;
  });
}
