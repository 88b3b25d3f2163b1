"""The project's exceptions: a user's mistakes, told apart from failures of the code.

A `UserError` is something the user can fix (a config key, a data row, a model path, a missing
optional package). The command line prints it as ONE line, `error: <message>`, and exits with
code 2, with no traceback (`--debug` or ALIGN_DEBUG=1 shows it). Anything else is a runtime
failure: exit code 1.

Every class here survives pickling (Ray sends exceptions raised in an actor to the driver by
pickling them): each keeps the arguments it was built with in `args`, so unpickling rebuilds
it with the same message. Imports only the standard library.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; its message is the whole explanation, on one line."""

    def __reduce__(self):
        return (type(self), tuple(self.args), self.__dict__ or None)


class ConfigError(UserError, ValueError):
    """A configuration mistake, with the file (or "command line") and the key it concerns."""


class ModelSourceError(UserError, OSError):
    """A model or tokenizer that cannot be found or read: a missing path, an unreadable GGUF file."""


class MissingExtraError(UserError, ImportError):
    """An optional package a feature needs is not installed; the message says how to install it."""

    def __init__(self, feature: str, install: str):
        super().__init__(feature, install)
        self.feature, self.install = feature, install

    def __str__(self) -> str:
        return f"{self.feature} needs packages that are not installed; install them with: {self.install}"


def require(module: str, feature: str, install: str):
    """Imports `module`, or raises MissingExtraError naming `feature` and the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(feature, install) from None
