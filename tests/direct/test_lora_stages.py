"""LoRA (model.lora) in the stages, from the session SFT policy: DPO with the adapter-off
reference under ZeRO-2 raises the gold score over SFT; KTO under ZeRO-3 exports the adapter
alone; the reward model trains adapters plus its score head; an SFT run resumed from an
adapter-only checkpoint exports bitwise the weights of an uninterrupted one."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from align.config import load_config
from direct import dpo, kto

LORA = {"model.lora.r": 8, "model.lora.alpha": 16}


@pytest.fixture(scope="module")
def dpo_lora(sft_model_dir, sft_gold, quick, read_metrics, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dpo_lora")
    cfg = load_config(dpo.DPOConfig, "configs/dpo/default.yaml", quick(run_dir, **{
        "model.name_or_path": sft_model_dir, **LORA, "data.train": '[{path: "builtin:preferences", max_rows: 640}]',
        "data.eval": '[{path: "builtin:preferences_eval", max_rows: 64}]', "deepspeed.zero_stage": 2,
        "deepspeed.micro_batch_size": 32, "train.max_steps": 20, "optim.lr": 3e-3, "optim.warmup_steps": 5,
        "train.eval_every": 0, "train.save_every": 0, "train.log_every": 1, "final_samples": sft_gold["samples/n"]}))
    return dpo.run(cfg, reuse=False), read_metrics(run_dir), run_dir


def test_dpo_with_lora_uses_the_adapter_off_reference_and_raises_gold(dpo_lora, sft_gold):
    summary, metrics, run_dir = dpo_lora
    # At step 1 the adapter is a no-op (B = 0): the policy equals the adapter-off reference.
    assert metrics[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[1]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    last = [metrics[s] for s in range(16, 21)]
    # LoRA (r=8 on a 0.9M-parameter model) learns more slowly than full DPO in these 20 steps:
    # measured last-5 loss 0.673, accuracy 0.66, eval accuracy 0.61.
    assert sum(m["rewards/accuracies"] for m in last) / 5 > 0.6
    assert sum(m["loss"] for m in last) / 5 < math.log(2) - 0.015
    assert summary["final_eval"]["eval/rewards/accuracies"] > 0.55
    cache = summary["reference_cache"]["train"]
    assert cache["computed"]
    from safetensors import safe_open

    with safe_open(cache["path"], "pt") as fh:
        assert fh.metadata()["reference"].endswith("|lora-adapter-off")
    final = summary["final_eval"]
    assert final["samples/n"] == sft_gold["samples/n"] == 64
    # Measured: -0.020 against the SFT policy's -0.121 (the 95% intervals still overlap).
    assert final["samples/gold"] > sft_gold["samples/gold"] + 0.05
    # The default export is the merged model: plain weights, no adapter keys.
    weights = load_file(os.path.join(summary["model_dir"], "model.safetensors"))
    assert weights and not any("lora" in k or "base_layer" in k for k in weights)


def test_kto_with_lora_under_zero3_exports_the_adapter_alone(sft_model_dir, quick, read_metrics, tmp_path):
    cfg = load_config(kto.KTOConfig, "configs/kto/default.yaml", quick(tmp_path, **{
        "model.name_or_path": sft_model_dir, **LORA, "data.train": '[{path: "builtin:binary", max_rows: 256}]',
        "deepspeed.zero_stage": 3, "deepspeed.param_persistence_threshold": 0, "deepspeed.micro_batch_size": 32,
        "train.max_steps": 3, "optim.lr": 1e-2, "train.eval_every": 0, "train.save_every": 0, "train.log_every": 1, "final_samples": 0,
        "export.merge": False}))
    summary = kto.run(cfg, reuse=False)
    metrics = read_metrics(tmp_path)
    assert metrics[1]["loss"] == pytest.approx(0.5, abs=1e-5)  # policy == adapter-off reference
    assert metrics[1]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert metrics[3]["loss"] < metrics[1]["loss"]
    files = set(os.listdir(summary["model_dir"]))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    adapter = load_file(os.path.join(summary["model_dir"], "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    # The adapter was trained (B left 0) and gathered from the ZeRO-3 shards in full.
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    with open(os.path.join(summary["model_dir"], "adapter_config.json")) as fh:
        assert json.load(fh)["r"] == 8


def test_reward_model_with_lora_trains_the_adapters_and_the_score_head(sft_model_dir, quick, tmp_path):
    from reward_model import train
    from transformers import AutoModelForSequenceClassification

    cfg = load_config(train.RMConfig, "configs/reward_model/default.yaml", quick(tmp_path, **{
        "model.name_or_path": sft_model_dir, **LORA, "deepspeed.zero_stage": 1, "train.max_steps": 2,
        "optim.lr": 1e-2, "train.eval_every": 0, "train.save_every": 0, "train.log_every": 1}))
    summary = train.run(cfg, reuse=False)
    exported = AutoModelForSequenceClassification.from_pretrained(summary["model_dir"])
    sft = AutoModelForSequenceClassification.from_pretrained(sft_model_dir, num_labels=1)
    # Merged: every adapted projection moved; the embeddings (no adapter) did not.
    layer = exported.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(layer, sft.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(exported.model.embed_tokens.weight, sft.model.embed_tokens.weight)
    # The score head is a trained copy, not the seeded initial head.
    from align.config import ModelConfig
    from align.models.builders import build_scalar_model

    init = build_scalar_model(ModelConfig(name_or_path=sft_model_dir), seed=cfg.seed)
    assert not torch.equal(exported.score.weight, init.score.weight)


def test_sft_with_lora_resumes_bitwise_from_an_adapter_only_checkpoint(quick, tmp_path):
    from rlhf import sft

    def run(run_dir, steps, **extra):
        cfg = load_config(sft.SFTConfig, "configs/sft/default.yaml", quick(run_dir, **{
            **LORA, "model.lora.dropout": 0.1, "train.max_steps": steps, "train.save_every": 2, "train.eval_every": 0,
            "final_samples": 0, "optim.lr": 1e-2, "optim.scheduler": "constant", "optim.warmup_steps": 0,
            "deepspeed.micro_batch_size": 8, **extra}))
        return sft.run(cfg, reuse=False)

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "resumed", 3)  # checkpoints step 2 (the last step is exported, not saved)
    # A constant LR, so the schedules agree; the second call resumes from step 2's checkpoint
    # and trains steps 3-4.
    ckpt = tmp_path / "resumed" / "checkpoints" / "step2"
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)
    module = states["module"]
    adapter = {k: v for k, v in module.items() if "lora_" in k}
    assert len(adapter) == 2 * 7 * 4  # A and B of 7 projections in each of the 4 layers
    # The rest is the tied output head only: DeepSpeed's exclude_frozen_parameters drops the
    # frozen parameters by name, and the tied alias lm_head.weight is not among the names.
    assert set(module) - set(adapter) == {"lm_head.weight"}
    opt = states["optimizer"]["state"]
    trainable = sum(v["exp_avg"].numel() for v in opt.values())
    assert trainable == sum(v.numel() for v in adapter.values())  # adapter-only optimizer state
    resumed = run(tmp_path / "resumed", 4)
    assert resumed["steps"] == 4
    a = load_file(os.path.join(whole["model_dir"], "model.safetensors"))
    b = load_file(os.path.join(resumed["model_dir"], "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
