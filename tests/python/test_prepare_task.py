#!/usr/bin/env python3
"""scripts/prepare_task.py: each input layout becomes the context and choices lm-eval scores
(whitespace ending the context moved to the choices), --shots puts solved examples of the other
items first, --from-tokens puts the true continuation at the label, and a bad row is named by file
and line."""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "prepare_task.py")
spec = importlib.util.spec_from_file_location("prepare_task", SCRIPT)
prepare_task = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_task)

rows = {
    "generic": ({"context": "2 + 2 =", "choices": [" 4", " 5"], "label": 0}, ("2 + 2 =", [" 4", " 5"], 0)),
    "hellaswag": ({"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "then she", "label": "1",
                   "endings": ["eats [title] it.", "bakes  it."]},
                  ("Baking: She mixes flour. Then she", [" eats. it.", " bakes it."], 1)),
    "arc": ({"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]}, "answerKey": "B"},
            ("Question: Which is a gas?\nAnswer:", [" ice", " steam"], 1)),
    "piqa": ({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
             ("Question: Open a jar\nAnswer:", [" twist the lid", " eat the lid"], 0)),
    "mmlu": ({"question": "2 + 3? ", "choices": [4, 5, 6], "answer": 1, "subject": "math"},
             ("Question: 2 + 3?\nAnswer:", [" 4", " 5", " 6"], 1)),
    "mmlu_mc": ({"question": "2 + 3? ", "choices": [4, 5, 6], "answer": 1, "subject": "high_school_math"},
                ("2 + 3?\nA. 4\nB. 5\nC. 6\nAnswer:", [" A", " B", " C"], 1)),
}
for fmt, (row, expected) in rows.items():
    got = prepare_task.item_from_row(row, fmt)
    assert got == expected, (fmt, got)
    assert prepare_task.intro_of(row, fmt) == ("The following are multiple choice questions (with answers) about high school "
                                              "math.\n\n" if fmt == "mmlu_mc" else ""), fmt

encode = lambda text: list(text.encode("utf-8"))
context, choices, sizes = prepare_task.tokenize_item(encode, "Answer: ", ["yes", "no"])
assert context == encode("Answer:") and choices == [encode(" yes"), encode(" no")] and sizes == [4, 3], (context, choices)

with tempfile.TemporaryDirectory() as tmp:
    def run(*args):
        return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)

    src = os.path.join(tmp, "arc.jsonl")
    with open(src, "w") as f:
        f.write(json.dumps(rows["arc"][0]) + "\n\n" + json.dumps(rows["arc"][0]) + "\n")
    out = os.path.join(tmp, "tasks", "arc.jsonl")
    r = run(src, "--format", "arc", "--tokenizer", "bytes", "--output", out, "--limit", "1")
    assert r.returncode == 0, r.stderr
    header, *items = [json.loads(l) for l in open(out)]
    assert header["format"] == "hybrid-choice-task-v1" and header["items"] == 1 and len(items) == 1, header
    assert bytes(items[0]["context"]).decode() == "Question: Which is a gas?\nAnswer:" and items[0]["label"] == 1
    assert [bytes(c).decode() for c in items[0]["choices"]] == [" ice", " steam"] and items[0]["choice_bytes"] == [4, 6]

    with open(src, "a") as f:
        f.write(json.dumps({"question": "?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}) + "\n")
    r = run(src, "--format", "arc", "--tokenizer", "bytes", "--output", out)
    assert r.returncode != 0 and f"{src}:4: not a row of the arc layout" in r.stderr, r.stderr

    # --shots: solved examples from the other items before each context.
    shot_rows = [(f"Q{i}:", [f" a{i}", f" b{i}"], i % 2, "Intro.\n\n") for i in range(4)]
    shot = prepare_task.with_shots(shot_rows, shot_rows, 2, seed=0, same_pool=True)
    for i, (context, choices, label, intro) in enumerate(shot):
        assert intro == "Intro.\n\n" and "Intro" not in context  # once, before the examples
        examples = context.split("\n\n")
        assert len(examples) == 3 and examples[-1] == f"Q{i}:" and choices == shot_rows[i][1], context
        for e in examples[:2]:
            j = int(e[1:e.index(":")])
            assert j != i and e == f"Q{j}: {'ab'[j % 2]}{j}", e
    generic = os.path.join(tmp, "generic.jsonl")
    with open(generic, "w") as f:
        f.writelines(json.dumps({"context": f"Q{i}:", "choices": [" yes", " no"], "label": i % 2}) + "\n" for i in range(3))
    r = run(generic, "--tokenizer", "bytes", "--output", out, "--shots", "2", "--limit", "1")
    assert r.returncode == 0, r.stderr
    first = json.loads(open(out).readlines()[1])
    assert bytes(first["context"]).decode() in ("Q1: no\n\nQ2: yes\n\nQ0:", "Q2: yes\n\nQ1: no\n\nQ0:"), first

    # --from-tokens: a corpus of bytes; the label's choice is the text after the context.
    corpus = os.path.join(tmp, "corpus")
    os.makedirs(corpus)
    text = np.frombuffer(b"".join(b"line %d of a made-up document. " % i for i in range(400)), dtype=np.uint8)
    np.save(os.path.join(corpus, "valid-00000.npy"), text.astype(np.uint16))
    json.dump({"eos_id": 256, "shards": [{"file": "valid-00000.npy", "split": "valid"}]}, open(os.path.join(corpus, "metadata.json"), "w"))
    gen = prepare_task.continuation_rows(corpus, lambda ids: bytes(ids).decode(), 20, 24, 8, 4, seed=3)
    whole = text.tobytes().decode()
    for context, choices, label, _ in gen:
        assert len(choices) == 4 and (context + choices[label]) in whole, (context, choices, label)
    assert len({label for _, _, label, _ in gen}) > 1
    r = run("--from-tokens", corpus, "--tokenizer", "bytes", "--items", "5", "--output", out)
    assert r.returncode == 0 and len(open(out).readlines()) == 6, r.stderr
print("ok: layouts, the context/choice split, --shots, --from-tokens and bad rows")
