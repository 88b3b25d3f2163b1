"""Supervised fine-tuning: the first stage of the RLHF pipeline.

Loss: mean negative log-likelihood over all response tokens of the global batch (prompt tokens
masked), not a mean of per-micro-batch means, so it does not depend on how the batch is split
across micro-batches and ranks.

    python -m rlhf.sft --config configs/sft/default.yaml optim.lr=3e-4
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, Optional

import torch

from align.config import DataConfig, SourceConfig, StageConfig
from align.data.batching import BatchIterator
from align.data.collate import collate_sft
from align.metrics import train_tokens
from align.data.tokenize import pack_sft
from align.engine import deepspeed_engine as de
from align.evaluation import sample_and_score, sample_summary
from align.generation import SamplingConfig
from align.models.builders import build_causal_lm, build_tokenizer
from align.models.logprobs import sequence_logprobs
from align.stage import (StageWorker, Throughput, eval_batches, load_tokenized, model_inputs, planned_steps,
                         run_recipe, stage_main)


def _default_sft_data() -> DataConfig:
    return DataConfig(train=[SourceConfig(path="builtin:sft")], eval=[SourceConfig(path="builtin:sft_eval")],
                      max_length=128, max_prompt_length=48)


@dataclass
class SFTConfig(StageConfig):
    data: DataConfig = field(default_factory=_default_sft_data)
    # At the end, sample this many eval prompts and report fluency / gold score (0: skip).
    final_samples: int = 32
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))


class SFTWorker(StageWorker):
    """One rank of the SFT stage."""

    def __init__(self, cfg: SFTConfig):
        self.cfg = cfg
        de.seed_everything(cfg.seed)
        self.tokenizer = build_tokenizer(cfg.model)
        self.collate = partial(collate_sft, pad_id=self.tokenizer.pad_token_id)
        train, self.eval_rows, self.report = load_tokenized(cfg.data, "sft", self.tokenizer, cfg.seed)
        if cfg.data.packing:
            train = pack_sft(train, cfg.data.max_length)
        self.batches = BatchIterator(train, cfg.deepspeed.micro_batch_size, cfg.seed, de.rank(), de.world_size(),
                                     collate_fn=self.collate)
        self.data_iter = iter(self.batches)
        self.total_steps = planned_steps(cfg.train, len(self.batches), cfg.deepspeed.grad_accum_steps)
        model = build_causal_lm(cfg.model, self.tokenizer, seed=cfg.seed)
        self.engine = de.init_train_engine(model, cfg.deepspeed, cfg.optim, self.total_steps)
        self.resume()
        self.throughput = None

    def plan(self) -> Dict[str, Any]:
        return {"total_steps": self.total_steps, "start_step": self.step, "progress_keys": ["loss", "tokens_per_s"],
                "summary": {"train_rows": len(self.batches.dataset), "data_report": dict(self.report)}}

    def train_step(self) -> Dict[str, float]:
        engine = self.engine
        self.throughput = self.throughput or Throughput()
        batches = [de.to_device(next(self.data_iter)) for _ in range(self.cfg.deepspeed.grad_accum_steps)]
        # The global response-token count makes every micro-batch's loss a share of one mean.
        local = torch.tensor([sum(float(b["loss_mask"][:, 1:].sum()) for b in batches),
                              sum(train_tokens(b) for b in batches)], device=de.device())
        global_tokens, tokens = de.all_reduce_sum(local).tolist()
        scale = de.loss_scale(global_tokens, len(batches), floor=1.0)
        total_nll = 0.0
        for b in batches:
            lp = sequence_logprobs(engine, b["input_ids"], b["attention_mask"], b["loss_mask"],
                                   position_ids=b.get("position_ids"), padding_free=self.cfg.model.padding_free)
            nll = -lp.sum.sum()
            engine.backward(nll * scale)
            de.optimizer_step(engine)
            total_nll += nll.item()
        self.step += 1
        loss = de.all_reduce_sum(torch.tensor(total_nll, device=de.device())).item() / max(global_tokens, 1.0)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), **de.step_metrics(engine),
                "tokens": tokens, "tokens_per_s": self.throughput.tick(tokens)}

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> Dict[str, float]:
        if self.eval_rows is None:
            return {}
        engine = self.engine
        engine.eval()
        nll, tokens = torch.zeros((), device=de.device()), torch.zeros((), device=de.device())
        for b in eval_batches(self.eval_rows, self.cfg.deepspeed.micro_batch_size, de.rank(), de.world_size(),
                              self.collate):
            b = de.to_device(b)
            mask = b["loss_mask"] * b["valid"][:, None].long()
            lp = sequence_logprobs(engine, b["input_ids"], b["attention_mask"], mask,
                                   padding_free=self.cfg.model.padding_free)
            nll += -lp.sum.sum().float()
            tokens += mask[:, 1:].sum()
        engine.train()
        nll, tokens = de.all_reduce_sum(nll).item(), de.all_reduce_sum(tokens).item()
        loss = nll / max(tokens, 1.0)
        metrics = {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}
        if final and self.cfg.final_samples:
            metrics.update(self._sample_metrics())
        return metrics

    def _sample_metrics(self) -> Dict[str, Any]:
        """EOS rate, length, and the task's gold score and metrics (e.g. fluency) of samples on
        eval prompts (the prompt part of the eval rows)."""
        rows = self.eval_rows.select(range(min(self.cfg.final_samples, len(self.eval_rows))))
        prompts = [ids[: mask.index(1)] for ids, mask in zip(rows["input_ids"], rows["loss_mask"])]
        scored = sample_and_score(partial(de.generate, self.engine), self.tokenizer, prompts, [""] * len(prompts),
                                  self.cfg.sampling, seed=self.cfg.seed, device=de.device(),
                                  task_paths=[s.path for s in self.cfg.data.train])
        metrics = sample_summary(scored)
        if de.rank() != 0:
            metrics.pop("samples/examples")
        return metrics


def run(cfg: SFTConfig, reuse: bool = True, group: Optional[str] = None) -> Dict[str, Any]:
    return run_recipe("sft", cfg, SFTWorker, [*cfg.data.train, *cfg.data.eval], model_inputs(cfg), group, reuse)


def main(argv=None) -> int:
    return stage_main(argv, SFTConfig, run, "Supervised fine-tuning (response tokens only).")


if __name__ == "__main__":
    raise SystemExit(main())
