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
