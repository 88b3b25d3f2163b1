"""reward_model.score: the Python API and the CLI, on the reward model of conftest.py."""

import json
import statistics

import pytest

from reward_model.score import RewardScorer, main


@pytest.fixture(scope="module")
def model_dir(rm_run):
    return rm_run[0]["model_dir"]


@pytest.fixture(scope="module")
def scorer(model_dir):
    return RewardScorer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def raw_scorer(model_dir):
    return RewardScorer.from_pretrained(model_dir, normalize=False)


@pytest.fixture(scope="module")
def eval_pairs():
    from align.task.synthetic import builtin_path

    with open(builtin_path("preferences_eval", 0)) as fh:
        return [json.loads(line) for line in fh]


PROMPT = "Review the movie Iron Road."


def test_eval_split_scores_are_normalised(scorer, eval_pairs):
    # The stage measured mean and std on exactly these 800 sequences (chosen and rejected of
    # the eval split), so after (r - mean) / std they have mean 0 and std 1.
    prompts = [r["prompt"] for r in eval_pairs] * 2
    responses = [r["chosen"] for r in eval_pairs] + [r["rejected"] for r in eval_pairs]
    scores = scorer.score(prompts, responses, batch_size=64)
    assert len(scores) == 800
    assert statistics.fmean(scores) == pytest.approx(0.0, abs=1e-4)
    assert statistics.pstdev(scores) == pytest.approx(1.0, abs=1e-4)


def test_normalised_is_raw_minus_mean_over_std(scorer, raw_scorer):
    assert scorer.normalize and not raw_scorer.normalize
    responses = ["The plot was very great.", "The cast was dull."]
    raw = raw_scorer.score([PROMPT] * 2, responses)
    norm = scorer.score([PROMPT] * 2, responses)
    for r, n in zip(raw, norm):
        assert n == pytest.approx((r - scorer.mean) / scorer.std, abs=1e-5)


def test_scores_follow_the_gold_order(scorer):
    # Gold: +1.5, +1, 0, -1, -1.5 (polarity x adverb intensity).
    responses = ["The plot was very great.", "The acting was wonderful.", "The music was quiet.",
                 "The ending was boring.", "The script was really awful."]
    scores = scorer.score([PROMPT] * len(responses), responses)
    assert scores[0] > scores[2] > scores[4]
    assert scores[1] > scores[3]


def test_batching_and_prompt_forms_do_not_change_scores(scorer):
    responses = ["The plot was very great.", "The cast was dull and the music was rather moving. The end was."]
    one = scorer.score([PROMPT] * 2, responses, batch_size=1)
    padded = scorer.score([PROMPT] * 2, responses, batch_size=2)
    chat = scorer.score([[{"role": "user", "content": PROMPT}]] * 2, responses, batch_size=2)
    assert padded == pytest.approx(one, abs=1e-5)
    assert chat == pytest.approx(padded, abs=1e-6)


def test_bad_inputs_name_row_and_field(scorer):
    with pytest.raises(ValueError, match=r"row 1, field 'prompt': empty string"):
        scorer.score([PROMPT, " "], ["a", "b"])
    with pytest.raises(ValueError, match=r"row 0, field 'response'"):
        scorer.score([PROMPT], [None])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        scorer.score([PROMPT, PROMPT], ["a"])


def test_cli_writes_the_api_scores(model_dir, scorer, raw_scorer, tmp_path, capsys):
    rows = [{"prompt": PROMPT, "response": "The plot was very great.", "id": 7},
            {"prompt": [{"role": "user", "content": PROMPT}], "response": "The cast was dull."},
            {"prompt": "What did you think of Paper Storm?", "response": "The music was quiet."}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    expected = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    out = tmp_path / "scored.jsonl"
    assert main([model_dir, "--input", str(path), "--output", str(out)]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["score"] for w in written] == pytest.approx(expected, abs=1e-6)
    assert written[0]["id"] == 7 and written[1]["prompt"] == rows[1]["prompt"]  # input rows kept

    raw = raw_scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert main([model_dir, "--input", str(path), "--no-normalize"]) == 0  # to stdout
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["score"] for p in printed] == pytest.approx(raw, abs=1e-6)


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "x", "response": "y"}', '{"prompt": "x"}'], "row 1, field 'response': missing"),
    (['{"prompt": "x", "response": "y"}', '{"prompt": "", "response": "y"}'], "row 1, field 'prompt': empty string"),
    (['{"prompt": "x", "response": "y"}', "", '{"prompt": "x", "response": '], "row 1: not valid JSON"),
    (['["x", "y"]'], "row 0: expected a JSON object, got list"),
])
def test_cli_errors_name_file_row_and_field(model_dir, tmp_path, capsys, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main([model_dir, "--input", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: {message}" in err


def test_cli_missing_model_dir(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "x", "response": "y"}\n')
    assert main([str(tmp_path / "nope"), "--input", str(path)]) == 2
    assert "no such model directory" in capsys.readouterr().err
