"""Run directories: what makes a stage reproducible and reusable.

Each stage writes, under its `run_dir`:
    config.yaml     the fully resolved config
    run_info.json   stage, seed, data fingerprint, package versions, git commit, config hash, and
                    once the data is loaded its report (dropped rows, truncations, tied pairs)
    metrics.jsonl   one JSON object per logged step
    checkpoints/    DeepSpeed checkpoints (resumable)
    model/          the exported model in Hugging Face format (safetensors)
    costs.jsonl     training cost (tokens, wall time) up to each checkpoint, so a resumed run
                    reports the cost of the whole training (CostLedger)
    DONE.json       written last: final metrics and timings; a finished stage is reused when
                    its config hash and inputs match
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Dict, Optional

from align.config import save_config

log = logging.getLogger("align.run")

PACKAGES = ("torch", "transformers", "deepspeed", "datasets", "ray", "wandb", "tokenizers", "numpy")


@dataclass(frozen=True)
class RunDir:
    path: str

    @property
    def config(self) -> str:
        return os.path.join(self.path, "config.yaml")

    @property
    def info(self) -> str:
        return os.path.join(self.path, "run_info.json")

    @property
    def metrics(self) -> str:
        return os.path.join(self.path, "metrics.jsonl")

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.path, "checkpoints")

    @property
    def model(self) -> str:
        return os.path.join(self.path, "model")

    @property
    def done(self) -> str:
        return os.path.join(self.path, "DONE.json")


def package_versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit(path: Optional[str] = None) -> Optional[str]:
    """The commit of the project's checkout, with '-dirty' when it has uncommitted changes."""
    cwd = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def config_hash(cfg: Any, ignore: tuple = ("run_dir", "tracking")) -> str:
    """Hash of the settings that change a stage's result (not where it writes or how it logs)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignore}
    fields.get("train", {}).pop("resume", None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_identity(path: str) -> str:
    """What identifies an upstream model: its stage's config hash and data fingerprint when it
    was exported by a stage (DONE.json beside it), else its files' names, sizes and mtimes.

    A retrained upstream model in the same folder then changes the identity, so downstream
    stages rerun instead of reusing results built on the old model.
    """
    if not os.path.isdir(path):
        return path
    done = read_json(os.path.join(os.path.dirname(os.path.abspath(path)), "DONE.json"))
    if done and os.path.abspath(done.get("model_dir", "")) == os.path.abspath(path):
        return f"{path}@{done.get('config_hash')}:{done.get('data_fingerprint')}:{json.dumps(done.get('inputs', {}), sort_keys=True)}"
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        st = os.stat(os.path.join(path, name))
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{path}@files:{h.hexdigest()[:16]}"


def identify_inputs(inputs: Optional[Dict[str, str]]) -> Dict[str, str]:
    return {key: input_identity(path) for key, path in (inputs or {}).items()}


def prepare(cfg: Any, stage: str, data_fingerprint: str, inputs: Optional[Dict[str, str]] = None) -> RunDir:
    """Creates the run directory and writes config.yaml and run_info.json."""
    run = RunDir(cfg.run_dir)
    os.makedirs(run.path, exist_ok=True)
    save_config(cfg, run.config)
    info = {
        "stage": stage,
        "seed": cfg.seed,
        "config_hash": config_hash(cfg),
        "data_fingerprint": data_fingerprint,
        "inputs": inputs or {},
        "versions": package_versions(),
        "git_commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
    }
    write_json(run.info, info)
    return run


def record_info(run: RunDir, **fields: Any) -> None:
    """Adds what a stage knows only once its data is loaded (the data report: rows dropped,
    truncated, tied pairs skipped) to run_info.json."""
    write_json(run.info, dict(read_json(run.info) or {}, **fields))


def finish(run: RunDir, summary: Dict[str, Any]) -> None:
    info = read_json(run.info) or {}
    write_json(run.done, dict(summary, config_hash=info.get("config_hash"),
                              data_fingerprint=info.get("data_fingerprint"), inputs=info.get("inputs", {})))


def finished(cfg: Any, data_fingerprint: str, inputs: Optional[Dict[str, str]] = None) -> Optional[Dict[str, Any]]:
    """The DONE summary when this exact stage (config, data, inputs) already finished, else None."""
    done = read_json(RunDir(cfg.run_dir).done)
    if not done:
        return None
    same = (done.get("config_hash") == config_hash(cfg) and done.get("data_fingerprint") == data_fingerprint
            and done.get("inputs", {}) == (inputs or {}))
    return done if same else None


class CostLedger:
    """The training cost of a stage across kills and resumes.

    At each checkpoint the driver appends the cumulative cost up to that step (this segment's
    tokens and wall time plus what earlier segments had reached at the checkpoint it resumed
    from) to `costs.jsonl`, keyed by step, before the checkpoint is written. A run resumed from
    step k starts from the last line for step k, so work done after that checkpoint by a killed
    run (and redone now) is not counted twice; wall time sums each segment up to its last
    checkpoint plus the final segment. A run that starts at step 0 starts a new ledger.
    """

    def __init__(self, run_dir: str, start_step: int):
        self.path = os.path.join(run_dir, "costs.jsonl")
        self.before = {"train_tokens": 0.0, "wall_time_s": 0.0, "segments": 0}
        if start_step == 0:
            if os.path.exists(self.path):
                os.remove(self.path)
            return
        rows = []
        if os.path.exists(self.path):
            with open(self.path) as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
        at_start = [r for r in rows if r["step"] == start_step]
        if at_start:
            self.before = {k: at_start[-1][k] for k in self.before}
        else:
            log.warning("%s: no cost recorded at step %d; costs count only the resumed part", self.path, start_step)

    def _add(self, tokens: float, wall_time_s: float) -> Dict[str, Any]:
        return {"train_tokens": self.before["train_tokens"] + tokens,
                "wall_time_s": round(self.before["wall_time_s"] + wall_time_s, 2),
                "segments": self.before["segments"] + 1}

    def checkpoint(self, step: int, tokens: float, wall_time_s: float) -> None:
        """Records the cost up to `step` (call before writing that step's checkpoint)."""
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **self._add(tokens, wall_time_s)}) + "\n")

    def totals(self, tokens: float, wall_time_s: float) -> Dict[str, Any]:
        """{train_tokens, wall_time_s, segments} of the whole training, this segment included."""
        return self._add(tokens, wall_time_s)


def write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> Optional[Any]:
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)

