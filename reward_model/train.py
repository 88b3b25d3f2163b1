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
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional

import torch

from align.config import DataConfig, SourceConfig, StageConfig, check_choice


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


# ---------------------------------------------------------------------------------------------
# Batches: every sequence of a micro-batch in one tensor, pairs as indices into it
# ---------------------------------------------------------------------------------------------


def collate_pairs(examples: List[dict], pad_id: int) -> Dict[str, torch.Tensor]:
    """`collate_pairwise` (rows 0..B-1 chosen, B..2B-1 rejected) plus the pair indices."""
    from align.data.collate import collate_pairwise

    batch = collate_pairwise(examples, pad_id)
    n = len(examples)
    batch.update(chosen_index=torch.arange(n), rejected_index=torch.arange(n, 2 * n),
                 pair_example=torch.arange(n))
    return batch


def collate_rankings(examples: List[dict], pad_id: int) -> Dict[str, torch.Tensor]:
    """K responses per ranking (best first) as K rows; its C(K,2) pairs index into them."""
    from align.data.collate import collate_sft
    from reward_model.loss import expand_ranking, ranking_pair_weights

    rows, chosen, rejected, owner, weights = [], [], [], [], []
    for i, e in enumerate(examples):
        base, prompt, k = len(rows), list(e["prompt_ids"]), len(e["responses_ids"])
        rows += [{"input_ids": prompt + list(r), "loss_mask": [0] * len(prompt) + [1] * len(r)}
                 for r in e["responses_ids"]]
        for better, worse in expand_ranking(ranks=range(k)):
            chosen.append(base + better)
            rejected.append(base + worse)
            owner.append(i)
        weights += ranking_pair_weights(k)
    batch = collate_sft(rows, pad_id)
    batch.update(chosen_index=torch.tensor(chosen), rejected_index=torch.tensor(rejected),
                 pair_example=torch.tensor(owner), weight=torch.tensor(weights),
                 margin=torch.zeros(len(chosen)))
    return batch


# Sums over pairs and scored sequences, all-reduced once per step; every metric is a ratio of
# them, so metrics too are over the whole global batch, not means of micro-batch means.
_SUMS = ("pairs", "weight", "wloss", "correct", "margin", "chosen", "rejected", "seqs", "r", "r2", "tokens")


def _sums(losses, weights, rc, rr, pair_valid, scores, seq_valid, tokens) -> torch.Tensor:
    """Local sums in the order of _SUMS (float64); `*_valid` mask out eval padding rows."""
    rc, rr, s, pv, sv = (x.detach().double() for x in (rc, rr, scores, pair_valid, seq_valid))
    return torch.stack([pv.sum(), weights.double().sum(), losses.detach().double().sum(),
                        ((rc > rr).double() * pv).sum(), ((rc - rr) * pv).sum(), (rc * pv).sum(), (rr * pv).sum(),
                        sv.sum(), (s * sv).sum(), (s * s * sv).sum(), torch.as_tensor(tokens).double()])


def _metrics(s: torch.Tensor, prefix: str = "") -> Dict[str, float]:
    v = dict(zip(_SUMS, s.tolist()))
    n, m = max(v["pairs"], 1.0), max(v["seqs"], 1.0)
    mean = v["r"] / m
    return {f"{prefix}loss": v["wloss"] / max(v["weight"], 1e-12),
            f"{prefix}rewards/accuracies": v["correct"] / n, f"{prefix}rewards/margins": v["margin"] / n,
            f"{prefix}rewards/chosen": v["chosen"] / n, f"{prefix}rewards/rejected": v["rejected"] / n,
            f"{prefix}rewards/mean": mean, f"{prefix}rewards/std": math.sqrt(max(v["r2"] / m - mean * mean, 0.0))}


class RMWorker:
    """One rank of the reward-model stage."""

    def __init__(self, cfg: RMConfig):
        from align.data.batching import BatchIterator
        from align.engine import deepspeed_engine as de
        from align.models.builders import build_scalar_model, build_tokenizer, count_parameters
        from align.stage import load_tokenized, planned_steps

        self.cfg, self.de = cfg, de
        de.seed_everything(cfg.seed)
        self.tokenizer = build_tokenizer(cfg.model)
        ranking = cfg.data_kind == "ranking"
        self.collate = partial(collate_rankings if ranking else collate_pairs, pad_id=self.tokenizer.pad_token_id)
        train, self.eval_rows, self.report = load_tokenized(cfg.data, cfg.data_kind, self.tokenizer, cfg.seed)
        # A ranking's pairs stay in one micro-batch (InstructGPT); a ranking row is one already.
        self.batches = BatchIterator(train, cfg.deepspeed.micro_batch_size, cfg.seed, de.rank(), de.world_size(),
                                     groups=None if ranking else train["group"], collate_fn=self.collate)
        self.data_iter = iter(self.batches)
        self.total_steps = planned_steps(cfg.train, len(self.batches), cfg.deepspeed.grad_accum_steps)
        model = build_scalar_model(cfg.model, self.tokenizer, seed=cfg.seed)
        self.num_params = count_parameters(model)
        self.engine = de.init_train_engine(model, cfg.deepspeed, cfg.optim, self.total_steps)
        self.step, self.norm = 0, None
        if cfg.train.resume:
            state = de.load_checkpoint(self.engine, self._ckpt_dir())
            if state is not None:
                self.step = state["step"]
                self.batches.load_state_dict(state["data"])
                self.data_iter = iter(self.batches)
        self.throughput = None

    def _ckpt_dir(self) -> str:
        return os.path.join(self.cfg.run_dir, "checkpoints")

    def plan(self) -> Dict[str, Any]:
        return {"total_steps": self.total_steps, "start_step": self.step,
                "progress_keys": ["loss", "rewards/accuracies"],
                "summary": {"train_rows": len(self.batches.dataset), "parameters": self.num_params,
                            "data_report": dict(self.report)}}

    def _forward(self, b: Dict[str, torch.Tensor], valid: Optional[torch.Tensor] = None):
        """Scores of every sequence of the micro-batch in one forward, and each pair's loss."""
        from align.models.builders import pair_scores, sequence_scores
        from reward_model.loss import bradley_terry_loss

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
        from align.stage import Throughput

        de, engine = self.de, self.engine
        self.throughput = self.throughput or Throughput()
        batches = [next(self.data_iter) for _ in range(self.cfg.deepspeed.grad_accum_steps)]
        # The global weight sum makes every micro-batch's loss a share of one weighted mean.
        global_weight = de.all_reduce_sum(torch.tensor(sum(float(b["weight"].sum()) for b in batches))).item()
        scale = de.world_size() * len(batches) / global_weight
        sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        for b in batches:
            scores, rc, rr, losses, weights, pair_valid = self._forward(b)
            # DeepSpeed divides by grad-accumulation steps and averages over ranks; undo both.
            engine.backward(losses.sum() * scale)
            de.optimizer_step(engine)
            sums += _sums(losses, weights, rc, rr, pair_valid, scores, torch.ones_like(scores),
                          b["attention_mask"].sum())
        self.step += 1
        sums = de.all_reduce_sum(sums)
        metrics = _metrics(sums)
        tokens = sums[_SUMS.index("tokens")].item()
        metrics.update(de.step_metrics(engine), tokens=tokens, tokens_per_s=self.throughput.tick(tokens))
        return metrics

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> Dict[str, float]:
        """Loss and reward metrics on the eval split; agreement with the gold scorer when the
        task has one; at the end, the reward mean/std that the export stores."""
        from align.stage import eval_batches
        from align.task import gold_scorer_for

        if self.eval_rows is None:
            return {}
        de, engine = self.de, self.engine
        data = self.cfg.data  # the eval rows come from data.eval, else are held out of data.train
        gold = gold_scorer_for(s.path for s in (data.eval or data.train))
        engine.eval()
        sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        agree = torch.zeros(3, dtype=torch.float64)  # pairs with a gold order, RM agrees, labels agree
        for b in eval_batches(self.eval_rows, self.cfg.deepspeed.micro_batch_size, de.rank(), de.world_size(),
                              self.collate):
            scores, rc, rr, losses, weights, pair_valid = self._forward(b, b["valid"])
            seq_valid = torch.zeros_like(scores)
            seq_valid[b["chosen_index"]] = pair_valid
            seq_valid[b["rejected_index"]] = pair_valid
            sums += _sums(losses, weights, rc, rr, pair_valid, scores, seq_valid, 0.0)
            if gold is not None:
                agree += self._gold_agreement(gold, b, rc - rr, pair_valid)
        engine.train()
        sums, agree = de.all_reduce_sum(sums), de.all_reduce_sum(agree)
        metrics = _metrics(sums, "eval/")
        if gold is not None:
            metrics["eval/gold_agreement"] = agree[1].item() / max(agree[0].item(), 1.0)
            metrics["eval/labels_gold_agreement"] = agree[2].item() / max(agree[0].item(), 1.0)
        if final:
            self.norm = {"reward_mean": metrics["eval/rewards/mean"], "reward_std": metrics["eval/rewards/std"]}
        return metrics

    def _gold_agreement(self, gold, b, diff: torch.Tensor, pair_valid: torch.Tensor) -> torch.Tensor:
        """[pairs whose gold scores differ, of those ordered as gold by the RM, by the labels].

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
        return torch.stack([counted.sum(), (counted * (gold_diff * diff.double() > 0)).sum(),
                            (counted * (gold_diff > 0)).sum()])

    def save_checkpoint(self, step: int) -> str:
        return self.de.save_checkpoint(self.engine, self._ckpt_dir(), step, {"data": self.batches.state_dict()},
                                       keep=self.cfg.train.keep_checkpoints)

    def export(self, out_dir: str) -> Optional[str]:
        return self.de.export_hf(self.engine, self.tokenizer, out_dir, extra_config=self.norm)

    def close(self) -> None:
        self.engine = None


def run(cfg: RMConfig, reuse: bool = True, group: Optional[str] = None) -> Dict[str, Any]:
    from align.data.sources import data_fingerprint
    from align.stage import run_stage

    fingerprint = data_fingerprint([*cfg.data.train, *cfg.data.eval], cfg.seed)
    inputs = None if cfg.model.name_or_path.startswith("builtin:") else {"model": cfg.model.name_or_path}
    return run_stage("reward_model", cfg, RMWorker, fingerprint, inputs=inputs, group_name=group, reuse=reuse)


def main(argv=None) -> int:
    from align.stage import stage_main

    return stage_main(argv, RMConfig, run, "Bradley-Terry reward model on preference pairs.")


if __name__ == "__main__":
    raise SystemExit(main())
