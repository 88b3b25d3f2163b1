"""Reference log-probabilities, computed once and cached on disk.

DPO-style losses need log pi_ref(y|x) of every training response. The reference model is
frozen, so these numbers depend only on (the exact token ids scored, the reference weights, the
precision): they are computed once before training, stored under
`<cache_dir>/<key>.safetensors`, and reused by every later run on the same data and reference
(the pairwise losses DPO, IPO, cDPO, robust DPO ... share one file). KTO scores other
sequences (each completion alone, and the mismatched KL rows) and its key names its parts, so it
keeps its own file, even on the same pairs. The reference model is never held in memory while
the policy trains.

The key hashes the token ids themselves (so it covers the data, the tokenizer, the chat template
and the truncation settings at once) together with `reference_id` (which model, which weights,
which precision).

Rows are stored by dataset position: column `"<part>/sum"` row i belongs to dataset row i, so a
training batch looks its values up by the `index` column its collator carries. A batch scored
here is `len(parts)` blocks of B rows in one (len(parts) * B, T) forward (e.g. chosen then
rejected, from `collate_pairwise`); each part stores the summed and length-averaged log-probs and
the token count of its rows.

With several ranks each rank scores its share (equal-count batches, as ZeRO-3 needs), rank 0
gathers and writes the file, and broadcasts the result, so ranks need no shared filesystem.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from align.cache import cache_dir as align_cache_dir
from align.engine.deepspeed_engine import rank, to_device, world_size
from align.models.logprobs import sequence_logprobs
from align.stage import eval_batches

log = logging.getLogger("direct.ref_cache")

VERSION = "ref-logps-v1"
STATS = ("sum", "mean", "tokens")
# Weight files larger than this are identified by (name, size, mtime) instead of a content hash.
_HASH_LIMIT = 256 * 1024**2

Columns = Dict[str, torch.Tensor]  # "<part>/<stat>" -> (N,) float32


def default_cache_dir() -> str:
    return align_cache_dir("ref_logps")


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


def dataset_digest(dataset, columns: Sequence[str]) -> str:
    """sha256 of the token-id columns of `dataset`, in row order (fast: hashes Arrow buffers)."""
    table = dataset.with_format("arrow")[:]
    h = hashlib.sha256(f"rows={len(dataset)}".encode())
    for name in columns:
        col = table.column(name).combine_chunks()
        h.update(name.encode())
        while hasattr(col, "value_lengths"):  # lists of ids, or lists of them (a ranking's responses)
            h.update(col.value_lengths().to_numpy(zero_copy_only=False).astype("int64").tobytes())
            col = col.flatten()
        h.update(col.to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return h.hexdigest()


def _hash_dir(path: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full) or not name.endswith((".json", ".safetensors", ".bin", ".model", ".txt")):
            continue
        stat = os.stat(full)
        h.update(f"{name}:{stat.st_size}".encode())
        if stat.st_size > _HASH_LIMIT:
            h.update(str(stat.st_mtime_ns).encode())
            continue
        with open(full, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def reference_id(model_cfg, seed: int, precision: str = "fp32") -> str:
    """What identifies the reference's log-probs: its weights (a content hash of a local
    directory; name and seed of a built-in model; name and revision of a hub model), dtype,
    attention implementation and the engine precision."""
    name = model_cfg.name_or_path
    if name.startswith("builtin:"):
        weights = f"{name}:seed={seed}"
    elif os.path.isdir(name):
        weights = f"dir:{_hash_dir(name)}"
    else:
        weights = f"hub:{name}@{model_cfg.revision or 'main'}"
    return f"{weights}|{model_cfg.dtype}|{model_cfg.attn_implementation}|{precision}"


def cache_key(digest: str, ref_id: str, parts: Sequence[str]) -> str:
    payload = json.dumps({"v": VERSION, "data": digest, "reference": ref_id, "parts": list(parts)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Computing
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_logps(model, dataset, collate: Callable, parts: Sequence[str], micro_batch_size: int,
                  padding_free: bool = False) -> Columns:
    """Log-probs of every row of `dataset` under `model` (an engine or a plain module).

    `collate(examples)` must return a batch of len(parts) blocks of B rows and an `index` (B,)
    column. Distributed: every rank scores its share and all ranks return the full columns.
    """
    index, values = [], {f"{p}/{s}": [] for p in parts for s in STATS}
    for batch in eval_batches(dataset, micro_batch_size, rank(), world_size(), collate):
        batch = to_device(batch)
        lp = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                               padding_free=padding_free)
        keep = batch["valid"].bool().cpu()
        n = keep.numel()
        for j, part in enumerate(parts):
            block = slice(j * n, (j + 1) * n)
            for stat, tensor in zip(STATS, (lp.sum, lp.mean, lp.num_tokens)):
                values[f"{part}/{stat}"].append(tensor[block].float().cpu()[keep])
        index.append(batch["index"].cpu()[keep])
    local = (torch.cat(index), {k: torch.cat(v) for k, v in values.items()})
    shares: List = [local]
    if dist.is_initialized() and world_size() > 1:
        shares = [None] * world_size()
        dist.all_gather_object(shares, local)
    columns = {k: torch.full((len(dataset),), float("nan")) for k in values}
    for idx, vals in shares:
        for k, v in vals.items():
            columns[k][idx] = v
    missing = torch.isnan(columns[f"{parts[0]}/sum"]).sum().item()
    if missing:
        raise RuntimeError(f"reference log-probs: {missing} rows were not scored")
    return columns


def _broadcast(obj):
    """rank 0's `obj` on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _save(path: str, columns: Columns, meta: Dict[str, str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in columns.items()}, tmp, metadata=meta)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _load(path: str) -> Columns:
    return load_file(path)


def load_or_compute(
    splits: Dict[str, object],
    *,
    ref_id: str,
    build_model: Callable[[], object],
    collate: Callable,
    parts: Sequence[str],
    token_columns: Sequence[str],
    micro_batch_size: int,
    cache_dir: Optional[str] = None,
    padding_free: bool = False,
    scope: Optional[Callable[[object], ContextManager]] = None,
) -> Tuple[Dict[str, Columns], Dict[str, dict]]:
    """Reference log-prob columns for each named dataset (e.g. "train", "eval"), from the cache
    or computed. The reference model is built by `build_model()` only when some split misses,
    used for every missing split, and freed before returning. `scope(model)`, when given, is a
    context the rows are scored inside (the LoRA policy with its adapter off, see direct.reference).

    Returns ({split: columns}, {split: {"path", "key", "computed"}}). All ranks must call it.
    """
    cache_dir = cache_dir or default_cache_dir()
    info, out = {}, {}
    for name, ds in splits.items():
        key = cache_key(dataset_digest(ds, token_columns), ref_id, parts)
        path = os.path.join(cache_dir, f"{key}.safetensors")
        hit = _broadcast(os.path.exists(path) if rank() == 0 else None)
        info[name] = {"key": key, "path": path, "computed": not hit, "rows": len(ds)}
    model = None
    try:
        for name, ds in splits.items():
            path = info[name]["path"]
            if info[name]["computed"]:
                if model is None:
                    model = build_model()
                started = time.perf_counter()
                with scope(model) if scope is not None else nullcontext():
                    columns = compute_logps(model, ds, collate, parts, micro_batch_size, padding_free)
                if rank() == 0:
                    _save(path, columns, {"reference": ref_id, "rows": str(len(ds)), "version": VERSION})
                log.info("reference log-probs of %d %s rows computed in %.1f s -> %s", len(ds), name,
                         time.perf_counter() - started, path)
                out[name] = columns
            else:
                out[name] = _broadcast(_load(path) if rank() == 0 else None)
                log.info("reference log-probs of %d %s rows: cache hit %s", len(ds), name, path)
            if len(out[name][f"{parts[0]}/sum"]) != len(ds):
                raise RuntimeError(f"{path}: {len(out[name][f'{parts[0]}/sum'])} rows cached, dataset has {len(ds)}")
    finally:
        # The reference is not kept: free it before the policy engine is built.
        del model
        gc.collect()
    return out, info


def lookup(columns: Columns, index: torch.Tensor, part: str, stat: str) -> torch.Tensor:
    """(B,) values of `part`/`stat` for the dataset rows `index`, on `index`'s device."""
    values = columns[f"{part}/{stat}"]
    return values[index.to(values.device)].to(index.device)
