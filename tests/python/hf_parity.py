"""Parity with HF transformers' olmo_hybrid, through our command-line tools.

For several small random configurations (GGGA, grouped values with odd sizes, tied
embeddings without RoPE): build an OlmoHybridForCausalLM with transformers, save it,
convert it with hybrid-convert, score tokens with hybrid-eval, and compare logits and loss
in float32; continue a prompt greedily with hybrid-generate (our decoding state) and with
transformers' generate (its cache); then convert back and check that the tensors are
byte-identical (see the note on the conv weights below) and that transformers loads our export
with the same logits; with `--tokenizer`, AutoTokenizer loads the export's tokenizer.

Also: `hybrid-train --dry-run` on configs/7b.yaml counts exactly the parameters transformers'
default OlmoHybridConfig (OLMo Hybrid 7B) has.

usage: hf_parity.py HYBRID_CONVERT HYBRID_EVAL HYBRID_TRAIN CONFIG_7B HYBRID_GENERATE
"""
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

CONVERT, EVAL, TRAIN, CONFIG_7B, GENERATE = sys.argv[1:6]
ROPE = {"rope_type": "default", "rope_theta": 10000.0}

CASES = {
    "ggga": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                 num_attention_heads=4, rope_parameters=ROPE),
    "gva_odd_sizes": dict(vocab_size=301, hidden_size=72, intermediate_size=100, num_hidden_layers=5,
                          num_attention_heads=3, num_key_value_heads=1, linear_num_key_heads=2,
                          linear_num_value_heads=4, linear_key_head_dim=20, linear_value_head_dim=28,
                          linear_conv_kernel_dim=3,
                          layer_types=["linear_attention", "full_attention", "linear_attention",
                                       "linear_attention", "full_attention"],
                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "tied_nope_no_neg_eigval": dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                                    num_attention_heads=2, tie_word_embeddings=True, rope_parameters=None,
                                    linear_allow_neg_eigval=False),
}


def rel_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-30))


def run(*args):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"FAILED: {' '.join(map(str, args))}\n{r.stdout}{r.stderr}")
    return r.stdout


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens), use_cache=False).logits.float().numpy()


def loss_of(logits, tokens):
    lp = torch.log_softmax(torch.from_numpy(logits[:, :-1]).double(), -1)
    return float(-lp.gather(-1, torch.from_numpy(tokens[:, 1:, None])).mean())


def check_case(name, kwargs, tmp):
    torch.manual_seed(0)
    model = OlmoHybridForCausalLM(OlmoHybridConfig(pad_token_id=None, eos_token_id=None, **kwargs)).float().eval()
    with torch.no_grad():  # norms start at 1 in HF: randomise them so a missing weight shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    hf_dir, ours, back = tmp / f"{name}_hf", tmp / f"{name}_ours", tmp / f"{name}_back"
    model.save_pretrained(hf_dir, safe_serialization=True)
    tokens = np.random.default_rng(1).integers(0, kwargs["vocab_size"], size=(2, 100), dtype=np.int64)
    np.save(tmp / "tokens.npy", tokens)
    ref = hf_logits(model, tokens)

    run(CONVERT, "hf-to-ours", hf_dir, ours)
    out = run(EVAL, "--checkpoint", ours, "--tokens", tmp / "tokens.npy", "--logits", tmp / "logits.npy")
    ours_logits = np.load(tmp / "logits.npy")
    ours_loss = float(out.split()[1])  # "loss X perplexity Y tokens N"
    err = rel_rms(ours_logits, ref)
    loss_diff = abs(ours_loss - loss_of(ref, tokens))
    print(f"{name}: logits rel RMS {err:.2e}, max abs {np.abs(ours_logits - ref).max():.2e}, loss diff {loss_diff:.2e}")
    assert ours_logits.shape == ref.shape, (ours_logits.shape, ref.shape)
    assert err < 1e-5, f"{name}: logits differ from transformers (rel RMS {err})"
    assert loss_diff < 1e-6, f"{name}: loss differs from transformers by {loss_diff}"

    check_greedy_generation(name, model, ours, tokens[:, :30], tmp)

    run(CONVERT, "ours-to-hf", ours, back)
    a, b = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert a.keys() == b.keys(), f"{name}: tensor names differ: {set(a) ^ set(b)}"
    for k in a:
        if "_conv1d" in k:
            continue
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), f"{name}: {k} differs"
    # transformers' save_pretrained splits the fused q/k/v conv weight into three equal parts;
    # we split it at the real q, k, v channel counts (as released checkpoints are). The
    # concatenation, which is what any loader uses, is byte-identical.
    for layer in {k.rsplit(".linear_attn.", 1)[0] for k in a if "_conv1d" in k}:
        cat = lambda f: torch.cat([f[f"{layer}.linear_attn.{p}_conv1d.weight"] for p in "qkv"])
        assert torch.equal(cat(a), cat(b)), f"{name}: {layer} conv weights differ"
        assert b[f"{layer}.linear_attn.q_conv1d.weight"].shape[0] == b[f"{layer}.linear_attn.q_proj.weight"].shape[0]
    reloaded = OlmoHybridForCausalLM.from_pretrained(back).float().eval()
    assert np.array_equal(hf_logits(reloaded, tokens), ref), f"{name}: transformers gives other logits for our export"


def check_greedy_generation(name, model, ours, prompt, tmp, new=20):
    """hybrid-generate's greedy continuation (our decoding state) is transformers' generate's (its
    own cache), up to and including the first step whose two most likely tokens lie within 1e-4
    (float32 rounding may break such a near tie either way, and the sequences part there). The
    attention mask is given: without it, generate treats every prompt token equal to the pad id
    as padding."""
    np.save(tmp / "prompt.npy", prompt)
    out = run(GENERATE, "--checkpoint", ours, "--prompt", tmp / "prompt.npy", "--new-tokens", new)
    ours_new = np.array([[int(x) for x in line.split()] for line in out.splitlines()])
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                            output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    hf_new = hf.sequences[:, prompt.shape[1]:].numpy()
    top2 = torch.stack(hf.scores, 1).topk(2, -1).values
    margin = (top2[..., 0] - top2[..., 1]).numpy()
    assert ours_new.shape == hf_new.shape, (ours_new.shape, hf_new.shape)
    compared = 0
    for row in range(prompt.shape[0]):
        close = np.nonzero(margin[row] < 1e-4)[0]
        n = int(close[0]) + 1 if len(close) else new
        assert (ours_new[row, :n] == hf_new[row, :n]).all(), \
            f"{name}: row {row} continues {ours_new[row]}, transformers {hf_new[row]}"
        compared += n
    print(f"{name}: greedy generation equal to transformers' on {compared} of {hf_new.size} tokens")
    assert compared >= hf_new.size // 2, f"{name}: too many near ties to compare generation"


def check_tokenizer_export(ours, tmp):
    """ours-to-hf --tokenizer: a tokenizer.json alone gets a tokenizer_config.json naming its EOS,
    and AutoTokenizer encodes as the tokenizer does; a folder's own tokenizer_config.json comes
    along; a path without a tokenizer is refused before anything is written."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp / "tok.json"))
    run(CONVERT, "ours-to-hf", ours, tmp / "with_tok", "--tokenizer", tmp / "tok.json")
    auto = AutoTokenizer.from_pretrained(tmp / "with_tok")
    text = "the lazy fox, quickly"
    assert auto.encode(text, add_special_tokens=False) == tok.encode(text).ids, "AutoTokenizer encodes otherwise"
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == tok.token_to_id("<|endoftext|>"), auto.eos_token
    folder = tmp / "tok_folder"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((tmp / "tok.json").read_text())
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 123}')
    run(CONVERT, "ours-to-hf", ours, tmp / "with_folder", "--tokenizer", folder)
    assert AutoTokenizer.from_pretrained(tmp / "with_folder").model_max_length == 123
    r = subprocess.run([CONVERT, "ours-to-hf", str(ours), str(tmp / "not_written"), "--tokenizer", str(tmp / "nothere.json")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "nothere.json" in r.stderr and not (tmp / "not_written").exists(), r.stderr
    print("ours-to-hf --tokenizer: AutoTokenizer loads the export")


def check_7b_parameter_count():
    with torch.device("meta"):
        hf = OlmoHybridForCausalLM(OlmoHybridConfig(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    expected = sum(p.numel() for p in hf.parameters())
    report = run(TRAIN, "--config", CONFIG_7B, "--dry-run")
    total = next(line for line in report.splitlines() if line.strip().startswith("total ") and "B)" in line)
    ours = int(total.split()[1].replace(",", ""))
    print(f"7b.yaml: {ours:,} parameters, transformers' OLMo Hybrid 7B: {expected:,}")
    assert ours == expected, f"7b.yaml counts {ours:,} parameters, transformers {expected:,}"


def main():
    check_7b_parameter_count()
    with tempfile.TemporaryDirectory() as d:
        for name, kwargs in CASES.items():
            check_case(name, kwargs, Path(d))
        check_tokenizer_export(Path(d) / f"{next(iter(CASES))}_ours", Path(d))
    print(f"{len(CASES) + 2} passed, 0 failed")


if __name__ == "__main__":
    main()
