"""`align-run STAGE [--config FILE] [key=value ...]`: run one stage, or `main`, the default job.

Stages: sft, reward_model, dpo, kto, ppo (each also runs as `python -m <module>`).
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

# stage -> (module, default config, config class in that module)
STAGES = {
    "sft": ("rlhf.sft", "configs/sft/default.yaml", "SFTConfig"),
    "reward_model": ("reward_model.train", "configs/reward_model/default.yaml", "RMConfig"),
    "dpo": ("direct.dpo", "configs/dpo/default.yaml", "DPOConfig"),
    "kto": ("direct.kto", "configs/kto/default.yaml", "KTOConfig"),
    "ppo": ("rlhf.ppo", "configs/ppo/default.yaml", "PPOConfig"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("main: the embedded default job (currently the SFT stage on the built-in task)")
        return 0
    name, rest = argv[0], argv[1:]
    if name == "main":
        pipeline = _optional("launch.pipeline")
        if pipeline is not None:
            return pipeline.main(rest)
        name = "sft"
        rest = ["--config", STAGES["sft"][1], *rest] if "--config" not in rest else rest
    if name not in STAGES:
        print(f"unknown stage {name!r}; choose from {sorted(STAGES)} or 'main'", file=sys.stderr)
        return 2
    module = _optional(STAGES[name][0])
    if module is None:
        print(f"stage {name!r} is not available in this version", file=sys.stderr)
        return 2
    return module.main(rest)


def config_class(stage: str):
    """The config dataclass of `stage`, or None when the stage is not in this version."""
    module = _optional(STAGES[stage][0])
    return getattr(module, STAGES[stage][2], None) if module is not None else None


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:
            return None
        raise


if __name__ == "__main__":
    raise SystemExit(main())
