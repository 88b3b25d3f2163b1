"""Policy-loss options of the RL stage: loss aggregation, asymmetric clipping, and where the KL goes.

Papers:
  - Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv 1707.06347, eq. 7.
  - Shao et al. 2024, "DeepSeekMath" (GRPO), arXiv 2402.03300, eq. 3 (per-sequence token mean)
    and eq. 4 (the k3 KL estimator as a loss term).
  - Yu et al. 2025, "DAPO", arXiv 2503.14476, "Clip-Higher" and "Token-Level Policy Gradient Loss".
  - Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO), arXiv 2503.20783,
    the Dr. GRPO objective (no per-sequence length normalisation).

Conventions as in rlhf/ppo_math.py: (B, T) tensors cover response tokens only, ``mask`` is 1 for
real tokens and 0 for right padding. Pure torch: nothing here talks to other ranks; the caller
all-reduces counts and passes them in.

Gradient accumulation and ranks. Every aggregation is a SUM over this micro-batch divided by a
GLOBAL normaliser (the count over all micro-batches and ranks of one optimizer step, from
``local_count`` all-reduced). Summing the micro-batch losses then gives exactly the loss of the
whole batch, however it is split; per-micro-batch means would weight short micro-batches more,
a known bug class under gradient accumulation. DeepSpeed divides each backward by the
accumulation steps and averages gradients over ranks, so scale each loss by world_size * steps
(align.engine.deepspeed_engine.loss_scale does that with the count).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

from rlhf.ppo_math import clipped_surrogate, compute_rewards, kl_estimate

Number = Union[float, int, torch.Tensor]

# token_mean:          sum_i sum_t l_it / (tokens in the batch)       every token weighs the same (DAPO)
# seq_mean_token_sum:  sum_i sum_t l_it / (sequences in the batch)    no length normalisation (Dr. GRPO)
# seq_mean_token_mean: sum_i (sum_t l_it / |o_i|) / (sequences)       every response weighs the same (GRPO eq. 3)
AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")
# Where the KL to the reference goes: in the per-token reward (k1, as PPO), as a loss term (k3,
# GRPO), or nowhere.
KL_MODES = ("reward", "loss", "off")


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}")


def local_count(mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """This shard's share of the normaliser of ``aggregate``: its real tokens (token_mean) or its
    sequences with at least one real token (the seq_mean_* modes). mask: (B, T) -> 0-dim tensor.
    All-reduce (SUM) it over micro-batches and ranks to get the global normaliser."""
    _check_aggregation(aggregation)
    m = mask.to(torch.float64)
    if aggregation == "token_mean":
        return m.sum()
    return (m.sum(1) > 0).to(torch.float64).sum()


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str = "token_mean",
              normalizer: Optional[Number] = None) -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar, as this shard's share of one global mean.

    token_mean:          sum_{i,t} m_it l_it / N_tokens
    seq_mean_token_sum:  sum_i (sum_t m_it l_it) / N_seqs
    seq_mean_token_mean: sum_i (sum_t m_it l_it / sum_t m_it) / N_seqs
    ``normalizer`` is the GLOBAL N (``local_count`` summed over all micro-batches and ranks of the
    step); None uses this batch's own count, i.e. the batch is the whole step. Dr. GRPO's exact
    loss is seq_mean_token_sum with normalizer = N_seqs * max_new_tokens, a constant.
    """
    _check_aggregation(aggregation)
    m = mask.to(per_token.dtype)
    if normalizer is None:
        normalizer = local_count(mask, aggregation).to(per_token.dtype).clamp_min(1.0)
    summed = (per_token * m).sum(1)  # (B,)
    if aggregation == "seq_mean_token_mean":
        summed = summed / m.sum(1).clamp_min(1.0)  # an empty row adds 0
    return summed.sum() / normalizer


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_low: float = 0.2, clip_high: Optional[float] = None,
                        aggregation: str = "token_mean", normalizer: Optional[Number] = None,
                        ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO / GRPO / DAPO clipped policy loss. logprobs, old_logprobs, advantages, mask: (B, T).

    loss_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high)), r_t = exp(logp - logp_old)
    (arXiv 1707.06347 eq. 7; clip_high > clip_low is DAPO's clip-higher, arXiv 2503.14476),
    reduced by ``aggregate``. Returns the scalar loss and the detached stats of
    ``rlhf.ppo_math.clipped_surrogate`` (clipfrac, approx_kl, ratio).
    """
    per_token, stats = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_low, clip_high)
    return aggregate(per_token, mask, aggregation, normalizer), stats


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float,
            aggregation: str = "token_mean", normalizer: Optional[Number] = None,
            estimator: str = "k3") -> Tuple[torch.Tensor, torch.Tensor]:
    """KL(pi || pi_ref) as a loss term, GRPO style (Shao et al. 2024, arXiv 2402.03300, eq. 4).

    k3 per token: pi_ref/pi - log(pi_ref/pi) - 1 (>= 0, unbiased at samples of pi), with gradient
    through ``logprobs`` (the current policy's, (B, T)); ``ref_logprobs`` (B, T) is constant.
    Aggregated like the policy loss (pass the same aggregation and normaliser) and multiplied by
    ``kl_coef`` (beta). Returns (kl_coef * aggregated KL, detached token-mean KL of this batch).
    """
    per_token = kl_estimate(logprobs, ref_logprobs.detach(), estimator)
    loss = kl_coef * aggregate(per_token, mask, aggregation, normalizer)
    with torch.no_grad():
        m = mask.to(per_token.dtype)
        mean_kl = (per_token * m).sum() / m.sum().clamp_min(1.0)
    return loss, mean_kl


def score_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_mode: str = "reward", kl_coef: float = 0.0, estimator: str = "k1",
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, T) for the token-level estimators (gae, reinforce_pp), by KL mode.

    kl_mode="reward": -kl_coef * kl_t on every real token plus the score on the last real token
    (Ziegler et al. 2019, arXiv 1909.08593, eq. 2; ``estimator`` k1 as today's PPO).
    kl_mode="loss" or "off": the score on the last real token only (the KL, if any, is a loss
    term: ``kl_loss``). scores: (B,); logprobs, ref_logprobs, mask: (B, T) (the rollout's, no
    gradient). Returns (rewards, kl) with kl (B, T) the estimator's per-token values (0 on
    padding), for logging in every mode.
    """
    if kl_mode not in KL_MODES:
        raise ValueError(f"kl_mode must be one of {list(KL_MODES)}, got {kl_mode!r}")
    coef = kl_coef if kl_mode == "reward" else 0.0
    rewards, kl, _ = compute_rewards(scores, logprobs, ref_logprobs, mask, coef, estimator)
    return rewards, kl
