"""Session-wide test setup: every cache and tracker writes under a temporary directory."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory):
    root = tmp_path_factory.mktemp("env")
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
