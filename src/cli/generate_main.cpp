// hybrid-generate: continue token sequences with a model directory, greedily or by sampling.
// Prints each row's new tokens as one line of ids (scripts/generate.py turns text into ids and
// back), up to its stop token; with --output also writes prompt and continuation [B, T + N] as an
// int64 .npy (rows that stopped early padded with the stop token). Prompts of different lengths
// come in one file right-padded with --pad-id (each row then goes on as it would alone; in the
// output, each row's prompt without its padding, then its tokens, padded at the end with the id).
#include <ATen/ATen.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <limits>
#include <numeric>
#include <vector>

#include "hybrid/cli/common.h"
#include "hybrid/cli/inference.h"
#include "hybrid/error.h"
#include "hybrid/io/npy.h"
#include "hybrid/io/token_ids.h"
#include "hybrid/log.h"
#include "hybrid/model/autocast.h"
#include "hybrid/model/generate.h"
#include "hybrid/util/trace.h"

using namespace hybrid;

namespace {

// Each row's prompt length: up to its trailing pad_id tokens (none without a pad id).
std::vector<int64_t> prompt_lengths(const at::Tensor& prompt, int64_t pad_id) {
  if (pad_id < 0) return {};
  std::vector<int64_t> lengths;
  const auto ids = prompt.accessor<int64_t, 2>();
  for (int64_t b = 0; b < prompt.size(0); ++b) {
    int64_t length = prompt.size(1);
    while (length > 0 && ids[b][length - 1] == pad_id) --length;
    if (length == 0)
      throw Error("--pad-id " + std::to_string(pad_id) + ": row " + std::to_string(b) + " of the prompt is all padding");
    lengths.push_back(length);
  }
  return lengths;
}

// [B, T + N]: each row's prompt, then its new tokens; with lengths, the prompts without their
// padding and the rows padded at the end with pad_id.
at::Tensor prompts_and_continuations(const at::Tensor& prompt, const std::vector<int64_t>& lengths,
                                     const at::Tensor& added, int64_t pad_id) {
  if (lengths.empty()) return at::cat({prompt, added}, 1);
  at::Tensor rows = at::full({prompt.size(0), prompt.size(1) + added.size(1)}, pad_id, prompt.options());
  for (int64_t b = 0; b < prompt.size(0); ++b) {
    rows[b].narrow(0, 0, lengths[b]).copy_(prompt[b].narrow(0, 0, lengths[b]));
    rows[b].narrow(0, lengths[b], added.size(1)).copy_(added[b]);
  }
  return rows;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"hybrid-generate: continue token sequences with a model (greedy, or sampled)"};
  std::string checkpoint, prompt_path, prompt_ids, output_path, device_name = "cpu";
  SamplingOptions sampling;
  app.add_option("--checkpoint", checkpoint,
                 "a checkpoint, a run folder (its latest checkpoint) or a model folder (config.yaml + model.safetensors)")
      ->required();
  auto* from_file = app.add_option("--prompt", prompt_path, ".npy of integer token ids, [T] or [B, T]");
  auto* from_line = app.add_option("--prompt-ids", prompt_ids, "token ids of one prompt, e.g. 12,7,99");
  from_file->excludes(from_line);
  app.add_option("--new-tokens", sampling.new_tokens, "tokens to add to each row")->check(CLI::NonNegativeNumber);
  app.add_option("--temperature", sampling.temperature, "0: the most likely token; else sample from softmax(logits / t)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--top-k", sampling.top_k, "sample among the k most likely tokens (0: all)")->check(CLI::NonNegativeNumber);
  app.add_option("--top-p", sampling.top_p, "sample among the fewest most likely tokens whose probability reaches p")
      ->check(CLI::Validator(
          [](std::string& text) -> std::string {
            double p = 0;
            if (CLI::detail::lexical_cast(text, p) && p > 0 && p <= 1) return {};
            return "must lie in (0, 1], got " + text;
          },
          "(0, 1]"));
  app.add_option("--seed", sampling.seed, "the sampling generator's seed");
  app.add_option("--stop-id", sampling.stop_id, "a row ends when it draws this token (e.g. EOS; -1: none)")
      ->check(CLI::Range(int64_t{-1}, std::numeric_limits<int64_t>::max()));
  int64_t pad_id = -1;
  app.add_option("--pad-id", pad_id, "--prompt's rows end before their trailing tokens of this id (different lengths)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--output", output_path, "write prompt and continuation [B, T + N] (int64) here");
  app.add_option("--device", device_name, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  bool bf16 = false;
  app.add_flag("--bf16", bf16, "on CUDA, under bf16 autocast (half the weight bytes a token)");
  // On CUDA the one-token step replays as one CUDA graph unless --no-cuda-graph (about twice as fast
  // on the H200: docs/benchmarks.md); --cuda-graph also asks for it on the CPU, where the same
  // fixed-shape forwards run without a graph (what the CPU tests compare).
  bool cuda_graph = false, no_cuda_graph = false;
  auto* graph_flag = app.add_flag("--cuda-graph", cuda_graph,
                                  "fixed-shape one-token steps (attention caches at full length; the same tokens), "
                                  "on CUDA replayed as one CUDA graph (the default there)");
  app.add_flag("--no-cuda-graph", no_cuda_graph, "on CUDA, launch each step's kernels one by one")->excludes(graph_flag);
  std::string profile_path;
  app.add_option("--profile", profile_path,
                 "write a Kineto trace (Chrome JSON) of the generation here: the host's ops and, on CUDA, the "
                 "kernels (where a step's time goes: scripts/gpu/trace_summary.py --gaps)");
  if (auto code = cli::parse(app, argc, argv)) return *code;
  if (prompt_path.empty() == prompt_ids.empty()) {
    std::cerr << "error: give the prompt as --prompt FILE.npy or as --prompt-ids (see --help)\n";
    return 2;
  }
  return cli::run_reporting_errors([&] {
    // The trace is written after the generation: a path that cannot take it is named before.
    if (!profile_path.empty()) {
      std::filesystem::path folder = std::filesystem::path(profile_path).parent_path();
      if (folder.empty()) folder = ".";
      if (!std::filesystem::is_directory(folder) || access(folder.c_str(), W_OK) != 0)
        throw Error("--profile " + profile_path + ": its folder does not exist or cannot be written");
    }
    auto [device, loaded] = cli::load_for_inference(checkpoint, device_name, bf16);
    sampling.cuda_graph = cuda_graph || (device.is_cuda() && !no_cuda_graph);
    const int64_t vocab = loaded.config.model.vocab_size;
    at::Tensor prompt = prompt_path.empty() ? io::parse_token_ids(prompt_ids, "--prompt-ids", vocab)
                                            : io::read_token_ids(prompt_path, vocab);
    const std::vector<int64_t> lengths = prompt_lengths(prompt, pad_id);
    const int64_t positions = prompt.size(1) + sampling.new_tokens, longest = loaded.config.model.max_seq_len;
    if (positions > longest)
      log::warn("hybrid-generate: " + std::to_string(positions) + " positions go past model.max_seq_len " +
                std::to_string(longest) + ": the tokens beyond it come from positions the model is not made for");
    at::Tensor added;
    GenerationTimes times;
    {
      CudaAutocast autocast(bf16);
      const at::Tensor on_device = prompt.to(device);
      if (!profile_path.empty()) util::start_trace(device.is_cuda());
      added = generate(loaded.model, on_device, sampling, &times, lengths).cpu();
      if (!profile_path.empty()) util::save_trace(profile_path, device.is_cuda());
    }
    for (int64_t b = 0; b < added.size(0); ++b) {  // a row up to its stop token
      const at::Tensor row = added[b];
      for (int64_t i = 0; i < row.size(0); ++i) {
        const int64_t id = row[i].item<int64_t>();
        std::cout << (i ? " " : "") << id;
        if (id == sampling.stop_id) break;
      }
      std::cout << "\n";
    }
    if (!output_path.empty()) io::write_npy(output_path, prompts_and_continuations(prompt, lengths, added, pad_id));
    const int64_t rows = prompt.size(0);
    const int64_t prompt_tokens =
        lengths.empty() ? prompt.numel() : std::accumulate(lengths.begin(), lengths.end(), int64_t{0});
    std::fprintf(stderr,
                 "%lld rows, %lld prompt tokens in all: the prompts and the first new token in %.3f s (%.1f prompt "
                 "tokens/s)",
                 static_cast<long long>(rows), static_cast<long long>(prompt_tokens), times.prompt_seconds,
                 static_cast<double>(prompt_tokens) / std::max(times.prompt_seconds, 1e-9));
    if (times.steps > 0)
      std::fprintf(stderr, ", then %lld steps of a token a row in %.3f s (%.2f ms a step, %.1f new tokens/s)",
                   static_cast<long long>(times.steps), times.step_seconds, 1e3 * times.step_seconds / times.steps,
                   static_cast<double>(rows * times.steps) / std::max(times.step_seconds, 1e-9));
    std::fprintf(stderr, "\n");
    return 0;
  });
}
