"""A tiny training workload (one `ToyWorker` per rank): a smoke test of a Ray + DeepSpeed cluster, and the engine tests' workload.

    python -m tests.engine.toy_worker --actors 2 --zero 3            # local Ray
    python -m tests.engine.toy_worker --actors 4 --address auto      # an existing cluster

trains a built-in tiny model for a few steps on 1 actor and then on N actors with the same global
batch, prints both loss trajectories, and exits non-zero when they differ by more than float32
reduction order explains (relative 1e-5).

Each step draws its batch with `torch.randint` from the global torch RNG (random rows of random
length, a random prompt prefix left out of the loss), so a resumed run matches an uninterrupted
one only when the RNG state is restored. By default every rank draws the same *global* batch and
trains on its slice, so the global batch does not depend on the number of ranks; with
`rank_seeded=True` each rank seeds its RNG with `seed + rank` and draws its own micro-batches, as
rollouts do, so per-rank RNG state matters on resume.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from align.config import DeepSpeedConfig, ModelConfig, OptimConfig


class ToyWorker:
    """One rank of a toy causal-LM training run (built on every rank by `ActorGroup.setup`).

    `fail_at=(step, rank, how)` makes `rank` fail at the start of training step `step` (1-based)
    while the other ranks go on into the step's first collective: `how` is "raise" (ValueError
    "boom at step <step>") or "exit" (the process dies with `os._exit(1)`). It exists to test
    failure reporting.
    """

    def __init__(self, zero_stage: int = 0, micro_batch_size: int = 8, grad_accum_steps: int = 1,
                 seq_len: int = 16, model: str = "builtin:tiny-1m", seed: int = 0, lr: float = 1e-3,
                 scheduler: str = "constant", warmup_steps: int = 0, total_steps: int = 10,
                 rank_seeded: bool = False, fail_at: Optional[Sequence[Any]] = None):
        from align.engine import deepspeed_engine as de
        from align.models.builders import build_causal_lm
        from align.models.tokenizer import build_builtin_tokenizer

        self.de = de
        self.micro, self.gas, self.seq_len = micro_batch_size, grad_accum_steps, seq_len
        self.rank_seeded, self.fail_at = rank_seeded, tuple(fail_at) if fail_at else None
        tokenizer = build_builtin_tokenizer()
        self.pad_id = tokenizer.pad_token_id
        net = build_causal_lm(ModelConfig(name_or_path=model), tokenizer, seed=seed)
        ds = DeepSpeedConfig(zero_stage=zero_stage, micro_batch_size=micro_batch_size,
                             grad_accum_steps=grad_accum_steps, param_persistence_threshold=0)
        optim = OptimConfig(lr=lr, scheduler=scheduler, warmup_steps=warmup_steps)
        self.engine = de.init_train_engine(net, ds, optim, total_steps)
        de.seed_everything(seed + (de.rank() if rank_seeded else 0))
        self.step = 0

    # -- data -----------------------------------------------------------------------------------

    def _draw(self, rows: int) -> Dict[str, torch.Tensor]:
        """`rows` random rows of length seq_len/2..seq_len; loss on all but a random prefix."""
        T = self.seq_len
        ids = torch.randint(10, 500, (rows, T))
        lengths = torch.randint(T // 2, T + 1, (rows,))
        prompts = torch.randint(1, T // 4 + 1, (rows,))
        pos = torch.arange(T)[None, :]
        attention = (pos < lengths[:, None]).long()
        loss_mask = ((pos >= prompts[:, None]) & attention.bool()).long()
        ids = ids.masked_fill(attention == 0, self.pad_id)
        return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}

    def _local_micro_batches(self) -> List[Dict[str, torch.Tensor]]:
        de, local = self.de, self.micro * self.gas
        if self.rank_seeded:
            batch = self._draw(local)
        else:  # the same global batch on every rank; this rank trains on its slice
            full = self._draw(local * de.world_size())
            batch = {k: v[de.rank() * local:(de.rank() + 1) * local] for k, v in full.items()}
        return [{k: v[i * self.micro:(i + 1) * self.micro] for k, v in batch.items()} for i in range(self.gas)]

    # -- training -------------------------------------------------------------------------------

    def train_step(self) -> Dict[str, float]:
        """One optimizer step. `loss` is the global mean NLL per scored token and `grad_norm` the
        global gradient norm before clipping (None under ZeRO-0 in fp32); both are the same on
        every rank."""
        from align.models.logprobs import sequence_logprobs

        de, engine = self.de, self.engine
        batches = self._local_micro_batches()
        self._maybe_fail()
        local_tokens = sum(b["loss_mask"][:, 1:].sum() for b in batches).float()
        global_tokens = de.all_reduce_sum(local_tokens).item()
        # DeepSpeed divides each micro-batch's loss by grad_accum_steps in `backward` and averages
        # gradients over ranks: scaling by both makes the summed gradient that of the global mean.
        scale = de.world_size() * self.gas / global_tokens
        total_nll = torch.zeros(())
        for b in batches:
            nll = -sequence_logprobs(engine, b["input_ids"], b["attention_mask"], b["loss_mask"]).sum.sum()
            engine.backward(nll * scale)
            engine.step()
            total_nll += nll.detach()
        self.step += 1
        loss = de.all_reduce_sum(total_nll).item() / global_tokens
        norm = engine.get_global_grad_norm()  # None under ZeRO-0 in fp32: DeepSpeed does not record it
        return {"loss": loss, "grad_norm": None if norm is None else float(norm)}

    def train(self, steps: int) -> List[Dict[str, float]]:
        return [self.train_step() for _ in range(steps)]

    def _maybe_fail(self) -> None:
        if self.fail_at is None:
            return
        step, rank, how = self.fail_at
        if self.step + 1 == step and self.de.rank() == rank:
            if how == "exit":
                os._exit(1)
            raise ValueError(f"boom at step {step}")

    # -- checkpoints and inspection -------------------------------------------------------------

    def save(self, ckpt_dir: str, keep: int = 2) -> str:
        return self.de.save_checkpoint(self.engine, ckpt_dir, self.step, {"toy_step": self.step}, keep=keep)

    def load(self, ckpt_dir: str) -> Optional[int]:
        """Resumes from the newest checkpoint; returns its step (None when there is none)."""
        state = self.de.load_checkpoint(self.engine, ckpt_dir)
        if state is None:
            return None
        self.step = state["toy_step"]
        return self.step

    def weights(self) -> Optional[Dict[str, torch.Tensor]]:
        """Full weights on rank 0 (gathered under ZeRO-3); None on other ranks."""
        state = self.de.full_state_dict(self.engine)
        return None if state is None else {k: v.detach().clone().cpu() for k, v in state.items()}

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def memory(self) -> Dict[str, int]:
        """This rank's peak RSS and the bytes of model parameters, fp32 master copies and
        optimizer state it holds (ZeRO-3 holds only its partition of each)."""
        engine = self.engine
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        held = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]  # ZeRO-3: the partition
        param_bytes = sum(_nbytes(t) for t in held)
        # ZeRO-3 / ZeRO-1-2 keep fp32 master partitions; ZeRO-0 in fp32 updates the parameters.
        masters = (getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
                   or getattr(engine.optimizer, "single_partition_of_fp32_groups", None)
                   or [p for g in inner.param_groups for p in g["params"]])
        model_ptrs = {t.data_ptr() for t in held}
        master_bytes = sum(_nbytes(t) for t in masters if t.data_ptr() not in model_ptrs)
        optim_bytes = sum(_nbytes(t) for s in inner.state.values() for t in s.values() if torch.is_tensor(t))
        maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"max_rss_bytes": maxrss_kib * 1024, "param_bytes": param_bytes,
                "master_bytes": master_bytes, "optim_bytes": optim_bytes}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def train_toy(num_actors: int, steps: int, name: str = "toy", cpus_per_actor: float = 1.0,
              placement: str = "PACK", **role_kwargs: Any) -> List[Dict[str, float]]:
    """Trains a `ToyWorker` group of `num_actors` for `steps` steps on the running Ray; returns
    the per-step metrics (rank 0's; every rank reports the same). The group is shut down after."""
    from align.config import RayConfig
    from align.engine.ray_group import ActorGroup

    cfg = RayConfig(num_actors=num_actors, cpus_per_actor=cpus_per_actor, placement_strategy=placement)
    group = ActorGroup(name, cfg)
    try:
        group.setup(ToyWorker, **role_kwargs)
        return group.call("train", steps)[0]
    finally:
        group.shutdown()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from align.config import RayConfig
    from align.engine.ray_group import start_ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=8, help="must divide by --actors")
    parser.add_argument("--model", default="builtin:tiny-1m")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--placement", default="PACK", help="PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    parser.add_argument("--address", default=None, help="Ray address; a local Ray is started when absent")
    args = parser.parse_args(argv)
    if args.global_batch % args.actors:
        parser.error("--global-batch must be divisible by --actors")

    start_ray(RayConfig(address=args.address))
    runs = {}
    for n in (1, args.actors):
        metrics = train_toy(n, args.steps, f"toy-{n}", args.cpus_per_actor, args.placement, zero_stage=args.zero,
                            micro_batch_size=args.global_batch // n, model=args.model)
        runs[n] = [m["loss"] for m in metrics]
    worst = max(abs(a - b) / abs(a) for a, b in zip(runs[1], runs[args.actors]))
    for step, (a, b) in enumerate(zip(runs[1], runs[args.actors]), start=1):
        print(f"step {step}: 1 actor {a:.7f}   {args.actors} actors {b:.7f}")
    print(f"largest relative difference {worst:.2e} ({'ok' if worst <= 1e-5 else 'MISMATCH'})")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
