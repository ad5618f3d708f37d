#include "hybrid/model/generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>

#ifdef HYBRID_CUDA_KERNELS
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <algorithm>
#include <chrono>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <vector>

#include "hybrid/model/decoding.h"

namespace hybrid {
namespace {

// logits [B, vocab] -> the next token of each row [B] (on the CPU). Greedy rows are chosen where
// the logits are (the first of equal maxima on every device, as in double on the CPU), so that a
// step copies B token ids rather than B x vocab logits; sampling draws from the CPU generator.
at::Tensor next_tokens(const at::Tensor& logits, const SamplingOptions& options, at::Generator& generator) {
  if (options.temperature == 0) return logits.argmax(-1).to(at::kCPU);
  const at::Tensor rows = logits.to(at::kCPU, at::kDouble);
  at::Tensor scaled = rows / options.temperature;
  constexpr double kNever = -std::numeric_limits<double>::infinity();
  if (options.top_k > 0 && options.top_k < scaled.size(-1)) {
    const at::Tensor kth = std::get<0>(scaled.topk(options.top_k, -1)).narrow(-1, options.top_k - 1, 1);
    scaled = scaled.masked_fill(scaled < kth, kNever);
  }
  if (options.top_p < 1) {  // drop a token once the ones ranked above it hold top_p (never the first)
    const auto [sorted, order] = scaled.sort(-1, /*descending=*/true);
    const at::Tensor probabilities = sorted.softmax(-1);
    const at::Tensor drop_sorted = (probabilities.cumsum(-1) - probabilities).ge(options.top_p);
    scaled = scaled.masked_fill(at::zeros_like(drop_sorted).scatter(-1, order, drop_sorted), kNever);
  }
  return at::multinomial(scaled.softmax(-1), 1, /*replacement=*/false, generator).squeeze(-1);
}

// The prompt's forward. Rows of different lengths go in one forward as documents packed in one
// row (each as it would go alone), whose states are then stacked.
at::Tensor prompt_forward(HybridLM& model, const at::Tensor& prompt, const std::vector<int64_t>& lengths,
                          DecodingState& decoding) {
  const int64_t T = prompt.size(1);
  if (lengths.empty() || std::all_of(lengths.begin(), lengths.end(), [&](int64_t l) { return l == T; }))
    return model->forward(prompt, decoding, /*last_only=*/true);
  const auto [ids, offsets] = pack_rows(prompt, lengths);
  std::vector<DecodingState> rows;
  const at::Tensor logits = model->forward_documents(ids, offsets, rows);
  decoding = stack_rows(rows);
  return logits;
}

// The one-token steps after the prompt: forwards through the decoding state; with fixed shapes
// (SamplingOptions::cuda_graph, fix_shapes) on CUDA, one captured CUDA graph replayed a step, where
// a forward launches some hundreds of kernels one by one from the host (a 1b.yaml-size model's
// step took 6.4 ms under bf16 for 3 GB of weights: the host's launches, not the GPU). Step 1 runs
// as a forward on a side stream (what a capture needs set up is made there, e.g. cuBLAS's
// workspace); step 2 is captured there, then replayed; every later step is a replay. On the CPU
// (or a build without the CUDA kernels) the fixed-shape forwards run as they are (the same values:
// the CPU tests check them).
class Steps {
 public:
  Steps(HybridLM& model, DecodingState& decoding, bool fixed, int64_t capacity) : model_(model), decoding_(decoding) {
    if (!fixed) return;
    fix_shapes(decoding, capacity);
#ifdef HYBRID_CUDA_KERNELS
    graphed_ = decoding.next_slot.is_cuda();
#endif
  }

  // tokens [B] on the model's device -> the logits [B, 1, vocab] after them (until the next step).
  at::Tensor next(const at::Tensor& tokens) {
#ifdef HYBRID_CUDA_KERNELS
    if (graphed_) return replayed(tokens);
#endif
    return model_->forward(tokens.unsqueeze(1), decoding_, /*last_only=*/true);
  }

 private:
#ifdef HYBRID_CUDA_KERNELS
  at::Tensor replayed(const at::Tensor& tokens) {
    if (ids_.defined()) ids_.copy_(tokens.unsqueeze(1));
    else ids_ = tokens.unsqueeze(1).clone();
    if (graph_) {
      graph_->replay();
      decoding_.length += 1;  // what the captured forward advanced on the host
      for (LayerDecodingState& layer : decoding_.layers) layer.cached += layer.next_slot.defined();
      return logits_;
    }
    const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream();
    if (!side_) side_ = c10::cuda::getStreamFromPool();  // the same one for step 1 and the capture
    const c10::cuda::CUDAStream side = *side_;
    at::cuda::CUDAEvent ids_in;
    ids_in.record(main);
    ids_in.block(side);
    at::Tensor logits;
    {
      const c10::cuda::CUDAStreamGuard on_side(side);
      if (!warmed_) {
        logits = model_->forward(ids_, decoding_, /*last_only=*/true);
        warmed_ = true;
      } else {
        graph_ = std::make_unique<at::cuda::CUDAGraph>();
        graph_->capture_begin({0, 0}, cudaStreamCaptureModeRelaxed);
        logits_ = model_->forward(ids_, decoding_, /*last_only=*/true);
        graph_->capture_end();
      }
    }
    at::cuda::CUDAEvent done;
    done.record(side);
    done.block(main);
    if (!graph_) return logits;
    graph_->replay();  // the capture recorded the step without running it
    return logits_;
  }
#endif

  HybridLM& model_;
  DecodingState& decoding_;
#ifdef HYBRID_CUDA_KERNELS
  bool graphed_ = false, warmed_ = false;
  at::Tensor ids_, logits_;  // the graph's input and output: the same memory at every replay
  std::optional<c10::cuda::CUDAStream> side_;
  std::unique_ptr<at::cuda::CUDAGraph> graph_;
#endif
};

}  // namespace

std::pair<at::Tensor, at::Tensor> pack_rows(const at::Tensor& prompt, const std::vector<int64_t>& lengths) {
  std::vector<int64_t> offsets{0};
  std::vector<at::Tensor> documents;
  for (size_t b = 0; b < lengths.size(); ++b) {
    documents.push_back(prompt[b].narrow(0, 0, lengths[b]));
    offsets.push_back(offsets.back() + lengths[b]);
  }
  return {at::cat(documents).unsqueeze(0), at::tensor(offsets)};
}

at::Tensor generate(HybridLM& model, const at::Tensor& prompt, const SamplingOptions& options,
                    GenerationTimes* times, const std::vector<int64_t>& prompt_lengths) {
  if (prompt.dim() != 2 || prompt.size(1) == 0 || prompt.scalar_type() != at::kLong)
    throw std::invalid_argument("generate: the prompt must be int64 [B, T] with T >= 1");
  if (!prompt_lengths.empty() &&
      (static_cast<int64_t>(prompt_lengths.size()) != prompt.size(0) ||
       std::any_of(prompt_lengths.begin(), prompt_lengths.end(), [&](int64_t l) { return l < 1 || l > prompt.size(1); })))
    throw std::invalid_argument("generate: prompt_lengths must give each of the " + std::to_string(prompt.size(0)) +
                                " rows a length in 1 .. " + std::to_string(prompt.size(1)));
  if (options.new_tokens < 0 || options.temperature < 0 || options.top_k < 0)
    throw std::invalid_argument("generate: new_tokens, temperature and top_k must not be negative");
  if (!(options.top_p > 0 && options.top_p <= 1)) throw std::invalid_argument("generate: top_p must lie in (0, 1]");
  if (options.new_tokens == 0) return at::empty({prompt.size(0), 0}, prompt.options());
  at::NoGradGuard no_grad;
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  DecodingState decoding;
  std::vector<at::Tensor> tokens;
  at::Tensor ended = at::zeros({prompt.size(0)}, at::kBool);
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  Clock::time_point first_chosen;
  at::Tensor logits = prompt_forward(model, prompt, prompt_lengths, decoding);
  Steps steps(model, decoding, options.cuda_graph && options.new_tokens > 1, decoding.length + options.new_tokens);
  for (int64_t i = 0; i < options.new_tokens; ++i) {
    at::Tensor next = next_tokens(logits.select(1, -1), options, generator);  // waits for the logits
    if (i == 0) first_chosen = Clock::now();
    if (options.stop_id >= 0) {
      next.masked_fill_(ended, options.stop_id);
      ended |= next.eq(options.stop_id);
    }
    tokens.push_back(next.to(prompt.device()));
    if (i + 1 == options.new_tokens || ended.all().item<bool>()) break;
    logits = steps.next(tokens.back());
  }
  if (times) {
    const Clock::time_point end = Clock::now();
    times->prompt_seconds = std::chrono::duration<double>(first_chosen - start).count();
    times->step_seconds = std::chrono::duration<double>(end - first_chosen).count();
    times->steps = static_cast<int64_t>(tokens.size()) - 1;
  }
  return at::stack(tokens, 1);
}

}  // namespace hybrid
