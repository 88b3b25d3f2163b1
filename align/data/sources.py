"""Loading rows from local files, directories, Hugging Face datasets and the built-in task.

A source's `path` is one of:
- a local .json / .jsonl / .parquet / .csv file (its only split is "train");
- a local directory of such files with no split names in their names: every file is read on
  its own (so errors name the file) and together they form the split "train";
- anything else (a hub dataset name, or a local folder laid out like one: split-named files,
  a README with configs, a `save_to_disk` folder): `datasets.load_dataset(path, subset,
  split=..., revision=...)`;
- "builtin:<name>": a split of the embedded default task, written by `align.task.synthetic`.

`split` takes `datasets` split strings ("train", "train[:100]", "train[10%:]+test"). Rows are
numbered from 0 within each file, or within the split for a hub dataset, in every error.

Mixing: with several sources, the mixed training set has as many rows as the sources together,
and source i supplies round(N * w_i / sum w) of them: a seeded subset when that is fewer than it
has, whole copies plus a seeded subset when more. Eval sets are concatenated without weighting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import datasets
import numpy as np
from datasets.data_files import DEFAULT_PATTERNS_ALL, get_data_patterns

from align.config import ConfigError, DataConfig, SourceConfig
from align.data.errors import DataError, DataReport, drop_marked, logger
from align.data.formats import KINDS, NORMALIZED, expand_pairs, is_path, normalize_batch, normalized_kind, path_root
from align.task import builtin_path

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
BUILTIN_PREFIX = "builtin:"
STRING = datasets.Value("string")

Part = Tuple[str, datasets.Dataset]  # (label used in errors, raw rows)


def resolve_builtin(name: str, seed: int) -> str:
    """The .jsonl file of a split of a built-in task (`name` without the prefix)."""
    return builtin_path(BUILTIN_PREFIX + name, seed)


def _data_files(directory: str) -> List[str]:
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    return files


def _is_plain_data_dir(directory: str) -> bool:
    """True for a folder holding only data files, none named after a split."""
    files = _data_files(directory)
    return (
        bool(files)
        and all(os.path.splitext(f)[1] in FILE_BUILDERS for f in files)
        and get_data_patterns(directory) == DEFAULT_PATTERNS_ALL
    )


def locate(path: str, seed: int) -> Tuple[str, str]:
    """("file" | "dir" | "hub", target) for a source path; builtin names resolve to their file."""
    if path.startswith(BUILTIN_PREFIX):
        return "file", resolve_builtin(path[len(BUILTIN_PREFIX):], seed)
    local = os.path.expanduser(path)
    if os.path.isfile(local):
        if os.path.splitext(local)[1] not in FILE_BUILDERS:
            raise DataError(path, f"unsupported file type; use one of {sorted(FILE_BUILDERS)}")
        return "file", local
    if os.path.isdir(local):
        return ("dir" if _is_plain_data_dir(local) else "hub"), local
    if path.startswith((".", "/", "~")) or os.path.splitext(path)[1] in FILE_BUILDERS:
        raise DataError(path, "no such file or directory")
    return "hub", path


def _read(label: str, *args, **kwargs) -> datasets.Dataset:
    """`datasets.load_dataset`, with its failures turned into a DataError naming the source."""
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # it logs each failure before raising it; we report it once
    try:
        ds = datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # datasets raises many types; the user needs the file and cause
        cause = err.__cause__ or err
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(label, f"not valid UTF-8 text ({cause})") from None
        if isinstance(cause, StopIteration) or "corresponds to no data" in str(cause):
            raise DataError(label, "empty file (no rows)") from None
        raise DataError(label, f"cannot be read: {type(cause).__name__}: {cause}") from None
    finally:
        quiet.setLevel(level)
    if len(ds) == 0:
        raise DataError(label, "empty file (no rows)")
    return ds


def _read_file(path: str, label: str) -> datasets.Dataset:
    if os.path.getsize(path) == 0:
        raise DataError(label, "empty file (no rows)")
    builder = FILE_BUILDERS[os.path.splitext(path)[1]]
    try:
        return _read(label, builder, data_files=path, split="train")
    except DataError:
        # Arrow's messages name no line, or a row counted inside its read block: find the line.
        line_error = _json_line_error(path, label) if builder == "json" else None
        if line_error is not None:
            raise line_error from None
        raise


def _json_line_error(path: str, label: str) -> Optional[DataError]:
    """The first line of a JSON / JSON Lines file that is not valid UTF-8 or JSON, or None."""
    with open(path, "rb") as fh:
        data = fh.read()
    if path.endswith(".json"):  # one JSON document, or JSON Lines under a .json name
        try:
            json.loads(data)
            return None
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            return DataError(label, f"line {line}: not valid UTF-8 text ({err.reason})")
        except json.JSONDecodeError as err:
            if not err.msg.startswith("Extra data"):
                return DataError(label, f"line {err.lineno}: {_json_problem(err)}")
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            return DataError(label, f"line {number}: not valid UTF-8 text ({err.reason} at byte {err.start})")
        except json.JSONDecodeError as err:
            return DataError(label, f"line {number}: {_json_problem(err)}")
        if not isinstance(row, dict):
            return DataError(label, f"line {number}: expected a JSON object, got {type(row).__name__}")
    return None


def _json_problem(err: json.JSONDecodeError) -> str:
    return f"not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno})"


def _instruction(source: SourceConfig) -> datasets.ReadInstruction:
    try:
        return datasets.ReadInstruction.from_spec(source.split)
    except (ValueError, AssertionError) as err:
        raise ConfigError(f"data source {source.path}: split {source.split!r}: {err}") from None


def _raw_parts(source: SourceConfig, seed: int) -> Dict[str, List[Part]]:
    """Split name -> the pieces of raw rows it is made of, for the splits `source.split` uses."""
    _instruction(source)  # a bad split string fails before any data is read
    names = [part.split("[")[0].strip() for part in source.split.split("+")]
    kind, target = locate(source.path, seed)
    if kind in ("file", "dir"):
        if names != ["train"] * len(names):
            raise ConfigError(
                f"data source {source.path}: split {source.split!r}: local files have only the "
                "split 'train' (select rows with e.g. 'train[:100]')"
            )
        label = source.path if target == source.path else f"{source.path} ({target})"
        if kind == "file":
            return {"train": [(label, _read_file(target, label))]}
        return {"train": [(f, _read_file(f, f)) for f in _data_files(target)]}
    parts = {}
    for name in dict.fromkeys(names):
        label = f"{source.path}{f'/{source.subset}' if source.subset else ''} (split {name})"
        ds = _read(label, target, source.subset, split=name, revision=source.revision)
        parts[name] = [(label, ds)]
    return parts


def _selected(source: SourceConfig, parts: Dict[str, List[Part]]) -> List[Tuple[str, datasets.Dataset, range]]:
    """Applies the split string's row ranges and `max_rows`: (label, rows, row indices) pieces."""
    sizes = {name: sum(len(ds) for _, ds in pieces) for name, pieces in parts.items()}
    ranges = _instruction(source).to_absolute(sizes)
    budget = source.max_rows
    out = []
    for r in ranges:
        start = 0  # offset of this piece within its split
        for label, ds in parts[r.splitname]:
            take = range(max(r.from_, start) - start, min(r.to, start + len(ds)) - start)
            start += len(ds)
            if budget is not None:
                take = take[:budget]
                budget -= len(take)
            if len(take):
                out.append((label, ds, take))
    return out


def _rename(label: str, ds: datasets.Dataset, columns: Dict[str, str]) -> datasets.Dataset:
    """Renames mapped columns; a path mapping ("completions[*].response") is read per row by
    the normaliser (align.data.formats.read_path), so only its root column is checked here."""
    missing = {field: col for field, col in columns.items() if path_root(col) not in ds.column_names}
    columns = {field: col for field, col in columns.items() if not is_path(col)}
    if missing:
        field, col = next(iter(missing.items()))
        raise DataError(
            label, f"mapped to column {col!r}, which the source lacks (it has {ds.column_names})", field=field
        )
    clash = [f for f, c in columns.items() if f in ds.column_names and f != c and f not in columns.values()]
    ds = ds.remove_columns(clash)
    return ds.rename_columns({c: f for f, c in columns.items() if f != c})


def _utf8_error(label: str, ds: datasets.Dataset) -> DataError:
    """The DataError for the first row and field of `ds` that is not valid UTF-8."""
    for i in range(len(ds)):
        row = ds.select([i])
        for column in ds.column_names:
            try:
                row[column][0]
            except UnicodeDecodeError as err:
                return DataError(label, f"not valid UTF-8 text ({err.reason})", row["_row"][0], column)
    return DataError(label, "not valid UTF-8 text")


def load_source(
    source: SourceConfig, kind: str, data_cfg: DataConfig, seed: int, report: Optional[DataReport] = None
) -> datasets.Dataset:
    """One source's rows, validated and normalised (see `align.data.formats`)."""
    drop = data_cfg.on_error == "drop"
    pieces, seen = [], 0
    for label, raw, rows in _selected(source, _raw_parts(source, seed)):
        ds = _rename(label, raw.select(rows), source.columns)
        ds = ds.add_column("_row", list(rows)).add_column("_source", [label] * len(rows))
        try:
            ds = ds.map(
                normalize_batch,
                batched=True,
                fn_kwargs={"kind": kind, "drop": drop, "ties": data_cfg.ties,
                           "paths": {f: c for f, c in source.columns.items() if is_path(c)}},
                remove_columns=ds.column_names,
                features=datasets.Features({**NORMALIZED[normalized_kind(kind)], "_drop": STRING}),
                desc=f"Checking {label}",
            )
        except UnicodeDecodeError:
            # Arrow's JSON reader keeps invalid UTF-8 inside strings; decoding fails here.
            raise _utf8_error(label, ds) from None
        seen += len(ds)
        # data.ties=drop|strict_pairs drops rows with no usable pair whatever on_error says
        chosen_drops = data_cfg.ties != "error" and kind in ("pairwise", "ranking")
        pieces.append(drop_marked(ds, label, report) if drop or chosen_drops else ds.remove_columns("_drop"))
    total = sum(len(p) for p in pieces)
    if total == 0:
        problem = f"all {seen} rows were dropped as bad" if seen else "no rows selected by split/max_rows"
        raise DataError(source.path, problem)
    logger.info("%s: %d rows", source.path, total)
    return datasets.concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0]


def mix(parts: Sequence[datasets.Dataset], weights: Sequence[float], seed: int) -> datasets.Dataset:
    """Weighted mixture; see the module docstring. One source is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    total, wsum = sum(len(p) for p in parts), float(sum(weights))
    rng = np.random.default_rng([seed, 1])
    chosen = []
    for ds, w in zip(parts, weights):
        copies, rest = divmod(round(total * w / wsum), len(ds))
        idx = np.concatenate([np.tile(np.arange(len(ds)), copies), rng.choice(len(ds), rest, replace=False)])
        chosen.append(ds.select(np.sort(idx)))
    return datasets.concatenate_datasets(chosen)


def holdout(ds: datasets.Dataset, fraction: float, seed: int) -> Tuple[datasets.Dataset, datasets.Dataset]:
    """Splits off a seeded random `fraction` of rows (at least one) as (train, eval)."""
    n_eval = max(1, round(len(ds) * fraction))
    if n_eval >= len(ds):
        raise DataError(ds[0]["source"], f"{len(ds)} rows are too few to hold out {fraction:.0%} for eval")
    perm = np.random.default_rng([seed, 2]).permutation(len(ds))
    return ds.select(np.sort(perm[n_eval:])), ds.select(np.sort(perm[:n_eval]))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; choose from {list(KINDS)}")


def count_tied_pairs(ds: datasets.Dataset, mode: str, report: Optional[DataReport]) -> int:
    """Counts, logs and reports ("skipped/tied_pairs") the pairs of scored rankings that
    data.ties=drop|strict_pairs leaves out because their two scores are equal. Only `all` pairs
    can be tied (best_worst and best_vs_random pick a strictly worse response by construction)."""
    if mode != "all" or "scores" not in ds.column_names:
        return 0
    tied = sum(a == b for scores in ds["scores"][:] for i, a in enumerate(scores) for b in scores[i + 1:])
    if tied:
        logger.warning("skipped %d pairs with tied scores (data.ties)", tied)
        if report is not None:
            report.add("skipped/tied_pairs", tied)
    return tied


def _finish(ds: datasets.Dataset, kind: str, data_cfg: Optional[DataConfig] = None, seed: int = 0,
            report: Optional[DataReport] = None) -> datasets.Dataset:
    if kind == "pairwise":
        mode = data_cfg.ranking_pairs if data_cfg else "all"
        count_tied_pairs(ds, mode, report)
        return expand_pairs(ds, mode, seed)
    if kind == "ranking":
        return ds.add_column("group", list(range(len(ds))))
    return ds


def load_rows(
    sources: Sequence[SourceConfig],
    kind: str,
    data_cfg: DataConfig,
    seed: int,
    report: Optional[DataReport] = None,
    weighted: bool = True,
) -> datasets.Dataset:
    """Normalised rows of `kind` from `sources`, mixed by weight (`weighted`) or concatenated.

    Columns: `messages`, `prompt_text`, the kind's fields, `source` and `row` (for errors), and
    for pairwise/ranking a `group` per prompt (pairwise also `weight`, see `expand_pairs`).
    """
    _check_kind(kind)
    if not sources:
        raise ConfigError(f"no data sources given for {kind} data")
    parts = [load_source(s, kind, data_cfg, seed, report) for s in sources]
    ds = mix(parts, [s.weight for s in sources], seed) if weighted else datasets.concatenate_datasets(parts)
    return _finish(ds, kind, data_cfg, seed, report)


def load_splits(
    data_cfg: DataConfig, kind: str, seed: int, report: Optional[DataReport] = None
) -> Tuple[datasets.Dataset, Optional[datasets.Dataset]]:
    """(train, eval) rows: eval from `data.eval` sources, else `data.eval_fraction` of each
    training source held out before mixing (so no duplicate of an eval row is trained on, and a
    ranking's pairs stay on one side), else None."""
    if data_cfg.eval or not data_cfg.eval_fraction:
        train = load_rows(data_cfg.train, kind, data_cfg, seed, report)
        if not data_cfg.eval:
            return train, None
        return train, load_rows(data_cfg.eval, kind, data_cfg, seed, report, weighted=False)
    _check_kind(kind)
    if not data_cfg.train:
        raise ConfigError(f"no data sources given for {kind} data")
    splits = [holdout(load_source(s, kind, data_cfg, seed, report), data_cfg.eval_fraction, seed)
              for s in data_cfg.train]
    train = mix([t for t, _ in splits], [s.weight for s in data_cfg.train], seed)
    evals = datasets.concatenate_datasets([e for _, e in splits])
    return _finish(train, kind, data_cfg, seed, report), _finish(evals, kind, data_cfg, seed, report)


def _hash_file(h, path: str) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def data_fingerprint(sources: Sequence[SourceConfig], seed: int) -> str:
    """sha256 over each source's settings and its content: file bytes for local files and
    folders, name/subset/split/revision for hub datasets, the resolved file for builtins."""
    h = hashlib.sha256(f"seed={seed}".encode())
    for s in sources:
        settings = {"path": s.path, "split": s.split, "subset": s.subset, "revision": s.revision,
                    "columns": dict(s.columns), "weight": s.weight, "max_rows": s.max_rows}
        h.update(json.dumps(settings, sort_keys=True).encode())
        kind, target = locate(s.path, seed)
        if kind == "file":
            _hash_file(h, target)
        elif os.path.isdir(target):
            for f in _data_files(target):
                h.update(os.path.relpath(f, target).encode())
                _hash_file(h, f)
    return h.hexdigest()
