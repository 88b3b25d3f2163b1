"""Loading: every file format, directories, hub-style folders, splits, mapping, mixing, builtins."""

import sys
import types
from collections import Counter

import datasets
import pytest

from align.config import ConfigError, SourceConfig
from align.data import DataError, data_fingerprint, load_rows, load_splits

SFT = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(10)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_format(suffix, write, make_cfg):
    path = write(f"sft{suffix}", SFT)
    rows = load_rows(make_cfg([path]).train, "sft", make_cfg([path]), seed=0)
    assert len(rows) == 10
    assert rows[3]["messages"] == [{"role": "user", "content": "question 3"}]
    assert rows[3]["prompt_text"] == "question 3"
    assert rows[3]["completion"] == "answer 3"
    assert (rows[3]["source"], rows[3]["row"]) == (path, 3)


def test_directory_of_files_names_each_file(tmp_path, write, make_cfg):
    write("d/a.jsonl", SFT[:4])
    write("d/b.parquet", SFT[4:])
    rows = load_rows(make_cfg([tmp_path / "d"]).train, "sft", make_cfg([tmp_path / "d"]), seed=0)
    assert rows["completion"] == [r["completion"] for r in SFT]
    assert rows[5]["source"].endswith("b.parquet") and rows[5]["row"] == 1


def test_hub_style_folder_goes_through_load_dataset(tmp_path, write, make_cfg):
    # The layout `datasets` uses on the hub: split-named parquet shards under data/.
    write("hub/data/train-00000-of-00001.parquet", SFT)
    write("hub/data/test-00000-of-00001.parquet", SFT[:2])
    source = SourceConfig(path=str(tmp_path / "hub"), split="test")
    rows = load_rows([source], "sft", make_cfg([source]), seed=0)
    assert len(rows) == 2 and rows[0]["source"] == f"{tmp_path / 'hub'} (split test)"


def test_save_to_disk_folder(tmp_path, make_cfg):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(SFT)}).save_to_disk(str(tmp_path / "saved"))
    source = SourceConfig(path=str(tmp_path / "saved"), split="train[2:4]")
    rows = load_rows([source], "sft", make_cfg([source]), seed=0)
    assert rows["row"] == [2, 3] and rows["completion"] == ["answer 2", "answer 3"]


def test_split_strings_and_max_rows_keep_file_row_numbers(write, make_cfg):
    path = write("sft.jsonl", SFT)
    for split, max_rows, expected in [("train[:3]", None, [0, 1, 2]), ("train[50%:]", 2, [5, 6]),
                                      ("train[-2:]", None, [8, 9]), ("train", 4, [0, 1, 2, 3])]:
        source = SourceConfig(path=path, split=split, max_rows=max_rows)
        assert load_rows([source], "sft", make_cfg([source]), seed=0)["row"] == expected


def test_local_file_has_only_train_split(write, make_cfg):
    source = SourceConfig(path=write("sft.jsonl", SFT), split="test")
    with pytest.raises(ConfigError, match="only the split 'train'"):
        load_rows([source], "sft", make_cfg([source]), seed=0)
    source = SourceConfig(path=source.path, split="train[:x]")
    with pytest.raises(ConfigError, match=r"split 'train\[:x\]'"):
        load_rows([source], "sft", make_cfg([source]), seed=0)


def test_column_mapping(write, make_cfg):
    path = write("qa.csv", [{"question": "q1", "answer": "a1", "prompt": "ignored"}])
    source = SourceConfig(path=path, columns={"prompt": "question", "completion": "answer"})
    row = load_rows([source], "sft", make_cfg([source]), seed=0)[0]
    assert (row["prompt_text"], row["completion"]) == ("q1", "a1")
    source = SourceConfig(path=path, columns={"completion": "reply"})
    with pytest.raises(DataError, match=r"qa.csv: field 'completion': mapped to column 'reply'"):
        load_rows([source], "sft", make_cfg([source]), seed=0)


def test_mixing_by_weight_is_deterministic(write, make_cfg):
    a = write("a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(100)])
    b = write("b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(50)])
    sources = [SourceConfig(path=a, weight=1.0), SourceConfig(path=b, weight=3.0)]
    rows = load_rows(sources, "sft", make_cfg(sources), seed=7)
    counts = Counter(rows["source"])
    # 150 rows in all: a gives 150 * 1/4 = 37.5 -> 38 of its 100, b 112 = 2 copies of 50 + 12.
    assert (counts[a], counts[b]) == (38, 112)
    assert len(set(rows.filter(lambda r: r["source"] == a)["row"])) == 38
    assert rows["prompt_text"] == load_rows(sources, "sft", make_cfg(sources), seed=7)["prompt_text"]
    assert rows["prompt_text"] != load_rows(sources, "sft", make_cfg(sources), seed=8)["prompt_text"]


def test_eval_fraction_is_held_out_before_expansion(write, make_cfg):
    ranked = [{"prompt": f"p{i}", "ranked": ["best", "mid", "worst"]} for i in range(20)]
    path = write("r.jsonl", ranked)
    data = make_cfg([path], eval_fraction=0.25)
    train, evals = load_splits(data, "pairwise", seed=0)
    assert (len(train), len(evals)) == (15 * 3, 5 * 3)
    assert not set(train["prompt_text"]) & set(evals["prompt_text"])
    again, _ = load_splits(data, "pairwise", seed=0)
    assert again["prompt_text"] == train["prompt_text"]


def test_eval_sources(write, make_cfg):
    data = make_cfg([write("t.jsonl", SFT)])
    data.eval = [SourceConfig(path=write("e.jsonl", SFT[:3]))]
    train, evals = load_splits(data, "sft", seed=0)
    assert (len(train), len(evals)) == (10, 3)
    assert load_splits(make_cfg([data.train[0].path]), "sft", seed=0)[1] is None


@pytest.fixture
def builtin_task(write, monkeypatch):
    """Stands in for align.task.synthetic: builtin_path(name, seed) -> a .jsonl file."""
    calls = []

    def builtin_path(name, seed):
        calls.append((name, seed))
        return write(f"task/{name}-{seed}.jsonl", SFT[: 3 + seed])

    monkeypatch.setitem(sys.modules, "align.task.synthetic", types.SimpleNamespace(builtin_path=builtin_path))
    return calls


def test_builtin_paths_resolve_through_the_task_module(builtin_task, make_cfg):
    source = SourceConfig(path="builtin:sft")
    assert len(load_rows([source], "sft", make_cfg([source]), seed=2)) == 5
    assert builtin_task == [("sft", 2)]


def test_fingerprint(write, builtin_task):
    path = write("a.jsonl", SFT)
    first = data_fingerprint([SourceConfig(path=path)], seed=0)
    assert first == data_fingerprint([SourceConfig(path=path)], seed=0)
    assert first != data_fingerprint([SourceConfig(path=path)], seed=1)
    assert first != data_fingerprint([SourceConfig(path=path, max_rows=3)], seed=0)
    write("a.jsonl", SFT[:9])
    assert first != data_fingerprint([SourceConfig(path=path)], seed=0)
    hub = data_fingerprint([SourceConfig(path="org/name", revision="abc")], seed=0)
    assert hub != data_fingerprint([SourceConfig(path="org/name", revision="def")], seed=0)
    assert data_fingerprint([SourceConfig(path="builtin:sft")], 0) != data_fingerprint(
        [SourceConfig(path="builtin:sft")], 1)


def test_missing_local_path(tmp_path, make_cfg):
    source = SourceConfig(path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_rows([source], "sft", make_cfg([source]), seed=0)
