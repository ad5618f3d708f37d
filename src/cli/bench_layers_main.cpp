// hybrid-bench-layers: one Gated DeltaNet layer against one attention layer of the same model
// config (default configs/7b.yaml's width) on the GPU, as training runs them: bf16 autocast,
// float32 input that wants its gradient, forward and forward+backward, at B x T tokens
// (default 1 x 8192). Both the mixers alone and the whole blocks (norms and MLP around them).
// The target: a GDN layer no slower than the attention layer of the same width at 8K
// tokens. Timing: CUDA events around each call, each GDN layer timed in alternation with its
// attention counterpart (so both see the same clocks), medians, and the ratio as the median of
// the per-pair ratios. Parameter gradients are set to none before each call, as the trainer does
// once a step. The projection weights' bf16 casts stay cached between calls, as the trainer keeps
// them between the micro batches of a step (trainer.cache_weight_casts): a timed call casts
// nothing, where a training step casts once. --profile: a Kineto trace of the GDN mixer's
// forward+backward, to see where its time goes outside the delta-rule kernels; --profile-blocks:
// the same for each whole block (the blocks have differed by more than their mixers). Last, the GDN
// mixer's errors against float64 (--no-errors leaves them out). --documents N splits each
// sequence into N documents masked from each other (data.document_masking).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "hybrid/cli/common.h"
#include "hybrid/cli/gpu_timing.h"
#include "hybrid/config/load.h"
#include "hybrid/model/autocast.h"
#include "hybrid/model/hybrid_lm.h"
#include "hybrid/model/packing.h"
#include "hybrid/model/weight_casts.h"

using namespace hybrid;

namespace {

using Step = std::function<void(bool backward)>;

// One training step of a layer: parameter gradients to none, then forward under bf16 autocast
// from a float32 input that wants its gradient, and, when asked, the backward of a fixed random
// output gradient.
Step training_step(const std::function<at::Tensor(const at::Tensor&)>& forward, std::vector<at::Tensor> params,
                   const at::Tensor& x) {
  at::Tensor leaf = x.detach().requires_grad_(true), dy;
  {
    CudaAutocast autocast(true);
    dy = at::randn_like(forward(leaf));
  }
  return [=](bool backward) {
    for (const at::Tensor& p : params) p.mutable_grad().reset();
    leaf.mutable_grad().reset();
    CudaAutocast autocast(true);
    at::Tensor y = forward(leaf);
    if (backward) torch::autograd::backward({y}, {dy});
  };
}

// The peak of one fwd+bwd with only this layer's weight casts cached (the other layers' would
// count otherwise).
double peak_gb_of(const Step& step) {
  forget_weight_casts();
  cli::reset_peak_memory();
  step(true);
  return cli::peak_memory_gb();
}

// fwdbwd_queued: the calls queued with the host ahead (the GPU's time, as in training), where the
// others wait for each call (its latency, host launch work included).
struct Comparison {
  cli::PairedTiming fwd, fwdbwd, fwdbwd_queued;
  double gdn_peak_gb, attention_peak_gb;
};

Comparison compare(const Step& gdn, const Step& attention, int warmup, int reps) {
  Comparison c;
  c.fwd = cli::paired_cuda_ms([&] { gdn(false); }, [&] { attention(false); }, warmup, reps);
  c.fwdbwd = cli::paired_cuda_ms([&] { gdn(true); }, [&] { attention(true); }, warmup, reps);
  c.fwdbwd_queued = cli::paired_cuda_ms([&] { gdn(true); }, [&] { attention(true); }, warmup, reps, /*queued=*/true);
  c.gdn_peak_gb = peak_gb_of(gdn), c.attention_peak_gb = peak_gb_of(attention);
  return c;
}

// The GDN mixer as timed (bf16 autocast, float32 input) against the same weights in float64 on
// the same input and output gradient: relative RMS of the output, the input's gradient and the
// worst parameter gradient. Changes that move precision at the layer's level (what the op
// returns, in which dtype) show here; the op's own errors are hybrid-bench-delta-rule's.
void print_gdn_errors(GatedDeltaNet gdn, const ModelConfig& m, const at::Tensor& x, const Packing* docs) {
  GatedDeltaNet reference(m);
  {
    at::NoGradGuard no_grad;
    const auto weights = gdn->named_parameters();
    for (auto& p : reference->named_parameters()) p.value().copy_(weights[p.key()]);
  }
  reference->to(at::kCUDA, at::kDouble);
  at::manual_seed(1);
  const at::Tensor dy = at::randn_like(x);
  // y, dx, then every parameter's gradient, all in float64.
  auto outputs = [&](GatedDeltaNet layer, bool autocast) {
    // detach: to(kFloat) returns x itself, which would then require grad, and the float64 side's
    // to() would be a non-leaf without a .grad.
    at::Tensor leaf = x.detach().to(autocast ? at::kFloat : at::kDouble).requires_grad_(true), y;
    for (auto& p : layer->parameters()) p.mutable_grad().reset();
    {
      CudaAutocast on(autocast);
      y = layer->forward(leaf, docs);
    }
    torch::autograd::backward({y}, {dy.to(y.scalar_type())});
    std::vector<at::Tensor> out = {y.detach().to(at::kDouble), leaf.grad().to(at::kDouble)};
    for (auto& p : layer->parameters()) out.push_back(p.grad().defined() ? p.grad().to(at::kDouble) : at::Tensor());
    return out;
  };
  const auto got = outputs(gdn, true), want = outputs(reference, false);
  auto error = [&](size_t i) { return ((got[i] - want[i]).norm() / want[i].norm()).item<double>(); };
  double worst = 0;
  std::string worst_name;
  const auto names = gdn->named_parameters().keys();
  for (size_t i = 2; i < got.size(); ++i) {
    if (!got[i].defined() || !want[i].defined()) continue;
    const double e = error(i);
    if (e > worst) worst = e, worst_name = names[i - 2];
  }
  std::printf("GDN mixer under bf16 autocast against float64 (relative RMS): y %.1e, dx %.1e, parameter gradients up "
              "to %.1e (%s)\n",
              error(0), error(1), worst, worst_name.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"hybrid-bench-layers: a Gated DeltaNet layer against an attention layer of the same width on the GPU"};
  std::string config_path = "configs/7b.yaml", json_path = "layers_bench.json", profile_path, blocks_profile_prefix;
  int64_t batch = 1, seq_len = 8192, documents = 1;
  int warmup = 5, reps = 20;
  app.add_option("--config", config_path, "model config whose width the layers take");
  app.add_option("--batch", batch, "sequences per call")->check(hybrid::cli::positive);
  app.add_option("--seq-len", seq_len, "tokens per sequence")->check(hybrid::cli::positive);
  app.add_option("--warmup", warmup, "untimed calls first");
  app.add_option("--reps", reps, "timed calls of each layer (medians reported)")->check(hybrid::cli::positive);
  app.add_option("--documents", documents,
                 "documents of equal length per sequence, masked from each other (data.document_masking)")
      ->check(hybrid::cli::positive);
  app.add_option("--json", json_path, "where to write the results");
  app.add_option("--profile", profile_path, "write a Kineto trace (Chrome JSON) of 3 fwd+bwd of the GDN mixer");
  app.add_option("--profile-blocks", blocks_profile_prefix,
                 "also write traces of 3 fwd+bwd of each whole block, PREFIX_gdn_block.json and "
                 "PREFIX_attention_block.json (the blocks differ by more than their mixers do)");
  bool errors = true;
  app.add_flag("!--no-errors", errors, "skip the GDN mixer's errors against float64 (printed last)");
  if (auto code = cli::parse(app, argc, argv)) return *code;
  return cli::run_reporting_errors([&] {
    if (!at::hasCUDA()) throw std::runtime_error("hybrid-bench-layers needs a CUDA device");
    if (documents > seq_len) throw std::invalid_argument("--documents must be at most --seq-len");
    const ModelConfig m = load_config(config_path).config.model;
    const auto cuda = at::TensorOptions().device(at::kCUDA);
    at::manual_seed(0);
    const at::Tensor x = at::randn({batch, seq_len, m.d_model}, cuda);
    at::Tensor positions = at::arange(seq_len, cuda.dtype(at::kLong)).unsqueeze(0).expand({batch, seq_len});
    std::optional<Packing> packing;
    if (documents > 1) {
      std::vector<int64_t> starts;
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t d = 0; d < documents; ++d) starts.push_back(b * seq_len + d * seq_len / documents);
      starts.push_back(batch * seq_len);
      packing = make_packing(at::tensor(starts, at::kLong), batch, seq_len, at::kCUDA);
      positions = packing->pos_in_doc;
    }
    const Packing* docs = packing ? &*packing : nullptr;

    GatedDeltaNet gdn(m);
    Attention attention(m);
    Block gdn_block(m, 'G'), attention_block(m, 'A');
    // As a model's layers start (the conv's weights are zero until then: q, k and v all zero).
    initialize_parameters(*gdn, m, 1), initialize_parameters(*attention, m, 2);
    initialize_parameters(*gdn_block, m, 3), initialize_parameters(*attention_block, m, 4);
    gdn->to(at::kCUDA);
    attention->to(at::kCUDA);
    gdn_block->to(at::kCUDA);
    attention_block->to(at::kCUDA);

    const Step gdn_mixer = training_step([&](const at::Tensor& in) { return gdn->forward(in, docs); },
                                         gdn->parameters(), x);
    const Step attention_mixer = training_step(
        [&](const at::Tensor& in) { return attention->forward(in, positions, docs); }, attention->parameters(), x);
    const Step gdn_whole = training_step(
        [&](const at::Tensor& in) { return gdn_block->forward(in, positions, docs); }, gdn_block->parameters(), x);
    const Step attention_whole =
        training_step([&](const at::Tensor& in) { return attention_block->forward(in, positions, docs); },
                      attention_block->parameters(), x);
    const Comparison mixers = compare(gdn_mixer, attention_mixer, warmup, reps);
    const Comparison blocks = compare(gdn_whole, attention_whole, warmup, reps);
    // Each traced layer steps once first: the peak measurements above left only the last layer's
    // weight casts cached, and a trace that recast the others' would charge them a step's casts.
    auto trace = [](const std::string& path, const Step& step) {
      step(true);
      cli::write_cuda_profile(path, [&] { step(true); }, 3);
    };
    if (!profile_path.empty()) trace(profile_path, gdn_mixer);
    if (!blocks_profile_prefix.empty()) {
      trace(blocks_profile_prefix + "_gdn_block.json", gdn_whole);
      trace(blocks_profile_prefix + "_attention_block.json", attention_whole);
    }

    std::printf("%s width (d %ld, GDN %ld heads %ld/%ld, attention %ld heads), %ld x %ld tokens in %ld document(s) "
                "a sequence, bf16 autocast\n",
                config_path.c_str(), m.d_model, m.gdn.n_v_heads, m.gdn.head_k_dim, m.gdn.head_v_dim,
                m.attention.n_heads, batch, seq_len, documents);
    std::printf("| layer | fwd ms | fwd+bwd ms | peak GB |\n|---|---|---|---|\n");
    std::ofstream json(json_path);
    json << "{\n  \"config\": \"" << config_path << "\", \"batch\": " << batch << ", \"seq_len\": " << seq_len
         << ", \"documents\": " << documents << ",\n  \"layers\": [\n";
    auto row = [&](const char* name, double fwd, double fwdbwd, double peak, bool last) {
      std::printf("| %s | %.3f | %.3f | %.2f |\n", name, fwd, fwdbwd, peak);
      json << "    {\"layer\": \"" << name << "\", \"fwd_ms\": " << fwd << ", \"fwdbwd_ms\": " << fwdbwd
           << ", \"peak_gb\": " << peak << "}" << (last ? "" : ",") << "\n";
    };
    row("GDN mixer", mixers.fwd.a_ms, mixers.fwdbwd.a_ms, mixers.gdn_peak_gb, false);
    row("attention mixer", mixers.fwd.b_ms, mixers.fwdbwd.b_ms, mixers.attention_peak_gb, false);
    row("GDN block", blocks.fwd.a_ms, blocks.fwdbwd.a_ms, blocks.gdn_peak_gb, false);
    row("attention block", blocks.fwd.b_ms, blocks.fwdbwd.b_ms, blocks.attention_peak_gb, true);
    json << "  ],\n  \"fwdbwd_ratio\": {\"mixer\": " << mixers.fwdbwd.ratio << ", \"block\": " << blocks.fwdbwd.ratio
         << "},\n  \"fwdbwd_queued_ratio\": {\"mixer\": " << mixers.fwdbwd_queued.ratio
         << ", \"block\": " << blocks.fwdbwd_queued.ratio << "}\n}\n";
    std::printf(
        "GDN / attention fwd+bwd (median of per-pair ratios): mixer %.3f, block %.3f (at most 1 is the issue's "
        "target)\n",
        mixers.fwdbwd.ratio, blocks.fwdbwd.ratio);
    std::printf("queued (the host ahead, as in training), GDN / attention fwd+bwd ratios: mixer %.3f, block %.3f\n",
                mixers.fwdbwd_queued.ratio, blocks.fwdbwd_queued.ratio);
    if (errors) print_gdn_errors(gdn, m, x, docs);
    return 0;
  });
}
