"""The one driver loop (align/stage.py run_stage) on a driver-side stage object: which calls it
makes in which order for a given cadence, what it logs at which step, the summary and DONE.json,
reuse of a finished run, resuming mid-run, and shutdown after a failure. The stage object here
records calls and does no training (no Ray, no DeepSpeed): the real stages run this same loop in
their own tests (tests/rlhf, tests/reward_model, tests/direct)."""

import json
import os

import pytest

from align.config import StageConfig, TrackingConfig, TrainConfig
from align.stage import OnDriver, run_stage
from align.tracking import read_metrics


class Recorder:
    """A stage object that records the driver's calls; its loss is 1 / step."""

    def __init__(self, calls, start_step=0, fail_at=None):
        self.calls, self.start_step, self.fail_at = calls, start_step, fail_at

    def plan(self):
        self.calls.append("plan")
        return {"total_steps": 5, "start_step": self.start_step, "eval_at_start": True, "progress_keys": ["loss"]}

    def train_step(self, step):
        self.calls.append(f"train {step}")
        if step == self.fail_at:
            raise RuntimeError(f"boom at {step}")
        return {"loss": 1.0 / step, "tokens": 10.0, "examples": ["not a number"]}

    def evaluate(self, final=False, start=False):
        self.calls.append("evaluate final" if final else "evaluate start" if start else "evaluate")
        return {"eval/x": 0.5 if start else 1.0}

    def save_checkpoint(self, step):
        self.calls.append(f"save {step}")

    def export(self, out_dir):
        self.calls.append(f"export {os.path.basename(out_dir)}")

    def summary(self):
        return {"extra": 7}

    def shutdown(self):
        self.calls.append("shutdown")


def _cfg(run_dir):
    return StageConfig(run_dir=str(run_dir), tracking=TrackingConfig(backend="none"),
                       train=TrainConfig(max_steps=5, log_every=2, eval_every=2, save_every=3))


def test_cadence_logs_summary_and_done(tmp_path):
    calls = []
    summary = run_stage("toy", _cfg(tmp_path), OnDriver(lambda cfg: Recorder(calls)), "fp")
    assert calls == ["plan", "evaluate start", "train 1", "train 2", "evaluate", "train 3", "save 3", "train 4",
                     "evaluate", "train 5", "evaluate final", "export model", "shutdown"]
    # Logged: the start eval at 0, train metrics every 2 steps and at the last, evals between.
    logged = [(r["step"], sorted(k for k in r if k != "step")) for r in read_metrics(str(tmp_path))]
    train_keys = ["examples", "loss", "tokens"]
    assert logged == [(0, ["eval/x"]), (2, train_keys), (2, ["eval/x"]), (4, train_keys), (4, ["eval/x"]),
                      (5, train_keys), (5, ["eval/x"])]
    assert summary["stage"] == "toy" and summary["steps"] == 5 and summary["train_tokens"] == 50.0
    assert summary["final_train"] == {"loss": 0.2, "tokens": 10.0}  # numbers only
    assert summary["final_eval"] == {"eval/x": 1.0} and summary["extra"] == 7
    assert summary["model_dir"] == os.path.join(str(tmp_path), "model")
    # Start-up (the driver's own, up to the first step) is part of the wall time.
    assert 0 <= summary["startup_s"] <= summary["wall_time_s"] and summary["first_step_at"] > 1.7e9
    with open(tmp_path / "DONE.json") as fh:
        done = json.load(fh)
    assert done["steps"] == 5 and done["extra"] == 7 and done["data_fingerprint"] == "fp"

    # The same config, data and inputs again: the finished run is reused, nothing is started.
    again = run_stage("toy", _cfg(tmp_path), OnDriver(lambda cfg: pytest.fail("started a finished stage")), "fp")
    assert again["reused"] is True and again["steps"] == 5
    # Other data: it runs again.
    calls.clear()
    run_stage("toy", _cfg(tmp_path), OnDriver(lambda cfg: Recorder(calls)), "other")
    assert calls[-3:] == ["evaluate final", "export model", "shutdown"]


def test_resume_skips_the_start_eval_and_done_steps(tmp_path):
    calls = []
    summary = run_stage("toy", _cfg(tmp_path), OnDriver(lambda cfg: Recorder(calls, start_step=3)), "fp")
    assert calls == ["plan", "train 4", "evaluate", "train 5", "evaluate final", "export model", "shutdown"]
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [4, 4, 5, 5]
    assert summary["train_tokens"] == 20.0


def test_failure_shuts_the_stage_down_and_writes_no_done(tmp_path):
    calls = []
    with pytest.raises(RuntimeError, match="boom at 2"):
        run_stage("toy", _cfg(tmp_path), OnDriver(lambda cfg: Recorder(calls, fail_at=2)), "fp")
    assert calls == ["plan", "evaluate start", "train 1", "train 2", "shutdown"]
    assert not os.path.exists(tmp_path / "DONE.json")
