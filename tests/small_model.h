// The model the CPU model tests run: every layer kind at a few dozen widths, grouped KV heads
// and grouped value heads, odd head dims (12, 16), small enough for float64 in milliseconds.
#pragma once

#include <string>

#include "hybrid/config/config.h"

inline hybrid::ModelConfig small_model_config(const std::string& pattern) {
  hybrid::ModelConfig m;
  m.d_model = 48;
  m.n_layers = static_cast<int64_t>(pattern.size());
  m.layer_pattern = pattern;
  m.vocab_size = 97;
  m.mlp_hidden = 64;
  m.attention.n_heads = 4;
  m.attention.n_kv_heads = 2;
  m.attention.rope_theta = 10000;
  m.gdn.n_k_heads = 2;
  m.gdn.n_v_heads = 4;
  m.gdn.head_k_dim = 12;
  m.gdn.head_v_dim = 16;
  return m;
}
