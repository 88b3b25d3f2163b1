"""The embedded default task: short film reviews with a known gold scorer.

In the spirit of the controlled-sentiment experiment of the DPO paper (Rafailov et al. 2023,
arXiv 2305.18290, section 6.1): the policy is asked to review a film, and the aligned behaviour
is a positive review. Here the "sentiment classifier" is exact, so evaluation measures true
improvement rather than agreement with a learned reward.

The language is a tiny grammar:

    response := sentence (" " sentence)*
    sentence := clause (" and " clause)? "."
    clause   := ASPECT " was " (ADVERB " ")? ADJECTIVE

The gold score of a response is the mean over its clauses of polarity(adjective) times
intensity(adverb), so it lies in [-1.5, 1.5]; a clause that does not parse scores -1, which
keeps degenerate text from scoring well. Length does not change the score.

Every split is written as JSONL through the same loaders as user data
(`builtin_path(name, seed)`), deterministically from the seed.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from align.cache import build_once

ASPECTS = [
    "the movie", "the plot", "the acting", "the music", "the ending", "the script",
    "the cast", "the story", "the director", "the dialogue", "the pacing", "the cinematography",
]
ADVERBS = {"very": 1.5, "really": 1.5, "quite": 1.0, "rather": 1.0, "somewhat": 0.5, "slightly": 0.5}
POSITIVE = ["great", "wonderful", "brilliant", "moving", "charming", "superb", "delightful",
            "beautiful", "clever", "fun"]
NEGATIVE = ["boring", "awful", "dull", "weak", "messy", "terrible", "bland", "clumsy",
            "tedious", "bad"]
NEUTRAL = ["long", "short", "loud", "quiet", "simple", "unusual", "familiar", "slow"]
POLARITY = {**{w: 1.0 for w in POSITIVE}, **{w: -1.0 for w in NEGATIVE}, **{w: 0.0 for w in NEUTRAL}}

TITLE_FIRST = ["night", "silver", "last", "iron", "quiet", "golden", "broken", "winter", "hidden",
               "northern", "burning", "empty", "distant", "paper", "crimson", "little"]
TITLE_SECOND = ["harbor", "river", "summer", "garden", "road", "city", "letters", "kingdom",
                "station", "island", "mirror", "house", "storm", "train", "voices", "forest"]
PROMPT_TEMPLATES = [
    "Write a review of the film {title}.",
    "What did you think of {title}?",
    "Review the movie {title}.",
    "Give your opinion of the film {title}.",
]
# Every fourth title is held out: evaluation prompts name films never seen in training.
_ALL_TITLES = [f"{a.title()} {b.title()}" for a in TITLE_FIRST for b in TITLE_SECOND]
TRAIN_TITLES = [t for i, t in enumerate(_ALL_TITLES) if i % 4 != 3]
HELDOUT_TITLES = [t for i, t in enumerate(_ALL_TITLES) if i % 4 == 3]

UNPARSEABLE_CLAUSE_SCORE = -1.0
GOLD_MIN, GOLD_MAX = -1.5, 1.5

_CLAUSE = re.compile(
    r"^(?P<aspect>%s) was(?: (?P<adverb>%s))? (?P<adjective>%s)$"
    % ("|".join(ASPECTS), "|".join(ADVERBS), "|".join(POLARITY))
)


# ---------------------------------------------------------------------------------------------
# Gold scorer (public API)
# ---------------------------------------------------------------------------------------------


def clause_score(clause: str) -> float:
    match = _CLAUSE.match(clause.strip().lower())
    if match is None:
        return UNPARSEABLE_CLAUSE_SCORE
    intensity = ADVERBS[match["adverb"]] if match["adverb"] else 1.0
    return POLARITY[match["adjective"]] * intensity


def split_clauses(response: str) -> List[str]:
    clauses = []
    for sentence in response.strip().split("."):
        if sentence.strip():
            clauses.extend(part for part in sentence.split(" and ") if part.strip())
    return clauses


def gold_score(prompt: str, response: str) -> float:
    """The task's true reward of `response` to `prompt`, in [-1.5, 1.5].

    The prompt does not change the score (every prompt asks for a review); it is an argument so
    that the signature matches any other task's scorer.
    """
    del prompt
    clauses = split_clauses(response)
    if not clauses:
        return UNPARSEABLE_CLAUSE_SCORE
    return sum(clause_score(c) for c in clauses) / len(clauses)


def is_fluent(response: str) -> bool:
    """True when every clause parses under the task's grammar and the text ends with a period."""
    clauses = split_clauses(response)
    return bool(clauses) and response.strip().endswith(".") and all(
        _CLAUSE.match(c.strip().lower()) for c in clauses
    )


def sample_metrics(prompts: Sequence[str], responses: Sequence[str]) -> Dict[str, float]:
    """Task metrics of sampled responses: the share that is fluent under the grammar."""
    return {"fluent": sum(map(is_fluent, responses)) / max(len(responses), 1)}


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------

# Mood -> probability of a positive, neutral and negative adjective in each clause. Demonstrations
# mix moods evenly, so the SFT policy's expected gold score is near zero: alignment has room.
_MOODS = {"positive": (0.8, 0.1, 0.1), "negative": (0.1, 0.1, 0.8), "mixed": (0.35, 0.3, 0.35)}


def _clause(rng: random.Random, mood: str) -> str:
    p_pos, p_neu, _ = _MOODS[mood]
    u = rng.random()
    words = POSITIVE if u < p_pos else NEUTRAL if u < p_pos + p_neu else NEGATIVE
    adverb = rng.choice(list(ADVERBS)) if rng.random() < 0.6 else None
    parts = [rng.choice(ASPECTS), "was"] + ([adverb] if adverb else []) + [rng.choice(words)]
    return " ".join(parts)


def sample_response(rng: random.Random, mood: str | None = None) -> str:
    mood = mood or rng.choice(list(_MOODS))
    sentences = []
    for _ in range(rng.randint(1, 3)):
        clauses = [_clause(rng, mood) for _ in range(1 if rng.random() < 0.6 else 2)]
        text = " and ".join(clauses)
        sentences.append(text[0].upper() + text[1:] + ".")
    return " ".join(sentences)


def sample_prompt(rng: random.Random, titles: Sequence[str]) -> str:
    return rng.choice(PROMPT_TEMPLATES).format(title=rng.choice(titles))


def _bt_prefers_first(rng: random.Random, score_a: float, score_b: float, temperature: float) -> bool:
    # Bradley-Terry label noise: P(a preferred) = sigmoid((g_a - g_b) / temperature).
    return rng.random() < 1.0 / (1.0 + math.exp(-(score_a - score_b) / temperature))


def _distinct_pair(rng: random.Random) -> Tuple[str, str]:
    while True:
        a, b = sample_response(rng), sample_response(rng)
        if a != b:
            return a, b


@dataclass(frozen=True)
class TaskSizes:
    sft: int = 4000
    sft_eval: int = 200
    preferences: int = 4000
    preferences_eval: int = 400
    binary: int = 4000
    rankings: int = 1000
    ranking_size: int = 4
    prompts: int = 1000
    eval_prompts: int = 128
    # Bradley-Terry temperature of the simulated labeller (smaller = less noisy labels).
    label_temperature: float = 0.25


def generate_task(seed: int = 0, sizes: TaskSizes = TaskSizes()) -> Dict[str, List[dict]]:
    """Every split of the task as lists of rows in the data layer's canonical formats."""
    splits: Dict[str, List[dict]] = {}
    rng = random.Random(f"synthetic-task-{seed}")

    def sft_rows(n: int, titles: Sequence[str]) -> List[dict]:
        return [{"prompt": sample_prompt(rng, titles), "completion": sample_response(rng)} for _ in range(n)]

    def preference_rows(n: int, titles: Sequence[str]) -> List[dict]:
        rows = []
        for _ in range(n):
            prompt = sample_prompt(rng, titles)
            a, b = _distinct_pair(rng)
            ga, gb = gold_score(prompt, a), gold_score(prompt, b)
            chosen, rejected = (a, b) if _bt_prefers_first(rng, ga, gb, sizes.label_temperature) else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return rows

    splits["sft"] = sft_rows(sizes.sft, TRAIN_TITLES)
    splits["sft_eval"] = sft_rows(sizes.sft_eval, HELDOUT_TITLES)
    splits["preferences"] = preference_rows(sizes.preferences, TRAIN_TITLES)
    splits["preferences_eval"] = preference_rows(sizes.preferences_eval, HELDOUT_TITLES)

    binary = []
    for _ in range(sizes.binary):
        prompt, response = sample_prompt(rng, TRAIN_TITLES), sample_response(rng)
        p_good = 1.0 / (1.0 + math.exp(-gold_score(prompt, response) / sizes.label_temperature))
        binary.append({"prompt": prompt, "completion": response, "label": rng.random() < p_good})
    splits["binary"] = binary

    rankings = []
    for _ in range(sizes.rankings):
        prompt = sample_prompt(rng, TRAIN_TITLES)
        responses: List[str] = []
        while len(responses) < sizes.ranking_size:
            r = sample_response(rng)
            if r not in responses:
                responses.append(r)
        # Gumbel-perturbed gold scores give a Plackett-Luce ranking; continuous, so never tied.
        scores = [
            round(gold_score(prompt, r) / sizes.label_temperature - math.log(-math.log(rng.random() or 1e-12)), 6)
            for r in responses
        ]
        rankings.append({"prompt": prompt, "responses": responses, "scores": scores})
    splits["rankings"] = rankings

    splits["prompts"] = [{"prompt": sample_prompt(rng, TRAIN_TITLES)} for _ in range(sizes.prompts)]
    # Held-out prompts: each held-out title with each template, in a fixed order.
    eval_prompts = [t.format(title=title) for title in HELDOUT_TITLES for t in PROMPT_TEMPLATES]
    splits["eval_prompts"] = [{"prompt": p} for p in eval_prompts[: sizes.eval_prompts]]
    return splits


SPLITS = ("sft", "sft_eval", "preferences", "preferences_eval", "binary", "rankings", "prompts",
          "eval_prompts")
_VERSION = "v1"


def write_task(directory: str, seed: int = 0, sizes: TaskSizes = TaskSizes()) -> Dict[str, str]:
    """Writes every split as `<directory>/<split>.jsonl`; returns split -> path."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for name, rows in generate_task(seed, sizes).items():
        path = os.path.join(directory, f"{name}.jsonl")
        with open(path, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        paths[name] = path
    return paths


def builtin_path(name: str, seed: int = 0) -> str:
    """Path of the JSONL file of split `name`, written once per seed under the cache directory.

    Safe when several processes (Ray actors) ask at once: each writes a private temporary
    directory and renames it into place; the first rename wins.
    """
    if name not in SPLITS:
        raise ValueError(f"builtin:{name}: unknown split of the default task; choose from {list(SPLITS)}")
    final = build_once(os.path.join("task", f"synthetic-{_VERSION}-seed{seed}"), lambda tmp: write_task(tmp, seed))
    return os.path.join(final, f"{name}.jsonl")


def tokenizer_corpus() -> List[str]:
    """Text the built-in tokenizer is trained on: the whole task vocabulary in context."""
    rng = random.Random("tokenizer-corpus")
    texts = [sample_prompt(rng, _ALL_TITLES) for _ in range(400)]
    texts += [sample_response(rng) for _ in range(1500)]
    texts += [" ".join([*ASPECTS, *ADVERBS, *POLARITY, *TITLE_FIRST, *TITLE_SECOND])]
    texts += [t.format(title=title) for t in PROMPT_TEMPLATES for title in _ALL_TITLES[:8]]
    return texts
