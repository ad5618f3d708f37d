#!/usr/bin/env python3
"""Turn text into token shards that hybrid-train reads.

Inputs: files, folders (walked recursively) or globs of plain text (.gz allowed: each file is one
document) or JSON lines (.jsonl/.jsonl.gz: one document per line, text under --text-key).
Tokenizer: an existing tokenizer.json (e.g. OLMo's dolma2), `bpe:N` to train a byte-level BPE of
N tokens on the inputs (saved as tokenizer.json beside the shards), or `bytes` (ids 0-255, EOS 256).
Output: train-NNNNN.npy and valid-NNNNN.npy shards (1-D uint16, or uint32 for vocabularies over
65536), documents each followed by EOS, and metadata.json (tokenizer, vocab size, dtype, EOS id,
document and token counts, sha256 of every shard). Documents go to validation by a stable hash
of their name, so the split does not depend on the input order.
"""
import argparse
import glob
import gzip
import hashlib
import json
import os
import sys
import time

import numpy as np

EOS_TOKEN = "<|endoftext|>"


def list_inputs(patterns):
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) or ([pattern] if os.path.exists(pattern) else [])
        if not matches:
            sys.exit(f"error: {pattern}: no files match")
        for m in matches:
            if os.path.isdir(m):
                files += sorted(os.path.join(d, f) for d, _, fs in os.walk(m) for f in fs)
            else:
                files.append(m)
    return files


def documents(files, text_key):
    """Yields (file, name, text) for every document."""
    for path in files:
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                if path.endswith((".jsonl", ".jsonl.gz")):
                    for i, line in enumerate(f):
                        if not line.strip():
                            continue
                        try:
                            text = json.loads(line)[text_key]
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            sys.exit(f"error: {path}:{i + 1}: no '{text_key}' string in this line ({e})")
                        yield path, f"{path}:{i}", text
                else:
                    yield path, path, f.read()
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            sys.exit(f"error: {path}: cannot read ({e})")


class Progress:
    def __init__(self, total, what):
        self.total, self.what, self.done, self.start, self.last = total, what, 0, time.time(), 0.0

    def step(self, n=1, extra=""):
        self.done += n
        now = time.time()
        if now - self.last > 0.5 or self.done == self.total:
            self.last = now
            frac = self.done / max(self.total, 1)
            bar = "#" * int(30 * frac)
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            sys.stderr.write(f"\r{self.what} [{bar:<30}] {self.done}/{self.total} {extra} eta {eta:4.0f}s ")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def batches(docs, max_chars=1 << 22, max_docs=1024):
    """Documents in lists of about max_chars characters: the tokenizer encodes a list on all cores."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[2])
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def make_tokenizer(spec, files, text_key, out_dir):
    """Returns (encode(list of texts) -> list of id lists, eos_id, vocab_size, description)."""
    if spec == "bytes":
        return (lambda texts: [list(t.encode("utf-8")) for t in texts]), 256, 257, "bytes"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if spec.startswith("bpe:"):
        vocab = int(spec[4:])
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS_TOKEN], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        sys.stderr.write(f"training a byte-level BPE of {vocab} tokens on {len(files)} files...\n")
        tok.train_from_iterator((text for _, _, text in documents(files, text_key)), trainer=trainer)
        tok.save(os.path.join(out_dir, "tokenizer.json"))
        desc = f"byte-level BPE {vocab} trained on the inputs (tokenizer.json)"
    else:
        tok = Tokenizer.from_file(spec)
        desc = os.path.abspath(spec)
    eos = tok.token_to_id(EOS_TOKEN)
    if eos is None:
        sys.exit(f"error: {spec}: the tokenizer has no {EOS_TOKEN} token")
    encode = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
    return encode, eos, tok.get_vocab_size(), desc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="files, folders or globs")
    ap.add_argument("--output", required=True, help="folder for the shards and metadata.json")
    ap.add_argument("--tokenizer", default="bpe:4096", help="tokenizer.json path, bpe:N or bytes")
    ap.add_argument("--text-key", default="text", help="JSONL field holding the text")
    ap.add_argument("--valid-fraction", type=float, default=0.02)
    ap.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard (at most)")
    args = ap.parse_args()

    files = list_inputs(args.inputs)
    os.makedirs(args.output, exist_ok=True)
    encode, eos, vocab, desc = make_tokenizer(args.tokenizer, files, args.text_key, args.output)
    dtype = np.uint16 if vocab <= 65536 else np.uint32

    shards, buffers, counts = [], {"train": [], "valid": []}, {"train": [0, 0], "valid": [0, 0]}
    buffered = {"train": 0, "valid": 0}  # tokens in buffers[split]

    def flush(split):
        if not buffers[split]:
            return
        name = f"{split}-{sum(s['split'] == split for s in shards):05d}.npy"
        arr = np.concatenate(buffers[split]).astype(dtype)
        tmp = os.path.join(args.output, name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, os.path.join(args.output, name))
        with open(os.path.join(args.output, name), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        shards.append({"file": name, "split": split, "tokens": int(arr.size), "sha256": digest})
        buffers[split], buffered[split] = [], 0

    progress = Progress(len(files), "tokenizing")
    current_file = None
    for batch in batches(documents(files, args.text_key)):
        for (path, name, _), ids in zip(batch, encode([text for _, _, text in batch])):
            if path != current_file:
                if current_file is not None:
                    progress.step(extra=f"{counts['train'][1] + counts['valid'][1]:,} tokens")
                current_file = path
            ids.append(eos)
            h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") / 2**64
            split = "valid" if h < args.valid_fraction else "train"
            buffers[split].append(np.asarray(ids, dtype=np.int64))
            buffered[split] += len(ids)
            counts[split][0] += 1
            counts[split][1] += len(ids)
            if buffered[split] >= args.shard_tokens:
                flush(split)
    progress.step(n=len(files) - progress.done, extra=f"{counts['train'][1] + counts['valid'][1]:,} tokens")
    flush("train")
    flush("valid")
    if counts["train"][0] == 0:
        sys.exit("error: no training documents (all went to validation or the inputs are empty)")

    meta = {"tokenizer": desc, "vocab_size": vocab, "dtype": np.dtype(dtype).name, "eos_id": eos,
            "documents": {k: v[0] for k, v in counts.items()}, "tokens": {k: v[1] for k, v in counts.items()},
            "shards": shards, "inputs": len(files)}
    with open(os.path.join(args.output, "metadata.json.tmp"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(args.output, "metadata.json.tmp"), os.path.join(args.output, "metadata.json"))
    print(f"{counts['train'][1]:,} train and {counts['valid'][1]:,} validation tokens in {len(shards)} shards, "
          f"vocab {vocab}, EOS {eos} -> {args.output}")


if __name__ == "__main__":
    main()
