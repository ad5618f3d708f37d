#include "hybrid/cli/inference.h"

#include <ATen/Context.h>

#include "hybrid/error.h"

namespace hybrid::cli {

InferenceModel load_for_inference(const std::string& checkpoint, const std::string& device_name, bool bf16) {
  const c10::Device device(device_name == "cuda" ? c10::kCUDA : c10::kCPU);
  if (device.is_cuda() && !at::hasCUDA()) throw Error("--device cuda: no CUDA device is available");
  if (bf16 && !device.is_cuda()) throw ConfigError("--bf16 needs --device cuda");
  InferenceModel m{device, load_model_dir(checkpoint)};
  m.loaded.model->to(device);
  m.loaded.model->eval();
  return m;
}

}  // namespace hybrid::cli
