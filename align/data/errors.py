"""Data errors that name the file, the row and the field, and counts of what was dropped."""

from __future__ import annotations

import collections
import logging
from typing import Optional

from align.errors import UserError

logger = logging.getLogger("align.data")

# Reasons a row can be rejected; with data.on_error=drop each is counted under its name.
REASONS = (
    "missing_field",
    "empty_field",
    "wrong_type",
    "identical_pair",
    "bad_text",
    "bad_ranking",
    "hh_prefix_mismatch",
    "prompt_too_long",
)


class DataError(UserError, ValueError):
    """A user's data mistake: `<file>: row <i>, field '<name>': <problem>`.

    Rows are numbered from 0 within the file (or within the split, for a hub dataset).
    `reason` is one of REASONS, or "file" for problems that concern a whole file.
    """

    def __init__(
        self,
        source: str,
        problem: str,
        row: Optional[int] = None,
        field: Optional[str] = None,
        reason: str = "file",
    ):
        # The constructor's arguments are `args`, so the error pickles (Ray) and compares whole.
        super().__init__(source, problem, row, field, reason)
        self.source, self.row, self.field, self.reason, self.problem = source, row, field, reason, problem

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        suffix = " (rows are numbered from 0)" if self.row is not None else ""
        place = f"{', '.join(where)}: " if where else ""
        return f"{self.source}: {place}{self.problem}{suffix}"


class RowProblem(Exception):
    """Raised by per-row checks, which know the field but not the file or row; see `DataError`."""

    def __init__(self, field: str, problem: str, reason: str):
        super().__init__(problem)
        self.field, self.problem, self.reason = field, problem, reason

    def __reduce__(self):  # all three fields survive pickling (datasets' workers, Ray)
        return (type(self), (self.field, self.problem, self.reason))


class DataReport(collections.Counter):
    """Counts of dropped rows by reason ("dropped/<reason>"), truncations ("truncated/...") and
    pairs of a ranking left out for tied scores ("skipped/tied_pairs").

    Pass one to `load_rows` / `tokenize_rows` to collect counts; keys read as metric names.
    """

    def add(self, key: str, count: int) -> None:
        if count:
            self[key] += count

    def dropped(self) -> int:
        return sum(v for k, v in self.items() if k.startswith("dropped/"))


def drop_marked(ds, label: str, report: Optional[DataReport]):
    """Counts rows whose `_drop` column names a reason, logs and filters them, drops the column.

    Per-row work marks rows instead of dropping them so the counts stay right when `datasets`
    serves a map from its cache.
    """
    reasons = [r for r in ds["_drop"][:] if r]  # [:] reads the column at once, not row by row
    if reasons:
        counts = dict(sorted(collections.Counter(reasons).items()))
        logger.warning("%s: dropped %d bad rows %s", label, len(reasons), counts)
        if report is not None:
            for reason, n in counts.items():
                report.add(f"dropped/{reason}", n)
        ds = ds.filter(lambda marks: [not m for m in marks], input_columns="_drop", batched=True)
    return ds.remove_columns("_drop")
