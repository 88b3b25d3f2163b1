"""Real-format preference data without code: UltraFeedback's raw form through a column mapping
with paths, rankings with ties (data.ties), pairs from a ranking (data.ranking_pairs), and
errors in ranking rows naming the ranking's own fields. Hand-built rows."""

import json

import pytest

from align.config import DataConfig, SourceConfig
from align.data.errors import DataError, DataReport
from align.data.sources import load_rows

UF_COLUMNS = {"prompt": "instruction", "responses": "completions[*].response",
              "scores": "completions[*].overall_score"}


def uf_row(instruction, *scored):
    return {"instruction": instruction, "source": "evol",
            "completions": [{"response": r, "overall_score": s, "model": "m"} for r, s in scored]}


def rows_of(tmp_path, rows, columns=None, **data):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=[SourceConfig(path=str(path), columns=dict(columns or {}))], **data)
    report = DataReport()
    return load_rows(cfg.train, "pairwise", cfg, seed=0, report=report), report, str(path)


def pairs(ds):
    return [(r["prompt_text"], r["chosen"], r["rejected"], round(r["weight"], 6)) for r in ds]


def test_ultrafeedback_raw_form_with_column_paths(tmp_path):
    ds, _, _ = rows_of(tmp_path, [uf_row("Q1", ("a", 3.0), ("b", 9.5), ("c", 6.0))], UF_COLUMNS)
    # sorted best first (b 9.5, c 6.0, a 3.0); all 3 pairs, each 1/3 of the prompt
    assert pairs(ds) == [("Q1", "b", "c", 0.333333), ("Q1", "b", "a", 0.333333), ("Q1", "c", "a", 0.333333)]


def test_ties_error_is_the_default(tmp_path):
    with pytest.raises(DataError) as err:
        rows_of(tmp_path, [uf_row("Q1", ("a", 5.0), ("b", 5.0), ("c", 1.0))], UF_COLUMNS)
    assert str(err.value).startswith(f"{tmp_path / 'data.jsonl'}: row 0, field 'scores': tied scores [5.0, 5.0, 1.0]")


def test_ties_strict_pairs_and_drop(tmp_path):
    rows = [uf_row("Q1", ("a", 5.0), ("b", 5.0), ("c", 1.0)),  # best tied
            uf_row("Q2", ("d", 8.0), ("e", 2.0), ("f", 2.0)),  # worst tied
            uf_row("Q3", ("g", 4.0), ("h", 4.0))]  # all tied: no pair at all
    strict, report, _ = rows_of(tmp_path, rows, UF_COLUMNS, ties="strict_pairs")
    assert pairs(strict) == [("Q1", "a", "c", 0.5), ("Q1", "b", "c", 0.5), ("Q2", "d", "e", 0.5),
                             ("Q2", "d", "f", 0.5)]
    assert dict(report) == {"dropped/tied_best": 1, "skipped/tied_pairs": 2}  # Q3; (a, b) and (e, f)
    dropped, report, _ = rows_of(tmp_path, rows, UF_COLUMNS, ties="drop")
    assert pairs(dropped) == [("Q2", "d", "e", 0.5), ("Q2", "d", "f", 0.5)]
    assert dict(report) == {"dropped/tied_best": 2, "skipped/tied_pairs": 1}  # Q1 and Q3; (e, f)


def test_ties_in_rankings_kept_whole(tmp_path):
    # listwise DPO and a ranking reward model order every response: any tie drops the ranking
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "Q1", "responses": ["a", "b", "c"], "scores": [5, 2, 2]},
            {"prompt": "Q2", "responses": ["d", "e", "f"], "scores": [1, 3, 2]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for ties in ("drop", "strict_pairs"):
        cfg = DataConfig(train=[SourceConfig(path=str(path))], ties=ties)
        report = DataReport()
        ds = load_rows(cfg.train, "ranking", cfg, seed=0, report=report)
        assert [(r["prompt_text"], r["responses"]) for r in ds] == [("Q2", ["e", "f", "d"])]
        assert dict(report) == {"dropped/tied_ranking": 1}


def test_pairs_from_a_ranking(tmp_path):
    rows = [uf_row(f"Q{i}", ("w", 1.0), ("x", 9.0), ("y", 5.0), ("z", 3.0)) for i in range(20)]
    best_worst, _, _ = rows_of(tmp_path, rows[:1], UF_COLUMNS, ranking_pairs="best_worst")
    assert pairs(best_worst) == [("Q0", "x", "w", 1.0)]
    seeded, _, _ = rows_of(tmp_path, rows, UF_COLUMNS, ranking_pairs="best_vs_random")
    again, _, _ = rows_of(tmp_path, rows, UF_COLUMNS, ranking_pairs="best_vs_random")
    assert pairs(seeded) == pairs(again)  # seeded
    assert {p[1] for p in pairs(seeded)} == {"x"} and {p[3] for p in pairs(seeded)} == {1.0}
    rejected = [p[2] for p in pairs(seeded)]
    assert set(rejected) == {"w", "y", "z"}  # one random worse response per prompt, all three drawn over 20


def test_ranking_row_errors_name_the_rankings_fields(tmp_path):
    with pytest.raises(DataError) as err:
        rows_of(tmp_path, [{"prompt": "Q", "responses": ["a", "b"], "scores": [1, 2]},
                           {"prompt": "Q", "responses": None, "scores": [1, 2]}])
    assert "row 1, field 'responses': expected a list of strings, got NoneType" in str(err.value)
    with pytest.raises(DataError) as err:
        rows_of(tmp_path, [{"instruction": "Q", "completions": [{"response": "a", "overall_score": 1},
                                                                 {"overall_score": 2}]}], UF_COLUMNS)
    assert "row 0, field 'completions[1].response': missing" in str(err.value)
