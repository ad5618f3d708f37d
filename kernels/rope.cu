// Rotary position embedding (src/ops/rope.cpp) on CUDA, forward and backward in one kernel:
//   y_i = x_i cos(a_i) - x_{i+h} s sin(a_i),   y_{i+h} = x_{i+h} cos(a_i) + x_i s sin(a_i)
// for i < h = D / 2, a_i = p f_i (float32, as HF), s = 1 forward and -1 backward (the gradient
// is the rotation by -a). x [B, T, H, D] with any strides but a contiguous last dim (q and k as
// views of the fused projection's output, or the transposed gradients attention returns), y
// contiguous in x's dtype, float32 arithmetic. Memory-bound: a thread owns one (token, i) pair
// of columns and walks the heads, so each angle's sincos is computed once for all of them and
// a warp reads 64 contiguous bytes of each half of a row at every head.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace hybrid::ops {
namespace {

constexpr int kThreads = 128;

template <class T>
__global__ void rope_kernel(const T* __restrict__ x, T* __restrict__ y, const int64_t* __restrict__ positions,
                            const float* __restrict__ inv_freq, int64_t tokens, int64_t T_len, int H, int half,
                            int64_t stride_b, int64_t stride_t, int64_t stride_h, float sign) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (id >= tokens * half) return;
  const int64_t token = id / half;
  const int i = static_cast<int>(id - token * half);
  const int64_t b = token / T_len, t = token - b * T_len;
  float s, c;
  sincosf(static_cast<float>(positions[token]) * inv_freq[i], &s, &c);
  s *= sign;
  const T* in = x + b * stride_b + t * stride_t + i;
  T* out = y + token * H * 2 * half + i;
  for (int h = 0; h < H; ++h) {
    const float x1 = static_cast<float>(in[h * stride_h]), x2 = static_cast<float>(in[h * stride_h + half]);
    out[h * 2 * half] = static_cast<T>(x1 * c - x2 * s);
    out[h * 2 * half + half] = static_cast<T>(x2 * c + x1 * s);
  }
}

}  // namespace

// x [B, T, H, D] (last dim contiguous), y [B, T, H, D] contiguous, positions [B, T] int64,
// inv_freq [D / 2] float32, all on one device.
void rope_cuda(const at::Tensor& x, at::Tensor& y, const at::Tensor& positions, const at::Tensor& inv_freq, int sign) {
  TORCH_CHECK(x.dim() == 4 && x.stride(-1) == 1 && y.is_contiguous() && y.sizes() == x.sizes() &&
                  y.scalar_type() == x.scalar_type() && positions.scalar_type() == at::kLong &&
                  positions.numel() == x.size(0) * x.size(1) && inv_freq.scalar_type() == at::kFloat &&
                  inv_freq.numel() == x.size(3) / 2,
              "rope_cuda: x [B, T, H, D] with a contiguous last dim, y contiguous alike, positions [B, T] int64, "
              "inv_freq [D / 2] float32");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = x.size(0) * x.size(1), half = x.size(3) / 2;
  if (tokens * half == 0 || x.size(2) == 0) return;
  const at::Tensor pos = positions.contiguous(), freq = inv_freq.contiguous();
  const auto blocks = static_cast<unsigned>((tokens * half + kThreads - 1) / kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope", [&] {
    rope_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(), freq.data_ptr<float>(), tokens,
        x.size(1), static_cast<int>(x.size(2)), static_cast<int>(half), x.stride(0), x.stride(1), x.stride(2),
        static_cast<float>(sign));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace hybrid::ops
