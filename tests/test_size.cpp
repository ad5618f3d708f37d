// Parameter counts, FLOPs and memory from the config alone.
#include <gtest/gtest.h>

#include <string>

#include "hybrid/config/load.h"
#include "hybrid/model/size.h"

namespace {

hybrid::Config seven_b() { return hybrid::load_config(HYBRID_SOURCE_DIR "/configs/7b.yaml").config; }

TEST(Size, OlmoHybrid7BParameterCountIsExact) {
  // OlmoHybridForCausalLM(OlmoHybridConfig()) in transformers has exactly this many
  // (tests/python/hf_parity.py checks it against transformers on every run).
  auto c = hybrid::count_parameters(seven_b().model);
  EXPECT_EQ(c.total, 7'430'870'688);
  int64_t sum = 0;
  for (auto& [name, n] : c.parts) sum += n;
  EXPECT_EQ(sum, c.total);
  // Matmul parameters: everything but the input embedding, norms, conv, A_log and dt_bias.
  EXPECT_EQ(c.matmul, 7'044'096'000);
}

TEST(Size, TiedEmbeddingsDropTheHead) {
  auto cfg = seven_b();
  auto untied = hybrid::count_parameters(cfg.model).total;
  cfg.model.tie_embeddings = true;
  EXPECT_EQ(untied - hybrid::count_parameters(cfg.model).total, cfg.model.vocab_size * cfg.model.d_model);
}

TEST(Size, FlopsGrowWithSequenceOnlyThroughAttention) {
  auto m = seven_b().model;
  auto short_seq = hybrid::training_flops_per_token(m, 2048);
  auto long_seq = hybrid::training_flops_per_token(m, 8192);
  EXPECT_EQ(short_seq.matmul, long_seq.matmul);
  EXPECT_EQ(short_seq.gdn, long_seq.gdn);  // chunked GDN is linear in T
  EXPECT_GT(long_seq.attention, 3.9 * short_seq.attention);
  EXPECT_EQ(long_seq.matmul, 6.0 * hybrid::count_parameters(m).matmul);
}

TEST(Size, ZeroShardsOptimizerAndGradients) {
  auto cfg = seven_b();
  cfg.distributed.zero_stage = 0;
  double plain = hybrid::estimate_memory(cfg, 8).total;
  cfg.distributed.zero_stage = 2;
  double sharded = hybrid::estimate_memory(cfg, 8).total;
  double n = hybrid::count_parameters(cfg.model).total;
  const double buckets = 3.0 * cfg.distributed.bucket_bytes();  // gradients in flight (GradSync)
  EXPECT_NEAR(plain - sharded, (8 + 4) * n * 7.0 / 8.0 - buckets, 1.0);
  EXPECT_LT(sharded, 80.0 * (1 << 30));  // 7b.yaml is meant to fit 8 x 80 GB with ZeRO-2 + checkpointing
}

// Without checkpointing every GDN layer keeps the delta rule's intermediates unless told not to;
// then one layer's set remains (its backward recomputes it). Under bf16 autocast on a GPU the
// CUDA kernels keep the states, W and V' in bf16 at 7b.yaml's K = 96 (half their bytes); in
// float32 training all of it is float32.
TEST(Size, KeptDeltaRuleIntermediatesAreCounted) {
  auto cfg = seven_b();
  cfg.trainer.activation_checkpointing = false;
  const auto& g = cfg.model.gdn;
  const double tokens = static_cast<double>(cfg.trainer.micro_batch_size) * cfg.data.seq_len;
  const double states_w_vnew = g.head_k_dim * g.head_v_dim / 64.0 + 2 * g.head_v_dim;
  const double rest = g.head_k_dim + 4 * 64 + 3;
  for (const char* precision : {"bf16", "fp32"}) {
    cfg.trainer.precision = precision;
    cfg.trainer.delta_rule.keep_intermediates = true;
    const double kept = hybrid::estimate_memory(cfg, 8).total;
    cfg.trainer.delta_rule.keep_intermediates = false;
    const double recomputed = hybrid::estimate_memory(cfg, 8).total;
    const double low = std::string(precision) == "bf16" ? 2.0 : 4.0;
    const double per_layer = g.n_v_heads * (low * states_w_vnew + 4.0 * rest) * tokens;
    EXPECT_NEAR(kept - recomputed, 23 * per_layer, 1.0) << precision;  // 7b.yaml: 24 GDN layers
  }
}

// Checkpointing only the first blocks (trainer.checkpointed_layers) lies between all and none:
// none checkpointed is the estimate without checkpointing, all of them the full one, and each
// block more checkpointed needs less memory, or at most one block input more (the last blocks'
// activations can fit where the backward later recomputes an earlier block).
TEST(Size, PartialCheckpointingLiesBetween) {
  auto cfg = seven_b();
  cfg.trainer.activation_checkpointing = false;
  const double off = hybrid::estimate_memory(cfg, 8).total;
  cfg.trainer.activation_checkpointing = true;
  const double all = hybrid::estimate_memory(cfg, 8).total;
  const double block_input = 4.0 * cfg.model.d_model * cfg.trainer.micro_batch_size * cfg.data.seq_len;  // float32
  double previous = off;
  for (int64_t n = 0; n <= cfg.model.n_layers; ++n) {
    cfg.trainer.checkpointed_layers = n;
    const double partial = hybrid::estimate_memory(cfg, 8).total;
    if (n == 0) EXPECT_DOUBLE_EQ(partial, off);
    if (n == cfg.model.n_layers) EXPECT_DOUBLE_EQ(partial, all);
    if (n > 0 && n < cfg.model.n_layers / 2) EXPECT_LT(partial, previous) << n << " blocks checkpointed";
    EXPECT_LE(partial, previous + block_input + 1) << n << " blocks checkpointed";
    previous = partial;
  }
}

// With every block checkpointed, the loss's peak holds the blocks' inputs and the logits, and the
// backward's one recomputed block comes after the logits are gone: it counts only for what it
// holds beyond them (nothing at a 256K vocabulary; 7b.yaml's and a small one leave the rest).
TEST(Size, RecomputedBlockCountsBeyondTheLogits) {
  auto cfg = seven_b();
  cfg.trainer.activation_checkpointing = true;
  auto has_block_part = [](const hybrid::MemoryEstimate& e) {
    for (const auto& [name, bytes] : e.parts)
      if (name.find("a recomputed block") != std::string::npos) return bytes > 0;
    return false;
  };
  EXPECT_TRUE(has_block_part(hybrid::estimate_memory(cfg, 8)));
  cfg.model.vocab_size = 262144;
  EXPECT_FALSE(has_block_part(hybrid::estimate_memory(cfg, 8)));
  cfg.model.vocab_size = 512;
  EXPECT_TRUE(has_block_part(hybrid::estimate_memory(cfg, 8)));
}

// One micro batch a rank a step: the gradients fill after the loss's peak, so they count only
// where the backward's end is the larger; with accumulation they count in full.
TEST(Size, GradientsOfOneMicroBatchComeAfterTheLoss) {
  auto cfg = seven_b();
  const double accumulating = hybrid::estimate_memory(cfg, 8).total;
  cfg.trainer.global_batch_size = cfg.trainer.micro_batch_size * 8;
  const auto single = hybrid::estimate_memory(cfg, 8);
  const double gradients = single.parts[1].second;
  EXPECT_LT(single.total, accumulating);
  EXPECT_GE(single.total, accumulating - gradients - 1);
  double sum = 0;
  for (const auto& [name, bytes] : single.parts) sum += bytes;
  EXPECT_DOUBLE_EQ(sum, single.total);  // the parts printed add up to the total
}

}  // namespace
