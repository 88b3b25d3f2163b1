"""Data checked and tokenized once, on the driver, before Ray or DeepSpeed starts.

A data mistake (a bad row, a truncated JSON line, an empty file) then stops the command in a
few seconds with one line naming the file, row and field, instead of inside an actor after the
whole start-up. The validated, tokenized splits are written to a cache that the actors read
(`align.stage.load_tokenized` calls `load_prepared` first), so the work is not done twice:

    $ALIGN_CACHE/prepared/<key>/{train,eval}/   datasets `save_to_disk` folders
    $ALIGN_CACHE/prepared/<key>/report.json     the DataReport (dropped / truncated counts)

The key hashes the data fingerprint (each source's settings and file bytes, the seed), the
tokenizer's identity (its serialised vocabulary, merges, special tokens and chat template), the
data config and the kind. A tokenizer without a serialisable fast backend gets no key: its
actors tokenize for themselves, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import datasets

from align.config import DataConfig, SourceConfig
from align.data.errors import DataReport
from align.data.sources import data_fingerprint, load_splits
from align.data.tokenize import tokenize_rows
from align.errors import ModelSourceError, require
from align.models.builders import build_tokenizer

log = logging.getLogger("align.data")

_VERSION = "prepared-v1"  # bump when the tokenized schema or the checks change


def cache_root() -> str:
    base = os.environ.get("ALIGN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "align-stack"))
    return os.path.join(base, "prepared")


def tokenizer_identity(tokenizer) -> Optional[str]:
    """A hash of everything that decides the token ids, or None when it cannot be serialised."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(backend.to_str().encode())
    extra = {"chat_template": getattr(tokenizer, "chat_template", None), "eos": tokenizer.eos_token_id,
             "special": sorted(map(str, getattr(tokenizer, "all_special_tokens", [])))}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(data_cfg: DataConfig, kind: str, tokenizer, seed: int) -> Optional[str]:
    tok = tokenizer_identity(tokenizer)
    if tok is None:
        return None
    fields = {"version": _VERSION, "kind": kind, "seed": seed, "tokenizer": tok,
              "data": data_fingerprint([*data_cfg.train, *data_cfg.eval], seed),
              "config": dataclasses.asdict(data_cfg)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


def tokenized(data_cfg: DataConfig, kind: str, tokenizer, seed: int):
    """(train, eval or None, report): rows loaded, checked, normalised and tokenized."""
    report = DataReport()
    train, evals = load_splits(data_cfg, kind, seed, report)
    train = tokenize_rows(train, kind, tokenizer, data_cfg, report)
    evals = tokenize_rows(evals, kind, tokenizer, data_cfg, report) if evals is not None else None
    return train, evals, report


def load_prepared(data_cfg: DataConfig, kind: str, tokenizer, seed: int):
    """The cached (train, eval or None, report) written by `prepare`, or None on a miss."""
    key = cache_key(data_cfg, kind, tokenizer, seed)
    if key is None:
        return None
    path = os.path.join(cache_root(), key)
    if not os.path.exists(os.path.join(path, "report.json")):  # written last: the entry is whole
        return None
    with open(os.path.join(path, "report.json")) as fh:
        report = DataReport(json.load(fh))
    train = datasets.load_from_disk(os.path.join(path, "train"))
    evals = datasets.load_from_disk(os.path.join(path, "eval")) if os.path.isdir(os.path.join(path, "eval")) else None
    log.info("%s data: %d rows from the prepared cache %s", kind, len(train), path)
    return train, evals, report


def prepare(data_cfg: DataConfig, kind: str, tokenizer, seed: int):
    """Checks and tokenizes the data (raising DataError on a bad row) and caches the result."""
    cached = load_prepared(data_cfg, kind, tokenizer, seed)
    if cached is not None:
        return cached
    train, evals, report = tokenized(data_cfg, kind, tokenizer, seed)
    key = cache_key(data_cfg, kind, tokenizer, seed)
    if key is not None:
        root = cache_root()
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
        try:
            train.save_to_disk(os.path.join(tmp, "train"))
            if evals is not None:
                evals.save_to_disk(os.path.join(tmp, "eval"))
            with open(os.path.join(tmp, "report.json"), "w") as fh:
                json.dump(dict(report), fh)
            os.rename(tmp, os.path.join(root, key))  # atomic; a concurrent writer's entry is as good
        except OSError:
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return train, evals, report


# ---------------------------------------------------------------------------------------------
# What a stage reads, and checks of its model paths
# ---------------------------------------------------------------------------------------------

# The data kind of each stage's config class, where the config has no `data_kind` field.
_KIND_OF_CONFIG = {"SFTConfig": "sft", "DPOConfig": "pairwise", "PPOConfig": "prompt", "LabelConfig": "prompt"}


def stage_data(cfg: Any) -> List[Tuple[DataConfig, str]]:
    """(data config, kind) of everything a stage's workers load with `load_tokenized`."""
    kind = getattr(cfg, "data_kind", None) or _KIND_OF_CONFIG.get(type(cfg).__name__)
    if kind is None:
        return []
    jobs = [(cfg.data, kind)]
    prompts = getattr(cfg, "eval_prompts", None)
    if isinstance(prompts, SourceConfig) and getattr(cfg, "final_samples", 0):
        # align.stage.load_prompts: the held-out prompts, tokenized like the training prompts.
        jobs.append((dataclasses.replace(cfg.data, train=[prompts], eval=[], eval_fraction=0.0, packing=False),
                     "prompt"))
    return jobs


def _model_paths(cfg: Any) -> List[Tuple[str, str]]:
    model = getattr(cfg, "model", None)
    out = [("model.name_or_path", getattr(model, "name_or_path", None)),
           ("model.tokenizer", getattr(model, "tokenizer", None))]
    out += [(key, getattr(cfg, key, None)) for key in ("reference", "reward_model", "value_model", "reference_model")]
    return [(k, v) for k, v in out if isinstance(v, str) and v]


def _looks_local(path: str) -> bool:
    """A path the user meant as a file or folder, not a hub name like "org/model"."""
    if path.startswith((".", "/", "~")) or path.count("/") >= 2 or path.endswith((".gguf", ".safetensors", ".bin")):
        return True
    first = path.split("/")[0]
    return "/" in path and os.path.isdir(first)


def check_model_source(key: str, path: str) -> None:
    """ModelSourceError for a local model path that does not exist; MissingExtraError for a
    GGUF file without the `gguf` package (transformers needs it, and accelerate, to read one)."""
    if path.startswith("builtin:"):
        return
    local = os.path.expanduser(path)
    if _looks_local(path) and not os.path.exists(local):
        raise ModelSourceError(f"{key}: {path}: no such file or directory")
    if path.endswith(".gguf") or (os.path.isdir(local) and any(n.endswith(".gguf") for n in os.listdir(local))):
        require("gguf", "reading a GGUF model file", "pip install gguf accelerate")
        require("accelerate", "reading a GGUF model file", "pip install gguf accelerate")


def check_models(cfg: Any, skip: Tuple[str, ...] = ()) -> None:
    for key, path in _model_paths(cfg):
        if key not in skip:
            check_model_source(key, path)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No datasets progress bars while checking: a user's mistake must print one line only."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def tokenizer_for(cfg: Any):
    """The stage's tokenizer, as its workers build it; a path that cannot be read is the user's."""
    try:
        return build_tokenizer(cfg.model)
    except OSError as err:  # transformers: not found, not a model folder, no network
        key = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
        name = cfg.model.tokenizer or cfg.model.name_or_path
        raise ModelSourceError(f"{key}: cannot load a tokenizer from {name}: "
                               f"{' '.join(str(err).split())}") from None


def check_data(cfg: Any, skip: Sequence[str] = ()) -> None:
    """Loads and checks every row the stage reads, without a tokenizer (see `prepare_stage`);
    a data config with a source among `skip` (files an upstream stage has yet to write) is left
    for `prepare_stage`, which runs once they exist."""
    with _quiet_progress():
        for data_cfg, kind in stage_data(cfg):
            if not any(s.path in skip for s in [*data_cfg.train, *data_cfg.eval]):
                load_splits(data_cfg, kind, cfg.seed)


def prepare_stage(cfg: Any) -> None:
    """The driver's checks before a stage starts: model paths, then every row it reads, checked
    and tokenized with the stage's tokenizer into the cache its actors read."""
    check_models(cfg)
    jobs = stage_data(cfg)
    if not jobs:
        return
    check_data(cfg)  # rows first: a bad row is reported without loading a tokenizer (~1-2 s)
    tokenizer = tokenizer_for(cfg)
    with _quiet_progress():
        for data_cfg, kind in jobs:
            prepare(data_cfg, kind, tokenizer, cfg.seed)
