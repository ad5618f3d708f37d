// hybrid-eval: the mean next-token loss and perplexity of a model directory on token sequences:
// an .npy of [T] or [B, T] ids (optionally writing the logits as float32 .npy), or token files of
// any format the trainer reads, cut into seq_len instances and scored as the trainer's
// validation scores them (train/validation.h: the same number as a run's val_loss on its data);
// or its scores on multiple-choice tasks, as the trainer's in-loop evaluation scores them
// (train/choice_scores.h). --data and --task also run on several processes (--nproc-per-node, or
// torchrun / Slurm's ranks), each scoring its share, as the trainer's ranks do.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <memory>
#include <vector>

#include "hybrid/cli/common.h"
#include "hybrid/cli/inference.h"
#include "hybrid/data/dataset.h"
#include "hybrid/dist/comm.h"
#include "hybrid/dist/launcher.h"
#include "hybrid/error.h"
#include "hybrid/io/npy.h"
#include "hybrid/io/token_ids.h"
#include "hybrid/model/autocast.h"
#include "hybrid/train/choice_scores.h"
#include "hybrid/train/validation.h"

using namespace hybrid;

namespace {
std::ostream quiet(nullptr);  // where ranks other than 0 print
}

int main(int argc, char** argv) {
  CLI::App app{"hybrid-eval: mean next-token loss of a model on token sequences"};
  std::string checkpoint, tokens_path, logits_path, device_name = "cpu";
  DataSourceConfig data;
  std::vector<std::string> tasks;
  int64_t seq_len = 0, batch_size = 0, batches = -1, limit = 0;
  app.add_option("--checkpoint", checkpoint,
                 "a checkpoint, a run folder (its latest checkpoint) or a model folder (config.yaml + model.safetensors)")
      ->required();
  auto* tokens_option = app.add_option("--tokens", tokens_path, ".npy of integer token ids, [T] or [B, T]");
  auto* data_option = app.add_option("--data", data.paths, "token files or globs (raw, .npy, Megatron), cut into --seq-len instances");
  auto* task_option = app.add_option("--task", tasks, "multiple-choice task files (scripts/prepare_task.py); repeatable");
  tokens_option->excludes(data_option)->excludes(task_option);
  data_option->excludes(task_option);
  app.add_option("--logits", logits_path, "with --tokens: write logits [B, T, vocab] (float32) here")->needs(tokens_option);
  app.add_option("--format", data.format, "with --data: auto | raw | npy | megatron")
      ->check(CLI::IsMember({"auto", "raw", "npy", "megatron"}));
  app.add_option("--seq-len", seq_len,
                 "with --data: tokens an instance; with --task: the longest context + choice (default: the checkpoint's data.seq_len)")
      ->check(cli::positive);
  app.add_option("--batch-size", batch_size,
                 "with --data: instances a batch; with --task: a batch's tokens / seq-len (default: its trainer.micro_batch_size)")
      ->check(cli::positive);
  app.add_option("--limit", limit, "with --task: each task's first N items (default: all)")->check(cli::positive)->needs(task_option);
  app.add_option("--batches", batches, "with --data: at most this many batches, from the start (default: all)")
      ->check(cli::positive);
  app.add_option("--device", device_name, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  bool bf16 = false;
  app.add_flag("--bf16", bf16, "on CUDA, under bf16 autocast (as a run validates with trainer.precision auto or bf16)");
  int64_t nproc = 1;
  app.add_option("--nproc-per-node", nproc,
                 "with --data or --task: score on this many processes of this machine, each its share (one GPU each "
                 "with --device cuda; Gloo on CPU)")
      ->check(cli::positive)
      ->excludes(tokens_option);
  if (auto code = cli::parse(app, argc, argv)) return *code;
  if (tokens_path.empty() && data.paths.empty() && tasks.empty()) {
    std::cerr << "error: give the tokens as --tokens FILE.npy or --data FILES, or tasks as --task FILE (see --help)\n";
    return 2;
  }
  return cli::run_reporting_errors([&] {
    if (auto code = dist::relaunch_as_ranks(static_cast<int>(nproc), argc, argv)) return *code;
    const dist::DistEnv env = dist::DistEnv::from_environment();
    if (env.world_size > 1 && !tokens_path.empty()) throw ConfigError("--tokens is scored in one process");
    at::NoGradGuard no_grad;
    auto [device, loaded] = cli::load_for_inference(checkpoint, device_name, bf16, env.local_rank);
    // Each rank scores its share; the sums over ranks are the one-process numbers, rank 0 says them.
    const std::unique_ptr<dist::Comm> comm =
        env.world_size > 1 ? std::make_unique<dist::Comm>(env, device.is_cuda(), std::chrono::seconds(600)) : nullptr;
    auto summed = [&](const std::vector<double>& values) { return comm ? comm->sum_over_ranks(values, device) : values; };
    std::ostream& out = env.rank == 0 ? std::cout : quiet;
    const int64_t vocab = loaded.config.model.vocab_size;
    out.precision(9);
    const int64_t length = seq_len ? seq_len : loaded.config.data.seq_len;
    const int64_t batch = batch_size ? batch_size : loaded.config.trainer.micro_batch_size;
    for (const auto& path : tasks) {
      const auto task = data::read_choice_task(std::filesystem::path(path).stem().string(), path, vocab, length, limit);
      const auto share = score_choice_task(loaded.model, task, length, batch * length, device, bf16, env.rank, env.world_size);
      const auto s = data::choice_scores(data::ChoiceTotals::from_values(summed(share.values())));
      out << "task " << task.name << " items " << s.items << " acc " << s.acc << " acc_norm " << s.acc_norm
          << " acc_per_token " << s.acc_per_token << " bpb " << s.bpb << " chance " << s.chance << "\n";
    }
    if (!tasks.empty()) return 0;
    if (!data.paths.empty()) {
      const data::Source source(data, length, vocab, "--data");
      const ValidationLoss share = validation_loss(loaded.model, source, batch, batches, device, bf16, env.rank, env.world_size);
      const std::vector<double> all = summed({share.sum, static_cast<double>(share.batches)});
      const ValidationLoss v{all[0], static_cast<int64_t>(all[1])};
      if (v.batches == 0)
        throw Error("--data: " + std::to_string(source.num_instances()) + " instances of " + std::to_string(source.seq_len()) +
                    " tokens, fewer than one batch of " + std::to_string(batch));
      out << "loss " << v.loss() << " perplexity " << std::exp(v.loss()) << " tokens " << v.batches * batch * source.seq_len()
          << "\n";
      return 0;
    }
    const at::Tensor tokens = io::read_token_ids(tokens_path, vocab);
    if (tokens.size(1) < 2) throw Error(tokens_path + ": expected [T] or [B, T] with T >= 2");
    at::Tensor input = tokens.to(device);
    at::Tensor logits;
    {
      CudaAutocast autocast(bf16);
      logits = loaded.model->forward(input).to(at::kFloat);
    }
    at::Tensor loss = at::cross_entropy_loss(logits.narrow(1, 0, logits.size(1) - 1).flatten(0, 1),
                                             input.narrow(1, 1, input.size(1) - 1).flatten());
    const double l = loss.item<double>();
    std::cout << "loss " << l << " perplexity " << std::exp(l) << " tokens " << tokens.numel() << "\n";
    if (!logits_path.empty()) io::write_npy(logits_path, logits);
    return 0;
  });
}
