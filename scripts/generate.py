"""Text in, text out around hybrid-generate: encode the prompt with a tokenizer.json (HF
`tokenizers`, e.g. the one prepare_data.py saves beside its shards), continue it with the model,
print prompt and continuation decoded.

usage: generate.py --checkpoint DIR --tokenizer tokenizer.json --prompt TEXT [--prompt TEXT ...]
                   [--new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop-id ID]
                   [--device cpu|cuda] [--bf16]
Generation stops at the tokenizer's <|endoftext|> (prepare_data.py's EOS) unless --stop-id says
otherwise (-1: never). Several prompts go as one batch (hybrid-generate --pad-id: each continues
as it would alone); their texts are printed in order, a blank line apart.
The binary is build/hybrid-generate unless HYBRID_GENERATE names another.
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

EOS_TOKEN = "<|endoftext|>"  # prepare_data.py's


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="model directory (config.yaml + model.safetensors)")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json the model was trained with")
    ap.add_argument("--prompt", required=True, action="append", help="text to continue (again for a batch)")
    for flag in ("--new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--stop-id", "--device"):
        ap.add_argument(flag, help="as hybrid-generate takes it")
    ap.add_argument("--bf16", action="store_true", help="as hybrid-generate takes it (CUDA)")
    args = ap.parse_args()

    tokenizer = Tokenizer.from_file(args.tokenizer)
    prompts = [tokenizer.encode(text).ids for text in args.prompt]
    for text, ids in zip(args.prompt, prompts):
        if not ids:
            sys.exit(f"error: --prompt {text!r} encodes to no tokens")
    binary = os.environ.get("HYBRID_GENERATE", str(Path(__file__).resolve().parent.parent / "build" / "hybrid-generate"))
    # The prompts as rows right-padded with an id no prompt ends with, so that each keeps all its tokens.
    pad = min(set(range(len(prompts) + 1)) - {ids[-1] for ids in prompts})
    batch = np.full((len(prompts), max(map(len, prompts))), pad, dtype=np.int64)
    for row, ids in enumerate(prompts):
        batch[row, : len(ids)] = ids
    workdir = tempfile.TemporaryDirectory()
    np.save(Path(workdir.name) / "prompts.npy", batch)
    command = [binary, "--checkpoint", args.checkpoint, "--prompt", str(Path(workdir.name) / "prompts.npy"),
               "--pad-id", str(pad)]
    if args.stop_id is None and tokenizer.token_to_id(EOS_TOKEN) is not None:
        args.stop_id = tokenizer.token_to_id(EOS_TOKEN)
    for flag in ("new_tokens", "temperature", "top_k", "top_p", "seed", "stop_id", "device"):
        if getattr(args, flag) is not None:
            command += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.bf16:
        command.append("--bf16")
    result = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        sys.exit(result.returncode)
    lines = result.stdout.splitlines()
    texts = [tokenizer.decode(ids + [int(x) for x in line.split()], skip_special_tokens=False)
             for ids, line in zip(prompts, lines)]
    print("\n\n".join(texts))


if __name__ == "__main__":
    main()
