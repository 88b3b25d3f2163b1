"""JSON files that Arrow cannot read: the error names the line (1-based), not Arrow's in-block row."""

import json

import pytest

from align.config import DataConfig, SourceConfig
from align.data import DataError, load_rows


def load(path):
    source = SourceConfig(path=str(path))
    return load_rows([source], "pairwise", DataConfig(train=[source]), seed=0)


def test_json_array_names_the_line(tmp_path):
    path = tmp_path / "pairs.json"
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + ",\n{\"prompt\": \"x\",,}\n]\n")
    with pytest.raises(DataError) as err:
        load(path)
    assert str(err.value) == (f"{path}: line 5: not valid JSON "
                              "(Expecting property name enclosed in double quotes at column 16)")


def test_an_object_where_rows_have_a_string(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(5)]
    rows[3]["chosen"] = {"text": "a"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load(path)
    assert str(err.value) == f"{path}: row 3, field 'chosen': expected a string, got dict (rows are numbered from 0)"


def test_a_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n["p", "a", "b"]\n')
    with pytest.raises(DataError) as err:
        load(path)
    assert str(err.value) == f"{path}: line 3: expected a JSON object, got list"
