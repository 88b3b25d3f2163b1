"""The embedded verifiable task `builtin:json_records`: write a JSON object of stated facts.

Each prompt describes a person or an item in plain sentences and asks for a JSON object with
some of its attributes, named with their JSON types:

    Return only a JSON object with the keys name (string), age (integer) and member (boolean)
    for this person: Ines Okafor is 34 years old. She lives in Lisbon. She is not a member.

The answer is exact and machine-checked (no reward model, no download), the task of the
real-model pipeline (SmolLM2-135M-Instruct). Splits (`builtin:json_records/<split>`):
prompts (2,000) and eval_prompts (200) as {prompt}; sft and sft_eval as {prompt, completion};
preferences and preferences_eval as {prompt, chosen, rejected} (chosen exact, rejected one
corrupted field, a missing key, or unparseable text). Every row also carries the extra fields
`expected` (the exact object, as a JSON string) and `schema` ({key: type}, as a JSON string);
the rule rewards in reward_model/rewards.py read them. Train and eval prompts never coincide.

The gold scorer needs only the prompt text: it re-reads the requested keys and each stated
fact from the prompt (every value is written by one fixed sentence pattern per attribute).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from align.cache import build_once

# ---------------------------------------------------------------------------------------------
# Vocabulary and the attributes of each kind: key -> (JSON type, sentence, value pattern)
# ---------------------------------------------------------------------------------------------

FIRST = ["Ines", "Omar", "Mei", "Lukas", "Amara", "Diego", "Sofia", "Kenji", "Priya", "Tomas",
         "Leila", "Noah", "Hana", "Mateo", "Zara", "Felix", "Aisha", "Ivan", "Clara", "Yusuf"]
LAST = ["Okafor", "Lopez", "Chen", "Novak", "Silva", "Haddad", "Kowalski", "Tanaka", "Mensah",
        "Rossi", "Dubois", "Larsen", "Patel", "Moreau", "Nakamura", "Fischer"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Toronto", "Cairo", "Hanoi", "Dublin",
          "Quito", "Seoul", "Krakow", "Accra", "Porto", "Perth", "Bogota"]
JOBS = ["teacher", "nurse", "engineer", "baker", "pilot", "designer", "farmer", "lawyer",
        "chemist", "carpenter", "librarian", "architect"]
LANGUAGES = ["English", "French", "Spanish", "Arabic", "Hindi", "Japanese", "Swahili", "German"]
PRODUCTS = ["desk lamp", "backpack", "water bottle", "keyboard", "umbrella", "notebook",
            "coffee mug", "bicycle helmet", "wall clock", "phone case", "tea kettle", "yoga mat"]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange"]
CATEGORIES = ["home", "office", "outdoor", "kitchen", "sports", "travel"]

TYPES = ("string", "integer", "number", "boolean", "array")

# Sentence per attribute ({s}: the subject, "She"/"He"/"It"), and the regex that reads the value
# back from the description. Regexes match only text their own sentence writes.
PERSON = {
    "name": ("string", "{name} is {age} years old.", r"^(\w+ \w+) is \d+ years old\."),
    "age": ("integer", None, r"^\w+ \w+ is (\d+) years old\."),
    "city": ("string", "{s} lives in {v}.", r"lives in (\w+)\."),
    "job": ("string", "{s} works as {a} {v}.", r"works as an? (\w+)\."),
    "email": ("string", "{S} email address is {v}.", r"email address is ([\w.]+@example\.com)\."),
    "member": ("boolean", "{s} is {v} a member.", r"is (not )?a member\."),
    "height_m": ("number", "{s} is {v} m tall.", r"is (\d\.\d\d) m tall\."),
    "languages": ("array", "{s} speaks {v}.", r"speaks ([A-Z]\w+(?:(?:, | and )[A-Z]\w+)*)\."),
}
ITEM = {
    "product": ("string", "The item is {a} {v}.", r"The item is an? ([a-z ]+)\."),
    "price": ("number", "It costs {v} dollars.", r"costs (\d+\.\d\d) dollars\."),
    "quantity": ("integer", "There are {v} left in stock.", r"There are (\d+) left in stock\."),
    "color": ("string", "It comes in {v}.", r"comes in (\w+)\."),
    "category": ("string", "It belongs to the {v} category.", r"belongs to the (\w+) category\."),
    "weight_kg": ("number", "It weighs {v} kg.", r"weighs (\d+\.\d\d?) kg\."),
    "fragile": ("boolean", "It is {v} fragile.", r"It is (not )?fragile\."),
}
KINDS = {"person": PERSON, "item": ITEM}

_PROMPT = re.compile(r"^Return only a JSON object with the keys (?P<keys>.+?) for this "
                     r"(?P<kind>person|item): (?P<desc>.+)$", re.S)
_KEY = re.compile(r"(\w+) \((\w+)\)")
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.S)

NOT_PARSED = -1.0


# ---------------------------------------------------------------------------------------------
# Checker (the gold scorer)
# ---------------------------------------------------------------------------------------------


def loads_response(text: str) -> Tuple[bool, Any]:
    """(parsed, value) of a response read as JSON: the whole text, stripped, or the content of
    one markdown code fence (```json ... ```) that is the whole text. Nothing else is accepted:
    no prose around the JSON."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):
        return False, None


def type_ok(value: Any, kind: str) -> bool:
    """Whether `value` (parsed JSON) has JSON type `kind`; booleans are not numbers."""
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "null":
        return value is None
    raise ValueError(f"unknown JSON type {kind!r}; types: {list(TYPES) + ['object', 'null']}")


def field_correct(value: Any, expected: Any, kind: str) -> bool:
    """Right type and right value; numbers equal within 1e-9 (12 == 12.0 for a number)."""
    if not type_ok(value, kind):
        return False
    if kind == "number":
        return abs(float(value) - float(expected)) <= 1e-9
    return value == expected


def score_object(response: str, expected: Dict[str, Any], schema: Dict[str, str]) -> float:
    """The exact checker, ordered as machine labels are: does not parse < parses with wrong
    fields < fewer field errors < exact.

        -1.0                          the response does not parse as JSON (``loads_response``)
        correct / (keys + extra)      it parses: `correct` = expected keys present with the right
                                      JSON type and value, `extra` = keys not asked for (a JSON
                                      value that is not an object scores 0)
    so 0 <= score < 1 for a parse with any error, and 1.0 exactly when the object equals the
    expected one (same keys, types and values; key order and whitespace do not matter).
    """
    parsed, value = loads_response(response)
    if not parsed:
        return NOT_PARSED
    if not isinstance(value, dict):
        return 0.0
    correct = sum(k in value and field_correct(value[k], expected[k], schema[k]) for k in expected)
    extra = sum(k not in expected for k in value)
    return correct / (len(expected) + extra)


def _read_value(kind: str, key: str, desc: str) -> Any:
    jtype, _, pattern = KINDS[kind][key]
    match = re.search(pattern, desc, re.M)
    if match is None:
        raise ValueError(f"json_records: the prompt states no {key!r}")
    text = match.group(1)
    if jtype == "boolean":
        return text is None  # "is not a member" captures "not "
    if jtype == "integer":
        return int(text)
    if jtype == "number":
        return float(text)
    if jtype == "array":
        return re.split(r", | and ", text)
    return text


def expected_from_prompt(prompt: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(expected object, schema {key: type}) read back from a json_records prompt's text."""
    match = _PROMPT.match(prompt.strip())
    if match is None:
        raise ValueError(f"not a json_records prompt: {prompt[:80]!r}")
    kind, desc = match["kind"], match["desc"]
    schema = {k: t for k, t in _KEY.findall(match["keys"])}
    return {k: _read_value(kind, k, desc) for k in schema}, schema


def gold_score(prompt: str, response: str) -> float:
    """``score_object`` of the response against the object the prompt asks for: -1, [0, 1), 1."""
    expected, schema = expected_from_prompt(prompt)
    return score_object(response, expected, schema)


def sample_metrics(prompts: Sequence[str], responses: Sequence[str]) -> Dict[str, float]:
    """Shares of sampled responses that parse as JSON and that are exactly right."""
    scores = [gold_score(p, r) for p, r in zip(prompts, responses)]
    n = max(len(scores), 1)
    return {"json_parses": sum(s > NOT_PARSED for s in scores) / n, "json_exact": sum(s == 1.0 for s in scores) / n}


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------


def _person(rng: random.Random) -> Dict[str, Any]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    return {"name": f"{first} {last}", "age": rng.randint(18, 90), "city": rng.choice(CITIES),
            "job": rng.choice(JOBS), "email": f"{first.lower()}.{last.lower()}@example.com",
            "member": rng.random() < 0.5, "height_m": round(rng.uniform(1.5, 2.0), 2),
            "languages": rng.sample(LANGUAGES, rng.randint(1, 3))}


def _item(rng: random.Random) -> Dict[str, Any]:
    return {"product": rng.choice(PRODUCTS), "price": round(rng.uniform(2, 200), 2),
            "quantity": rng.randint(0, 500), "color": rng.choice(COLORS), "category": rng.choice(CATEGORIES),
            "weight_kg": round(rng.uniform(0.1, 9.9), 2), "fragile": rng.random() < 0.5}


def _words(values: List[str]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def describe(kind: str, facts: Dict[str, Any], pronoun: str = "It") -> str:
    """The description's sentences, one per attribute, in the table's order."""
    sentences = []
    for key, (jtype, template, _) in KINDS[kind].items():
        if template is None:
            continue
        v = facts[key]
        if jtype == "boolean":
            text = template.replace("{v} ", "" if v else "not ")
        elif jtype == "number":
            text = template.replace("{v}", f"{v:.2f}")
        elif jtype == "array":
            text = template.replace("{v}", _words(v))
        else:
            text = template.replace("{v}", str(v))
        article = "an" if str(v)[:1] in "aeiou" else "a"
        text = text.format(name=facts.get("name"), age=facts.get("age"), s=pronoun, a=article,
                           S={"She": "Her", "He": "His", "It": "Its"}[pronoun])
        sentences.append(text)
    return " ".join(sentences)


def _keys_text(schema: Dict[str, str]) -> str:
    parts = [f"{k} ({t})" for k, t in schema.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_row(rng: random.Random) -> Dict[str, Any]:
    """One task row: {prompt, expected, schema} (expected and schema as JSON strings)."""
    kind = rng.choice(list(KINDS))
    facts = _person(rng) if kind == "person" else _item(rng)
    table = KINDS[kind]
    keys = sorted(rng.sample(list(table), rng.randint(2, 4)), key=list(table).index)
    # the first names alternate female, male
    pronoun = ("She" if FIRST.index(facts["name"].split()[0]) % 2 == 0 else "He") if kind == "person" else "It"
    schema = {k: table[k][0] for k in keys}
    expected = {k: facts[k] for k in keys}
    prompt = (f"Return only a JSON object with the keys {_keys_text(schema)} for this {kind}: "
              f"{describe(kind, facts, pronoun)}")
    return {"prompt": prompt, "expected": json.dumps(expected), "schema": json.dumps(schema)}


def corrupt(rng: random.Random, expected: Dict[str, Any], schema: Dict[str, str]) -> str:
    """A wrong answer for preference pairs: a field of the wrong type, a dropped key, or not JSON."""
    how = rng.choice(["type", "drop", "unparseable"]) if len(expected) > 1 else rng.choice(["type", "unparseable"])
    obj = dict(expected)
    if how == "unparseable":
        return json.dumps(obj)[:-1]  # the closing brace is missing
    key = rng.choice(list(obj))
    if how == "drop":
        del obj[key]
    else:
        obj[key] = str(obj[key]) if schema[key] != "string" else len(obj[key])
    return json.dumps(obj)


SIZES = {"train": 2000, "eval": 200}
SPLITS = ("prompts", "eval_prompts", "sft", "sft_eval", "preferences", "preferences_eval")
_VERSION = "v1"


def generate_task(seed: int = 0, sizes: Optional[Dict[str, int]] = None) -> Dict[str, List[dict]]:
    """Every split as lists of rows; train and eval rows are distinct prompts of one stream."""
    sizes = sizes or SIZES
    rng = random.Random(f"json-records-{seed}")
    rows, seen = [], set()
    while len(rows) < sizes["train"] + sizes["eval"]:
        row = make_row(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    train, evals = rows[: sizes["train"]], rows[sizes["train"]:]

    def sft(part):
        return [{**r, "completion": r["expected"]} for r in part]

    def preferences(part):
        return [{**r, "chosen": r["expected"],
                 "rejected": corrupt(rng, json.loads(r["expected"]), json.loads(r["schema"]))} for r in part]

    return {"prompts": train, "eval_prompts": evals, "sft": sft(train), "sft_eval": sft(evals),
            "preferences": preferences(train), "preferences_eval": preferences(evals)}


def builtin_path(split: str, seed: int = 0) -> str:
    """The split's JSONL file, written once per seed under the cache directory (atomic rename,
    so Ray actors asking at once agree), as align.task.synthetic does."""
    if split not in SPLITS:
        raise ValueError(f"builtin:json_records/{split}: unknown split; choose from {list(SPLITS)}")

    def write(folder: str) -> None:
        for name, rows in generate_task(seed).items():
            with open(os.path.join(folder, f"{name}.jsonl"), "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)

    final = build_once(os.path.join("task", f"json_records-{_VERSION}-seed{seed}"), write)
    return os.path.join(final, f"{split}.jsonl")
