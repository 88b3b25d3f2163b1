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

import importlib
import os
import signal
import sys
import traceback


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
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(feature, install) from None


# ---------------------------------------------------------------------------------------------
# The command line's side: how each kind of failure reaches the user
# ---------------------------------------------------------------------------------------------

EXIT_RUNTIME, EXIT_USER, EXIT_INTERRUPTED = 1, 2, 130


def debug_requested(argv: list) -> tuple:
    """(argv without `--debug`, whether tracebacks were asked for by --debug or ALIGN_DEBUG=1)."""
    if "--debug" in argv:
        os.environ["ALIGN_DEBUG"] = "1"  # for the commands this one runs (align-run main -> pipeline)
    debug = os.environ.get("ALIGN_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return [a for a in argv if a != "--debug"], debug


def user_error_of(err: BaseException):
    """The UserError behind `err`: itself, or the one an actor raised (GroupError.user_error)."""
    if isinstance(err, UserError):
        return err
    inner = getattr(err, "user_error", None)
    return inner if isinstance(inner, UserError) else None


def _one_line(text: str) -> str:
    return " ".join(str(text).strip().splitlines()[:1]) or "unknown error"


def _stop_ray() -> None:
    """Ends the Ray this process started (its actors and daemons), if any; quietly."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def cli_main(fn, argv: list) -> int:
    """Runs `fn(argv)` (a command's body) and turns what it raises into an exit code.

    - a user's mistake (UserError, also one raised inside an actor): one line on stderr,
      `error: <message>`, exit 2, no traceback;
    - Ctrl-C: every actor stopped (Ray shut down), exit 130;
    - anything else: the traceback, then `error: <first line of the error>` as the last line,
      exit 1.
    `--debug` or ALIGN_DEBUG=1 prints the traceback for every kind (exit codes stay the same).
    """
    argv, debug = debug_requested(list(argv))
    # Ctrl-C while the stage runs: mark it so actor groups are killed at once, not torn down
    # politely behind a training step that may take seconds.
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        return fn(argv)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abort the cleanup
        _stop_ray()
        print("error: interrupted; the newest complete checkpoint is kept (rerun to resume)",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the one place that reports every failure
        user = user_error_of(err)
        _stop_ray()  # before printing, so no actor log line lands after the error line
        if debug:
            traceback.print_exception(err, file=sys.stderr)
        if user is not None:
            print(f"error: {_one_line(user)}", file=sys.stderr, flush=True)
            return EXIT_USER
        if not debug:
            traceback.print_exception(err, file=sys.stderr)
        print(f"error: {_one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_RUNTIME
    finally:
        sys.stdout.flush()
        if signal.getsignal(signal.SIGINT) in (_on_sigint, signal.SIG_IGN):
            signal.signal(signal.SIGINT, previous)


INTERRUPTED = False  # set by Ctrl-C; actor groups read it to skip their graceful teardown


def _on_sigint(signum, frame):
    global INTERRUPTED
    INTERRUPTED = True
    raise KeyboardInterrupt


def fault_point(where: str, step: int) -> None:
    """Test hook: raises here when ALIGN_FAULT is `<where>@<step>` (e.g. `checkpoint@4`).

    Lets tests make a real code path fail halfway (a checkpoint write, in an actor) and check
    what survives; unset, it costs one environment lookup.
    """
    if os.environ.get("ALIGN_FAULT") == f"{where}@{step}":
        raise RuntimeError(f"fault injected by ALIGN_FAULT={where}@{step}")
