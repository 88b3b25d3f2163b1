"""Where the framework keeps files it can rebuild (built-in task data, reference log-probs):
`$ALIGN_CACHE`, else ~/.cache/align-stack. Standard library only."""

from __future__ import annotations

import os


def cache_dir(*parts: str) -> str:
    """The cache root, or a path under it."""
    root = os.environ.get("ALIGN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "align-stack"))
    return os.path.join(root, *parts)
