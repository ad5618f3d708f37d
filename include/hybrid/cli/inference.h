// What hybrid-eval and hybrid-generate do before their work: the device their --device and
// --bf16 flags ask for, checked before anything is loaded (cuda without a GPU, bf16 without cuda:
// one error line), and the model directory on it in eval mode.
#pragma once

#include <c10/core/Device.h>

#include <string>

#include "hybrid/model/weights.h"

namespace hybrid::cli {

struct InferenceModel {
  c10::Device device;
  LoadedModel loaded;
};

// On CUDA the GPU numbered local_rank (a rank of hybrid-eval --nproc-per-node: its own GPU).
InferenceModel load_for_inference(const std::string& checkpoint, const std::string& device_name, bool bf16,
                                  int local_rank = 0);

}  // namespace hybrid::cli
