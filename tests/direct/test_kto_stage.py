"""The KTO stage end to end on the default task's unpaired rows, and on pairs split for KTO."""

import math

import pytest
import torch

from align.config import load_config
from align.data.collate import collate_kto, collate_kto_reference
from direct import kto


def _config(run_dir, quick, model_dir, **overrides):
    base = {"model.name_or_path": model_dir, "data.train": '[{path: "builtin:binary", max_rows: 720}]',
            "deepspeed.micro_batch_size": 32, "train.eval_every": 0, "train.save_every": 0, "train.log_every": 1,
            "final_samples": 0}
    base.update(overrides)
    return load_config(kto.KTOConfig, "configs/kto/default.yaml", quick(run_dir, **base))


@pytest.fixture(scope="module")
def kto_run(sft_model_dir, sft_gold, quick, read_metrics, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("kto")
    cfg = _config(run_dir, quick, sft_model_dir, **{"train.max_steps": 20, "optim.lr": 1e-3, "optim.warmup_steps": 5,
                                                    "final_samples": sft_gold["samples/n"]})
    return kto.run(cfg, reuse=False), read_metrics(run_dir)


def test_kto_learns_and_reports_its_metrics(kto_run):
    summary, metrics = kto_run
    first = metrics[1]
    # Policy == reference at step 1: log-ratios and z0 are 0, so every loss is 1 - sigmoid(0).
    assert first["loss"] == pytest.approx(0.5, abs=1e-5)
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"):
        assert all(math.isfinite(m[key]) for m in metrics.values()), key
    assert all(m["kl"] >= 0 for m in metrics.values())  # z0 is clamped after the global mean
    last = [metrics[s] for s in range(16, 21)]
    assert sum(m["loss"] for m in last) / 5 < 0.49
    assert sum(m["rewards/margins"] for m in last) / 5 > 0.15
    final = summary["final_eval"]
    assert final["eval/rewards/chosen"] > final["eval/rewards/rejected"]
    assert summary["train_rows"] == 684  # 5% of the 720 rows held out for eval
    assert summary["reference_cache"]["train"]["computed"]


def test_kto_raises_the_held_out_gold_score_above_sft(kto_run, sft_gold):
    final = kto_run[0]["final_eval"]
    assert final["samples/n"] == sft_gold["samples/n"]
    assert final["samples/gold"] > sft_gold["samples/gold"] + 0.25
    assert final["samples/gold_ci_low"] > sft_gold["samples/gold_ci_high"]


def test_kto_on_pairs_splits_each_pair_into_two_examples(sft_model_dir, quick, read_metrics, tmp_path):
    cfg = _config(tmp_path, quick, sft_model_dir, **{
        "data_kind": "pairwise", "data.train": '[{path: "builtin:preferences", max_rows: 200}]', "data.eval_fraction": 0,
        "data.eval": '[{path: "builtin:preferences_eval", max_rows: 40}]', "train.max_steps": 6, "optim.lr": 1e-3})
    summary = kto.run(cfg, reuse=False)
    assert summary["train_rows"] == 400 and summary["desirable_rows"] == 200
    metrics = read_metrics(tmp_path)
    assert all(math.isfinite(m["loss"]) for m in metrics.values())
    assert metrics[6]["rewards/margins"] > 0
    assert summary["final_eval"]["eval/rewards/chosen"] > summary["final_eval"]["eval/rewards/rejected"]


def test_mismatched_pairs_are_a_fixed_derangement(builtin_tokenizer):
    import datasets

    n = 9
    ds = datasets.Dataset.from_dict({"prompt_ids": [[100 + i] for i in range(n)],
                                     "completion_ids": [[i] * (i + 1) for i in range(n)], "label": [i % 2 == 0 for i in range(n)]})
    rows = kto.add_kl_partners(ds, seed=0, max_length=6)
    partners = [r[0] for r in rows["kl_completion_ids"]]
    assert sorted(partners) == list(range(n)) and all(p != i for i, p in enumerate(partners))
    assert all(len(r) <= 5 for r in rows["kl_completion_ids"])  # cut to fit max_length beside the prompt
    assert [r[0] for r in kto.add_kl_partners(ds, seed=0, max_length=6)["kl_completion_ids"]] == partners

    batch = collate_kto([rows[i] for i in range(3)], pad_id=0)
    assert batch["input_ids"].shape[0] == batch["kl_input_ids"].shape[0] == 3
    assert batch["index"].tolist() == [0, 1, 2] and batch["label"].tolist() == [True, False, True]
    assert batch["kl_loss_mask"].sum().item() == sum(len(rows[i]["kl_completion_ids"]) for i in range(3))
    ref = collate_kto_reference([rows[i] for i in range(3)], pad_id=0)
    assert ref["input_ids"].shape[0] == 6
    assert torch.equal(ref["loss_mask"].sum(1)[3:], batch["kl_loss_mask"].sum(1))
