"""One reward model trained per session from the session SFT model; the stage and scoring
tests all assert on it."""

import pytest

# Short enough for CI, long enough for >= 0.85 gold agreement on the default task (0.90 measured).
# Warm-up 5 keeps the LR of the first 3 steps independent of max_steps (the ZeRO-2 test needs that).
RM_TEST_OVERRIDES = {"train.max_steps": 40, "optim.lr": 1e-3, "optim.warmup_steps": 5, "train.log_every": 1,
                     "train.eval_every": 0, "train.save_every": 0, "deepspeed.micro_batch_size": 32}


@pytest.fixture(scope="session")
def rm_overrides(sft_model_dir, quick):
    """`rm_overrides(run_dir, **extra)`: the trained RM's settings, with changes."""

    def overrides(run_dir, **extra):
        return quick(run_dir, **{**RM_TEST_OVERRIDES, "model.name_or_path": sft_model_dir, **extra})

    return overrides


@pytest.fixture(scope="session")
def rm_run(rm_overrides, tmp_path_factory):
    """(summary, run_dir) of a reward model trained with RM_TEST_OVERRIDES (1 actor, ZeRO 0)."""
    from align.config import load_config
    from reward_model import train

    run_dir = tmp_path_factory.mktemp("rm")
    cfg = load_config(train.RMConfig, "configs/reward_model/default.yaml", rm_overrides(run_dir))
    return train.run(cfg, reuse=False), str(run_dir)
