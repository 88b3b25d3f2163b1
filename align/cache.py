"""Where the framework keeps files it can rebuild (built-in task data, reference log-probs):
`$ALIGN_CACHE`, else ~/.cache/align-stack. Standard library only."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable


def cache_dir(*parts: str) -> str:
    """The cache root, or a path under it."""
    root = os.environ.get("ALIGN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "align-stack"))
    return os.path.join(root, *parts)


def build_once(folder: str, write: Callable[[str], None]) -> str:
    """`cache_dir(folder)`, filled by `write(tmp_dir)` the first time it is asked for.

    Safe when several processes (Ray actors) ask at once: each writes a private temporary
    directory and renames it into place; the first rename wins (the copies are identical).
    """
    final = cache_dir(folder)
    if not os.path.exists(os.path.join(final, "COMPLETE")):
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=".tmp-")
        write(tmp)
        open(os.path.join(tmp, "COMPLETE"), "w").close()
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return final
