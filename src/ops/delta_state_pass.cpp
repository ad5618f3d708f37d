// The state pass from ATen ops (CPU, float64, head dims the kernel does not take, or no CUDA
// kernels); see delta_state_pass.h.
#include "delta_state_pass.h"

#include <string>

namespace hybrid::ops::detail {

namespace {

bool on_kernel(at::Device device, int64_t K, int64_t V) {
  return device.is_cuda() && K % 16 == 0 && K <= 256 && V % 16 == 0 && V <= 256;
}
bool on_kernel(const StatePassInputs& in) {
  return in.k.scalar_type() == at::kFloat && on_kernel(in.k.device(), in.k.size(3), in.add.size(3));
}

}  // namespace

bool state_pass_takes_queries([[maybe_unused]] at::Device device, [[maybe_unused]] int64_t H,
                              [[maybe_unused]] int64_t K, [[maybe_unused]] int64_t V,
                              [[maybe_unused]] int64_t sequences, [[maybe_unused]] bool reverse) {
#ifdef HYBRID_CUDA_KERNELS
  if (on_kernel(device, K, V)) return state_pass_cuda_takes_queries(device, H, K, V, sequences, reverse);
#endif
  return false;
}

bool state_pass_forms_output([[maybe_unused]] at::Device device, [[maybe_unused]] int64_t H,
                             [[maybe_unused]] int64_t K, [[maybe_unused]] int64_t V,
                             [[maybe_unused]] int64_t sequences) {
#ifdef HYBRID_CUDA_KERNELS
  if (on_kernel(device, K, V)) return state_pass_cuda_forms_output(device, H, K, V, sequences);
#endif
  return false;
}

StatePassKernel state_pass_kernel_named(const char* name, const char* what) {
  const std::string n = name ? name : "";
  TORCH_CHECK(n.empty() || n == "warps" || n == "registers" || n == "registers-single", what,
              " must be warps, registers or registers-single, not ", n);
  return n == "warps"              ? StatePassKernel::kWarps
         : n == "registers"        ? StatePassKernel::kRegisters
         : n == "registers-single" ? StatePassKernel::kRegistersSingle
                                   : StatePassKernel::kFastest;
}

bool state_pass_on_registers([[maybe_unused]] at::Device device, [[maybe_unused]] int64_t H,
                             [[maybe_unused]] int64_t K, [[maybe_unused]] int64_t V, [[maybe_unused]] int64_t sequences,
                             [[maybe_unused]] bool reverse) {
#ifdef HYBRID_CUDA_KERNELS
  if (on_kernel(device, K, V)) return state_pass_cuda_on_registers(device, H, K, V, sequences, reverse);
#endif
  return false;
}

int state_pass_value_tile([[maybe_unused]] at::Device device, [[maybe_unused]] int64_t H, [[maybe_unused]] int64_t K,
                          [[maybe_unused]] int64_t V, [[maybe_unused]] int64_t sequences,
                          [[maybe_unused]] bool raw_keys) {
#ifdef HYBRID_CUDA_KERNELS
  if (on_kernel(device, K, V)) return state_pass_cuda_value_tile(device, H, K, V, sequences, raw_keys);
#endif
  return 0;
}

bool state_pass_takes_value_tokens([[maybe_unused]] const at::Tensor& x) {
#ifdef HYBRID_CUDA_KERNELS
  const auto eight = [](int64_t n) { return n % 8 == 0; };
  return x.dim() == 4 && x.scalar_type() == at::kBFloat16 && on_kernel(x.device(), 16, x.size(3)) &&
         x.stride(3) == 1 && x.stride(0) == x.size(1) * x.stride(1) && eight(x.stride(1)) && eight(x.stride(2)) &&
         reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && x.size(0) * x.size(1) < (int64_t{1} << 32);
#else
  return false;
#endif
}

bool state_pass_takes_queries(const StatePassInputs& in) {
  return on_kernel(in) && in.k_raw.defined() &&
         state_pass_takes_queries(in.k.device(), in.k.size(0), in.k.size(3), in.add.size(3),
                                  static_cast<int64_t>(in.chunk_offsets.size()) - 1, in.reverse);
}

StatePassOutputs state_pass(const StatePassInputs& in, bool want_x) {
  const int64_t H = in.k.size(0), NC = in.k.size(1), C = in.k.size(2), K = in.k.size(3), V = in.add.size(3);
#ifdef HYBRID_CUDA_KERNELS
  if (on_kernel(in)) return state_pass_cuda(in, want_x);
#endif
  TORCH_CHECK(!in.q_raw.defined() && !in.QKG.defined() && !in.M_split.defined() && !in.add_tokens.defined(),
              "state_pass: q_raw only where state_pass_takes_queries, QKG where state_pass_forms_output, "
              "M_split and add_tokens on the CUDA pass");
  TORCH_CHECK(!in.init.defined() || in.add.scalar_type() == in.init.scalar_type(),
              "state_pass: add in bf16 only on the CUDA pass");
  StatePassOutputs out;
  out.before = at::empty({H, NC, K, V}, in.add.options());
  out.Y = at::empty({H, NC, C, V}, in.add.options());
  if (want_x) out.X = at::empty({H, NC, C, V}, in.add.options());
  const int64_t N = static_cast<int64_t>(in.chunk_offsets.size()) - 1;
  out.final_state = at::empty({N, H, K, V}, in.add.options());
  for (int64_t n = 0; n < N; ++n) {
    at::Tensor S = in.init.defined() ? in.init.select(0, n) : at::zeros({H, K, V}, in.add.options());
    const int64_t begin = in.chunk_offsets[n], end = in.chunk_offsets[n + 1];
    for (int64_t step = 0; step < end - begin; ++step) {
      const int64_t c = in.reverse ? end - 1 - step : begin + step;
      at::Tensor k = in.k.select(1, c);  // [H, C, K]
      out.before.select(1, c).copy_(S);
      at::Tensor X = in.a.select(1, c).unsqueeze(-1) * at::matmul(k, S) + in.add.select(1, c);
      at::Tensor Y = at::matmul(in.M.select(1, c), X);
      if (want_x) out.X.select(1, c).copy_(X);
      out.Y.select(1, c).copy_(Y);
      S = in.last.select(1, c).unsqueeze(-1).unsqueeze(-1) * S +
          at::matmul(k.transpose(-1, -2), in.b.select(1, c).unsqueeze(-1) * Y);
      if (in.extra.defined()) S = S + in.extra.select(1, c);
    }
    out.final_state.select(0, n).copy_(S);
  }
  if (in.dot_with.defined()) out.dots = (out.before * in.dot_with).sum({-2, -1}).unsqueeze(-1);
  return out;
}

}  // namespace hybrid::ops::detail
