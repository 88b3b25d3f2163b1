"""Experiment tracking: metrics.jsonl in the run directory always, wandb when configured.

wandb runs offline when no API key is available (files land in <run_dir>/wandb and can be
uploaded later with `wandb sync`), online when one is, and not at all with backend=none or
mode=disabled. Secrets never reach a log: config values whose key looks like a credential are
replaced before logging, and the API key itself is only ever read from wandb's own sources.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, Optional

from align.config import TrackingConfig

_SECRET = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)


def scrub(obj: Any) -> Any:
    """A copy of a config dict with credential-like keys masked."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET.search(str(k)) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def resolve_mode(cfg: TrackingConfig) -> str:
    if cfg.backend == "none":
        return "disabled"
    if cfg.mode != "auto":
        return cfg.mode
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("offline", "online", "disabled"):
        return env_mode
    has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
    return "online" if has_key else "offline"


def _netrc_has_wandb() -> bool:
    path = os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(path) as fh:
            return "api.wandb.ai" in fh.read()
    except OSError:
        return False


class Tracker:
    """Logs a stage's metrics. Call from the driver only (one writer per run)."""

    def __init__(self, cfg: TrackingConfig, run_dir: str, name: str, config: Dict[str, Any],
                 group: Optional[str] = None, job_type: Optional[str] = None):
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.mode = resolve_mode(cfg)
        self.wandb_run = None
        if self.mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.project, entity=cfg.entity, group=group or cfg.group, name=name,
                job_type=job_type, tags=list(cfg.tags), config=scrub(config), dir=run_dir,
                mode=self.mode, reinit="finish_previous",
            )

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            numeric = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
            self.wandb_run.log(numeric, step=step)

    def summary(self, values: Dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: _plain(v) for k, v in values.items()})

    def log_table(self, key: str, columns, rows) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_image(self, key: str, path: str) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(path)})

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(run_dir: str):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
