"""Measures the distributed engine on this machine and prints markdown tables (nothing asserted).

    .venv/bin/python benchmarks/engine_measure.py

1. Start-up: `start_ray` and a 2-actor ZeRO-3 group (actors started, process group joined,
   DeepSpeed engine built) with the toy worker (tests/engine/toy_worker.py) on builtin:tiny-1m.
2. Step time of 2 actors under ZeRO-0/2/3: builtin:tiny-8m, micro-batch 8, sequences of 64
   tokens, fp32, gloo; mean of 5 steps after 2 warm-up steps, timed from the driver.
3. Memory under ZeRO-3 with builtin:tiny-30m on 1 and 2 ranks: each rank's peak RSS
   (ru_maxrss, which includes torch/DeepSpeed themselves) and the bytes of model parameters,
   fp32 master partitions and AdamW state that rank holds.

Timings depend on what else runs on the machine; the load average is printed with them.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.engine.toy_worker

import ray  # noqa: E402

from align.config import RayConfig  # noqa: E402
from align.engine.ray_group import ActorGroup, start_ray  # noqa: E402
from tests.engine.toy_worker import ToyWorker  # noqa: E402

MIB = 1024**2


def _group(name: str, n: int, **role) -> ActorGroup:
    group = ActorGroup(name, RayConfig(num_actors=n, cpus_per_actor=os.cpu_count() / n))
    group.setup(ToyWorker, **role)
    return group


def startup() -> dict:
    t0 = time.perf_counter()
    start_ray(RayConfig(object_store_memory=200 * MIB))
    t1 = time.perf_counter()
    group = _group("startup", 2, zero_stage=3)
    t2 = time.perf_counter()
    group.shutdown()
    return {"ray": t1 - t0, "group": t2 - t1}


def step_times(steps: int = 5, warmup: int = 2) -> dict:
    out = {}
    for zero in (0, 2, 3):
        group = _group(f"steps-zero{zero}", 2, zero_stage=zero, model="builtin:tiny-8m", micro_batch_size=8,
                       seq_len=64, total_steps=steps + warmup)
        try:
            group.call("train", warmup)
            t0 = time.perf_counter()
            group.call("train", steps)
            out[zero] = (time.perf_counter() - t0) / steps
        finally:
            group.shutdown()
    return out


def memory() -> dict:
    out = {}
    for n in (1, 2):
        group = _group(f"memory-{n}", n, zero_stage=3, model="builtin:tiny-30m", micro_batch_size=8 // n,
                       seq_len=64)
        try:
            group.call("train", 2)
            out[n] = group.call("memory")
        finally:
            group.shutdown()
    return out


def main() -> None:
    load_before = os.getloadavg()[0]
    start = startup()
    steps = step_times()
    mem = memory()
    load_after = os.getloadavg()[0]
    ray.shutdown()

    print(f"\n{os.cpu_count()} CPU cores; 1-minute load average {load_before:.1f} before, {load_after:.1f} after\n")
    print("| start-up | seconds |\n|---|---|")
    print(f"| `start_ray` (local, 2 CPUs) | {start['ray']:.1f} |")
    print(f"| 2-actor ZeRO-3 group (actors + process group + engine, tiny-1m) | {start['group']:.1f} |")
    print("\n| 2 actors, tiny-8m, micro 8, seq 64 | s / step |\n|---|---|")
    for zero, seconds in steps.items():
        print(f"| ZeRO-{zero} | {seconds:.3f} |")
    print("\n| ZeRO-3, tiny-30m | ranks | peak RSS / rank (MiB) | params / rank (MiB) | fp32 master / rank (MiB) "
          "| AdamW state / rank (MiB) | params + master + state / rank (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for n, ranks in mem.items():
        for r, m in enumerate(ranks):
            total = m["param_bytes"] + m["master_bytes"] + m["optim_bytes"]
            print(f"| rank {r} | {n} | {m['max_rss_bytes'] / MIB:.0f} | {m['param_bytes'] / MIB:.1f} "
                  f"| {m['master_bytes'] / MIB:.1f} | {m['optim_bytes'] / MIB:.1f} | {total / MIB:.1f} |")
    one = sum(mem[1][0][k] for k in ("param_bytes", "master_bytes", "optim_bytes"))
    two = max(sum(m[k] for k in ("param_bytes", "master_bytes", "optim_bytes")) for m in mem[2])
    print(f"\nper-rank params + master + optimizer state, 2 ranks / 1 rank: {two / one:.3f}")


if __name__ == "__main__":
    main()
