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
from typing import Any, Dict, List, Optional, Sequence

from align.config import DataConfig, DeepSpeedConfig, ModelConfig, OptimConfig, SourceConfig
from align.generation import SamplingConfig


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
# Worker (one Ray actor group; every method sampled in the same process, same settings)
# ---------------------------------------------------------------------------------------------


class EvalWorker:
    def __init__(self, cfg: EvalConfig, reference_dir: str, reward_model_dir: Optional[str], seed: int):
        from align.data.sources import load_rows
        from align.data.tokenize import tokenize_rows
        from align.engine import deepspeed_engine as de
        from align.models.builders import build_causal_lm, build_scalar_model, build_tokenizer
        from align.task import gold_scorer_for

        self.cfg, self.de, self.seed = cfg, de, seed
        self.tokenizer = build_tokenizer(ModelConfig(name_or_path=reference_dir))
        data_cfg = DataConfig(train=[cfg.prompts], max_length=cfg.max_prompt_length + 1,
                              max_prompt_length=cfg.max_prompt_length)
        rows = load_rows([cfg.prompts], "prompt", data_cfg, seed)
        rows = tokenize_rows(rows.select(range(min(cfg.num_prompts, len(rows)))), "prompt", self.tokenizer, data_cfg)
        self.prompt_ids: List[List[int]] = rows["prompt_ids"]
        self.prompt_texts: List[str] = rows["prompt_text"]
        self.gold = gold_scorer_for([cfg.prompts.path])
        self.device = de.device()
        self.reference = self._load(build_causal_lm, reference_dir)
        self.reward_model, self.rm_norm = None, (0.0, 1.0)
        if reward_model_dir:
            self.reward_model = self._load(build_scalar_model, reward_model_dir)
            config = self.reward_model.config
            self.rm_norm = (getattr(config, "reward_mean", 0.0), getattr(config, "reward_std", 1.0))
        self._build = build_causal_lm

    def _load(self, builder, path: str):
        """Each model whole on this actor's device, in the configured dtype (no sharding)."""
        return builder(ModelConfig(name_or_path=path, dtype=self.cfg.dtype), self.tokenizer).to(self.device).eval()

    def evaluate(self, name: str, policy_dir: str) -> Dict[str, Any]:
        """Samples `policy_dir` on the prompts and returns per-prompt values and summaries."""
        import torch

        from align.generation import sample
        from align.models.builders import sequence_scores
        from align.models.logprobs import sequence_logprobs

        policy = self._load(self._build, policy_dir)
        gen = lambda ids, mask, **kw: policy.generate(input_ids=ids, attention_mask=mask, **kw)  # noqa: E731
        with torch.no_grad():
            out = sample(gen, self.tokenizer, self.prompt_ids, self.cfg.sampling, self.cfg.micro_batch_size,
                         seed=self.seed, device=self.device)
            kls, rm_scores = [], []
            pad = self.tokenizer.pad_token_id
            mb = self.cfg.micro_batch_size
            for start in range(0, len(out.response_ids), mb):
                seqs = [p + r for p, r in zip(self.prompt_ids[start:start + mb], out.response_ids[start:start + mb])]
                width = max(len(s) for s in seqs)
                ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=self.device)
                attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
                mask = torch.tensor([[0] * len(p) + [1] * len(r) + [0] * (width - len(p) - len(r))
                                     for p, r in zip(self.prompt_ids[start:start + mb],
                                                     out.response_ids[start:start + mb])], device=self.device)
                lp = sequence_logprobs(policy, ids, attn, mask).sum
                ref = sequence_logprobs(self.reference, ids, attn, mask).sum
                kls += (lp - ref).tolist()
                if self.reward_model is not None:
                    mean, std = self.rm_norm
                    rm_scores += ((sequence_scores(self.reward_model, ids, attn) - mean) / std).tolist()
        result = {"method": name, "texts": out.texts, "kl": kls, "length": [len(r) for r in out.response_ids],
                  "eos": out.ended_with_eos, "rm": rm_scores}
        if self.gold is not None:
            result["gold"] = [self.gold(p, t) for p, t in zip(self.prompt_texts, out.texts)]
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
