"""Helpers of the error tests: the real commands in a subprocess, data files, small configs."""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def lines(self) -> List[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]

    @property
    def first(self) -> str:
        return self.lines[0] if self.lines else ""


def run_command(command: str, *args: str, env=None, timeout: float = 300) -> Result:
    """`command` (align-run or align-pipeline, from this environment) with `args`, in the repo."""
    start = time.monotonic()
    out = subprocess.run([os.path.join(BIN, command), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **(env or {})})
    return Result(out.returncode, out.stdout, out.stderr, time.monotonic() - start)




def pair_rows(n: int) -> List[dict]:
    return [{"prompt": f"Write a short review of film number {i}.", "chosen": f"The plot was very charming {i}.",
             "rejected": "The plot was dull."} for i in range(n)]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return str(path)


def stage_config(tmp_path, data_path: str, name: str = "dpo.yaml", **extra) -> str:
    """A DPO config on the tiny built-in model reading `data_path` (no eval, no samples)."""
    cfg = {
        "model": {"name_or_path": "builtin:tiny-1m"},
        "data": {"train": [{"path": data_path}], "eval": [], "max_length": 64, "max_prompt_length": 32},
        "train": {"max_steps": 2, "eval_every": 0, "save_every": 0},
        "deepspeed": {"micro_batch_size": 4},
        "final_samples": 0,
        "tracking": {"backend": "none"},
        "run_dir": str(tmp_path / "run"),
    }
    for key, value in extra.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value if not isinstance(value, dict) else {**cfg.get(key, {}), **value}
    path = tmp_path / name
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)
