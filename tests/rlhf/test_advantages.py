"""Hand-computed checks of rlhf/advantages.py. Expected values are written out as plain arithmetic."""

import math

import pytest
import torch

from rlhf.advantages import (
    ADVANTAGE_ESTIMATORS,
    discounted_returns,
    dr_grpo,
    dynamic_sampling_filter,
    gae,
    group_stats,
    grpo,
    reinforce_pp,
    rloo,
)
from rlhf.policy_loss import AGGREGATIONS
from rlhf.ppo_math import compute_gae, masked_moments

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=D), torch.as_tensor(expected, dtype=D),
                               rtol=tol, atol=tol)


# Two prompts, K = 3 samples each (prompt-major rows); row lengths 3, 2, 1, 3, 3, 2.
SCORES = t([1.0, 0.0, 0.0, 1.0, 2.0, 3.0])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]])


def per_token(per_sequence):
    """What every estimator returns: the sequence's value on each real token, 0 on padding."""
    return [[v * m for m in row] for v, row in zip(per_sequence, MASK.tolist())]


def test_group_stats():
    mean, std, size = group_stats(SCORES, 3)
    close(mean, [1 / 3] * 3 + [2.0] * 3)
    # group 1: deviations 2/3, -1/3, -1/3 -> squares 6/9, / (3 - 1) = 1/3; group 2: 1, 0, 1 -> 2 / 2 = 1
    close(std, [math.sqrt(1 / 3)] * 3 + [1.0] * 3)
    close(size, [3.0] * 6)


def test_grpo_by_hand():
    eps = 1e-6
    s1 = math.sqrt(1 / 3)
    expected = [(2 / 3) / (s1 + eps), (-1 / 3) / (s1 + eps), (-1 / 3) / (s1 + eps),
                -1 / (1 + eps), 0.0, 1 / (1 + eps)]
    adv, ret = grpo(SCORES, MASK, 3, eps=eps)
    close(adv, per_token(expected))
    close(ret, adv)


def test_grpo_equal_rewards_and_single_sample_give_zero():
    adv, _ = grpo(t([0.5, 0.5, 0.5, 4.0]), torch.ones(4, 2), torch.tensor([0, 0, 0, 1]))
    close(adv, torch.zeros(4, 2))  # all-equal group: 0 / (0 + eps); a group of one: its own mean


def test_dr_grpo_by_hand():
    adv, ret = dr_grpo(SCORES, MASK, 3)
    close(adv, per_token([2 / 3, -1 / 3, -1 / 3, -1.0, 0.0, 1.0]))
    close(ret, adv)


def test_rloo_by_hand():
    # r_i - mean of the other two: 1 - (0 + 0)/2, 0 - (1 + 0)/2, ...; 1 - (2 + 3)/2, 2 - (1 + 3)/2, 3 - (1 + 2)/2
    adv, _ = rloo(SCORES, MASK, 3)
    close(adv, per_token([1.0, -0.5, -0.5, -1.5, 0.0, 1.5]))


def test_group_ids_in_any_order():
    scores, ids, mask = t([1.0, 2.0, 3.0, 6.0]), torch.tensor([7, 3, 7, 3]), torch.ones(4, 1)
    # group 7 = rows 0, 2: {1, 3}, mean 2; group 3 = rows 1, 3: {2, 6}, mean 4
    close(dr_grpo(scores, mask, ids)[0], [[-1.0], [-2.0], [1.0], [2.0]])
    # K = 2: r minus the other one: 1 - 3, 2 - 6, 3 - 1, 6 - 2
    close(rloo(scores, mask, ids)[0], [[-2.0], [-4.0], [2.0], [4.0]])
    # contiguous ids give the same as an int K
    close(grpo(SCORES, MASK, torch.tensor([0, 0, 0, 1, 1, 1]))[0], grpo(SCORES, MASK, 3)[0])


def test_group_errors():
    with pytest.raises(ValueError, match="at least 2"):
        rloo(t([1.0, 2.0, 3.0]), torch.ones(3, 1), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="divide"):
        grpo(SCORES, MASK, 4)
    with pytest.raises(ValueError, match="shape"):
        grpo(SCORES, MASK, torch.tensor([0, 1]))


def test_gae_is_todays_compute_gae():
    # delta_1 = 1 + 0 - 0.2 = 0.8; delta_0 = 0 + 0.2 - 0.5 = -0.3; A_1 = 0.8; A_0 = -0.3 + 0.5 * 0.8 = 0.1
    adv, ret = gae(t([[0.5, 0.2, 9.0]]), t([[0.0, 1.0, 9.0]]), torch.tensor([[1, 1, 0]]), gamma=1.0, lam=0.5)
    close(adv, [[0.1, 0.8, 0.0]])
    close(ret, [[0.6, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    values, rewards = torch.randn(3, 5, generator=g, dtype=D), torch.randn(3, 5, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    for a, b in zip(gae(values, rewards, mask, 0.9, 0.8), compute_gae(values, rewards, mask, 0.9, 0.8)):
        assert torch.equal(a, b)


REWARDS = t([[-0.1, -0.2, 1.0], [0.3, 0.5, 9.0]])  # 9.0 sits on padding and must not count
RMASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_discounted_returns_by_hand():
    close(discounted_returns(REWARDS, RMASK, 1.0), [[0.7, 0.8, 1.0], [0.8, 0.5, 0.0]])
    # gamma 0.5: 1.0; -0.2 + 0.5 * 1.0 = 0.3; -0.1 + 0.5 * 0.3 = 0.05 | 0.5; 0.3 + 0.5 * 0.5 = 0.55
    close(discounted_returns(REWARDS, RMASK, 0.5), [[0.05, 0.3, 1.0], [0.55, 0.5, 0.0]])


def test_reinforce_pp_by_hand():
    adv, ret = reinforce_pp(REWARDS, RMASK, gamma=1.0)
    close(ret, [[0.7, 0.8, 1.0], [0.8, 0.5, 0.0]])
    # mean of the 5 real returns 3.8 / 5 = 0.76; deviations -0.06, 0.04, 0.24, 0.04, -0.26;
    # squares sum to 0.132; unbiased variance 0.132 / 4 = 0.033
    s = math.sqrt(0.033 + 1e-8)
    close(adv, [[-0.06 / s, 0.04 / s, 0.24 / s], [0.04 / s, -0.26 / s, 0.0]], tol=1e-7)


def test_reinforce_pp_global_moments_across_two_ranks():
    """Each 'rank' holds one row; `reduce` stands for the all-reduce SUM of the (3,) moments."""
    shards = [(REWARDS[i:i + 1], RMASK[i:i + 1]) for i in range(2)]
    moments = [torch.stack(masked_moments(discounted_returns(r, m), m)) for r, m in shards]
    total = moments[0] + moments[1]
    per_rank = [reinforce_pp(r, m, reduce=lambda s, i=i: s + moments[1 - i])[0] for i, (r, m) in enumerate(shards)]
    close(torch.cat(per_rank), reinforce_pp(REWARDS, RMASK)[0])
    close(total, [3.8, 0.49 + 0.64 + 1.0 + 0.64 + 0.25, 5])
    # without the reduce each rank whitens alone, which is a different (wrong) answer
    alone = torch.cat([reinforce_pp(r, m)[0] for r, m in shards])
    assert not torch.allclose(alone, reinforce_pp(REWARDS, RMASK)[0])


def test_dynamic_sampling_by_hand():
    scores = t([1, 1, 1, 0, 1, 0, 2, 2, 2, 0.5, 0.5, 0.7])
    kept, dropped = dynamic_sampling_filter(scores, 3)
    assert kept.tolist() == [3, 4, 5, 9, 10, 11] and dropped == 2
    kept, dropped = dynamic_sampling_filter(t([5, 1, 5, 2]), torch.tensor([1, 0, 1, 0]))
    assert kept.tolist() == [1, 3] and dropped == 1
    kept, dropped = dynamic_sampling_filter(scores, 3, tol=0.25)  # 0.7 - 0.5 <= 0.25: dropped too
    assert kept.tolist() == [3, 4, 5] and dropped == 3


def test_registry_capabilities():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"}
    assert [n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_value_model] == ["gae"]
    assert {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs_groups} == {"grpo", "dr_grpo", "rloo"}
    assert {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.token_rewards} == {"gae", "reinforce_pp"}
    assert ADVANTAGE_ESTIMATORS["dr_grpo"].aggregation == "seq_mean_token_sum"
    assert ADVANTAGE_ESTIMATORS["grpo"].fn is grpo
    for e in ADVANTAGE_ESTIMATORS.values():
        assert e.aggregation in AGGREGATIONS and e.paper.startswith("arXiv ")
