"""Head-to-head evaluation: every policy generates on the same held-out prompts with the same
sampling settings and seed, and is measured the same way.

Per method: gold score (when the task has one), reward-model score, per-sequence KL to the
reference (the sum over response tokens of log pi(y_t) - log pi_ref(y_t), the k1 estimate of
KL(pi || pi_ref) on the method's own samples), win rate against the baseline (by gold score when
available, else by reward model; ties count one half), response length, distinct-n, and 95%
bootstrap confidence intervals.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from align.config import DataConfig, ModelConfig, SourceConfig
from align.data.collate import collate_responses
from align.data.sources import load_rows
from align.data.tokenize import tokenize_rows
from align.engine import deepspeed_engine as de
from align.generation import Samples, SamplingConfig, sample
from align.models.builders import build_causal_lm, build_scalar_model, build_tokenizer, sequence_scores
from align.models.logprobs import sequence_logprobs
from align.task import gold_scorer_for, sample_metrics_for
from reward_model.loss import reward_normalization


@dataclass
class EvalConfig:
    prompts: SourceConfig = field(default_factory=lambda: SourceConfig(path="builtin:eval_prompts"))
    num_prompts: int = 128
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    micro_batch_size: int = 32
    bootstrap_samples: int = 1000
    max_prompt_length: int = 64
    # Models are evaluated whole on one device per actor, in this dtype.
    dtype: str = "float32"
    seed: int = 1234
    # Run model code shipped inside a model directory (custom architectures). Off unless set.
    trust_remote_code: bool = False


# ---------------------------------------------------------------------------------------------
# Statistics (pure)
# ---------------------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], samples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple:
    """Percentile bootstrap confidence interval of the mean."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    lo = means[int((1 - level) / 2 * samples)]
    hi = means[min(samples - 1, int((1 + level) / 2 * samples))]
    return (lo, hi)


def win_rates(scores: Sequence[float], baseline: Sequence[float]) -> List[float]:
    """Per-prompt win (1), tie (0.5) or loss (0) against the baseline's response."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all responses (Li et al. 2016, arXiv 1510.03055)."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ---------------------------------------------------------------------------------------------
# Held-out sampling and scoring: one helper for every stage's final samples and the evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class ScoredSamples:
    samples: Samples  # prompt_ids, response_ids, texts, ended_with_eos
    gold: Optional[List[float]]  # the task's gold score per response; None when the task has none
    task_metrics: Dict[str, float]  # the task's own sample metrics (e.g. fluency), {} when none


def sample_and_score(generate_fn: Callable, tokenizer, prompt_ids: Sequence[Sequence[int]],
                     prompt_texts: Sequence[str], sampling: SamplingConfig, seed: int,
                     task_paths: Iterable[str], micro_batch_size: int = 16, device=None) -> ScoredSamples:
    """Samples one response per prompt (fixed seed, so any policy sampled through this with the
    same prompts, settings and seed is compared like for like) and scores the responses with the
    task of `task_paths` (data sources; a built-in task has a gold scorer and sample metrics)."""
    paths = list(task_paths)
    out = sample(generate_fn, tokenizer, prompt_ids, sampling, micro_batch_size, seed=seed, device=device)
    scorer = gold_scorer_for(paths)
    gold = [scorer(p, t) for p, t in zip(prompt_texts, out.texts)] if scorer is not None else None
    return ScoredSamples(out, gold, sample_metrics_for(paths, list(prompt_texts), out.texts))


def sample_summary(scored: ScoredSamples, prefix: str = "samples/", ci_seed: Optional[int] = None) -> Dict[str, Any]:
    """EOS rate, length, gold mean (with `n` and a 95% bootstrap CI when `ci_seed` is given),
    the task's metrics and three example responses, under `prefix`."""
    out = scored.samples
    n = len(out.texts)
    metrics: Dict[str, Any] = {f"{prefix}eos_rate": sum(out.ended_with_eos) / n,
                               f"{prefix}length": statistics.mean(len(r) for r in out.response_ids)}
    if ci_seed is not None:
        metrics[f"{prefix}n"] = n
    if scored.gold is not None:
        metrics[f"{prefix}gold"] = statistics.mean(scored.gold)
        if ci_seed is not None:
            lo, hi = bootstrap_ci(scored.gold, seed=ci_seed)
            metrics.update({f"{prefix}gold_ci_low": lo, f"{prefix}gold_ci_high": hi})
    metrics.update({f"{prefix}{k}": v for k, v in scored.task_metrics.items()})
    metrics[f"{prefix}examples"] = out.texts[:3]
    return metrics


def held_out_report(generate_fn: Callable, tokenizer, prompts, sampling: SamplingConfig, seed: int,
                    task_paths: Iterable[str], device=None, prefix: str = "samples/") -> Dict[str, Any]:
    """`sample_summary` (with n and the gold CI) of a policy on tokenized prompt rows
    (`prompt_ids`, `prompt_text`, e.g. from align.stage.load_prompts): a stage's final samples."""
    scored = sample_and_score(generate_fn, tokenizer, prompts["prompt_ids"], prompts["prompt_text"], sampling,
                              seed=seed, task_paths=task_paths, device=device)
    return sample_summary(scored, prefix, ci_seed=seed)


# ---------------------------------------------------------------------------------------------
# Worker (one Ray actor group; every method sampled in the same process, same settings)
# ---------------------------------------------------------------------------------------------


class EvalWorker:
    def __init__(self, cfg: EvalConfig, reference_dir: str, reward_model_dir: Optional[str], seed: int):
        self.cfg, self.seed = cfg, seed
        self.tokenizer = build_tokenizer(self._model_cfg(reference_dir))
        data_cfg = DataConfig(train=[cfg.prompts], max_length=cfg.max_prompt_length + 1,
                              max_prompt_length=cfg.max_prompt_length)
        rows = load_rows([cfg.prompts], "prompt", data_cfg, seed)
        rows = tokenize_rows(rows.select(range(min(cfg.num_prompts, len(rows)))), "prompt", self.tokenizer, data_cfg)
        self.prompt_ids: List[List[int]] = rows["prompt_ids"]
        self.prompt_texts: List[str] = rows["prompt_text"]
        self.device = de.device()
        self.reference = self._load(build_causal_lm, reference_dir)
        self.reward_model, self.rm_norm = None, (0.0, 1.0)
        if reward_model_dir:
            self.reward_model = self._load(build_scalar_model, reward_model_dir)
            self.rm_norm = reward_normalization(self.reward_model.config)

    def _model_cfg(self, path: str) -> ModelConfig:
        return ModelConfig(name_or_path=path, dtype=self.cfg.dtype, trust_remote_code=self.cfg.trust_remote_code)

    def _load(self, builder, path: str):
        """Each model whole on this actor's device, in the configured dtype (no sharding)."""
        return builder(self._model_cfg(path), self.tokenizer).to(self.device).eval()

    def evaluate(self, name: str, policy_dir: str) -> Dict[str, Any]:
        """Samples `policy_dir` on the prompts and returns per-prompt values and summaries."""
        policy = self._load(build_causal_lm, policy_dir)
        gen = lambda ids, mask, **kw: policy.generate(input_ids=ids, attention_mask=mask, **kw)  # noqa: E731
        with torch.no_grad():
            scored = sample_and_score(gen, self.tokenizer, self.prompt_ids, self.prompt_texts, self.cfg.sampling,
                                      seed=self.seed, task_paths=[self.cfg.prompts.path],
                                      micro_batch_size=self.cfg.micro_batch_size, device=self.device)
            out = scored.samples
            kls, rm_scores = [], []
            pad = self.tokenizer.pad_token_id
            mb = self.cfg.micro_batch_size
            for start in range(0, len(out.response_ids), mb):
                b = collate_responses(self.prompt_ids[start:start + mb], out.response_ids[start:start + mb], pad)
                ids, attn, mask = (b[k].to(self.device) for k in ("input_ids", "attention_mask", "loss_mask"))
                lp = sequence_logprobs(policy, ids, attn, mask).sum
                ref = sequence_logprobs(self.reference, ids, attn, mask).sum
                kls += (lp - ref).tolist()
                if self.reward_model is not None:
                    mean, std = self.rm_norm
                    rm_scores += ((sequence_scores(self.reward_model, ids, attn) - mean) / std).tolist()
        result = {"method": name, "texts": out.texts, "kl": kls, "length": [len(r) for r in out.response_ids],
                  "eos": out.ended_with_eos, "rm": rm_scores}
        if scored.gold is not None:
            result["gold"] = scored.gold
        return result


def summarize(results: List[Dict[str, Any]], baseline: str, costs: Dict[str, Dict[str, float]],
              samples: int = 1000, seed: int = 0) -> List[Dict[str, Any]]:
    """One row per method: means with 95% bootstrap CIs, win rate against `baseline`, cost."""
    by_name = {r["method"]: r for r in results}
    base = by_name.get(baseline)
    rows = []
    for r in results:
        row: Dict[str, Any] = {"method": r["method"]}
        for key in ("gold", "rm", "kl", "length"):
            values = [float(v) for v in r.get(key) or []]
            if values:
                row[key] = statistics.mean(values)
                row[f"{key}_ci"] = list(bootstrap_ci(values, samples, seed))
        judge = "gold" if r.get("gold") else "rm" if r.get("rm") else None
        if base is not None and judge and r["method"] != baseline:
            wins = win_rates(r[judge], base[judge])
            row["win_rate"] = statistics.mean(wins)
            row["win_rate_ci"] = list(bootstrap_ci(wins, samples, seed))
            row["win_rate_judge"] = judge
        row["eos_rate"] = statistics.mean(map(float, r["eos"])) if r["eos"] else 0.0
        row["distinct_1"] = distinct_n(r["texts"], 1)
        row["distinct_2"] = distinct_n(r["texts"], 2)
        row.update({f"cost_{k}": v for k, v in costs.get(r["method"], {}).items()})
        rows.append(row)
    return rows
