"""`align-run STAGE [--config FILE] [key=value ...]`: run one stage, or `main`, the default job.

Stages: sft, reward_model, dpo, kto, ppo, and label (preference data from a model's own samples; each also runs as `python -m <module>`).
A mistake in the config, the data or a model path prints one line, `error: ...`, and exits 2
before anything starts; a failure while running exits 1; Ctrl-C stops every actor and exits 130.
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

from align.errors import ConfigError, cli_main

# stage -> (module, default config, config class in that module)
STAGES = {
    "sft": ("rlhf.sft", "configs/sft/default.yaml", "SFTConfig"),
    "reward_model": ("reward_model.train", "configs/reward_model/default.yaml", "RMConfig"),
    "dpo": ("direct.dpo", "configs/dpo/default.yaml", "DPOConfig"),
    "kto": ("direct.kto", "configs/kto/default.yaml", "KTOConfig"),
    "ppo": ("rlhf.ppo", "configs/ppo/default.yaml", "PPOConfig"),
    # not a training stage: samples, scores and writes preference data (reward_model/label.py)
    "label": ("reward_model.label", "configs/label/default.yaml", "LabelConfig"),
}


def main(argv: Optional[List[str]] = None) -> int:
    return cli_main(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("main: the embedded default job, the pipeline of configs/pipeline/default.yaml "
              "(align-pipeline --help)")
        print("--debug (or ALIGN_DEBUG=1): show the traceback of a failure")
        return 0
    name, rest = argv[0], argv[1:]
    if name == "main":
        # lazy: the pipeline imports this module, and torch and datasets, which a stage or --help never needs
        from launch import pipeline

        return pipeline.main(rest)
    if name not in STAGES:
        raise ConfigError(f"command line: unknown stage {name!r}; choose from {sorted(STAGES)} or 'main'")
    return importlib.import_module(STAGES[name][0]).main(rest)


def config_class(stage: str):
    """The config dataclass of `stage`."""
    return getattr(importlib.import_module(STAGES[stage][0]), STAGES[stage][2])


if __name__ == "__main__":
    raise SystemExit(main())
