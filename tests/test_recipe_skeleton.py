"""The recipe skeleton (align.stage.StageWorker) in a real recipe: a reward-model run stopped
after its step-3 checkpoint and run again resumes there and ends equal to the uninterrupted run,
export (with the reward normalisation) included."""

import json
import os
import shutil

from align.config import load_config
from align.tracking import read_metrics
from reward_model import train


def _train_rows(run_dir):
    return {m["step"]: m for m in read_metrics(run_dir) if "loss" in m}


def test_interrupted_stage_resumes_from_its_checkpoint(ray_session, tmp_path, quick):
    cfg = load_config(train.RMConfig, "configs/reward_model/default.yaml", quick(tmp_path / "rm", **{
        "train.max_steps": 6, "train.save_every": 3, "train.eval_every": 0, "train.log_every": 1,
        "deepspeed.micro_batch_size": 8, "data.train": '[{path: "builtin:preferences", max_rows: 96}]',
        "data.eval": '[{path: "builtin:preferences_eval", max_rows: 16}]'}))
    whole = train.run(cfg, reuse=False)
    rows = _train_rows(cfg.run_dir)
    with open(os.path.join(whole["model_dir"], "config.json")) as fh:
        exported = json.load(fh)
    assert sorted(os.listdir(os.path.join(cfg.run_dir, "checkpoints"))) == ["latest", "step3"]

    # "Interrupted" after step 3: no DONE.json, no model, metrics only up to step 3.
    os.remove(os.path.join(cfg.run_dir, "DONE.json"))
    shutil.rmtree(whole["model_dir"])
    with open(os.path.join(cfg.run_dir, "metrics.jsonl"), "w") as fh:
        fh.writelines(json.dumps(rows[s]) + "\n" for s in (1, 2, 3))
    resumed = train.run(cfg, reuse=False)
    again = _train_rows(cfg.run_dir)

    for step in (4, 5, 6):  # bitwise: same data position, RNG and optimizer state
        for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/mean", "rewards/std", "lr", "tokens"):
            assert again[step][key] == rows[step][key], (step, key)
    assert resumed["final_eval"] == whole["final_eval"]
    with open(os.path.join(resumed["model_dir"], "config.json")) as fh:
        config = json.load(fh)
    assert (config["reward_mean"], config["reward_std"]) == (exported["reward_mean"], exported["reward_std"])
    assert config["reward_mean"] == whole["final_eval"]["eval/rewards/mean"]
