"""PPO and the critic-free estimators with LoRA (model.lora): the policy ranks serve the reference
with their adapter off, so no reference group starts; the value model trains its adapters and
its score head. One PPO (gae) run from the session SFT policy, on the gold reward (no reward
group), 2 steps with a checkpoint after step 1, then the same run resumed from that checkpoint.
"""

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from align.config import load_config

LORA = {"model.lora.r": 8, "model.lora.alpha": 16}


@pytest.mark.parametrize("path, overrides, groups", [
    ("configs/ppo/default.yaml", [], ("policy", "value", "reward")),
    ("configs/ppo/grpo.yaml", [], ("policy",)),
    ("configs/ppo/grpo.yaml", ["advantage.estimator=dr_grpo"], ("policy",)),
    ("configs/ppo/rloo.yaml", [], ("policy",)),
    ("configs/ppo/reinforce_pp.yaml", [], ("policy",)),
])
def test_lora_starts_no_reference_group_for_any_estimator(path, overrides, groups):
    from rlhf.ppo import PPOConfig
    from rlhf.rollout import groups_for

    cfg = load_config(PPOConfig, path, ["model.name_or_path=/m", "model.lora.r=16", *overrides])
    assert groups_for(cfg) == groups


def test_lora_with_another_reference_model_names_the_key():
    from align.config import ConfigError
    from rlhf.ppo import PPOConfig

    with pytest.raises(ConfigError, match="reference_model: with model.lora"):
        load_config(PPOConfig, "configs/ppo/grpo.yaml", ["model.name_or_path=/m", "model.lora.r=16",
                                                         "reference_model=/other"])


def _overrides(sft_model_dir):
    return {"model.name_or_path": sft_model_dir, "value_model": sft_model_dir, "reward.fns": "[{fn: gold}]",
            **LORA, "train.max_steps": 2, "train.save_every": 1, "rollout_batch_size": 16,
            "deepspeed.micro_batch_size": 16, "ppo_epochs": 1, "num_minibatches": 1,
            "sampling.max_new_tokens": 16, "eval_sampling.max_new_tokens": 16, "eval_prompts": 8,
            "eval_at_start": False, "optim.lr": 1e-2, "value_lr": 1e-2}


@pytest.fixture(scope="module")
def ppo_lora(sft_model_dir, quick, tmp_path_factory):
    """The 2-step run (it checkpoints step 1), then a second run in the same directory, which
    resumes from step 1's checkpoint and trains step 2 again."""
    from align.tracking import read_metrics
    from rlhf import ppo
    from rlhf.ppo import PPOConfig
    from rlhf.rollout import groups_for

    run_dir = tmp_path_factory.mktemp("ppo_lora")
    cfg = load_config(PPOConfig, "configs/ppo/default.yaml", quick(run_dir, **_overrides(sft_model_dir)))
    whole = ppo.run(cfg, reuse=False)
    metrics = {r["step"]: r for r in read_metrics(str(run_dir)) if "objective/kl" in r}
    ckpt = {g: load_checkpoint_files(run_dir / "checkpoints" / g / "step1") for g in ("policy", "value")}
    first = load_file(os.path.join(whole["model_dir"], "model.safetensors"))
    # The last step is exported, not checkpointed: the second run resumes from step 1.
    assert sorted(os.listdir(run_dir / "checkpoints" / "policy")) == ["latest", "step1"]
    resumed = ppo.run(cfg, reuse=False)
    return {"groups": groups_for(cfg), "summary": whole, "metrics": metrics, "ckpt": ckpt, "first": first,
            "resumed": load_file(os.path.join(resumed["model_dir"], "model.safetensors"))}


def load_checkpoint_files(path):
    # DeepSpeed's own files (our own run's, in a temporary directory) need weights_only=False.
    return torch.load(path / "mp_rank_00_model_states.pt", weights_only=False)


@pytest.mark.usefixtures("ray_session")
def test_ppo_with_lora_uses_the_adapter_off_reference(ppo_lora):
    out = ppo_lora
    assert out["groups"] == ("policy", "value")  # no reference (LoRA), no reward model (gold)
    m1, m2 = out["metrics"][1], out["metrics"][2]
    # Step 1: B = 0, so the policy is its own adapter-off reference: every token's log-ratio is 0.
    assert m1["objective/kl"] == 0.0 and m1["objective/kl_per_token"] == 0.0
    assert m1["objective/non_score_reward"] == 0.0
    # After one update the adapter is no longer a no-op: the policy has left the reference.
    assert math.isfinite(m2["objective/kl"]) and abs(m2["objective/kl_per_token"]) > 1e-5
    assert all(math.isfinite(m[k]) for m in (m1, m2) for k in ("loss/policy", "loss/value", "policy/grad_norm",
                                                                 "value/grad_norm"))
    final = out["summary"]["final_eval"]
    assert final["eval/n"] == 8 and math.isfinite(final["eval/kl"]) and final["eval/kl"] != 0.0


@pytest.mark.usefixtures("ray_session")
def test_ppo_with_lora_trains_and_checkpoints_only_the_adapters_and_the_value_head(ppo_lora, sft_model_dir):
    policy, value = ppo_lora["ckpt"]["policy"], ppo_lora["ckpt"]["value"]
    adapter = {k: v for k, v in policy["module"].items() if "lora_" in k}
    assert len(adapter) == 2 * 7 * 4  # A and B of 7 projections in each of the 4 layers
    assert set(policy["module"]) - set(adapter) == {"lm_head.weight"}  # the tied alias, see test_lora_stages
    opt = policy["optimizer"]["state"]
    assert sum(v["exp_avg"].numel() for v in opt.values()) == sum(v.numel() for v in adapter.values())
    # The value model: its adapters and the fully trained copy of its score head (128 -> 1), no backbone.
    v_adapter = {k: v for k, v in value["module"].items() if "lora_" in k}
    assert len(v_adapter) == 2 * 7 * 4
    head = set(value["module"]) - set(v_adapter)
    assert head == {"model.score.modules_to_save.default.weight"}, head
    trained = sum(v.numel() for v in v_adapter.values()) + 128
    assert sum(v["exp_avg"].numel() for v in value["optimizer"]["state"].values()) == trained
    # The merged export: adapted projections moved, everything without an adapter is the SFT model's.
    sft = load_file(os.path.join(sft_model_dir, "model.safetensors"))
    got = ppo_lora["first"]
    assert got.keys() == sft.keys()
    frozen = [k for k in sft if not k.endswith("_proj.weight")]  # embeddings, norms
    assert frozen and all(torch.equal(got[k], sft[k]) for k in frozen)
    assert all(not torch.equal(got[k], sft[k]) for k in sft if k.endswith("_proj.weight"))


@pytest.mark.usefixtures("ray_session")
def test_ppo_with_lora_resumes_bitwise_from_adapter_only_checkpoints(ppo_lora):
    a, b = ppo_lora["first"], ppo_lora["resumed"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
