"""`deepspeed.precision: bf16` through every training stage on the tiny model (SFT, reward model,
DPO, KTO, and the RL stage with GRPO), forced with `precision_fallback=keep` so that it runs bf16
on CPUs without bf16 hardware too (slowly, but the tiny model is small). Asserts against fp32 and
against hand-derived values."""

import json
import math
import os

import pytest

from align.config import load_config

STEPS = 2


def _train_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [row for row in map(json.loads, fh) if "loss" in row or "loss/policy" in row]


def _losses(run_dir):
    return [row["loss"] for row in _train_rows(run_dir) if "loss" in row]


# The supervised and direct stages' keys; the reward model and the RL stage have no final samples.
SAMPLED = {"final_samples": 0, "data.eval": "[]"}


def _run(module, cls, config, run_dir, quick, precision, **extra):
    overrides = {"train.max_steps": STEPS, "train.log_every": 1, "train.save_every": 0, "train.eval_every": 0,
                 "deepspeed.precision": precision, "deepspeed.precision_fallback": "keep", **extra}
    cfg = load_config(cls, config, quick(run_dir, **overrides))
    summary = module.run(cfg, reuse=False)
    return _losses(run_dir), summary


@pytest.mark.usefixtures("ray_session")
def test_sft_in_bf16_follows_fp32(tmp_path, quick):
    from rlhf import sft

    fp32, _ = _run(sft, sft.SFTConfig, "configs/sft/default.yaml", tmp_path / "fp32", quick, "fp32",
                      **SAMPLED)
    bf16, summary = _run(sft, sft.SFTConfig, "configs/sft/default.yaml", tmp_path / "bf16", quick, "bf16",
                                **SAMPLED)
    assert len(fp32) == len(bf16) == STEPS
    # A fresh tiny model starts near ln(512) = 6.24 nats a token in both; bf16 keeps 8 mantissa
    # bits (relative error 2^-8 = 0.4% per rounding), so the first loss agrees to about 1%.
    assert abs(fp32[0] - math.log(512)) < 0.5
    assert bf16[0] == pytest.approx(fp32[0], rel=1e-2)
    assert bf16[0] != fp32[0]  # it really ran in bf16
    assert os.path.exists(os.path.join(summary["model_dir"], "model.safetensors"))


@pytest.mark.usefixtures("ray_session")
def test_dpo_in_bf16_starts_at_ln2(tmp_path, quick, sft_model_dir):
    from direct import dpo

    losses, _ = _run(dpo, dpo.DPOConfig, "configs/dpo/default.yaml", tmp_path / "bf16", quick, "bf16",
                        **{"model.name_or_path": sft_model_dir, **SAMPLED})
    # The policy equals its reference at step 1 and both are scored by the same bf16 model, so
    # every log-ratio is 0 and the loss is -log sigmoid(0) = ln 2.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert math.isfinite(losses[1]) and losses[1] != losses[0]


@pytest.mark.usefixtures("ray_session")
def test_kto_in_bf16_starts_at_one_half(tmp_path, quick, sft_model_dir):
    from direct import kto

    data = '[{path: "builtin:binary", max_rows: 64}]'
    losses, _ = _run(kto, kto.KTOConfig, "configs/kto/default.yaml", tmp_path / "bf16", quick, "bf16",
                        **{"model.name_or_path": sft_model_dir, "data.train": data, **SAMPLED})
    # Policy = reference at step 1: every reward and the KL estimate are 0, so each example's loss
    # lambda - lambda * sigmoid(beta * (r - z_ref)) (KTO, Ethayarajh et al. 2024; unit weights) is
    # 1 - sigmoid(0) = 1/2.
    assert losses[0] == pytest.approx(0.5, abs=1e-3)
    assert math.isfinite(losses[1]) and losses[1] != losses[0]


@pytest.mark.usefixtures("ray_session")
def test_reward_model_in_bf16_follows_fp32(tmp_path, quick, sft_model_dir):
    from reward_model import train as rm

    extra = {"model.name_or_path": sft_model_dir, "deepspeed.micro_batch_size": 16}
    fp32, _ = _run(rm, rm.RMConfig, "configs/reward_model/default.yaml", tmp_path / "fp32", quick,
                      "fp32", **extra)
    bf16, _ = _run(rm, rm.RMConfig, "configs/reward_model/default.yaml", tmp_path / "bf16", quick,
                      "bf16", **extra)
    # A new score head gives near-equal scores to both sides: the Bradley-Terry loss starts near
    # -log sigmoid(0) = ln 2, and bf16's scores follow fp32's to its 8-bit mantissa.
    assert fp32[0] == pytest.approx(math.log(2), abs=0.05)
    assert bf16[0] == pytest.approx(fp32[0], abs=2e-2)
    assert bf16 != fp32


@pytest.mark.usefixtures("ray_session")
def test_grpo_in_bf16_starts_on_policy(tmp_path, quick, sft_model_dir):
    from rlhf import ppo

    extra = {"model.name_or_path": sft_model_dir, "sampling.max_new_tokens": 16, "eval_prompts": 0,
             "eval_at_start": False, "ppo_epochs": 1, "num_minibatches": 1}
    _, summary = _run(ppo, ppo.PPOConfig, "configs/ppo/grpo.yaml", tmp_path / "bf16", quick, "bf16", **extra)
    first, second = _train_rows(tmp_path / "bf16")
    # Step 1: the policy and its reference are the same bf16 weights run the same way, and the
    # update's log-probs are those of the policy that sampled (one epoch, one mini-batch): KL 0,
    # ratio 1 (to rounding: the old log-probs come from the sampler, which runs the same layers
    # one position at a time). GRPO's advantages sum to 0 in each group, so the first policy loss
    # -mean(A) is 0.
    assert first["policy/kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["policy/ratio"] == pytest.approx(1.0, abs=2e-5)
    assert first["loss/policy"] == pytest.approx(0.0, abs=1e-6)
    # Step 2 samples from the updated policy, which has moved away from its reference.
    assert second["policy/kl"] > 0 and summary["steps"] == STEPS
