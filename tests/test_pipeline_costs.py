"""Training cost across resumes (align.run.CostLedger): a run stopped after a checkpoint and
resumed reports the same cost_train_tokens as an uninterrupted run."""

import json
import os
import shutil

from align.config import load_config


def _dpo(run_dir, quick):
    from direct import dpo as trainer

    return load_config(trainer.DPOConfig, "configs/dpo/default.yaml", quick(
        run_dir, **{"train.max_steps": 6, "train.save_every": 2, "train.eval_every": 0, "train.log_every": 1,
                    "final_samples": 0, "train.keep_checkpoints": 3}))


def test_resumed_run_counts_the_whole_training(ray_session, quick, tmp_path):
    from direct import dpo as trainer

    cfg = _dpo(tmp_path / "dpo", quick)
    whole = trainer.run(cfg, reuse=False)
    assert whole["cost_segments"] == 1
    per_step = [m["tokens"] for m in map(json.loads, open(tmp_path / "dpo" / "metrics.jsonl")) if "tokens" in m and "loss" in m]
    assert len(per_step) == 6 and whole["train_tokens"] == sum(per_step)

    # The same run, as if killed after its step-2 checkpoint: what it did later (steps 3-6, the
    # step-4 checkpoint, the export) is lost, and the rerun resumes at step 3.
    for lost in ("DONE.json", "model", "checkpoints/step4"):
        path = os.path.join(cfg.run_dir, lost)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    with open(os.path.join(cfg.run_dir, "checkpoints", "latest"), "w") as fh:
        fh.write("step2")
    resumed = trainer.run(cfg, reuse=True)
    assert resumed["cost_segments"] == 2
    assert resumed["train_tokens"] == whole["train_tokens"]  # not only steps 3-6
    assert sum(per_step[2:]) < resumed["train_tokens"]
    ledger = [json.loads(line) for line in open(os.path.join(cfg.run_dir, "costs.jsonl"))]
    assert [row["step"] for row in ledger] == [2, 4, 4]  # the killed run's 2 and 4, then the resumed run's 4
    assert ledger[0]["train_tokens"] == sum(per_step[:2]) and ledger[2]["train_tokens"] == sum(per_step[:4])
    assert resumed["wall_time_s"] > ledger[0]["wall_time_s"]


def test_cost_ledger_by_hand(tmp_path):
    """Segment 1 reaches checkpoints 2 and 4 and dies; segment 2 resumes from 2 (checkpoint 4
    was lost), redoes 3-4, checkpoints 4 and dies; segment 3 resumes from 4 and finishes."""
    from align.run import CostLedger

    first = CostLedger(str(tmp_path), 0)
    first.checkpoint(2, 100.0, 10.0)
    first.checkpoint(4, 200.0, 20.0)
    second = CostLedger(str(tmp_path), 2)  # starts from 100 tokens, 10 s, 1 segment
    second.checkpoint(4, 90.0, 7.0)
    third = CostLedger(str(tmp_path), 4)  # the last line for step 4: 190 tokens, 17 s, 2 segments
    assert third.totals(50.0, 5.0) == {"train_tokens": 240.0, "wall_time_s": 22.0, "segments": 3}
    # a fresh start (step 0) forgets the old ledger
    assert CostLedger(str(tmp_path), 0).totals(1.0, 1.0) == {"train_tokens": 1.0, "wall_time_s": 1.0, "segments": 1}
    assert not (tmp_path / "costs.jsonl").exists()
