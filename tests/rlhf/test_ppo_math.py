"""Hand-computed checks of rlhf/ppo_math.py. Expected values are written out as plain arithmetic."""

import math

import pytest
import torch

from rlhf.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    clip_and_normalize_score,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    kl_estimate,
    masked_aggregate,
    masked_mean,
    masked_moments,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
    whiten_with_moments,
)

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=D), torch.as_tensor(expected, dtype=D),
                               rtol=tol, atol=tol)


# --------------------------------------------------------------------------- masked statistics

def test_masked_sum_mean_var():
    x = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    close(masked_sum(x, mask), 1 + 2 + 3 + 4 + 5)
    close(masked_mean(x, mask), 15 / 5)
    close(masked_mean(x, mask, dim=1), [(1 + 2 + 3) / 3, (4 + 5) / 2])
    # deviations from 3: -2, -1, 0, 1, 2 -> squares sum to 10
    close(masked_var(x, mask, unbiased=False), 10 / 5)
    close(masked_var(x, mask), 10 / 4)
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty mask -> 0, not NaN
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_masked_whiten_ignores_padding():
    x = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    out = masked_whiten(x, mask)
    # mean 3, unbiased var (4+1+0+1+4)/4 = 2.5
    s = math.sqrt(2.5 + 1e-8)
    close(out, [[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]])
    close(masked_mean(out, mask), 0.0)
    close(masked_var(out, mask), 1.0, tol=1e-7)
    # shift_mean=False keeps the mean: (x - 3) / s + 3
    close(masked_whiten(x, mask, shift_mean=False),
          [[-2 / s + 3, -1 / s + 3, 0 / s + 3, 0.0], [1 / s + 3, 2 / s + 3, 0.0, 0.0]])


def test_global_moments_match_single_batch_whiten():
    x = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 99.0, 99.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    m0 = masked_moments(x[:1], mask[:1])
    m1 = masked_moments(x[1:], mask[1:])
    close(torch.stack(m0), [1 + 2 + 3, 1 + 4 + 9, 3])  # sum, sum of squares, count
    close(torch.stack(m1), [4 + 5, 16 + 25, 2])
    total = torch.stack(m0) + torch.stack(m1)  # what an all-reduce SUM would give
    halves = [whiten_with_moments(x[i:i + 1], mask[i:i + 1], *total) for i in range(2)]
    close(torch.cat(halves), masked_whiten(x, mask))


# --------------------------------------------------------------------------- KL and rewards

def test_kl_estimators():
    logp = t([[-1.0, -2.0, -0.3]])
    ref = t([[-1.5, -1.0, -0.3]])
    # logr = ref - logp = [-0.5, 1.0, 0.0]
    close(kl_estimate(logp, ref, "k1"), [[0.5, -1.0, 0.0]])
    close(kl_estimate(logp, ref, "k2"), [[0.5 * 0.25, 0.5 * 1.0, 0.0]])
    k3 = kl_estimate(logp, ref, "k3")
    close(k3, [[(math.exp(-0.5) - 1) + 0.5, (math.e - 1) - 1.0, 0.0]])
    assert (k3 >= 0).all()
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_compute_rewards_score_on_last_real_token():
    logp = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ref = t([[-1.5, -1.0, -0.5], [-1.0, -2.0, -7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1 has 2 tokens, then padding
    scores = t([2.0, 3.0])
    rewards, kl, non_score = compute_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # k1 = logp - ref: row0 [0.5, 0, -0.5]; row1 [-1, 0, (pad -> 0)]
    close(kl, [[0.5, 0.0, -0.5], [-1.0, 0.0, 0.0]])
    close(non_score, [[-0.05, 0.0, 0.05], [0.1, 0.0, 0.0]])
    # score lands on index 2 for row 0 and index 1 for row 1
    close(rewards, [[-0.05, 0.0, 0.05 + 2.0], [0.1, 0.0 + 3.0, 0.0]])


def test_compute_rewards_missing_eos_penalty():
    logp = t([[-1.0, -1.0], [-1.0, -1.0]])
    mask = t([[1, 1], [1, 0]])
    scores = t([2.0, 3.0])
    eos = torch.tensor([True, False])
    rewards, _, _ = compute_rewards(scores, logp, logp, mask, 0.1, ended_with_eos=eos, missing_eos_penalty=1.0)
    # kl = 0; row 1 did not end with EOS: 3.0 - 1.0 = 2.0
    close(rewards, [[0.0, 2.0], [2.0, 0.0]])
    with pytest.raises(ValueError):
        compute_rewards(scores, logp, logp, mask, 0.1, missing_eos_penalty=1.0)


def test_compute_rewards_k3():
    logp = t([[-1.0]])
    ref = t([[0.0]])
    rewards, kl, _ = compute_rewards(t([0.5]), logp, ref, t([[1]]), kl_coef=0.2, kl_estimator="k3")
    # logr = 1: k3 = (e - 1) - 1
    close(kl, [[math.e - 2]])
    close(rewards, [[-0.2 * (math.e - 2) + 0.5]])


def test_clip_and_normalize_score():
    # (s - 1) / 2 = [0, 2, -4] -> clipped to [-2, 2]
    close(clip_and_normalize_score(t([1.0, 5.0, -7.0]), mean=1.0, std=2.0, clip=2.0), [0.0, 2.0, -2.0])
    close(clip_and_normalize_score(t([1.0, 5.0])), [1.0, 5.0])


def test_kl_controllers():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # 9/6 - 1 = 0.5 -> clipped to 0.2; mult = 1 + 0.2 * 256 / 10000 = 1.00512
    close(ctl.update(9.0, 256), 0.2 * 1.00512)
    # 6.6/6 - 1 = 0.1 (inside the clip); mult = 1 + 0.1 * 1000 / 10000 = 1.01
    close(ctl.update(6.6, 1000), 0.2 * 1.00512 * 1.01)
    # 0/6 - 1 = -1 -> -0.2; mult = 1 - 0.2 * 500 / 10000 = 0.99
    ctl.update(0.0, 500)
    close(ctl.value, 0.2 * 1.00512 * 1.01 * 0.99)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05


# --------------------------------------------------------------------------- GAE

def test_gae_gamma_1():
    values = t([[0.5, 1.0, 2.0]])
    rewards = t([[0.0, 0.0, 1.0]])
    adv, ret = compute_gae(values, rewards, t([[1, 1, 1]]), gamma=1.0, lam=0.95)
    d2 = 1.0 + 1.0 * 0.0 - 2.0  # bootstrap after the last token is 0
    a2 = d2  # -1.0
    d1 = 0.0 + 1.0 * 2.0 - 1.0
    a1 = d1 + 1.0 * 0.95 * a2  # 0.05
    d0 = 0.0 + 1.0 * 1.0 - 0.5
    a0 = d0 + 1.0 * 0.95 * a1  # 0.5475
    close(adv, [[a0, a1, a2]])
    close(ret, [[a0 + 0.5, a1 + 1.0, a2 + 2.0]])  # [1.0475, 1.05, 1.0]


def test_gae_gamma_09_with_padded_row():
    values = t([[0.5, 1.0, 2.0], [1.0, 0.5, 9.9]])  # 9.9 and 5.0 are padding garbage
    rewards = t([[0.0, 0.0, 1.0], [0.2, 0.7, 5.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = compute_gae(values, rewards, mask, gamma=0.9, lam=0.95)
    g, gl = 0.9, 0.9 * 0.95
    # row 0
    a02 = 1.0 + g * 0.0 - 2.0  # -1.0
    a01 = (0.0 + g * 2.0 - 1.0) + gl * a02  # 0.8 - 0.855 = -0.055
    a00 = (0.0 + g * 1.0 - 0.5) + gl * a01  # 0.4 - 0.047025 = 0.352975
    # row 1: episode ends at index 1, so its bootstrap is 0, not the garbage 9.9
    a11 = 0.7 + g * 0.0 - 0.5  # 0.2
    a10 = (0.2 + g * 0.5 - 1.0) + gl * a11  # -0.35 + 0.171 = -0.179
    close(adv, [[a00, a01, a02], [a10, a11, 0.0]])
    close(ret, [[a00 + 0.5, a01 + 1.0, a02 + 2.0], [a10 + 1.0, a11 + 0.5, 0.0]])


# --------------------------------------------------------------------------- policy / value losses

# 5 real tokens over 2 rows + 1 pad. ratios 1.5, 0.5, 1.5 | 0.5, 1.1 | pad; clip 0.2.
RATIOS = [[1.5, 0.5, 1.5], [0.5, 1.1, 3.0]]
ADV = [[1.0, 1.0, -1.0], [-1.0, 2.0, 5.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
# per token max(-A r, -A clip(r)):
#   r=1.5 A=1 : max(-1.5, -1.2) = -1.2  clipped
#   r=0.5 A=1 : max(-0.5, -0.8) = -0.5
#   r=1.5 A=-1: max( 1.5,  1.2) =  1.5
#   r=0.5 A=-1: max( 0.5,  0.8) =  0.8  clipped
#   r=1.1 A=2 : max(-2.2, -2.2) = -2.2
PER_TOKEN = [[-1.2, -0.5, 1.5], [0.8, -2.2]]


def _policy_inputs():
    logp = torch.log(t(RATIOS)).requires_grad_(True)
    return logp, torch.zeros(2, 3, dtype=D), t(ADV), t(MASK)


def test_policy_loss_clipping_and_stats():
    logp, old, adv, mask = _policy_inputs()
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
    close(loss, (-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5)  # -0.32
    close(stats["clipfrac"], 2 / 5)
    close(stats["ratio"], (1.5 + 0.5 + 1.5 + 0.5 + 1.1) / 5)
    lr = [math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5), math.log(1.1)]
    close(stats["approx_kl"], 0.5 * sum(v * v for v in lr) / 5)
    # d loss / d logp = -A * r / 5 where unclipped, 0 where clipping is active or padded
    loss.backward()
    close(logp.grad, [[0.0, -1 * 0.5 / 5, 1 * 1.5 / 5], [0.0, -2 * 1.1 / 5, 0.0]])


def test_policy_loss_sequence_aggregation():
    logp, old, adv, mask = _policy_inputs()
    loss, _ = policy_loss(logp, old, adv, mask, aggregation="sequence")
    close(loss, ((-1.2 - 0.5 + 1.5) / 3 + (0.8 - 2.2) / 2) / 2)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, aggregation="sequence", num_tokens=5)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, aggregation="bogus")


def test_num_tokens_micro_batches_sum_to_global_token_mean():
    logp, old, adv, mask = _policy_inputs()
    full, _ = policy_loss(logp, old, adv, mask)
    num_tokens = 5  # global count over both micro-batches
    parts = [policy_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], num_tokens=num_tokens)[0]
             for i in range(2)]
    close(parts[0], (-1.2 - 0.5 + 1.5) / 5)
    close(parts[1], (0.8 - 2.2) / 5)
    close(parts[0] + parts[1], full)
    # the naive mean of micro-batch means is different: (-0.2/3 + -1.4/2) / 2 != -0.32
    with torch.no_grad():
        halves = [policy_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1])[0] for i in range(2)]
        naive = (halves[0] + halves[1]) / 2
    assert abs(naive.item() - full.item()) > 1e-3
    # sequence mode: per-row means summed over micro-batches / global number of sequences
    seq = [policy_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1],
                       aggregation="sequence", num_sequences=2)[0] for i in range(2)]
    close(seq[0] + seq[1], policy_loss(logp, old, adv, mask, aggregation="sequence")[0])


def test_value_loss_clipped():
    values = t([[1.5, 1.5], [0.1, 7.0]])
    old = t([[1.0, 1.0], [0.0, 0.0]])
    returns = t([[2.0, 1.0], [1.0, -3.0]])
    mask = t([[1, 1], [1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    # t0: v_clip = 1.0 + 0.2 = 1.2: max((1.5-2)^2, (1.2-2)^2) = max(0.25, 0.64) = 0.64  clipped
    # t1: v_clip = 1.2:            max((1.5-1)^2, (1.2-1)^2) = max(0.25, 0.04) = 0.25
    # t2: v_clip = 0.1 (inside):   (0.1-1)^2 = 0.81
    close(loss, 0.5 * (0.64 + 0.25 + 0.81) / 3)
    close(stats["vf_clipfrac"], 1 / 3)
    # no clipping: 0.5 * (0.25 + 0.25 + 0.81) / 3
    close(value_loss(values, old, returns, mask, clip_range_value=None)[0], 0.5 * (0.25 + 0.25 + 0.81) / 3)
    # micro-batches with the global token count sum to the full loss
    parts = [value_loss(values[i:i + 1], old[i:i + 1], returns[i:i + 1], mask[i:i + 1], num_tokens=3)[0]
             for i in range(2)]
    close(parts[0], 0.5 * (0.64 + 0.25) / 3)
    close(parts[0] + parts[1], loss)


def test_entropy_from_logits():
    close(entropy_from_logits(torch.zeros(2, 3, 7, dtype=D)), torch.full((2, 3), math.log(7), dtype=D))
    # logits [0, log 3] -> p = [0.25, 0.75]
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(entropy_from_logits(t([[[0.0, math.log(3)]]])), [[h]])
    close(entropy_from_logits(t([[[1000.0, 1000.0 + math.log(3)]]])), [[h]])  # stable for big logits
    # entropy bonus aggregated over a micro-batch with the global count, like the losses
    ent = entropy_from_logits(torch.zeros(1, 2, 4, dtype=D))
    close(masked_aggregate(ent, t([[1, 0]]), num_tokens=4), math.log(4) / 4)


def test_explained_variance():
    returns = t([[1.0, 2.0], [3.0, 4.0], [50.0, 0.0]])
    values = t([[1.0, 2.0], [3.0, 5.0], [-9.0, 0.0]])
    mask = t([[1, 1], [1, 1], [0, 0]])
    # errors [0, 0, 0, -1]: var = 1/4 - (1/4)^2 = 0.1875; var(returns [1..4]) = 1.25
    close(explained_variance(values, returns, mask), 1 - 0.1875 / 1.25)  # 0.85
    close(explained_variance(returns, returns, mask), 1.0)
    assert torch.isnan(explained_variance(values, torch.ones(3, 2, dtype=D), mask))
