"""Every project exception survives pickling (Ray sends an actor's exception to the driver that
way) with its message and fields; GroupError's first line names the group, rank and cause."""

import pickle

import pytest
from ray import cloudpickle

from align.data.errors import DataError, RowProblem
from align.engine.ray_group import GroupError
from align.errors import ConfigError, MissingExtraError, ModelSourceError, UserError, user_error_of

DATA = DataError("pairs.jsonl", "identical to 'chosen'", 17, "rejected", "identical_pair")
ERRORS = [
    UserError("something the user can fix"),
    ConfigError("configs/dpo.yaml: optim.lrr: unknown key"),
    ModelSourceError("model.name_or_path: ./smol.gguf: no such file or directory"),
    MissingExtraError("reading a GGUF model file", "pip install gguf accelerate"),
    DATA,
    DataError("empty.jsonl", "empty file (no rows)"),
    RowProblem("prompt", "empty string", "empty_field"),
    GroupError("dpo", 0, "DataError: " + str(DATA), "remote traceback ...", DATA),
    GroupError("sft", 1, "actor died (exit 1)"),
]


def fields(err):
    return type(err), str(err), err.args, {k: str(v) for k, v in vars(err).items()}


@pytest.mark.parametrize("err", ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_round_trip(err, dumps):
    back = pickle.loads(dumps(err))
    assert fields(back) == fields(err)


def test_every_project_exception_is_covered():
    """A new exception class in the project must be added to ERRORS."""
    import align.data.errors
    import align.engine.ray_group
    import align.errors

    defined = {obj for module in (align.errors, align.data.errors, align.engine.ray_group)
               for obj in vars(module).values()
               if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == module.__name__}
    assert defined <= {type(e) for e in ERRORS}


def test_group_error_lines():
    err = pickle.loads(pickle.dumps(ERRORS[7]))
    assert str(err).splitlines()[0] == ("group 'dpo' rank 0 failed: DataError: pairs.jsonl: row 17, field "
                                        "'rejected': identical to 'chosen' (rows are numbered from 0)")
    assert fields(user_error_of(err)) == fields(DATA) and err.user_error.row == 17
    assert user_error_of(ERRORS[8]) is None
    assert str(MissingExtraError("x", "pip install y")) == \
        "x needs packages that are not installed; install them with: pip install y"
