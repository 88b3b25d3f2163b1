"""PPO math for RLHF: masked statistics, KL-penalised rewards, GAE and the clipped losses.

Papers:
  - Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", arXiv 1909.08593
    (KL-penalised reward, eq. 2 for the adaptive KL coefficient).
  - Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
    (InstructGPT), arXiv 2203.02155, eq. 2.
  - Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv 1707.06347, eq. 7 (L^CLIP).
  - Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", arXiv 1506.02438, eq. 16 (GAE).
  - Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html (k1, k2, k3).

Conventions: every (B, T) tensor covers RESPONSE tokens only (the query is cut off), and
``mask`` (B, T) is 1 (or True) for real response tokens and 0 for right padding. Masks are 0/1.
All functions are pure: they never modify their inputs and never talk to other ranks.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch

Number = Union[float, int, torch.Tensor]


class Trajectory(NamedTuple):
    """Every tensor of one rollout batch after the experience step: rlhf/ppo.py builds it from
    the groups' outputs and the update reads it. Response tokens only, right-padded:
    B = number of rollouts, T = longest response.
    """

    mask: torch.Tensor  # (B, T) 1 for real response tokens (EOS included)
    logprobs: torch.Tensor  # (B, T) log pi_old(a_t | s_t) of the sampling policy
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref(a_t | s_t) of the frozen reference (SFT) model
    values: Optional[torch.Tensor]  # (B, T) V_old(s_t) from the critic at rollout time; None without one
    scores: torch.Tensor  # (B,) reward-model score of the whole response
    rewards: torch.Tensor  # (B, T) per-token reward: -kl_coef * KL, plus the score on the last token
    advantages: torch.Tensor  # (B, T) advantages (GAE), whitened for the update
    returns: Optional[torch.Tensor]  # (B, T) raw advantages + values, the critic's target; None without one


# --------------------------------------------------------------------------- masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is 1. x, mask: (B, T); dim=None gives a scalar."""
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``x`` over masked positions. x, mask: (B, T) -> scalar, or (B,) with dim=1.

    An all-zero mask gives 0, not NaN (count clamped at 1): an empty slice adds nothing.
    """
    m = mask.to(x.dtype)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all masked positions (two-pass, numerically safe). x, mask: (B, T).

    ``unbiased`` applies Bessel's correction n / (n - 1); it needs at least 2 masked entries
    (checked on the host, which syncs a GPU once).
    """
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        count = float(m.sum())
        if count < 2:
            raise ValueError(f"unbiased masked_var needs at least 2 masked entries, got {count:g}")
        var = var * count / (count - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and unbiased var over masked entries of THIS batch.

    x, mask: (B, T) -> (B, T); padded positions are set to 0. ``shift_mean=False`` adds the mean
    back (only scale), as TRL does for rewards. For statistics across micro-batches and ranks use
    ``masked_moments`` + all-reduce + ``whiten_with_moments``.
    """
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    return _whiten(x, m, mean, var, shift_mean, eps)


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Additive moments (sum, sum of squares, count) of masked ``x``; each a 0-dim tensor.

    They add across shards, so the caller can all-reduce them to get global statistics:
        s = torch.stack(masked_moments(adv, mask)); dist.all_reduce(s)  # SUM
        adv = whiten_with_moments(adv, mask, *s)
    """
    m = mask.to(x.dtype)
    return masked_sum(x, m), masked_sum(x * x, m), m.sum()


def whiten_with_moments(x: torch.Tensor, mask: torch.Tensor, sum: Number, sum_sq: Number, count: Number,
                        shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` (B, T) with global moments from ``masked_moments`` (summed over all shards).

    mean = sum / n; var = (sum_sq / n - mean^2) * n / (n - 1), the unbiased variance, so one shard
    holding everything gives the same result as ``masked_whiten``. The one-pass formula loses
    precision when |mean| >> std; compute in float32 or wider.
    """
    m = mask.to(x.dtype)
    count = torch.as_tensor(count, dtype=x.dtype, device=x.device)
    mean = torch.as_tensor(sum, dtype=x.dtype, device=x.device) / count
    var = torch.as_tensor(sum_sq, dtype=x.dtype, device=x.device) / count - mean * mean
    # clamp: rounding can make the one-pass variance slightly negative
    var = var.clamp_min(0.0) * count / (count - 1).clamp_min(1.0)
    return _whiten(x, m, mean, var, shift_mean, eps)


def _whiten(x, m, mean, var, shift_mean, eps):
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m  # zero the padding so garbage there can never leak into a loss


def masked_aggregate(x: torch.Tensor, mask: torch.Tensor, aggregation: str = "token",
                     num_tokens: Optional[Number] = None, num_sequences: Optional[Number] = None) -> torch.Tensor:
    """Reduce a per-token quantity x (B, T) to a scalar loss.

    aggregation="token": sum over real tokens / number of real tokens (every token weighs the same).
    aggregation="sequence": mean over rows of each row's token mean (every response weighs the same).

    Micro-batches and ranks: pass ``num_tokens`` (token mode), the GLOBAL count of real response
    tokens in the minibatch over all micro-batches and ranks, or ``num_sequences`` (sequence mode).
    The result is the local sum / that count, so summing it over micro-batches and ranks gives the
    exact global mean. DeepSpeed/DDP AVERAGE gradients over ranks: scale by world size there.
    """
    if aggregation == "token":
        if num_sequences is not None:
            raise ValueError("num_sequences is only used with aggregation='sequence'")
        if num_tokens is None:
            return masked_mean(x, mask)
        return masked_sum(x, mask) / num_tokens
    if aggregation == "sequence":
        if num_tokens is not None:
            raise ValueError("num_tokens is only used with aggregation='token'")
        per_seq = masked_mean(x, mask, dim=1)  # (B,)
        return per_seq.mean() if num_sequences is None else per_seq.sum() / num_sequences
    raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")


# --------------------------------------------------------------------------- KL and rewards


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at tokens sampled from pi (Schulman 2020 blog).

    logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens -> (B, T), unmasked.
    With logr = ref_logprobs - logprobs:
      k1 = -logr                   unbiased, can be negative per token (Ziegler et al. 2019);
      k2 = logr^2 / 2              biased, low variance, >= 0;
      k3 = (exp(logr) - 1) - logr  unbiased, >= 0, grows like exp(logr) where pi_ref >> pi.
    """
    logr = ref_logprobs - logprobs
    if kind == "k1":
        return -logr
    if kind == "k2":
        return 0.5 * logr * logr
    if kind == "k3":
        return torch.expm1(logr) - logr  # expm1: exact near logr = 0, where policy ~ reference
    raise ValueError(f"kl estimator must be 'k1', 'k2' or 'k3', got {kind!r}")


def clip_and_normalize_score(scores: torch.Tensor, mean: Number = 0.0, std: Number = 1.0,
                             clip: Optional[float] = None) -> torch.Tensor:
    """(scores - mean) / std, then clamp to [-clip, clip] when ``clip`` is given. scores: (B,)."""
    out = (scores - mean) / std
    return out if clip is None else out.clamp(-clip, clip)


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                    kl_coef: Number, kl_estimator: str = "k1", ended_with_eos: Optional[torch.Tensor] = None,
                    missing_eos_penalty: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL-penalised per-token rewards (Ziegler et al. 2019 eq. 2; InstructGPT arXiv 2203.02155 eq. 2).

    R(x, y) = r(x, y) - beta * KL: every real response token gets -kl_coef * kl_t, and the last
    real token of each row (index mask.sum(1) - 1, so rows must be right-padded) also gets the
    reward-model score. A row with no response tokens gets no score: there is no token to credit.

    If ``missing_eos_penalty`` is given, rows whose ``ended_with_eos`` (B,) bool is False (truncated
    at the length limit) get score - penalty; like TRL we subtract rather than replace the score.

    scores: (B,); logprobs, ref_logprobs, mask: (B, T).
    Returns rewards (B, T), kl (B, T) and non_score_reward = -kl_coef * kl (B, T), all 0 on padding.
    """
    m = mask.to(logprobs.dtype)
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator) * m
    non_score_reward = -kl_coef * kl
    scores = scores.to(logprobs.dtype)
    if missing_eos_penalty is not None:
        if ended_with_eos is None:
            raise ValueError("missing_eos_penalty needs ended_with_eos (B,) bool")
        scores = torch.where(ended_with_eos.to(torch.bool), scores, scores - missing_eos_penalty)
    lengths = m.sum(1).long()  # (B,)
    last = (lengths - 1).clamp_min(0)
    scores = scores * (lengths > 0).to(scores.dtype)
    rewards = non_score_reward.scatter_add(1, last.unsqueeze(1), scores.unsqueeze(1))
    return rewards, kl, non_score_reward


class AdaptiveKLController:
    """Adaptive KL coefficient beta (Ziegler et al. 2019, arXiv 1909.08593, eq. 2).

    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2);  beta_{t+1} = beta_t * (1 + K_beta * e_t),
    with K_beta = n_steps / horizon, n_steps the number of samples (or steps) since the last update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """Constant KL coefficient with the same interface as ``AdaptiveKLController``."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


# --------------------------------------------------------------------------- advantages


def compute_gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2015, arXiv 1506.02438, eq. 16).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  R_t = A_t + V_t.
    values, rewards, mask: (B, T) -> advantages (B, T), returns (B, T), both 0 on padding.
    Values and rewards past the mask count as 0, so the episode ends after the last real token
    (bootstrap V_{T} = 0). Loops backwards over T, which is short for responses.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    T = values.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    last_adv = torch.zeros_like(values[:, 0])
    reversed_adv = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_adv = delta + gamma * lam * last_adv
        reversed_adv.append(last_adv)
        next_value = values[:, t]
    advantages = torch.stack(reversed_adv[::-1], dim=1) * m
    return advantages, advantages + values


# --------------------------------------------------------------------------- losses


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip_low: float = 0.2, clip_high: Optional[float] = None,
                      ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token PPO clipped surrogate loss, before aggregation. All inputs (B, T) -> (B, T).

    ratio = exp(logprobs - old_logprobs);
    loss_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_low, 1 + clip_high))
    (PPO, arXiv 1707.06347, eq. 7, negated). ``clip_high=None`` is the symmetric PPO clip
    (clip_high = clip_low). A larger ``clip_high`` is DAPO's "clip-higher" (Yu et al. 2025,
    arXiv 2503.14476, "Clip-Higher"): low-probability tokens with A > 0 may grow further
    before their gradient is cut, which keeps entropy from collapsing.

    Stats (detached, masked token means over THIS micro-batch):
      clipfrac: fraction of tokens where the clipped term is strictly larger, i.e. clipping is
        active and the token has no gradient (TRL's definition);
      approx_kl: 0.5 * mean((logprobs - old_logprobs)^2), the k2 estimator of KL(pi_old || pi);
      ratio: mean of ratio.
    """
    clip_high = clip_low if clip_high is None else clip_high
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(per_token.dtype), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio * log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return per_token, stats


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float = 0.2, aggregation: str = "token", num_tokens: Optional[Number] = None,
                num_sequences: Optional[Number] = None, clip_range_high: Optional[float] = None,
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7), as a loss to minimise.

    ratio = exp(logprobs - old_logprobs);
    loss_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps_high)), aggregated by
    ``masked_aggregate`` (see there for ``num_tokens`` across micro-batches and ranks).
    eps = clip_range; eps_high = clip_range_high, or clip_range when None (DAPO's asymmetric
    clip otherwise, see ``clipped_surrogate``; rlhf/policy_loss.py has the other aggregations).
    logprobs, old_logprobs, advantages, mask: (B, T) -> scalar loss, and the stats of
    ``clipped_surrogate`` (clipfrac, approx_kl, ratio).
    """
    per_token, stats = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range, clip_range_high)
    return masked_aggregate(per_token, mask, aggregation, num_tokens, num_sequences), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: Optional[float] = 0.2, num_tokens: Optional[Number] = None,
               aggregation: str = "token", num_sequences: Optional[Number] = None,
               ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped value loss (PPO2 in OpenAI baselines; Ziegler et al. 2019 / TRL PPO).

    V_clip = old + clip(V - old, -eps, eps);  loss_t = 0.5 * max((V - R)^2, (V_clip - R)^2),
    aggregated like ``policy_loss``. ``clip_range_value=None`` gives the plain 0.5 * (V - R)^2.
    values, old_values, returns, mask: (B, T) -> scalar loss, stats {"vf_clipfrac"} (fraction of
    tokens where the clipped term is strictly larger).
    """
    unclipped = (values - returns) ** 2
    if clip_range_value is None:
        clipped = unclipped
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
        clipped = (v_clip - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped, clipped)
    loss = masked_aggregate(per_token, mask, aggregation, num_tokens, num_sequences)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).to(per_token.dtype), mask)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: logits (B, T, V) -> (B, T).

    H = logsumexp(z) - sum(softmax(z) * z), stable for large logits (no log of tiny probs).
    Logits must be finite (a -inf logit makes 0 * -inf = NaN). Reduce with ``masked_aggregate``.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over masked tokens. values, returns, mask: (B, T).

    1 is a perfect critic, 0 no better than a constant, < 0 worse. NaN when Var(returns) is 0.
    """
    var_y = masked_var(returns, mask, unbiased=False)
    var_err = masked_var(returns - values, mask, unbiased=False)
    return torch.where(var_y > 0, 1.0 - var_err / var_y, torch.full_like(var_y, float("nan")))
