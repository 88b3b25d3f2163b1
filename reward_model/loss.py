"""Bradley-Terry reward-model loss, ranking expansion and reward statistics.

Papers:
  - Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
    (InstructGPT), arXiv 2203.02155, eq. 1: loss = -1/C(K,2) * E[log sigmoid(r(x, y_w) - r(x, y_l))].
  - Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", arXiv 2307.09288,
    eq. 2: a margin m(r) inside the sigmoid, larger for clearer preferences.
  - Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not
    Eliminate Reward Hacking", arXiv 2312.09244: auxiliary loss (r_c + r_r)^2 that centres rewards
    at 0 (TRL's ``center_rewards_coefficient``).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Number = Union[float, int, torch.Tensor]


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: Optional[torch.Tensor] = None,
    center_coef: float = 0.0,
    weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Bradley-Terry loss (InstructGPT eq. 1, Llama 2 eq. 2, Eisenstein et al. centring).

    loss_i = w_i * ( -log sigmoid(r_c - r_r - m_i) + center_coef * (r_c + r_r)^2 )

    chosen_rewards, rejected_rewards: (B,) scalar rewards of the preferred / dispreferred response.
    margin: (B,) or None (Llama 2's m(r); 0 when None). weights: (B,) or None, multiplies each
    pair's whole loss, e.g. ``ranking_pair_weights`` for K-way rankings.

    Returns (losses (B,), accuracies (B,)): per-pair losses for the caller to average, and
    detached 1.0 where r_c > r_r else 0.0 (ties count as wrong).
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)  # = softplus(-diff), stable for large |diff|
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    if weights is not None:
        losses = losses * weights
    accuracies = (chosen_rewards > rejected_rewards).to(losses.dtype).detach()
    return losses, accuracies


def expand_ranking(
    scores: Optional[Sequence[float]] = None, *, ranks: Optional[Sequence[int]] = None
) -> List[Tuple[int, int]]:
    """All K(K-1)/2 (better_idx, worse_idx) pairs of a ranking of K responses to one prompt.

    Give exactly one of:
      scores: one number per response, higher is better;
      ranks: one rank per response, 0 is best (a list already ordered best-first is
        ``ranks=range(K)``).
    Indices refer to positions in the input. Order is deterministic: responses are sorted
    best-first, then pairs are listed row by row: (1st, 2nd), (1st, 3rd), ..., (2nd, 3rd), ...

    Raises ValueError for K < 2, for ties (a tie gives no preference to learn) and for NaN.
    """
    if (scores is None) == (ranks is None):
        raise ValueError("give exactly one of scores= or ranks=")
    # one "higher is better" key per response; ranks are negated so rank 0 comes first
    keys = [float(s) for s in scores] if scores is not None else [-float(r) for r in ranks]
    k = len(keys)
    if k < 2:
        raise ValueError(f"a ranking needs at least 2 responses, got K={k}")
    if any(math.isnan(v) for v in keys):
        raise ValueError(f"ranking contains NaN: {list(scores if scores is not None else ranks)}")
    order = sorted(range(k), key=lambda i: -keys[i])
    for a, b in zip(order, order[1:]):
        if keys[a] == keys[b]:
            what = "scores" if scores is not None else "ranks"
            raise ValueError(f"tie in ranking: responses {a} and {b} have equal {what}; "
                             "drop or merge tied responses before expanding")
    return [(order[i], order[j]) for i in range(k) for j in range(i + 1, k)]


def ranking_pair_weights(k: int) -> List[float]:
    """Weight 1 / C(K, 2) for each of the C(K, 2) pairs of one K-way ranking.

    InstructGPT (arXiv 2203.02155, Sec. 3.5, eq. 1) puts all pairs of a prompt in one batch and
    scales their loss by 1/C(K,2), so each PROMPT counts equally however many responses it has
    (and its pairs are not over-fitted as K^2 correlated samples). The weights of one prompt sum to
    1: average weighted losses as losses.sum() / weights.sum() (= per-prompt mean, then mean over
    prompts), not by the number of pairs.
    """
    if k < 2:
        raise ValueError(f"a ranking needs at least 2 responses, got K={k}")
    n_pairs = k * (k - 1) // 2
    return [1.0 / n_pairs] * n_pairs


def reward_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Detached metrics with TRL names. chosen_rewards, rejected_rewards: (B,) -> 0-dim tensors.

    rewards/accuracies: fraction with r_c > r_r; rewards/margins: mean(r_c - r_r);
    rewards/chosen, rewards/rejected: means; rewards/mean, rewards/std: over all 2B rewards
    (population std, so B = 1 gives 0, not NaN). Local to this batch; all-reduce to aggregate.
    """
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    both = torch.cat([c, r])
    return {
        "rewards/accuracies": (c > r).to(c.dtype).mean(),
        "rewards/margins": (c - r).mean(),
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/mean": both.mean(),
        "rewards/std": both.std(correction=0),
    }


def normalize_rewards(r: torch.Tensor, mean: Number, std: Number, eps: float = 1e-8) -> torch.Tensor:
    """(r - mean) / (std + eps), e.g. with mean/std measured on a held-out set after RM training
    so PPO sees scores of scale ~1. r: any shape."""
    return (r - mean) / (std + eps)


def reward_normalization(config, default: Optional[Tuple[float, float]] = (0.0, 1.0)) -> Optional[Tuple[float, float]]:
    """(mean, std) that the reward-model stage stored in the model's config.json (`reward_mean`,
    `reward_std`: the eval split's reward statistics), for ``normalize_rewards``; the one reader
    of them (PPO, evaluation, scoring). A config without them (any other sequence-classification
    model) gives `default`, (0, 1) so scores pass unchanged, or None to let the caller say so.
    """
    mean, std = getattr(config, "reward_mean", None), getattr(config, "reward_std", None)
    if mean is None or std is None:
        return default
    return float(mean), float(std)
