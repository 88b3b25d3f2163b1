"""A rank that raises or dies mid-step is reported as a GroupError naming the group, the rank and
the cause, in bounded time, while its peers sit in a collective that would never return; and the
group's actors are gone afterwards."""

import os
import sys
import time

import pytest
import ray
from ray import cloudpickle
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group_table

from align.config import RayConfig
from align.engine.ray_group import ActorGroup, GroupError
from tests.engine.toy_worker import ToyWorker

pytestmark = pytest.mark.slow


def _fail(name, how):
    group = ActorGroup(name, RayConfig(num_actors=2, cpus_per_actor=1.0))
    try:
        # Rank 1 fails at the start of step 2; rank 0 enters the step's all-reduce and waits.
        group.setup(ToyWorker, zero_stage=2, micro_batch_size=4, fail_at=(2, 1, how))
        actors, pg = list(group.actors), group.pg
        start = time.monotonic()
        with pytest.raises(GroupError) as info:
            group.call("train", 3)
        elapsed = time.monotonic() - start
    finally:
        group.kill()
    return info.value, elapsed, actors, pg


def _assert_gone(actors, pg):
    for actor in actors:
        with pytest.raises(RayActorError):
            ray.get(actor.address.remote(), timeout=60)
    assert placement_group_table(pg)["state"] == "REMOVED"


def test_rank_that_raises(ray_session):
    err, elapsed, actors, pg = _fail("raiser", "raise")
    assert elapsed < 30
    assert (err.group, err.rank) == ("raiser", 1)
    assert "ValueError: boom at step 2" in err.cause
    assert "group 'raiser' rank 1" in str(err) and "boom at step 2" in str(err)
    assert "toy_worker.py" in str(err)  # the remote traceback comes along
    _assert_gone(actors, pg)


def test_rank_that_dies(ray_session):
    err, elapsed, actors, pg = _fail("dier", "exit")
    assert elapsed < 30
    assert (err.group, err.rank) == ("dier", 1)
    assert "actor died" in err.cause
    _assert_gone(actors, pg)


class EchoRole:
    """Rank 1 dies; rank 0's collective fails with the peer's "connection reset" first (here at
    once, in real runs within milliseconds of the death), before Ray reports rank 1 dead."""

    def step(self):
        if int(os.environ["RANK"]) == 1:
            time.sleep(1.0)
            os._exit(1)
        raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1234: Connection reset by peer")


def test_dead_rank_is_blamed_not_its_peers_echo(ray_session):
    # The role is defined here, so workers get it by value rather than importing this module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    group = ActorGroup("echo", RayConfig(num_actors=2, cpus_per_actor=1.0))
    try:
        group.setup(EchoRole)
        with pytest.raises(GroupError) as info:
            group.call("step")
    finally:
        group.kill()
    assert info.value.rank == 1 and "actor died" in info.value.cause
