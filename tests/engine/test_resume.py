"""Checkpoints: a run killed after a checkpoint and resumed from it ends bitwise equal to an
uninterrupted run, and a crash while saving never costs the previous good checkpoint.

The toy role draws every batch from the global torch RNG, each rank from its own seed
(rank_seeded), and uses a warm-up + linear LR schedule, so the resumed run matches only if the
model, AdamW state, LR schedule, data position and every rank's RNG state are all restored.
"""

import os

import pytest
import torch

from align.config import RayConfig
from align.engine.ray_group import ActorGroup
from tests.engine.toy_worker import ToyWorker

pytestmark = pytest.mark.slow

STEPS = 6
ROLE = dict(micro_batch_size=4, rank_seeded=True, scheduler="linear", warmup_steps=2, total_steps=STEPS, seed=3)


def _group(name, n=2, **role):
    group = ActorGroup(name, RayConfig(num_actors=n, cpus_per_actor=1.0))
    group.setup(ToyWorker, **role)
    return group


# ZeRO-2 keeps DeepSpeed's client state of rank 0 only (so rank 1's RNG comes from our own
# per-rank file); ZeRO-3 restores partitioned parameters as well as optimizer state.
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_killed_run_resumes_bitwise(ray_session, tmp_path, zero_stage):
    ckpt = str(tmp_path / "ckpt")
    role = dict(ROLE, zero_stage=zero_stage)

    group = _group("uninterrupted", **role)
    try:
        reference = group.call("train", STEPS)[0]
        reference_weights = group.call("weights")[0]
    finally:
        group.shutdown()

    group = _group("crashing", **role)
    try:
        for _ in range(2):
            group.call("train", 2)
            group.call("save", ckpt)
        group.call("train", 1)  # step 5 is lost with the crash
    finally:
        group.kill()  # ray.kill every actor: no teardown, as in a real crash
    assert {"latest", "step2", "step4"} <= set(os.listdir(ckpt))

    group = _group("resumed", **role)
    try:
        assert group.call("load", ckpt) == [4, 4]
        resumed = group.call("train", STEPS - 4)[0]
        weights = group.call("weights")[0]
    finally:
        group.shutdown()

    assert resumed == reference[4:]  # bitwise: same data, same arithmetic on CPU
    assert weights.keys() == reference_weights.keys()
    different = [k for k in weights if not torch.equal(weights[k], reference_weights[k])]
    assert not different, f"weights differ after resume: {different[:5]}"


def test_crash_during_save_keeps_previous_checkpoint(ray_session, tmp_path):
    ckpt = tmp_path / "ckpt"
    group = _group("atomic", n=1, zero_stage=0, micro_batch_size=4)
    try:
        for _ in range(2):
            group.call("train", 1)
            group.call("save", str(ckpt), 2)
        assert (ckpt / "latest").read_text() == "step2"
        # A crash while step 3 was being written: a half-written temporary directory, and
        # `latest` still names step 2.
        (ckpt / "step3.tmp").mkdir()
        (ckpt / "step3.tmp" / "mp_rank_00_model_states.pt").write_bytes(b"garbage")
        (ckpt / "step3.tmp" / "stale").write_text("left by the crash")
        assert group.call("load", str(ckpt)) == [2]

        # A crash after step 2's directory was renamed into place but before `latest` was
        # rewritten leaves `latest` naming step 1; a lost pointer file names nothing. Either
        # way the newest complete step directory is used.
        (ckpt / "latest").write_text("step1")
        assert group.call("load", str(ckpt)) == [2]
        os.remove(ckpt / "latest")
        assert group.call("load", str(ckpt)) == [2]

        group.call("train", 1)
        group.call("save", str(ckpt), 2)
        assert sorted(d for d in os.listdir(ckpt) if d.startswith("step")) == ["step2", "step3"]  # .tmp pruned
        assert (ckpt / "latest").read_text() == "step3"
        # The new step 3 was written from scratch, not into the crashed save's directory.
        assert not (ckpt / "step3" / "stale").exists()
        assert group.call("load", str(ckpt)) == [3]
    finally:
        group.shutdown()
