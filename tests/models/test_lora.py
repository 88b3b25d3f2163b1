"""LoRA adapters (align.models.lora) on the built-in tiny model: config checks, which parameters
train, the adapter-off model is the base model exactly, and both export forms (merged weights,
the adapter alone) give the adapter model's log-probs."""

import os
import sys

import pytest
import torch

from align.config import ConfigError, LoRAConfig, ModelConfig, load_config, StageConfig
from align.models import lora
from align.models.builders import build_causal_lm, build_scalar_model, save_pretrained, sequence_scores
from align.models.logprobs import sequence_logprobs

LORA = LoRAConfig(r=4, alpha=8.0)


def _batch(vocab: int, b: int = 3, t: int = 12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :3] = 0  # one left-padded row
    loss_mask = torch.zeros(b, t, dtype=torch.long)
    loss_mask[:, 6:] = 1
    return ids, mask, loss_mask


def _perturb_adapters(model, seed: int = 3):
    """A trained-looking adapter: B is 0 at init (the adapter is then a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_lora_config_is_checked_and_off_by_default():
    assert not ModelConfig().lora.enabled and not LoRAConfig(r=None).enabled
    cfg = load_config(StageConfig, overrides=["model.lora.r=16", "model.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.model.lora.enabled and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    for override, key in (("model.lora.r=-1", "model.lora.r"), ("model.lora.target_modules=all", "model.lora.target_modules"),
                          ("model.lora.dropout=1.5", "model.lora.dropout"), ("model.lora.alpha=0", "model.lora.alpha"),
                          ("model.lora.rank=4", "model.lora.rank")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(StageConfig, overrides=[override])
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        build_causal_lm(ModelConfig(lora=LoRAConfig(r=4, target_modules=["no_such_proj"])))


def test_missing_peft_names_the_install_command(monkeypatch):
    from align.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(MissingExtraError, match="pip install peft"):
        build_causal_lm(ModelConfig(lora=LORA))


def test_gradients_reach_only_the_adapters():
    model = build_causal_lm(ModelConfig(lora=LORA))
    base = build_causal_lm(ModelConfig())
    assert lora.is_lora(model) and not lora.is_lora(base)
    assert type(model) is type(base)  # the model keeps its class: no peft wrapper in the stages' way
    ids, mask, loss_mask = _batch(model.config.vocab_size)
    sequence_logprobs(model, ids, mask, loss_mask).sum.sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == trainable and grads and all(".lora_A." in n or ".lora_B." in n for n in grads)
    # all-linear: every projection of every layer (7 per layer), never the (tied) output head.
    assert len(grads) == 2 * 7 * model.config.num_hidden_layers
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in grads if "lora_B" in n)
    counts = lora.trainable_parameters(model)
    assert counts["trainable"] == sum(model.get_parameter(n).numel() for n in trainable) < counts["total"] / 10


def test_scalar_model_trains_the_adapters_and_the_whole_score_head():
    model = build_scalar_model(ModelConfig(lora=LORA))
    ids, mask, _ = _batch(model.config.vocab_size)
    sequence_scores(model, ids, mask).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    head = {n for n in grads if ".lora_" not in n}
    assert head == {"score.modules_to_save.default.weight"}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}
    assert model.get_parameter("score.modules_to_save.default.weight").grad.abs().sum() > 0


def test_adapter_off_is_the_base_model_exactly():
    base = build_causal_lm(ModelConfig(), seed=5).eval()
    model = build_causal_lm(ModelConfig(lora=LORA), seed=5).eval()
    ids, mask, _ = _batch(model.config.vocab_size)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)  # fresh adapter: B = 0
        _perturb_adapters(model)
        on = model(input_ids=ids, attention_mask=mask).logits
        with lora.adapter_disabled(model):
            off = model(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits
    assert (on - expected).abs().max() > 1e-2  # the adapter does change the model
    assert torch.equal(off, expected)
    assert torch.equal(again, on)  # switched back on after the block


def test_adapter_off_scalar_model_is_the_base_model_with_its_original_head():
    """PPO's value model serves the reward with its adapters off: the trained head copy must
    give way to the original head too, and both come back (trainable) after the block."""
    base = build_scalar_model(ModelConfig(), seed=5).eval()
    model = build_scalar_model(ModelConfig(lora=LORA), seed=5).eval()
    ids, mask, _ = _batch(model.config.vocab_size)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        expected = sequence_scores(base, ids, mask)
        _perturb_adapters(model)
        head = model.score.modules_to_save["default"].weight
        head.add_(torch.randn_like(head))
        on = sequence_scores(model, ids, mask)
        with lora.adapter_disabled(model):
            off = sequence_scores(model, ids, mask)
        again = sequence_scores(model, ids, mask)
    assert (on - expected).abs().max() > 1e-2
    assert torch.equal(off, expected) and torch.equal(again, on)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_merged_and_adapter_exports_give_the_adapter_models_logprobs(tmp_path, builtin_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = build_causal_lm(ModelConfig(lora=LoRAConfig(r=4, alpha=8.0, dropout=0.1)), seed=2).eval()
    _perturb_adapters(model)
    ids, mask, loss_mask = _batch(model.config.vocab_size)
    with torch.no_grad():
        expected = sequence_logprobs(model, ids, mask, loss_mask, padding_free=False).sum

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged_dir = save_pretrained(model, builtin_tokenizer, str(tmp_path / "merged"), state_dict=lora.merged_state_dict(model, state))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = sequence_logprobs(merged, ids, mask, loss_mask, padding_free=False).sum
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    adapter_dir = str(tmp_path / "adapter")
    lora.save_adapter(model, state, adapter_dir)
    assert sorted(f for f in os.listdir(adapter_dir) if not f.startswith("README")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    base = build_causal_lm(ModelConfig(), seed=2)
    loaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        got = sequence_logprobs(loaded.base_model.model, ids, mask, loss_mask, padding_free=False).sum
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_lora_steps_on_the_real_model(stage, smollm2_dir, ray_session, quick, tmp_path):
    """2 steps with LoRA r=16 on SmolLM2-135M-Instruct: DPO starts at ln 2 (the adapter-off
    reference is the policy at init) and the merged export moved exactly the adapted weights."""
    import math

    from safetensors.torch import load_file

    from align.tracking import read_metrics

    if stage == "sft":
        from rlhf.sft import SFTConfig as Config, run
        data = {"data.train": '[{path: "builtin:sft", max_rows: 8}]', "data.eval": "[]"}
    else:
        from direct.dpo import DPOConfig as Config, run
        data = {"data.train": '[{path: "builtin:preferences", max_rows: 8}]', "data.eval": "[]",
                "reference_cache": str(tmp_path / "ref")}
    cfg = load_config(Config, f"configs/{stage}/default.yaml", quick(tmp_path, **{
        "model.name_or_path": smollm2_dir, "model.lora.r": 16, "model.lora.alpha": 32, **data,
        "data.max_length": 64, "data.max_prompt_length": 48, "deepspeed.micro_batch_size": 4,
        "train.max_steps": 2, "train.eval_every": 0, "train.save_every": 0, "train.log_every": 1,
        "optim.lr": 1e-3, "optim.warmup_steps": 0, "final_samples": 0}))
    summary = run(cfg, reuse=False)
    metrics = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    if stage == "dpo":
        assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    merged = load_file(os.path.join(summary["model_dir"], "model.safetensors"))
    base = load_file(os.path.join(smollm2_dir, "model.safetensors"))
    assert merged.keys() == base.keys()
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def _length_reward(prompts, responses, extras):
    return [float(len(r)) for r in responses]  # varies between samples: GRPO advantages are not 0


def test_two_grpo_steps_with_lora_on_the_real_model(smollm2_dir, ray_session, quick, tmp_path):
    """GRPO with LoRA r=16 on SmolLM2-135M-Instruct: only the policy group starts, its first-step
    reference (adapter off) equals the policy, and 2 steps train the adapters alone."""
    import math

    from safetensors.torch import load_file

    from reward_model.rewards import CombinedReward
    from rlhf import ppo
    from rlhf.ppo import PPOConfig

    cfg = load_config(PPOConfig, "configs/ppo/grpo.yaml", quick(tmp_path, **{
        "model.name_or_path": smollm2_dir, "model.lora.r": 16, "model.lora.alpha": 32,
        "data.train": '[{path: "builtin:prompts", max_rows: 8}]', "data.eval": "[]", "data.max_prompt_length": 48,
        "rollout_batch_size": 4, "rollout.group_size": 4, "ppo_epochs": 1, "num_minibatches": 1,
        "deepspeed.micro_batch_size": 4, "sampling.max_new_tokens": 8, "train.max_steps": 2,
        "train.save_every": 0, "eval_prompts": 0, "eval_at_start": False, "optim.lr": 1e-3}))
    stage = ppo.start(cfg)
    try:
        groups = sorted(stage.groups)
        stage.reward_fn = CombinedReward([("length", 1.0, _length_reward)])
        steps = [stage.train_step(1), stage.train_step(2)]
        stage.export(str(tmp_path / "model"))
    finally:
        stage.shutdown()
    assert groups == ["policy"]
    # Step 1 (B = 0): the adapter-off reference is the policy; the old log-probs come from the
    # sampler, the reference's from a forward, so the KL is 0 to rounding only.
    assert abs(steps[0]["objective/kl"]) < 1e-6 and steps[0]["policy/kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(math.isfinite(m[k]) for m in steps for k in ("loss/policy", "policy/grad_norm", "objective/kl"))
    assert steps[0]["policy/grad_norm"] > 0
    merged = load_file(str(tmp_path / "model" / "model.safetensors"))
    base = load_file(os.path.join(smollm2_dir, "model.safetensors"))
    assert merged.keys() == base.keys()
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
