"""Sweeps and seeds end to end on a tiny pipeline: one shared SFT, DPO at two betas x two seeds,
plus a third beta whose value is invalid, so its members fail while the others run. Asserts on
the report's numbers, the member runs' files and the wandb runs; then the same seed rerun is
bitwise equal and another seed not."""

import glob
import json
import os

import pytest
import yaml

from align.config import load_config
from launch.pipeline import PipelineConfig, run_pipeline, stage_config

PIPELINE = """
name: sweeptest
run_root: {root}
seeds: [1, 2]
shared: {{seed: 0}}
stages:
  sft:
    stage: sft
    method: sft
    overrides: {{final_samples: 0, train: {{max_steps: 30, eval_every: 0, save_every: 0}}}}
  dpo:
    stage: dpo
    method: dpo
    inputs: {{model.name_or_path: sft}}
    sweep: {{loss.beta: [0.05, 1.0, oops]}}
    overrides: {{final_samples: 0, train: {{max_steps: 8, eval_every: 0, save_every: 0, log_every: 1}}}}
evaluation:
  baseline: sft
  num_prompts: 24
  bootstrap_samples: 200
  sampling: {{max_new_tokens: 24, temperature: 1.0}}
tracking: {{backend: wandb, mode: offline}}
"""


@pytest.fixture(scope="module")
def sweep_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    path = root / "pipeline.yaml"
    path.write_text(PIPELINE.format(root=root))
    pipe = load_config(PipelineConfig, str(path))
    return pipe, run_pipeline(pipe)


def test_every_member_runs_in_its_folder_and_the_failure_is_reported(sweep_run):
    pipe, result = sweep_run
    root = pipe.run_root
    for beta in ("0.05", "1.0"):
        for seed in (1, 2):
            done = json.load(open(os.path.join(root, "dpo", f"beta{beta}-s{seed}", "DONE.json")))
            cfg = yaml.safe_load(open(os.path.join(root, "dpo", f"beta{beta}-s{seed}", "config.yaml")))
            assert cfg["seed"] == seed and cfg["loss"]["beta"] == float(beta)
            # every seed's DPO starts from the one shared SFT run (not swept, the baseline)
            assert cfg["model"]["name_or_path"] == os.path.join(root, "sft", "model") and done["steps"] == 8
    assert sorted(result["failed"]) == ["dpo/betaoops-s1", "dpo/betaoops-s2"]
    assert all("loss.beta" in error for error in result["failed"].values())

    report = json.load(open(result["report_json"]))
    entries = {(r["method"], r["setting"], r["seed"]): r for r in report["methods"]}
    assert set(entries) == {("sft", "default", 0), *{("dpo", f"beta{b}", s) for b in ("0.05", "1.0") for s in (1, 2)}}
    assert sorted(f["run"] for f in report["failed"]) == ["dpo/betaoops-s1", "dpo/betaoops-s2"]
    assert {(f["setting"], f["seed"]) for f in report["failed"]} == {("betaoops", 1), ("betaoops", 2)}
    assert "dpo/betaoops-s1 FAILED" in open(result["report_md"]).read()
    for row in report["methods"]:
        assert row["cost_train_tokens"] > 0 and row["gold_ci"][0] <= row["gold"] <= row["gold_ci"][1]

    # the frontier point of each setting is the mean over its seeds' entries
    points = {p["setting"]: p for p in report["frontier"]["dpo"]}
    for beta in ("0.05", "1.0"):
        seeds = [entries[("dpo", f"beta{beta}", s)] for s in (1, 2)]
        assert points[f"beta{beta}"]["gold"] == pytest.approx(sum(r["gold"] for r in seeds) / 2, abs=1e-12)
        assert points[f"beta{beta}"]["kl"] == pytest.approx(sum(r["kl"] for r in seeds) / 2, abs=1e-12)
        assert points[f"beta{beta}"]["seeds"] == 2 and points[f"beta{beta}"]["gold_seed_std"] is not None
    assert [p["kl"] for p in report["frontier"]["dpo"]] == sorted(p["kl"] for p in report["frontier"]["dpo"])
    assert report["frontier"]["sft"][0]["kl"] == 0.0
    [pair] = report["pairwise"]
    assert (pair["a"], pair["b"]) == ("dpo", "sft") and pair["ci"][0] <= pair["diff"] <= pair["ci"][1]
    best = max(report["frontier"]["dpo"], key=lambda p: p["gold"])
    assert pair["a_setting"] == best["setting"]
    assert pair["diff"] == pytest.approx(best["gold"] - report["frontier"]["sft"][0]["gold"], abs=1e-12)
    assert pair["text"].startswith(f"dpo - sft: {pair['diff']:+.3f} [")
    wins = report["win_matrix"]
    assert wins["dpo"]["sft"] + wins["sft"]["dpo"] == pytest.approx(1.0)
    assert report["best_at_budget"] and set(report["seed_std"]) == {"sft", "dpo"}
    assert report["seed_std"]["sft"] is None  # one shared run: no spread across seeds


def test_same_seed_is_bitwise_equal_and_another_seed_is_not(sweep_run, tmp_path):
    from direct import dpo as trainer
    from launch.pipeline import expand

    pipe, result = sweep_run
    member = next(m for m in expand(pipe)["dpo"] if m.key == "dpo/beta0.05-s1")
    cfg = stage_config(pipe, "dpo", {"sft": result["models"]["sft"]}, [f"run_dir={tmp_path / 'again'}",
                                                                         "tracking.backend=none"], member)
    again = trainer.run(cfg, reuse=False)

    def weights(model_dir):
        return open(os.path.join(model_dir, "model.safetensors"), "rb").read()

    first, other = result["models"]["dpo/beta0.05-s1"], result["models"]["dpo/beta0.05-s2"]
    assert weights(again["model_dir"]) == weights(first)
    untimed = lambda metrics: {k: v for k, v in metrics.items() if not k.endswith("per_s")}  # noqa: E731
    assert untimed(again["final_train"]) == untimed(result["stages"]["dpo/beta0.05-s1"]["final_train"])
    assert again["train_tokens"] == result["stages"]["dpo/beta0.05-s1"]["train_tokens"]
    assert weights(other) != weights(first)
    losses = lambda run: [m["loss"] for m in map(json.loads, open(os.path.join(run, "..", "metrics.jsonl")))  # noqa: E731
                          if "loss" in m]
    assert losses(first) != losses(other)


def _wandb_config_value(blob: bytes, key: str):
    """A config value from an offline run's .wandb log: a ConfigItem protobuf is field 1 (key)
    then field 16 (value_json, tag bytes 0x82 0x01) with a varint length."""
    marker = b"\n" + bytes([len(key)]) + key.encode() + b"\x82\x01"
    start = blob.index(marker) + len(marker)
    length, shift = 0, 0
    while True:
        byte = blob[start]
        start += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return json.loads(blob[start:start + length])


def test_wandb_runs_carry_setting_and_seed_and_the_report_logs_frontier_and_pairs(sweep_run):
    pipe, result = sweep_run
    run_dir = os.path.join(pipe.run_root, "dpo", "beta1.0-s2")
    [log] = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    blob = open(log, "rb").read()
    assert _wandb_config_value(blob, "seed") == 2 and _wandb_config_value(blob, "loss")["beta"] == 1.0
    tracking = _wandb_config_value(blob, "tracking")
    assert {"stage=dpo", "setting=beta1.0", "seed=2"} <= set(tracking["tags"]) and tracking["group"] == "sweeptest"
    [report_run] = glob.glob(os.path.join(pipe.run_root, "report", "wandb", "offline-run-*"))
    media = [os.path.basename(p) for p in glob.glob(os.path.join(report_run, "files", "media", "**", "*"), recursive=True)]
    assert any(m.startswith("frontier") and m.endswith(".png") for m in media), media
    assert any(m.startswith("pairwise") and m.endswith(".table.json") for m in media), media
    [table] = glob.glob(os.path.join(report_run, "files", "media", "table", "pairwise*.table.json"))
    rows = json.load(open(table))["data"]
    report = json.load(open(result["report_json"]))
    assert [r[-1] for r in rows] == [p["text"] for p in report["pairwise"]]


def test_a_member_with_a_bad_value_fails_alone(tmp_path):
    """A config error in one member is that member's failure, found before anything starts;
    the pipeline still writes its report, which lists it."""
    path = tmp_path / "p.yaml"
    path.write_text(f"name: bad\nrun_root: {tmp_path}\nstages:\n  sft:\n    stage: sft\n    method: sft\n"
                    "    sweep: {optim.lr: [oops]}\nevaluation: {baseline: sft}\ntracking: {backend: none}\n")
    pipe = load_config(PipelineConfig, str(path))
    result = run_pipeline(pipe)
    assert list(result["failed"]) == ["sft/lroops"] and "optim.lr" in result["failed"]["sft/lroops"]
    report = json.load(open(result["report_json"]))
    assert report["methods"] == [] and report["failed"][0]["error"].startswith("config error")


def test_frontier_pipeline_members_resolve():
    """configs/pipeline/frontier.yaml: 5 methods x 4 settings x 3 seeds, every member a valid
    config in its own folder with its value and seed; SFT and the reward model shared."""
    from launch.pipeline import expand

    pipe = load_config(PipelineConfig, "configs/pipeline/frontier.yaml")
    members = expand(pipe)
    assert [m.key for m in members["sft"]] == ["sft"] and [m.key for m in members["reward_model"]] == ["reward_model"]
    knobs = {"dpo": "loss.beta", "ipo": "loss.beta", "kto": "loss.beta", "ppo": "kl.coef", "grpo": "kl.coef"}
    for name, knob in knobs.items():
        assert len(members[name]) == 12
        for m in members[name]:
            cfg = stage_config(pipe, name, {"sft": "/m/sft", "reward_model": "/m/rm"}, (), m)
            value = dict(m.values)[knob]
            obj = cfg
            for part in knob.split("."):
                obj = getattr(obj, part)
            assert obj == value and cfg.seed == m.seed and cfg.run_dir == os.path.join(pipe.run_root, name, m.label)
    for name in ("ppo", "grpo"):
        kls = [dict(m.values)["kl.coef"] for m in members[name]]
        assert sorted(set(kls)) == [0.01, 0.05, 0.2, 0.5]
    grpo = stage_config(pipe, "grpo", {"sft": "/m/sft"}, (), members["grpo"][0])
    assert grpo.advantage.estimator == "grpo" and grpo.kl.mode == "loss"
