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
                      temperature: float = 1.0, keep_logits: bool = False) -> LogProbs:
    """Log-probabilities of the response tokens of each row under `model`.

    Shapes: input_ids, attention_mask, loss_mask, position_ids (B, T). Returns per-token
    log-probs (B, T) and their sum and length-average per row (B,).
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    token_logps = gather_logprobs(out.logits, input_ids, loss_mask, temperature)
    result = reduce_logprobs(token_logps, loss_mask)
    return result._replace(logits=out.logits) if keep_logits else result
