"""Comparing methods across settings and seeds: pure statistics on per-prompt tables.

The input everywhere is a table of per-prompt values, one row per seed: `values[s][p]` is the
value (gold score, KL) of prompt p for the policy trained with seed s. Every policy of a
pipeline is sampled on the same held-out prompts in the same order (align.evaluation), so
column p means the same prompt for every method, setting and seed, which is what makes the
comparisons below paired.

Uncertainty is a two-level percentile bootstrap (Efron & Tibshirani 1993, ch. 13; the
"cases" bootstrap of a nested design): each replicate resamples seeds with replacement, then
prompts with replacement (the same prompt draw for every seed and, in a paired comparison, for
both methods), so the intervals cover both training randomness (seeds) and prompt sampling.
With one seed this is the ordinary bootstrap over prompts.

Imports only the standard library.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

Table = Sequence[Sequence[float]]  # [seed][prompt]


def _check(table: Table, name: str) -> None:
    if not table or not table[0]:
        raise ValueError(f"{name}: needs at least one seed and one prompt")
    if len({len(row) for row in table}) != 1:
        raise ValueError(f"{name}: every seed needs the same prompts")


def table_mean(table: Table) -> float:
    """Mean over seeds of the mean over prompts."""
    return statistics.mean(statistics.mean(row) for row in table)


def _draw(rng: random.Random, n: int) -> List[int]:
    return [rng.randrange(n) for _ in range(n)]


def _percentiles(stats: List[float], level: float) -> Tuple[float, float]:
    stats = sorted(stats)
    k = len(stats)
    return stats[int((1 - level) / 2 * k)], stats[min(k - 1, int((1 + level) / 2 * k))]


def nested_bootstrap_ci(table: Table, samples: int = 1000, seed: int = 0, level: float = 0.95) -> Tuple[float, float]:
    """Percentile CI of `table_mean(table)`, resampling seeds, then prompts."""
    _check(table, "table")
    rng = random.Random(seed)
    n_seeds, n_prompts = len(table), len(table[0])
    stats = []
    for _ in range(samples):
        seeds, prompts = _draw(rng, n_seeds), _draw(rng, n_prompts)
        stats.append(sum(table[s][p] for s in seeds for p in prompts) / (n_seeds * n_prompts))
    return _percentiles(stats, level)


def paired_bootstrap(a: Table, b: Table, samples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> Tuple[float, Tuple[float, float]]:
    """Difference of means `table_mean(a) - table_mean(b)` on the same prompts, with its CI.

    Each replicate draws one set of prompts for both methods (the pairing: a hard prompt is
    hard for both, so its difficulty cancels) and each method's seeds independently (seed s of
    two methods shares nothing but the number). Returns (difference, (low, high)).
    """
    _check(a, "a")
    _check(b, "b")
    if len(a[0]) != len(b[0]):
        raise ValueError(f"paired_bootstrap: {len(a[0])} prompts against {len(b[0])}; pairs need the same prompts")
    rng = random.Random(seed)
    n_prompts = len(a[0])
    stats = []
    for _ in range(samples):
        prompts = _draw(rng, n_prompts)
        seeds_a, seeds_b = _draw(rng, len(a)), _draw(rng, len(b))
        mean_a = sum(a[s][p] for s in seeds_a for p in prompts) / (len(seeds_a) * n_prompts)
        mean_b = sum(b[s][p] for s in seeds_b for p in prompts) / (len(seeds_b) * n_prompts)
        stats.append(mean_a - mean_b)
    return table_mean(a) - table_mean(b), _percentiles(stats, level)


def format_difference(name_a: str, name_b: str, diff: float, ci: Sequence[float]) -> str:
    """'dpo - ppo: +0.050 [0.010, 0.090]'."""
    return f"{name_a} - {name_b}: {diff:+.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def win_rate(a: Table, b: Table) -> float:
    """P(a beats b on the same prompt), ties counting one half, over every pair of seeds."""
    _check(a, "a")
    _check(b, "b")
    total = sum(1.0 if x > y else 0.5 if x == y else 0.0
                for row_a in a for row_b in b for x, y in zip(row_a, row_b))
    return total / (len(a) * len(b) * len(a[0]))


def win_matrix(tables: Dict[str, Table]) -> Dict[str, Dict[str, float]]:
    """matrix[a][b] = win_rate(a, b) for every two methods (matrix[a][b] + matrix[b][a] = 1)."""
    return {a: {b: win_rate(ta, tb) for b, tb in tables.items() if b != a} for a, ta in tables.items()}


def seed_std(table: Table) -> Optional[float]:
    """Standard deviation across seeds of the per-seed mean (None with fewer than two seeds)."""
    if len(table) < 2:
        return None
    return statistics.stdev(statistics.mean(row) for row in table)


def frontier_points(settings: Dict[str, Dict[str, Table]], samples: int = 1000, seed: int = 0,
                    level: float = 0.95) -> List[Dict[str, object]]:
    """One point per setting of a method: {setting, kl, kl_ci, gold, gold_ci, seeds, gold_seed_std}.

    `settings[name]` holds the setting's tables {"kl": [seed][prompt], "gold": [seed][prompt]}
    ("gold" may be any score: the report passes the reward model's when there is no gold
    scorer). Each coordinate is the mean over seeds of the mean over prompts, with its nested
    bootstrap CI. Sorted by KL: the frontier is the line through them in that order.
    """
    points = []
    for name, tables in settings.items():
        kl, gold = tables["kl"], tables["gold"]
        points.append({"setting": name, "kl": table_mean(kl), "kl_ci": list(nested_bootstrap_ci(kl, samples, seed, level)),
                       "gold": table_mean(gold), "gold_ci": list(nested_bootstrap_ci(gold, samples, seed, level)),
                       "seeds": len(gold), "gold_seed_std": seed_std(gold)})
    return sorted(points, key=lambda p: (p["kl"], p["setting"]))


def kl_budgets(kls: Sequence[float], quantiles: Sequence[float] = (0.25, 0.5, 0.75, 1.0)) -> List[float]:
    """KL budgets taken from the data: the given quantiles of the frontier points' KL values
    (nearest rank: the smallest value with at least that fraction of points at or below it),
    without repeats."""
    values = sorted(kls)
    if not values:
        return []
    out = []
    for q in quantiles:
        v = values[max(0, math.ceil(q * len(values)) - 1)]
        if v not in out:
            out.append(v)
    return out


def best_at_budget(frontiers: Dict[str, List[Dict[str, object]]], budgets: Sequence[float]) -> List[Dict[str, object]]:
    """Per budget, each method's best gold among its points with KL at most the budget.

    Returns [{"budget": B, "best": {method: {"gold", "setting", "kl"} or None}}]; None when no
    point of the method is within the budget.
    """
    rows = []
    for budget in budgets:
        best = {}
        for method, points in frontiers.items():
            inside = [p for p in points if p["kl"] <= budget]
            top = max(inside, key=lambda p: p["gold"]) if inside else None
            best[method] = None if top is None else {"gold": top["gold"], "setting": top["setting"], "kl": top["kl"]}
        rows.append({"budget": budget, "best": best})
    return rows
