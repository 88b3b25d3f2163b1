"""The frozen reference of the direct-preference stages (direct/dpo.py, direct/kto.py): the
config they share (a policy trained against a reference, both starting from the SFT model), the
reference model's config and builder, its cached log-probs (direct.ref_cache), and the stages'
run inputs."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

from align.config import ConfigError, ModelConfig, SourceConfig, StageConfig
from align.engine import deepspeed_engine as de
from align.generation import SamplingConfig
from align.models.builders import build_causal_lm
from align.models.lora import as_reference
from direct import ref_cache

SFT_MODEL = "runs/sft/model"  # where the SFT stage (configs/sft/default.yaml) exports its policy


@dataclass
class DirectConfig(StageConfig):
    """What DPO-style and KTO stages share: a policy and reference starting from the SFT model."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path=SFT_MODEL))
    # The frozen reference pi_ref; None: the starting policy (model.name_or_path, the SFT model).
    reference: Optional[str] = None
    # Directory of cached reference log-probs; None: $ALIGN_CACHE/ref_logps.
    reference_cache: Optional[str] = None
    # Held-out prompts sampled at the end for the gold score (when the task has a gold scorer).
    eval_prompts: SourceConfig = field(default_factory=lambda: SourceConfig(path="builtin:eval_prompts"))
    # How many of those prompts to sample at the end (0: skip).
    final_samples: int = 128
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))


def reference_model_cfg(cfg: DirectConfig) -> ModelConfig:
    """The reference: the policy's config with the reference's weights and the policy's tokenizer."""
    return dataclasses.replace(cfg.model, name_or_path=cfg.reference or cfg.model.name_or_path,
                               tokenizer=cfg.model.tokenizer or cfg.model.name_or_path, gradient_checkpointing=False)


def reference_builder(cfg: DirectConfig, tokenizer) -> Callable[[], Any]:
    """Builds the frozen reference engine (ZeRO-3 shards it) when the cache misses."""

    def build():
        model = build_causal_lm(reference_model_cfg(cfg), tokenizer, seed=cfg.seed)
        return de.init_eval_engine(model, cfg.deepspeed, cfg.optim)

    return build


def uses_adapter_reference(cfg: DirectConfig) -> bool:
    """With LoRA the reference is the policy itself with its adapter off: no second model."""
    return cfg.model.lora.enabled


def cached_reference(cfg: DirectConfig, tokenizer, splits: Dict[str, Any], collate: Callable,
                     parts: Sequence[str], token_columns: Sequence[str], policy=None):
    """({split: reference log-prob columns}, {split: cache info}); see direct.ref_cache.

    With LoRA (`uses_adapter_reference`), `policy` (the training engine) scores the rows with its
    adapter disabled, which is the base model exactly; the cache key says so."""
    import torch

    precision = cfg.deepspeed.precision + ("-autocast" if cfg.deepspeed.uses_autocast(torch.cuda.is_available()) else "")
    ref_id = ref_cache.reference_id(reference_model_cfg(cfg), cfg.seed, precision)
    build, scope = reference_builder(cfg, tokenizer), None
    if uses_adapter_reference(cfg):
        if policy is None:
            raise ValueError("cached_reference: with model.lora the policy engine must be passed")
        ref_id, build, scope = f"{ref_id}|lora-adapter-off", (lambda: policy), as_reference
    return ref_cache.load_or_compute(
        {k: v for k, v in splits.items() if v is not None}, ref_id=ref_id,
        build_model=build, collate=collate, parts=parts, scope=scope,
        token_columns=token_columns, micro_batch_size=cfg.deepspeed.micro_batch_size,
        cache_dir=cfg.reference_cache, padding_free=cfg.model.padding_free)


def with_index(ds):
    """Adds `index` (the row's position), by which batches find their cached reference values."""
    return ds.add_column("index", list(range(len(ds)))) if ds is not None else None


def check_model_exists(cfg: DirectConfig) -> None:
    if cfg.model.lora.enabled and cfg.reference and cfg.reference != cfg.model.name_or_path:
        raise ConfigError("reference: with model.lora the reference is the base model "
                          f"({cfg.model.name_or_path}) with the adapter off; unset reference or model.lora.r")
    for key, path in (("model.name_or_path", cfg.model.name_or_path), ("reference", cfg.reference)):
        if path and path.startswith(("runs/", ".", "/", "~")) and not os.path.exists(os.path.expanduser(path)):
            raise ConfigError(f"{key}: {path} does not exist; train the SFT stage first "
                              "(python -m rlhf.sft) or point it at a model")


def run_inputs(cfg: DirectConfig) -> Dict[str, str]:
    """Upstream models, so a finished run is reused only with the same ones (see align.run)."""
    paths = {"model": cfg.model.name_or_path, "reference": cfg.reference}
    return {k: v for k, v in paths.items() if v and not v.startswith("builtin:")}
