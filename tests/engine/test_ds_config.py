"""build_ds_config and lr_lambda: config fields to DeepSpeed JSON, and the LR multipliers by hand."""

import json
import math

import pytest

from align.config import ConfigError, DeepSpeedConfig, OptimConfig
from align.engine.deepspeed_engine import build_ds_config, lr_lambda


def test_stage0_fp32_defaults():
    ds = DeepSpeedConfig(zero_stage=0, micro_batch_size=4, grad_accum_steps=3)
    cfg = build_ds_config(ds, OptimConfig(grad_clip=0.7), world_size=2)
    assert cfg["zero_optimization"] == {"stage": 0}
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 4 * 3 * 2
    assert cfg["gradient_clipping"] == 0.7
    assert cfg["bf16"] == {"enabled": False}
    assert cfg["fp16"]["enabled"] is False
    # A client torch optimizer must stay usable under ZeRO offload (no cpu_adam build).
    assert cfg["zero_force_ds_cpu_optimizer"] is False


def test_stage2_optimizer_offload():
    cfg = build_ds_config(DeepSpeedConfig(zero_stage=2, offload_optimizer=True), OptimConfig(), world_size=1)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 2
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in zero
    assert not any(key.startswith("stage3_") for key in zero)


def test_stage3_param_offload_and_persistence_threshold():
    ds = DeepSpeedConfig(zero_stage=3, offload_params=True, param_persistence_threshold=0)
    zero = build_ds_config(ds, OptimConfig(), world_size=2)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_param"]["device"] == "cpu"
    assert "offload_optimizer" not in zero
    assert zero["stage3_param_persistence_threshold"] == 0
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_stage3_threshold_left_to_deepspeed_when_unset():
    zero = build_ds_config(DeepSpeedConfig(zero_stage=3), OptimConfig(), world_size=2)["zero_optimization"]
    assert "stage3_param_persistence_threshold" not in zero
    assert "offload_param" not in zero


@pytest.mark.parametrize("precision, bf16, fp16", [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)])
def test_precision(precision, bf16, fp16):
    # `weights`: DeepSpeed casts the model (bf16 by autocast leaves DeepSpeed an fp32 model).
    cfg = build_ds_config(DeepSpeedConfig(precision=precision, mixed_precision="weights"), OptimConfig(), world_size=1)
    assert cfg["bf16"]["enabled"] is bf16
    assert cfg["fp16"]["enabled"] is fp16


def test_eval_engine_config_has_no_accumulation_or_clipping():
    ds = DeepSpeedConfig(micro_batch_size=4, grad_accum_steps=8)
    cfg = build_ds_config(ds, OptimConfig(grad_clip=1.0), world_size=2, train=False)
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["train_batch_size"] == 4 * 2
    assert cfg["gradient_clipping"] == 0.0


def test_raw_config_keys_win_and_merge_deeply(tmp_path):
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({
        "gradient_clipping": 0.25,
        "zero_optimization": {"reduce_bucket_size": 1000, "stage3_param_persistence_threshold": 7},
        "activation_checkpointing": {"partition_activations": True},
    }))
    ds = DeepSpeedConfig(zero_stage=3, param_persistence_threshold=0, raw_config=str(raw))
    cfg = build_ds_config(ds, OptimConfig(grad_clip=1.0), world_size=2)
    assert cfg["gradient_clipping"] == 0.25
    # Nested dicts merge: the user's keys are added or replaced, ours stay otherwise.
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 7
    assert cfg["activation_checkpointing"] == {"partition_activations": True}
    assert cfg["train_micro_batch_size_per_gpu"] == 8


def test_raw_config_missing_file_names_the_key(tmp_path):
    ds = DeepSpeedConfig(raw_config=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match=r"deepspeed\.raw_config.*missing\.json"):
        build_ds_config(ds, OptimConfig(), world_size=1)


def test_raw_config_bad_json_names_the_key_and_file(tmp_path):
    raw = tmp_path / "broken.json"
    raw.write_text("{not json")
    with pytest.raises(ConfigError, match=r"deepspeed\.raw_config.*broken\.json.*not valid JSON"):
        build_ds_config(DeepSpeedConfig(raw_config=str(raw)), OptimConfig(), world_size=1)


# lr_lambda(step) multiplies the base LR for optimizer step `step` (0-based). Warm-up ramps
# (step + 1) / (warmup + 1), so the first step never has LR 0; the decay then runs over the
# remaining total - warmup steps.


def test_lr_constant_with_warmup():
    f = lr_lambda(OptimConfig(scheduler="constant", warmup_steps=4), total_steps=10)
    assert [f(s) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert f(100) == 1.0


def test_lr_constant_without_warmup():
    f = lr_lambda(OptimConfig(scheduler="constant"), total_steps=10)
    assert f(0) == 1.0 and f(9) == 1.0


def test_lr_linear_with_warmup():
    # warmup 2, total 10: decay over 8 steps from step 2.
    f = lr_lambda(OptimConfig(scheduler="linear", warmup_steps=2), total_steps=10)
    assert f(0) == pytest.approx(1 / 3)
    assert f(1) == pytest.approx(2 / 3)
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(1 - 4 / 8)
    assert f(9) == pytest.approx(1 - 7 / 8)
    assert f(10) == pytest.approx(0.0)
    assert f(50) == pytest.approx(0.0)  # clamped after the end, never negative


def test_lr_cosine_with_warmup():
    f = lr_lambda(OptimConfig(scheduler="cosine", warmup_steps=2), total_steps=10)
    assert f(1) == pytest.approx(2 / 3)
    assert f(2) == pytest.approx(1.0)
    assert f(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))  # 0.853553...
    assert f(4) == pytest.approx(0.8535534, abs=1e-7)
    assert f(6) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.0, abs=1e-12)
    assert f(50) == pytest.approx(0.0, abs=1e-12)
