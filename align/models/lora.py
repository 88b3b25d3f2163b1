"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv
2106.09685) through peft, in one place: every builder calls `apply_lora`.

A layer W gets W x + (alpha / r) * B A x with A (r, in) random and B (out, r) zero, so a fresh
adapter changes nothing. Only A and B train (and, for a scalar model, the whole score head);
the base weights are frozen, so the optimizer state and the checkpoints hold the adapter only.

The model keeps its own class (peft's wrapper is unwrapped; the LoRA layers are injected into
it), so the stages, the log-prob code and `generate` see the same attributes as without LoRA.
`adapter_disabled(model)` switches the adapters off: the model is then exactly the base model,
which is the frozen reference of DPO, KTO and PPO/GRPO (no second model copy); `as_reference`
does that for a training engine, in eval mode.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator

import torch

from align.config import LoRAConfig
from align.errors import require

_PEFT = "_align_peft"  # attribute (not a submodule) holding peft's wrapper, for the adapter export
_INSTALL = "pip install peft"


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig, scalar: bool = False, seed: int = 0) -> torch.nn.Module:
    """`model` with LoRA adapters on `cfg.target_modules` and its base weights frozen; `scalar`:
    the score head (reward / value model) trains in full. The adapters' random A matrices are
    drawn from `seed`. Returns `model` unchanged when LoRA is off."""
    if not cfg.enabled:
        return model
    peft = require("peft", "model.lora", _INSTALL)
    peft_cfg = peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        task_type="SEQ_CLS" if scalar else "CAUSAL_LM", bias="none",
        # SEQ_CLS already saves "score"/"classifier"; naming the head keeps it explicit.
        modules_to_save=[_head_name(model)] if scalar else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 17)
        try:
            wrapper = peft.get_peft_model(model, peft_cfg)
        except ValueError as err:  # e.g. a target module name the model does not have
            from align.errors import ConfigError

            raise ConfigError(f"model.lora.target_modules: {str(err).splitlines()[0]}") from None
    inner = wrapper.base_model.model
    inner.__dict__[_PEFT] = wrapper
    return inner


def _head_name(model) -> str:
    for name in ("score", "classifier", "v_head"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise TypeError(f"{type(model).__name__}: no scalar head found (expected .score or .classifier)")


def _module(model) -> torch.nn.Module:
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the model in .module


def is_lora(model) -> bool:
    """Whether `model` (or the model of an engine) carries LoRA adapters."""
    return _PEFT in vars(_module(model))


def _tuner_layers(model):
    """The LoRA layers and the fully trained copies of heads (peft's modules_to_save wrappers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    return [m for m in _module(model).modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]


@contextmanager
def adapter_disabled(model) -> Iterator[None]:
    """Inside the block the LoRA layers compute the base layer only and a trained head is its
    original: the model is the base model, bit for bit (what peft's `disable_adapter()` does, on
    the unwrapped model)."""
    layers = _tuner_layers(model)
    was = [not layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, on in zip(layers, was):
            layer.enable_adapters(on)


@contextmanager
def as_reference(engine) -> Iterator[None]:
    """A training engine as the frozen reference: adapters off and eval mode (no dropout), both
    restored after the block."""
    was_training = _module(engine).training
    engine.eval()
    try:
        with adapter_disabled(engine):
            yield
    finally:
        engine.train(was_training)


def merged_state_dict(model, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The plain model's weights from the full state dict `state` of the LoRA model (e.g. gathered
    from ZeRO-3 shards): W = W0 + (alpha / r) * B A in every adapted layer (fp32, then cast
    back), the trained copy of a fully trained head, and the base model's own key names."""
    from peft.tuners.lora import LoraLayer

    out: Dict[str, torch.Tensor] = {}
    adapted = {}
    for name, module in _module(model).named_modules():
        if isinstance(module, LoraLayer):
            adapted[name] = module
    for name, module in adapted.items():
        if getattr(module, "fan_in_fan_out", False):
            raise NotImplementedError(f"{name}: merging a fan_in_fan_out (Conv1D) LoRA layer")
        adapter = module.active_adapters[0]
        w0 = state[f"{name}.base_layer.weight"]
        a, b = state[f"{name}.lora_A.{adapter}.weight"].float(), state[f"{name}.lora_B.{adapter}.weight"].float()
        out[f"{name}.weight"] = (w0.float() + module.scaling[adapter] * (b @ a)).to(w0.dtype)
    for key, value in state.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        if key.endswith(".base_layer.weight") and key[: -len(".base_layer.weight")] in adapted:
            continue  # merged above
        out[key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = value
    return out


def save_adapter(model, state: Dict[str, torch.Tensor], out_dir: str) -> None:
    """Writes the adapter alone (and a fully trained head) in peft's format (adapter_config.json,
    adapter_model.safetensors), from the full state dict `state` of the LoRA model."""
    wrapper = vars(_module(model))[_PEFT]
    prefixed = {f"base_model.model.{k}": v for k, v in state.items()}
    wrapper.save_pretrained(out_dir, state_dict=prefixed, safe_serialization=True)


def trainable_parameters(model) -> Dict[str, int]:
    """{"trainable": n, "total": n} parameter counts, for the run summary."""
    params = list(_module(model).parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}
