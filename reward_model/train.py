"""Reward model: the second stage of the RLHF pipeline (SFT -> reward model -> PPO).

A scalar model (the SFT backbone plus a new one-output head) scores prompt + response at its
last token and is trained with the Bradley-Terry loss on preference pairs (InstructGPT,
arXiv 2203.02155, eq. 1; Llama 2's margin, arXiv 2307.09288, eq. 2). Chosen and rejected
responses go through the model in one forward. The loss is sum(w * l) / sum(w) over the global
batch, w = 1 / C(K, 2) for the pairs of a K-way ranking (1 for plain pairs), so it does not
depend on how the batch is split across micro-batches and ranks.

At the final evaluation the mean and std of the rewards on the eval split are measured and
stored in the exported config.json (`reward_mean`, `reward_std`); `reward_model.score`
normalises with them, so PPO sees rewards of scale ~1.

    python -m reward_model.train --config configs/reward_model/default.yaml optim.lr=3e-4
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, Optional

import torch

from align.config import DataConfig, SourceConfig, StageConfig, check_choice
from align.data.batching import BatchIterator
from align.data.collate import collate_rankings, collate_scored_pairs
from align.engine import deepspeed_engine as de
from align.metrics import Means, train_tokens
from align.models.builders import build_scalar_model, build_tokenizer, count_parameters, pair_scores, sequence_scores
from align.stage import (StageWorker, Throughput, eval_batches, load_tokenized, model_inputs, planned_steps,
                         run_recipe, stage_main)
from align.task import gold_scorer_for
from reward_model.loss import bradley_terry_loss


def _default_rm_data() -> DataConfig:
    return DataConfig(train=[SourceConfig(path="builtin:preferences")],
                      eval=[SourceConfig(path="builtin:preferences_eval")], max_length=128, max_prompt_length=48)


@dataclass
class RMConfig(StageConfig):
    data: DataConfig = field(default_factory=_default_rm_data)
    # pairwise: rows are pairs, or rankings that the data layer expands into their K(K-1)/2 pairs
    # (each pair forwards its two responses). ranking: rows are K-way rankings and each response
    # is forwarded once, its pairs formed from the K scores (the same loss, fewer forwards).
    # Either way all pairs of a prompt share a micro-batch, and micro_batch_size counts prompts.
    data_kind: str = "pairwise"
    # Subtract the data's `margin` column inside the sigmoid (Llama 2's m(r)); 0 where absent.
    use_margin: bool = True
    # Weight of the auxiliary (r_chosen + r_rejected)^2 term that centres rewards at 0
    # (Eisenstein et al. 2023; TRL's center_rewards_coefficient). 0 turns it off.
    center_coef: float = 0.0

    def __post_init__(self) -> None:
        check_choice("data_kind", self.data_kind, ["pairwise", "ranking"])


def _add(means: Means, losses, weights, rc, rr, pair_valid, scores, seq_valid) -> None:
    """Local sums of one micro-batch (float64); `*_valid` mask out eval padding rows. Every metric
    is a ratio of global sums, so it is over the whole global batch, not a mean of micro-batch means."""
    rc, rr, s, pv, sv = (x.detach().double() for x in (rc, rr, scores, pair_valid, seq_valid))
    means.add_sums("loss", losses.detach().double().sum(), weights.double().sum())
    means.add("rewards/accuracies", (rc > rr).double(), pv)
    means.add("rewards/margins", rc - rr, pv)
    means.add("rewards/chosen", rc, pv)
    means.add("rewards/rejected", rr, pv)
    means.add("rewards/mean", s, sv)
    means.add("rewards/r2", s * s, sv)


def _metrics(reduced: Dict[str, float], prefix: str = "") -> Dict[str, float]:
    names = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/mean")
    metrics = {f"{prefix}{k}": reduced.get(k, 0.0) for k in names}
    mean = reduced.get("rewards/mean", 0.0)
    metrics[f"{prefix}rewards/std"] = math.sqrt(max(reduced.get("rewards/r2", 0.0) - mean * mean, 0.0))
    return metrics


class RMWorker(StageWorker):
    """One rank of the reward-model stage."""

    def __init__(self, cfg: RMConfig):
        self.cfg = cfg
        de.seed_everything(cfg.seed)
        self.tokenizer = build_tokenizer(cfg.model)
        ranking = cfg.data_kind == "ranking"
        self.collate = partial(collate_rankings if ranking else collate_scored_pairs,
                               pad_id=self.tokenizer.pad_token_id)
        train, self.eval_rows, self.report = load_tokenized(cfg.data, cfg.data_kind, self.tokenizer, cfg.seed)
        # A ranking's pairs stay in one micro-batch (InstructGPT); a ranking row is one already.
        self.batches = BatchIterator(train, cfg.deepspeed.micro_batch_size, cfg.seed, de.rank(), de.world_size(),
                                     groups=None if ranking else train["group"], collate_fn=self.collate)
        self.data_iter = iter(self.batches)
        self.total_steps = planned_steps(cfg.train, len(self.batches), cfg.deepspeed.grad_accum_steps)
        model = build_scalar_model(cfg.model, self.tokenizer, seed=cfg.seed)
        self.num_params = count_parameters(model)
        self.engine = de.init_train_engine(model, cfg.deepspeed, cfg.optim, self.total_steps)
        self.norm = None
        self.resume()
        self.throughput = None

    def plan(self) -> Dict[str, Any]:
        return {"total_steps": self.total_steps, "start_step": self.step,
                "progress_keys": ["loss", "rewards/accuracies"],
                "summary": {"train_rows": len(self.batches.dataset), "parameters": self.num_params,
                            "data_report": dict(self.report)}}

    def _forward(self, b: Dict[str, torch.Tensor], valid: Optional[torch.Tensor] = None):
        """Scores of every sequence of the micro-batch in one forward, and each pair's loss."""
        pf = self.cfg.model.padding_free
        if "prompt_lengths" in b:  # pairs: each prompt forwarded once
            scores = pair_scores(self.engine, b["input_ids"], b["attention_mask"], b["loss_mask"],
                                 b["prompt_lengths"], padding_free=pf)
        else:
            scores = sequence_scores(self.engine, b["input_ids"], b["attention_mask"], padding_free=pf)
        rc, rr = scores[b["chosen_index"]], scores[b["rejected_index"]]
        # Eval batches are evened out with repeated rows (valid = 0): they weigh nothing.
        pair_valid = torch.ones_like(b["weight"]) if valid is None else valid[b["pair_example"]]
        weights = b["weight"] * pair_valid
        margin = b["margin"] if self.cfg.use_margin else None
        losses, _ = bradley_terry_loss(rc, rr, margin, self.cfg.center_coef, weights)
        return scores, rc, rr, losses, weights, pair_valid

    def train_step(self) -> Dict[str, float]:
        engine = self.engine
        self.throughput = self.throughput or Throughput()
        batches = [next(self.data_iter) for _ in range(self.cfg.deepspeed.grad_accum_steps)]
        # The global weight sum makes every micro-batch's loss a share of one weighted mean.
        global_weight = de.all_reduce_sum(torch.tensor(sum(float(b["weight"].sum()) for b in batches))).item()
        scale = de.loss_scale(global_weight, len(batches))
        means = Means(torch.float64)
        for b in batches:
            scores, rc, rr, losses, weights, pair_valid = self._forward(b)
            engine.backward(losses.sum() * scale)
            de.optimizer_step(engine)
            _add(means, losses, weights, rc, rr, pair_valid, scores, torch.ones_like(scores))
            means.add_total("tokens", train_tokens(b))
        self.step += 1
        reduced = means.reduce(de.all_reduce_sum)
        metrics = _metrics(reduced)
        tokens = reduced["tokens"]
        metrics.update(de.step_metrics(engine), tokens=tokens, tokens_per_s=self.throughput.tick(tokens))
        return metrics

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> Dict[str, float]:
        """Loss and reward metrics on the eval split; agreement with the gold scorer when the
        task has one; at the end, the reward mean/std that the export stores."""
        if self.eval_rows is None:
            return {}
        engine = self.engine
        data = self.cfg.data  # the eval rows come from data.eval, else are held out of data.train
        gold = gold_scorer_for(s.path for s in (data.eval or data.train))
        engine.eval()
        means = Means(torch.float64)
        for b in eval_batches(self.eval_rows, self.cfg.deepspeed.micro_batch_size, de.rank(), de.world_size(),
                              self.collate):
            scores, rc, rr, losses, weights, pair_valid = self._forward(b, b["valid"])
            seq_valid = torch.zeros_like(scores)
            seq_valid[b["chosen_index"]] = pair_valid
            seq_valid[b["rejected_index"]] = pair_valid
            _add(means, losses, weights, rc, rr, pair_valid, scores, seq_valid)
            if gold is not None:
                self._gold_agreement(means, gold, b, rc - rr, pair_valid)
        engine.train()
        reduced = means.reduce(de.all_reduce_sum)
        metrics = _metrics(reduced, "eval/")
        if gold is not None:
            counted = max(reduced["gold/pairs"], 1.0)
            metrics["eval/gold_agreement"] = reduced["gold/rm_agrees"] / counted
            metrics["eval/labels_gold_agreement"] = reduced["gold/labels_agree"] / counted
        if final:
            self.norm = {"reward_mean": metrics["eval/rewards/mean"], "reward_std": metrics["eval/rewards/std"]}
        return metrics

    def _gold_agreement(self, means: Means, gold, b, diff: torch.Tensor, pair_valid: torch.Tensor) -> None:
        """Counts the pairs whose gold scores differ, of those the ones the RM orders as gold
        does, and the ones the labels order as gold does.

        Responses are decoded from the tokens the RM saw; the gold scorer ignores the prompt.
        """
        eos = self.tokenizer.eos_token_id
        texts = []
        for ids, mask in zip(b["input_ids"].tolist(), b["loss_mask"].tolist()):
            response = [t for t, m in zip(ids, mask) if m]
            response = response[:-1] if response and response[-1] == eos else response
            texts.append(self.tokenizer.decode(response, skip_special_tokens=True))
        g = torch.tensor([gold("", t) for t in texts], dtype=torch.float64)
        gold_diff = g[b["chosen_index"]] - g[b["rejected_index"]]
        counted = (gold_diff != 0).double() * pair_valid.double()
        means.add_total("gold/pairs", counted.sum())
        means.add_total("gold/rm_agrees", (counted * (gold_diff * diff.double() > 0)).sum())
        means.add_total("gold/labels_agree", (counted * (gold_diff > 0)).sum())

    def export_config(self) -> Optional[Dict[str, Any]]:
        return self.norm


def run(cfg: RMConfig, reuse: bool = True, group: Optional[str] = None) -> Dict[str, Any]:
    return run_recipe("reward_model", cfg, RMWorker, [*cfg.data.train, *cfg.data.eval], model_inputs(cfg),
                      group, reuse)


def main(argv=None) -> int:
    return stage_main(argv, RMConfig, run, "Bradley-Terry reward model on preference pairs.")


if __name__ == "__main__":
    raise SystemExit(main())
