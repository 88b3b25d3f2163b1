"""Plackett-Luce DPO (`loss.name: plackett_luce`) in the DPO recipe, on the task's 4-way rankings.

The policy starts as the reference (the same built-in tiny model and seed), so at step 1 every
implicit reward is 0 and each ranking's loss is -sum_k log(1 / (K - k)) = log K! = log 24.
"""

import math

import pytest

from align.config import ConfigError, load_config
from align.tracking import read_metrics
from direct import dpo as recipe


def _config(run_dir, quick, **extra):
    overrides = {"loss.name": "plackett_luce", "loss.beta": 0.1, "data.train": '[{path: "builtin:rankings", max_rows: 96}]',
                 "data.eval": "[]", "data.eval_fraction": 0.25, "deepspeed.micro_batch_size": 8, "train.max_steps": 16,
                 "train.eval_every": 0, "train.save_every": 0, "train.log_every": 1, "train.eval_before_training": True,
                 "final_samples": 0, "optim.lr": 2e-3, "optim.warmup_steps": 2}
    overrides.update(extra)
    return load_config(recipe.DPOConfig, "configs/dpo/default.yaml", quick(run_dir, **overrides))


def test_plackett_luce_starts_at_log_k_factorial_and_learns_the_rankings(ray_session, tmp_path, quick):
    cfg = _config(tmp_path, quick)
    summary = recipe.run(cfg, reuse=False)
    rows = read_metrics(cfg.run_dir)
    train = {m["step"]: m for m in rows if "loss" in m}
    initial = summary["initial_eval"]
    assert initial["eval/loss"] == pytest.approx(math.log(24), abs=1e-5)
    assert initial["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert train[1]["loss"] == pytest.approx(math.log(24), abs=1e-5)
    assert train[1]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    last = [train[s]["loss"] for s in range(12, 17)]
    assert sum(last) / 5 < math.log(24) - 0.3
    final = summary["final_eval"]
    assert final["eval/loss"] < math.log(24) - 0.1
    assert final["eval/rewards/margins"] > 0 and final["eval/rewards/accuracies"] > 0.6
    assert summary["loss"] == {"name": "plackett_luce", "beta": 0.1}
    assert summary["reference_cache"]["train"]["computed"] and summary["train_rows"] == 72


def test_plackett_luce_config_errors():
    with pytest.raises(ConfigError, match="loss.gamma"):
        load_config(recipe.DPOConfig, overrides=["loss.name=plackett_luce", "loss.gamma=1.0"])
    with pytest.raises(ConfigError, match="online.rounds"):
        load_config(recipe.DPOConfig, overrides=["loss.name=plackett_luce", "online.rounds=1"])
    with pytest.raises(ConfigError, match="plackett_luce"):
        load_config(recipe.DPOConfig, overrides=["loss.name=listwise"])
