"""Session-wide test setup: every cache and tracker writes under a temporary directory."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory, worker_id):
    # Under pytest-xdist the workers share one cache (built-in data, the materialised real
    # model): its writers are atomic, and the real model is dequantised once, not per worker.
    base = tmp_path_factory.getbasetemp()
    root = base.parent / "shared-env" if worker_id != "master" else base / "env"
    root.mkdir(exist_ok=True)
    env = {
        "ALIGN_CACHE": str(root / "align-cache"),
        "HF_HOME": str(root / "hf"),
        "HF_DATASETS_CACHE": str(root / "hf" / "datasets"),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "wandb"),
        "RAY_AUTH_MODE": "disabled",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def builtin_tokenizer():
    from align.models.tokenizer import build_builtin_tokenizer

    return build_builtin_tokenizer()


@pytest.fixture(scope="session")
def ray_session(_isolated_environment):
    """One local Ray for the whole session (object store capped at 200 MiB), shut down at the end."""
    import ray

    from align.config import RayConfig
    from align.engine.ray_group import start_ray

    start_ray(RayConfig(object_store_memory=200 * 1024**2))
    yield
    ray.shutdown()


def quick_overrides(run_dir, **extra):
    """Overrides that keep a stage tiny and fast in tests (no wandb files, tiny model)."""
    base = {"run_dir": str(run_dir), "tracking.backend": "none", "model.name_or_path": "builtin:tiny-1m"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def sft_summary(ray_session, tmp_path_factory):
    """An SFT policy trained once per session on the default task (about 30 s); its summary.

    Reward-model, DPO, KTO and PPO tests start from its model, as the pipeline does.
    """
    from align.config import load_config
    from rlhf import sft

    run_dir = tmp_path_factory.mktemp("sft")
    cfg = load_config(sft.SFTConfig, "configs/sft/default.yaml", quick_overrides(
        run_dir, **{"train.max_steps": 150, "train.eval_every": 0, "train.save_every": 0, "final_samples": 32,
                    "train.eval_before_training": True}))
    return sft.run(cfg, reuse=False)


@pytest.fixture(scope="session")
def sft_model_dir(sft_summary):
    """The session SFT policy's directory (Hugging Face format)."""
    return sft_summary["model_dir"]


@pytest.fixture(scope="session")
def quick():
    """`quick(run_dir, **overrides)` -> list of key=value overrides for a tiny, fast stage."""
    return quick_overrides


# The longest modules (seconds on 2 quiet cores), started first so that the two xdist workers
# (`--dist loadscope`: a module stays on one worker) finish together instead of one waiting on a
# long module that was collected last.
LONGEST_FIRST = (
    "tests/test_pipeline_e2e.py",
    "tests/rlhf/test_ppo_stage.py",
    "tests/test_pipeline_sweeps.py",
    "tests/rlhf/test_grpo_stage.py",
    "tests/engine/test_parity.py",
    "tests/models/test_lora.py",
    "tests/errors/test_runtime_errors.py",
    "tests/direct/test_dpo_stage.py",
    "tests/rlhf/test_lora_ppo.py",
    "tests/errors/test_user_errors.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = str(config.rootpath) + "/"
    items.sort(key=lambda item: rank.get(str(item.path).replace(root, "", 1), len(rank)))
