#include "hybrid/io/hf_names.h"

#include <ATen/ATen.h>

#include <array>
#include <map>

#include "hybrid/error.h"

namespace hybrid::io {
namespace {

bool replace(std::string& s, const std::string& from, const std::string& to) {
  auto i = s.find(from);
  if (i == std::string::npos) return false;
  s.replace(i, from.size(), to);
  return true;
}

const char* kConvParts[] = {"q_conv1d", "k_conv1d", "v_conv1d"};

}  // namespace

NamedTensors hf_disk_to_ours(NamedTensors tensors) {
  NamedTensors out;
  std::map<std::string, std::array<at::Tensor, 3>> convs;  // layer prefix -> q, k, v parts
  for (auto& [name, t] : tensors) {
    std::string n = name;
    bool conv = false;
    for (int i = 0; i < 3; ++i) {
      const std::string suffix = std::string("linear_attn.") + kConvParts[i] + ".weight";
      if (n.size() > suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0) {
        convs[n.substr(0, n.size() - suffix.size())][i] = t;
        conv = true;
      }
    }
    if (conv) continue;
    replace(n, "attention_layer_norm", "input_layernorm") || replace(n, "feedforward_layer_norm", "post_attention_layernorm");
    out.emplace_back(n, t);
  }
  for (auto& [prefix, parts] : convs) {
    for (int i = 0; i < 3; ++i)
      if (!parts[i].defined()) throw Error("tensor '" + prefix + "linear_attn." + kConvParts[i] + ".weight' is missing");
    out.emplace_back(prefix + "linear_attn.conv1d.weight", at::cat({parts[0], parts[1], parts[2]}, 0));
  }
  return out;
}

NamedTensors ours_to_hf_disk(const NamedTensors& tensors, const ModelConfig& m) {
  const int64_t key_dim = m.gdn.n_k_heads * m.gdn.head_k_dim, value_dim = m.gdn.n_v_heads * m.gdn.head_v_dim;
  NamedTensors out;
  for (const auto& [name, t] : tensors) {
    std::string n = name;
    const std::string conv = "linear_attn.conv1d.weight";
    if (n.size() > conv.size() && n.compare(n.size() - conv.size(), conv.size(), conv) == 0) {
      const std::string prefix = n.substr(0, n.size() - conv.size());
      auto parts = t.split_with_sizes({key_dim, key_dim, value_dim}, 0);
      for (int i = 0; i < 3; ++i)
        out.emplace_back(prefix + "linear_attn." + kConvParts[i] + ".weight", parts[i].contiguous());
      continue;
    }
    replace(n, "input_layernorm", "attention_layer_norm") || replace(n, "post_attention_layernorm", "feedforward_layer_norm");
    out.emplace_back(n, t);
  }
  return out;
}

}  // namespace hybrid::io
