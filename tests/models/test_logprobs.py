"""Response log-probabilities: hand-computed on tiny logits, then parity with a manual loop on
the built-in model."""

import math

import pytest
import torch

from align.models.logprobs import gather_logprobs, reduce_logprobs, sequence_logprobs

# B=1, T=3, V=3. Position t's logits predict token t+1.
LOGITS = [[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [0.3, 0.3, 0.3]]]
IDS = [[2, 1, 0]]


def log_softmax_by_hand(row, index, temperature=1.0):
    scaled = [x / temperature for x in row]
    return scaled[index] - math.log(sum(math.exp(x) for x in scaled))


def test_gather_logprobs_by_hand():
    out = gather_logprobs(torch.tensor(LOGITS), torch.tensor(IDS), torch.tensor([[1, 1, 1]]))
    expected = [
        0.0,  # position 0 is never predicted
        log_softmax_by_hand(LOGITS[0][0], 1),  # 2 - log(e^1 + e^2 + e^0.5)
        log_softmax_by_hand(LOGITS[0][1], 0),
    ]
    assert out.shape == (1, 3)
    assert out[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[1] == pytest.approx(-0.46436, abs=1e-5)


def test_gather_logprobs_masks_prompt_tokens():
    out = gather_logprobs(torch.tensor(LOGITS), torch.tensor(IDS), torch.tensor([[1, 0, 1]]))
    assert out[0].tolist() == pytest.approx([0.0, 0.0, log_softmax_by_hand(LOGITS[0][1], 0)], abs=1e-6)


def test_gather_logprobs_temperature():
    out = gather_logprobs(torch.tensor(LOGITS), torch.tensor(IDS), torch.tensor([[0, 1, 1]]), temperature=2.0)
    expected = [0.0, log_softmax_by_hand(LOGITS[0][0], 1, 2.0), log_softmax_by_hand(LOGITS[0][1], 0, 2.0)]
    assert out[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_reduce_sum_mean_num_tokens():
    logits = torch.tensor(LOGITS * 2)
    ids = torch.tensor(IDS * 2)
    # Row 0 scores both predicted tokens; the mask's position 0 is ignored (never predicted).
    # Row 1 scores only the last token.
    mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    token_logps = gather_logprobs(logits, ids, mask)
    out = reduce_logprobs(token_logps, mask)
    a, b = log_softmax_by_hand(LOGITS[0][0], 1), log_softmax_by_hand(LOGITS[0][1], 0)
    assert out.num_tokens.tolist() == [2.0, 1.0]
    assert out.sum.tolist() == pytest.approx([a + b, b], abs=1e-6)
    assert out.mean.tolist() == pytest.approx([(a + b) / 2, b], abs=1e-6)
    assert mask[0, 0] == 1  # the caller's mask is not modified


def test_reduce_empty_response_has_zero_mean():
    token_logps = torch.zeros(1, 3)
    out = reduce_logprobs(token_logps, torch.tensor([[1, 0, 0]]))
    assert out.num_tokens.tolist() == [0.0]
    assert out.mean.tolist() == [0.0]


# ---------------------------------------------------------------------------------------------
# On the built-in tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(builtin_tokenizer):
    from align.config import ModelConfig
    from align.models.builders import build_causal_lm

    return build_causal_lm(ModelConfig(), builtin_tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def example(builtin_tokenizer):
    tok = builtin_tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Review the movie Night Harbor."}],
                                     tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    long_r = tok("The music was very charming.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    short_r = tok("The plot was dull.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(short_r) < len(long_r)
    return p_ids, long_r, short_r


def manual_token_logprobs(model, ids, n_prompt, temperature=1.0):
    """log_softmax(logits[t-1] / temperature)[ids[t]] for each response position t >= n_prompt."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return [torch.log_softmax(logits[t - 1] / temperature, dim=-1)[ids[t]].item() for t in range(n_prompt, len(ids))]


def batch(rows, n_prompt, pad_id):
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (T - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    loss = attn.clone()
    loss[:, :n_prompt] = 0
    return ids, attn, loss


def test_sequence_logprobs_matches_manual_loop(model, example, builtin_tokenizer):
    p_ids, long_r, _ = example
    ids, attn, loss = batch([p_ids + long_r], len(p_ids), builtin_tokenizer.pad_token_id)
    with torch.no_grad():
        out = sequence_logprobs(model, ids, attn, loss)
    expected = manual_token_logprobs(model, p_ids + long_r, len(p_ids))
    # Per token to 1e-6; the sums to float32 precision (the library sums in float32).
    assert out.token_logps[0, len(p_ids):].tolist() == pytest.approx(expected, abs=1e-6, rel=0)
    assert (out.token_logps[0, : len(p_ids)] == 0).all()
    assert out.sum.item() == pytest.approx(sum(expected), rel=1e-6)
    assert out.num_tokens.item() == len(long_r)
    assert out.mean.item() == pytest.approx(sum(expected) / len(long_r), rel=1e-6)


def test_right_padded_row_equals_unpadded(model, example, builtin_tokenizer):
    p_ids, long_r, short_r = example
    pad = builtin_tokenizer.pad_token_id
    ids, attn, loss = batch([p_ids + long_r, p_ids + short_r], len(p_ids), pad)
    alone = batch([p_ids + short_r], len(p_ids), pad)
    with torch.no_grad():
        both = sequence_logprobs(model, ids, attn, loss)
        single = sequence_logprobs(model, *alone)
    assert both.num_tokens.tolist() == [len(long_r), len(short_r)]
    assert both.sum[1].item() == pytest.approx(single.sum[0].item(), abs=1e-5)
    expected = manual_token_logprobs(model, p_ids + short_r, len(p_ids))
    assert both.token_logps[1, len(p_ids): len(p_ids) + len(short_r)].tolist() == pytest.approx(expected, abs=1e-5)
    # Padding positions contribute nothing.
    assert (both.token_logps[1, len(p_ids) + len(short_r):] == 0).all()


def test_temperature_scaling(model, example, builtin_tokenizer):
    p_ids, long_r, _ = example
    ids, attn, loss = batch([p_ids + long_r], len(p_ids), builtin_tokenizer.pad_token_id)
    with torch.no_grad():
        out = sequence_logprobs(model, ids, attn, loss, temperature=0.7, keep_logits=True)
        plain = sequence_logprobs(model, ids, attn, loss)
    expected = manual_token_logprobs(model, p_ids + long_r, len(p_ids), temperature=0.7)
    assert out.token_logps[0, len(p_ids):].tolist() == pytest.approx(expected, abs=1e-6, rel=0)
    assert out.sum.item() == pytest.approx(sum(expected), rel=1e-6)
    assert abs(out.sum.item() - plain.sum.item()) > 1e-3
    assert out.logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert plain.logits is None


# ---------------------------------------------------------------------------------------------
# The LM head at scored positions only, in checkpointed chunks
# ---------------------------------------------------------------------------------------------


def test_head_logprobs_in_chunks_equal_full_log_softmax():
    """Values and gradients (hidden states and head weight) of the chunked head equal a float64
    log_softmax over the full logits; 7 positions in chunks of 3 (3 + 3 + 1)."""
    from align.models.logprobs import head_logprobs

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 8, generator=g))
    hidden = torch.randn(7, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (7,), generator=g)
    logps, ent = head_logprobs(head, hidden, targets, temperature=0.7, entropy=True, chunk_size=3)
    logps.sum().backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()

    hidden.grad, head.weight.grad = None, None
    full = torch.log_softmax(head(hidden).double() / 0.7, -1)
    ref = full.gather(-1, targets[:, None]).squeeze(-1)
    ref.sum().backward()
    torch.testing.assert_close(logps.double(), ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), -(full.exp() * full).sum(-1).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[1], head.weight.grad, atol=1e-5, rtol=0)


def largest_saved_vocab_tensor(fn, vocab):
    """Elements of the largest tensor with a last dimension of `vocab` saved for backward by fn()."""
    sizes = [0]

    def pack(t):
        if t.dim() >= 1 and t.shape[-1] == vocab:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_no_logits_kept_for_backward(model, example, builtin_tokenizer):
    """With gradients, the chunked path saves no (positions x vocabulary) tensor for backward
    (the full-logits path, the control, saves B x T x V), and gives the same log-probs,
    gradients and entropies."""
    p_ids, long_r, short_r = example
    pad = builtin_tokenizer.pad_token_id
    ids, attn, loss = batch([p_ids + long_r, p_ids + short_r], len(p_ids), pad)
    V = model.config.vocab_size
    model.train()
    try:
        chunked = largest_saved_vocab_tensor(lambda: sequence_logprobs(model, ids, attn, loss).sum.sum(), V)
        full = largest_saved_vocab_tensor(lambda: sequence_logprobs(model, ids, attn, loss, keep_logits=True), V)
        params = [p for p in model.parameters()]
        lp = sequence_logprobs(model, ids, attn, loss, entropy=True)
        g_chunked = torch.autograd.grad(lp.sum.sum(), params)
        ref = sequence_logprobs(model, ids, attn, loss, keep_logits=True, entropy=True)
        g_full = torch.autograd.grad(ref.sum.sum(), params)
    finally:
        model.eval()
    assert chunked == 0  # nothing of (..., V) shape: the chunks' logits are recomputed in backward
    assert full >= ids.numel() * V
    torch.testing.assert_close(lp.token_logps, ref.token_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(lp.entropy, ref.entropy, atol=1e-5, rtol=0)
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
