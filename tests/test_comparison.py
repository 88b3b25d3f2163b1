"""align.comparison against hand computations on small tables ([seed][prompt])."""

import math

import pytest

from align.comparison import (best_at_budget, format_difference, frontier_points, kl_budgets, nested_bootstrap_ci,
                              paired_bootstrap, seed_std, table_mean, win_matrix, win_rate)


def test_paired_difference_and_ci_by_hand():
    # Per-prompt differences a - b = [0, 0, 3]; the difference is their mean, 1.
    # A bootstrap draw of 3 prompts has k copies of the '3' with k ~ Binomial(3, 1/3), so the
    # resampled mean is k in {0, 1, 2, 3} with probabilities 8/27, 12/27, 6/27, 1/27
    # (cumulative 0.296, 0.741, 0.963, 1). Percentiles: 10% -> 0, 90% -> 2; 2.5% -> 0, 97.5% -> 3.
    a, b = [[1.0, 1.0, 4.0]], [[1.0, 1.0, 1.0]]
    diff, ci = paired_bootstrap(a, b, samples=10000, seed=3, level=0.8)
    assert diff == 1.0 and ci == (0.0, 2.0)
    diff, ci = paired_bootstrap(a, b, samples=10000, seed=3, level=0.95)
    assert ci == (0.0, 3.0)
    assert format_difference("dpo", "ppo", diff, ci) == "dpo - ppo: +1.000 [0.000, 3.000]"


def test_pairing_cancels_prompt_difficulty():
    # a is b + 1 on every prompt: every paired replicate differs by exactly 1, though the
    # prompts themselves spread from 0 to 4.
    diff, ci = paired_bootstrap([[1.0, 2.0, 3.0, 4.0]], [[0.0, 1.0, 2.0, 3.0]], samples=500)
    assert diff == 1.0 and ci == (1.0, 1.0)


def test_seeds_are_resampled():
    # Seeds of a have means 1 and 3, b is 0: a replicate's difference is the mean of two seed
    # draws, 1, 2 or 3 with probabilities 1/4, 1/2, 1/4. 95% -> [1, 3]; 40% (30th and 70th
    # percentiles, cumulative 0.25 and 0.75) -> [2, 2].
    a, b = [[1.0, 1.0], [3.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]
    assert paired_bootstrap(a, b, samples=4000, seed=1) == (2.0, (1.0, 3.0))
    assert paired_bootstrap(a, b, samples=4000, seed=1, level=0.4) == (2.0, (2.0, 2.0))
    assert nested_bootstrap_ci(a, samples=4000, seed=1) == (1.0, 3.0)


def test_paired_bootstrap_needs_the_same_prompts():
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap([[1.0, 2.0]], [[1.0]])


def test_win_rate_and_matrix_by_hand():
    # seed 0: 2 > 1 (win), 1 = 1 (tie) -> 1.5; seed 1: 3 > 1, 1 = 1 -> 1.5; 3 of 4 -> 0.75.
    a, b = [[2.0, 1.0], [3.0, 1.0]], [[1.0, 1.0]]
    assert win_rate(a, b) == 0.75
    c = [[0.0, 5.0]]  # against b: loss, win -> 0.5; against a: (loss, win) twice -> 0.5
    m = win_matrix({"a": a, "b": b, "c": c})
    assert m == {"a": {"b": 0.75, "c": 0.5}, "b": {"a": 0.25, "c": 0.5}, "c": {"a": 0.5, "b": 0.5}}


def test_frontier_points_and_seed_std_by_hand():
    settings = {
        "beta0.1": {"kl": [[2.0, 4.0], [2.0, 4.0]], "gold": [[1.0, 1.0], [1.0, 1.0]]},
        "beta0.5": {"kl": [[1.0, 1.0], [1.0, 1.0]], "gold": [[0.0, 1.0], [1.0, 2.0]]},
    }
    low, high = frontier_points(settings, samples=300)
    # sorted by KL: beta0.5 (KL 1) first
    assert low["setting"] == "beta0.5" and low["kl"] == 1.0 and low["kl_ci"] == [1.0, 1.0]
    # seed means 0.5 and 1.5: gold 1.0, across-seed std sqrt(((-0.5)^2 + 0.5^2) / 1) = 0.7071
    assert low["gold"] == 1.0 and low["seeds"] == 2 and math.isclose(low["gold_seed_std"], math.sqrt(0.5))
    assert high["setting"] == "beta0.1" and high["kl"] == 3.0 and high["gold_ci"] == [1.0, 1.0]
    assert high["gold_seed_std"] == 0.0 and 2.0 <= high["kl_ci"][0] <= high["kl_ci"][1] <= 4.0
    assert seed_std([[1.0, 2.0]]) is None and table_mean([[1.0, 2.0], [3.0, 4.0]]) == 2.5


def test_kl_budgets_are_quantiles_of_the_points():
    # nearest rank over 4 values: 25% -> 1st, 50% -> 2nd, 75% -> 3rd, 100% -> 4th
    assert kl_budgets([3.0, 1.0, 2.0, 4.0]) == [1.0, 2.0, 3.0, 4.0]
    # over [1, 1, 2]: ranks ceil(0.75)=1, ceil(1.5)=2, ceil(2.25)=3, 3 -> 1, 1, 2, 2; repeats dropped
    assert kl_budgets([1.0, 2.0, 1.0]) == [1.0, 2.0]
    assert kl_budgets([]) == []


def test_best_at_budget_by_hand():
    frontiers = {"dpo": [{"kl": 1.0, "gold": 0.2, "setting": "a"}, {"kl": 3.0, "gold": 0.5, "setting": "b"}],
                 "ppo": [{"kl": 2.0, "gold": 0.4, "setting": "c"}]}
    rows = best_at_budget(frontiers, [1.0, 2.0, 3.0])
    assert [r["budget"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[0]["best"] == {"dpo": {"gold": 0.2, "setting": "a", "kl": 1.0}, "ppo": None}
    assert rows[1]["best"]["ppo"] == {"gold": 0.4, "setting": "c", "kl": 2.0} and rows[1]["best"]["dpo"]["setting"] == "a"
    assert rows[2]["best"]["dpo"] == {"gold": 0.5, "setting": "b", "kl": 3.0}
