"""Tasks with a known gold scorer. The embedded default is `align.task.synthetic`."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

GoldScorer = Callable[[str, str], float]


def gold_scorer_for(paths: Iterable[str]) -> Optional[GoldScorer]:
    """The gold scorer of the task the data comes from, when it has one (the built-in task)."""
    if any(p.startswith("builtin:") for p in paths):
        from align.task.synthetic import gold_score

        return gold_score
    return None
