#include "hybrid/io/hf_config.h"

#include <nlohmann/json.hpp>

#include "hybrid/error.h"

namespace hybrid::io {
namespace {
using json = nlohmann::json;

void require(bool ok, const std::string& what) {
  if (!ok) throw Error("cannot express in HF olmo_hybrid: " + what);
}

}  // namespace

std::string to_hf_config_json(const ModelConfig& m, int64_t eos_id) {
  require(m.attention.qk_norm == "full", "model.attention.qk_norm must be 'full'");
  require(m.gdn_norm == "pre" && m.attention_norm == "post", "model.gdn_norm must be 'pre' and model.attention_norm 'post'");
  require(m.gdn.norm_eps == 1e-5, "model.gdn.norm_eps must be 1e-5");
  const std::string types = m.layer_types();
  require(types.find('G') != std::string::npos && types.find('A') != std::string::npos,
          "HF olmo_hybrid needs at least one G and one A layer");
  json layer_types = json::array();
  for (char t : types) layer_types.push_back(t == 'G' ? "linear_attention" : "full_attention");
  json c = {
      {"architectures", {"OlmoHybridForCausalLM"}},
      {"model_type", "olmo_hybrid"},
      {"vocab_size", m.vocab_size},
      {"hidden_size", m.d_model},
      {"intermediate_size", m.mlp_hidden},
      {"num_hidden_layers", m.n_layers},
      {"num_attention_heads", m.attention.n_heads},
      {"num_key_value_heads", m.attention.n_kv_heads},
      {"hidden_act", "silu"},
      {"max_position_embeddings", m.max_seq_len},
      {"initializer_range", m.init_std},
      {"rms_norm_eps", m.norm_eps},
      {"tie_word_embeddings", m.tie_embeddings},
      {"attention_bias", false},
      {"attention_dropout", 0.0},
      {"layer_types", layer_types},
      {"linear_num_key_heads", m.gdn.n_k_heads},
      {"linear_num_value_heads", m.gdn.n_v_heads},
      {"linear_key_head_dim", m.gdn.head_k_dim},
      {"linear_value_head_dim", m.gdn.head_v_dim},
      {"linear_conv_kernel_dim", m.gdn.conv_size},
      {"linear_allow_neg_eigval", m.gdn.allow_neg_eigval},
      {"use_cache", false},
      {"dtype", "float32"},
  };
  c["rope_parameters"] = m.attention.rope ? json{{"rope_type", "default"}, {"rope_theta", m.attention.rope_theta}} : json(nullptr);
  // HF's defaults are dolma2's ids, invalid in a smaller vocabulary: always say what they are.
  c["eos_token_id"] = eos_id >= 0 ? json(eos_id) : json(nullptr);
  c["pad_token_id"] = nullptr;
  c["bos_token_id"] = nullptr;
  return c.dump(2) + "\n";
}

ModelConfig from_hf_config_json(const std::string& text, const std::string& path) {
  json c;
  try {
    c = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(path + ": not valid JSON: " + e.what());
  }
  auto get = [&](const char* key, auto fallback) {
    using T = decltype(fallback);
    if (!c.contains(key) || c[key].is_null()) return fallback;
    try {
      return c[key].get<T>();
    } catch (const json::exception&) {
      throw Error(path + ": " + key + " has the wrong type");
    }
  };
  auto need = [&](const char* key) -> int64_t {
    if (!c.contains(key) || !c[key].is_number_integer()) throw Error(path + ": " + std::string(key) + ": expected an integer");
    return c[key].get<int64_t>();
  };
  if (get("model_type", std::string()) != "olmo_hybrid")
    throw Error(path + ": model_type is '" + get("model_type", std::string()) + "', expected 'olmo_hybrid'");
  ModelConfig m;
  m.vocab_size = need("vocab_size");
  m.d_model = need("hidden_size");
  m.mlp_hidden = need("intermediate_size");
  m.n_layers = need("num_hidden_layers");
  m.attention.n_heads = need("num_attention_heads");
  m.attention.n_kv_heads = get("num_key_value_heads", m.attention.n_heads);
  m.max_seq_len = get("max_position_embeddings", int64_t{65536});
  m.init_std = get("initializer_range", 0.02);
  m.norm_eps = get("rms_norm_eps", 1e-6);
  m.tie_embeddings = get("tie_word_embeddings", false);
  m.attention.qk_norm = "full";
  m.gdn_norm = "pre";
  m.attention_norm = "post";
  m.gdn.norm_eps = 1e-5;
  if (get("attention_bias", false)) throw Error(path + ": attention_bias is true; not supported");
  // RoPE: rope_parameters.rope_theta (transformers 5), a top-level rope_theta (older files), or NoPE.
  m.attention.rope = false;
  if (c.contains("rope_parameters") && c["rope_parameters"].is_object() && c["rope_parameters"].contains("rope_theta")) {
    const auto& rp = c["rope_parameters"];
    if (rp.value("rope_type", std::string("default")) != "default")
      throw Error(path + ": rope_parameters.rope_type '" + rp["rope_type"].get<std::string>() + "' is not supported");
    m.attention.rope = true;
    m.attention.rope_theta = rp["rope_theta"].get<double>();
  } else if (c.contains("rope_theta") && c["rope_theta"].is_number()) {
    m.attention.rope = true;
    m.attention.rope_theta = c["rope_theta"].get<double>();
  }
  m.gdn.n_k_heads = get("linear_num_key_heads", m.attention.n_heads);
  m.gdn.n_v_heads = get("linear_num_value_heads", m.attention.n_heads);
  m.gdn.head_k_dim = get("linear_key_head_dim", static_cast<int64_t>(0.75 * m.d_model / m.gdn.n_k_heads));
  m.gdn.head_v_dim = get("linear_value_head_dim", 2 * m.gdn.head_k_dim);
  m.gdn.conv_size = get("linear_conv_kernel_dim", int64_t{4});
  m.gdn.allow_neg_eigval = get("linear_allow_neg_eigval", true);
  m.layers.clear();
  if (c.contains("layer_types") && c["layer_types"].is_array()) {
    for (const auto& t : c["layer_types"]) {
      std::string s = t.is_string() ? t.get<std::string>() : "";
      if (s != "linear_attention" && s != "full_attention") throw Error(path + ": layer_types holds '" + s + "'");
      m.layers.push_back(s == "linear_attention" ? "G" : "A");
    }
  } else {
    m.layer_pattern = "GGGA";  // HF's default: attention every 4th layer
  }
  return m;
}

}  // namespace hybrid::io
