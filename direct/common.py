"""What the direct-preference stages (direct/trainer.py, direct/kto.py) share: the config of a
policy trained against a frozen reference, the cached reference log-probs, global metric means,
and the held-out gold evaluation."""

from __future__ import annotations

import dataclasses
import os
import statistics
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from align.config import ConfigError, ModelConfig, SourceConfig, StageConfig
from align.generation import SamplingConfig

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
    from align.engine import deepspeed_engine as de
    from align.models.builders import build_causal_lm

    def build():
        model = build_causal_lm(reference_model_cfg(cfg), tokenizer, seed=cfg.seed)
        return de.init_eval_engine(model, cfg.deepspeed, cfg.optim)

    return build


def cached_reference(cfg: DirectConfig, tokenizer, splits: Dict[str, Any], collate: Callable,
                     parts: Sequence[str], token_columns: Sequence[str]):
    """({split: reference log-prob columns}, {split: cache info}); see direct.ref_cache."""
    from direct import ref_cache

    ref_id = ref_cache.reference_id(reference_model_cfg(cfg), cfg.seed, cfg.deepspeed.precision)
    return ref_cache.load_or_compute(
        {k: v for k, v in splits.items() if v is not None}, ref_id=ref_id,
        build_model=reference_builder(cfg, tokenizer), collate=collate, parts=parts,
        token_columns=token_columns, micro_batch_size=cfg.deepspeed.micro_batch_size,
        cache_dir=cfg.reference_cache, padding_free=cfg.model.padding_free)


def with_index(ds):
    """Adds `index` (the row's position), by which batches find their cached reference values."""
    return ds.add_column("index", list(range(len(ds)))) if ds is not None else None


class Means:
    """Global weighted means of per-example values: sums over micro-batches, one all-reduce.

    Every rank must `add` the same names (use zero weights for "none here"); a name whose
    global weight is 0 is left out of the result.
    """

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = {}
        self.weights: Dict[str, torch.Tensor] = {}

    def add(self, name: str, values: torch.Tensor, weights: torch.Tensor) -> None:
        values, weights = values.detach().float().reshape(-1), weights.detach().float().reshape(-1)
        self.sums[name] = self.sums.get(name, 0.0) + (values * weights).sum()
        self.weights[name] = self.weights.get(name, 0.0) + weights.sum()

    def reduce(self, all_reduce_sum: Callable) -> Dict[str, float]:
        names = sorted(self.sums)
        if not names:
            return {}
        total = all_reduce_sum(torch.stack([self.sums[n] for n in names] + [self.weights[n] for n in names]))
        k = len(names)
        return {n: (total[i] / total[k + i]).item() for i, n in enumerate(names) if total[k + i] > 0}


def load_prompts(source: SourceConfig, cfg: StageConfig, tokenizer):
    """Tokenized prompt rows (prompt_ids, prompt_text) of one source, like the training prompts."""
    from align.stage import load_tokenized

    data = dataclasses.replace(cfg.data, train=[source], eval=[], eval_fraction=0.0, packing=False)
    rows, _, _ = load_tokenized(data, "prompt", tokenizer, cfg.seed)
    return rows


def sample_report(generate_fn: Callable, tokenizer, prompt_ids: Sequence[Sequence[int]], prompt_texts: Sequence[str],
                  sampling: SamplingConfig, seed: int, scorer: Optional[Callable[[str, str], float]],
                  prefix: str = "samples/", device=None) -> Dict[str, Any]:
    """Samples one response per prompt (fixed seed) and reports EOS rate, length, and the gold
    mean with its 95% bootstrap CI when a scorer is given. Any policy sampled through this with
    the same prompts, sampling settings and seed is compared like for like."""
    from align.evaluation import bootstrap_ci
    from align.generation import sample

    out = sample(generate_fn, tokenizer, prompt_ids, sampling, seed=seed, device=device)
    n = len(out.texts)
    metrics: Dict[str, Any] = {f"{prefix}eos_rate": sum(out.ended_with_eos) / n,
                               f"{prefix}length": statistics.mean(len(r) for r in out.response_ids),
                               f"{prefix}n": n}
    if scorer is not None:
        from align.task.synthetic import is_fluent

        scores = [scorer(p, t) for p, t in zip(prompt_texts, out.texts)]
        lo, hi = bootstrap_ci(scores, seed=seed)
        metrics.update({f"{prefix}gold": statistics.mean(scores), f"{prefix}gold_ci_low": lo,
                        f"{prefix}gold_ci_high": hi, f"{prefix}fluent": sum(map(is_fluent, out.texts)) / n})
    metrics[f"{prefix}examples"] = out.texts[:3]
    return metrics


def final_samples(cfg: DirectConfig, de, engine, tokenizer, prompts) -> Dict[str, Any]:
    """`sample_report` of the trained policy on the held-out prompts (every rank samples all)."""
    from align.task import gold_scorer_for

    rows = prompts.select(range(min(cfg.final_samples, len(prompts))))
    scorer = gold_scorer_for([cfg.eval_prompts.path, *(s.path for s in cfg.data.train)])
    return sample_report(partial(de.generate, engine), tokenizer, rows["prompt_ids"], rows["prompt_text"],
                         cfg.sampling, cfg.seed, scorer, device=de.device())


def check_model_exists(cfg: DirectConfig) -> None:
    for key, path in (("model.name_or_path", cfg.model.name_or_path), ("reference", cfg.reference)):
        if path and path.startswith(("runs/", ".", "/", "~")) and not os.path.exists(os.path.expanduser(path)):
            raise ConfigError(f"{key}: {path} does not exist; train the SFT stage first "
                              "(python -m rlhf.sft) or point it at a model")


def run_inputs(cfg: DirectConfig) -> Dict[str, str]:
    """Upstream models, so a finished run is reused only with the same ones (see align.run)."""
    paths = {"model": cfg.model.name_or_path, "reference": cfg.reference}
    return {k: v for k, v in paths.items() if v and not v.startswith("builtin:")}
