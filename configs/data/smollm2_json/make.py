"""Writes the small real-format JSON-formatting task used by configs/*/smollm2.yaml (until the
JSON verifiable task, builtin:json_records, lands): `python configs/data/smollm2_json/make.py`.

Prompt: "Return only a JSON object with keys name, age, city for this person: ...". Chosen: the
exact object. Rejected: a typical failure of a small instruct model (prose, a missing or
renamed key, a wrong value, a code fence with commentary). Deterministic (seed 0).
Files: prefs.jsonl {prompt, chosen, rejected}, binary.jsonl {prompt, completion, label},
sft.jsonl {prompt, completion}, prompts.jsonl and eval_prompts.jsonl {prompt} (held-out people).
"""

import json
import os
import random

NAMES = ["Ann", "Bob", "Carla", "Dev", "Eva", "Farid", "Gina", "Hugo", "Ines", "Jon", "Kemal", "Lea", "Marta",
         "Nils", "Olga", "Pedro", "Qi", "Rosa", "Sami", "Tara", "Ugo", "Vera", "Wim", "Xena", "Yusuf", "Zoe"]
CITIES = ["Oslo", "Lima", "Cairo", "Lyon", "Porto", "Kyoto", "Dakar", "Quito", "Riga", "Perth", "Turin", "Accra"]
TEMPLATES = ["{n} is {a} years old and lives in {c}.", "{n}, aged {a}, from {c}.", "Meet {n} ({a}) of {c}."]


def person(rng):
    return rng.choice(NAMES), rng.randint(18, 80), rng.choice(CITIES)


def prompt(n, a, c, rng):
    return ("Return only a JSON object with keys name, age, city for this person: "
            + rng.choice(TEMPLATES).format(n=n, a=a, c=c))


def exact(n, a, c):
    return json.dumps({"name": n, "age": a, "city": c})


def failure(n, a, c, rng):
    return rng.choice([
        f"{n} is {a} years old and lives in {c}.",
        json.dumps({"name": n, "age": a}),
        json.dumps({"Name": n, "Age": a, "City": c}),
        json.dumps({"name": n, "age": str(a), "city": c}),
        json.dumps({"name": n, "age": a + rng.randint(1, 9), "city": c}),
        "Sure! Here is the JSON object:\n```json\n" + exact(n, a, c) + "\n```",
    ])


def main(out=os.path.dirname(os.path.abspath(__file__)), n_train=96, n_eval=32, seed=0):
    rng = random.Random(seed)
    people, seen = [], set()
    while len(people) < n_train + n_eval:
        p = person(rng)
        if p[:2] not in seen:
            seen.add(p[:2])
            people.append(p)
    train, held = people[:n_train], people[n_train:]
    rows = {"prefs": [], "binary": [], "sft": [], "prompts": [], "eval_prompts": []}
    for n, a, c in train:
        q = prompt(n, a, c, rng)
        good, bad = exact(n, a, c), failure(n, a, c, rng)
        rows["prefs"].append({"prompt": q, "chosen": good, "rejected": bad})
        rows["binary"] += [{"prompt": q, "completion": good, "label": True},
                           {"prompt": q, "completion": bad, "label": False}]
        rows["sft"].append({"prompt": q, "completion": good})
        rows["prompts"].append({"prompt": q})
    rows["eval_prompts"] = [{"prompt": prompt(n, a, c, rng)} for n, a, c in held]
    for name, items in rows.items():
        with open(os.path.join(out, f"{name}.jsonl"), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in items)


if __name__ == "__main__":
    main()
