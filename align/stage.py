"""What every training stage shares: the per-rank recipe skeleton and the driver loop.

A stage is a per-rank worker class (setup in `__init__`, then `plan`, `train_step`, `evaluate`,
`save_checkpoint`, `export`, `close`) plus a config. The skeleton that is the same in every
recipe (checkpoint directory, resume, save, export, close) is `StageWorker`; `run_recipe` is a
recipe's `run`. `run_stage` is the driver: it prepares the run directory, starts the worker group
on Ray, loops with a progress bar, logs, checkpoints and exports. The loop lives here once; the
stage files hold only their own math.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from align import run as runs
from align.config import DataConfig, SourceConfig, StageConfig, TrainConfig, to_dict
from align.data.errors import DataReport
from align.data.prepare import load_prepared
from align.data.sources import data_fingerprint, load_splits
from align.data.tokenize import tokenize_rows
from align.engine import deepspeed_engine as de
from align.tracking import Tracker

log = logging.getLogger("align.stage")


# ---------------------------------------------------------------------------------------------
# Per-rank helpers (run inside the actors)
# ---------------------------------------------------------------------------------------------


def load_tokenized(data_cfg: DataConfig, kind: str, tokenizer, seed: int):
    """(train, eval or None, report) tokenized rows; rank 0 fills the datasets cache first."""
    prepared = load_prepared(data_cfg, kind, tokenizer, seed)  # checked and cached by the driver
    if prepared is not None:
        return prepared

    def build():
        report = DataReport()
        train, evals = load_splits(data_cfg, kind, seed, report)
        train = tokenize_rows(train, kind, tokenizer, data_cfg, report)
        evals = tokenize_rows(evals, kind, tokenizer, data_cfg, report) if evals is not None else None
        return train, evals, report

    if de.rank() == 0:
        out = build()
        de.barrier_if_distributed()
        return out
    de.barrier_if_distributed()
    return build()


def load_prompts(source: SourceConfig, cfg: StageConfig, tokenizer):
    """Tokenized prompt rows (prompt_ids, prompt_text) of one source, like the training prompts."""
    data = dataclasses.replace(cfg.data, train=[source], eval=[], eval_fraction=0.0, packing=False)
    rows, _, _ = load_tokenized(data, "prompt", tokenizer, cfg.seed)
    return rows


def planned_steps(train: TrainConfig, batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps of the run: `max_steps`, or `epochs` passes over the data."""
    if train.max_steps > 0:
        return train.max_steps
    return max(1, int(math.ceil(train.epochs * batches_per_epoch / grad_accum)))


def eval_batches(dataset, micro_batch_size: int, rank: int, world_size: int,
                 collate: Callable[[List[dict]], Dict[str, torch.Tensor]]) -> Iterator[Dict[str, torch.Tensor]]:
    """This rank's share of `dataset` in micro-batches, every rank getting the same number.

    Equal counts matter under ZeRO-3, where each forward is a collective. Rows padded in to
    even the count are repeats of row 0 with `valid` = 0, so they add nothing to the metrics.
    """
    n = len(dataset)
    per_step = micro_batch_size * world_size
    total = int(math.ceil(n / per_step)) * per_step
    for start in range(0, total, per_step):
        idx = [start + rank * micro_batch_size + i for i in range(micro_batch_size)]
        valid = [i < n for i in idx]
        columns = dataset[[i if ok else 0 for i, ok in zip(idx, valid)]]
        examples = [dict(zip(columns, values)) for values in zip(*columns.values())]
        batch = collate(examples)
        batch["valid"] = torch.tensor(valid, dtype=torch.float32)
        yield batch


class Throughput:
    """Tokens per second between calls."""

    def __init__(self, start: Optional[float] = None):
        self.last = time.perf_counter() if start is None else start

    def tick(self, tokens: float) -> float:
        now = time.perf_counter()
        rate = tokens / max(now - self.last, 1e-9)
        self.last = now
        return rate


class StageWorker:
    """The per-rank skeleton of a training recipe: checkpoint directory, resume, save, export,
    close. A recipe subclasses it and sets `cfg`, `tokenizer`, `engine`, `batches` (a resumable
    BatchIterator) and `data_iter` before calling `resume()`; it writes `plan`, `train_step` and
    `evaluate` itself. No deeper hierarchy: anything else a recipe needs, it writes out.
    """

    cfg: StageConfig
    step: int = 0

    def checkpoint_dir(self) -> str:
        return os.path.join(self.cfg.run_dir, "checkpoints")

    def resume(self, restore_data: bool = True) -> None:
        """Restores the newest checkpoint when `train.resume` (the step, and with
        `restore_data` the data position); a fresh run starts at step 0."""
        self.step = 0
        if not self.cfg.train.resume:
            return
        state = de.load_checkpoint(self.engine, self.checkpoint_dir())
        if state is None:
            return
        self.step = state["step"]
        if restore_data:
            self.batches.load_state_dict(state["data"])
            self.data_iter = iter(self.batches)

    def save_checkpoint(self, step: int) -> str:
        return de.save_checkpoint(self.engine, self.checkpoint_dir(), step, {"data": self.batches.state_dict()},
                                  keep=self.cfg.train.keep_checkpoints)

    def export_config(self) -> Optional[Dict[str, Any]]:
        """Entries stored in the exported model's config.json (e.g. reward normalisation)."""
        return None

    def export(self, out_dir: str) -> Optional[str]:
        return de.export_hf(self.engine, self.tokenizer, out_dir, extra_config=self.export_config(),
                            merge=self.cfg.export.merge)

    def close(self) -> None:
        self.engine = None


def model_inputs(cfg: StageConfig) -> Optional[Dict[str, str]]:
    """The starting model as a run input (so a retrained upstream model reruns the stage)."""
    return None if cfg.model.name_or_path.startswith("builtin:") else {"model": cfg.model.name_or_path}


def run_recipe(stage: str, cfg: StageConfig, worker: Callable, sources: Sequence[SourceConfig],
               inputs: Optional[Dict[str, str]], group: Optional[str] = None, reuse: bool = True) -> Dict[str, Any]:
    """A recipe's `run`: fingerprints the data `sources` and drives `worker` with `run_stage`."""
    fingerprint = data_fingerprint(list(sources), cfg.seed)
    return run_stage(stage, cfg, worker, fingerprint, inputs=inputs, group_name=group, reuse=reuse)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


class GroupStage:
    """The driver's side of a stage that runs as one group of actors (sft, reward_model, dpo,
    kto): every call goes to the per-rank worker class on all ranks; rank 0 answers."""

    def __init__(self, name: str, cfg: StageConfig, worker: Callable):
        from align.engine.ray_group import ActorGroup, start_ray

        self.cfg, self.initial_eval = cfg, {}
        start_ray(cfg.ray)
        self.group = ActorGroup(name, cfg.ray)
        try:
            self.group.setup(worker, cfg)
            self._plan = self.group.call("plan")[0]
        except BaseException:
            self.shutdown()
            raise

    def plan(self) -> Dict[str, Any]:
        return dict(self._plan, eval_at_start=self.cfg.train.eval_before_training)

    def train_step(self, step: int) -> Dict[str, Any]:
        return self.group.call("train_step")[0]

    def evaluate(self, final: bool = False, start: bool = False) -> Dict[str, Any]:
        if final:
            return self.group.call("evaluate", final=True)[0]
        metrics = self.group.call("evaluate")[0]
        if start:
            self.initial_eval = metrics
        return metrics

    def save_checkpoint(self, step: int) -> None:
        self.group.call("save_checkpoint", step)

    def export(self, out_dir: str) -> None:
        self.group.call("export", out_dir)

    def summary(self) -> Dict[str, Any]:
        return {"initial_eval": self.initial_eval, **self._plan.get("summary", {})}

    def shutdown(self) -> None:
        self.group.shutdown()


@dataclass(frozen=True)
class OnDriver:
    """`run_stage`'s `worker` for a stage of several groups: `make(cfg)` builds its driver-side
    stage object (e.g. rlhf/rollout.py RolloutStage), which starts and calls its own groups."""

    make: Callable[[Any], Any]


def run_stage(stage: str, cfg: StageConfig, worker: Union[Callable, OnDriver], data_fingerprint: str,
              inputs: Optional[Dict[str, str]] = None, group_name: Optional[str] = None,
              reuse: bool = True) -> Dict[str, Any]:
    """Runs (or reuses) one training stage; returns its summary (also in DONE.json).

    `worker` is the stage's per-rank worker class, run on one group of actors (GroupStage), or
    `OnDriver(make)`. Either way the loop drives a stage object on the driver, which has
    `plan()` -> {total_steps, start_step, eval_at_start, progress_keys}, `train_step(step)`,
    `evaluate(final=..., start=...)`, `save_checkpoint(step)`, `export(dir)`, `summary()` (the
    stage's own summary fields) and `shutdown()`.
    """
    from align.precision import apply_precision_policy

    apply_precision_policy(cfg)  # bf16 on a CPU without bf16 hardware: fp32 or an error, before Ray
    inputs = runs.identify_inputs(inputs)
    if reuse:
        done = runs.finished(cfg, data_fingerprint, inputs)
        if done is not None:
            log.info("%s: reusing the finished run in %s", stage, cfg.run_dir)
            return dict(done, reused=True)
    run_dir = runs.prepare(cfg, stage, data_fingerprint, inputs)
    tracker = Tracker(cfg.tracking, run_dir.path, name=os.path.basename(os.path.abspath(cfg.run_dir)),
                      config=to_dict(cfg), group=group_name, job_type=stage)
    started = time.time()
    driven = None
    try:
        driven = worker.make(cfg) if isinstance(worker, OnDriver) else GroupStage(stage, cfg, worker)
        plan = driven.plan()
        runs.record_info(run_dir, data_report=driven.summary().get("data_report", {}))
        total, start = plan["total_steps"], plan["start_step"]
        if start:
            log.info("%s: resuming at step %d of %d", stage, start, total)
        elif plan["eval_at_start"]:
            tracker.log(driven.evaluate(start=True), 0)
        tokens, last, first_step_at = 0.0, {}, None
        costs = runs.CostLedger(run_dir.path, start)  # cost of the whole training, across resumes
        bar = tqdm(total=total, initial=start, desc=stage, dynamic_ncols=True, disable=None)
        for step in range(start + 1, total + 1):
            first_step_at = first_step_at or time.time()
            metrics = driven.train_step(step)
            tokens += metrics.get("tokens", 0.0)
            last = metrics
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.4g}" for k in plan.get("progress_keys", ["loss"])
                             if k in metrics})
            if step % cfg.train.log_every == 0 or step == total:
                tracker.log(metrics, step)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total:
                tracker.log(driven.evaluate(), step)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step != total:
                costs.checkpoint(step, tokens, time.time() - started)
                driven.save_checkpoint(step)
        bar.close()
        final = driven.evaluate(final=True)
        tracker.log(final, total)
        driven.export(run_dir.model)
        summary = {
            "stage": stage, "steps": total, "wall_time_s": round(time.time() - started, 2),
            "train_tokens": tokens, "model_dir": run_dir.model,
            "final_train": {k: v for k, v in last.items() if isinstance(v, (int, float))},
            "final_eval": final, **driven.summary(),
            # Start-up inside this call: run directory, Ray, actors, model load, reference pass.
            "startup_s": round(first_step_at - started, 2) if first_step_at else None,
            "first_step_at": first_step_at,  # Unix time the first step of this call began
        }
        totals = costs.totals(tokens, time.time() - started)
        summary.update(wall_time_s=totals["wall_time_s"], train_tokens=totals["train_tokens"],
                       cost_segments=totals["segments"])
        tracker.summary({f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float))})
        runs.finish(run_dir, summary)
        return summary
    finally:
        if driven is not None:
            driven.shutdown()
        tracker.finish()


def stage_main(argv: Optional[Sequence[str]], config_cls, run_fn: Callable, description: str) -> int:
    """`python -m <stage> [--config FILE] [--debug] [key=value ...]` for any stage.

    The config, the model paths and the data are checked here, before Ray starts; a user's
    mistake prints one line and exits 2, Ctrl-C exits 130 (see `align.errors.cli_main`).
    """
    from align.errors import cli_main

    return cli_main(lambda args: _stage_main(args, config_cls, run_fn, description),
                    list(sys.argv[1:] if argv is None else argv))


def _stage_main(argv: Sequence[str], config_cls, run_fn: Callable, description: str) -> int:
    import argparse
    import json

    from align.config import load_config
    from align.data.prepare import prepare_stage
    from align.precision import apply_precision_policy

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also ALIGN_DEBUG=1)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    cfg = load_config(config_cls, args.config, args.overrides)
    apply_precision_policy(cfg)  # one line (or a config error) before anything heavy starts
    prepare_stage(cfg)  # quiet: nothing is printed before a user's mistake
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = run_fn(cfg)
    print(json.dumps(summary, indent=2, default=str))
    return 0
