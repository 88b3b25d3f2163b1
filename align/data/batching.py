"""Deterministic shuffled batches, sharded across data-parallel ranks and resumable mid-epoch."""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np


def group_units(groups: Sequence[int]) -> List[List[int]]:
    """Row indices of each group, groups in order of first appearance."""
    units: Dict[int, List[int]] = {}
    for i, g in enumerate(groups[:]):  # [:] reads a datasets Column at once, not row by row
        units.setdefault(int(g), []).append(i)
    return list(units.values())


class BatchIterator:
    """Endless iterator of micro-batches for one rank: epoch after epoch, each reshuffled.

    Epoch e's order is a permutation seeded by (seed, e). Global batch b is units
    [b*G, (b+1)*G) of that order with G = micro_batch_size * world_size, and rank r gets the
    r-th slice of micro_batch_size units, so the ranks together see each global batch exactly
    once. A last incomplete global batch is skipped, so every rank takes the same number of
    steps (`len(self)` per epoch).

    A unit is one row, or with `groups` (e.g. the `group` column of pairwise rows) all rows of a
    group, so every pair of a ranking lands in the same micro-batch (InstructGPT); a micro-batch
    then holds `micro_batch_size` groups, a varying number of rows.

    Yields lists of example dicts, or `collate_fn(examples)` when given. `state_dict()` after
    k batches resumes at batch k+1 in a new iterator over the same data and sharding.
    """

    def __init__(self, dataset, micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, groups: Optional[Sequence[int]] = None,
                 collate_fn: Optional[Callable[[List[dict]], object]] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.dataset, self.micro_batch_size, self.seed = dataset, micro_batch_size, seed
        self.rank, self.world_size, self.shuffle, self.collate_fn = rank, world_size, shuffle, collate_fn
        self.units = group_units(groups) if groups is not None else None
        self.num_units = len(self.units) if self.units is not None else len(dataset)
        self.global_size = micro_batch_size * world_size
        self.num_batches = self.num_units // self.global_size
        if self.num_batches == 0:
            raise ValueError(
                f"{self.num_units} {'groups' if groups is not None else 'rows'} are fewer than one global "
                f"batch (micro_batch_size {micro_batch_size} x {world_size} ranks)"
            )
        self.epoch, self.position = 0, 0
        self._cached = (-1, np.arange(0))

    def __len__(self) -> int:
        return self.num_batches

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:  # one permutation per epoch, not per batch
            order = np.arange(self.num_units)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_units)
            self._cached = (epoch, order)
        return self._cached[1]

    def indices(self, epoch: int, batch: int) -> List[int]:
        """Dataset rows of this rank's part of global batch `batch` in `epoch`."""
        start = batch * self.global_size + self.rank * self.micro_batch_size
        units = self._order(epoch)[start: start + self.micro_batch_size].tolist()
        if self.units is None:
            return units
        return [i for u in units for i in self.units[u]]

    def __iter__(self) -> Iterator:
        while True:
            while self.position < self.num_batches:
                idx = self.indices(self.epoch, self.position)
                self.position += 1
                columns = self.dataset[idx]
                examples = [dict(zip(columns, values)) for values in zip(*columns.values())]
                yield self.collate_fn(examples) if self.collate_fn else examples
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_batches": self.num_batches, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_batches", "world_size"):
            if state[key] != getattr(self, key):
                now = getattr(self, key)
                raise ValueError(f"cannot resume data order: {key} was {state[key]} when saved, is {now} now")
        self.epoch, self.position = state["epoch"], state["position"]
