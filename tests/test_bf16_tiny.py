"""`deepspeed.precision: bf16` through real stages on the tiny model, forced with
`precision_fallback=keep` so that it runs bf16 on CPUs without bf16 hardware too (slowly, but the
tiny model is small). Asserts against fp32 and against hand-derived values."""

import json
import math
import os

import pytest

from align.config import load_config

STEPS = 2


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]


def _run(module, cls, config, run_dir, quick, precision, **extra):
    overrides = {"train.max_steps": STEPS, "train.log_every": 1, "train.save_every": 0, "train.eval_every": 0,
                 "final_samples": 0, "data.eval": "[]", "deepspeed.precision": precision,
                 "deepspeed.precision_fallback": "keep", **extra}
    cfg = load_config(cls, config, quick(run_dir, **overrides))
    summary = module.run(cfg, reuse=False)
    saved = json.load(open(os.path.join(run_dir, "run_info.json")))
    return _losses(run_dir), summary, saved


@pytest.mark.usefixtures("ray_session")
def test_sft_in_bf16_follows_fp32(tmp_path, quick):
    from rlhf import sft

    fp32, _, _ = _run(sft, sft.SFTConfig, "configs/sft/default.yaml", tmp_path / "fp32", quick, "fp32")
    bf16, summary, _ = _run(sft, sft.SFTConfig, "configs/sft/default.yaml", tmp_path / "bf16", quick, "bf16")
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

    losses, _, _ = _run(dpo, dpo.DPOConfig, "configs/dpo/default.yaml", tmp_path / "bf16", quick, "bf16",
                        **{"model.name_or_path": sft_model_dir})
    # The policy equals its reference at step 1 and both are scored by the same bf16 model, so
    # every log-ratio is 0 and the loss is -log sigmoid(0) = ln 2.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert math.isfinite(losses[1]) and losses[1] != losses[0]
