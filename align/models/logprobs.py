"""The one place that computes log-probabilities of responses under a causal LM.

SFT, DPO, KTO, PPO and evaluation all call `sequence_logprobs`, so a change of convention
(shift, masking, averaging) happens once. Imports only torch.

Convention: `loss_mask[b, t] = 1` when token `input_ids[b, t]` is a response token to score.
Token t is predicted by the logits at position t-1, so position 0 is never scored.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch.utils.checkpoint import checkpoint


class LogProbs(NamedTuple):
    token_logps: torch.Tensor  # (B, T) log p(x_t | x_<t) at response positions, 0 elsewhere
    sum: torch.Tensor  # (B,) summed over the response
    mean: torch.Tensor  # (B,) averaged over the response tokens
    num_tokens: torch.Tensor  # (B,) response tokens per row
    logits: Optional[torch.Tensor] = None  # (B, T, V), when asked for (keep_logits)
    entropy: Optional[torch.Tensor] = None  # (B, T) entropy of p(. | x_<t) at response positions, when asked for


# Logits of at most this many elements are alive at once: positions per chunk = this / vocabulary
# (341 positions of a 49,152-token vocabulary, 64 MiB in fp32).
CHUNK_ELEMENTS = 1 << 24


def gather_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs (B, T) of `input_ids` under next-token `logits` (B, T, V), masked.

    logsumexp minus the gathered logit avoids materialising a second (B, T, V) log-softmax.
    """
    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)
    mask = loss_mask[:, 1:].to(token_logps.dtype)
    # Position 0 is never predicted: pad the front so positions line up with input_ids.
    return torch.nn.functional.pad(token_logps * mask, (1, 0))


def reduce_logprobs(token_logps: torch.Tensor, loss_mask: torch.Tensor) -> LogProbs:
    mask = loss_mask.clone()
    mask[:, 0] = 0
    num_tokens = mask.sum(dim=1).to(token_logps.dtype)
    total = token_logps.sum(dim=1)
    return LogProbs(token_logps, total, total / num_tokens.clamp(min=1), num_tokens)


def _backbone_and_head(model):
    """(backbone, LM head) of a causal LM or of the DeepSpeed engine around it; (None, None)
    when the model does not expose them (the log-probs then come from its full forward)."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model in .module
    get_head = getattr(module, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    backbone = getattr(module, getattr(module, "base_model_prefix", "") or "model", None)
    if head is None or not isinstance(backbone, torch.nn.Module) or backbone is module:
        return None, None
    return backbone, head


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                 softcap: Optional[float], entropy: bool):
    """(C,) log-probs of `targets` (and (C,) entropies) from (C, H) hidden states."""
    logits = head(hidden).float()
    if softcap:  # Gemma-2 style final soft-capping, applied by the model's own forward
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not entropy:
        return logps, logps.new_zeros(())
    return logps, lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  softcap: Optional[float] = None, entropy: bool = False, chunk_size: Optional[int] = None):
    """log p(targets) under `head` applied to `hidden`, a chunk of positions at a time.

    Shapes: hidden (N, H) states at the scored positions only, targets (N,); returns (N,) log-probs
    and, with `entropy`, (N,) entropies (else None). Each chunk's (C, V) logits are freed as soon
    as its logsumexp is taken, and when gradients are needed every chunk runs under
    torch.utils.checkpoint, so the backward recomputes them: peak memory is one chunk's logits
    (and their gradient), not N x V. Values equal log_softmax(head(hidden))[targets] up to float
    summation order.
    """
    n = hidden.shape[0]
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // max(int(vocab), 1))
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    # A frozen head sharded by ZeRO-3 (LoRA) is gathered again for the backward by its module
    # hooks only, which the checkpoint's recompute does not run: keep its logits instead.
    if any(hasattr(p, "ds_id") and not p.requires_grad for p in head.parameters()):
        recompute = False
    parts, ents = [], []
    for start in range(0, _num_chunks(head, n, chunk, hidden.device) * chunk, chunk):
        # Past n (a rank with fewer positions than another, under ZeRO-3) the chunk is empty.
        args = (head, hidden[start:start + chunk], targets[start:start + chunk], temperature, softcap, entropy)
        if recompute:
            logps, ent = checkpoint(_chunk_logps, *args, use_reentrant=False)
        else:
            logps, ent = _chunk_logps(*args)
        parts.append(logps)
        ents.append(ent)
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if entropy else None)
    # Empty chunks stay in the graph, so their backward (a collective too) runs on every rank.
    return torch.cat(parts), (torch.cat(ents) if entropy else None)


def _num_chunks(head: torch.nn.Module, n: int, chunk: int, device: torch.device) -> int:
    """How many chunks `head_logprobs` runs for `n` positions: ceil(n / chunk), or, when ZeRO-3
    partitions the head, the most of any rank. Each call of such a head is a collective (its
    hooks all-gather the weight), so every rank must call it as often: a rank with fewer scored
    positions, or none (an eval micro-batch of padding rows only), runs empty chunks rather than
    leave the others waiting in the all-gather."""
    count = -(-n // chunk)
    params = [p for p in head.parameters() if hasattr(p, "ds_id")]
    dist = torch.distributed
    if params and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(count, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=getattr(params[0], "ds_process_group", None))
        count = int(t.item())
    return count


def _scatter(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape) -> torch.Tensor:
    """(N,) values -> a zero (B, T) float tensor with them at (rows, cols); differentiable."""
    return values.new_zeros(shape).index_put((rows, cols), values)


def _scored_logprobs(model, hidden, targets, weights, temperature, entropy):
    """(N,) log-probs (times the loss-mask weights) and entropies of `targets` from the (N, H)
    hidden states that predict them."""
    module = getattr(model, "module", model)
    softcap = getattr(getattr(module, "config", None), "final_logit_softcapping", None)
    logps, ents = head_logprobs(module.get_output_embeddings(), hidden, targets, temperature, softcap, entropy)
    return logps * weights.to(logps.dtype), ents


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      loss_mask: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                      temperature: float = 1.0, keep_logits: bool = False, padding_free: bool = False,
                      entropy: bool = False) -> LogProbs:
    """Log-probabilities of the response tokens of each row under `model`.

    Shapes: input_ids, attention_mask, loss_mask, position_ids (B, T). Returns per-token
    log-probs (B, T) and their sum and length-average per row (B,); with `entropy`, the (B, T)
    entropy of the next-token distribution at the same positions.
    The LM head runs only at the positions that predict a response token, in chunks
    (`head_logprobs`), so memory does not grow with T x V; `keep_logits` (full (B, T, V) logits,
    for callers that need them) takes the model's full forward instead.
    `padding_free`: forward the rows' real tokens as one packed row (align.models.padding_free);
    the same values up to float summation order, without compute on pad positions.
    """
    backbone, head = _backbone_and_head(model)
    if keep_logits or backbone is None:
        return _full_logprobs(model, input_ids, attention_mask, loss_mask, position_ids, temperature,
                              keep_logits, padding_free, entropy)
    if padding_free:
        from align.models.padding_free import pack

        packed = pack(input_ids, attention_mask, position_ids)
        hidden = backbone(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                          **packed.attention_kwargs()).last_hidden_state[0]
        # Sequence starts are never scored (a prompt token, or position 0 of a row).
        mask = loss_mask[packed.keep].clone()
        mask[packed.cu_seqlens[:-1].long()] = 0
        j = torch.nonzero(mask).flatten()
        logps, ents = _scored_logprobs(model, hidden[j - 1], packed.input_ids[0, j], mask[j], temperature, entropy)
        flat = packed.flat_index[j]
        T = input_ids.shape[1]
        rows, cols = flat // T, flat % T
    else:
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        mask = loss_mask.clone()
        mask[:, 0] = 0  # position 0 is never predicted
        rows, cols = torch.nonzero(mask, as_tuple=True)
        # Token (b, t) is predicted by the hidden state at (b, t - 1): only those rows reach the head.
        logps, ents = _scored_logprobs(model, hidden[rows, cols - 1], input_ids[rows, cols], mask[rows, cols],
                                       temperature, entropy)
    result = reduce_logprobs(_scatter(logps, rows, cols, loss_mask.shape), loss_mask)
    return result._replace(entropy=_scatter(ents, rows, cols, loss_mask.shape)) if entropy else result


def pair_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                  prompt_lengths: torch.Tensor, temperature: float = 1.0, padding_free: bool = True) -> LogProbs:
    """`sequence_logprobs` of a pairwise batch (rows 0..B-1 prompt+chosen, B..2B-1 the same
    prompts+rejected; (2B, T), prompt_lengths (B,)), forwarding each prompt ONCE when the model
    runs the varlen attention (align.models.padding_free.pack_pairs); the same values otherwise
    computed from the two full sequences. Falls back to `sequence_logprobs` elsewhere."""
    from align.models.padding_free import can_share_prompts, pack_pairs

    backbone, _ = _backbone_and_head(model)
    if backbone is None or not can_share_prompts(model, attention_mask, prompt_lengths, padding_free):
        return sequence_logprobs(model, input_ids, attention_mask, loss_mask, temperature=temperature,
                                 padding_free=padding_free)
    pairs = pack_pairs(input_ids, attention_mask, loss_mask, prompt_lengths)
    packed = pairs.packed
    hidden = backbone(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                      **pairs.attention_kwargs()).last_hidden_state[0]
    mask = pairs.loss_mask.clone()
    mask[packed.cu_seqlens[:-1].long()] = 0  # sequence starts are never predicted
    j = torch.nonzero(mask).flatten()
    # pairs.predictor[j]: the packed position whose state predicts token j (the prompt's last
    # one for the first rejected token).
    logps, _ = _scored_logprobs(model, hidden[pairs.predictor[j]], packed.input_ids[0, j], mask[j], temperature,
                                False)
    flat = packed.flat_index[j]
    T = input_ids.shape[1]
    return reduce_logprobs(_scatter(logps, flat // T, flat % T, loss_mask.shape), loss_mask)


def entropy_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (...,) of the softmax of `logits` (..., V)."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def _full_logprobs(model, input_ids, attention_mask, loss_mask, position_ids, temperature, keep_logits,
                   padding_free, entropy) -> LogProbs:
    """The model's full forward, logits at every position: for `keep_logits`, and for models
    that do not expose a backbone and an LM head."""
    if padding_free:
        from align.models.padding_free import pack

        packed = pack(input_ids, attention_mask, position_ids)
        out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                    **packed.attention_kwargs())
        # The last token of one sequence "predicts" the first of the next: sequence starts are
        # never scored, so the mask drops those terms.
        mask = loss_mask[packed.keep].unsqueeze(0)
        mask[0, packed.cu_seqlens[:-1].long()] = 0
        token_logps = packed.unpack(gather_logprobs(out.logits, packed.input_ids, mask, temperature)[0])
        logits = packed.unpack(out.logits[0])
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        token_logps = gather_logprobs(out.logits, input_ids, loss_mask, temperature)
        logits = out.logits
    result = reduce_logprobs(token_logps, loss_mask)
    if entropy:
        mask = loss_mask.clone()
        mask[:, 0] = 0
        ent = torch.nn.functional.pad(entropy_of_logits(logits[:, :-1].float() / temperature), (1, 0))
        result = result._replace(entropy=ent * mask.to(ent.dtype))
    return result._replace(logits=logits) if keep_logits else result
