// AdamW steps of many float32 parameter tensors at once (src/train/optimizer.cpp), the global-norm
// clipping's factor folded in. For each tensor, with t its step count (already advanced, read from
// the device):
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
// Tiles: a launch takes up to kListTensors tensors, their pointers in the kernel's parameters
// (under the 4 KB every driver takes); each tensor is cut into blocks of kChunk elements, and a
// block finds its tensor by a binary search over the tensors' first blocks. 256 threads a block,
// 4 floats a thread an access (16-byte accesses where the tensor's five arrays are aligned for
// them, else one), 4 accesses a thread a block. A list is launched when full or once it holds
// kLaunchBlocks blocks (src/train/adamw_cuda.h says why).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstring>

#include "../src/train/adamw_cuda.h"

namespace hybrid::train {
namespace {

constexpr int kThreads = 256, kAccesses = 4, kChunk = kThreads * 4 * kAccesses;
constexpr int kListTensors = 48;
// A list is launched once it holds this many blocks (16.8 M elements, about 0.1 ms of the GPU's):
// the host, which spends a few us a tensor listing, stays ahead of the GPU.
constexpr int64_t kLaunchBlocks = 4096;

struct Hyper {
  float lr, beta1, beta2, weight_decay, eps, grad_scale;
};

struct TensorPointers {
  float* p;
  const float* grad;
  float *m, *v;
  const float* step;
  __nv_bfloat16* cast;  // null: no cached cast to write
  int64_t n;
  int wide;  // 16-byte accesses
};

struct TensorList {
  TensorPointers t[kListTensors];
  int first_block[kListTensors + 1];  // tensor i's blocks: first_block[i] .. first_block[i + 1] - 1
  int count;
};
static_assert(sizeof(TensorList) < 4000, "a launch's list fits the kernel parameters every driver takes");

// Elements [begin, end) of one tensor, W at a time (end a multiple of W).
template <int W>
__device__ __forceinline__ void update_range(const TensorPointers& x, int64_t begin, int64_t end, const Hyper& h) {
  const float t = *x.step;
  const float step_size = h.lr / (1.f - powf(h.beta1, t));
  const float bc2_sqrt = sqrtf(1.f - powf(h.beta2, t));
  const float decay = h.lr * h.weight_decay;
  for (int64_t i = begin + threadIdx.x * W; i < end; i += kThreads * W) {
    float pv[W], gv[W], mv[W], vv[W];
    if constexpr (W == 4) {
      *reinterpret_cast<float4*>(pv) = *reinterpret_cast<const float4*>(x.p + i);
      *reinterpret_cast<float4*>(gv) = *reinterpret_cast<const float4*>(x.grad + i);
      *reinterpret_cast<float4*>(mv) = *reinterpret_cast<const float4*>(x.m + i);
      *reinterpret_cast<float4*>(vv) = *reinterpret_cast<const float4*>(x.v + i);
    } else {
      pv[0] = x.p[i], gv[0] = x.grad[i], mv[0] = x.m[i], vv[0] = x.v[i];
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
      *reinterpret_cast<float4*>(x.p + i) = *reinterpret_cast<const float4*>(pv);
      *reinterpret_cast<float4*>(x.m + i) = *reinterpret_cast<const float4*>(mv);
      *reinterpret_cast<float4*>(x.v + i) = *reinterpret_cast<const float4*>(vv);
      if (x.cast) {
        const __nv_bfloat162 lo = __floats2bfloat162_rn(pv[0], pv[1]), hi = __floats2bfloat162_rn(pv[2], pv[3]);
        uint2 bits;
        memcpy(&bits.x, &lo, 4);
        memcpy(&bits.y, &hi, 4);
        *reinterpret_cast<uint2*>(x.cast + i) = bits;  // one 8-byte store
      }
    } else {
      x.p[i] = pv[0], x.m[i] = mv[0], x.v[i] = vv[0];
      if (x.cast) x.cast[i] = __float2bfloat16_rn(pv[0]);
    }
  }
}

// __grid_constant__: the list is indexed at run time, which would otherwise copy it to local memory.
__global__ void __launch_bounds__(kThreads) adamw_step(const __grid_constant__ TensorList list, Hyper h) {
  const int block = static_cast<int>(blockIdx.x);
  int lo = 0, hi = list.count - 1;  // the last tensor whose first block is at or before this one
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (list.first_block[mid] <= block) lo = mid;
    else hi = mid - 1;
  }
  const TensorPointers& x = list.t[lo];
  const int64_t begin = static_cast<int64_t>(block - list.first_block[lo]) * kChunk,
                end = std::min<int64_t>(begin + kChunk, x.n);
  if (x.wide) update_range<4>(x, begin, end, h);
  else update_range<1>(x, begin, end, h);
}

bool aligned(const at::Tensor& x, int bytes) { return reinterpret_cast<uintptr_t>(x.data_ptr()) % bytes == 0; }

TensorPointers pointers_of(const AdamWOperands& o) {
  const at::Tensor& param = o.param;
  for (const at::Tensor* x : {&o.param, &o.grad, &o.exp_avg, &o.exp_avg_sq})
    TORCH_CHECK(x->is_cuda() && x->scalar_type() == at::kFloat && x->is_contiguous() && x->numel() == param.numel() &&
                    x->device() == param.device(),
                "AdamWLaunches: parameter, gradient and moments contiguous float32 of one size on one device");
  TORCH_CHECK(o.step.scalar_type() == at::kFloat && o.step.numel() == 1 && o.step.device() == param.device(),
              "AdamWLaunches: the step count a float32 scalar beside the parameter");
  const at::Tensor& cast = o.cast;
  TORCH_CHECK(!cast.defined() || (cast.scalar_type() == at::kBFloat16 && cast.is_contiguous() &&
                                  cast.numel() == param.numel() && cast.device() == param.device()),
              "AdamWLaunches: the cast contiguous bf16 of the parameter's size beside it");
  const int64_t n = param.numel();
  const bool wide = n % 4 == 0 && aligned(param, 16) && aligned(o.grad, 16) && aligned(o.exp_avg, 16) &&
                    aligned(o.exp_avg_sq, 16) && (!cast.defined() || aligned(cast, 8));
  return {param.data_ptr<float>(),
          o.grad.data_ptr<float>(),
          o.exp_avg.data_ptr<float>(),
          o.exp_avg_sq.data_ptr<float>(),
          o.step.data_ptr<float>(),
          cast.defined() ? reinterpret_cast<__nv_bfloat16*>(cast.data_ptr()) : nullptr,
          n,
          wide};
}

}  // namespace

// What is listed and not launched yet, and the tensors it points into: a gradient made contiguous
// for the update is a temporary, and its memory must not go back to the allocator (and to another
// tensor's writes) before the kernel that reads it is queued.
struct AdamWLaunches::Pending {
  Hyper h;
  c10::Device device;
  TensorList list{};
  int64_t blocks = 0;
  std::vector<at::Tensor> held;
};

AdamWLaunches::AdamWLaunches(double lr, double beta1, double beta2, double weight_decay, double eps,
                             double grad_scale, c10::Device device)
    : pending_(std::make_unique<Pending>(Pending{
          {static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2),
           static_cast<float>(weight_decay), static_cast<float>(eps), static_cast<float>(grad_scale)},
          device})) {}

AdamWLaunches::~AdamWLaunches() = default;

void AdamWLaunches::add(const AdamWOperands& o) {
  Pending& q = *pending_;
  TORCH_CHECK(o.param.device() == q.device, "AdamWLaunches: every tensor on ", q.device);
  const TensorPointers x = pointers_of(o);
  if (x.n == 0) return;
  const int64_t tensor_blocks = (x.n + kChunk - 1) / kChunk;
  // A grid's x dimension and first_block hold less than 2^31 blocks; a list holds less than
  // kLaunchBlocks before this tensor.
  TORCH_CHECK(tensor_blocks < (int64_t{1} << 31) - kLaunchBlocks, "AdamWLaunches: a tensor of ", x.n,
              " elements is more than one launch takes");
  if (q.list.count == kListTensors) launch();
  q.list.t[q.list.count] = x;
  q.list.first_block[q.list.count] = static_cast<int>(q.blocks);
  ++q.list.count, q.blocks += tensor_blocks;
  q.held.push_back(o.grad);
  // Enough for the GPU to work on while the host lists the next tensors (a few us each).
  if (q.blocks >= kLaunchBlocks) launch();
}

void AdamWLaunches::launch() {
  Pending& q = *pending_;
  if (q.list.count == 0) return;
  const c10::cuda::CUDAGuard guard(q.device);
  q.list.first_block[q.list.count] = static_cast<int>(q.blocks);
  adamw_step<<<static_cast<unsigned>(q.blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(q.list, q.h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  q.list.count = 0, q.blocks = 0;
  q.held.clear();  // freed after the launch: stream-ordered behind the kernel that reads them
}

}  // namespace hybrid::train
