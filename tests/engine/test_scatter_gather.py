"""ActorGroup.scatter / gather on real Ray actors: rank r gets the r-th contiguous share of the
rows, every share equally long (padded with row 0), and gather returns one result per real row
in the rows' order, whatever the number of ranks."""

import sys

import pytest
from ray import cloudpickle

from align.config import RayConfig
from align.engine.ray_group import ActorGroup, running_alone, split_even


class EchoWorker:
    """Answers each row of its share with (rank, row, tag): who saw what, in which order."""

    def __init__(self):
        import torch.distributed as dist

        self.rank = dist.get_rank()

    def echo(self, rows, tag=""):
        return [(self.rank, row, tag) for row in rows]

    def count(self, rows):
        return len(rows)

    def threads(self):
        import torch

        return torch.get_num_threads()


def test_split_even_pads_to_equal_shares():
    parts, counts = split_even(list("abcde"), 2)
    assert parts == [list("abc"), list("dea")] and counts == [3, 2]
    assert split_even(list("abcd"), 2) == ([list("ab"), list("cd")], [2, 2])
    assert split_even(list("abcdefg"), 3) == ([list("abc"), list("def"), list("gaa")], [3, 3, 1])


@pytest.fixture(scope="module")
def echo_group(ray_session):
    # The worker is defined here, so actors get it by value rather than importing this module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    group = ActorGroup("echo", RayConfig(num_actors=3, cpus_per_actor=0.5))
    try:
        group.setup(EchoWorker)
        yield group
    finally:
        group.shutdown()


def test_scatter_splits_and_gather_restores_order(echo_group):
    rows = list("abcdefg")
    refs, counts = echo_group.scatter("echo", rows, tag="t")
    assert counts == [3, 3, 1]
    # What each rank received, padding included: contiguous shares of 3, the last one padded
    # with copies of row 0.
    assert echo_group.get(refs) == [
        [(0, "a", "t"), (0, "b", "t"), (0, "c", "t")],
        [(1, "d", "t"), (1, "e", "t"), (1, "f", "t")],
        [(2, "g", "t"), (2, "a", "t"), (2, "a", "t")],
    ]
    # gather: one result per real row, in the rows' order, the padding dropped.
    got = echo_group.gather(echo_group.scatter("echo", rows, tag="t"))
    assert got == [(0, "a", "t"), (0, "b", "t"), (0, "c", "t"), (1, "d", "t"), (1, "e", "t"), (1, "f", "t"),
                   (2, "g", "t")]


def test_scatter_fewer_rows_than_ranks(echo_group):
    # 2 rows on 3 ranks: shares of 1, rank 2 gets only padding; every rank still runs once.
    refs, counts = echo_group.scatter("count", ["x", "y"])
    assert counts == [1, 1, 0]
    assert echo_group.get(refs) == [1, 1, 1]
    assert echo_group.gather(echo_group.scatter("echo", ["x", "y"])) == [(0, "x", ""), (1, "y", "")]


@pytest.mark.parametrize("elastic", [True, False])
def test_a_group_running_alone_uses_the_cores_the_others_leave_idle(ray_session, elastic):
    """A 0.5-CPU rank trains on 1 thread; alone on its node it takes all the node's cores (here
    the session's Ray CPUs), and gets its own share back after the block."""
    import ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    group = ActorGroup("alone", RayConfig(num_actors=1, cpus_per_actor=0.5, elastic_threads=elastic))
    try:
        group.setup(EchoWorker)
        import os

        node_cpus = min(int(ray.cluster_resources()["CPU"]), len(os.sched_getaffinity(0)))
        assert group.call("threads") == [1]
        with running_alone([group]):
            inside = group.call("threads")
        assert inside == [max(1, node_cpus) if elastic else 1]
        assert group.call("threads") == [1]
    finally:
        group.shutdown()
