"""Listwise DPO: the Plackett-Luce form of DPO for K ranked responses per prompt.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model", arXiv 2305.18290, Appendix A.3. Pure torch; `direct.losses` re-exports it.
"""

from __future__ import annotations

import torch


def plackett_luce_dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float = 0.1,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plackett-Luce DPO loss over a ranking (DPO paper, arXiv 2305.18290, Appendix A.3).

    With implicit rewards r_k = beta * (log pi_theta(y_k|x) - log pi_ref(y_k|x)) and the
    responses ordered best first (k = 0 is the best):
        loss = -sum_k log( exp(r_k) / sum_{j >= k} exp(r_j) )
    summed over the valid positions. The last valid term is log 1 = 0. For K = 2 this is
    exactly `dpo_loss`.

    Args:
        policy_logps: (B, K) per-sequence policy log-probs, best first.
        ref_logps: (B, K) the same under the reference model.
        beta: beta of DPO.
        mask: (B, K) bool, True where a response exists (rankings may be shorter than K).
            Invalid positions are dropped; the valid ones keep their relative order.

    Returns:
        (losses (B,), rewards (B, K)): rewards detached, 0 at invalid positions. Not averaged.
    """
    rewards = beta * (policy_logps - ref_logps)
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    mask = mask.bool()
    # A large finite fill, not -inf: -inf would make the unused branch of torch.where NaN, and
    # a NaN there still poisons the gradient.
    very_negative = torch.finfo(rewards.dtype).min
    masked = rewards.masked_fill(~mask, very_negative)
    # log sum_{j >= k} exp(r_j): a cumulative logsumexp from the right.
    tail_lse = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)
    terms = torch.where(mask, masked - tail_lse, torch.zeros_like(masked))
    losses = -terms.sum(dim=-1)
    return losses, rewards.detach().masked_fill(~mask, 0.0)
