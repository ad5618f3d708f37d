#include "hybrid/train/validation.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>

#include "hybrid/model/autocast.h"
#include "hybrid/train/loss.h"
#include "hybrid/util/progress.h"

namespace hybrid {

double ValidationLoss::loss() const { return batches ? sum / static_cast<double>(batches) : NAN; }

ValidationLoss validation_loss(HybridLM& model, const data::Source& source, int64_t batch_size, int64_t max_batches,
                               c10::Device device, bool bf16, int rank, int world) {
  at::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  const int64_t T = source.seq_len();
  uint64_t n = source.num_instances();
  if (max_batches >= 0) n = std::min<uint64_t>(n, static_cast<uint64_t>(max_batches * batch_size));
  // Summed on the device and read once: a read a batch left the GPU idle while the host read the
  // next batch's tokens.
  at::Tensor sum = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
  ValidationLoss out;
  const uint64_t step = static_cast<uint64_t>(batch_size) * world;
  const int64_t all_batches = static_cast<int64_t>(n / static_cast<uint64_t>(batch_size));
  util::Progress progress("validation loss", (all_batches + world - 1 - rank) / world, "batches", rank == 0);
  for (uint64_t first = static_cast<uint64_t>(batch_size) * rank; first + batch_size <= n; first += step, ++out.batches) {
    progress.update(out.batches);
    at::Tensor tokens = at::empty({batch_size, T}, at::kLong);
    for (int64_t r = 0; r < batch_size; ++r) source.read_instance(first + r, tokens.data_ptr<int64_t>() + r * T);
    tokens = tokens.to(device);
    CudaAutocast autocast(bf16 && device.is_cuda());
    sum += lm_loss(model->forward(tokens), tokens).first.to(at::kDouble);
  }
  model->train(was_training);
  out.sum = sum.item<double>();
  return out;
}

}  // namespace hybrid
