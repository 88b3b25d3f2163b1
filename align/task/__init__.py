"""Built-in tasks: data written from a seed, with a known gold scorer.

A built-in data source is named `builtin:<split>` (a split of the embedded default task,
`align.task.synthetic`) or `builtin:<task>/<split>` (a split of another registered task). A task
module provides:

    builtin_path(split, seed) -> str      the split's .jsonl file, written on first use
    gold_score(prompt, response) -> float the exact scorer (higher is better)
    sample_metrics(prompts, responses) -> Dict[str, float]   optional task-specific sample metrics

Generic code (data sources, evaluation, recipes) goes through this registry and never imports a
task module by name. A new task is one entry in TASKS.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from align.errors import ConfigError

GoldScorer = Callable[[str, str], float]

BUILTIN_PREFIX = "builtin:"
DEFAULT_TASK = "synthetic"
# task name -> module implementing it
TASKS: Dict[str, str] = {"synthetic": "align.task.synthetic", "json_records": "align.task.json_records"}


def parse_builtin(path: str) -> Optional[Tuple[str, str]]:
    """(task, split) of a `builtin:` data source, or None for any other path."""
    if not path.startswith(BUILTIN_PREFIX):
        return None
    name = path[len(BUILTIN_PREFIX):]
    task, _, split = name.rpartition("/")
    return (task or DEFAULT_TASK), split


def task_module(task: str) -> ModuleType:
    if task not in TASKS:
        raise ConfigError(f"unknown built-in task {task!r}; built-in tasks: {sorted(TASKS)}")
    return importlib.import_module(TASKS[task])


def builtin_path(path: str, seed: int) -> str:
    """The .jsonl file of a `builtin:` source."""
    task, split = parse_builtin(path)
    return task_module(task).builtin_path(split, seed)


def task_for(paths: Iterable[str]) -> Optional[ModuleType]:
    """The task module of the first built-in source among `paths`, if any."""
    for path in paths:
        parsed = parse_builtin(path)
        if parsed is not None:
            return task_module(parsed[0])
    return None


def gold_scorer_for(paths: Iterable[str]) -> Optional[GoldScorer]:
    """The gold scorer of the task the data comes from, when it is a built-in task."""
    task = task_for(paths)
    return None if task is None else task.gold_score


def sample_metrics_for(paths: Iterable[str], prompts: Sequence[str], responses: Sequence[str]) -> Dict[str, float]:
    """The task's own metrics of sampled responses (e.g. fluency), {} when it has none."""
    task = task_for(paths)
    fn = getattr(task, "sample_metrics", None) if task is not None else None
    return dict(fn(prompts, responses)) if fn is not None else {}


def default_tokenizer_corpus() -> List[str]:
    """Texts the built-in tokenizer is trained on (the default task's)."""
    return list(task_module(DEFAULT_TASK).tokenizer_corpus())
