"""Direct preference losses: pure torch functions on per-sequence log-probabilities.

Every pairwise loss takes per-sequence log-probs of the chosen and rejected responses, shape (B,),
and returns `(losses, chosen_rewards, rejected_rewards)`, all (B,):
  - losses are per example, NOT averaged (the caller averages, so it can weight or mask);
  - rewards are the implicit rewards, detached, for logging (`rewards/chosen`, `rewards/margins`).

Notation used in the docstrings, as in the DPO paper:
    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
i.e. how much more the policy, relative to the reference, prefers the chosen response y_w over the
rejected y_l. Most losses are a function of beta * h.

`PAIRWISE_LOSSES` and `pairwise_loss` let a trainer pick a loss by its config name. KTO
(`direct.kto_loss`) and listwise DPO (`direct.listwise`) are re-exported here.

This module imports only torch, so importing it never pulls in DeepSpeed or Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .kto_loss import kto_kl_reference_point, kto_loss, pairs_to_kto
from .listwise import plackett_luce_dpo_loss

Tensor = torch.Tensor
PairwiseOutput = tuple[Tensor, Tensor, Tensor]

__all__ = [
    "GPOKind",
    "LossSpec",
    "PAIRWISE_LOSSES",
    "add_nll_term",
    "discopop_loss",
    "dpo_loss",
    "gpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_kl_reference_point",
    "kto_loss",
    "orpo_loss",
    "pairs_to_kto",
    "pairwise_loss",
    "plackett_luce_dpo_loss",
    "robust_dpo_loss",
    "simpo_loss",
]


def _logratios(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (h, chosen log-ratio, rejected log-ratio), each (B,)."""
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    return chosen - rejected, chosen, rejected


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


# ---------------------------------------------------------------------------------------------
# Losses with a reference model
# ---------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PairwiseOutput:
    """DPO loss (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model", arXiv 2305.18290, eq. 7):

        loss = -log sigmoid(beta * h)

    With `label_smoothing` = eps > 0 this is conservative DPO (cDPO, Mitchell 2023, "A note on
    DPO with noisy preferences"), which assumes each label is flipped with probability eps:

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    Args: the four log-probs are (B,) per-sequence sums; beta is DPO's beta (the strength of the
    implicit KL penalty); label_smoothing is eps in [0, 0.5).
    Returns: (losses, chosen_rewards, rejected_rewards), each (B,); rewards =
    beta * (log pi - log pi_ref), detached.
    """
    _check_label_smoothing(label_smoothing)
    h, chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h)
    if label_smoothing > 0:
        losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> PairwiseOutput:
    """IPO loss (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", arXiv 2310.12036, the sampled IPO loss):

        loss = (h - 1 / (2 * beta))^2

    beta is the paper's tau (regularisation strength). IPO expects LENGTH-AVERAGED log-probs
    (mean over completion tokens): the caller passes averaged logps, and the trainer does so when
    the registry says `length_normalized=True`. All tensors (B,); rewards = beta * log-ratio,
    detached.
    """
    if beta <= 0:
        raise ValueError(f"ipo_loss needs beta > 0, got {beta}")
    h, chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (h - 1 / (2 * beta)) ** 2
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def robust_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PairwiseOutput:
    """Robust DPO loss (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models
    with Noisy Feedback", arXiv 2403.00409, the rDPO loss), an unbiased loss under label flips with
    probability eps = label_smoothing:

        loss = ((1 - eps) * -log sigmoid(beta * h) - eps * -log sigmoid(-beta * h)) / (1 - 2 * eps)

    Unlike cDPO the eps term is subtracted, so the loss can be negative. eps in [0, 0.5);
    eps = 0 is DPO. All tensors (B,); rewards = beta * log-ratio, detached.
    """
    _check_label_smoothing(label_smoothing)
    eps = label_smoothing
    h, chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> PairwiseOutput:
    """Hinge (SLiC) loss (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback", arXiv 2305.10425, the rank calibration loss):

        loss = max(0, 1 - beta * h)

    SLiC writes max(0, delta - log pi(y_w|x) + log pi(y_l|x)) with a margin delta and no reference;
    like TRL's "hinge" we use reference log-ratios and beta = 1 / delta (the loss is then SLiC's
    divided by delta).
    SLiC's regulariser (NLL of the chosen response) is `add_nll_term`. All tensors (B,);
    rewards = beta * log-ratio, detached.
    """
    h, chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = torch.relu(1 - beta * h)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


class GPOKind(str, Enum):
    """The convex functions f of GPO; the loss is f(beta * h)."""

    LOGISTIC = "logistic"  # log(1 + e^-x): DPO
    EXPONENTIAL = "exponential"  # e^-x
    SQUARED = "squared"  # (x - 1)^2: IPO up to scaling
    TRUNCATED_QUADRATIC = "truncated_quadratic"  # max(0, 1 - x)^2
    SAVAGE = "savage"  # 1 / (1 + e^x)^2
    HINGE = "hinge"  # max(0, 1 - x): SLiC


_GPO_FUNCTIONS: dict[GPOKind, Callable[[Tensor], Tensor]] = {
    GPOKind.LOGISTIC: lambda x: -F.logsigmoid(x),
    GPOKind.EXPONENTIAL: lambda x: torch.exp(-x),
    GPOKind.SQUARED: lambda x: (x - 1) ** 2,
    GPOKind.TRUNCATED_QUADRATIC: lambda x: torch.relu(1 - x) ** 2,
    GPOKind.SAVAGE: lambda x: torch.sigmoid(-x) ** 2,  # 1/(1+e^x) = sigmoid(-x)
    GPOKind.HINGE: lambda x: torch.relu(1 - x),
}


def gpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    kind: str | GPOKind = GPOKind.LOGISTIC,
) -> PairwiseOutput:
    """Generalized Preference Optimization (Tang et al. 2024, "Generalized Preference
    Optimization: A Unified Approach to Offline Alignment", arXiv 2402.05749, the offline
    GPO loss with the convex functions of its Table 1):

        loss = f(beta * h), f one of `GPOKind`:
        logistic log(1 + e^-x); exponential e^-x; squared (x - 1)^2;
        truncated_quadratic max(0, 1 - x)^2; savage 1 / (1 + e^x)^2; hinge max(0, 1 - x)

    "squared" is (beta h - 1)^2 = beta^2 (h - 1/beta)^2, which differs from `ipo_loss` by a
    scale and by the target margin (1/beta vs 1/(2 beta)). All tensors (B,); rewards =
    beta * log-ratio, detached.
    """
    try:
        f = _GPO_FUNCTIONS[GPOKind(kind)]
    except ValueError:
        valid = ", ".join(k.value for k in GPOKind)
        raise ValueError(f"unknown GPO kind {kind!r}; valid kinds: {valid}") from None
    h, chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return f(beta * h), (beta * chosen).detach(), (beta * rejected).detach()


def discopop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.05,
    tau: float = 0.05,
) -> PairwiseOutput:
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, "Discovering Preference
    Optimization Algorithms with and for Large Language Models", arXiv 2406.08414, the LRML
    objective). With rho = beta * h:

        mix  = sigmoid(rho / tau)
        loss = (1 - mix) * -log sigmoid(rho) + mix * exp(-rho)

    a blend of the logistic (DPO) and exponential losses, weighted by the log-ratio itself.
    Defaults are the paper's (beta = 0.05, tau = 0.05), as in TRL. All tensors (B,);
    rewards = beta * log-ratio, detached.
    """
    if tau <= 0:
        raise ValueError(f"discopop_loss needs tau > 0, got {tau}")
    h, chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    rho = beta * h
    mix = torch.sigmoid(rho / tau)
    losses = (1 - mix) * -F.logsigmoid(rho) + mix * torch.exp(-rho)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


# ---------------------------------------------------------------------------------------------
# Reference-free losses (inputs are length-averaged log-probs)
# ---------------------------------------------------------------------------------------------


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> PairwiseOutput:
    """SimPO loss (Meng et al. 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", arXiv 2405.14734, eq. 6). No reference model; the inputs are
    LENGTH-AVERAGED log-probs (B,) of the chosen and rejected responses:

        loss = -log sigmoid(beta * (logp_w - logp_l) - gamma)

    gamma is the target reward margin, in reward units (the paper's gamma; its later versions
    quote gamma / beta, e.g. beta = 2.0 and gamma / beta = 0.5 -> gamma = 1.0, the defaults here).
    label_smoothing eps > 0 mixes in -eps * log sigmoid(-(...)) as in cDPO.
    Returns (losses, beta * logp_w, beta * logp_l), each (B,), rewards detached.
    """
    _check_label_smoothing(label_smoothing)
    logits = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing > 0:
        losses = losses - label_smoothing * F.logsigmoid(-logits)
    return losses, (beta * policy_chosen_logps).detach(), (beta * policy_rejected_logps).detach()


# Average log-probs are clamped just below 0 so that log(1 - p) stays finite.
_MAX_AVERAGE_LOGP = -1e-6


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012, "Accurately Computing
    log(1 - exp(-|a|))"). Each branch gets an input clamped to its own range so the branch that
    torch.where discards never holds an inf whose gradient would turn into NaN."""
    x = x.clamp(max=_MAX_AVERAGE_LOGP)
    cut = -math.log(2)
    near_zero = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near_zero, far)


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_nll: Tensor,
    beta: float = 0.1,
) -> PairwiseOutput:
    """ORPO loss (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", arXiv 2403.07691, eqs. 6-7): L = L_SFT + lambda * L_OR, with

        log odds(y) = log p - log(1 - p),  p = exp(logp) (logp: length-averaged log-prob)
        L_OR = -log sigmoid(log odds(y_w) - log odds(y_l))
        loss = chosen_nll + beta * L_OR            (beta is the paper's lambda)

    Args: policy_chosen_logps / policy_rejected_logps are LENGTH-AVERAGED log-probs (B,);
    chosen_nll is the per-example SFT loss of the chosen response (B,), token-averaged.
    Returns (losses, beta * logp_w, beta * logp_l), each (B,), rewards detached.
    """
    log_odds_chosen = policy_chosen_logps - _log1mexp(policy_chosen_logps)
    log_odds_rejected = policy_rejected_logps - _log1mexp(policy_rejected_logps)
    losses = chosen_nll - beta * F.logsigmoid(log_odds_chosen - log_odds_rejected)
    return losses, (beta * policy_chosen_logps).detach(), (beta * policy_rejected_logps).detach()


def add_nll_term(losses: Tensor, chosen_nll: Tensor, alpha: float = 1.0) -> Tensor:
    """losses + alpha * chosen_nll, both (B,).

    With DPO this is RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization",
    arXiv 2404.19733, its DPO + NLL loss; the paper uses alpha = 1 and an NLL normalised by
    length). With the hinge loss it is SLiC's regulariser on the chosen response
    (arXiv 2305.10425).
    Usable with any pairwise loss.
    """
    return losses + alpha * chosen_nll


# ---------------------------------------------------------------------------------------------
# Registry: pick a loss by config name
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """What a trainer needs to know about a pairwise loss.

    name: config name. fn: the loss function.
    needs_reference: pass reference log-probs (a reference model or cached log-probs).
    length_normalized: the log-probs must be averaged over completion tokens, not summed.
    needs_chosen_nll: the trainer must compute the chosen response's NLL (B,).
    adds_nll_term: `pairwise_loss` adds alpha * chosen_nll to fn's losses (SLiC, RPO); otherwise
        fn takes chosen_nll itself (ORPO).
    hparams: hyperparameter names the loss reads (a trainer passes these from its config).
    required: hparams that must be given explicitly.
    fixed: hyperparameters the name pins, e.g. GPO's kind.
    """

    name: str
    fn: Callable[..., PairwiseOutput]
    needs_reference: bool = True
    length_normalized: bool = False
    needs_chosen_nll: bool = False
    adds_nll_term: bool = False
    hparams: tuple[str, ...] = ("beta",)
    required: tuple[str, ...] = ()
    fixed: tuple[tuple[str, Any], ...] = ()


def _specs() -> dict[str, LossSpec]:
    specs = [
        LossSpec("dpo", dpo_loss, hparams=("beta", "label_smoothing")),
        LossSpec(
            "cdpo", dpo_loss, hparams=("beta", "label_smoothing"), required=("label_smoothing",)
        ),
        LossSpec("ipo", ipo_loss, length_normalized=True),
        LossSpec("robust", robust_dpo_loss, hparams=("beta", "label_smoothing")),
        LossSpec("hinge", hinge_loss),
        LossSpec(
            "slic",
            hinge_loss,
            needs_chosen_nll=True,
            adds_nll_term=True,
            hparams=("beta", "alpha"),
        ),
        *(LossSpec(f"gpo_{k.value}", gpo_loss, fixed=(("kind", k.value),)) for k in GPOKind),
        LossSpec("discopop", discopop_loss, hparams=("beta", "tau")),
        LossSpec(
            "simpo",
            simpo_loss,
            needs_reference=False,
            length_normalized=True,
            hparams=("beta", "gamma", "label_smoothing"),
        ),
        LossSpec(
            "orpo", orpo_loss, needs_reference=False, length_normalized=True, needs_chosen_nll=True
        ),
        LossSpec(
            "rpo", dpo_loss, needs_chosen_nll=True, adds_nll_term=True, hparams=("beta", "alpha")
        ),
    ]
    return {spec.name: spec for spec in specs}


PAIRWISE_LOSSES: dict[str, LossSpec] = _specs()


def pairwise_loss(
    name: str,
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_nll: Tensor | None = None,
    **hparams: Any,
) -> PairwiseOutput:
    """Compute the pairwise loss registered as `name` in `PAIRWISE_LOSSES`.

    Tensors are (B,); hparams are among beta, label_smoothing, gamma, tau, alpha (the NLL weight
    of "slic" and "rpo", default 1.0), as listed in the spec's `hparams`; anything else is an
    error. Returns (losses, chosen_rewards, rejected_rewards), each (B,), losses not averaged.
    """
    spec = PAIRWISE_LOSSES.get(name)
    if spec is None:
        valid = ", ".join(sorted(PAIRWISE_LOSSES))
        raise ValueError(f"unknown loss {name!r}; valid names: {valid}")
    unknown = sorted(set(hparams) - set(spec.hparams))
    if unknown:
        raise ValueError(
            f"loss {name!r} takes hyperparameters {list(spec.hparams)}, got unknown {unknown}"
        )
    missing = [key for key in spec.required if key not in hparams]
    if missing:
        raise ValueError(f"loss {name!r} needs {missing} to be set")

    args = [policy_chosen_logps, policy_rejected_logps]
    if spec.needs_reference:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss {name!r} needs ref_chosen_logps and ref_rejected_logps")
        args += [ref_chosen_logps, ref_rejected_logps]
    if spec.needs_chosen_nll and chosen_nll is None:
        raise ValueError(f"loss {name!r} needs chosen_nll")
    if spec.needs_chosen_nll and not spec.adds_nll_term:
        args.append(chosen_nll)

    alpha = hparams.pop("alpha", 1.0)
    losses, chosen_rewards, rejected_rewards = spec.fn(*args, **hparams, **dict(spec.fixed))
    if spec.adds_nll_term:
        losses = add_nll_term(losses, chosen_nll, alpha)
    return losses, chosen_rewards, rejected_rewards
