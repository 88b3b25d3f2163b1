"""The shared data layer: rows from files or hub datasets -> validated, normalised rows ->
token ids -> padded batches. Imports torch and datasets, never DeepSpeed or Ray.

    rows = load_rows(cfg.data.train, "pairwise", cfg.data, cfg.seed)      # sources.py, formats.py
    train, evals = load_splits(cfg.data, "pairwise", cfg.seed)           # with the eval split
    tokens = tokenize_rows(rows, "pairwise", tokenizer, cfg.data)         # tokenize.py
    batches = BatchIterator(tokens, micro_batch, cfg.seed, rank, world,   # batching.py
                            groups=tokens["group"],
                            collate_fn=lambda ex: collate_pairwise(ex, tokenizer.pad_token_id))
"""

from align.data.batching import BatchIterator, group_units
from align.data.collate import collate_binary, collate_pairwise, collate_prompts, collate_sft
from align.data.errors import DataError, DataReport
from align.data.formats import KINDS, expand_pairs
from align.data.sources import data_fingerprint, load_rows, load_source, load_splits, resolve_builtin
from align.data.tokenize import pack_sft, tokenize_rows

__all__ = [
    "KINDS", "BatchIterator", "DataError", "DataReport", "collate_binary", "collate_pairwise",
    "collate_prompts", "collate_sft", "data_fingerprint", "expand_pairs", "group_units", "load_rows",
    "load_source", "load_splits", "pack_sft", "resolve_builtin", "tokenize_rows",
]
