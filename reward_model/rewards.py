"""Rewards for RL and online labelling: the task's gold scorer, verifiable rules, a reward model,
any user function by import path, and weighted sums of them.

Every reward is a function

    fn(prompts, responses, extras) -> one float per response

with prompts (strings or chat message lists), responses (strings) and extras (one dict per
response: the prompt row's extra fields, e.g. `schema` or `answer`). The config names them:

    reward:
      fns:
        - {fn: json_schema, weight: 1.0}           # a rule from RULES
        - {fn: reward_model, weight: 0.5}          # the stage's reward model
        - {fn: mypkg.rewards:score, weight: 1.0}   # a user function, by import path
        # fn: gold                                 # the built-in task's exact scorer

The reward is sum_k weight_k * fn_k. A function that raises, or returns the wrong number of
values or a non-number, gets a `RewardFunctionError` naming it (a UserError: one line, no
traceback). The reward model enters as a scorer object the recipe passes in
(`reward_model.score.RewardScorer` or anything with `.score(prompts, responses)`), so this
module never loads a model: it imports only the standard library and align's light modules.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence

from align.errors import ConfigError, UserError
from align.task import gold_scorer_for
from align.task.json_records import loads_response, type_ok

RewardFn = Callable[[Sequence[Any], Sequence[str], Sequence[Mapping[str, Any]]], Sequence[float]]


class RewardFunctionError(UserError, ValueError):
    """A reward function failed or returned something other than one number per response."""


# ---------------------------------------------------------------------------------------------
# Rules: verifiable rewards
# ---------------------------------------------------------------------------------------------


def _extra(extras: Sequence[Mapping[str, Any]], i: int, key: str, rule: str, what: str) -> Any:
    value = extras[i].get(key) if extras[i] is not None else None
    if value is None:
        raise RewardFunctionError(f"reward {rule!r}: response {i} has no {key!r} extra field ({what})")
    return value


def json_valid(prompts, responses, extras) -> List[float]:
    """1 when the response is JSON (the whole text, or one ```json fence that is the whole text), else 0."""
    return [1.0 if loads_response(r)[0] else 0.0 for r in responses]


def json_schema(prompts, responses, extras) -> List[float]:
    """Keys and JSON types against the row's `schema` extra field ({key: type}, or its JSON text;
    types: string, integer, number, boolean, array, object, null). Values are not checked.

        -1                         the response does not parse as JSON
        correct / (keys + extra)   it parses: `correct` keys present with the right type, `extra`
                                   keys not in the schema (a non-object scores 0); 1 = all right
    """
    out = []
    for i, response in enumerate(responses):
        schema = _extra(extras, i, "schema", "json_schema", "a {key: JSON type} object")
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                schema = None
        if not isinstance(schema, dict) or not schema:
            raise RewardFunctionError(f"reward 'json_schema': response {i}: 'schema' must be a non-empty "
                                      f"{{key: JSON type}} object, got {extras[i]['schema']!r}")
        parsed, value = loads_response(response)
        if not parsed:
            out.append(-1.0)
            continue
        if not isinstance(value, dict):
            out.append(0.0)
            continue
        try:
            correct = sum(k in value and type_ok(value[k], t) for k, t in schema.items())
        except ValueError as e:
            raise RewardFunctionError(f"reward 'json_schema': response {i}: {e}") from None
        out.append(correct / (len(schema) + sum(k not in schema for k in value)))
    return out


_CODE_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)


def python_compiles(prompts, responses, extras) -> List[float]:
    """1 when the response's code compiles (Python's `compile`, which runs nothing), else 0.

    The code is the first ```python fenced block if there is one, else the whole response. An
    empty or blank one scores 0 (it compiles, but is no answer).
    """
    out = []
    for response in responses:
        fenced = _CODE_FENCE.search(response)
        code = fenced.group(1) if fenced else response
        if not code.strip():
            out.append(0.0)
            continue
        try:
            with warnings.catch_warnings():  # invalid escape sequences etc. are not our business
                warnings.simplefilter("ignore")
                compile(code, "<response>", "exec", dont_inherit=True)
            out.append(1.0)
        except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
            out.append(0.0)
    return out


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


def number_match(prompts, responses, extras) -> List[float]:
    """1 when the LAST number in the response equals the row's `answer` extra field, else 0.

    Thousands separators are allowed ("1,234"); equal means |x - answer| <= 1e-6 * max(1, |answer|).
    """
    out = []
    for i, response in enumerate(responses):
        answer = _extra(extras, i, "answer", "number_match", "the expected number")
        try:
            answer = float(str(answer).replace(",", "")) if not isinstance(answer, bool) else None
        except ValueError:
            answer = None
        if answer is None or not math.isfinite(answer):
            raise RewardFunctionError(f"reward 'number_match': response {i}: 'answer' must be a number, "
                                      f"got {extras[i]['answer']!r}")
        found = _NUMBER.findall(response)
        value = float(found[-1].replace(",", "")) if found else None
        out.append(1.0 if value is not None and abs(value - answer) <= 1e-6 * max(1.0, abs(answer)) else 0.0)
    return out


RULES: Dict[str, RewardFn] = {
    "json_valid": json_valid,
    "json_schema": json_schema,
    "python_compiles": python_compiles,
    "number_match": number_match,
}
GOLD, REWARD_MODEL = "gold", "reward_model"


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class RewardTerm:
    # A rule (json_valid, json_schema, python_compiles, number_match), "gold" (the exact scorer of
    # the built-in task the prompts come from), "reward_model" (the stage's reward model), or a
    # user function "package.module:function", called as fn(prompts, responses, extras) -> floats.
    fn: str = ""
    # Weight of this term in the reward, sum_k weight_k * fn_k; negative for a penalty.
    weight: float = 1.0


@dataclass
class RewardConfig:
    # The reward terms, summed with their weights.
    fns: List[RewardTerm] = field(default_factory=lambda: [RewardTerm(fn=REWARD_MODEL)])

    def __post_init__(self) -> None:
        self.fns = [RewardTerm(**t) if isinstance(t, Mapping) else t for t in self.fns]
        if not self.fns:
            raise ConfigError("reward.fns: empty; give at least one {fn, weight}")
        for i, term in enumerate(self.fns):
            key = f"reward.fns[{i}]"
            if isinstance(term.weight, bool) or not isinstance(term.weight, numbers.Real) \
                    or not math.isfinite(term.weight):
                raise ConfigError(f"{key}.weight: must be a finite number, got {term.weight!r}")
            if term.fn not in (*RULES, GOLD, REWARD_MODEL):
                import_function(term.fn, f"{key}.fn")  # fails here, before any heavy start-up


def import_function(path: str, key: str) -> Callable:
    """The callable at "package.module:function" (attribute paths like "module:Class.method" too)."""
    choices = f"a rule {sorted(RULES)}, {GOLD!r}, {REWARD_MODEL!r}, or a function 'package.module:function'"
    module_name, sep, attr = str(path).partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}: {path!r} is not {choices}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import module {module_name!r} of {path!r} ({e})") from None
    except Exception as e:  # the user's module itself is broken
        raise ConfigError(f"{key}: importing {module_name!r} raised {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: {path!r} is a {type(obj).__name__}, not a function")
    return obj


# ---------------------------------------------------------------------------------------------
# Building and calling
# ---------------------------------------------------------------------------------------------


class RewardResult(NamedTuple):
    total: List[float]  # sum_k weight_k * term_k, one per response
    terms: Dict[str, List[float]]  # each term's unweighted values, by its fn name (for logging)


def call_checked(name: str, fn: RewardFn, prompts: Sequence[Any], responses: Sequence[str],
                 extras: Sequence[Mapping[str, Any]]) -> List[float]:
    """fn's values as floats, or RewardFunctionError naming `name` when it raises or returns
    anything but len(responses) finite numbers (bools count as 0/1)."""
    n = len(responses)
    try:
        out = fn(prompts, responses, extras)
    except RewardFunctionError:
        raise
    except Exception as e:
        raise RewardFunctionError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
    if hasattr(out, "tolist"):  # a tensor or an array
        out = out.tolist()
    if isinstance(out, (str, bytes, Mapping)) or not isinstance(out, Iterable):
        raise RewardFunctionError(f"reward function {name!r} returned a {type(out).__name__}; "
                                  f"expected a list of {n} numbers")
    out = list(out)
    if len(out) != n:
        raise RewardFunctionError(f"reward function {name!r} returned {len(out)} values for {n} responses")
    values = []
    for i, v in enumerate(out):
        if not isinstance(v, numbers.Real):
            raise RewardFunctionError(f"reward function {name!r}: value {i} is {v!r} "
                                      f"({type(v).__name__}), not a number")
        if not math.isfinite(v):
            raise RewardFunctionError(f"reward function {name!r}: value {i} is {v!r}, not a finite number")
        values.append(float(v))
    return values


def gold_reward(gold: Callable[[str, str], float]) -> RewardFn:
    """A task's gold scorer (prompt text, response) -> float as a reward function."""

    def reward(prompts, responses, extras):
        return [gold(p if isinstance(p, str) else p[-1]["content"], r) for p, r in zip(prompts, responses)]

    return reward


def reward_model_reward(scorer: Any) -> RewardFn:
    """A reward model as a reward function: anything with .score(prompts, responses) -> floats
    (reward_model.score.RewardScorer, normalised as the reward-model stage saved it)."""

    def reward(prompts, responses, extras):
        return scorer.score(prompts, responses)

    return reward


class CombinedReward:
    """The weighted sum of the configured reward terms; call it with prompts, responses, extras."""

    def __init__(self, terms: Sequence[tuple]):
        self.terms = list(terms)  # (name, weight, fn)

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str],
                 extras: Optional[Sequence[Mapping[str, Any]]] = None) -> RewardResult:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        extras = [{}] * len(responses) if extras is None else list(extras)
        if len(extras) != len(responses):
            raise ValueError(f"{len(extras)} extras but {len(responses)} responses")
        total = [0.0] * len(responses)
        values: Dict[str, List[float]] = {}
        for i, (name, weight, fn) in enumerate(self.terms):
            got = call_checked(name, fn, prompts, responses, extras)
            values[name if name not in values else f"{name}#{i}"] = got
            total = [t + weight * v for t, v in zip(total, got)]
        return RewardResult(total, values)

    def labeller(self) -> Callable[[Sequence[Any], Sequence[str]], List[float]]:
        """labeller(prompts, responses) -> totals, the online-DPO labeller interface."""
        return lambda prompts, responses: self(prompts, responses).total


def build_reward(cfg: RewardConfig, data_paths: Iterable[str] = (), scorer: Any = None) -> CombinedReward:
    """The configured reward. `data_paths` are the prompt sources (for "gold"), `scorer` the
    loaded reward model (for "reward_model"); both are only needed when a term uses them."""
    paths = list(data_paths)
    terms = []
    for i, term in enumerate(cfg.fns):
        key = f"reward.fns[{i}].fn"
        if term.fn in RULES:
            fn = RULES[term.fn]
        elif term.fn == GOLD:
            gold = gold_scorer_for(paths)
            if gold is None:
                raise ConfigError(f"{key}: 'gold' needs prompts from a built-in task (builtin:<task>/<split>); "
                                  f"these have no gold scorer: {paths}")
            fn = gold_reward(gold)
        elif term.fn == REWARD_MODEL:
            if scorer is None:
                raise ConfigError(f"{key}: 'reward_model' needs a reward model (set reward_model to its directory)")
            fn = reward_model_reward(scorer)
        else:
            fn = import_function(term.fn, key)
        terms.append((term.fn, float(term.weight), fn))
    return CombinedReward(terms)
