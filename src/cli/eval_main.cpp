// hybrid-eval: score token sequences with a model directory; prints the mean next-token
// loss and perplexity, and optionally writes the logits as float32 .npy.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cmath>
#include <iostream>
#include <vector>

#include "hybrid/cli/common.h"
#include "hybrid/error.h"
#include "hybrid/io/npy.h"
#include "hybrid/io/token_ids.h"
#include "hybrid/model/weights.h"

using namespace hybrid;

int main(int argc, char** argv) {
  CLI::App app{"hybrid-eval: mean next-token loss of a model on token sequences"};
  std::string checkpoint, tokens_path, logits_path, device_name = "cpu";
  app.add_option("--checkpoint", checkpoint, "model directory (config.yaml + model.safetensors)")->required();
  app.add_option("--tokens", tokens_path, ".npy of integer token ids, [T] or [B, T]")->required();
  app.add_option("--logits", logits_path, "write logits [B, T, vocab] (float32) here");
  app.add_option("--device", device_name, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  if (auto code = cli::parse(app, argc, argv)) return *code;
  return cli::run_reporting_errors([&] {
    at::NoGradGuard no_grad;
    LoadedModel loaded = load_model_dir(checkpoint);
    const at::Tensor tokens = io::read_token_ids(tokens_path, loaded.config.model.vocab_size);
    if (tokens.size(1) < 2) throw Error(tokens_path + ": expected [T] or [B, T] with T >= 2");
    at::Device device(device_name == "cuda" ? at::kCUDA : at::kCPU);
    if (device.is_cuda() && !at::hasCUDA()) throw Error("--device cuda: no CUDA device is available");
    loaded.model->to(device);
    loaded.model->eval();
    at::Tensor input = tokens.to(device);
    at::Tensor logits = loaded.model->forward(input).to(at::kFloat);
    at::Tensor loss = at::cross_entropy_loss(logits.narrow(1, 0, logits.size(1) - 1).flatten(0, 1),
                                             input.narrow(1, 1, input.size(1) - 1).flatten());
    const double l = loss.item<double>();
    std::cout.precision(9);
    std::cout << "loss " << l << " perplexity " << std::exp(l) << " tokens " << tokens.numel() << "\n";
    if (!logits_path.empty()) io::write_npy(logits_path, logits);
    return 0;
  });
}
