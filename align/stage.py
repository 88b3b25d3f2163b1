"""What every training stage shares: the driver loop and a few per-rank helpers.

A stage is a per-rank worker class (setup in `__init__`, then `train_step`, `evaluate`,
`save_checkpoint`, `export`) plus a config. `run_stage` is the driver: it prepares the run
directory, starts the worker group on Ray, loops with a progress bar, logs, checkpoints and
exports. The loop lives here once; the stage files hold only their own math.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

from align.config import DataConfig, StageConfig, TrainConfig, to_dict

log = logging.getLogger("align.stage")


# ---------------------------------------------------------------------------------------------
# Per-rank helpers (run inside the actors)
# ---------------------------------------------------------------------------------------------


def load_tokenized(data_cfg: DataConfig, kind: str, tokenizer, seed: int):
    """(train, eval or None, report) tokenized rows; rank 0 fills the datasets cache first."""
    from align.data.errors import DataReport
    from align.data.sources import load_splits
    from align.data.tokenize import tokenize_rows
    from align.engine.deepspeed_engine import barrier_if_distributed, rank

    def build():
        report = DataReport()
        train, evals = load_splits(data_cfg, kind, seed, report)
        train = tokenize_rows(train, kind, tokenizer, data_cfg, report)
        evals = tokenize_rows(evals, kind, tokenizer, data_cfg, report) if evals is not None else None
        return train, evals, report

    if rank() == 0:
        out = build()
        barrier_if_distributed()
        return out
    barrier_if_distributed()
    return build()


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

    def __init__(self):
        self.last = time.perf_counter()

    def tick(self, tokens: float) -> float:
        now = time.perf_counter()
        rate = tokens / max(now - self.last, 1e-9)
        self.last = now
        return rate


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def run_stage(stage: str, cfg: StageConfig, worker: Callable, data_fingerprint: str,
              inputs: Optional[Dict[str, str]] = None, group_name: Optional[str] = None,
              reuse: bool = True) -> Dict[str, Any]:
    """Runs (or reuses) one training stage; returns its summary (also in DONE.json)."""
    from tqdm.auto import tqdm

    from align import run as runs
    from align.engine.ray_group import ActorGroup, start_ray
    from align.tracking import Tracker

    inputs = runs.identify_inputs(inputs)
    if reuse:
        done = runs.finished(cfg, data_fingerprint, inputs)
        if done is not None:
            log.info("%s: reusing the finished run in %s", stage, cfg.run_dir)
            return dict(done, reused=True)
    run_dir = runs.prepare(cfg, stage, data_fingerprint, inputs)
    tracker = Tracker(cfg.tracking, run_dir.path, name=os.path.basename(os.path.abspath(cfg.run_dir)),
                      config=to_dict(cfg), group=group_name, job_type=stage)
    start_ray(cfg.ray)
    started = time.time()
    group = ActorGroup(stage, cfg.ray)
    try:
        group.setup(worker, cfg)
        plan = group.call("plan")[0]
        total, start = plan["total_steps"], plan["start_step"]
        if start:
            log.info("%s: resuming at step %d of %d", stage, start, total)
        initial = {}
        if cfg.train.eval_before_training and start == 0:
            initial = group.call("evaluate")[0]
            tracker.log(initial, 0)
        tokens, last = 0.0, {}
        costs = runs.CostLedger(run_dir.path, start)  # cost of the whole training, across resumes
        bar = tqdm(total=total, initial=start, desc=stage, dynamic_ncols=True, disable=None)
        for step in range(start + 1, total + 1):
            metrics = group.call("train_step")[0]
            tokens += metrics.get("tokens", 0.0)
            last = metrics
            bar.update(1)
            bar.set_postfix({k: f"{metrics[k]:.4g}" for k in plan.get("progress_keys", ["loss"]) if k in metrics})
            if step % cfg.train.log_every == 0 or step == total:
                tracker.log(metrics, step)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total:
                tracker.log(group.call("evaluate")[0], step)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step != total:
                costs.checkpoint(step, tokens, time.time() - started)
                group.call("save_checkpoint", step)
        bar.close()
        final = group.call("evaluate", final=True)[0]
        tracker.log(final, total)
        group.call("export", run_dir.model)
        summary = {
            "stage": stage, "steps": total, "wall_time_s": round(time.time() - started, 2),
            "train_tokens": tokens, "model_dir": run_dir.model,
            "final_train": {k: v for k, v in last.items() if isinstance(v, (int, float))},
            "initial_eval": initial, "final_eval": final, **plan.get("summary", {}),
        }
        totals = costs.totals(tokens, time.time() - started)
        summary.update(wall_time_s=totals["wall_time_s"], train_tokens=totals["train_tokens"],
                       cost_segments=totals["segments"])
        tracker.summary({f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float))})
        runs.finish(run_dir, summary)
        return summary
    finally:
        group.shutdown()
        tracker.finish()


def stage_main(argv: Optional[Sequence[str]], config_cls, run_fn: Callable, description: str) -> int:
    """`python -m <stage> [--config FILE] [key=value ...]` for any stage."""
    import argparse
    import json

    from align.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"config error: {err}\n")
    summary = run_fn(cfg)
    print(json.dumps(summary, indent=2, default=str))
    return 0
