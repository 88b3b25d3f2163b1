"""rlhf/policy_loss.py: aggregations (same gradient however the batch is split), asymmetric
clipping, the KL as a loss term or in the reward. Expected values are written out by hand."""

import math

import pytest
import torch

from rlhf.policy_loss import AGGREGATIONS, aggregate, clipped_policy_loss, kl_loss, local_count, score_rewards
from rlhf.ppo_math import policy_loss

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=D), torch.as_tensor(expected, dtype=D),
                               rtol=tol, atol=tol)


# --------------------------------------------------------------------------- aggregation


def test_aggregations_by_hand():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])  # the last row is empty: counts nowhere
    close(local_count(mask, "token_mean"), 5)
    close(local_count(mask, "seq_mean_token_sum"), 2)
    close(local_count(mask, "seq_mean_token_mean"), 2)
    close(aggregate(x, mask, "token_mean"), (1 + 2 + 3 + 4 + 5) / 5)
    close(aggregate(x, mask, "seq_mean_token_sum"), (6 + 9) / 2)
    close(aggregate(x, mask, "seq_mean_token_mean"), (6 / 3 + 9 / 2) / 2)
    # a global normaliser: this batch is one share of a larger one
    close(aggregate(x, mask, "token_mean", normalizer=10), 15 / 10)
    close(aggregate(x, mask, "seq_mean_token_mean", normalizer=4), (2 + 4.5) / 4)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(x, mask, "token")


def linear_policy_batch(seed=0, B=8, T=5, d=4, V=6):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, T, d, generator=g, dtype=D)
    tokens = torch.randint(V, (B, T), generator=g)
    lengths = [5, 1, 3, 2, 5, 4, 1, 2]  # unequal on purpose: per-micro-batch means would differ
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    weight0 = torch.randn(d, V, generator=g, dtype=D)
    with torch.no_grad():
        lp0 = torch.log_softmax(feats @ weight0, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    old = lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=D)  # ratios away from 1: some clipping
    ref = lp0 + 0.2 * torch.randn(B, T, generator=g, dtype=D)
    adv = torch.randn(B, T, generator=g, dtype=D)
    return feats, tokens, mask, weight0, old, ref, adv


def loss_of(weight, feats, tokens, mask, old, ref, adv, rows, aggregation, normalizer):
    """The policy loss + k3 KL loss of `rows` under a linear 'policy' logits = feats @ weight."""
    lp = torch.log_softmax(feats[rows] @ weight, -1).gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1)
    loss, _ = clipped_policy_loss(lp, old[rows], adv[rows], mask[rows], 0.2, 0.28, aggregation, normalizer)
    kl, _ = kl_loss(lp, ref[rows], mask[rows], 0.1, aggregation, normalizer)
    return loss + kl


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_same_gradient_one_micro_batch_four_micro_batches_two_ranks(aggregation):
    feats, tokens, mask, weight0, old, ref, adv = linear_policy_batch()
    args = (feats, tokens, mask, old, ref, adv)
    every = list(range(8))
    global_n = local_count(mask, aggregation)  # all-reduced over micro-batches and ranks

    def grad(parts, normalizer, scale=1.0):
        weight = weight0.clone().requires_grad_(True)
        for rows in parts:  # gradient accumulation: backward adds into .grad
            (loss_of(weight, *args, rows, aggregation, normalizer) * scale).backward()
        return weight.grad

    one = grad([every], None)  # the whole batch at once, its own count
    four = grad([every[i:i + 2] for i in range(0, 8, 2)], global_n)
    # 2 ranks x 2 micro-batches. DeepSpeed divides each backward by the accumulation steps (gas)
    # and all-reduce AVERAGES gradients over ranks; the recipe multiplies each loss by
    # world * gas (align.engine.deepspeed_engine.loss_scale). Simulated: each rank's accumulated
    # grad with loss * world * gas / gas, then the mean over ranks.
    world, gas = 2, 2
    ranks = [grad([every[r * 4 + i:r * 4 + i + 2] for i in (0, 2)], global_n, scale=world * gas / gas)
             for r in range(world)]
    two_ranks = (ranks[0] + ranks[1]) / world
    close(four, one, tol=1e-12)
    close(two_ranks, one, tol=1e-12)
    assert one.abs().sum() > 0
    if aggregation == "token_mean":
        # the bug class this guards against: each micro-batch's own token mean, averaged
        naive = grad([every[i:i + 2] for i in range(0, 8, 2)], None, scale=1 / 4)
        assert not torch.allclose(naive, one)


# --------------------------------------------------------------------------- clipping


def test_asymmetric_clipping_by_hand():
    # ratios 1.25, 1.4, 0.7, 0.9 with advantages +1, +1, -1, -2
    ratios, adv = t([[1.25, 1.4, 0.7, 0.9]]), t([[1.0, 1.0, -1.0, -2.0]])
    old = t([[-1.0, -2.0, -0.5, -1.5]])
    mask = torch.ones(1, 4)

    def run(clip_high):
        logp = (old + torch.log(ratios)).requires_grad_(True)
        loss, stats = clipped_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=clip_high)
        loss.backward()
        return loss, stats, logp.grad

    # symmetric 0.2: max(-1.25, -1.2) = -1.2 | max(-1.4, -1.2) = -1.2 | max(0.7, 0.8) = 0.8 | 1.8
    loss, stats, grad = run(None)
    close(loss, (-1.2 - 1.2 + 0.8 + 1.8) / 4)
    close(stats["clipfrac"], 3 / 4)
    close(grad, [[0.0, 0.0, 0.0, 2 * 0.9 / 4]])  # d(-A r)/dlogp = -A r, only where unclipped
    # clip_high 0.28 (DAPO): 1.25 is inside [0.8, 1.28]: -1.25, with gradient; 1.4 -> -1.28
    loss, stats, grad = run(0.28)
    close(loss, (-1.25 - 1.28 + 0.8 + 1.8) / 4)
    close(stats["clipfrac"], 2 / 4)
    close(grad, [[-1.25 / 4, 0.0, 0.0, 2 * 0.9 / 4]])
    close(stats["ratio"], (1.25 + 1.4 + 0.7 + 0.9) / 4)


def test_ppo_math_policy_loss_takes_clip_high():
    ratios, adv, old = t([[1.25, 1.4, 0.7, 0.9]]), t([[1.0, 1.0, -1.0, -2.0]]), t([[-1.0, -2.0, -0.5, -1.5]])
    logp, mask = old + torch.log(ratios), torch.ones(1, 4)
    loss, _ = policy_loss(logp, old, adv, mask, clip_range=0.2, clip_range_high=0.28)
    close(loss, (-1.25 - 1.28 + 0.8 + 1.8) / 4)
    loss, _ = policy_loss(logp, old, adv, mask, clip_range=0.2)
    close(loss, (-1.2 - 1.2 + 0.8 + 1.8) / 4)


# --------------------------------------------------------------------------- KL


def test_kl_loss_k3_by_hand():
    lp = t([[math.log(0.5), math.log(0.25)]]).requires_grad_(True)
    ref = t([[math.log(0.25), math.log(0.25)]])
    loss, mean_kl = kl_loss(lp, ref, torch.ones(1, 2), kl_coef=0.1)
    # k3 = pi_ref/pi - log(pi_ref/pi) - 1: 0.5 - log 0.5 - 1 = 0.193147...; 0 on the second token
    k3 = 0.5 - math.log(0.5) - 1
    close(mean_kl, k3 / 2)
    close(loss, 0.1 * k3 / 2)
    loss.backward()
    # d k3 / d logp = 1 - pi_ref/pi = 1 - 0.5, times coef / N = 0.1 / 2
    close(lp.grad, [[0.5 * 0.05, 0.0]])


def test_score_rewards_by_kl_mode():
    scores = t([1.0, 2.0])
    lp, ref = t([[-1.0, -2.0], [-1.0, -1.0]]), t([[-1.5, -2.0], [-1.0, -3.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # k1 = logp - logp_ref: 0.5, 0 | 0, (2 on padding -> 0)
    rewards, kl = score_rewards(scores, lp, ref, mask, "reward", kl_coef=0.1)
    close(rewards, [[-0.05, 0.0 + 1.0], [2.0, 0.0]])
    close(kl, [[0.5, 0.0], [0.0, 0.0]])
    for mode in ("loss", "off"):
        rewards, kl = score_rewards(scores, lp, ref, mask, mode, kl_coef=0.1)
        close(rewards, [[0.0, 1.0], [2.0, 0.0]])
        close(kl, [[0.5, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="kl_mode"):
        score_rewards(scores, lp, ref, mask, "both")
