"""Error tests run the real commands (`align-run`, `align-pipeline`) in a subprocess and read
their stderr and exit code, as a user would; helpers in tests/errors/helpers.py."""

import pytest

from tests.errors.helpers import run_command


@pytest.fixture
def cli():
    return run_command
