#!/usr/bin/env python3
"""Turn a multiple-choice task into the token file that hybrid-train and hybrid-eval score.

A model answers an item by the log-likelihood of each choice after the context (zero-shot, as
lm-evaluation-harness and OLMo's in-loop evaluators score them): `acc` takes the choice of the
largest summed log-probability, `acc_norm` the largest per byte of the choice's text.

Inputs: JSON lines (.jsonl or .jsonl.gz) in one of these layouts (--format):
  generic     {"context": str, "choices": [str, ...], "label": int}; each choice follows the context
              as it is (give it its leading space)
  hellaswag   HF Rowan/hellaswag rows (activity_label, ctx_a, ctx_b, endings, label), lm-eval's cleaning
  arc         HF allenai/ai2_arc rows (question, choices {text, label}, answerKey)
  piqa        HF ybisk/piqa rows (goal, sol1, sol2, label)
  mmlu        HF cais/mmlu rows (question, choices, answer)
  mmlu_mc     the same rows as lm-eval's MMLU: the choices listed with letters, the letter scored
arc, piqa and mmlu in lm-eval's cloze form: "Question: ...\\nAnswer:" then " " + each choice's text.
Or --from-tokens DIR: a continuation task made from a prepared corpus's validation shards (the
true next span of tokens against spans from elsewhere), decoded to text and prepared as above.

--shots K puts K solved examples (context and right choice, "\\n\\n" between) before each context,
drawn at random (--seed) from --shots-from ROWS (same layout), or from the other items.

Output (--output FILE.jsonl): a header line {"format": "hybrid-choice-task-v1", ...}, then one
line an item: {"context": [ids], "choices": [[ids], ...], "choice_bytes": [n, ...], "label": k}.
As lm-eval does, whitespace ending the context moves to the choices, and a choice's ids are the
tail of tokenize(context + choice) after tokenize(context) where that prefix survives merging.
"""
import argparse
import gzip
import json
import os
import re
import sys

import numpy as np

FORMAT = "hybrid-choice-task-v1"


def clean_hellaswag(text):
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def item_from_row(row, fmt):
    """Returns (context, choices, label) of one input row in layout `fmt`."""
    if fmt == "generic":
        return row["context"], list(row["choices"]), int(row["label"])
    if fmt == "hellaswag":
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        return (clean_hellaswag(row["activity_label"] + ": " + ctx), [" " + clean_hellaswag(e) for e in row["endings"]],
                int(row["label"]))
    if fmt == "arc":
        keys = list(row["choices"]["label"])
        return (f"Question: {row['question']}\nAnswer:", [" " + t for t in row["choices"]["text"]],
                keys.index(row["answerKey"]))
    if fmt == "piqa":
        return f"Question: {row['goal']}\nAnswer:", [" " + row["sol1"], " " + row["sol2"]], int(row["label"])
    if fmt == "mmlu":
        return f"Question: {row['question'].strip()}\nAnswer:", [" " + str(c) for c in row["choices"]], int(row["answer"])
    if fmt == "mmlu_mc":
        letters = "ABCDEFGHIJ"[:len(row["choices"])]
        listed = "".join(f"\n{letter}. {str(c).strip()}" for letter, c in zip(letters, row["choices"]))
        return f"{row['question'].strip()}{listed}\nAnswer:", [" " + letter for letter in letters], int(row["answer"])
    raise ValueError(f"unknown format {fmt}")


def intro_of(row, fmt):
    """What goes once before a prompt, few-shot examples included: MMLU's line naming the subject."""
    subject = row.get("subject", "").replace("_", " ") if fmt == "mmlu_mc" else ""
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""


def read_items(path, fmt):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    context, choices, label = item_from_row(row, fmt)
                    intro = intro_of(row, fmt)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                    sys.exit(f"error: {path}:{i + 1}: not a row of the {fmt} layout ({type(e).__name__}: {e})")
                if len(choices) < 2 or not 0 <= label < len(choices):
                    sys.exit(f"error: {path}:{i + 1}: label {label} with {len(choices)} choices (need at least 2, label in range)")
                if not context.strip() or any(not c.strip() for c in choices):
                    sys.exit(f"error: {path}:{i + 1}: an empty context or choice")
                yield context, choices, label, intro
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as e:
        sys.exit(f"error: {path}: cannot read ({e})")


def with_shots(rows, pool, shots, seed, same_pool):
    """Each row's context behind `shots` solved examples from `pool` (not the row itself when the
    pool is the rows), as lm-eval writes few-shot prompts; rows are (context, choices, label, intro),
    the intro going before the examples."""
    if shots <= 0:
        return rows
    if len(pool) < shots + same_pool:
        sys.exit(f"error: --shots {shots}: only {len(pool)} examples to draw from")
    rng = np.random.default_rng(seed)
    out = []
    for i, (context, choices, label, intro) in enumerate(rows):
        picks = [j for j in rng.permutation(len(pool)) if not (same_pool and j == i)][:shots]
        prefix = "".join(pool[j][0] + pool[j][1][pool[j][2]] + "\n\n" for j in picks)
        out.append((prefix + context, choices, label, intro))
    return out


def make_encoder(spec):
    """Returns (encode(text) -> list[int], decode(ids) -> text, description)."""
    if spec == "bytes":
        return (lambda text: list(text.encode("utf-8"))), (lambda ids: bytes(ids).decode("utf-8", "replace")), "bytes"
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(spec)
    return (lambda text: tok.encode(text, add_special_tokens=False).ids), tok.decode, os.path.abspath(spec)


def tokenize_item(encode, context, choices):
    """(context ids, [choice ids], [choice bytes]): lm-eval's split of context and continuation."""
    stripped = context.rstrip()
    moved = context[len(stripped):]
    context_ids = encode(stripped)
    ids, sizes = [], []
    for choice in choices:
        whole = encode(stripped + moved + choice)
        if whole[:len(context_ids)] == context_ids and len(whole) > len(context_ids):
            ids.append(whole[len(context_ids):])
        else:  # the merge crossed the boundary: tokenize the choice alone
            ids.append(encode(moved + choice))
        sizes.append(len((moved + choice).encode("utf-8")))
    return context_ids, ids, sizes


def continuation_rows(corpus, decode, items, context_tokens, choice_tokens, n_choices, seed):
    """Generic rows from a corpus's validation shards: the context, its true next span, and spans
    from random places elsewhere (never overlapping the true one), the label at a random place."""
    meta = json.load(open(os.path.join(corpus, "metadata.json")))
    shards = [s["file"] for s in meta["shards"] if s["split"] == "valid"]
    if not shards:
        sys.exit(f"error: {corpus}/metadata.json: no validation shards")
    tokens = np.concatenate([np.load(os.path.join(corpus, f)) for f in shards]).astype(np.int64)
    eos = meta["eos_id"]
    span = context_tokens + choice_tokens
    rng = np.random.default_rng(seed)
    rows, tries = [], 0
    while len(rows) < items:
        tries += 1
        if tries > 100 * items or tokens.size < 4 * span:
            sys.exit(f"error: {corpus}: cannot make {items} items of {span} tokens from its validation tokens (too few, or too much blank or repeated text)")
        start = int(rng.integers(0, tokens.size - span))
        window = tokens[start:start + span]
        if (window == eos).any():  # within one document
            continue
        others = []
        while len(others) < n_choices - 1:
            o = int(rng.integers(0, tokens.size - choice_tokens))
            piece = tokens[o:o + choice_tokens]
            if abs(o - (start + context_tokens)) >= choice_tokens and not (piece == eos).any():
                others.append(decode(piece.tolist()))
        label = int(rng.integers(0, n_choices))
        choices = others[:label] + [decode(window[context_tokens:].tolist())] + others[label:]
        context = decode(window[:context_tokens].tolist())
        if not context.strip() or any(not c.strip() for c in choices) or len(set(choices)) < n_choices:
            continue  # blank text (runs of indentation), or two choices alike: not a question
        rows.append((context, choices, label, ""))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", nargs="?", help="task rows, JSON lines (.jsonl or .jsonl.gz)")
    ap.add_argument("--format", default="generic", choices=["generic", "hellaswag", "arc", "piqa", "mmlu", "mmlu_mc"])
    ap.add_argument("--from-tokens", metavar="CORPUS", help="make a continuation task from CORPUS's validation shards")
    ap.add_argument("--items", type=int, default=200, help="with --from-tokens: items to make")
    ap.add_argument("--context-tokens", type=int, default=64, help="with --from-tokens")
    ap.add_argument("--choice-tokens", type=int, default=16, help="with --from-tokens")
    ap.add_argument("--choices", type=int, default=4, help="with --from-tokens")
    ap.add_argument("--seed", type=int, default=0, help="with --from-tokens or --shots: the draws' seed")
    ap.add_argument("--shots", type=int, default=0, help="solved examples before each context (default: zero-shot)")
    ap.add_argument("--shots-from", metavar="ROWS", help="with --shots: draw them from these rows (default: the other items)")
    ap.add_argument("--tokenizer", required=True, help="the run's tokenizer.json, or bytes")
    ap.add_argument("--limit", type=int, default=0, help="keep the first N items (0: all)")
    ap.add_argument("--output", required=True, help="the task file to write (.jsonl)")
    args = ap.parse_args()
    if (args.input is None) == (args.from_tokens is None):
        sys.exit("error: give task rows (INPUT) or --from-tokens CORPUS, not both")

    encode, decode, desc = make_encoder(args.tokenizer)
    if args.from_tokens:
        rows = continuation_rows(args.from_tokens, decode, args.items, args.context_tokens, args.choice_tokens,
                                 args.choices, args.seed)
        source = f"continuation of {os.path.abspath(args.from_tokens)} (seed {args.seed})"
    else:
        rows = list(read_items(args.input, args.format))
        source = f"{os.path.abspath(args.input)} ({args.format})"
    pool = (list(read_items(args.shots_from, args.format)) if args.shots_from else rows) if args.shots else []
    if args.limit:
        rows = rows[:args.limit]
    if args.shots:
        rows = with_shots(rows, pool, args.shots, args.seed, args.shots_from is None)
        source += f", {args.shots}-shot from {os.path.abspath(args.shots_from) if args.shots_from else 'the other items'}"
    lines = []
    for context, choices, label, intro in rows:
        context_ids, choice_ids, choice_bytes = tokenize_item(encode, intro + context, choices)
        lines.append(json.dumps({"context": context_ids, "choices": choice_ids, "choice_bytes": choice_bytes, "label": label}))
    if not lines:
        sys.exit("error: no items")
    header = {"format": FORMAT, "source": source, "tokenizer": desc, "items": len(lines)}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n" + "\n".join(lines) + "\n")
    os.replace(tmp, args.output)
    print(f"{len(lines)} items -> {args.output}")


if __name__ == "__main__":
    main()
