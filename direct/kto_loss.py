"""KTO: Kahneman-Tversky Optimization on unpaired desirable / undesirable examples.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
arXiv 2402.01306.
Pure torch functions; `direct.losses` re-exports them.

Data flow in a trainer:
  1. Per-sequence log-probs of each example's completion under policy and reference: (B,).
  2. The reference point z0 from *mismatched* pairs (prompt x_i with the completion of another
     example y_j), see `kto_kl_reference_point`.
  3. `kto_loss` gives per-example losses (B,); the caller averages them.
Paired preference data can be used with `pairs_to_kto` (chosen -> desirable, rejected ->
undesirable).
"""

from __future__ import annotations

import torch


def kto_kl_reference_point(
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    clamp: bool = True,
) -> torch.Tensor:
    """Reference point z0 of KTO: a batch estimate of KL(pi_theta || pi_ref).

    z0 = max(0, mean_j [log pi_theta(y_j|x_i) - log pi_ref(y_j|x_i)]) over mismatched pairs
    (x_i, y_j), i != j. It is detached: the paper does not back-propagate through z0.

    Args:
        policy_kl_logps: (M,) policy log-probs of the mismatched completions.
        ref_kl_logps: (M,) reference log-probs of the same.
        clamp: clamp at 0. With several data-parallel ranks pass `clamp=False`, average the
            result across ranks (all-reduce), then apply `.clamp(min=0)` yourself, so that every
            rank uses the same z0 and the clamp acts on the global mean.

    Returns:
        A 0-dim tensor, detached.
    """
    z0 = (policy_kl_logps - ref_kl_logps).detach().mean()
    return z0.clamp(min=0) if clamp else z0


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    is_desirable: torch.Tensor,
    kl_reference_point: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO loss (Ethayarajh et al. 2024, arXiv 2402.01306).

    With r = log pi_theta(y|x) - log pi_ref(y|x) and z0 the reference point:
        desirable:   lambda_D * (1 - sigmoid(beta * (r - z0)))
        undesirable: lambda_U * (1 - sigmoid(beta * (z0 - r)))
    The paper suggests lambda_D * n_D / (lambda_U * n_U) in [1, 4/3] when classes are imbalanced.

    Args:
        policy_logps: (B,) per-sequence policy log-probs of the completions.
        ref_logps: (B,) the same under the reference model.
        is_desirable: (B,) bool, True for desirable examples.
        kl_reference_point: 0-dim tensor z0 from `kto_kl_reference_point` (treated as a constant).
        beta: beta of the paper, the scale of the implicit reward.
        desirable_weight: lambda_D.
        undesirable_weight: lambda_U.

    Returns:
        (losses (B,), rewards (B,)), rewards = beta * r, detached. Not averaged.
    """
    logratios = policy_logps - ref_logps
    z0 = kl_reference_point.detach()
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(is_desirable.bool(), desirable, undesirable)
    return losses, (beta * logratios).detach()


def pairs_to_kto(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn B preference pairs into 2B KTO examples: chosen -> desirable, rejected -> undesirable.

    All inputs (B,). Returns (policy_logps (2B,), ref_logps (2B,), is_desirable (2B,) bool), the
    B chosen first. Feed them to `kto_loss`. (The paper's experiments on paired data do this.)
    """
    policy_logps = torch.cat([policy_chosen_logps, policy_rejected_logps])
    ref_logps = torch.cat([ref_chosen_logps, ref_rejected_logps])
    n = policy_chosen_logps.shape[0]
    is_desirable = torch.arange(2 * n, device=policy_logps.device) < n
    return policy_logps, ref_logps, is_desirable
