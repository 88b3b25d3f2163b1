"""Hand-computed checks of reward_model/loss.py. Expected values are written out as plain arithmetic."""

import math

import pytest
import torch

from reward_model.loss import (
    bradley_terry_loss,
    expand_ranking,
    normalize_rewards,
    ranking_pair_weights,
    reward_stats,
)

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=D), torch.as_tensor(expected, dtype=D),
                               rtol=tol, atol=tol)


CHOSEN = [2.0, 0.0]
REJECTED = [1.0, 1.0]  # differences: +1, -1


def test_bt_loss_value_and_accuracy():
    losses, acc = bradley_terry_loss(t(CHOSEN), t(REJECTED))
    # -log sigmoid(d) = log(1 + exp(-d))
    close(losses, [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0))])
    close(acc, [1.0, 0.0])


def test_bt_loss_gradient():
    c = t(CHOSEN).requires_grad_(True)
    bradley_terry_loss(c, t(REJECTED))[0].sum().backward()
    # d/dc [-log sigmoid(c - r)] = -(1 - sigmoid(d)) = -1 / (1 + exp(d))
    close(c.grad, [-1 / (1 + math.exp(1.0)), -1 / (1 + math.exp(-1.0))])


def test_bt_loss_margin():
    losses, _ = bradley_terry_loss(t(CHOSEN), t(REJECTED), margin=t([0.5, 0.0]))
    # d - m = [0.5, -1]
    close(losses, [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.0))])


def test_bt_loss_centring_and_weights():
    losses, _ = bradley_terry_loss(t(CHOSEN), t(REJECTED), center_coef=0.01)
    # + 0.01 * (rc + rr)^2 = 0.01 * 9, 0.01 * 1
    l0 = math.log(1 + math.exp(-1.0)) + 0.01 * 9
    l1 = math.log(1 + math.exp(1.0)) + 0.01 * 1
    close(losses, [l0, l1])
    weighted, _ = bradley_terry_loss(t(CHOSEN), t(REJECTED), center_coef=0.01, weights=t([0.5, 2.0]))
    close(weighted, [0.5 * l0, 2.0 * l1])


def test_expand_ranking_k3():
    # scores, higher better: best-first order is 1 (0.9), 2 (0.5), 0 (0.1)
    assert expand_ranking([0.1, 0.9, 0.5]) == [(1, 2), (1, 0), (2, 0)]
    # a list already ordered best-first
    assert expand_ranking(ranks=range(3)) == [(0, 1), (0, 2), (1, 2)]
    # ranks: response 2 best, then 0, then 1
    assert expand_ranking(ranks=[1, 2, 0]) == [(2, 0), (2, 1), (0, 1)]


def test_expand_ranking_k4():
    pairs = expand_ranking([4.0, 3.0, 2.0, 1.0])
    assert len(pairs) == 4 * 3 // 2 == 6
    assert pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_expand_ranking_errors():
    with pytest.raises(ValueError, match="tie"):
        expand_ranking([1.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="tie"):
        expand_ranking(ranks=[0, 1, 1])
    with pytest.raises(ValueError, match="at least 2"):
        expand_ranking([1.0])
    with pytest.raises(ValueError):
        expand_ranking([1.0, float("nan")])
    with pytest.raises(ValueError):
        expand_ranking([1.0, 2.0], ranks=[0, 1])
    with pytest.raises(ValueError):
        ranking_pair_weights(1)


def test_ranking_pair_weights():
    assert ranking_pair_weights(2) == [1.0]
    close(ranking_pair_weights(3), [1 / 3] * 3)
    close(ranking_pair_weights(4), [1 / 6] * 6)
    # two prompts, K=2 and K=3: sum(w * l) / sum(w) = mean over prompts of per-prompt mean
    w = t(ranking_pair_weights(2) + ranking_pair_weights(3))
    losses = t([1.0, 2.0, 3.0, 4.0])
    close((w * losses).sum() / w.sum(), (1.0 + (2.0 + 3.0 + 4.0) / 3) / 2)


def test_reward_stats():
    s = reward_stats(t(CHOSEN), t(REJECTED))
    close(s["rewards/accuracies"], 0.5)
    close(s["rewards/margins"], ((2 - 1) + (0 - 1)) / 2)
    close(s["rewards/chosen"], 1.0)
    close(s["rewards/rejected"], 1.0)
    close(s["rewards/mean"], (2 + 0 + 1 + 1) / 4)
    close(s["rewards/std"], math.sqrt((1 + 1 + 0 + 0) / 4))


def test_normalize_rewards():
    close(normalize_rewards(t([1.0, 3.0]), mean=2.0, std=0.5, eps=0.0), [-2.0, 2.0])


def test_reward_normalization_is_read_from_the_config():
    from types import SimpleNamespace

    from reward_model.loss import reward_normalization

    assert reward_normalization(SimpleNamespace(reward_mean=0.25, reward_std=2)) == (0.25, 2.0)
    assert reward_normalization(SimpleNamespace()) == (0.0, 1.0)  # not a stage's reward model
    assert reward_normalization(SimpleNamespace(reward_mean=0.25)) == (0.0, 1.0)  # half a pair is none
    assert reward_normalization(SimpleNamespace(reward_mean=None, reward_std=None), default=None) is None
