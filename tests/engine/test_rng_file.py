"""A checkpoint's per-rank RNG file loads with weights_only=True: the state comes back exactly,
and a file that would run code is refused."""

import os
import pickle
import random

import numpy as np
import pytest
import torch

from align.engine import deepspeed_engine as de


def test_rng_file_round_trips_with_weights_only(tmp_path):
    path = str(tmp_path / "rng_rank0.pt")
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(de._rng_state(), path)
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    de._set_rng_state(de._load_rng(path))
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_rng_file_that_would_run_code_is_refused(tmp_path):
    path = str(tmp_path / "rng_rank0.pt")
    torch.save({"python": random.getstate(), "evil": _RunsCode()}, path)
    with pytest.raises(pickle.UnpicklingError, match="getcwd"):
        de._load_rng(path)
