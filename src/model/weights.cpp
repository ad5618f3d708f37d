#include "hybrid/model/weights.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <set>

#include "hybrid/error.h"

namespace hybrid {

int64_t weight_kind(const std::string& name) {
  auto has = [&](const char* part) { return name.find(part) != std::string::npos; };
  if (has("embed_tokens")) return 0;
  if (has(".linear_attn.")) return 1;
  if (has(".self_attn.")) return 2;
  if (has(".mlp.")) return 3;
  if (has("lm_head")) return 5;
  return 4;  // the block norms and the final norm
}

std::vector<std::pair<std::string, at::Tensor>> model_weights(HybridLM& model) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : model->named_parameters()) out.emplace_back(p.key(), p.value());
  return out;
}

void load_model_weights(HybridLM& model, const io::TensorFile& file, const std::string& path) {
  at::NoGradGuard no_grad;
  std::set<std::string> seen;
  auto params = model->named_parameters();
  for (const auto& [name, tensor] : file.tensors) {
    at::Tensor* p = params.find(name);
    if (!p) throw Error(path + ": tensor '" + name + "' is not a parameter of this model (another architecture?)");
    if (p->sizes() != tensor.sizes())
      throw Error(path + ": tensor '" + name + "' has shape " + c10::str(tensor.sizes()) + ", the model expects " +
                  c10::str(p->sizes()));
    p->copy_(tensor);
    seen.insert(name);
  }
  for (const auto& p : params)
    if (!seen.count(p.key())) throw Error(path + ": parameter '" + p.key() + "' is missing from the file");
}

}  // namespace hybrid
