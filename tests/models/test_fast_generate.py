"""align/fast_generate.py: the static-cache sampling loop gives generate's greedy tokens, samples
from the same temperature + top-p distribution, and its log-probs equal the trainer's."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import TopPLogitsWarper

from align.fast_generate import fast_generate, fast_generate_fn, nucleus_probs, sample_next
from align.generation import SamplingConfig, sample
from align.models.kv_decode import KVDecoder
from align.models.logprobs import sequence_logprobs

EOS, PAD = 2, 0
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


@pytest.fixture(scope="module")
def model():
    """A tiny Llama with grouped-query attention (4 heads, 2 KV heads) like SmolLM2, in float64
    so that two computations of the same logits agree to rounding."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS,
                      bos_token_id=1)
    return LlamaForCausalLM(cfg).double().eval()


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_greedy_equals_generate(model):
    ids, mask = left_padded(PROMPTS)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            eos_token_id=EOS, pad_token_id=PAD)
    ours = fast_generate(model, ids, mask, 12, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    assert ours.tolist() == theirs.tolist()
    assert EOS in ours[1, ids.shape[1]:].tolist()  # one row ends early and is padded after EOS


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_same_seed_same_tokens_as_generate(model, temperature, top_p):
    """The same distribution and the same random draws: sampling gives generate's very tokens."""
    ids, mask = left_padded(PROMPTS)
    torch.manual_seed(3)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                            temperature=temperature, top_p=top_p, top_k=0, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(3)
    ours = fast_generate(model, ids, mask, 12, temperature=temperature, top_p=top_p, eos_token_id=EOS,
                         pad_token_id=PAD)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_logprobs_equal_the_trainers(model, temperature, top_p):
    ids, mask = left_padded(PROMPTS)
    torch.manual_seed(1)
    out, logps = fast_generate(model, ids, mask, 12, temperature=temperature, top_p=top_p, eos_token_id=EOS,
                               pad_token_id=PAD, return_logprobs=True)
    # The trainer's rows: prompt + response (through EOS), right-padded, scored by sequence_logprobs.
    rows = []
    for p, r in zip(PROMPTS, out[:, ids.shape[1]:].tolist()):
        rows.append((p, r[: r.index(EOS) + 1] if EOS in r else r))
    width = max(len(p) + len(r) for p, r in rows)
    inp = torch.tensor([p + r + [PAD] * (width - len(p) - len(r)) for p, r in rows])
    att = torch.tensor([[1] * (len(p) + len(r)) + [0] * (width - len(p) - len(r)) for p, r in rows])
    loss_mask = torch.tensor([[0] * len(p) + [1] * len(r) + [0] * (width - len(p) - len(r)) for p, r in rows])
    ref = sequence_logprobs(model, inp, att, loss_mask, temperature=temperature).token_logps
    for i, (p, r) in enumerate(rows):
        ours, theirs = logps[i, :len(r)], ref[i, len(p):len(p) + len(r)]
        # both in float32 (the trainer's convention), from float64 forwards that agree to ~1e-15
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        assert bool((ours < 0).all())
        assert bool((logps[i, len(r):] == 0).all())  # nothing after EOS


@pytest.mark.parametrize("top_p, candidates", [(0.5, 256), (0.9, 256), (0.9, 4), (0.99, 16)])
def test_nucleus_equals_transformers_top_p(top_p, candidates):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g, dtype=torch.float64) * 3
    probs, idx = nucleus_probs(logits, top_p, candidates)  # few candidates force the full-sort fallback
    ours = torch.zeros_like(logits).scatter(1, idx, probs)
    theirs = torch.softmax(TopPLogitsWarper(top_p)(None, logits.clone()), -1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_sampling_frequencies_match_the_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]], dtype=torch.float64).repeat(20000, 1)
    temperature, top_p = 0.8, 0.8
    g = torch.Generator().manual_seed(0)
    tokens = sample_next(logits, temperature=temperature, top_p=top_p, generator=g)
    expected = torch.softmax(TopPLogitsWarper(top_p)(None, logits[:1] / temperature), -1)[0]
    counts = torch.bincount(tokens, minlength=6).double()
    n = tokens.numel()
    for k in range(6):  # within 5 binomial standard deviations; tokens outside the nucleus never
        sd = math.sqrt(n * expected[k] * (1 - expected[k]))
        assert abs(counts[k] - n * expected[k]) <= 5 * sd + 1e-9, (k, counts.tolist(), expected.tolist())
    assert expected[3:].sum() == 0 and counts[3:].sum() == 0


def test_plugs_into_sample(builtin_tokenizer):
    """Through align.generation.sample (the seam every stage samples through): greedy Samples equal."""
    from align.config import ModelConfig
    from align.models.builders import build_causal_lm

    tiny = build_causal_lm(ModelConfig(), builtin_tokenizer, seed=0).eval()
    prompts = [builtin_tokenizer("Review the movie Night Harbor.")["input_ids"],
               builtin_tokenizer("What did you think of Iron Road?")["input_ids"]]
    cfg = SamplingConfig(max_new_tokens=10, do_sample=False)
    plain = sample(lambda ids, mask, **kw: tiny.generate(input_ids=ids, attention_mask=mask, **kw),
                   builtin_tokenizer, prompts, cfg)
    fast = sample(fast_generate_fn(tiny), builtin_tokenizer, prompts, cfg)
    assert fast == plain and len(fast.response_ids[0]) > 0
    with pytest.raises(ValueError, match="top_k"):
        fast_generate(tiny, torch.tensor([[5]]), torch.tensor([[1]]), 2, top_k=50, eos_token_id=EOS, pad_token_id=PAD)


def _tiny(config_cls, **extra):
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS,
                     bos_token_id=1, **extra)
    return AutoModelForCausalLM.from_config(cfg).double().eval()


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_other_architectures_equal_generate(kind):
    """Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms) and Mistral run through the K/V decoder
    (not a fallback) and give generate's greedy tokens; several stop tokens, batch != their count."""
    from transformers import AutoConfig

    model = _tiny(type(AutoConfig.for_model(kind)), **({"head_dim": 8} if kind == "qwen3" else {}))
    assert KVDecoder.for_model(model, 20) is not None
    ids, mask = left_padded(PROMPTS)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            eos_token_id=[EOS, 3], pad_token_id=PAD)
    ours = fast_generate(model, ids, mask, 12, do_sample=False, eos_token_id=[EOS, 3], pad_token_id=PAD)
    assert ours.tolist() == theirs.tolist()


def test_unsupported_architecture_falls_back_to_generate():
    from transformers import GPT2Config

    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4,
                                                       pad_token_id=PAD, eos_token_id=EOS)).double().eval()
    assert KVDecoder.for_model(gpt2) is None
    ids, mask = left_padded(PROMPTS)
    theirs = gpt2.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=EOS,
                           pad_token_id=PAD)
    assert fast_generate(gpt2, ids, mask, 6, do_sample=False, eos_token_id=EOS, pad_token_id=PAD).tolist() \
        == theirs.tolist()
    with pytest.raises(ValueError, match="no log-probs for GPT2LMHeadModel"):
        fast_generate(gpt2, ids, mask, 6, eos_token_id=EOS, pad_token_id=PAD, return_logprobs=True)


def test_group_rows_share_one_prompt_pass(model, monkeypatch):
    """K identical rows per prompt (group-relative RL): the prompt pass runs on the distinct rows
    only, and every row's greedy tokens equal its prompt decoded alone."""
    k = 3
    rows = [p for p in PROMPTS for _ in range(k)]
    ids, mask = left_padded(rows)
    widths = []
    original = KVDecoder._forward
    monkeypatch.setattr(KVDecoder, "_forward", lambda self, i, *a: widths.append(tuple(i.shape)) or original(self, i, *a))
    ours = fast_generate(model, ids, mask, 8, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    assert widths[0] == (len(PROMPTS), ids.shape[1])  # one prompt pass over 3 distinct rows, not 9
    assert all(w == (len(rows), 1) for w in widths[1:])
    for i, prompt in enumerate(PROMPTS):
        alone = fast_generate(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), 8,
                              do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        new = alone[0, len(prompt):].tolist()
        for j in range(k):
            assert ours[i * k + j, ids.shape[1]:ids.shape[1] + len(new)].tolist() == new


def test_lora_model_logprobs_equal_the_trainers(model):
    """A LoRA policy (model.lora) decodes through its adapter layers: sampled log-probs equal the trainer's."""
    import copy

    from align.config import LoRAConfig
    from align.models.lora import apply_lora

    peft_model = apply_lora(copy.deepcopy(model), LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero B: the adapter changes the output
            torch.nn.init.normal_(p, std=0.5)
    peft_model.eval()
    ids, mask = left_padded(PROMPTS)
    torch.manual_seed(2)
    out, logps = fast_generate(peft_model, ids, mask, 10, eos_token_id=EOS, pad_token_id=PAD, return_logprobs=True)
    width = ids.shape[1]
    rows = [(p, (r[: r.index(EOS) + 1] if EOS in r else r)) for p, r in zip(PROMPTS, out[:, width:].tolist())]
    full = max(len(p) + len(r) for p, r in rows)
    inp = torch.tensor([p + r + [PAD] * (full - len(p) - len(r)) for p, r in rows])
    att = torch.tensor([[1] * (len(p) + len(r)) + [0] * (full - len(p) - len(r)) for p, r in rows])
    lm = torch.tensor([[0] * len(p) + [1] * len(r) + [0] * (full - len(p) - len(r)) for p, r in rows])
    ref = sequence_logprobs(peft_model, inp, att, lm).token_logps
    base = sequence_logprobs(model, inp, att, lm).token_logps
    for i, (p, r) in enumerate(rows):
        torch.testing.assert_close(logps[i, :len(r)], ref[i, len(p):len(p) + len(r)], rtol=0, atol=1e-6)
    assert float((ref - base).abs().max()) > 1e-2  # the adapter mattered
