"""PPO and the critic-free estimators with LoRA (model.lora): the policy ranks serve the reference
with their adapter off, so no reference group starts; the value model trains its adapters and
its score head and, started from the reward model, serves the reward with its adapters off, so
no reward group starts either. One PPO (gae) run from the session SFT policy, 2 steps with a
checkpoint after step 1, then the same run resumed from that checkpoint.
"""

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from align.config import load_config

LORA = {"model.lora.r": 8, "model.lora.alpha": 16}


@pytest.mark.parametrize("path, overrides, groups", [
    # gae: the value model starts from the reward model and serves it (adapters off) ...
    ("configs/ppo/default.yaml", [], ("policy", "value")),
    # ... but not when it starts from another model.
    ("configs/ppo/default.yaml", ["value_model=/v"], ("policy", "value", "reward")),
    ("configs/ppo/grpo.yaml", [], ("policy",)),
    ("configs/ppo/grpo.yaml", ["reward_model=/rm", "reward.fns=[{fn: reward_model}]"], ("policy", "reward")),
    ("configs/ppo/grpo.yaml", ["advantage.estimator=dr_grpo"], ("policy",)),
    ("configs/ppo/rloo.yaml", [], ("policy",)),
    ("configs/ppo/reinforce_pp.yaml", [], ("policy",)),
])
def test_lora_starts_no_reference_group_for_any_estimator_and_no_reward_group_beside_its_value_model(path, overrides, groups):
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
    # The reward model is the SFT model with a seeded one-output head: untrained, but a fixed
    # function that the test can rebuild (and the value model starts from it).
    return {"model.name_or_path": sft_model_dir, "reward_model": sft_model_dir, **LORA, "train.max_steps": 2,
            "train.save_every": 1, "rollout_batch_size": 16, "deepspeed.micro_batch_size": 16, "ppo_epochs": 1,
            "num_minibatches": 1, "sampling.max_new_tokens": 16, "eval_sampling.max_new_tokens": 16,
            "eval_prompts": 8, "eval_at_start": False, "optim.lr": 1e-2, "value_lr": 1e-2}


PROBE = {"prompt": [[5, 6, 7, 8, 9], [10, 11, 12]], "response": [[20, 21, 22], [30, 31, 32, 33, 34, 35]],
         "text": ["", ""], "prompt_text": ["", ""]}


@pytest.fixture(scope="module")
def ppo_lora(sft_model_dir, quick, tmp_path_factory):
    """Two PPO steps driven by hand (a checkpoint after step 1, then the reward of fixed rows
    from the value ranks), then `ppo.run` in the same directory, which resumes from step 1's
    checkpoint and trains step 2 again."""
    from rlhf import ppo
    from rlhf.ppo import PPOConfig

    run_dir = tmp_path_factory.mktemp("ppo_lora")
    cfg = load_config(PPOConfig, "configs/ppo/default.yaml", quick(run_dir, **_overrides(sft_model_dir)))
    stage = ppo.start(cfg)
    try:
        groups = tuple(stage.groups)
        first = stage.train_step(1)
        stage.save_checkpoint(1)
        probe = stage.score_rollout(PROBE)["scores"]  # the value ranks' adapter is trained by now
        second = stage.train_step(2)
        final = stage.evaluate(final=True)
        stage.export(str(run_dir / "whole"))
    finally:
        stage.shutdown()
    ckpt = {g: load_checkpoint_files(run_dir / "checkpoints" / g / "step1") for g in ("policy", "value")}
    resumed = ppo.run(cfg, reuse=False)
    return {"cfg": cfg, "groups": groups, "metrics": {1: first, 2: second}, "final": final, "probe": probe,
            "ckpt": ckpt, "first": load_file(str(run_dir / "whole" / "model.safetensors")),
            "resumed": load_file(os.path.join(resumed["model_dir"], "model.safetensors"))}


def load_checkpoint_files(path):
    # DeepSpeed's own files (our own run's, in a temporary directory) need weights_only=False.
    return torch.load(path / "mp_rank_00_model_states.pt", weights_only=False)


@pytest.mark.usefixtures("ray_session")
def test_ppo_with_lora_uses_the_adapter_off_reference(ppo_lora):
    out = ppo_lora
    # No reference group (the policy's adapter off) and no reward group (the value model's).
    assert out["groups"] == ("policy", "value")
    m1, m2 = out["metrics"][1], out["metrics"][2]
    # Step 1: B = 0, so the policy is its own adapter-off reference: every token's log-ratio is 0,
    # up to float rounding (the policy's log-probs come from the sampler, the reference's from a
    # forward: ~1e-7 per sequence).
    assert abs(m1["objective/kl"]) < 1e-5 and abs(m1["objective/kl_per_token"]) < 1e-6
    assert abs(m1["objective/non_score_reward"]) < 1e-6
    # After one update the adapter is no longer a no-op: the policy has left the reference.
    assert math.isfinite(m2["objective/kl"]) and abs(m2["objective/kl_per_token"]) > 1e-4
    assert all(math.isfinite(m[k]) for m in (m1, m2) for k in ("loss/policy", "loss/value", "policy/grad_norm",
                                                                 "value/grad_norm"))
    final = out["final"]
    assert final["eval/n"] == 8 and math.isfinite(final["eval/kl"]) and final["eval/kl"] != 0.0


@pytest.mark.usefixtures("ray_session")
def test_the_value_ranks_serve_the_reward_model_exactly(ppo_lora, sft_model_dir):
    """The reward is the value model with its adapters off and its original head: the reward
    model (here the SFT model with the seeded head), although the value model has trained."""
    from align.config import ModelConfig
    from align.data.collate import collate_rows
    from align.models.builders import build_scalar_model, build_tokenizer, sequence_scores

    mc = ModelConfig(name_or_path=sft_model_dir)
    tokenizer = build_tokenizer(mc)
    rm = build_scalar_model(mc, tokenizer, seed=ppo_lora["cfg"].seed).eval()
    rows = [{"prompt": p, "response": r} for p, r in zip(PROBE["prompt"], PROBE["response"])]
    batch, _ = collate_rows(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        expected = sequence_scores(rm, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ppo_lora["probe"], expected, rtol=0, atol=1e-5)
    # ... while the value model's own head copy has moved away from that head.
    trained = ppo_lora["ckpt"]["value"]["module"]["model.score.modules_to_save.default.weight"]
    assert not torch.equal(trained, rm.score.weight)


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


@pytest.fixture(scope="module")
def ppo_lora_sharded(sft_model_dir, quick, tmp_path_factory):
    """Step 1 of the same PPO run as `ppo_lora` with the policy under ZeRO-3 (parameters sharded:
    generation and the adapter-off reference gather them) and the value model under ZeRO-2."""
    from rlhf import ppo
    from rlhf.ppo import PPOConfig

    run_dir = tmp_path_factory.mktemp("ppo_lora_zero")
    overrides = {**_overrides(sft_model_dir), "policy.zero_stage": 3, "value.zero_stage": 2,
                 "deepspeed.param_persistence_threshold": 0}
    cfg = load_config(PPOConfig, "configs/ppo/default.yaml", quick(run_dir, **overrides))
    stage = ppo.start(cfg)
    try:
        return {"groups": tuple(stage.groups), "first": stage.train_step(1)}
    finally:
        stage.shutdown()


@pytest.mark.usefixtures("ray_session")
def test_ppo_with_lora_under_zero_3_and_2_matches_zero_0(ppo_lora, ppo_lora_sharded):
    """Same seed, same prompts: the sharded groups sample the same responses, score them the same
    and take the same first update as the unsharded run, to float summation order."""
    assert ppo_lora_sharded["groups"] == ("policy", "value")
    zero0, sharded = ppo_lora["metrics"][1], ppo_lora_sharded["first"]
    assert sharded["objective/kl"] == 0.0  # the adapter-off reference is the policy at B = 0, sharded too
    assert sharded["response/length"] == zero0["response/length"]
    for key in ("objective/scores", "loss/policy", "loss/value", "policy/grad_norm", "value/grad_norm"):
        assert sharded[key] == pytest.approx(zero0[key], rel=1e-4, abs=1e-6), key
