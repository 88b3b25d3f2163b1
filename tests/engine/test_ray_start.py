"""The local Ray started by `start_ray` runs our actors at niceness 0 (ray.worker_niceness), not
Ray's default 15, under which training yields the CPU to every other process on the machine."""

import os

import pytest

pytestmark = pytest.mark.slow


def test_local_ray_workers_run_at_the_configured_niceness(ray_session):
    import ray

    @ray.remote(num_cpus=0.1)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == 0
