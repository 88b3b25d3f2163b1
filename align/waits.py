"""No silent waits: a wait that lasts longer than `AFTER_S` prints one line saying what it waits for.

    with announce_wait("Ray to place 2 actors of {'CPU': 1.0}"):
        pg.wait(...)

And the stale build lock: torch's op builder guards a build with a `lock` file and waits, for
ever and silently, while one exists. A build killed midway leaves it behind; `clear_stale_lock`
removes such a lock (no builder process alive, or older than a few minutes) with a warning.
Imports only the standard library.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterator, Optional

AFTER_S = 10.0
# A build lock older than this is stale whatever runs (a real first build takes 20-60 s).
STALE_LOCK_S = 300.0
# A lock this old with no builder process alive is stale.
ORPHAN_LOCK_S = 15.0


def say(line: str) -> None:
    print(f"[align] {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def announce_wait(what: str, after: float = AFTER_S) -> Iterator[None]:
    """Prints `waiting for <what>` once if the block is still running after `after` seconds."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(after):
            say(f"waiting for {what} (more than {after:.0f} s so far)")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def _builders_in(directory: str) -> list:
    """Pids of processes working in `directory` (torch runs ninja and the compiler there)."""
    target = os.path.realpath(directory)
    found = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            cwd = os.path.realpath(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            continue
        if cwd == target or cwd.startswith(target + os.sep):
            found.append(int(pid))
    return found


def lock_is_stale(lock: str, now: Optional[float] = None) -> Optional[str]:
    """Why the build lock `lock` is stale, or None while a build may still hold it."""
    try:
        age = (now or time.time()) - os.stat(lock).st_mtime
    except FileNotFoundError:
        return None
    if age > STALE_LOCK_S:
        return f"it is {age:.0f} s old"
    if age > ORPHAN_LOCK_S and not _builders_in(os.path.dirname(lock)):
        return f"no build runs in {os.path.dirname(lock)}"
    return None


def clear_stale_lock(lock: str, poll_s: float = 0.5) -> None:
    """Waits while a live build holds `lock` (saying so after AFTER_S); removes a stale one."""
    with announce_wait(f"the build lock {lock} (another process is compiling this op)"):
        while os.path.exists(lock):
            reason = lock_is_stale(lock)
            if reason is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(lock)
                say(f"warning: removed the stale build lock {lock} ({reason}; a build was interrupted)")
                return
            time.sleep(poll_s)
