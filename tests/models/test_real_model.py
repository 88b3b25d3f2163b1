"""The real model (builtin:smollm2-135m-instruct, SmolLM2-135M-Instruct from a Q4_1 GGUF file):
its materialised copy, and the project's log-probs against a plain transformers forward."""

import json
import os

import pytest
import torch

from align.config import ModelConfig

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "I think it is Lyon, but I am not sure."),
    ("Give me a JSON object with keys name and age for Ann, 31.", '{"name": "Ann", "age": 31}',
     "Sure! Here it is: name Ann age 31"),
    ("Say hello in Spanish.", "Hola.", "Bonjour! That is how you say hello."),
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from align.models.builders import build_tokenizer

    return build_tokenizer(ModelConfig(name_or_path="builtin:smollm2-135m-instruct"))


def test_materialised_copy(smollm2_dir, tokenizer):
    from align.models.sources import resolve_source

    with open(os.path.join(smollm2_dir, "config.json")) as fh:
        config = json.load(fh)
    assert "quantization_config" not in config
    assert (config["vocab_size"], config["num_hidden_layers"], config["hidden_size"]) == (49152, 30, 576)
    assert sorted(f for f in os.listdir(smollm2_dir) if f.endswith((".safetensors", ".jinja", ".json"))) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True).endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                              "<|im_start|>assistant\n")
    # The same file again: the cached folder, no second conversion.
    assert resolve_source("builtin:smollm2-135m-instruct") == smollm2_dir


def pair_batch(tokenizer):
    """(input_ids, attention_mask, loss_mask (2B, T), prompt_lengths (B,), [full sequences],
    [prompt length of each sequence]) of PAIRS, chat-templated, right-padded."""
    from align.data.tokenize import encode_prompts, encode_responses

    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": p}] for p, _, _ in PAIRS], [], chat=True)
    chosen = encode_responses(tokenizer, [c for _, c, _ in PAIRS])
    rejected = encode_responses(tokenizer, [r for _, _, r in PAIRS])
    seqs = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    plens = [len(p) for p in prompts] * 2
    T = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    loss = torch.tensor([[0] * n + [1] * (len(s) - n) + [0] * (T - len(s)) for s, n in zip(seqs, plens)])
    return ids, attn, loss, torch.tensor(plens[: len(PAIRS)]), seqs, plens


def reference_sums(model, seqs, plens):
    """Summed response log-probs from a plain forward of each sequence alone, log_softmax in
    float64 (fp32's over 49k tokens is off by about 1.2e-5 a token on CPU)."""
    sums = []
    with torch.no_grad():
        for seq, n in zip(seqs, plens):
            logits = model(input_ids=torch.tensor([seq])).logits[0].double()
            logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)
            sums.append(logp[n - 1:].sum().item())
    return torch.tensor(sums, dtype=torch.float64)


def test_logprobs_match_plain_transformers(smollm2_dir, tokenizer):
    """Padded, padding-free and shared-prompt log-probs of 3 chat-templated pairs equal a plain
    transformers forward's (float64 reference) to 1e-4 per sequence sum."""
    from transformers import AutoModelForCausalLM

    from align.models.builders import build_causal_lm
    from align.models.logprobs import pair_logprobs, sequence_logprobs
    from align.models.padding_free import can_share_prompts

    ids, attn, loss, plens, seqs, seq_plens = pair_batch(tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    expected = reference_sums(plain, seqs, seq_plens)
    del plain
    model = build_causal_lm(ModelConfig(name_or_path="builtin:smollm2-135m-instruct", padding_free=True),
                            tokenizer).eval()
    assert can_share_prompts(model, attn, plens, padding_free=True)  # the shared-prompt path really runs
    with torch.no_grad():
        got = {
            "padded": sequence_logprobs(model, ids, attn, loss, padding_free=False),
            "padding_free": sequence_logprobs(model, ids, attn, loss, padding_free=True),
            "shared_prompt": pair_logprobs(model, ids, attn, loss, plens, padding_free=True),
        }
    n_tokens = [len(s) - n for s, n in zip(seqs, seq_plens)]
    for name, lp in got.items():
        assert lp.num_tokens.tolist() == n_tokens, name
        diff = (lp.sum.double() - expected).abs().max().item()
        assert diff <= 1e-4, (name, diff)
    assert expected.min() < -5  # real sums over real responses, not near-zero values


def test_sampler_on_the_real_model(smollm2_dir, tokenizer):
    """Our sampler (align.fast_generate) on SmolLM2-135M-Instruct, chat-templated prompts, two
    samples per prompt: greedy tokens equal transformers' generate; sampled tokens equal generate's
    with the same seed; their log-probs equal the trainer's (sequence_logprobs) to 1e-4."""
    from transformers import AutoModelForCausalLM

    from align.fast_generate import fast_generate
    from align.models.logprobs import sequence_logprobs
    from align.models.tokenizer import stop_token_ids

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True)["input_ids"] for p, _, _ in PAIRS]
    rows = [p for p in prompts for _ in range(2)]
    width, pad, stops = max(map(len, rows)), tokenizer.pad_token_id, stop_token_ids(tokenizer)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kw = dict(eos_token_id=stops, pad_token_id=pad)
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **kw)
        assert fast_generate(model, ids, mask, 12, do_sample=False, **kw).tolist() == greedy.tolist()
        torch.manual_seed(5)
        theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                                temperature=0.9, top_p=0.95, top_k=0, **kw)
        torch.manual_seed(5)
        ours, logps = fast_generate(model, ids, mask, 12, temperature=0.9, top_p=0.95, return_logprobs=True, **kw)
    assert ours.tolist() == theirs.tolist()
    responses = []
    for r in ours[:, width:].tolist():
        end = next((t for t, tok in enumerate(r) if tok in stops), None)
        responses.append(r[: end + 1] if end is not None else r)
    full = max(len(p) + len(r) for p, r in zip(rows, responses))
    inp = torch.tensor([p + r + [pad] * (full - len(p) - len(r)) for p, r in zip(rows, responses)])
    att = torch.tensor([[1] * (len(p) + len(r)) + [0] * (full - len(p) - len(r)) for p, r in zip(rows, responses)])
    lm = torch.tensor([[0] * len(p) + [1] * len(r) + [0] * (full - len(p) - len(r)) for p, r in zip(rows, responses)])
    with torch.no_grad():
        ref = sequence_logprobs(model, inp, att, lm, temperature=0.9).token_logps
    for i, (p, r) in enumerate(zip(rows, responses)):
        torch.testing.assert_close(logps[i, :len(r)], ref[i, len(p):len(p) + len(r)], rtol=0, atol=1e-4)
    assert min(map(len, responses)) > 0 and float(logps.sum()) < -1  # real samples, not all certain tokens
