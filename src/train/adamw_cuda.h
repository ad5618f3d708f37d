// The CUDA AdamW step (kernels/adamw.cu) as the optimizer calls it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <memory>
#include <vector>

namespace hybrid::train {

// One parameter's update: param, grad, exp_avg, exp_avg_sq contiguous float32 of one size on one
// CUDA device; step its float32 step count there (already advanced); cast undefined, or
// contiguous bf16 of param's size that receives the updated parameter's cast.
struct AdamWOperands {
  at::Tensor param, grad, exp_avg, exp_avg_sq, step, cast;
};

// AdamW updates queued a tensor at a time and launched a list at a time: a list goes out once it
// holds 48 tensors or enough elements to keep the GPU busy while the host lists the next. One
// launch a tensor (239 a 1b.yaml step) left the GPU idle between small tensors; one list a group,
// launched after the host had listed all of it, left it idle while the host listed (1.7 ms a
// step, forty-eighth session). Against one launch a tensor, a 1b.yaml step's AdamW takes 12.84 ->
// 11.81 ms of GPU time and the GPU idles 0.94 -> 0.62 ms under it (forty-ninth session).
// launch() sends what is listed: call it after the last add.
class AdamWLaunches {
 public:
  AdamWLaunches(double lr, double beta1, double beta2, double weight_decay, double eps, double grad_scale,
                c10::Device device);
  ~AdamWLaunches();
  void add(const AdamWOperands& tensor);
  void launch();

 private:
  struct Pending;
  std::unique_ptr<Pending> pending_;
};

}  // namespace hybrid::train
