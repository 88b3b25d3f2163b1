"""The reward-model stage: accuracy against the task's gold scorer, ZeRO-2 parity, export.

The stage tests share one reward model trained from the session SFT model (conftest.py).
"""

import json
import math
import os

import pytest
import torch

from align.config import DataConfig, ModelConfig, SourceConfig, load_config
from align.data.collate import collate_rankings, collate_scored_pairs
from align.tracking import read_metrics
from reward_model import train
from reward_model.loss import bradley_terry_loss


def train_losses(run_dir, steps):
    rows = [m for m in read_metrics(run_dir) if "loss" in m]
    return [m["loss"] for m in rows[:steps]], [m["rewards/accuracies"] for m in rows[:steps]]


def test_reward_model_agrees_with_gold_scorer(rm_run):
    summary, _ = rm_run
    final = summary["final_eval"]
    # Held-out pairs (films never seen in training) whose gold scores differ: the RM orders
    # >= 85% of them as the gold scorer does.
    assert final["eval/gold_agreement"] >= 0.85
    # The labels are Bradley-Terry samples of the gold scores (temperature 0.25): they agree
    # with gold on about 90% of pairs, which bounds the accuracy against labels.
    assert 0.85 < final["eval/labels_gold_agreement"] < 0.95
    assert final["eval/rewards/accuracies"] >= 0.80
    assert final["eval/loss"] < 0.45 < math.log(2)
    assert final["eval/rewards/margins"] > 0 and final["eval/rewards/chosen"] > final["eval/rewards/rejected"]
    assert summary["steps"] == 40 and summary["parameters"] == 869_504 + 128  # backbone + score head


def test_first_loss_is_ln2(rm_run):
    # The new head starts with small weights, so every reward is about equal and
    # -log sigmoid(r_c - r_r) = ln 2 at step 1.
    losses, _ = train_losses(rm_run[1], 1)
    assert losses[0] == pytest.approx(math.log(2), abs=0.01)


def test_normalisation_statistics_are_exported(rm_run):
    summary, _ = rm_run
    with open(os.path.join(summary["model_dir"], "config.json")) as fh:
        config = json.load(fh)
    assert len(config["id2label"]) == 1  # one output: the reward
    assert config["reward_mean"] == pytest.approx(summary["final_eval"]["eval/rewards/mean"], rel=1e-12)
    assert config["reward_std"] == pytest.approx(summary["final_eval"]["eval/rewards/std"], rel=1e-12)
    assert config["reward_std"] > 0.1


def test_two_actors_zero2_match_one_actor(rm_run, rm_overrides, tmp_path):
    """2 ranks x 16 pairs under ZeRO-2 = 1 rank x 32 pairs (the trained RM's first steps).

    Same global batch (BatchIterator hands rank r the r-th slice of it), same LR for the first
    3 steps (still in warm-up), same initial weights. Only summation order differs: the
    gradient all-reduce over gloo and BLAS blocking for 16- vs 32-row micro-batches of other
    padded widths; in fp32 that moves losses by ~1e-7 relative. rtol 1e-4 leaves room for
    Adam to amplify that over 2 updates, while a loss or gradient that missed the other rank's
    pairs (each rank alone sees half the batch) is off by far more.
    """
    cfg = load_config(train.RMConfig, "configs/reward_model/default.yaml", rm_overrides(tmp_path, **{
        "ray.num_actors": 2, "deepspeed.zero_stage": 2, "deepspeed.micro_batch_size": 16, "train.max_steps": 3,
        "data.eval": '[{path: "builtin:preferences_eval", max_rows: 64}]'}))
    summary = train.run(cfg, reuse=False)
    one_losses, one_acc = train_losses(rm_run[1], 3)
    two_losses, two_acc = train_losses(str(tmp_path), 3)
    assert len(two_losses) == 3 and summary["steps"] == 3
    assert two_losses == pytest.approx(one_losses, rel=1e-4)
    assert two_acc == one_acc
    assert len(set(one_losses)) == 3  # the steps really differ (the model is learning)


# ---------------------------------------------------------------------------------------------
# Rankings: each response forwarded once gives the same pairs and loss as the expanded pairs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranking_batches(builtin_tokenizer):
    from align.data import load_rows, tokenize_rows

    data_cfg = DataConfig(max_length=128, max_prompt_length=48)
    source = [SourceConfig(path="builtin:rankings", max_rows=3)]
    tok, pad = builtin_tokenizer, builtin_tokenizer.pad_token_id

    def rows(kind):
        ds = tokenize_rows(load_rows(source, kind, data_cfg, seed=0), kind, tok, data_cfg)
        return [dict(zip(ds.column_names, values)) for values in zip(*ds[:].values())]

    return collate_rankings(rows("ranking"), pad), collate_scored_pairs(rows("pairwise"), pad)


def test_ranking_collate_by_hand(ranking_batches):
    ranked, _ = ranking_batches
    # 3 rankings of K = 4: 12 sequences, 3 x C(4,2) = 18 pairs, best-first order within each.
    assert ranked["input_ids"].shape[0] == 12
    assert ranked["chosen_index"][:6].tolist() == [0, 0, 0, 1, 1, 2]
    assert ranked["rejected_index"][:6].tolist() == [1, 2, 3, 2, 3, 3]
    assert ranked["chosen_index"][6:12].tolist() == [4, 4, 4, 5, 5, 6]
    assert ranked["pair_example"].tolist() == [0] * 6 + [1] * 6 + [2] * 6
    # Each prompt weighs 1 in total: 6 pairs of weight 1/6.
    assert ranked["weight"].tolist() == pytest.approx([1 / 6] * 18)


def test_ranking_and_expanded_pairs_give_the_same_loss(ranking_batches, builtin_tokenizer):
    from align.models.builders import build_scalar_model, sequence_scores

    model = build_scalar_model(ModelConfig(), builtin_tokenizer, seed=0).eval()
    out = []
    for b in ranking_batches:
        with torch.no_grad():
            scores = sequence_scores(model, b["input_ids"], b["attention_mask"])
        rc, rr = scores[b["chosen_index"]], scores[b["rejected_index"]]
        losses, _ = bradley_terry_loss(rc, rr, b["margin"], weights=b["weight"])
        out.append((rc, rr, b["weight"], losses.sum() / b["weight"].sum()))
    (rc1, rr1, w1, loss1), (rc2, rr2, w2, loss2) = out
    assert ranking_batches[1]["input_ids"].shape[0] == 36  # expanded: 2 sequences per pair
    assert torch.allclose(rc1, rc2, atol=1e-5) and torch.allclose(rr1, rr2, atol=1e-5)
    assert torch.equal(w1, w2.float())
    assert loss1.item() == pytest.approx(loss2.item(), abs=1e-6)


def test_ranking_stage_matches_expanded_pairs_stage(rm_overrides, tmp_path):
    """data_kind=ranking (K forwards per prompt) and pairwise (the data layer's 2 * C(K,2)) train
    the same: same prompts per step, weights 1/C(K,2), one weighted mean over the global batch."""
    runs = {}
    for kind in ("ranking", "pairwise"):
        cfg = load_config(train.RMConfig, "configs/reward_model/default.yaml", rm_overrides(tmp_path / kind, **{
            "data_kind": kind, "data.train": '[{path: "builtin:rankings", max_rows: 200}]', "data.eval": "[]",
            "data.eval_fraction": 0.1, "deepspeed.micro_batch_size": 8, "train.max_steps": 2}))
        runs[kind] = (train.run(cfg, reuse=False), train_losses(str(tmp_path / kind), 2)[0])
    (ranked, ranked_losses), (paired, paired_losses) = runs["ranking"], runs["pairwise"]
    assert ranked["train_rows"] == 180 and paired["train_rows"] == 180 * 6
    assert ranked_losses == pytest.approx(paired_losses, rel=1e-5)
    for key in ("eval/loss", "eval/rewards/accuracies", "eval/gold_agreement"):
        assert ranked["final_eval"][key] == pytest.approx(paired["final_eval"][key], rel=1e-5), key
