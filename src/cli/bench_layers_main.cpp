// hybrid-bench-layers: one Gated DeltaNet layer against one attention layer of the same model
// config (default configs/7b.yaml's width) on the GPU, as training runs them: bf16 autocast,
// float32 input that wants its gradient, forward and forward+backward, at B x T tokens
// (default 1 x 8192). Both the mixers alone and the whole blocks (norms and MLP around them).
// The target: a GDN layer no slower than the attention layer of the same width at 8K
// tokens. Timing: CUDA events around each call, medians. --profile: a Kineto trace of the GDN
// mixer's forward+backward, to see where its time goes outside the delta-rule kernels.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <stdexcept>

#include "hybrid/cli/common.h"
#include "hybrid/cli/gpu_timing.h"
#include "hybrid/config/load.h"
#include "hybrid/model/autocast.h"
#include "hybrid/model/hybrid_lm.h"

using namespace hybrid;

namespace {

struct Timing {
  double fwd_ms, fwdbwd_ms, peak_gb;
};

// `forward` maps the input to the layer's output; the backward takes a fixed random gradient.
// With a profile path, also writes a trace of 3 forward+backward calls there.
Timing time_layer(const std::function<at::Tensor(const at::Tensor&)>& forward, const at::Tensor& x, int warmup,
                  int reps, const std::string& profile_path = {}) {
  const at::Tensor leaf = x.detach().requires_grad_(true);
  at::Tensor dy;
  {
    CudaAutocast autocast(true);
    dy = at::randn_like(forward(leaf));
  }
  auto step = [&](bool backward) {
    CudaAutocast autocast(true);
    at::Tensor y = forward(leaf);
    if (backward) torch::autograd::backward({y}, {dy});
  };
  Timing t{};
  t.fwd_ms = cli::median_cuda_ms([&] { step(false); }, warmup, reps);
  if (!profile_path.empty()) cli::write_cuda_profile(profile_path, [&] { step(true); }, 3);
  cli::reset_peak_memory();
  t.fwdbwd_ms = cli::median_cuda_ms([&] { step(true); }, warmup, reps);
  t.peak_gb = cli::peak_memory_gb();
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"hybrid-bench-layers: a Gated DeltaNet layer against an attention layer of the same width on the GPU"};
  std::string config_path = "configs/7b.yaml", json_path = "layers_bench.json", profile_path;
  int64_t batch = 1, seq_len = 8192;
  int warmup = 5, reps = 20;
  app.add_option("--config", config_path, "model config whose width the layers take");
  app.add_option("--batch", batch, "sequences per call")->check(CLI::PositiveNumber);
  app.add_option("--seq-len", seq_len, "tokens per sequence")->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup, "untimed calls first");
  app.add_option("--reps", reps, "timed calls (median reported)")->check(CLI::PositiveNumber);
  app.add_option("--json", json_path, "where to write the results");
  app.add_option("--profile", profile_path, "write a Kineto trace (Chrome JSON) of 3 fwd+bwd of the GDN mixer");
  if (auto code = cli::parse(app, argc, argv)) return *code;
  return cli::run_reporting_errors([&] {
    if (!at::hasCUDA()) throw std::runtime_error("hybrid-bench-layers needs a CUDA device");
    const ModelConfig m = load_config(config_path).config.model;
    const auto cuda = at::TensorOptions().device(at::kCUDA);
    at::manual_seed(0);
    const at::Tensor x = at::randn({batch, seq_len, m.d_model}, cuda);
    const at::Tensor positions = at::arange(seq_len, cuda.dtype(at::kLong)).unsqueeze(0).expand({batch, seq_len});

    GatedDeltaNet gdn(m);
    Attention attention(m);
    Block gdn_block(m, 'G'), attention_block(m, 'A');
    gdn->to(at::kCUDA);
    attention->to(at::kCUDA);
    gdn_block->to(at::kCUDA);
    attention_block->to(at::kCUDA);

    struct Row {
      const char* name;
      Timing t;
    };
    std::vector<Row> rows = {
        {"GDN mixer",
         time_layer([&](const at::Tensor& in) { return gdn->forward(in, nullptr); }, x, warmup, reps, profile_path)},
        {"attention mixer",
         time_layer([&](const at::Tensor& in) { return attention->forward(in, positions, nullptr); }, x, warmup, reps)},
        {"GDN block", time_layer([&](const at::Tensor& in) { return gdn_block->forward(in, positions, nullptr); }, x,
                                 warmup, reps)},
        {"attention block", time_layer([&](const at::Tensor& in) { return attention_block->forward(in, positions, nullptr); },
                                       x, warmup, reps)},
    };

    std::printf("%s width (d %ld, GDN %ld heads %ld/%ld, attention %ld heads), %ld x %ld tokens, bf16 autocast\n",
                config_path.c_str(), m.d_model, m.gdn.n_v_heads, m.gdn.head_k_dim, m.gdn.head_v_dim,
                m.attention.n_heads, batch, seq_len);
    std::printf("| layer | fwd ms | fwd+bwd ms | peak GB |\n|---|---|---|---|\n");
    std::ofstream json(json_path);
    json << "{\n  \"config\": \"" << config_path << "\", \"batch\": " << batch << ", \"seq_len\": " << seq_len
         << ",\n  \"layers\": [\n";
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      std::printf("| %s | %.3f | %.3f | %.2f |\n", r.name, r.t.fwd_ms, r.t.fwdbwd_ms, r.t.peak_gb);
      json << "    {\"layer\": \"" << r.name << "\", \"fwd_ms\": " << r.t.fwd_ms << ", \"fwdbwd_ms\": " << r.t.fwdbwd_ms
           << ", \"peak_gb\": " << r.t.peak_gb << "}" << (i + 1 < rows.size() ? "," : "") << "\n";
    }
    json << "  ]\n}\n";
    std::printf("GDN / attention fwd+bwd: mixer %.2f, block %.2f (at most 1 is the issue's target)\n",
                rows[0].t.fwdbwd_ms / rows[1].t.fwdbwd_ms, rows[2].t.fwdbwd_ms / rows[3].t.fwdbwd_ms);
    return 0;
  });
}
