"""The label stage (reward_model/label.py) on the tiny model: the session SFT policy samples K=4
responses per prompt of the built-in task, the gold scorer labels them; then a pipeline feeds
its pairs to DPO through `inputs`, and the same seed writes the same bytes."""

import json
import math
import os

import pytest

from align.config import DataConfig, SourceConfig, load_config
from align.data.sources import load_splits
from align.task.synthetic import gold_score
from launch.pipeline import PipelineConfig, check_pipeline, run_pipeline
from reward_model.label import OUTPUTS, LabelConfig, label_rows, run

PROMPTS = 16


def read_rows(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_label_rows_pairs_best_and_worst_and_drops_ties():
    files, counts = label_rows(
        ["a", "b", "c"],
        [["x", "y", "", "x"], ["p", "q", "r", "s"], ["u", "v", "w", "z\ufffd"]],
        [[0.5, -1.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, -1.0]])
    # "a": the empty response and the repeat of "x" are left out; "b": all tied, dropped; "c": the
    # undecodable response (U+FFFD) is left out, so its worst is "u"
    assert counts == {"prompts": 3, "dropped_tied": 1, "invalid_responses": 2, "repeated_responses": 1, "pairs": 2}
    assert files["pairs"] == [
        {"prompt": "a", "chosen": "x", "rejected": "y", "chosen_score": 0.5, "rejected_score": -1.0},
        {"prompt": "c", "chosen": "v", "rejected": "u", "chosen_score": 1.0, "rejected_score": 0.0}]
    assert [(r["completion"], r["label"]) for r in files["binary"]] == [("x", True), ("y", False), ("v", True),
                                                                        ("u", False)]
    assert files["rankings"][1] == {"prompt": "c", "responses": ["u", "v", "w"], "scores": [0.0, 1.0, 1.0]}
    assert [r["prompt"] for r in files["samples"]] == ["a", "b", "c"] and files["samples"][0]["scores"][2] == 2.0


@pytest.fixture(scope="module")
def piped(ray_session, sft_model_dir, tmp_path_factory):
    """label (the SFT policy's samples) -> dpo (2 steps on its pairs), as one pipeline."""
    root = tmp_path_factory.mktemp("labelled")
    config = root / "pipe.yaml"
    config.write_text(json.dumps({
        "name": "labelled", "run_root": str(root), "shared": {"seed": 3}, "tracking": {"backend": "none"},
        "stages": {
            "label": {"stage": "label", "config": "configs/label/default.yaml", "method": "start",
                      "overrides": {"model": {"name_or_path": sft_model_dir},
                                    "data": {"train": [{"path": "builtin:prompts", "max_rows": PROMPTS}]}}},
            "dpo": {"stage": "dpo", "config": "configs/dpo/default.yaml", "method": "dpo",
                    "inputs": {"model.name_or_path": "label", "data.train": "label/pairs"},
                    "overrides": {"final_samples": 0, "data": {"eval": [], "eval_fraction": 0.0},
                                  "deepspeed": {"micro_batch_size": 4}, "train": {"max_steps": 2, "save_every": 0, "log_every": 1}}}},
        "evaluation": {"enabled": False, "baseline": "label"}}))
    pipe = load_config(PipelineConfig, str(config))
    check_pipeline(pipe)  # the pairs file does not exist yet: its checks wait for the stage
    return pipe, run_pipeline(pipe), sft_model_dir


def test_label_stage_writes_pairs_ordered_by_the_gold_scorer(piped):
    pipe, result, sft_dir = piped
    summary = result["stages"]["label"]
    counts = {k.split("/", 1)[1]: v for k, v in summary["final_eval"].items() if k.startswith("label/")}
    pairs = read_rows(summary["outputs"]["pairs"])
    assert counts["prompts"] == PROMPTS and counts["pairs"] + counts["dropped_tied"] == PROMPTS
    assert counts["pairs"] == len(pairs) >= PROMPTS // 2  # the SFT policy's samples differ on most prompts
    for row in pairs:
        assert row["chosen_score"] > row["rejected_score"]
        # the labels are the gold scorer's (up to float formatting)
        assert math.isclose(gold_score(row["prompt"], row["chosen"]), row["chosen_score"], abs_tol=1e-12)
        assert math.isclose(gold_score(row["prompt"], row["rejected"]), row["rejected_score"], abs_tol=1e-12)
    assert counts["chosen_score"] > counts["rejected_score"]
    binary = read_rows(summary["outputs"]["binary"])
    assert len(binary) == 2 * len(pairs) and sum(r["label"] for r in binary) == len(pairs)
    rankings = read_rows(summary["outputs"]["rankings"])
    assert len(rankings) == len(pairs)
    # every file loads through the stages' own readers; a ranking loss needs a strict order, so with
    # data.ties=strict_pairs the reader keeps exactly the rankings without a tied score
    strict = sum(len(set(r["scores"])) == len(r["scores"]) for r in rankings)
    for name, kind, extra, rows in (("pairs", "pairwise", {}, len(pairs)), ("binary", "binary", {}, 2 * len(pairs)),
                                    ("rankings", "ranking", {"ties": "strict_pairs"}, strict)):
        train, _ = load_splits(DataConfig(train=[SourceConfig(path=summary["outputs"][name])], **extra), kind, 0)
        assert len(train) == rows, name
    # its model is the model it sampled from, unchanged: DPO starts from it and trains on its pairs
    assert summary["model_dir"] == sft_dir


def test_dpo_trains_on_the_labelled_pairs_through_inputs(piped):
    pipe, result, sft_dir = piped
    dpo = result["stages"]["dpo"]
    pairs = read_rows(result["stages"]["label"]["outputs"]["pairs"])
    assert dpo["steps"] == 2 and dpo["train_rows"] == len(pairs)
    with open(os.path.join(pipe.run_root, "dpo", "metrics.jsonl")) as fh:
        first = next(m for m in map(json.loads, fh) if m["step"] == 1)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 1
    again = run_pipeline(pipe)
    assert again["stages"]["label"]["reused"] and again["stages"]["dpo"]["reused"]


def test_same_seed_writes_the_same_bytes(piped, quick, tmp_path):
    pipe, result, sft_dir = piped
    cfg = load_config(LabelConfig, "configs/label/default.yaml", quick(
        tmp_path, **{"model.name_or_path": sft_dir, "seed": 3,
                     "data.train": f'[{{path: "builtin:prompts", max_rows: {PROMPTS}}}]'}))
    summary = run(cfg, reuse=False)
    for name in OUTPUTS:
        with open(summary["outputs"][name], "rb") as a, open(result["stages"]["label"]["outputs"][name], "rb") as b:
            assert a.read() == b.read(), name
