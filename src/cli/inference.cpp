#include "hybrid/cli/inference.h"

#include <ATen/Context.h>
#include <c10/cuda/CUDAFunctions.h>

#include "hybrid/error.h"
#include "hybrid/train/checkpoint.h"

namespace hybrid::cli {

InferenceModel load_for_inference(const std::string& checkpoint, const std::string& device_name, bool bf16,
                                  int local_rank) {
  const bool cuda = device_name == "cuda";
  if (cuda && !at::hasCUDA()) throw Error("--device cuda: no CUDA device is available");
  if (bf16 && !cuda) throw ConfigError("--bf16 needs --device cuda");
  const c10::Device device = cuda ? c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(local_rank)) : c10::Device(c10::kCPU);
  if (cuda) {
    if (local_rank >= c10::cuda::device_count())
      throw Error("local rank " + std::to_string(local_rank) + " has no GPU (" + std::to_string(c10::cuda::device_count()) +
                  " visible)");
    c10::cuda::set_device(device.index());
  }
  train::ModelFiles files = train::read_model_files(checkpoint);
  InferenceModel m{device, {files.config, HybridLM(files.config.model)}};
  load_model_weights(m.loaded.model, files.weights, files.dir + "/model.safetensors");
  m.loaded.model->to(device);
  m.loaded.model->eval();
  return m;
}

}  // namespace hybrid::cli
