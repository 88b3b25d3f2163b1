"""`python -m align.engine.build_ops`: compiles the DeepSpeed ops a run needs, ahead of time.

On CPU that is deepspeed_shm_comm, which `deepspeed.init_distributed` would otherwise build on
the first run (about 20-60 s, under a lock that a killed build leaves behind). launch/env.sh runs
this once per environment. A stale lock from an interrupted earlier build is cleared first.
"""

from __future__ import annotations

import os
import sys

import torch

from align.engine.deepspeed_engine import CPU_OPS, op_build_dir
from align.waits import clear_stale_lock


def main() -> int:
    if torch.cuda.is_available():
        return 0  # GPU ops are built by DeepSpeed's installer or on first use, per op
    from deepspeed.accelerator import get_accelerator  # heavy: only on CPU, where an op is built

    builders = {"deepspeed_shm_comm": "ShareMemCommBuilder"}
    for op in CPU_OPS:
        clear_stale_lock(os.path.join(op_build_dir(op), "lock"))
        get_accelerator().create_op_builder(builders[op]).load(verbose=False)
        print(f"[env] built {op} in {op_build_dir(op)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
