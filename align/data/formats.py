"""Row formats: validation and normalisation of raw rows into one schema per kind.

Every prompt becomes `messages` (a chat list ending in a user turn) plus `prompt_text`, the raw
string used when no chat template is applied: the prompt itself for a plain-string prompt, the
dialogue up to the last "\\n\\nAssistant:" for HH-RLHF text, and an HH-style rendering of the
turns for chat-form rows.

Kinds and the raw forms they accept (canonical field names, after `SourceConfig.columns`):
- sft: {prompt, completion} or {messages} (the last, assistant, message is the completion).
- pairwise / ranking ("preference" rows, stored best first in `responses`):
  {prompt, chosen, rejected, [margin]}; HH-RLHF full text {chosen, rejected} with no prompt;
  chat form {prompt, chosen: [messages], rejected: [messages]} (UltraFeedback-binarized);
  {prompt, responses, scores} (higher is better) or {prompt, ranked} (best first).
- binary (KTO): {prompt, completion, label}; label is a bool or 0/1. Quoted strings such as
  "true" are rejected, since "False" would otherwise read as true.
- prompt: {prompt} or {messages}, ending in a user turn.
A prompt may be a string or a list of messages; a response a string or a list of messages whose
last is the assistant's (earlier ones are prompt turns).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

from datasets import Features, List as ListOf, Value

from align.data.errors import DataError, RowProblem

KINDS = ("sft", "pairwise", "binary", "ranking", "prompt")
ROLES = ("system", "user", "assistant", "tool")
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_PLAIN_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool"}
_SURROGATE = re.compile("[\ud800-\udfff]")

Messages = List[Dict[str, str]]

MESSAGES = ListOf({"role": Value("string"), "content": Value("string")})
_PROMPT = {"messages": MESSAGES, "prompt_text": Value("string")}
_WHERE = {"source": Value("string"), "row": Value("int64")}
# The schema of normalised rows; pairwise and ranking rows share it (a pair is a ranking of 2).
NORMALIZED = {
    "sft": Features({**_PROMPT, "completion": Value("string"), **_WHERE}),
    "preference": Features(
        {**_PROMPT, "responses": ListOf(Value("string")), "margin": Value("float64"),
         # a ranking's scores, best first ([] when the order alone is given)
         "scores": ListOf(Value("float64")), **_WHERE}
    ),
    "binary": Features({**_PROMPT, "completion": Value("string"), "label": Value("bool"), **_WHERE}),
    # extras: the prompt row's other fields (schema, answer, ...) as one JSON object text, for
    # the reward functions of RL stages ("" when there are none).
    "prompt": Features({**_PROMPT, "extras": Value("string"), **_WHERE}),
}


def normalized_kind(kind: str) -> str:
    return "preference" if kind in ("pairwise", "ranking") else kind


# ---------------------------------------------------------------------------------------------
# Field checks
# ---------------------------------------------------------------------------------------------


def check_text(value: Any, field: str) -> str:
    if value is None:
        raise RowProblem(field, "missing", "missing_field")
    if not isinstance(value, str):
        raise RowProblem(field, f"expected a string, got {type(value).__name__}", "wrong_type")
    if not value.strip():
        raise RowProblem(field, "empty string", "empty_field")
    if "\ufffd" in value:
        raise RowProblem(
            field, "contains U+FFFD replacement characters (the text was not valid UTF-8)", "bad_text"
        )
    if _SURROGATE.search(value):
        raise RowProblem(field, "contains a lone UTF-16 surrogate (not valid Unicode text)", "bad_text")
    return value


def check_messages(value: Any, field: str) -> Messages:
    if not isinstance(value, list):
        raise RowProblem(field, f"expected a list of messages, got {type(value).__name__}", "wrong_type")
    if not value:
        raise RowProblem(field, "empty list of messages", "empty_field")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise RowProblem(f"{field}[{i}]", "expected a {role, content} message", "wrong_type")
        role = msg.get("role")
        if role not in ROLES:
            problem = f"role {role!r} is not one of {list(ROLES)}"
            raise RowProblem(f"{field}[{i}].role", problem, "missing_field" if role is None else "wrong_type")
        out.append({"role": role, "content": check_text(msg.get("content"), f"{field}[{i}].content")})
    return out


def render_plain(messages: Messages) -> str:
    """HH-RLHF style text of a chat prompt, ending where the assistant's reply starts."""
    turns = "".join(f"\n\n{_PLAIN_NAMES[m['role']]}: {m['content']}" for m in messages)
    return turns + HH_ASSISTANT


def prompt_of(value: Any, field: str) -> Tuple[Messages, str]:
    """(messages, prompt_text) of a prompt given as a string or as chat messages."""
    if isinstance(value, list):
        messages = check_messages(value, field)
        if messages[-1]["role"] == "assistant":
            raise RowProblem(
                field, "ends with an assistant message; a prompt must end with a user turn", "wrong_type"
            )
        return messages, render_plain(messages)
    text = check_text(value, field)
    return [{"role": "user", "content": text}], text


def response_of(value: Any, field: str) -> Tuple[Messages, str]:
    """(prompt turns, response text) of a response given as a string or as chat messages."""
    if isinstance(value, list):
        messages = check_messages(value, field)
        if messages[-1]["role"] != "assistant":
            last = f"{field}[{len(messages) - 1}].role"
            raise RowProblem(last, "the last message must be the assistant's", "wrong_type")
        return messages[:-1], messages[-1]["content"]
    return [], check_text(value, field)


def _prompt_and_turns(row: dict, turns: Messages) -> Tuple[Messages, str]:
    """The prompt: the turns before a chat-form response, else the `prompt` field."""
    if turns:
        return turns, render_plain(turns)
    return prompt_of(row.get("prompt"), "prompt")


def check_margin(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowProblem("margin", f"expected a number, got {type(value).__name__}", "wrong_type")
    if not math.isfinite(value):
        raise RowProblem("margin", f"must be finite, got {value}", "wrong_type")
    return float(value)


def check_label(value: Any) -> bool:
    if value is None:
        raise RowProblem("label", "missing", "missing_field")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    hint = " (write true/false without quotes)" if isinstance(value, str) else ""
    raise RowProblem("label", f"expected a bool or 0/1, got {value!r}{hint}", "wrong_type")


# ---------------------------------------------------------------------------------------------
# Column paths: fields read from inside a column (lists of dicts)
# ---------------------------------------------------------------------------------------------

_STEP = re.compile(r"\.?([^.\[\]]+)|\[(\*|\d+)\]")


def is_path(column: str) -> bool:
    return "." in column or "[" in column


def path_root(path: str) -> str:
    return re.split(r"[.\[]", path, maxsplit=1)[0]


def read_path(row: dict, path: str) -> Any:
    """The value at `path` in `row`: "completions[*].response" is the list of the `response` of
    every element of `completions`; "a.b" and "a[0].b" index as written. A missing step raises a
    RowProblem naming the exact place ("completions[2].response")."""
    steps = [(m.group(1), m.group(2)) for m in _STEP.finditer(path)]

    def walk(value: Any, i: int, where: str) -> Any:
        if i == len(steps):
            return value
        key, index = steps[i]
        if key is not None:
            if not isinstance(value, dict) or value.get(key) is None:
                raise RowProblem(f"{where}.{key}" if where else key, "missing", "missing_field")
            return walk(value[key], i + 1, f"{where}.{key}" if where else key)
        if not isinstance(value, list):
            raise RowProblem(where, f"expected a list, got {type(value).__name__}", "wrong_type")
        if index == "*":
            return [walk(v, i + 1, f"{where}[{j}]") for j, v in enumerate(value)]
        if int(index) >= len(value):
            raise RowProblem(f"{where}[{index}]", f"missing (the list has {len(value)} items)", "missing_field")
        return walk(value[int(index)], i + 1, f"{where}[{index}]")

    return walk(row, 0, "")


# ---------------------------------------------------------------------------------------------
# Per-kind normalisers: raw row -> normalised values (without source/row)
# ---------------------------------------------------------------------------------------------


def _sft(row: dict) -> dict:
    if row.get("messages") is not None:
        turns, completion = response_of(row["messages"], "messages")
        if not turns:
            problem = "no prompt turns before the final assistant message"
            raise RowProblem("messages", problem, "missing_field")
        messages, prompt_text = turns, render_plain(turns)
    else:
        turns, completion = response_of(row.get("completion"), "completion")
        messages, prompt_text = _prompt_and_turns(row, turns)
    return {"messages": messages, "prompt_text": prompt_text, "completion": completion}


def parse_hh(text: str, field: str) -> Tuple[str, Messages, str]:
    """Splits HH-RLHF text at its last "\\n\\nAssistant:": (prompt_text, messages, response)."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise RowProblem(field, "no prompt and no '\\n\\nAssistant:' turn to split one off", "missing_field")
    prefix, response = text[: cut + len(HH_ASSISTANT)], text[cut + len(HH_ASSISTANT):]
    parts = _HH_TURN.split(text[:cut])
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for name, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if name == "Human" else "assistant", "content": content.strip()})
    if not any(m["role"] == "user" for m in messages):
        raise RowProblem(field, "no '\\n\\nHuman:' turn before the last '\\n\\nAssistant:'", "missing_field")
    return prefix, messages, check_text(response, field)


def _hh_pair(row: dict) -> dict:
    chosen, rejected = check_text(row.get("chosen"), "chosen"), check_text(row.get("rejected"), "rejected")
    prompt_text, messages, chosen_resp = parse_hh(chosen, "chosen")
    rejected_prompt, _, rejected_resp = parse_hh(rejected, "rejected")
    if rejected_prompt != prompt_text:
        raise RowProblem(
            "rejected",
            "its dialogue before the last '\\n\\nAssistant:' differs from the one in 'chosen'",
            "hh_prefix_mismatch",
        )
    return {"messages": messages, "prompt_text": prompt_text, "responses": [chosen_resp, rejected_resp], "scores": []}


def _ranking(row: dict) -> dict:
    messages, prompt_text = prompt_of(row.get("prompt"), "prompt")
    field = "ranked" if row.get("ranked") is not None else "responses"
    texts = row.get(field)
    if not isinstance(texts, list):
        raise RowProblem(field, f"expected a list of strings, got {type(texts).__name__}", "wrong_type")
    texts = [check_text(t, f"{field}[{i}]") for i, t in enumerate(texts)]
    if len(texts) < 2:
        raise RowProblem(field, f"a ranking needs at least 2 responses, got {len(texts)}", "bad_ranking")
    if len(set(texts)) < len(texts):
        raise RowProblem(field, "the same response appears twice", "identical_pair")
    if field == "responses":
        scores = row.get("scores")
        if not isinstance(scores, list):
            reason = "missing_field" if scores is None else "wrong_type"
            raise RowProblem("scores", "expected a list of numbers, one per response", reason)
        if len(scores) != len(texts):
            raise RowProblem("scores", f"{len(scores)} scores for {len(texts)} responses", "bad_ranking")
        for i, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise RowProblem(f"scores[{i}]", f"expected a finite number, got {s!r}", "wrong_type")
        ties = row.get("_ties", "error")
        ordered = sorted(zip(scores, texts), key=lambda st: -st[0])
        if len(set(scores)) < len(scores) and ties == "error":
            raise RowProblem("scores", f"tied scores {scores}; a ranking needs a strict order "
                             "(or set data.ties=drop or strict_pairs)", "bad_ranking")
        if ties == "ranking" and len(set(scores)) < len(scores):
            raise RowProblem("scores", f"tied scores {scores}; a ranking loss needs a strict order", "tied_ranking")
        if ties == "drop" and ordered[0][0] == ordered[1][0]:
            raise RowProblem("scores", f"the best score {ordered[0][0]} is tied", "tied_best")
        if ordered[0][0] == ordered[-1][0]:
            raise RowProblem("scores", f"all scores are equal ({ordered[0][0]}): no pair", "tied_best")
        texts = [t for _, t in ordered]
        return {"messages": messages, "prompt_text": prompt_text, "responses": texts, "margin": 0.0,
                "scores": [float(sc) for sc, _ in ordered]}
    return {"messages": messages, "prompt_text": prompt_text, "responses": texts, "margin": 0.0, "scores": []}


def _preference(row: dict) -> dict:
    # A ranking file's row is a ranking even when its list is missing: its error names the
    # ranking's own field, not "chosen".
    if row.get("chosen") is None and ("responses" in row or "ranked" in row):
        return _ranking(row)
    if row.get("prompt") is None and isinstance(row.get("chosen"), str):
        out = _hh_pair(row)
    else:
        chosen_turns, chosen = response_of(row.get("chosen"), "chosen")
        rejected_turns, rejected = response_of(row.get("rejected"), "rejected")
        if chosen_turns != rejected_turns:
            problem = "its prompt turns differ from those in 'chosen'"
            raise RowProblem("rejected", problem, "hh_prefix_mismatch")
        messages, prompt_text = _prompt_and_turns(row, chosen_turns)
        out = {"messages": messages, "prompt_text": prompt_text, "responses": [chosen, rejected]}
    out["scores"] = []
    if out["responses"][0].strip() == out["responses"][1].strip():
        raise RowProblem("rejected", "identical to 'chosen'", "identical_pair")
    out["margin"] = check_margin(row.get("margin"))
    return out


def _binary(row: dict) -> dict:
    turns, completion = response_of(row.get("completion"), "completion")
    messages, prompt_text = _prompt_and_turns(row, turns)
    return {"messages": messages, "prompt_text": prompt_text, "completion": completion,
            "label": check_label(row.get("label"))}


def _prompt(row: dict) -> dict:
    if row.get("messages") is not None:
        messages, prompt_text = prompt_of(row["messages"], "messages")
    else:
        messages, prompt_text = prompt_of(row.get("prompt"), "prompt")
    extras = {k: v for k, v in row.items() if k not in ("prompt", "messages") and not k.startswith("_")
              and v is not None}
    return {"messages": messages, "prompt_text": prompt_text,
            "extras": json.dumps(extras, sort_keys=True, default=str) if extras else ""}


_NORMALIZERS: Dict[str, Callable[[dict], dict]] = {
    "sft": _sft, "preference": _preference, "binary": _binary, "prompt": _prompt,
}
# Placeholder values of a dropped row; it is filtered out right after the map.
_EMPTY = {"messages": [], "prompt_text": "", "extras": "", "completion": "", "responses": [], "margin": 0.0, "label": False,
          "scores": []}
# Rows dropped for these reasons are dropped whatever data.on_error says (they are choices, not errors).
CHOSEN_DROPS = ("tied_best", "tied_ranking")


def normalize_batch(batch: Dict[str, list], kind: str, drop: bool, paths: Optional[Dict[str, str]] = None,
                    ties: str = "error") -> Dict[str, list]:
    """`datasets.map(batched=True)` function: raw rows (with `_source`, `_row`) -> normalised rows.

    Raises DataError on the first bad row, or with `drop` marks it in a `_drop` column (the
    reason, "" for good rows) so the caller can count and filter; counting from a column stays
    right when `datasets` serves the map from its cache.
    """
    nkind = normalized_kind(kind)
    names = [c for c in NORMALIZED[nkind] if c not in _WHERE]
    out: Dict[str, list] = {c: [] for c in [*names, "source", "row", "_drop"]}
    keys = list(batch)
    # A ranking kept whole (listwise DPO, a ranking reward model) has no pair to leave out: with
    # data.ties=drop|strict_pairs, a ranking with any tie is dropped.
    row_ties = "ranking" if kind == "ranking" and ties != "error" else ties
    for values in zip(*batch.values()):
        row = dict(zip(keys, values), _ties=row_ties)
        try:
            for field, path in (paths or {}).items():
                row[field] = read_path(row, path)
            norm, reason = _NORMALIZERS[nkind](row), ""
        except RowProblem as p:
            if not drop and p.reason not in (CHOSEN_DROPS if ties != "error" else ()):
                raise DataError(row["_source"], p.problem, row["_row"], p.field, p.reason) from None
            norm, reason = _EMPTY, p.reason
        for c in names:
            out[c].append(norm[c])
        out["source"].append(row["_source"])
        out["row"].append(row["_row"])
        out["_drop"].append(reason)
    return out


# ---------------------------------------------------------------------------------------------
# Preference rows -> pairs
# ---------------------------------------------------------------------------------------------

PAIRS = Features({
    **_PROMPT, "chosen": Value("string"), "rejected": Value("string"), "margin": Value("float64"),
    "weight": Value("float64"), "group": Value("int64"), **_WHERE,
})


def ranking_pairs(scores: List[float], k: int, mode: str = "all", rng=None) -> List[Tuple[int, int]]:
    """(better, worse) index pairs of a ranking of k responses, best first, with `scores` ([]:
    a strict order). all: every pair whose scores differ; best_worst: (0, k-1); best_vs_random:
    the best against one random strictly worse response (seeded `rng`)."""
    worse = lambda a, b: not scores or scores[a] > scores[b]  # noqa: E731
    if mode == "best_worst":
        return [(0, k - 1)]
    if mode == "best_vs_random":
        return [(0, rng.choice([b for b in range(1, k) if worse(0, b)]))]
    return [(a, b) for a in range(k) for b in range(a + 1, k) if worse(a, b)]


def _expand_batch(batch: Dict[str, list], indices: List[int], mode: str = "all", seed: int = 0) -> Dict[str, list]:
    import random

    out: Dict[str, list] = {c: [] for c in PAIRS}
    for i, group in enumerate(indices):
        responses = batch["responses"][i]
        pairs = ranking_pairs(batch["scores"][i], len(responses), mode, random.Random(seed * 1_000_003 + group))
        for a, b in pairs:
            for c in ("messages", "prompt_text", "margin", "source", "row"):
                out[c].append(batch[c][i])
            out["chosen"].append(responses[a])
            out["rejected"].append(responses[b])
            out["weight"].append(1.0 / len(pairs))
            out["group"].append(group)
    return out


def expand_pairs(ds, mode: str = "all", seed: int = 0):
    """Preference rows (responses best first) -> (better, worse) pairs (`ranking_pairs`): with
    `all`, K(K-1)/2 per row of a strict ranking.

    Each pair carries `group`, the index of its row in `ds`, so a batch can hold all pairs of a
    prompt (InstructGPT), and `weight` 1/(pairs of its row), so every prompt weighs the same in
    the loss.
    """
    return ds.map(_expand_batch, batched=True, with_indices=True, remove_columns=ds.column_names,
                  features=PAIRS, fn_kwargs={"mode": mode, "seed": seed}, desc="Expanding rankings into pairs")
