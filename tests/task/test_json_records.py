"""The embedded verifiable task builtin:json_records: the exact checker by hand, reading the
expected object back from the prompt, determinism, split sizes, train/eval disjointness."""

import json

import pytest

import align.task as task_registry
from align.task import json_records
from align.task.json_records import expected_from_prompt, generate_task, gold_score, sample_metrics

PERSON = ("Return only a JSON object with the keys name (string), age (integer) and member (boolean) for "
          "this person: Ines Okafor is 34 years old. She lives in Lisbon. She works as a teacher. Her email "
          "address is ines.okafor@example.com. She is not a member. She is 1.68 m tall. She speaks English "
          "and French.")
ITEM = ("Return only a JSON object with the keys product (string), price (number), quantity (integer) and "
        "fragile (boolean) for this item: The item is an umbrella. It costs 12.00 dollars. There are 0 left "
        "in stock. It comes in red. It belongs to the travel category. It weighs 0.45 kg. It is fragile.")
LANGS = PERSON.replace("name (string), age (integer) and member (boolean)", "languages (array) and height_m (number)")


def test_expected_read_back_from_the_prompt():
    assert expected_from_prompt(PERSON) == ({"name": "Ines Okafor", "age": 34, "member": False},
                                            {"name": "string", "age": "integer", "member": "boolean"})
    assert expected_from_prompt(ITEM)[0] == {"product": "umbrella", "price": 12.0, "quantity": 0, "fragile": True}
    assert expected_from_prompt(LANGS)[0] == {"languages": ["English", "French"], "height_m": 1.68}
    with pytest.raises(ValueError, match="not a json_records prompt"):
        expected_from_prompt("Review the movie Night Harbor.")


@pytest.mark.parametrize("prompt, response, expected", [
    # exact: 1, whatever the key order, whitespace or a surrounding ```json fence
    (PERSON, '{"name": "Ines Okafor", "age": 34, "member": false}', 1.0),
    (PERSON, '  {"member":false,"age":34,"name":"Ines Okafor"}\n', 1.0),
    (PERSON, '```json\n{"name": "Ines Okafor", "age": 34, "member": false}\n```', 1.0),
    # parses with field errors: correct / (asked keys + extra keys)
    (PERSON, '{"name": "Ines Okafor", "age": "34", "member": false}', 2 / 3),  # wrong type
    (PERSON, '{"name": "Ines Okafor", "age": 34.0, "member": false}', 2 / 3),  # 34.0 is not an integer
    (PERSON, '{"name": "Ines Okafor", "age": 34, "member": 0}', 2 / 3),  # 0 is not a boolean
    (PERSON, '{"name": "Ines Okafor", "age": 34, "member": true}', 2 / 3),  # wrong value
    (PERSON, '{"name": "Ines Okafor", "age": 34}', 2 / 3),  # missing key
    (PERSON, '{"name": "ines okafor", "age": 35}', 0 / 3),  # strings are exact
    (PERSON, '{"name": "Ines Okafor", "age": 34, "member": false, "city": "Lisbon"}', 3 / 4),  # extra key
    (PERSON, '{"a": 1}', 0 / 4),
    (PERSON, '["Ines Okafor", 34, false]', 0.0),  # parses, but is not an object
    # does not parse: -1
    (PERSON, 'Here it is: {"name": "Ines Okafor", "age": 34, "member": false}', -1.0),
    (PERSON, '{"name": "Ines Okafor", "age": 34, "member": false', -1.0),
    (PERSON, "", -1.0),
    # numbers compare as numbers: 12 == 12.00
    (ITEM, '{"product": "umbrella", "price": 12, "quantity": 0, "fragile": true}', 1.0),
    (ITEM, '{"product": "umbrella", "price": 12.5, "quantity": 0, "fragile": true}', 3 / 4),
    (ITEM, '{"product": "umbrella", "price": true, "quantity": false, "fragile": true}', 2 / 4),
    (LANGS, '{"languages": ["English", "French"], "height_m": 1.68}', 1.0),
    (LANGS, '{"languages": ["French", "English"], "height_m": 1.680}', 1 / 2),  # list order counts
])
def test_checker_by_hand(prompt, response, expected):
    assert gold_score(prompt, response) == pytest.approx(expected, abs=1e-12)


def test_checker_order():
    # does not parse < parses with wrong fields < fewer field errors < exact
    responses = ['{"name": "Ines', '{"x": 0}', '{"name": "Ines Okafor"}', '{"name": "Ines Okafor", "age": 34}',
                 '{"name": "Ines Okafor", "age": 34, "member": false}']
    scores = [gold_score(PERSON, r) for r in responses]
    assert scores == sorted(scores) and len(set(scores)) == 5
    assert scores[0] == -1.0 and scores[-1] == 1.0


def test_sample_metrics():
    responses = ['{"name": "Ines Okafor", "age": 34, "member": false}', '{"name": "Ines Okafor"}', "no"]
    assert sample_metrics([PERSON] * 3, responses) == {"json_parses": 2 / 3, "json_exact": 1 / 3}


SMALL = {"train": 60, "eval": 20}


def test_deterministic_from_the_seed():
    a, b, c = generate_task(0, SMALL), generate_task(0, SMALL), generate_task(1, SMALL)
    assert a == b
    assert [r["prompt"] for r in a["prompts"]] != [r["prompt"] for r in c["prompts"]]


@pytest.fixture(scope="module")
def full():
    return generate_task(0)


def test_split_sizes_and_no_overlap(full):
    assert {k: len(v) for k, v in full.items()} == {
        "prompts": 2000, "eval_prompts": 200, "sft": 2000, "sft_eval": 200, "preferences": 2000,
        "preferences_eval": 200}
    train = {r["prompt"] for r in full["prompts"]}
    held_out = {r["prompt"] for r in full["eval_prompts"]}
    assert len(train) == 2000 and len(held_out) == 200 and not train & held_out
    assert [r["prompt"] for r in full["sft"]] == [r["prompt"] for r in full["prompts"]]
    assert [r["prompt"] for r in full["preferences_eval"]] == [r["prompt"] for r in full["eval_prompts"]]
    kinds = [r["prompt"].split(" for this ")[1].split(":")[0] for r in full["prompts"]]
    assert 0.4 < kinds.count("person") / len(kinds) < 0.6


def test_rows_agree_with_the_checker(full):
    for split, rows in full.items():
        for r in rows:
            expected, schema = expected_from_prompt(r["prompt"])
            assert expected == json.loads(r["expected"]) and schema == json.loads(r["schema"]), r
            assert gold_score(r["prompt"], r["expected"]) == 1.0
            if "completion" in r:
                assert r["completion"] == r["expected"]
            if "rejected" in r:
                assert r["chosen"] == r["expected"] and gold_score(r["prompt"], r["rejected"]) < 1.0


def test_registered_as_builtin_source(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    path = task_registry.builtin_path("builtin:json_records/eval_prompts", seed=3)
    assert path.startswith(str(tmp_path))
    with open(path) as fh:
        rows = [json.loads(line) for line in fh]
    assert rows == generate_task(3)["eval_prompts"]
    assert task_registry.gold_scorer_for(["builtin:json_records/prompts"]) is gold_score
    assert task_registry.sample_metrics_for(["builtin:json_records/prompts"], [PERSON], ["{}"]) == {
        "json_parses": 1.0, "json_exact": 0.0}
    with pytest.raises(ValueError, match="unknown split"):
        json_records.builtin_path("nonsense")
