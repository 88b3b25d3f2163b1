"""The quick pipeline end to end (SFT, reward model, PPO, DPO, KTO, evaluation, report), then
stage reuse and selective reruns. Asserts on the report's numbers."""

import json
import math
import os
import time

import pytest

from align.config import load_config
from launch.pipeline import PipelineConfig, run_pipeline

QUICK = "configs/pipeline/quick.yaml"


@pytest.fixture(scope="module")
def quick_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    pipe = load_config(PipelineConfig, QUICK, [f"run_root={root}", "tracking.mode=offline"])
    started = time.time()
    result = run_pipeline(pipe)
    return pipe, result, time.time() - started


def test_report_has_every_method_with_finite_metrics(quick_run):
    pipe, result, _ = quick_run
    report = json.load(open(result["report_json"]))
    rows = {r["method"]: r for r in report["methods"]}
    assert set(rows) == {"sft", "ppo", "dpo", "kto"}
    for row in rows.values():
        for key in ("gold", "rm", "kl", "length", "distinct_2", "cost_wall_time_s", "cost_train_tokens"):
            assert math.isfinite(row[key]), (row["method"], key)
        assert row["cost_train_tokens"] > 0 and row["cost_wall_time_s"] > 0
        lo, hi = row["gold_ci"]
        assert lo <= row["gold"] <= hi
    assert rows["sft"]["kl"] == 0.0  # the baseline is the reference
    for method in ("ppo", "dpo", "kto"):
        assert rows[method]["gold"] > rows["sft"]["gold"], method
        assert rows[method]["kl"] > 0.0 and 0.0 <= rows[method]["win_rate"] <= 1.0
    for key in ("report_md", "report_csv", "report_html", "plot_reward_kl", "plot_training"):
        assert os.path.getsize(result[key]) > 0
    html = open(result["report_html"]).read()
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html
    # wandb: every stage and the report ran offline into the run directory, grouped by pipeline
    assert os.listdir(os.path.join(pipe.run_root, "report", "wandb"))


def test_rerun_reuses_every_stage(quick_run):
    pipe, first, _ = quick_run
    started = time.time()
    again = run_pipeline(pipe)
    assert all(s.get("reused") for s in again["stages"].values())
    assert time.time() - started < 30
    assert json.load(open(again["report_json"])) == json.load(open(first["report_json"]))


def test_changed_setting_reruns_that_stage_and_later_only(quick_run):
    pipe, _, _ = quick_run
    result = run_pipeline(pipe, ["kto.loss.beta=0.2", "kto.train.max_steps=2"])
    reused = {name: bool(s.get("reused")) for name, s in result["stages"].items()}
    assert reused == {"sft": True, "reward_model": True, "ppo": True, "dpo": True, "kto": False}
