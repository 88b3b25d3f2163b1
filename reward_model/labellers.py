"""Labellers of online rounds: a labeller scores sampled responses (higher is better), and the
round turns the scores into training data (online DPO keeps each prompt's best and worst as a
pair; critic-free RL would use them as rewards).

    labeller = make_labeller("gold", prompts_path="builtin:prompts")
    labeller([[{"role": "user", "content": "Review the movie Iron Road."}]], ["The plot was great."])
"""

from __future__ import annotations

import json
from typing import Callable, List, Optional, Sequence, Tuple

from align.config import ConfigError
from align.task import gold_scorer_for
from reward_model.rewards import RULES, RewardConfig, build_reward
from reward_model.score import RewardScorer

# labeller(prompts as chat messages, responses) -> one score per response
Labeller = Callable[[List[list], List[str]], List[float]]
# The named labellers, and every verifiable rule of reward_model/rewards.py (the RL stage's rewards).
LABELLERS = ("gold", "reward_model", "json", *sorted(RULES))


def make_labeller(kind: str, prompts_path: str, reward_model: Optional[str] = None,
                  trust_remote_code: bool = False) -> Labeller:
    """gold: the task's gold scorer (the task of `prompts_path`); reward_model: the reward model
    in the directory `reward_model`, normalised scores; json: 1 when the response parses as JSON,
    else 0; a rule of reward_model/rewards.py RULES (json_valid, python_compiles, ...): that rule,
    as the RL stage computes it (rules that read a row's extra fields need them in the prompts)."""
    if kind in RULES:
        return build_reward(RewardConfig(fns=[{"fn": kind}]), [prompts_path]).labeller()
    if kind == "json":
        return lambda prompts, responses: [float(parses_as_json(r)) for r in responses]
    if kind == "reward_model":
        scorer = RewardScorer.from_pretrained(reward_model, trust_remote_code=trust_remote_code)
        return lambda prompts, responses: [float(s) for s in scorer.score(prompts, responses)]
    if kind != "gold":
        raise ConfigError(f"online.labeller: {kind!r} is not one of {list(LABELLERS)}")
    gold = gold_scorer_for([prompts_path])
    if gold is None:
        raise ConfigError(f"online.labeller=gold: {prompts_path} has no gold scorer; "
                          "use online.labeller=reward_model or json")
    return lambda prompts, responses: [gold(p[-1]["content"], r) for p, r in zip(prompts, responses)]


def best_and_worst(scores: Sequence[float]) -> Optional[Tuple[int, int]]:
    """(index of the best, index of the worst) of one prompt's scores, the first of equals; None
    when all are equal, since a tie carries no preference. Online rounds and the label stage
    (reward_model/label.py) make their pairs with it."""
    best = max(range(len(scores)), key=scores.__getitem__)
    worst = min(range(len(scores)), key=scores.__getitem__)
    return (best, worst) if scores[best] > scores[worst] else None


def parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
