"""data.ties through a real stage: what a scored ranking file loses to ties is counted and saved
in the stage's run_info.json (and DONE.json), on a hand-made file."""

import json

from align.config import load_config
from direct import dpo as recipe

ROWS = [{"prompt": "Q1", "responses": ["a", "b", "c"], "scores": [5, 5, 1]},  # best tied: 2 pairs, (a, b) skipped
        {"prompt": "Q2", "responses": ["d", "e", "f"], "scores": [8, 2, 2]},  # worst tied: 2 pairs, (e, f) skipped
        {"prompt": "Q3", "responses": ["g", "h"], "scores": [4, 4]},          # all tied: the row is dropped
        {"prompt": "Q4", "responses": ["i", "j"], "scores": [3, 1]}]          # strict: 1 pair


def test_tied_pairs_and_rows_are_counted_in_run_info(ray_session, quick, tmp_path):
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run_dir = tmp_path / "run"
    cfg = load_config(recipe.DPOConfig, "configs/dpo/default.yaml", quick(run_dir, **{
        "data.train": f'[{{path: "{path}"}}]', "data.eval": "[]", "data.eval_fraction": 0, "data.ties": "strict_pairs",
        "deepspeed.micro_batch_size": 5, "train.max_steps": 1, "train.eval_every": 0, "train.save_every": 0,
        "final_samples": 0}))
    summary = recipe.run(cfg, reuse=False)
    expected = {"dropped/tied_best": 1, "skipped/tied_pairs": 2}
    with open(run_dir / "run_info.json") as fh:
        assert json.load(fh)["data_report"] == expected
    assert summary["data_report"] == expected and summary["train_rows"] == 5  # 2 + 2 + 1 pairs
