"""A user's mistake: one line on stderr, exit code 2, no traceback, found before Ray starts.

Each case is the issue's: a 4,000-row pairwise file with one bad row, run through `align-run dpo`
(and the pipeline), asserting the exact first line of stderr and the exit code.
"""

import json
import re

import pytest

from tests.errors.helpers import pair_rows, stage_config, write_jsonl

N_ROWS, BAD = 4000, 17
SUFFIX = " (rows are numbered from 0)"


def bad_file(tmp_path, case):
    """(path, expected first line of stderr) of a pairwise file with the bad row `case`."""
    rows = pair_rows(N_ROWS)
    path = str(tmp_path / f"{case}.jsonl")
    if case == "empty_file":
        open(path, "w").close()
        return path, f"error: {path}: empty file (no rows)"
    if case in ("truncated", "truncated_utf8"):
        lines = [json.dumps(r, ensure_ascii=False) for r in rows]
        if case == "truncated":
            lines[3000] = lines[3000][:25]  # line 3,001, cut inside a string
            try:
                json.loads(lines[3000])
            except json.JSONDecodeError as err:
                expected = f"line 3001: not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno})"
            data = "\n".join(lines).encode() + b"\n"
        else:  # cut inside a multi-byte character, as a truncated download would be
            lines[3000] = json.dumps({**rows[3000], "chosen": "Très bien"}, ensure_ascii=False)
            raw = [ln.encode() for ln in lines]
            raw[3000] = raw[3000][:raw[3000].index("è".encode()) + 1]
            data = b"\n".join(raw) + b"\n"
            expected = f"line 3001: not valid UTF-8 text (unexpected end of data at byte {len(raw[3000]) - 1})"
        with open(path, "wb") as fh:
            fh.write(data)
        return path, f"error: {path}: {expected}"
    row = rows[BAD]
    where = f"error: {path}: row {BAD}, "
    if case == "missing_field":
        del row["rejected"]
        expected = where + "field 'rejected': missing" + SUFFIX
    elif case == "wrong_type":
        row["chosen"] = 5
        expected = where + "field 'chosen': expected a string, got int" + SUFFIX
    elif case == "identical":
        row["rejected"] = row["chosen"]
        expected = where + "field 'rejected': identical to 'chosen'" + SUFFIX
    elif case == "empty_string":
        row["chosen"] = "  "
        expected = where + "field 'chosen': empty string" + SUFFIX
    elif case == "null_prompt":
        row["prompt"] = None
        expected = where + "field 'chosen': no prompt and no '\\n\\nAssistant:' turn to split one off" + SUFFIX
    elif case == "long_prompt":
        row["prompt"] = " ".join(["review"] * 12005)
        expected = re.compile(re.escape(where) + r"field 'prompt': \d+ tokens, longer than data.max_length=64"
                              + re.escape(SUFFIX))
    elif case == "invalid_utf8":
        write_jsonl(path, rows)
        with open(path, "rb") as fh:
            lines = fh.read().split(b"\n")
        lines[BAD] = lines[BAD].replace(b"charming", b"charm\xffing")
        with open(path, "wb") as fh:
            fh.write(b"\n".join(lines))
        return path, where + "field 'chosen': not valid UTF-8 text (invalid start byte)" + SUFFIX
    else:
        raise ValueError(case)
    write_jsonl(path, rows)
    return path, expected


def assert_one_line(result, expected):
    assert result.rc == 2, result.stderr
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(result.first), result.first
    else:
        assert result.first == expected
    assert len(result.lines) == 1, result.stderr  # one line, no traceback, no progress bars
    assert "Traceback" not in result.stderr


CASES = ["truncated", "truncated_utf8", "missing_field", "wrong_type", "identical", "empty_file", "invalid_utf8",
         "long_prompt", "empty_string", "null_prompt"]


@pytest.mark.parametrize("case", CASES)
def test_bad_row_through_align_run(cli, tmp_path, case):
    path, expected = bad_file(tmp_path, case)
    result = cli("align-run", "dpo", "--config", stage_config(tmp_path, path))
    assert_one_line(result, expected)
    assert not (tmp_path / "run").exists()  # stopped before the stage started


def test_config_key_names_file_and_key(cli, tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", pair_rows(20))
    config = stage_config(tmp_path, path, optim={"lrr": 0.1})
    assert_one_line(cli("align-run", "dpo", "--config", config), f"error: {config}: optim.lrr: unknown key")
    assert_one_line(cli("align-run", "dpo", "--config", config.replace("dpo.yaml", "missing.yaml")),
                    f"error: {config.replace('dpo.yaml', 'missing.yaml')}: config file not found")
    config = stage_config(tmp_path, path)
    assert_one_line(cli("align-run", "dpo", "--config", config, "deepspeed.zero_stage=5"),
                    "error: command line: deepspeed.zero_stage: 5 is not one of [0, 1, 2, 3]")
    assert_one_line(cli("align-run", "sdf"),
                    "error: command line: unknown stage 'sdf'; choose from "
                    "['dpo', 'kto', 'label', 'ppo', 'reward_model', 'sft'] or 'main'")


def test_missing_model_file(cli, tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", pair_rows(20))
    config = stage_config(tmp_path, path)
    result = cli("align-run", "dpo", "--config", config, "model.name_or_path=./models/smol.gguf")
    assert_one_line(result, "error: model.name_or_path: ./models/smol.gguf: no such file or directory")
    result = cli("align-run", "dpo", "--config", config, f"reference={tmp_path}/sft/model")
    assert_one_line(result, f"error: reference: {tmp_path}/sft/model: no such file or directory")


def test_missing_optional_package(cli, tmp_path):
    """A GGUF model file without the `gguf` package: the install command, in one line."""
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "gguf.py").write_text("raise ImportError('No module named gguf')\n")  # as if not installed
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    config = stage_config(tmp_path, write_jsonl(tmp_path / "ok.jsonl", pair_rows(20)))
    result = cli("align-run", "dpo", "--config", config, f"model.name_or_path={model}",
                 env={"PYTHONPATH": str(blocker)})
    assert_one_line(result, "error: reading a GGUF model file needs packages that are not installed; "
                            "install them with: pip install gguf accelerate")


def test_ranking_row_with_a_bad_field(cli, tmp_path):
    rows = [{"prompt": f"p{i}", "responses": ["a", "b", "c"], "scores": [3, 2, 1]} for i in range(50)]
    rows[7]["scores"] = [3, "high", 1]
    path = write_jsonl(tmp_path / "rank.jsonl", rows)
    config = stage_config(tmp_path, path, name="rm.yaml", data_kind="ranking", final_samples=None)
    result = cli("align-run", "reward_model", "--config", config)
    assert_one_line(result, f"error: {path}: row 7, field 'scores[1]': expected a finite number, got 'high'" + SUFFIX)
    rows[7]["scores"] = [3, 3, 1]
    write_jsonl(path, rows)
    assert_one_line(cli("align-run", "reward_model", "--config", config),
                    f"error: {path}: row 7, field 'scores': tied scores [3, 3, 1]; a ranking needs a strict order "
                    "(or set data.ties=drop or strict_pairs)" + SUFFIX)


def test_debug_shows_the_traceback(cli, tmp_path):
    path, expected = bad_file(tmp_path, "identical")
    config = stage_config(tmp_path, path)
    for args, env in ((["--debug"], {}), ([], {"ALIGN_DEBUG": "1"})):
        result = cli("align-run", "dpo", "--config", config, *args, env=env)
        assert result.rc == 2
        assert "Traceback (most recent call last)" in result.stderr
        assert result.lines[-1] == expected


def test_pipeline_checks_every_stage_before_the_first(cli, tmp_path):
    """A bad row in the DPO stage's data stops the pipeline before SFT trains."""
    path, expected = bad_file(tmp_path, "missing_field")
    pipeline = {
        "name": "bad", "run_root": str(tmp_path / "runs"),
        "shared": {"tracking": {"backend": "none"}},
        "stages": {
            "sft": {"stage": "sft", "overrides": {"final_samples": 0, "train": {"max_steps": 2}}},
            "dpo": {"stage": "dpo", "inputs": {"model.name_or_path": "sft"},
                    "overrides": {"final_samples": 0, "data": {"train": [{"path": path}], "eval": []}}},
        },
        "evaluation": {"enabled": False},
    }
    config = tmp_path / "pipeline.yaml"
    config.write_text(json.dumps(pipeline))
    assert_one_line(cli("align-pipeline", "--config", config), expected)
    assert not (tmp_path / "runs").exists()
    assert_one_line(cli("align-pipeline", "--config", config, "dpo.loss.nam=x"),
                    "error: command line: loss.nam: unknown key")
