"""Padding-free forwards: packing by hand, the varlen attention against a per-sequence loop, and
the packed log-probs, scores and gradients against the padded forward on the built-in model."""

import json

import pytest
import torch

from align.config import ModelConfig
from align.models.builders import (build_causal_lm, build_scalar_model, save_pretrained, sequence_scores,
                                   token_scalars)
from align.models.logprobs import LogProbs, sequence_logprobs
from align.models.padding_free import ATTENTION, pack, varlen_attention

PAD = 0


def test_pack_right_and_left_padded_rows_by_hand():
    ids = torch.tensor([[5, 6, 7, PAD], [PAD, PAD, 8, 9]])
    attn = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    p = pack(ids, attn)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert p.cu_seqlens.tolist() == [0, 3, 5]
    assert p.max_length == 3
    assert p.flat_index.tolist() == [0, 1, 2, 6, 7]  # row-major slots of the real tokens
    back = p.unpack(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), fill=-1.0)
    assert back.tolist() == [[1.0, 2.0, 3.0, -1.0], [-1.0, -1.0, 4.0, 5.0]]


def test_pack_splits_sft_packed_rows_at_position_zero():
    # Row 0 holds two documents (positions restart), row 1 one document and padding.
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, PAD, PAD, PAD]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    pos = torch.tensor([[0, 1, 0, 1, 2], [0, 1, 0, 0, 0]])
    p = pack(ids, attn, pos)
    assert p.cu_seqlens.tolist() == [0, 2, 5, 7]
    assert p.max_length == 3
    with pytest.raises(ValueError, match="position id 0"):
        pack(ids, attn, pos + 1)


def test_varlen_attention_equals_each_sequence_alone():
    torch.manual_seed(0)
    H, D, lengths = 2, 4, [3, 1, 5]
    n = sum(lengths)
    q, k, v = (torch.randn(1, H, n, D) for _ in range(3))
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    module = torch.nn.Module()
    out, _ = varlen_attention(module, q, k, v, None, scaling=0.5, cu_seq_lens_q=cu, max_length_q=5)
    assert out.shape == (1, n, H, D)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        # softmax(q k^T * scale + causal mask) v, written out for one sequence
        scores = q[0, :, s:e] @ k[0, :, s:e].transpose(-1, -2) * 0.5
        causal = torch.ones(e - s, e - s).tril().bool()
        expected = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[0, :, s:e]
        torch.testing.assert_close(out[0, s:e], expected.transpose(0, 1), atol=1e-6, rtol=1e-5)


def test_varlen_attention_grouped_query_heads():
    torch.manual_seed(1)
    q = torch.randn(1, 4, 6, 8)
    k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out, _ = varlen_attention(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=cu, max_length_q=4)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    for s, e in ((0, 2), (2, 6)):
        expected = torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], kk[:, :, s:e], vv[:, :, s:e],
                                                                    is_causal=True)
        torch.testing.assert_close(out[0, s:e], expected[0].transpose(0, 1), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# On the built-in model: packed == padded
# ---------------------------------------------------------------------------------------------


def ragged_batch(lengths, prompt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    attn = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(5, 500, (len(lengths), T), generator=g) * attn
    loss = attn.clone()
    loss[:, :prompt] = 0
    return ids, attn, loss


@pytest.fixture(scope="module")
def lm(builtin_tokenizer):
    model = build_causal_lm(ModelConfig(name_or_path="builtin:tiny-1m"), builtin_tokenizer, seed=0)
    assert model.config._attn_implementation == ATTENTION
    return model


def grads_of(model, fn):
    model.zero_grad()
    out = fn()
    (out.sum if isinstance(out, LogProbs) else out).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, rtol=1e-4):
    assert a.keys() == b.keys()
    for name in a:
        scale = a[name].norm().item()
        assert (a[name] - b[name]).norm().item() <= rtol * max(scale, 1e-8), name


def test_packed_logprobs_and_gradients_equal_padded(lm):
    ids, attn, loss = ragged_batch([9, 4, 12, 7])
    padded, g_padded = grads_of(lm, lambda: sequence_logprobs(lm, ids, attn, loss))
    packed, g_packed = grads_of(lm, lambda: sequence_logprobs(lm, ids, attn, loss, padding_free=True))
    torch.testing.assert_close(packed.token_logps, padded.token_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.sum, padded.sum, atol=1e-4, rtol=1e-6)
    assert packed.num_tokens.tolist() == [6.0, 1.0, 9.0, 4.0]
    assert (packed.token_logps[1, 4:] == 0).all()  # pad positions stay 0
    assert_grads_close(g_padded, g_packed)


def test_packed_logprobs_keep_logits_and_temperature(lm):
    ids, attn, loss = ragged_batch([5, 8])
    with torch.no_grad():
        padded = sequence_logprobs(lm, ids, attn, loss, temperature=0.7, keep_logits=True)
        packed = sequence_logprobs(lm, ids, attn, loss, temperature=0.7, keep_logits=True, padding_free=True)
    torch.testing.assert_close(packed.sum, padded.sum, atol=1e-5, rtol=0)
    keep = attn.bool()
    torch.testing.assert_close(packed.logits[keep], padded.logits[keep], atol=1e-5, rtol=0)
    assert (packed.logits[~keep] == 0).all()


def test_packed_sft_rows_equal_documents_alone(lm):
    """Two documents in one row (SFT packing): each scores as if forwarded alone."""
    a, b = [7, 8, 9, 10, 11], [20, 21, 22, 23]
    row = torch.tensor([a + b])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 1]])
    with torch.no_grad():
        both = sequence_logprobs(lm, row, torch.ones_like(row), mask, position_ids=pos, padding_free=True)
        alone_a = sequence_logprobs(lm, torch.tensor([a]), torch.ones(1, 5, dtype=torch.long), mask[:, :5])
        alone_b = sequence_logprobs(lm, torch.tensor([b]), torch.ones(1, 4, dtype=torch.long), mask[:, 5:])
    torch.testing.assert_close(both.token_logps[0, :5], alone_a.token_logps[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both.token_logps[0, 5:], alone_b.token_logps[0], atol=1e-5, rtol=0)


def test_plain_sdpa_model_packs_correctly_through_the_block_mask(builtin_tokenizer):
    """Without the varlen attention, transformers' mask from restarting position ids keeps the
    sequences apart: packing is correct for any attention implementation, only slower."""
    cfg = ModelConfig(name_or_path="builtin:tiny-1m", padding_free=False)
    model = build_causal_lm(cfg, builtin_tokenizer, seed=0)
    assert model.config._attn_implementation == "sdpa"
    ids, attn, loss = ragged_batch([6, 10, 3], seed=2)
    with torch.no_grad():
        padded = sequence_logprobs(model, ids, attn, loss)
        packed = sequence_logprobs(model, ids, attn, loss, padding_free=True)
    torch.testing.assert_close(packed.token_logps, padded.token_logps, atol=1e-5, rtol=0)


def test_grouped_query_model_packed_equals_padded(builtin_tokenizer):
    from transformers import LlamaForCausalLM

    from align.models.builders import tiny_llama_config
    from align.models.padding_free import enable

    config = tiny_llama_config("builtin:tiny-1m", builtin_tokenizer, attn_implementation="sdpa")
    config.num_key_value_heads = 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert enable(model)
    ids, attn, loss = ragged_batch([8, 5, 11], seed=3)
    padded, g_padded = grads_of(model, lambda: sequence_logprobs(model, ids, attn, loss))
    packed, g_packed = grads_of(model, lambda: sequence_logprobs(model, ids, attn, loss, padding_free=True))
    torch.testing.assert_close(packed.token_logps, padded.token_logps, atol=1e-5, rtol=0)
    assert_grads_close(g_padded, g_packed)


def test_scalar_model_scores_and_values_equal_padded(builtin_tokenizer):
    scorer = build_scalar_model(ModelConfig(name_or_path="builtin:tiny-1m"), builtin_tokenizer, seed=0)
    ids, attn, _ = ragged_batch([9, 4, 12], seed=4)
    padded, g_padded = grads_of(scorer, lambda: sequence_scores(scorer, ids, attn))
    packed, g_packed = grads_of(scorer, lambda: sequence_scores(scorer, ids, attn, padding_free=True))
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    assert_grads_close(g_padded, g_packed)
    with torch.no_grad():
        values = token_scalars(scorer, ids, attn, padding_free=True)
        expected = token_scalars(scorer, ids, attn)
    torch.testing.assert_close(values[attn.bool()], expected[attn.bool()], atol=1e-5, rtol=0)
    assert (values[~attn.bool()] == 0).all()


def test_export_does_not_record_the_varlen_attention(lm, builtin_tokenizer, tmp_path):
    """The switch is a runtime choice: a saved model loads anywhere with its own attention."""
    from transformers import AutoModelForCausalLM

    out = save_pretrained(lm, builtin_tokenizer, str(tmp_path / "m"))
    with open(tmp_path / "m" / "config.json") as fh:
        assert ATTENTION not in json.dumps(json.load(fh))
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa")
    assert reloaded.config._attn_implementation == "sdpa"


def test_padding_free_is_on_by_default_and_set_from_the_command_line():
    from align.config import ConfigError, load_config
    from direct.dpo import DPOConfig

    assert load_config(DPOConfig).model.padding_free is True
    assert load_config(DPOConfig, overrides=["model.padding_free=false"]).model.padding_free is False
    with pytest.raises(ConfigError, match="model.padding_free"):
        load_config(DPOConfig, overrides=["model.padding_free=sometimes"])


# ---------------------------------------------------------------------------------------------
# Shared prompts: each pair forwarded as [prompt, chosen, rejected]
# ---------------------------------------------------------------------------------------------


def pair_batch(prompt_lengths, chosen_lengths, rejected_lengths, seed=0):
    """collate_pairwise's layout: rows 0..B-1 prompt+chosen, B..2B-1 the same prompt+rejected."""
    from align.data.collate import collate_pairwise

    g = torch.Generator().manual_seed(seed)
    tok = lambda n: torch.randint(5, 500, (n,), generator=g).tolist()  # noqa: E731
    rows = [{"prompt_ids": tok(p), "chosen_ids": tok(c), "rejected_ids": tok(r)}
            for p, c, r in zip(prompt_lengths, chosen_lengths, rejected_lengths)]
    return collate_pairwise(rows, PAD)


def test_pack_pairs_by_hand():
    from align.models.padding_free import pack_pairs

    # One pair: prompt [5, 6], chosen [7, 8, 9], rejected [10]; T = 5.
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 10, PAD, PAD]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    loss = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]])
    p = pack_pairs(ids, attn, loss, torch.tensor([2]))
    assert p.packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert p.packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2]]  # rejected continues the prompt
    assert p.predictor.tolist() == [0, 0, 1, 2, 3, 1]  # token 10 is predicted from the prompt's end
    assert p.loss_mask.tolist() == [0, 0, 1, 1, 1, 1]
    assert p.packed.flat_index.tolist() == [0, 1, 2, 3, 4, 7]
    visible = p.segment_mask[0].int().tolist()
    assert visible[5] == [1, 1, 0, 0, 0, 1]  # rejected sees the prompt and itself, not chosen
    assert visible[4] == [1, 1, 1, 1, 1, 0]  # chosen is plain causal


def test_shared_prompt_logprobs_and_gradients_equal_padded(lm):
    from align.models.logprobs import pair_logprobs

    batch = pair_batch([4, 7, 2], [5, 1, 6], [3, 4, 1])
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    plens = batch["prompt_lengths"]
    assert plens.tolist() == [4, 7, 2]
    padded, g_padded = grads_of(lm, lambda: sequence_logprobs(lm, *args))
    shared, g_shared = grads_of(lm, lambda: pair_logprobs(lm, *args, plens))
    torch.testing.assert_close(shared.token_logps, padded.token_logps, atol=1e-5, rtol=0)
    assert shared.num_tokens.tolist() == [5.0, 1.0, 6.0, 3.0, 4.0, 1.0]
    assert_grads_close(g_padded, g_shared)
    with torch.no_grad():
        warm = pair_logprobs(lm, *args, plens, temperature=0.7)
        expected = sequence_logprobs(lm, *args, temperature=0.7)
    torch.testing.assert_close(warm.sum, expected.sum, atol=1e-4, rtol=0)


def test_shared_prompts_fall_back_without_the_varlen_attention(builtin_tokenizer):
    from align.models.logprobs import pair_logprobs

    model = build_causal_lm(ModelConfig(name_or_path="builtin:tiny-1m", padding_free=False), builtin_tokenizer, seed=0)
    batch = pair_batch([3, 5], [4, 2], [2, 6], seed=1)
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with torch.no_grad():
        got = pair_logprobs(model, *args, torch.tensor([3, 5]))  # plain sdpa: two sequences per pair
        want = sequence_logprobs(model, *args)
    torch.testing.assert_close(got.token_logps, want.token_logps, atol=1e-5, rtol=0)


def test_shared_prompt_pair_scores_and_gradients_equal_padded(builtin_tokenizer):
    from align.models.builders import pair_scores

    scorer = build_scalar_model(ModelConfig(name_or_path="builtin:tiny-1m"), builtin_tokenizer, seed=0)
    batch = pair_batch([5, 2, 8], [3, 7, 1], [6, 1, 2], seed=5)
    args = (batch["input_ids"], batch["attention_mask"])
    padded, g_padded = grads_of(scorer, lambda: sequence_scores(scorer, *args))
    shared, g_shared = grads_of(scorer, lambda: pair_scores(scorer, *args, batch["loss_mask"],
                                                            batch["prompt_lengths"]))
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=0)
    assert_grads_close(g_padded, g_shared)
