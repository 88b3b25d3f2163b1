"""KTO: alignment from unpaired desirable / undesirable examples (Ethayarajh et al. 2024,
"KTO: Model Alignment as Prospect Theoretic Optimization", arXiv 2402.01306).

    python -m direct.kto --config configs/kto/default.yaml loss.beta=0.1

Rows are {prompt, completion, label} (data kind "binary"), or preference pairs
(`data_kind: pairwise`) split into a desirable chosen and an undesirable rejected example each,
as the paper does with paired data.

The reference point z0 is a batch estimate of KL(pi || pi_ref) on mismatched pairs (prompt x_i
with another example's completion). Here the mismatch is fixed per dataset, not per batch: row i
is paired once with the completion of row p(i), p a seeded derangement (a cycle through a random
order). So the reference log-probs of the mismatched pairs are cacheable by row index like the
matched ones, and no reference model is held in memory while training (as for DPO). The price:
a row meets the same mismatched completion every epoch, rather than a fresh one per batch as in
`collate_binary`; z0 remains an unbiased estimate of the same expectation, and it no longer
depends on how rows fall into micro-batches, so 1 and N ranks compute the same z0. The policy
side of z0 is a no-grad forward over the step's whole global batch (all micro-batches, all
ranks), averaged before the clamp at 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, Optional

import numpy as np
import torch

from align.config import DataConfig, SourceConfig, check_choice
from align.data.batching import BatchIterator
from align.data.collate import collate_kto, collate_kto_reference
from align.engine import deepspeed_engine as de
from align.evaluation import held_out_report
from align.metrics import Means
from align.models.builders import build_causal_lm, build_tokenizer
from align.models.logprobs import sequence_logprobs
from align.stage import StageWorker, Throughput, eval_batches, load_prompts, load_tokenized, planned_steps, run_recipe, \
    stage_main
from direct.losses import kto_kl_reference_point, kto_loss
from direct.ref_cache import lookup
from direct.reference import DirectConfig, cached_reference, check_model_exists, run_inputs, uses_adapter_reference, \
    with_index

KTO_PARTS = ("completion", "kl")
KTO_TOKENS = ("prompt_ids", "completion_ids", "kl_completion_ids")


@dataclass
class KTOLossConfig:
    # beta of the paper: the scale of the implicit reward beta * log(pi / pi_ref).
    beta: float = 0.1
    # lambda_D and lambda_U; the paper suggests lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


def _default_binary_data() -> DataConfig:
    return DataConfig(train=[SourceConfig(path="builtin:binary")], eval_fraction=0.05, max_length=128,
                      max_prompt_length=48)


@dataclass
class KTOConfig(DirectConfig):
    data: DataConfig = field(default_factory=_default_binary_data)
    # binary: {prompt, completion, label} rows; pairwise: preference pairs, each split into a
    # desirable (chosen) and an undesirable (rejected) example.
    data_kind: str = "binary"
    loss: KTOLossConfig = field(default_factory=KTOLossConfig)

    def __post_init__(self) -> None:
        check_choice("data_kind", self.data_kind, ["binary", "pairwise"])


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def unpair(ds):
    """Tokenized pairwise rows -> binary rows: (prompt, chosen, True) and (prompt, rejected, False)."""
    if ds is None:
        return None

    def split(batch):
        out = {"prompt_ids": [], "completion_ids": [], "label": []}
        for p, c, r in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"]):
            out["prompt_ids"] += [p, p]
            out["completion_ids"] += [c, r]
            out["label"] += [True, False]
        return out

    return ds.map(split, batched=True, remove_columns=ds.column_names, desc="Splitting pairs for KTO")


def add_kl_partners(ds, seed: int, max_length: int):
    """Adds `kl_completion_ids`: the completion of row p(i), p a seeded derangement, cut to fit
    beside row i's prompt; and `index`."""
    if ds is None:
        return None
    n = len(ds)
    order = np.random.default_rng([seed, 11]).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)  # each row's partner is the next in a random cycle
    completions, prompts = ds["completion_ids"][:], ds["prompt_ids"][:]
    kl = [completions[partner[i]][: max(0, max_length - len(prompts[i]))] for i in range(n)]
    return with_index(ds.add_column("kl_completion_ids", kl))


# ---------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------


class KTOWorker(StageWorker):
    """One rank of the KTO stage."""

    def __init__(self, cfg: KTOConfig):
        self.cfg = cfg
        de.seed_everything(cfg.seed)
        self.tokenizer = build_tokenizer(cfg.model)
        pad = self.tokenizer.pad_token_id
        self.collate = partial(collate_kto, pad_id=pad)
        train, evals, self.report = load_tokenized(cfg.data, cfg.data_kind, self.tokenizer, cfg.seed)
        if cfg.data_kind == "pairwise":
            train, evals = unpair(train), unpair(evals)
        self.train_rows = add_kl_partners(train, cfg.seed, cfg.data.max_length)
        self.eval_rows = add_kl_partners(evals, cfg.seed, cfg.data.max_length)
        self.prompts = None
        if cfg.final_samples:
            prompts = load_prompts(cfg.eval_prompts, cfg, self.tokenizer)
            self.prompts = prompts.select(range(min(cfg.final_samples, len(prompts))))
        reference = partial(cached_reference, cfg, self.tokenizer, {"train": self.train_rows, "eval": self.eval_rows},
                            partial(collate_kto_reference, pad_id=pad), KTO_PARTS, KTO_TOKENS)
        # The reference is built, used and freed before the policy exists; with LoRA it is the
        # policy itself with the adapter off, so it comes after.
        if not uses_adapter_reference(cfg):
            self.ref, self.ref_info = reference()
        self.batches = BatchIterator(self.train_rows, cfg.deepspeed.micro_batch_size, cfg.seed, de.rank(),
                                     de.world_size(), collate_fn=self.collate)
        self.data_iter = iter(self.batches)
        self.total_steps = planned_steps(cfg.train, len(self.batches), cfg.deepspeed.grad_accum_steps)
        model = build_causal_lm(cfg.model, self.tokenizer, seed=cfg.seed)
        self.engine = de.init_train_engine(model, cfg.deepspeed, cfg.optim, self.total_steps)
        if uses_adapter_reference(cfg):
            self.ref, self.ref_info = reference(policy=self.engine)
        self.throughput = None
        self.resume()

    def plan(self) -> Dict[str, Any]:
        labels = self.train_rows["label"][:]
        return {"total_steps": self.total_steps, "start_step": self.step, "progress_keys": ["loss", "kl", "tokens_per_s"],
                "summary": {"train_rows": len(self.train_rows), "desirable_rows": int(sum(labels)),
                            "data_report": dict(self.report), "reference_cache": self.ref_info}}

    def _kl_sums(self, batch, ref) -> torch.Tensor:
        """[sum of policy - reference log-ratios on the mismatched rows, row count], no grad."""
        with torch.no_grad():
            lp = sequence_logprobs(self.engine, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_loss_mask"],
                                   padding_free=self.cfg.model.padding_free)
        device = lp.sum.device
        keep = batch["valid"].bool() if "valid" in batch else torch.ones_like(lp.sum, dtype=torch.bool)
        n = float(keep.sum())
        if not n:  # a batch of padding rows (eval on a small set)
            return torch.zeros(2, device=device)
        ref_logps = lookup(ref, batch["index"], "kl", "sum")
        # This micro-batch's unclamped mean; the clamp acts on the global mean (see `_z0`).
        z = kto_kl_reference_point(lp.sum[keep], ref_logps[keep], clamp=False)
        return torch.stack([z * n, torch.tensor(n, device=device)])

    def _z0(self, batches, ref) -> torch.Tensor:
        total = de.all_reduce_sum(sum(self._kl_sums(b, ref) for b in batches))
        return (total[0] / total[1].clamp(min=1)).clamp(min=0)

    def _losses(self, batch, ref, z0):
        lp = sequence_logprobs(self.engine, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                               padding_free=self.cfg.model.padding_free)
        loss = self.cfg.loss
        losses, rewards = kto_loss(lp.sum, lookup(ref, batch["index"], "completion", "sum"), batch["label"], z0,
                                   beta=loss.beta, desirable_weight=loss.desirable_weight,
                                   undesirable_weight=loss.undesirable_weight)
        return losses, rewards, lp.sum.detach()

    def _add(self, means: Means, losses, rewards, logps, label, valid) -> None:
        good, bad = label.float() * valid, (~label).float() * valid
        means.add("loss", losses, valid)
        means.add("rewards/chosen", rewards, good)
        means.add("rewards/rejected", rewards, bad)
        means.add("logps/chosen", logps, good)
        means.add("logps/rejected", logps, bad)

    def train_step(self) -> Dict[str, float]:
        engine = self.engine
        self.throughput = self.throughput or Throughput()
        batches = [de.to_device(next(self.data_iter)) for _ in range(self.cfg.deepspeed.grad_accum_steps)]
        z0 = self._z0(batches, self.ref["train"])
        local = torch.tensor([float(sum(len(b["index"]) for b in batches)),
                              float(sum(b["attention_mask"].sum() + b["kl_attention_mask"].sum() for b in batches))],
                             device=de.device())
        rows, tokens = de.all_reduce_sum(local).tolist()
        scale = de.loss_scale(rows, len(batches))  # mean over the global batch
        means = Means()
        for b in batches:
            losses, rewards, logps = self._losses(b, self.ref["train"], z0)
            engine.backward(losses.sum() * scale)
            de.optimizer_step(engine)
            self._add(means, losses, rewards, logps, b["label"], torch.ones_like(losses))
        self.step += 1
        metrics = means.reduce(de.all_reduce_sum)
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        metrics.update(de.step_metrics(engine), kl=z0.item(), tokens=tokens, tokens_per_s=self.throughput.tick(tokens))
        return metrics

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> Dict[str, Any]:
        engine = self.engine
        engine.eval()
        metrics: Dict[str, Any] = {}
        if self.eval_rows is not None:
            batches = [de.to_device(b) for b in eval_batches(self.eval_rows, self.cfg.deepspeed.micro_batch_size,
                                                             de.rank(), de.world_size(), self.collate)]
            z0 = self._z0(batches, self.ref["eval"])  # over the whole eval set
            means = Means()
            for b in batches:
                losses, rewards, logps = self._losses(b, self.ref["eval"], z0)
                self._add(means, losses, rewards, logps, b["label"], b["valid"])
            metrics = {f"eval/{k}": v for k, v in means.reduce(de.all_reduce_sum).items()}
            metrics["eval/kl"] = z0.item()
        if final and self.prompts is not None:
            task_paths = [self.cfg.eval_prompts.path, *(s.path for s in self.cfg.data.train)]
            metrics.update(held_out_report(partial(de.generate, engine), self.tokenizer, self.prompts,
                                           self.cfg.sampling, self.cfg.seed, task_paths, de.device()))
        engine.train()
        return metrics


def run(cfg: KTOConfig, reuse: bool = True, group: Optional[str] = None) -> Dict[str, Any]:
    check_model_exists(cfg)
    return run_recipe("kto", cfg, KTOWorker, [*cfg.data.train, *cfg.data.eval, cfg.eval_prompts], run_inputs(cfg),
                      group, reuse)


def main(argv=None) -> int:
    return stage_main(argv, KTOConfig, run, "KTO from unpaired desirable / undesirable examples.")


if __name__ == "__main__":
    raise SystemExit(main())
