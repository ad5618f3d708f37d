#include "hybrid/model/activation_checkpoint.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include "hybrid/model/autocast.h"
#include "hybrid/model/hybrid_lm.h"

namespace hybrid {
namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  // cu_seqlens, doc_ids, pos_in_doc: empty tensors without packing (autograd takes no undefined inputs).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t block_address, const at::Tensor& positions,
                            const at::Tensor& cu_seqlens, const at::Tensor& doc_ids, const at::Tensor& pos_in_doc) {
    ctx->saved_data["block"] = block_address;
    ctx->saved_data["autocast"] = at::autocast::is_autocast_enabled(at::kCUDA);
    ctx->saved_data["autocast_dtype"] = static_cast<int64_t>(at::autocast::get_autocast_dtype(at::kCUDA));
    ctx->save_for_backward({x, positions, cu_seqlens, doc_ids, pos_in_doc});
    at::NoGradGuard no_grad;
    return run(ctx, x, positions, cu_seqlens, doc_ids, pos_in_doc);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    at::Tensor x = saved[0].detach().requires_grad_(true);
    at::Tensor out;
    {
      at::AutoGradMode grad(true);
      CudaAutocast autocast(ctx->saved_data["autocast"].toBool(),
                            static_cast<at::ScalarType>(ctx->saved_data["autocast_dtype"].toInt()));
      out = run(ctx, x, saved[1], saved[2], saved[3], saved[4]);
    }
    torch::autograd::backward({out}, {grad_out[0]});
    return {x.grad(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }

  static at::Tensor run(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cu,
                        const at::Tensor& doc_ids, const at::Tensor& pos_in_doc) {
    auto* block = reinterpret_cast<BlockImpl*>(ctx->saved_data["block"].toInt());
    Packing packing{cu, doc_ids, pos_in_doc};
    return block->forward(x, positions, cu.numel() ? &packing : nullptr);
  }
};

}  // namespace

at::Tensor checkpointed_block(BlockImpl& block, const at::Tensor& x, const at::Tensor& positions, const Packing* packing) {
  const at::Tensor none = at::empty({0}, positions.options());
  return CheckpointFunction::apply(x, reinterpret_cast<int64_t>(&block), positions, packing ? packing->cu_seqlens : none,
                                   packing ? packing->doc_ids : none, packing ? packing->pos_in_doc : none);
}

}  // namespace hybrid
