"""Advantage estimators for the RL stage, as pure torch functions, and a registry with capabilities.

    gae           per-token, from a value model (PPO)                  arXiv 1506.02438
    grpo          (r - group mean) / (group std + eps)                  arXiv 2402.03300
    dr_grpo       r - group mean (no std, no length normalisation)      arXiv 2503.20783
    rloo          r - mean of the other K-1 samples of the prompt       arXiv 2402.14740
    reinforce_pp  KL-penalised returns, whitened over the global batch  arXiv 2501.03262

Shapes: B sequences, T response tokens. ``scores`` (B,) is one reward per sequence; ``mask``
(B, T) is 1 for real response tokens (right padding 0); ``rewards`` (B, T) per-token rewards.
``groups`` says which sequences answer the same prompt: an int K (rows are prompt-major, K
consecutive rows per prompt, B divisible by K) or a (B,) integer tensor of group ids (any
order, any group sizes). Every estimator returns (advantages, returns), both (B, T) and 0 on
padding; the critic-free ones give every token of a sequence the sequence's advantage, and their
"returns" are the advantages (nothing regresses on them).
Imports only torch (rlhf/ppo_math.py for the shared masked statistics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from rlhf.ppo_math import compute_gae, masked_moments, whiten_with_moments

Groups = Union[int, torch.Tensor]
Advantages = Tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- groups


def group_index(groups: Groups, batch_size: int, device=None) -> Tuple[torch.Tensor, int]:
    """(inverse (B,) long in [0, G), G): the group number of each row, groups numbered in order
    of first appearance for ids, or row // K for an int K."""
    if isinstance(groups, int):
        if groups < 1 or batch_size % groups:
            raise ValueError(f"group size K={groups} must be >= 1 and divide the batch size {batch_size}")
        return torch.arange(batch_size, device=device) // groups, batch_size // groups
    ids = torch.as_tensor(groups, device=device)
    if ids.shape != (batch_size,):
        raise ValueError(f"group ids must have shape ({batch_size},), got {tuple(ids.shape)}")
    _, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    return inverse, int(inverse.max()) + 1 if batch_size else 0


def _group_sums(x: torch.Tensor, inverse: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, x)


def group_stats(scores: torch.Tensor, groups: Groups) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per ROW: its group's mean, unbiased std (0 for a group of 1) and size. scores: (B,) -> 3 x (B,)."""
    inverse, g = group_index(groups, scores.shape[0], scores.device)
    ones = torch.ones_like(scores)
    size = _group_sums(ones, inverse, g)
    mean = _group_sums(scores, inverse, g) / size
    sq_dev = _group_sums((scores - mean[inverse]) ** 2, inverse, g)
    std = torch.sqrt(sq_dev / (size - 1).clamp_min(1.0))
    return mean[inverse], std[inverse], size[inverse]


def _broadcast(per_sequence: torch.Tensor, mask: torch.Tensor) -> Advantages:
    adv = per_sequence.unsqueeze(1).to(torch.promote_types(per_sequence.dtype, torch.float32)) * mask
    return adv, adv


# --------------------------------------------------------------------------- estimators


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> Advantages:
    """Generalised Advantage Estimation (Schulman et al. 2015, arXiv 1506.02438, eq. 16).

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = sum_l (gamma lam)^l delta_{t+l};  R_t = A_t + V_t.
    values, rewards, mask: (B, T) -> (advantages, returns) (B, T). The same numbers as today's
    ``rlhf.ppo_math.compute_gae``, which this calls.
    """
    return compute_gae(values, rewards, mask, gamma, lam)


def grpo(scores: torch.Tensor, mask: torch.Tensor, groups: Groups, eps: float = 1e-6) -> Advantages:
    """GRPO outcome advantage (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, section 4.1.2):

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)   for every token of sequence i,

    with the unbiased (n - 1) group std, as TRL and verl compute it. A group of one sequence, or
    whose rewards are all equal, gets A = 0. scores: (B,), mask: (B, T) -> (B, T) twice.
    """
    mean, std, _ = group_stats(scores, groups)
    return _broadcast((scores - mean) / (std + eps), mask)


def dr_grpo(scores: torch.Tensor, mask: torch.Tensor, groups: Groups) -> Advantages:
    """Dr. GRPO advantage (Liu et al. 2025, arXiv 2503.20783, the Dr. GRPO objective):

        A_i = r_i - mean(r_group)

    GRPO without the std division (which up-weights near-uniform groups: too easy or too hard
    prompts). The other half of the fix, no 1/|o_i| length normalisation, is the loss
    aggregation ``seq_mean_token_sum`` in rlhf/policy_loss.py. scores: (B,), mask: (B, T).
    """
    mean, _, _ = group_stats(scores, groups)
    return _broadcast(scores - mean, mask)


def rloo(scores: torch.Tensor, mask: torch.Tensor, groups: Groups) -> Advantages:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740, the RLOO estimator):

        A_i = r_i - 1/(K-1) sum_{j != i} r_j  =  K/(K-1) (r_i - mean(r_group))

    for a group of K samples of the same prompt; every group needs K >= 2 (raises otherwise).
    scores: (B,), mask: (B, T) -> (B, T) twice.
    """
    mean, _, size = group_stats(scores, groups)
    if bool((size < 2).any()):
        raise ValueError("rloo needs at least 2 samples per prompt (rollout.group_size >= 2)")
    return _broadcast((scores - mean) * size / (size - 1), mask)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over real tokens. rewards, mask: (B, T) -> (B, T)."""
    m = mask.to(rewards.dtype)
    r = rewards * m
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return out * m


Reduce = Callable[[torch.Tensor], torch.Tensor]


def reinforce_pp(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                 reduce: Optional[Reduce] = None, eps: float = 1e-8) -> Advantages:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262): critic-free returns, globally whitened.

        G_t = sum_{s >= t} gamma^(s-t) r_s,   r_s = -beta KL_s (+ the score on the last token)
        A_t = (G_t - mean(G)) / std(G)        mean and unbiased std over EVERY real token of the
                                              GLOBAL batch (all micro-batches and ranks)

    ``rewards`` (B, T) are the per-token rewards with the KL inside
    (``rlhf.policy_loss.score_rewards(..., kl_mode="reward")``); mask (B, T).
    ``reduce`` turns this shard's moments, a (3,) tensor [sum, sum of squares, count], into the
    global ones: ``lambda s: (dist.all_reduce(s), s)[1]`` across ranks; None = this batch is the
    whole batch. Returns (advantages, returns = G), both (B, T), 0 on padding.
    """
    returns = discounted_returns(rewards, mask, gamma)
    moments = torch.stack(masked_moments(returns, mask))
    if reduce is not None:
        moments = reduce(moments)
    return whiten_with_moments(returns, mask, *moments, eps=eps), returns


# --------------------------------------------------------------------------- dynamic sampling


def dynamic_sampling_filter(scores: torch.Tensor, groups: Groups, tol: float = 0.0) -> Tuple[torch.Tensor, int]:
    """DAPO dynamic sampling (Yu et al. 2025, arXiv 2503.14476, "Dynamic Sampling").

    A group whose rewards are all equal (max - min <= tol) has zero group-relative advantage and
    so no gradient; drop it. scores: (B,) -> (kept row indices (N,) long, in order; number of
    dropped GROUPS). The recipe refills the batch with new groups and logs the count.
    """
    inverse, g = group_index(groups, scores.shape[0], scores.device)
    high = torch.full((g,), -torch.inf, dtype=scores.dtype, device=scores.device).scatter_reduce(
        0, inverse, scores, "amax")
    low = torch.full((g,), torch.inf, dtype=scores.dtype, device=scores.device).scatter_reduce(
        0, inverse, scores, "amin")
    keep_group = (high - low) > tol
    kept = torch.nonzero(keep_group[inverse], as_tuple=False).flatten()
    return kept, int((~keep_group).sum())


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class AdvantageEstimator:
    """An estimator and what the recipe must provide for it."""

    fn: Callable[..., Advantages]
    # A value model (critic group) is started and trained: only gae.
    needs_value_model: bool
    # K samples per prompt (rollout.group_size >= 2) and group ids.
    needs_groups: bool
    # Takes per-token rewards (B, T) with the KL inside (gae, reinforce_pp), not scores (B,).
    token_rewards: bool
    # The loss aggregation its paper uses (rlhf/policy_loss.AGGREGATIONS).
    aggregation: str
    paper: str


ADVANTAGE_ESTIMATORS: Dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(gae, needs_value_model=True, needs_groups=False, token_rewards=True,
                              aggregation="token_mean", paper="arXiv 1506.02438"),
    "grpo": AdvantageEstimator(grpo, needs_value_model=False, needs_groups=True, token_rewards=False,
                               aggregation="seq_mean_token_mean", paper="arXiv 2402.03300"),
    "dr_grpo": AdvantageEstimator(dr_grpo, needs_value_model=False, needs_groups=True, token_rewards=False,
                                  aggregation="seq_mean_token_sum", paper="arXiv 2503.20783"),
    "rloo": AdvantageEstimator(rloo, needs_value_model=False, needs_groups=True, token_rewards=False,
                               aggregation="token_mean", paper="arXiv 2402.14740"),
    "reinforce_pp": AdvantageEstimator(reinforce_pp, needs_value_model=False, needs_groups=False,
                                       token_rewards=True, aggregation="token_mean", paper="arXiv 2501.03262"),
}
