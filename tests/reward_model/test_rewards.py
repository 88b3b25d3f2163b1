"""reward_model/rewards.py: rule rewards by hand, the gold scorer, user functions by import path,
weighted sums, and errors that name the function or the config key."""

import pickle
import textwrap
from dataclasses import dataclass, field

import pytest

from align.config import load_config
from align.errors import ConfigError, UserError
from reward_model.rewards import (
    RULES,
    RewardConfig,
    RewardFunctionError,
    RewardTerm,
    build_reward,
    json_schema,
    json_valid,
    number_match,
    python_compiles,
)

PERSON = ("Return only a JSON object with the keys name (string) and age (integer) for this person: "
          "Ines Okafor is 34 years old. She lives in Lisbon. She works as a teacher. Her email address is "
          "ines.okafor@example.com. She is not a member. She is 1.68 m tall. She speaks English.")


def test_json_valid():
    responses = ['{"a": 1}', '```json\n[1, 2]\n```', '{"a": 1', "", "Sure! {}"]
    assert json_valid([""] * 5, responses, [{}] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_json_schema_by_hand():
    schema = {"name": "string", "age": "integer"}
    responses = ['{"name": "A", "age": 3}', '{"name": "A", "age": "3"}', '{"age": 3, "name": "A", "x": 1}',
                 "nope", "[1]", '{"age": true}']
    extras = [{"schema": schema}, {"schema": '{"name": "string", "age": "integer"}'}] + [{"schema": schema}] * 4
    # all right; age has the wrong type; 2 right of 2 asked + 1 extra; does not parse; not an
    # object; a bool is not an integer and name is missing
    assert json_schema([""] * 6, responses, extras) == [1.0, 0.5, 2 / 3, -1.0, 0.0, 0.0]
    with pytest.raises(RewardFunctionError, match="'json_schema': response 0 has no 'schema'"):
        json_schema([""], ["{}"], [{}])
    with pytest.raises(RewardFunctionError, match="response 0: unknown JSON type 'int'"):
        json_schema([""], ['{"a": 1}'], [{"schema": {"a": "int"}}])


def test_python_compiles():
    responses = ["def f(x):\n    return x + 1\n", "Here:\n```python\nprint('hi')\n```\nDone.", "def f(:",
                 "", "```python\nfor\n```", "x = 1\x00", "import os; os.remove('never-run')"]
    # the last compiles and is never executed
    assert python_compiles([""] * 7, responses, [{}] * 7) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_number_match():
    responses = ["The answer is 42.", "1,234 apples", "3 then 5", "no number", "#### -2.5", "x = 1e3", "41.9999999"]
    answers = [42, 1234, 3, 1, "-2.5", 1000, 42]
    # the LAST number counts; 41.9999999 is within 1e-6 * 42 of 42
    assert number_match([""] * 7, responses, [{"answer": a} for a in answers]) == [1, 1, 0, 0, 1, 1, 1]
    with pytest.raises(RewardFunctionError, match="'number_match': response 1 has no 'answer'"):
        number_match(["", ""], ["1", "2"], [{"answer": 1}, {}])
    with pytest.raises(RewardFunctionError, match="'answer' must be a number"):
        number_match([""], ["1"], [{"answer": "forty"}])


def test_weighted_rules():
    cfg = RewardConfig(fns=[{"fn": "json_valid", "weight": 2.0}, {"fn": "number_match", "weight": -0.5}])
    reward = build_reward(cfg)
    out = reward(["", ""], ['{"n": 7}', "7"], [{"answer": 7}, {"answer": 7}])
    # both parse as JSON ("7" is a JSON number) and end in 7: 2 * 1 - 0.5 * 1 each
    assert out.terms == {"json_valid": [1.0, 1.0], "number_match": [1.0, 1.0]}
    assert out.total == [1.5, 1.5]
    out = reward(["", ""], ['{"n": 8}', "seven"], [{"answer": 7}, {"answer": 7}])
    assert out.total == [2.0 * 1 - 0.5 * 0, 2.0 * 0 - 0.5 * 0]


def test_gold_and_reward_model_combined():
    class LengthScorer:  # the interface build_reward takes: .score(prompts, responses)
        def score(self, prompts, responses):
            return [len(r) / 100 for r in responses]

    cfg = RewardConfig(fns=[RewardTerm("gold", 1.0), RewardTerm("reward_model", 0.5)])
    reward = build_reward(cfg, data_paths=["builtin:json_records/prompts"], scorer=LengthScorer())
    exact, partial, broken = '{"name": "Ines Okafor", "age": 34}', '{"name": "Ines Okafor"}', "{"
    out = reward([PERSON, [{"role": "user", "content": PERSON}], PERSON], [exact, partial, broken])
    assert out.terms["gold"] == [1.0, 0.5, -1.0]  # chat-form prompts use the last user turn
    assert out.total == pytest.approx([1.0 + 0.5 * len(exact) / 100, 0.5 + 0.5 * len(partial) / 100, -1.0 + 0.005])
    assert reward.labeller()([PERSON], [exact]) == pytest.approx([1.0 + 0.5 * len(exact) / 100])
    with pytest.raises(ConfigError, match=r"reward.fns\[0\].fn: 'gold' needs prompts from a built-in task"):
        build_reward(cfg, data_paths=["data/prompts.jsonl"], scorer=LengthScorer())
    with pytest.raises(ConfigError, match=r"reward.fns\[1\].fn: 'reward_model' needs a reward model"):
        build_reward(cfg, data_paths=["builtin:json_records/prompts"])
    # the gold scorer refusing a foreign prompt is an error naming it
    with pytest.raises(RewardFunctionError, match="reward function 'gold' raised ValueError: not a json_records"):
        reward(["Review the movie Night Harbor."], ["{}"])


USER_MODULE = '''
def score(prompts, responses, extras):
    return [len(r) / 10 + extras[i].get("bonus", 0) for i, r in enumerate(responses)]

def bools(prompts, responses, extras):
    return tuple(r == "yes" for r in responses)

def wrong_length(prompts, responses, extras):
    return [1.0]

def not_number(prompts, responses, extras):
    return ["high"] * len(responses)

def boom(prompts, responses, extras):
    raise KeyError("label")

def nan(prompts, responses, extras):
    return [float("nan")] * len(responses)

def scalar(prompts, responses, extras):
    return 1.0

class Scorer:
    @staticmethod
    def score(prompts, responses, extras):
        return [0.25] * len(responses)

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('bad module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_user_function_by_import_path(user_module):
    reward = build_reward(RewardConfig(fns=[{"fn": "my_rewards:score", "weight": 2.0},
                                            {"fn": "my_rewards:bools", "weight": 1.0},
                                            {"fn": "my_rewards:Scorer.score", "weight": 4.0}]))
    out = reward(["p", "p"], ["yes", "no"], [{"bonus": 1.0}, {}])
    assert out.terms == {"my_rewards:score": [1.3, 0.2], "my_rewards:bools": [1.0, 0.0],
                         "my_rewards:Scorer.score": [0.25, 0.25]}
    assert out.total == pytest.approx([2 * 1.3 + 1 + 1, 2 * 0.2 + 0 + 1])


@pytest.mark.parametrize("fn, message", [
    ("wrong_length", "reward function 'my_rewards:wrong_length' returned 1 values for 2 responses"),
    ("not_number", "reward function 'my_rewards:not_number': value 0 is 'high' \\(str\\), not a number"),
    ("boom", "reward function 'my_rewards:boom' raised KeyError: 'label'"),
    ("nan", "reward function 'my_rewards:nan': value 0 is nan, not a finite number"),
    ("scalar", "reward function 'my_rewards:scalar' returned a float; expected a list of 2 numbers"),
])
def test_wrong_returns_name_the_function(user_module, fn, message):
    reward = build_reward(RewardConfig(fns=[{"fn": f"my_rewards:{fn}"}]))
    with pytest.raises(RewardFunctionError, match=message) as err:
        reward(["p", "p"], ["a", "b"])
    assert isinstance(err.value, UserError)
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)  # survives Ray


@pytest.mark.parametrize("fn, message", [
    ("jsonvalid", r"reward.fns\[1\].fn: 'jsonvalid' is not a rule \['json_schema', 'json_valid', "),
    ("no_such_pkg.rewards:score", r"reward.fns\[1\].fn: cannot import module 'no_such_pkg.rewards'"),
    ("my_rewards:missing", r"reward.fns\[1\].fn: 'my_rewards' has no attribute 'missing'"),
    ("my_rewards:NOT_CALLABLE", r"reward.fns\[1\].fn: 'my_rewards:NOT_CALLABLE' is a int, not a function"),
    ("broken_rewards:score", r"reward.fns\[1\].fn: importing 'broken_rewards' raised RuntimeError: bad module"),
    ("", r"reward.fns\[1\].fn: '' is not a rule"),
])
def test_bad_config_names_the_key(user_module, fn, message):
    with pytest.raises(ConfigError, match=message):
        RewardConfig(fns=[{"fn": "json_valid"}, {"fn": fn}])


def test_bad_weight_and_empty():
    with pytest.raises(ConfigError, match=r"reward.fns\[0\].weight: must be a finite number, got nan"):
        RewardConfig(fns=[{"fn": "json_valid", "weight": float("nan")}])
    with pytest.raises(ConfigError, match="reward.fns: empty"):
        RewardConfig(fns=[])


@dataclass
class Stage:  # a stage config holding a reward section, as the RL stage will
    reward: RewardConfig = field(default_factory=RewardConfig)


def test_through_the_config_layer(tmp_path, user_module):
    good = tmp_path / "good.yaml"
    good.write_text("reward:\n  fns:\n    - {fn: json_schema, weight: 1.0}\n    - {fn: my_rewards:score, weight: 0.5}\n")
    cfg = load_config(Stage, str(good))
    assert [(t.fn, t.weight) for t in cfg.reward.fns] == [("json_schema", 1.0), ("my_rewards:score", 0.5)]
    assert [t.fn for t in load_config(Stage).reward.fns] == ["reward_model"]  # the default
    bad = tmp_path / "bad.yaml"
    bad.write_text("reward:\n  fns:\n    - {fn: json_schema}\n    - {fn: my_rewards:nope}\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: reward.fns\[1\].fn: 'my_rewards' has no attribute 'nope'$"):
        load_config(Stage, str(bad))
    assert set(RULES) == {"json_valid", "json_schema", "python_compiles", "number_match"}
