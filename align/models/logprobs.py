"""The one place that computes log-probabilities of responses under a causal LM.

SFT, DPO, KTO, PPO and evaluation all call `sequence_logprobs`, so a change of convention
(shift, masking, averaging) happens once. Imports only torch.

Convention: `loss_mask[b, t] = 1` when token `input_ids[b, t]` is a response token to score.
Token t is predicted by the logits at position t-1, so position 0 is never scored.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class LogProbs(NamedTuple):
    token_logps: torch.Tensor  # (B, T) log p(x_t | x_<t) at response positions, 0 elsewhere
    sum: torch.Tensor  # (B,) summed over the response
    mean: torch.Tensor  # (B,) averaged over the response tokens
    num_tokens: torch.Tensor  # (B,) response tokens per row
    logits: Optional[torch.Tensor] = None  # (B, T, V), when asked for (PPO's entropy)


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


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      loss_mask: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                      temperature: float = 1.0, keep_logits: bool = False, padding_free: bool = False) -> LogProbs:
    """Log-probabilities of the response tokens of each row under `model`.

    Shapes: input_ids, attention_mask, loss_mask, position_ids (B, T). Returns per-token
    log-probs (B, T) and their sum and length-average per row (B,).
    `padding_free`: forward the rows' real tokens as one packed row (align.models.padding_free);
    the same values up to float summation order, without compute on pad positions.
    """
    if padding_free:
        return _packed_logprobs(model, input_ids, attention_mask, loss_mask, position_ids, temperature, keep_logits)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    token_logps = gather_logprobs(out.logits, input_ids, loss_mask, temperature)
    result = reduce_logprobs(token_logps, loss_mask)
    return result._replace(logits=out.logits) if keep_logits else result


def pair_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                  prompt_lengths: torch.Tensor, temperature: float = 1.0, padding_free: bool = True) -> LogProbs:
    """`sequence_logprobs` of a pairwise batch (rows 0..B-1 prompt+chosen, B..2B-1 the same
    prompts+rejected; (2B, T), prompt_lengths (B,)), forwarding each prompt ONCE when the model
    runs the varlen attention (align.models.padding_free.pack_pairs); the same values otherwise
    computed from the two full sequences. Falls back to `sequence_logprobs` elsewhere."""
    from align.models.padding_free import can_share_prompts, pack_pairs

    if not can_share_prompts(model, attention_mask, prompt_lengths, padding_free):
        return sequence_logprobs(model, input_ids, attention_mask, loss_mask, temperature=temperature,
                                 padding_free=padding_free)
    pairs = pack_pairs(input_ids, attention_mask, loss_mask, prompt_lengths)
    packed = pairs.packed
    out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                **pairs.attention_kwargs())
    logits = out.logits[0, pairs.predictor].float()  # (N, V): row j predicts token j
    if temperature != 1.0:
        logits = logits / temperature
    targets = packed.input_ids[0]
    mask = pairs.loss_mask.to(logits.dtype)
    mask[packed.cu_seqlens[:-1].long()] = 0  # sequence starts are never predicted
    token_logps = (logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)) * mask
    batch = token_logps.new_zeros(loss_mask.numel()).index_copy(0, packed.flat_index, token_logps)
    return reduce_logprobs(batch.view_as(loss_mask), loss_mask)


def _packed_logprobs(model, input_ids, attention_mask, loss_mask, position_ids, temperature, keep_logits) -> LogProbs:
    """sequence_logprobs on one packed row: the per-token work runs on real tokens only and the
    per-token log-probs are scattered back to (B, T)."""
    from align.models.padding_free import pack

    packed = pack(input_ids, attention_mask, position_ids)
    out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                **packed.attention_kwargs())
    # The last token of one sequence "predicts" the first of the next: sequence starts are
    # never scored (a prompt token, or position 0 of the row), so the mask drops those terms.
    mask = loss_mask[packed.keep].unsqueeze(0)
    mask[0, packed.cu_seqlens[:-1].long()] = 0
    token_logps = packed.unpack(gather_logprobs(out.logits, packed.input_ids, mask, temperature)[0])
    result = reduce_logprobs(token_logps, loss_mask)
    if keep_logits:
        result = result._replace(logits=packed.unpack(out.logits[0]))
    return result
