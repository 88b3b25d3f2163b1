"""Every shipped YAML config loads into its stage's config class (real-model examples too:
they cannot run here, but a typo in one must not wait for a GPU cluster to be found)."""

import glob
import os

import pytest

from align.config import load_config
from launch.cli import STAGES, config_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _configs():
    out = []
    for stage in STAGES:
        paths = glob.glob(os.path.join(ROOT, "configs", stage, "*.yaml"))
        paths += glob.glob(os.path.join(ROOT, "configs", "examples", f"{stage}_*.yaml"))
        out += [(stage, p) for p in sorted(paths)]
    return out


@pytest.mark.parametrize("stage,path", _configs(), ids=lambda v: os.path.relpath(v, ROOT) if "/" in str(v) else v)
def test_shipped_config_loads(stage, path):
    cls = config_class(stage)
    if cls is None:
        pytest.fail(f"{path}: config for stage {stage!r}, whose module is missing")
    cfg = load_config(cls, path)
    assert cfg.run_dir and cfg.model.name_or_path
    assert cfg.model.trust_remote_code is False


def test_every_stage_has_a_default_config_or_no_module():
    shipped = {stage for stage, _ in _configs()}
    assert "sft" in shipped
    for stage in STAGES:
        if config_class(stage) is not None:
            assert os.path.exists(os.path.join(ROOT, STAGES[stage][1])), stage


def test_real_model_examples_use_zero3_and_bf16():
    cfg = load_config(config_class("sft"), os.path.join(ROOT, "configs/examples/sft_llama8b_zero3_offload_multinode.yaml"))
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.precision) == (3, "bf16")
    assert cfg.deepspeed.offload_optimizer and cfg.deepspeed.offload_params
    assert cfg.ray.address == "auto" and cfg.ray.num_actors == 16


def test_smollm2_lora_pipeline_is_the_smollm2_pipeline_with_lora_in_every_stage():
    """Every training stage resolves with model.lora r=16 on every linear layer (the label stage
    trains nothing and takes none); apart from LoRA and the learning rates it is
    configs/pipeline/smollm2.yaml; its PPO starts no reference and no reward group, its GRPO only
    the policy."""
    import dataclasses

    from launch.pipeline import PipelineConfig, order, stage_config
    from rlhf.rollout import groups_for

    pipes = {p: load_config(PipelineConfig, os.path.join(ROOT, f"configs/pipeline/{p}.yaml"))
             for p in ("smollm2", "smollm2_lora")}
    names = order(pipes["smollm2"].stages)
    assert order(pipes["smollm2_lora"].stages) == names
    assert set(names) == {"sft", "label", "dpo", "kto", "reward_model", "ppo", "grpo"}
    models = {**{n: f"/models/{n}" for n in names},
              **{f"label/{out}": f"/data/{out}.jsonl" for out in ("pairs", "binary", "rankings")}}
    for name in names:
        plain, lora = (dataclasses.asdict(stage_config(pipes[p], name, models)) for p in ("smollm2", "smollm2_lora"))
        assert plain["model"]["lora"]["r"] == 0
        if name == "label":
            assert lora == {**plain, "run_dir": lora["run_dir"], "tracking": lora["tracking"]}
            continue
        assert lora["model"]["lora"] == {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear"}
        assert lora["optim"]["lr"] > plain["optim"]["lr"]
        for cfg in (plain, lora):
            for key in ("run_dir", "value_lr"):
                cfg.pop(key, None)
            cfg["model"].pop("lora"), cfg["optim"].pop("lr"), cfg["tracking"].pop("group")
        assert plain == lora, name
    ppo = stage_config(pipes["smollm2_lora"], "ppo", models)
    assert groups_for(ppo) == ("policy", "value")  # the adapters-off policy and value serve reference and reward
    assert groups_for(stage_config(pipes["smollm2_lora"], "grpo", models)) == ("policy",)
