"""The embedded default task: gold scorer by hand, generator statistics, cached files."""

import hashlib
import json
import multiprocessing
import os

import pytest

from align.task import synthetic
from align.task.synthetic import (
    HELDOUT_TITLES,
    TRAIN_TITLES,
    TaskSizes,
    builtin_path,
    generate_task,
    gold_score,
    is_fluent,
)

SMALL = TaskSizes(sft=50, sft_eval=10, preferences=50, preferences_eval=10, binary=20, rankings=10,
                  prompts=20, eval_prompts=8)


@pytest.mark.parametrize("response, expected", [
    ("The music was very charming.", 1.5),  # +1 * 1.5
    ("The plot was dull and the cast was great.", 0.0),  # (-1 + 1) / 2
    ("The plot was somewhat boring.", -0.5),  # -1 * 0.5
    ("The ending was long.", 0.0),  # neutral adjective
    ("THE ACTING WAS QUITE FUN", 1.0),  # case-insensitive; the period is not needed to score
    # (-1 * 1.0 + 1 * 0.5 + 1) / 3
    ("The acting was rather awful and the script was slightly clever. The cast was great.", 0.5 / 3),
    ("colorless green ideas sleep furiously", -1.0),
    ("", -1.0),
    ("   ", -1.0),
    ("The music was very charming. Banana.", (1.5 - 1.0) / 2),  # unparsed clause scores -1
    ("The popcorn was great. The plot was bad.", (-1.0 - 1.0) / 2),  # unknown aspect
    ("The plot was very very bad.", -1.0),  # not in the grammar
])
def test_gold_score_by_hand(response, expected):
    assert gold_score("Review the movie Night Harbor.", response) == pytest.approx(expected)


def test_gold_score_ignores_length():
    one = "The music was very charming."
    assert gold_score("", " ".join([one] * 5)) == gold_score("", one) == 1.5


def test_is_fluent():
    assert is_fluent("The music was very charming.")
    assert is_fluent("The plot was dull and the cast was great. The ending was long.")
    assert not is_fluent("The music was very charming")  # no final period
    assert not is_fluent("The music was very very charming.")
    assert not is_fluent("The music was very charming. Banana.")
    assert not is_fluent("")


def test_generate_task_is_deterministic():
    a, b, c = generate_task(0, SMALL), generate_task(0, SMALL), generate_task(1, SMALL)
    assert a == b
    for split in ("sft", "preferences", "binary", "rankings", "prompts"):
        assert a[split] != c[split]
    assert a["eval_prompts"] == c["eval_prompts"]  # fixed order, independent of the seed


def test_split_sizes():
    task = generate_task(0, SMALL)
    assert {k: len(v) for k, v in task.items()} == {
        "sft": 50, "sft_eval": 10, "preferences": 50, "preferences_eval": 10, "binary": 20,
        "rankings": 10, "prompts": 20, "eval_prompts": 8,
    }
    assert set(task) == set(synthetic.SPLITS)


def title_of(prompt):
    found = [t for t in TRAIN_TITLES + HELDOUT_TITLES if t in prompt]
    assert len(found) == 1, prompt
    return found[0]


@pytest.fixture(scope="module")
def task():
    return generate_task(0)


def test_default_sizes(task):
    assert {k: len(v) for k, v in task.items()} == {
        "sft": 4000, "sft_eval": 200, "preferences": 4000, "preferences_eval": 400, "binary": 4000,
        "rankings": 1000, "prompts": 1000, "eval_prompts": 128,
    }


def test_held_out_titles(task):
    assert not set(TRAIN_TITLES) & set(HELDOUT_TITLES)
    assert len(TRAIN_TITLES) == 192 and len(HELDOUT_TITLES) == 64
    for split in ("eval_prompts", "sft_eval", "preferences_eval"):
        assert all(title_of(r["prompt"]) in HELDOUT_TITLES for r in task[split]), split
    for split in ("sft", "preferences", "binary", "rankings", "prompts"):
        assert all(title_of(r["prompt"]) in TRAIN_TITLES for r in task[split]), split
    # 128 held-out prompts = 32 titles x 4 templates, no repeats.
    assert len({r["prompt"] for r in task["eval_prompts"]}) == 128


def test_rankings(task):
    for row in task["rankings"]:
        assert len(row["responses"]) == 4 == len(row["scores"])
        assert len(set(row["scores"])) == 4  # no ties
        assert len(set(row["responses"])) == 4


def test_preference_labels_are_noisy_bradley_terry(task):
    for split in ("preferences", "preferences_eval"):
        rows = [r for r in task[split] if gold_score(r["prompt"], r["chosen"]) != gold_score(r["prompt"], r["rejected"])]
        agree = sum(gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"]) for r in rows)
        assert 0.75 < agree / len(rows) < 0.97, split
        assert all(r["chosen"] != r["rejected"] for r in task[split])


def test_binary_labels_follow_gold(task):
    good = [gold_score(r["prompt"], r["completion"]) for r in task["binary"] if r["label"]]
    bad = [gold_score(r["prompt"], r["completion"]) for r in task["binary"] if not r["label"]]
    assert sum(good) / len(good) > 0.3 and sum(bad) / len(bad) < -0.3


def test_sft_demonstrations(task):
    scores = [gold_score(r["prompt"], r["completion"]) for r in task["sft"]]
    assert abs(sum(scores) / len(scores)) < 0.1  # alignment has room to improve
    assert all(is_fluent(r["completion"]) for r in task["sft"])


def digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def test_builtin_path_writes_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    path = builtin_path("sft", seed=0)
    assert path.startswith(str(tmp_path))
    first = (digest(path), os.stat(path).st_mtime_ns, os.stat(path).st_ino)
    again = builtin_path("sft", seed=0)
    assert again == path
    assert (digest(again), os.stat(again).st_mtime_ns, os.stat(again).st_ino) == first
    with open(path) as fh:
        rows = [json.loads(line) for line in fh]
    assert rows == generate_task(0)["sft"]
    # One directory holds every split; no temporary directories are left behind.
    task_dir = os.path.dirname(os.path.dirname(path))
    assert os.listdir(task_dir) == [os.path.basename(os.path.dirname(path))]
    assert os.path.dirname(builtin_path("eval_prompts", seed=0)) == os.path.dirname(path)


def test_builtin_path_concurrent_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path))
    ctx = multiprocessing.get_context("spawn")  # the child reads ALIGN_CACHE from the environment
    with ctx.Pool(2) as pool:
        paths = pool.starmap(builtin_path, [("preferences", 7), ("preferences", 7)])
    assert paths[0] == paths[1]
    assert paths[0].startswith(str(tmp_path))
    with open(paths[0]) as fh:
        rows = [json.loads(line) for line in fh]
    assert rows == generate_task(7)["preferences"]
    task_dir = os.path.dirname(os.path.dirname(paths[0]))
    assert not [d for d in os.listdir(task_dir) if d.startswith(".tmp-")]


def test_builtin_path_unknown_split():
    with pytest.raises(ValueError, match="nonsense"):
        builtin_path("nonsense")
