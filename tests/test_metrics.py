"""align.metrics.Means, the one metric reducer: hand-computed global means and sums."""

import pytest
import torch

from align.metrics import Means


def _two_ranks(per_rank):
    """all_reduce_sum over two simulated ranks: each rank's stacked local sums, added."""
    stacks = []

    def reducer(t):
        stacks.append(t)
        return t

    for means in per_rank:
        means.reduce(reducer)
    total = stacks[0] + stacks[1]
    return per_rank[0].reduce(lambda t: total)


def test_weighted_means_over_micro_batches():
    m = Means()
    m.add("loss", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]))  # 1 + 6 over weight 4
    m.add("loss", torch.tensor([4.0]), torch.tensor([2.0]))            # + 8 over weight 2
    m.add("acc", torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))   # no weight: left out
    m.add_total("tokens", torch.tensor(7))
    m.add_total("tokens", 5)
    out = m.reduce(lambda t: t)
    assert out == {"loss": pytest.approx(15.0 / 6.0, rel=1e-7), "tokens": 12.0}


def test_means_of_two_ranks_are_global_means_not_means_of_means():
    a, b = Means(torch.float64), Means(torch.float64)
    a.add("x", torch.tensor([1.0]), torch.tensor([1.0]))
    b.add("x", torch.tensor([2.0, 4.0, 6.0]), torch.tensor([1.0, 1.0, 1.0]))
    a.add_sums("loss", torch.tensor(3.0), torch.tensor(2.0))
    b.add_sums("loss", torch.tensor(1.0), torch.tensor(2.0))
    a.add_total("n", 1)
    b.add_total("n", 3)
    out = _two_ranks([a, b])
    assert out["x"] == 13.0 / 4.0  # not (1 + 4) / 2
    assert out["loss"] == 1.0 and out["n"] == 4.0


def test_float64_accumulation_keeps_small_differences():
    m = Means(torch.float64)
    m.add("r", torch.tensor([1e8, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0]))
    assert m.reduce(lambda t: t)["r"] == (1e8 + 1.0) / 2  # float32 would round 1e8 + 1 to 1e8


def test_nothing_added_reduces_to_nothing():
    calls = []
    assert Means().reduce(lambda t: calls.append(t) or t) == {} and not calls
