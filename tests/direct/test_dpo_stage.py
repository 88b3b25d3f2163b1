"""The pairwise stage end to end on the default task, from the session's SFT policy.

One DPO run (module fixture) is shared by several tests; IPO reuses its reference cache;
SimPO and ORPO need none; a 2-rank ZeRO-3 run reproduces its first steps.
"""

import math
import os

import pytest
import torch

from align.config import load_config
from direct import dpo as recipe
from reward_model.labellers import make_labeller

TRAIN = '[{path: "builtin:preferences", max_rows: 640}]'
EVAL = '[{path: "builtin:preferences_eval", max_rows: 64}]'


def _config(run_dir, quick, model_dir, **overrides):
    base = {"model.name_or_path": model_dir, "data.train": TRAIN, "data.eval": EVAL, "deepspeed.micro_batch_size": 16,
            "train.eval_every": 0, "train.save_every": 0, "train.log_every": 1, "final_samples": 0}
    base.update(overrides)
    return load_config(recipe.DPOConfig, "configs/dpo/default.yaml", quick(run_dir, **base))


@pytest.fixture(scope="module")
def dpo(sft_model_dir, sft_gold, quick, read_metrics, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dpo")
    cfg = _config(run_dir, quick, sft_model_dir, **{"train.max_steps": 20, "optim.lr": 1e-3, "optim.warmup_steps": 5,
                                                    "deepspeed.micro_batch_size": 32, "final_samples": sft_gold["samples/n"]})
    return recipe.run(cfg, reuse=False), read_metrics(run_dir)


def test_dpo_starts_at_ln2_and_learns_the_preferences(dpo):
    summary, metrics = dpo
    first, last = metrics[1], [metrics[s] for s in range(16, 21)]
    # Policy == reference at step 1: every implicit reward is 0 and the loss is ln 2.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert all(math.isfinite(m["loss"]) for m in metrics.values())
    assert sum(m["loss"] for m in last) / 5 < first["loss"] - 0.05
    assert sum(m["rewards/accuracies"] for m in last) / 5 > 0.7
    assert summary["final_eval"]["eval/rewards/accuracies"] > 0.65
    assert summary["final_eval"]["eval/rewards/margins"] > 0
    assert summary["reference_cache"]["train"]["computed"] and summary["reference_cache"]["eval"]["computed"]


def test_dpo_raises_the_held_out_gold_score_above_sft(dpo, sft_gold):
    final = dpo[0]["final_eval"]
    assert final["samples/n"] == sft_gold["samples/n"] == 64
    assert final["samples/gold"] > sft_gold["samples/gold"] + 0.25
    assert final["samples/gold_ci_low"] > sft_gold["samples/gold_ci_high"]


def test_ipo_reuses_the_reference_cache_and_learns(dpo, sft_model_dir, quick, read_metrics, tmp_path):
    paths = {k: v["path"] for k, v in dpo[0]["reference_cache"].items()}
    mtimes = {k: os.stat(p).st_mtime_ns for k, p in paths.items()}
    cfg = _config(tmp_path, quick, sft_model_dir, **{"loss.name": "ipo", "loss.beta": 0.5, "train.max_steps": 12,
                                                     "optim.lr": 2e-3, "optim.warmup_steps": 3,
                                                     "deepspeed.micro_batch_size": 32})
    summary = recipe.run(cfg, reuse=False)
    cache = summary["reference_cache"]
    assert not cache["train"]["computed"] and not cache["eval"]["computed"]  # no reference forward
    assert {k: v["path"] for k, v in cache.items()} == paths
    assert {k: os.stat(p).st_mtime_ns for k, p in paths.items()} == mtimes
    metrics = read_metrics(tmp_path)
    # (h - 1/(2 beta))^2 with h = 0 at the start: exactly 1.
    assert metrics[1]["loss"] == pytest.approx(1.0, abs=1e-5)
    assert all(math.isfinite(m["loss"]) for m in metrics.values())
    # At the start every margin is 0 and no pair is ranked right; held-out pairs now are.
    assert summary["final_eval"]["eval/rewards/margins"] > 0.02
    assert summary["final_eval"]["eval/rewards/accuracies"] > 0.5


@pytest.mark.parametrize("name,overrides", [
    ("simpo", {"loss.beta": 2.0, "loss.gamma": 1.0}),
    ("orpo", {"loss.beta": 0.5}),
])
def test_reference_free_losses_fit_a_batch(name, overrides, sft_model_dir, quick, read_metrics, tmp_path):
    # One batch of 32 pairs seen every step: the loss must go down and the ranking improve.
    cfg = _config(tmp_path, quick, sft_model_dir, **{
        "loss.name": name, "train.max_steps": 10, "optim.lr": 1e-3, "optim.warmup_steps": 0,
        "deepspeed.micro_batch_size": 32, "data.train": '[{path: "builtin:preferences", max_rows: 32}]',
        "data.eval": "[]", **overrides})
    summary = recipe.run(cfg, reuse=False)
    assert summary["reference_cache"] == {}  # no reference model at all
    metrics = read_metrics(tmp_path)
    assert all(math.isfinite(m["loss"]) for m in metrics.values())
    assert metrics[10]["loss"] < metrics[1]["loss"] - 0.05
    assert metrics[10]["rewards/accuracies"] > metrics[1]["rewards/accuracies"] + 0.2
    if name == "orpo":
        assert metrics[10]["nll"] < metrics[1]["nll"]  # its SFT term keeps the chosen likely


def test_two_ranks_under_zero3_match_one_rank(dpo, sft_model_dir, quick, read_metrics, tmp_path):
    """Same global batch (2 x 16 rows vs 1 x 32): the loss is the exact global mean, the rows are
    the same (BatchIterator slices one global batch across ranks) and ZeRO-3 gathers the full
    weights for every forward, so only float summation order differs."""
    cfg = _config(tmp_path / "run", quick, sft_model_dir, **{
        "train.max_steps": 2, "optim.lr": 1e-3, "optim.warmup_steps": 5, "ray.num_actors": 2,
        "ray.cpus_per_actor": 1, "deepspeed.zero_stage": 3, "deepspeed.param_persistence_threshold": 0,
        "deepspeed.micro_batch_size": 16, "reference_cache": str(tmp_path / "cache")})
    summary = recipe.run(cfg, reuse=False)
    one, two = dpo[1], read_metrics(tmp_path / "run")
    for key in ("loss", "logps/chosen", "logps/rejected"):
        assert two[1][key] == pytest.approx(one[1][key], rel=1e-5)
    # Step 2 follows one ZeRO-3 optimizer step on partitioned weights.
    assert two[2]["loss"] == pytest.approx(one[2]["loss"], rel=1e-4)
    # The reference log-probs, computed sharded over 2 ranks into a fresh cache, equal the 1-rank ones.
    from safetensors.torch import load_file

    for split in ("train", "eval"):
        assert summary["reference_cache"][split]["computed"]
        sharded = load_file(summary["reference_cache"][split]["path"])
        single = load_file(dpo[0]["reference_cache"][split]["path"])
        for k in single:
            torch.testing.assert_close(sharded[k], single[k], rtol=1e-5, atol=1e-5)


def test_loss_config_is_checked():
    from align.config import ConfigError

    with pytest.raises(ConfigError, match="not one of .*'dpo'"):
        load_config(recipe.DPOConfig, "configs/dpo/default.yaml", ["loss.name=dpp"])
    with pytest.raises(ConfigError, match="loss.gamma"):
        load_config(recipe.DPOConfig, "configs/dpo/default.yaml", ["loss.gamma=1.0"])
    cfg = load_config(recipe.DPOConfig, "configs/dpo/default.yaml", ["loss.name=cdpo", "loss.label_smoothing=0.1"])
    assert cfg.loss.hparams() == {"beta": 0.1, "label_smoothing": 0.1}


def test_online_rounds_sample_label_and_train(sft_model_dir, quick, read_metrics, tmp_path):
    cfg = _config(tmp_path, quick, sft_model_dir, **{
        "online.rounds": 2, "online.steps_per_round": 2, "online.prompts_per_round": 24,
        "online.samples_per_prompt": 4, "online.sampling.max_new_tokens": 32, "optim.lr": 1e-3, "data.eval": "[]"})
    summary = recipe.run(cfg, reuse=False)
    assert summary["steps"] == 4
    metrics = read_metrics(tmp_path)
    assert [metrics[s].get("online/round") for s in (1, 2, 3, 4)] == [0, None, 1, None]
    for s in (1, 3):  # gold scores are continuous, so few of the 24 prompts tie
        assert 16 <= metrics[s]["online/pairs"] <= 24 and -1.5 <= metrics[s]["online/score"] <= 1.5
    assert metrics[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    assert all(math.isfinite(m["loss"]) for m in metrics.values())


def test_labellers(builtin_tokenizer, tmp_path):
    from align.config import ModelConfig
    from align.models.builders import build_scalar_model, save_pretrained

    prompts = [[{"role": "user", "content": "Review the movie Iron Road."}]] * 3
    responses = ['{"stars": 5}', "The plot was great.", "The plot was awful."]
    json_rule = make_labeller("json", "builtin:prompts")
    assert json_rule(prompts, responses) == [1.0, 0.0, 0.0]
    gold = make_labeller("gold", "builtin:prompts")
    assert gold(prompts, responses) == [-1.0, 1.0, -1.0]
    # A (random) one-output model saved like the reward-model stage's: scored through RewardScorer.
    model = build_scalar_model(ModelConfig(name_or_path="builtin:tiny-1m"), builtin_tokenizer)
    save_pretrained(model, builtin_tokenizer, str(tmp_path / "rm"))
    rm = make_labeller("reward_model", "builtin:prompts", reward_model=str(tmp_path / "rm"))
    scores = rm(prompts, responses)
    assert len(scores) == 3 and len(set(scores)) == 3 and all(math.isfinite(s) for s in scores)
