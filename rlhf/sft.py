"""Supervised fine-tuning: the first stage of the RLHF pipeline.

Loss: mean negative log-likelihood over all response tokens of the global batch (prompt tokens
masked), not a mean of per-micro-batch means, so it does not depend on how the batch is split
across micro-batches and ranks.

    python -m rlhf.sft --config configs/sft/default.yaml optim.lr=3e-4
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional

import torch

from align.config import DataConfig, SourceConfig, StageConfig
from align.generation import SamplingConfig


def _default_sft_data() -> DataConfig:
    return DataConfig(train=[SourceConfig(path="builtin:sft")], eval=[SourceConfig(path="builtin:sft_eval")],
                      max_length=128, max_prompt_length=48)


@dataclass
class SFTConfig(StageConfig):
    data: DataConfig = field(default_factory=_default_sft_data)
    # At the end, sample this many eval prompts and report fluency / gold score (0: skip).
    final_samples: int = 32
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))


class SFTWorker:
    """One rank of the SFT stage."""

    def __init__(self, cfg: SFTConfig):
        from align.data.batching import BatchIterator
        from align.data.collate import collate_sft
        from align.data.tokenize import pack_sft
        from align.engine import deepspeed_engine as de
        from align.models.builders import build_causal_lm, build_tokenizer
        from align.stage import load_tokenized, planned_steps

        self.cfg, self.de = cfg, de
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
        self.step = 0
        if cfg.train.resume:
            state = de.load_checkpoint(self.engine, self._ckpt_dir())
            if state is not None:
                self.step = state["step"]
                self.batches.load_state_dict(state["data"])
                self.data_iter = iter(self.batches)
        self.throughput = None

    def _ckpt_dir(self) -> str:
        import os

        return os.path.join(self.cfg.run_dir, "checkpoints")

    def plan(self) -> Dict[str, Any]:
        return {"total_steps": self.total_steps, "start_step": self.step, "progress_keys": ["loss", "tokens_per_s"],
                "summary": {"train_rows": len(self.batches.dataset), "data_report": dict(self.report)}}

    def train_step(self) -> Dict[str, float]:
        from align.models.logprobs import sequence_logprobs
        from align.stage import Throughput

        de, engine = self.de, self.engine
        self.throughput = self.throughput or Throughput()
        batches = [de.to_device(next(self.data_iter)) for _ in range(self.cfg.deepspeed.grad_accum_steps)]
        # The global response-token count makes every micro-batch's loss a share of one mean.
        local_tokens = sum(float(b["loss_mask"][:, 1:].sum()) for b in batches)
        global_tokens = de.all_reduce_sum(torch.tensor(local_tokens, device=de.device())).item()
        scale = de.world_size() * len(batches) / max(global_tokens, 1.0)
        total_nll = 0.0
        for b in batches:
            lp = sequence_logprobs(engine, b["input_ids"], b["attention_mask"], b["loss_mask"],
                                   position_ids=b.get("position_ids"), padding_free=self.cfg.model.padding_free)
            nll = -lp.sum.sum()
            # DeepSpeed divides by grad-accumulation steps and averages over ranks; undo both.
            engine.backward(nll * scale)
            de.optimizer_step(engine)
            total_nll += nll.item()
        self.step += 1
        loss = de.all_reduce_sum(torch.tensor(total_nll, device=de.device())).item() / max(global_tokens, 1.0)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), **de.step_metrics(engine),
                "tokens": global_tokens, "tokens_per_s": self.throughput.tick(global_tokens)}

    @torch.no_grad()
    def evaluate(self, final: bool = False) -> Dict[str, float]:
        from align.models.logprobs import sequence_logprobs
        from align.stage import eval_batches

        if self.eval_rows is None:
            return {}
        de, engine = self.de, self.engine
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

    def _sample_metrics(self) -> Dict[str, float]:
        """Fluency and gold score of samples on eval prompts (when the task has a gold scorer)."""
        from align.generation import sample
        from align.task import gold_scorer_for

        rows = self.eval_rows.select(range(min(self.cfg.final_samples, len(self.eval_rows))))
        prompts: List[List[int]] = [ids[: mask.index(1)] for ids, mask in zip(rows["input_ids"], rows["loss_mask"])]
        gen = partial(self.de.generate, self.engine)
        out = sample(gen, self.tokenizer, prompts, self.cfg.sampling, seed=self.cfg.seed, device=self.de.device())
        metrics = {"samples/eos_rate": sum(out.ended_with_eos) / len(out.texts),
                   "samples/length": statistics.mean(len(r) for r in out.response_ids)}
        scorer = gold_scorer_for(s.path for s in self.cfg.data.train)
        if scorer is not None:
            from align.task.synthetic import is_fluent

            metrics["samples/fluent"] = sum(map(is_fluent, out.texts)) / len(out.texts)
            metrics["samples/gold"] = statistics.mean(scorer("", t) for t in out.texts)
        if self.de.rank() == 0:
            metrics["samples/examples"] = out.texts[:3]
        return metrics

    def save_checkpoint(self, step: int) -> str:
        return self.de.save_checkpoint(self.engine, self._ckpt_dir(), step, {"data": self.batches.state_dict()},
                                       keep=self.cfg.train.keep_checkpoints)

    def export(self, out_dir: str) -> Optional[str]:
        return self.de.export_hf(self.engine, self.tokenizer, out_dir)

    def close(self) -> None:
        self.engine = None


def run(cfg: SFTConfig, reuse: bool = True, group: Optional[str] = None) -> Dict[str, Any]:
    from align.data.sources import data_fingerprint
    from align.stage import run_stage

    fingerprint = data_fingerprint([*cfg.data.train, *cfg.data.eval], cfg.seed)
    inputs = None if cfg.model.name_or_path.startswith("builtin:") else {"model": cfg.model.name_or_path}
    return run_stage("sft", cfg, SFTWorker, fingerprint, inputs=inputs, group_name=group, reuse=reuse)


def main(argv=None) -> int:
    from align.stage import stage_main

    return stage_main(argv, SFTConfig, run, "Supervised fine-tuning (response tokens only).")


if __name__ == "__main__":
    raise SystemExit(main())
