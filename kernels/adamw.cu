// One AdamW step on a float32 parameter tensor (src/train/optimizer.cpp), the global-norm
// clipping's factor folded in. With t the step count (already advanced, read from the device):
//   g = s grad                                  (s: the clipping's factor, 1 when it is off)
//   p = p - lr wd p                             (decoupled weight decay)
//   m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2
//   p = p - lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// the update ATen's fused AdamW makes, in float32, where clipping cost a multiply pass over every
// gradient before it (`_foreach_mul_`: 3.6 ms of a 1b.yaml step, 1.59 B parameters, forty-fourth
// session). The gradient is read, never written. Where the parameter's bf16 cast is cached for
// the next forward (model/weight_casts.h), the new cast is written too: 2 bytes more a parameter
// here, where the forward's recast read all 4 again (3.1 ms a 1b.yaml step).
//
// Tiles: 256 threads a block, 4 floats a thread an iteration (16-byte accesses where the four
// tensors are 16-byte aligned, else one), blocks striding over the tensor.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstring>

namespace hybrid::train {
namespace {

constexpr int kThreads = 256;

struct Hyper {
  float lr, beta1, beta2, weight_decay, eps, grad_scale;
};

template <int W>
__global__ void __launch_bounds__(kThreads)
    adamw_step(float* __restrict__ p, const float* __restrict__ grad, float* __restrict__ m, float* __restrict__ v,
               const float* __restrict__ step, __nv_bfloat16* __restrict__ cast, int64_t n, Hyper h) {
  const float t = *step;
  const float step_size = h.lr / (1.f - powf(h.beta1, t));
  const float bc2_sqrt = sqrtf(1.f - powf(h.beta2, t));
  const float decay = h.lr * h.weight_decay;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * W; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads * W) {
    float pv[W], gv[W], mv[W], vv[W];
    if constexpr (W == 4) {
      *reinterpret_cast<float4*>(pv) = *reinterpret_cast<const float4*>(p + i);
      *reinterpret_cast<float4*>(gv) = *reinterpret_cast<const float4*>(grad + i);
      *reinterpret_cast<float4*>(mv) = *reinterpret_cast<const float4*>(m + i);
      *reinterpret_cast<float4*>(vv) = *reinterpret_cast<const float4*>(v + i);
    } else {
      pv[0] = p[i], gv[0] = grad[i], mv[0] = m[i], vv[0] = v[i];
    }
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float g = gv[k] * h.grad_scale;
      pv[k] -= decay * pv[k];
      mv[k] = fmaf(h.beta1, mv[k], (1.f - h.beta1) * g);
      vv[k] = fmaf(h.beta2, vv[k], (1.f - h.beta2) * g * g);
      pv[k] -= step_size * mv[k] / (sqrtf(vv[k]) / bc2_sqrt + h.eps);
    }
    if constexpr (W == 4) {
      *reinterpret_cast<float4*>(p + i) = *reinterpret_cast<const float4*>(pv);
      *reinterpret_cast<float4*>(m + i) = *reinterpret_cast<const float4*>(mv);
      *reinterpret_cast<float4*>(v + i) = *reinterpret_cast<const float4*>(vv);
      if (cast) {
        const __nv_bfloat162 lo = __floats2bfloat162_rn(pv[0], pv[1]), hi = __floats2bfloat162_rn(pv[2], pv[3]);
        uint2 bits;
        memcpy(&bits.x, &lo, 4);
        memcpy(&bits.y, &hi, 4);
        *reinterpret_cast<uint2*>(cast + i) = bits;  // one 8-byte store
      }
    } else {
      p[i] = pv[0], m[i] = mv[0], v[i] = vv[0];
      if (cast) cast[i] = __float2bfloat16_rn(pv[0]);
    }
  }
}

bool aligned(const at::Tensor& x, int bytes) { return reinterpret_cast<uintptr_t>(x.data_ptr()) % bytes == 0; }

}  // namespace

// param, grad, exp_avg, exp_avg_sq: contiguous float32 of one size on one CUDA device; step: its
// float32 step count there; cast: undefined, or contiguous bf16 of param's size that receives
// the updated parameter's cast.
void adamw_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const at::Tensor& step, const at::Tensor& cast, double lr,
                     double beta1, double beta2, double weight_decay, double eps, double grad_scale) {
  for (const at::Tensor* x : {&param, &grad, &exp_avg, &exp_avg_sq})
    TORCH_CHECK(x->is_cuda() && x->scalar_type() == at::kFloat && x->is_contiguous() && x->numel() == param.numel() &&
                    x->device() == param.device(),
                "adamw_step_cuda: parameter, gradient and moments contiguous float32 of one size on one device");
  TORCH_CHECK(step.scalar_type() == at::kFloat && step.numel() == 1 && step.device() == param.device(),
              "adamw_step_cuda: the step count a float32 scalar beside the parameter");
  TORCH_CHECK(!cast.defined() || (cast.scalar_type() == at::kBFloat16 && cast.is_contiguous() &&
                                  cast.numel() == param.numel() && cast.device() == param.device()),
              "adamw_step_cuda: the cast contiguous bf16 of the parameter's size beside it");
  const int64_t n = param.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  const Hyper h{static_cast<float>(lr),           static_cast<float>(beta1), static_cast<float>(beta2),
                static_cast<float>(weight_decay), static_cast<float>(eps),   static_cast<float>(grad_scale)};
  const bool wide = n % 4 == 0 && aligned(param, 16) && aligned(grad, 16) && aligned(exp_avg, 16) &&
                    aligned(exp_avg_sq, 16) && (!cast.defined() || aligned(cast, 8));
  const int W = wide ? 4 : 1;
  // Enough blocks to fill the GPU several times over, each then striding.
  const int64_t max_blocks = 8LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((n / W + kThreads - 1) / kThreads, max_blocks));
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, stream>>>(param.data_ptr<float>(), grad.data_ptr<float>(),
                                            exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
                                            step.data_ptr<float>(),
                                            cast.defined() ? reinterpret_cast<__nv_bfloat16*>(cast.data_ptr()) : nullptr,
                                            n, h);
  };
  if (wide) launch(adamw_step<4>);
  else launch(adamw_step<1>);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hybrid::train
