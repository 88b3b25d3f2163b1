"""Direct preference losses against values written out by hand with `math`.

Shared inputs (per-sequence log-probs, B = 3):
    policy chosen   [-1.0, -2.0, -3.0]    ref chosen   [-1.5, -2.0, -2.5]
    policy rejected [-2.0, -1.5, -4.0]    ref rejected [-1.0, -1.0, -5.0]
    chosen log-ratio   [ 0.5,  0.0, -0.5]
    rejected log-ratio [-1.0, -0.5,  1.0]
    h = difference     [ 1.5,  0.5, -1.5]
"""

import math

import pytest
import torch

from direct.losses import (
    PAIRWISE_LOSSES,
    GPOKind,
    add_nll_term,
    discopop_loss,
    dpo_loss,
    gpo_loss,
    hinge_loss,
    ipo_loss,
    kto_kl_reference_point,
    kto_loss,
    orpo_loss,
    pairs_to_kto,
    pairwise_loss,
    plackett_luce_dpo_loss,
    robust_dpo_loss,
    simpo_loss,
)

F64 = torch.float64
PC = [-1.0, -2.0, -3.0]
PR = [-2.0, -1.5, -4.0]
RC = [-1.5, -2.0, -2.5]
RR = [-1.0, -1.0, -5.0]
CHOSEN_LR = [0.5, 0.0, -0.5]
REJECTED_LR = [-1.0, -0.5, 1.0]
H = [1.5, 0.5, -1.5]


def t(values, requires_grad=False):
    return torch.tensor(values, dtype=F64, requires_grad=requires_grad)


def inputs(requires_grad=False):
    return [t(v, requires_grad) for v in (PC, PR, RC, RR)]


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def close(actual, expected):
    expected = torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


# --- DPO family -------------------------------------------------------------------------------


def test_dpo_is_ln2_when_policy_equals_reference():
    logps = t([-3.0, -7.5, -0.2])
    losses, chosen_rewards, rejected_rewards = dpo_loss(logps, logps + 1, logps, logps + 1)
    close(losses, [math.log(2)] * 3)
    close(chosen_rewards, [0.0] * 3)
    close(rejected_rewards, [0.0] * 3)


def test_dpo_value_and_rewards():
    beta = 0.1
    losses, chosen_rewards, rejected_rewards = dpo_loss(*inputs(), beta=beta)
    close(losses, [-log_sigmoid(beta * h) for h in H])
    close(chosen_rewards, [beta * x for x in CHOSEN_LR])
    close(rejected_rewards, [beta * x for x in REJECTED_LR])


def test_cdpo_label_smoothing_value():
    beta, eps = 0.5, 0.1
    losses, _, _ = dpo_loss(*inputs(), beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in H]
    close(losses, expected)


def test_cdpo_is_symmetric():
    # L(h) + L(-h) does not depend on eps, and the loss is flat at beta*h = log((1-eps)/eps),
    # the log-odds of a label being right.
    beta, eps = 0.5, 0.2
    pc, pr, rc, rr = inputs()
    forward, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    swapped, _, _ = dpo_loss(pr, pc, rr, rc, beta=beta, label_smoothing=eps)
    plain = [-log_sigmoid(beta * h) - log_sigmoid(-beta * h) for h in H]
    close(forward + swapped, plain)

    h_star = t([math.log((1 - eps) / eps) / beta], requires_grad=True)
    zero = t([0.0])
    loss, _, _ = dpo_loss(h_star, zero, zero, zero, beta=beta, label_smoothing=eps)
    loss.sum().backward()
    assert abs(h_star.grad.item()) < 1e-12


def test_label_smoothing_out_of_range():
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*inputs(), label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_dpo_loss(*inputs(), label_smoothing=-0.1)


def test_ipo_value():
    beta = 0.1  # target margin 1/(2*beta) = 5
    losses, chosen_rewards, _ = ipo_loss(*inputs(), beta=beta)
    close(losses, [(1.5 - 5) ** 2, (0.5 - 5) ** 2, (-1.5 - 5) ** 2])
    close(chosen_rewards, [0.05, 0.0, -0.05])


def test_robust_dpo_value_and_reduces_to_dpo():
    beta, eps = 0.5, 0.2
    losses, _, _ = robust_dpo_loss(*inputs(), beta=beta, label_smoothing=eps)
    expected = [
        ((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps)
        for h in H
    ]
    close(losses, expected)
    plain, _, _ = robust_dpo_loss(*inputs(), beta=beta)
    close(plain, [-log_sigmoid(beta * h) for h in H])


def test_hinge_value():
    losses, _, rejected_rewards = hinge_loss(*inputs(), beta=1.0)
    close(losses, [0.0, 0.5, 2.5])  # max(0, 1 - h)
    close(rejected_rewards, REJECTED_LR)


GPO_BY_HAND = {
    "logistic": lambda x: math.log(1 + math.exp(-x)),
    "exponential": lambda x: math.exp(-x),
    "squared": lambda x: (x - 1) ** 2,
    "truncated_quadratic": lambda x: max(0.0, 1 - x) ** 2,
    "savage": lambda x: 1 / (1 + math.exp(x)) ** 2,
    "hinge": lambda x: max(0.0, 1 - x),
}


@pytest.mark.parametrize("kind", sorted(GPO_BY_HAND))
def test_gpo_kinds(kind):
    beta = 2.0  # beta*h = [3, 1, -3]: both sides of the hinge at 1
    losses, chosen_rewards, _ = gpo_loss(*inputs(), beta=beta, kind=kind)
    close(losses, [GPO_BY_HAND[kind](beta * h) for h in H])
    close(chosen_rewards, [beta * x for x in CHOSEN_LR])
    by_enum, _, _ = gpo_loss(*inputs(), beta=beta, kind=GPOKind(kind))
    close(by_enum, losses)


def test_gpo_unknown_kind():
    with pytest.raises(ValueError, match="savage"):
        gpo_loss(*inputs(), kind="cubic")


def test_discopop_value():
    beta, tau = 0.05, 0.05
    losses, _, _ = discopop_loss(*inputs(), beta=beta, tau=tau)
    expected = []
    for h in H:
        rho = beta * h
        mix = sigmoid(rho / tau)
        expected.append((1 - mix) * -log_sigmoid(rho) + mix * math.exp(-rho))
    close(losses, expected)


def test_discopop_defaults_are_the_papers():
    losses, _, _ = discopop_loss(*inputs())
    rho = 0.05 * 1.5
    mix = sigmoid(rho / 0.05)
    close(losses[0], (1 - mix) * math.log1p(math.exp(-rho)) + mix * math.exp(-rho))


# --- Reference-free losses --------------------------------------------------------------------

AVG_CHOSEN = [-0.5, -1.0, -0.2]
AVG_REJECTED = [-0.8, -0.9, -1.5]


def test_simpo_value_and_rewards():
    beta, gamma = 2.0, 1.0
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        t(AVG_CHOSEN), t(AVG_REJECTED), beta=beta, gamma=gamma
    )
    # beta * (c - r) - gamma = [-0.4, -1.2, 1.6]
    close(losses, [-log_sigmoid(x) for x in (-0.4, -1.2, 1.6)])
    close(chosen_rewards, [-1.0, -2.0, -0.4])
    close(rejected_rewards, [-1.6, -1.8, -3.0])


def test_simpo_label_smoothing():
    eps = 0.1
    losses, _, _ = simpo_loss(
        t(AVG_CHOSEN), t(AVG_REJECTED), beta=2.0, gamma=1.0, label_smoothing=eps
    )
    logits = (-0.4, -1.2, 1.6)
    close(losses, [-(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x) for x in logits])


def test_orpo_value():
    beta = 0.1
    p_chosen, p_rejected = [0.6, 0.3, 0.9], [0.2, 0.5, 0.999]
    nll = [1.2, 0.7, 2.0]
    losses, chosen_rewards, _ = orpo_loss(
        t([math.log(p) for p in p_chosen]), t([math.log(p) for p in p_rejected]), t(nll), beta=beta
    )
    expected = []
    for pc, pr, n in zip(p_chosen, p_rejected, nll):
        log_odds_ratio = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
        expected.append(n - beta * log_sigmoid(log_odds_ratio))
    close(losses, expected)
    close(chosen_rewards, [beta * math.log(p) for p in p_chosen])


def test_orpo_is_finite_near_probability_one():
    chosen = t([0.0, -1e-12, -1e-3, -50.0], requires_grad=True)
    rejected = t([-1e-9, -0.5, 0.0, -80.0], requires_grad=True)
    losses, _, _ = orpo_loss(chosen, rejected, t([1.0] * 4))
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_add_nll_term_is_rpo():
    alpha = 0.5
    nll = [1.0, 2.0, 3.0]
    dpo, _, _ = dpo_loss(*inputs(), beta=0.1)
    expected = [-log_sigmoid(0.1 * h) + alpha * n for h, n in zip(H, nll)]
    close(add_nll_term(dpo, t(nll), alpha), expected)


# --- KTO --------------------------------------------------------------------------------------


def test_kto_reference_point_mean_and_clamp():
    policy, ref = t([-1.0, -2.0, -3.0], True), t([-2.0, -2.5, -3.5])  # mean(policy - ref) = 2/3
    z0 = kto_kl_reference_point(policy, ref)
    close(z0, 2 / 3)
    assert z0.dim() == 0 and not z0.requires_grad

    negative = kto_kl_reference_point(ref, policy)  # mean = -2/3 -> clamped to 0
    close(negative, 0.0)
    close(kto_kl_reference_point(ref, policy, clamp=False), -2 / 3)


def test_kto_desirable_and_undesirable():
    beta, z0, w_d, w_u = 0.1, 0.2, 1.0, 1.5
    policy, ref = t([-1.0, -2.0, -3.0, -4.0]), t([-1.5, -1.7, -4.0, -2.0])
    # log-ratios [0.5, -0.3, 1.0, -2.0]; the first two desirable, the last two undesirable
    desirable = torch.tensor([True, True, False, False])
    losses, rewards = kto_loss(
        policy, ref, desirable, t(z0), beta=beta, desirable_weight=w_d, undesirable_weight=w_u
    )
    expected = [
        w_d * (1 - sigmoid(beta * (0.5 - z0))),
        w_d * (1 - sigmoid(beta * (-0.3 - z0))),
        w_u * (1 - sigmoid(beta * (z0 - 1.0))),
        w_u * (1 - sigmoid(beta * (z0 + 2.0))),
    ]
    close(losses, expected)
    close(rewards, [0.05, -0.03, 0.1, -0.2])


def test_kto_weights_scale_their_class_only():
    policy, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    desirable = torch.tensor([True, False])
    base, _ = kto_loss(policy, ref, desirable, t(0.0))
    weighted, _ = kto_loss(
        policy, ref, desirable, t(0.0), desirable_weight=2.0, undesirable_weight=3.0
    )
    close(weighted, base * t([2.0, 3.0]))


def test_pairs_to_kto():
    pc, pr, rc, rr = inputs()
    policy, ref, desirable = pairs_to_kto(pc, pr, rc, rr)
    close(policy, PC + PR)
    close(ref, RC + RR)
    assert desirable.tolist() == [True] * 3 + [False] * 3
    losses, rewards = kto_loss(policy, ref, desirable, t(0.0), beta=0.1)
    assert losses.shape == rewards.shape == (6,)
    close(losses[0], 1 - sigmoid(0.1 * 0.5))
    close(losses[5], 1 - sigmoid(-0.1 * 1.0))


# --- Listwise ---------------------------------------------------------------------------------


def test_plackett_luce_k2_equals_dpo():
    pc, pr, rc, rr = inputs()
    losses, rewards = plackett_luce_dpo_loss(
        torch.stack([pc, pr], dim=1), torch.stack([rc, rr], dim=1), beta=0.3
    )
    dpo, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.3)
    close(losses, dpo)
    close(rewards, torch.stack([chosen_rewards, rejected_rewards], dim=1))


def test_plackett_luce_k3_and_masked_rows():
    beta = 0.5
    policy = t([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]])
    ref = t([[-2.0, -1.0, -3.0]] * 4)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 0, 1]], dtype=torch.bool)
    losses, rewards = plackett_luce_dpo_loss(policy, ref, beta=beta, mask=mask)
    r0, r1, r2 = 0.5, -0.5, 0.0  # beta * (policy - ref)
    full = -(r0 - math.log(math.exp(r0) + math.exp(r1) + math.exp(r2))) - (
        r1 - math.log(math.exp(r1) + math.exp(r2))
    )
    close(losses, [full, -log_sigmoid(r0 - r1), 0.0, -log_sigmoid(r0 - r2)])
    close(rewards, [[r0, r1, r2], [r0, r1, 0.0], [r0, 0.0, 0.0], [r0, 0.0, r2]])


def test_plackett_luce_masked_gradients_are_finite():
    policy = t([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    losses, rewards = plackett_luce_dpo_loss(policy, t([[0.0] * 3] * 2), mask=mask)
    losses.sum().backward()
    assert torch.isfinite(policy.grad).all()
    assert policy.grad[0, 2] == 0 and (policy.grad[1] == 0).all()
    assert not rewards.requires_grad


# --- Registry ---------------------------------------------------------------------------------


def call(name, requires_grad=False, **hparams):
    pc, pr, rc, rr = inputs(requires_grad)
    nll = t([1.0, 2.0, 3.0], requires_grad)
    if not PAIRWISE_LOSSES[name].needs_reference:  # reference-free losses take averaged logps
        pc, pr = t(AVG_CHOSEN, requires_grad), t(AVG_REJECTED, requires_grad)
    out = pairwise_loss(
        name,
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
        chosen_nll=nll,
        **hparams,
    )
    return out, (pc, pr, nll)


def test_registry_names_and_flags():
    assert set(PAIRWISE_LOSSES) == {
        "dpo", "cdpo", "ipo", "robust", "hinge", "slic", "gpo_logistic", "gpo_exponential",
        "gpo_squared", "gpo_truncated_quadratic", "gpo_savage", "gpo_hinge", "discopop", "simpo",
        "orpo", "rpo",
    }  # fmt: skip
    for name in ("simpo", "orpo"):
        assert not PAIRWISE_LOSSES[name].needs_reference
        assert PAIRWISE_LOSSES[name].length_normalized
    assert PAIRWISE_LOSSES["ipo"].length_normalized and PAIRWISE_LOSSES["ipo"].needs_reference
    assert {n for n, s in PAIRWISE_LOSSES.items() if s.needs_chosen_nll} == {"orpo", "slic", "rpo"}


def test_registry_dispatch_values():
    (losses, _, _), _ = call("dpo", beta=0.1)
    close(losses, [-log_sigmoid(0.1 * h) for h in H])
    (losses, _, _), _ = call("rpo", beta=0.1, alpha=0.5)
    close(losses, [-log_sigmoid(0.1 * h) + 0.5 * n for h, n in zip(H, [1.0, 2.0, 3.0])])
    (losses, _, _), _ = call("slic", beta=1.0)  # alpha defaults to 1
    close(losses, [0.0 + 1.0, 0.5 + 2.0, 2.5 + 3.0])
    (losses, _, _), _ = call("gpo_savage", beta=2.0)
    close(losses, [1 / (1 + math.exp(2.0 * h)) ** 2 for h in H])
    (losses, _, _), _ = call("simpo", beta=2.0, gamma=1.0)
    close(losses, [-log_sigmoid(x) for x in (-0.4, -1.2, 1.6)])


def test_registry_errors():
    with pytest.raises(ValueError, match="valid names: cdpo, discopop, dpo"):
        pairwise_loss("dpo2", policy_chosen_logps=t(PC), policy_rejected_logps=t(PR))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        pairwise_loss("dpo", policy_chosen_logps=t(PC), policy_rejected_logps=t(PR))
    with pytest.raises(ValueError, match="chosen_nll"):
        pairwise_loss("orpo", policy_chosen_logps=t(PC), policy_rejected_logps=t(PR))
    with pytest.raises(ValueError, match="unknown \\['tau'\\]"):
        call("dpo", tau=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        call("cdpo", beta=0.1)
    # a reference-free loss needs no reference
    pairwise_loss("simpo", policy_chosen_logps=t(PC), policy_rejected_logps=t(PR))


@pytest.mark.parametrize("name", sorted(PAIRWISE_LOSSES))
def test_gradients_flow_and_rewards_are_detached(name):
    hparams = {"label_smoothing": 0.1} if name == "cdpo" else {}
    (losses, chosen_rewards, rejected_rewards), (pc, pr, nll) = call(name, True, **hparams)
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (3,)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.mean().backward()
    for grad in (pc.grad, pr.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    if PAIRWISE_LOSSES[name].needs_chosen_nll:
        assert nll.grad is not None and torch.isfinite(nll.grad).all()


def test_kto_gradients_flow_and_rewards_are_detached():
    policy = t([-1.0, -2.0, -3.0], requires_grad=True)
    losses, rewards = kto_loss(policy, t(RC), torch.tensor([True, False, True]), t(0.1))
    losses.sum().backward()
    assert torch.isfinite(policy.grad).all() and (policy.grad != 0).all()
    assert not rewards.requires_grad
