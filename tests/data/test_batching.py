"""BatchIterator: determinism, resume mid-epoch, rank sharding, ranking groups kept together."""

import datasets
import pytest

from align.data import BatchIterator

DATA = datasets.Dataset.from_dict({"x": list(range(23))})


def xs(batch):
    return [e["x"] for e in batch]


def take(iterator, n):
    it = iter(iterator)
    return [xs(next(it)) for _ in range(n)]


def test_resume_mid_epoch_matches_uninterrupted_run():
    expected = take(BatchIterator(DATA, 4, seed=3), 10)  # 5 batches per epoch: crosses an epoch
    first = BatchIterator(DATA, 4, seed=3)
    assert take(first, 3) == expected[:3]
    state = first.state_dict()
    resumed = BatchIterator(DATA, 4, seed=3)
    resumed.load_state_dict(state)
    assert take(resumed, 7) == expected[3:]
    assert resumed.epoch == 1 and len(resumed) == 5


def test_epochs_reshuffle_and_seed_matters():
    run = take(BatchIterator(DATA, 5, seed=0), 8)
    assert run[:4] != run[4:]
    assert run != take(BatchIterator(DATA, 5, seed=1), 8)


def test_ranks_split_each_global_batch_exactly_once():
    world, micro = 3, 2
    per_rank = [take(BatchIterator(DATA, micro, seed=5, rank=r, world_size=world), 3) for r in range(world)]
    one_process = take(BatchIterator(DATA, micro * world, seed=5), 3)
    for step in range(3):
        assert sum((per_rank[r][step] for r in range(world)), []) == one_process[step]
    seen = sum((sum(p, []) for p in per_rank), [])
    assert len(seen) == len(set(seen)) == 18  # 23 rows: 3 full global batches of 6, rest skipped


def test_groups_stay_in_one_batch():
    groups = [0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 4, 5]
    ds = datasets.Dataset.from_dict({"x": list(range(12)), "group": groups})
    it = BatchIterator(ds, 2, seed=0, groups=ds["group"])
    batches = [[groups[i] for i in b] for b in take(it, len(it))]
    seen = sum(batches, [])
    assert sorted(seen) == groups
    for batch in batches:
        assert len(set(batch)) == 2 and all(batch.count(g) == groups.count(g) for g in batch)


def test_collate_fn_and_errors():
    it = BatchIterator(DATA, 4, seed=0, collate_fn=len)
    assert next(iter(it)) == 4
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchIterator(DATA, 12, seed=0, world_size=2)
    other = BatchIterator(DATA, 2, seed=0)
    with pytest.raises(ValueError, match="num_batches was 5"):
        other.load_state_dict(it.state_dict())
