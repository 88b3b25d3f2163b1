"""Row formats (HH-RLHF, UltraFeedback, rankings, KTO, prompts) and every bad-input class."""

import pytest

from align.data import DataError, DataReport, load_rows
from align.data.errors import RowProblem
from align.data.formats import check_text

HH_PREFIX = (
    "\n\nHuman: What are some cuisines I should try?"
    "\n\nAssistant: Thai, Ethiopian and Peruvian food are all worth a try."
    "\n\nHuman: Which one is the spiciest?"
    "\n\nAssistant:"
)
HH_ROWS = [
    {"chosen": HH_PREFIX + " Thai food is usually the spiciest of the three.",
     "rejected": HH_PREFIX + " I don't know."},
    {"chosen": "\n\nHuman: Can you help me write a poem?\n\nAssistant: Of course. What should it be about?",
     "rejected": "\n\nHuman: Can you help me write a poem?\n\nAssistant: No."},
]
ULTRAFEEDBACK = [{
    "prompt": "How long should I boil an egg?",
    "prompt_id": "e1",
    "chosen": [{"role": "user", "content": "How long should I boil an egg?"},
               {"role": "assistant", "content": "About nine minutes for a hard-boiled egg."}],
    "rejected": [{"role": "user", "content": "How long should I boil an egg?"},
                 {"role": "assistant", "content": "Eggs are laid by hens."}],
    "score_chosen": 8.5,
    "score_rejected": 3.0,
}]


def test_hh_rlhf_full_text_rows(write, make_cfg):
    path = write("hh.jsonl", HH_ROWS)
    rows = load_rows(make_cfg([path]).train, "pairwise", make_cfg([path]), seed=0)
    assert rows[0]["prompt_text"] == HH_PREFIX
    assert rows[0]["messages"] == [
        {"role": "user", "content": "What are some cuisines I should try?"},
        {"role": "assistant", "content": "Thai, Ethiopian and Peruvian food are all worth a try."},
        {"role": "user", "content": "Which one is the spiciest?"},
    ]
    assert rows[0]["chosen"] == " Thai food is usually the spiciest of the three."
    assert rows[0]["rejected"] == " I don't know."
    assert (rows[1]["rejected"], rows[1]["margin"], rows[1]["weight"]) == (" No.", 0.0, 1.0)


def test_ultrafeedback_chat_rows(write, make_cfg):
    path = write("uf.jsonl", ULTRAFEEDBACK)
    row = load_rows(make_cfg([path]).train, "pairwise", make_cfg([path]), seed=0)[0]
    assert row["messages"] == [{"role": "user", "content": "How long should I boil an egg?"}]
    assert row["chosen"] == "About nine minutes for a hard-boiled egg."
    assert row["rejected"] == "Eggs are laid by hens."
    assert row["prompt_text"] == "\n\nHuman: How long should I boil an egg?\n\nAssistant:"


def test_pairs_with_margin_and_sft_messages(write, make_cfg):
    path = write("p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2.5}])
    assert load_rows(make_cfg([path]).train, "pairwise", make_cfg([path]), seed=0)[0]["margin"] == 2.5
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    path = write("s.jsonl", [{"messages": chat}])
    row = load_rows(make_cfg([path]).train, "sft", make_cfg([path]), seed=0)[0]
    assert (row["messages"], row["completion"]) == (chat[:2], "Hello")


def test_rankings_expand_into_weighted_grouped_pairs(write, make_cfg):
    rows = [{"prompt": "p0", "responses": ["ok", "best", "bad"], "scores": [0.5, 2.0, -1.0]},
            {"prompt": "p1", "ranked": ["first", "second", "third"]}]
    path = write("r.jsonl", rows)
    pairs = load_rows(make_cfg([path]).train, "pairwise", make_cfg([path]), seed=0)
    assert [(p["chosen"], p["rejected"], p["group"]) for p in pairs] == [
        ("best", "ok", 0), ("best", "bad", 0), ("ok", "bad", 0),
        ("first", "second", 1), ("first", "third", 1), ("second", "third", 1),
    ]
    assert pairs["weight"] == pytest.approx([1 / 3] * 6)
    listwise = load_rows(make_cfg([path]).train, "ranking", make_cfg([path]), seed=0)
    assert listwise["responses"] == [["best", "ok", "bad"], ["first", "second", "third"]]
    assert listwise["group"] == [0, 1]


def test_binary_and_prompt_rows(write, make_cfg):
    chat_prompt = [{"role": "user", "content": "Rate this"}]
    path = write("b.jsonl", [{"prompt": "q", "completion": "a", "label": True},
                             {"prompt": chat_prompt, "completion": "b", "label": 0}])
    rows = load_rows(make_cfg([path]).train, "binary", make_cfg([path]), seed=0)
    assert rows["label"] == [True, False] and rows[1]["messages"] == chat_prompt
    path = write("q.jsonl", [{"prompt": "Tell me a joke"}, {"messages": chat_prompt}])
    rows = load_rows(make_cfg([path]).train, "prompt", make_cfg([path]), seed=0)
    assert rows["prompt_text"] == ["Tell me a joke", "\n\nHuman: Rate this\n\nAssistant:"]


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}
# (kind, bad row placed at index 1, the error's text after "<file>: row 1, ", its drop reason)
BAD_ROWS = [
    ("pairwise", {"prompt": "p", "chosen": "a"}, "field 'rejected': missing", "missing_field"),
    ("pairwise", {"prompt": "p", "chosen": "  ", "rejected": "b"}, "field 'chosen': empty string", "empty_field"),
    ("pairwise", {"prompt": "p", "chosen": 5, "rejected": "b"},
     "field 'chosen': expected a string, got int", "wrong_type"),
    ("pairwise", {"prompt": "p", "chosen": "same", "rejected": "same"},
     "field 'rejected': identical to 'chosen'", "identical_pair"),
    ("pairwise", {"prompt": "caf\ufffd", "chosen": "a", "rejected": "b"},
     "field 'prompt': contains U+FFFD replacement characters", "bad_text"),
    ("pairwise", {"chosen": HH_PREFIX + " a", "rejected": "\n\nHuman: Other?\n\nAssistant: b"},
     "field 'rejected': its dialogue before the last '\\n\\nAssistant:' differs", "hh_prefix_mismatch"),
    ("ranking", {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1.0, 1.0, 0.0]},
     "field 'scores': tied scores", "bad_ranking"),
    ("ranking", {"prompt": "p", "ranked": ["only"]},
     "field 'ranked': a ranking needs at least 2 responses, got 1", "bad_ranking"),
    ("ranking", {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1.0, 0.0]},
     "field 'scores': 2 scores for 3 responses", "bad_ranking"),
    ("binary", {"prompt": "p", "completion": "c", "label": "yes"},
     "field 'label': expected a bool or 0/1, got 'yes'", "wrong_type"),
    ("prompt", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "field 'messages': ends with an assistant message", "wrong_type"),
    ("sft", {"prompt": "p", "completion": None}, "field 'completion': missing", "missing_field"),
]
GOOD_ROWS = {
    "pairwise": GOOD,
    "ranking": {"prompt": "p", "ranked": ["a", "b"]},
    "binary": {"prompt": "p", "completion": "c", "label": 1},
    "prompt": {"prompt": "p"},
    "sft": {"prompt": "p", "completion": "c"},
}


@pytest.mark.parametrize("kind,bad,message,reason", BAD_ROWS, ids=[b[3] + "-" + b[0] for b in BAD_ROWS])
def test_bad_rows_name_file_row_and_field(write, make_cfg, kind, bad, message, reason):
    good = GOOD_ROWS[kind]
    path = write("data.jsonl", [good, bad, good])
    with pytest.raises(DataError) as err:
        load_rows(make_cfg([path]).train, kind, make_cfg([path]), seed=0)
    assert str(err.value).startswith(f"{path}: row 1, {message}")
    assert "rows are numbered from 0" in str(err.value)
    report = DataReport()
    rows = load_rows(make_cfg([path]).train, kind, make_cfg([path], on_error="drop"), seed=0, report=report)
    assert rows["row"] == [0, 2]
    assert dict(report) == {f"dropped/{reason}": 1}


def test_all_rows_dropped_is_an_error(write, make_cfg):
    path = write("bad.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 3)
    with pytest.raises(DataError, match="all 3 rows were dropped"):
        load_rows(make_cfg([path]).train, "pairwise", make_cfg([path], on_error="drop"), seed=0)


@pytest.mark.parametrize("name,content", [("empty.jsonl", b""), ("empty.json", b"[]"), ("empty.csv", b"a,b\n")])
def test_empty_file_is_always_an_error(tmp_path, make_cfg, name, content):
    (tmp_path / name).write_bytes(content)
    for on_error in ("raise", "drop"):
        data = make_cfg([tmp_path / name], on_error=on_error)
        with pytest.raises(DataError, match=f"{name}: empty file"):
            load_rows(data.train, "sft", data, seed=0)


def test_quoted_labels_are_rejected(write, make_cfg):
    path = write("b.jsonl", [{"prompt": "p", "completion": "c", "label": "false"}] * 2)
    with pytest.raises(DataError, match=r"row 0, field 'label': expected .* got 'false' \(write true/false"):
        load_rows(make_cfg([path]).train, "binary", make_cfg([path]), seed=0)


@pytest.mark.parametrize("name,content,where", [
    ("bad.jsonl", b'{"prompt": "ok", "completion": "c"}\n{"prompt": "caf\xe9", "completion": "c"}\n',
     "bad.jsonl: row 1, field 'prompt': not valid UTF-8"),
    ("bad.csv", b"prompt,completion\ncaf\xe9,c\n", "bad.csv: not valid UTF-8"),
    ("raw.jsonl", b'{"prompt": "\xff\xfe", "completion": "c"}\n', "raw.jsonl: row 0, field 'prompt': not valid"),
])
def test_invalid_utf8_names_the_file(tmp_path, make_cfg, name, content, where):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=where):
        load_rows(make_cfg([tmp_path / name]).train, "sft", make_cfg([tmp_path / name]), seed=0)


def test_lone_surrogates(tmp_path, make_cfg):
    with pytest.raises(RowProblem, match="lone UTF-16 surrogate"):
        check_text("bad \ud800 text", "prompt")
    # In a JSON file the escape "\ud800" is unreadable as a whole: the file is named.
    (tmp_path / "s.jsonl").write_text('{"prompt": "bad \\ud800", "completion": "c"}\n')
    with pytest.raises(DataError, match="s.jsonl: cannot be read: .*surrogate"):
        load_rows(make_cfg([tmp_path / "s.jsonl"]).train, "sft", make_cfg([tmp_path / "s.jsonl"]), seed=0)
