"""What one `compute` call returns, and how it becomes a table.

Token rows give one value per measure and row (plus bounds and listed mass
for sparse rows); sequence rows give the sum over counted positions, the
number of counted positions and, on request, the per-position values.
`output_fields` names the columns once, for `Result.to_table` and for the
schema a job writes before it has seen any row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa

from ._options import Options
from ._registry import FIRST_INVALID, NO_TOKENS, STATUSES, TARGET_UNLISTED, valid_rows
from .errors import InvalidRowError, OptionError

# describe(row, reason) -> (position or None, a short human explanation)
Describe = Callable[[int, str], "tuple[int | None, str]"]


@dataclass(frozen=True)
class Layout:
    """Which columns a result has: fixed by the input's shape and the options."""

    measures: tuple[str, ...]
    sequence: bool = False
    sparse: bool = False
    bounds: bool = False
    per_token: bool = False


def layout_for(measures: tuple[str, ...], options: Options, *, sequence: bool, sparse: bool = False) -> Layout:
    """The columns an input of this shape gets under these options (the API and jobs agree)."""
    if options.per_token and not sequence:
        raise OptionError("per_token is for sequence rows (lists of lists); these rows hold one distribution each")
    return Layout(measures, sequence=sequence, sparse=sparse, bounds=sparse and options.bounds,
                  per_token=options.per_token)


def output_fields(layout: Layout, status: bool) -> list[pa.Field]:
    """The output columns, in order: per measure m [, m_mean][, m_lower, m_upper][, m_tokens],
    then tokens (sequences), listed_mass_p/q (sparse), status."""
    fields = []
    for m in layout.measures:
        fields.append(pa.field(m, pa.float64()))
        if layout.sequence:
            fields.append(pa.field(f"{m}_mean", pa.float64()))
        if layout.bounds:
            fields += [pa.field(f"{m}_lower", pa.float64()), pa.field(f"{m}_upper", pa.float64())]
        if layout.per_token:
            fields.append(pa.field(f"{m}_tokens", pa.list_(pa.float64())))
    if layout.sequence:
        fields.append(pa.field("tokens", pa.int64()))
    if layout.sparse:
        fields += [pa.field("listed_mass_p", pa.float64()), pa.field("listed_mass_q", pa.float64())]
    if status:
        fields.append(pa.field("status", pa.string()))
    return fields


class PerToken:
    """Per-position values of sequence rows, for `m_tokens` columns and the summary's token level.

    A kernel that sums sequences without writing them (kernels.sampled) gives
    `fill` instead: it computes (values, status) the first time they are read.
    """

    def __init__(self, offsets: np.ndarray, values: np.ndarray | None = None, status: np.ndarray | None = None,
                 fill: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        if (values is None or status is None) and fill is None:
            raise ValueError("PerToken needs values and status, or fill")
        self.offsets = offsets  # int64, rows + 1, into values' columns
        self._values = values  # float64 (measures, positions)
        self._status = status  # uint8 per position: only ok positions have a value
        self._fill = fill

    @property
    def filled(self) -> bool:
        return self._fill is None

    @property
    def values(self) -> np.ndarray:
        self._compute()
        return self._values

    @property
    def status(self) -> np.ndarray:
        self._compute()
        return self._status

    def _compute(self) -> None:
        if self._fill is not None:
            self._values, self._status = self._fill()
            self._fill = None


@dataclass
class Result:
    """Per-row measures and statuses of one `compute` call."""

    layout: Layout
    values: np.ndarray  # float64, (measures, rows): sums over counted positions for sequences
    status: np.ndarray  # uint8 codes of fastkl.STATUSES
    options: Options
    lower: np.ndarray | None = None  # like values, when layout.bounds
    upper: np.ndarray | None = None
    listed: np.ndarray | None = None  # float64 (2, rows), sparse: mass P and Q list (mean per position)
    tokens: np.ndarray | None = None  # int64 per row, sequences: counted positions
    per_token: PerToken | None = None  # sequences (output only with layout.per_token)
    _describe: list[tuple[int, int, Describe]] = field(repr=False, default_factory=list)

    @property
    def measures(self) -> tuple[str, ...]:
        return self.layout.measures

    @property
    def rows(self) -> int:
        return len(self.status)

    def invalid_count(self) -> int:
        return int(np.count_nonzero(self.status >= FIRST_INVALID))

    def error(self, file: str | None = None, row_offset: int = 0) -> InvalidRowError | None:
        """An InvalidRowError for the first invalid row, or None if there is none."""
        bad = np.flatnonzero(self.status >= FIRST_INVALID)
        if bad.size == 0:
            return None
        row = int(bad[0])
        reason = STATUSES[self.status[row]]
        position, detail = self.describe(row, reason)
        return InvalidRowError(reason, row_offset + row, int(bad.size), file=file, detail=detail,
                               position=position)

    def describe(self, row: int, reason: str) -> tuple[int | None, str]:
        """(position or None, why `row` is invalid), from the piece that holds it."""
        for first, n, fn in self._describe:
            if first <= row < first + n:
                return fn(row - first, reason)
        return None, ""

    def means(self) -> np.ndarray:
        """Per-position means of sequence rows: sum / counted positions (NaN where none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.values / np.where(self.tokens > 0, self.tokens, np.nan)

    def to_table(self, status: bool = False) -> pa.Table:
        """The columns of `output_fields`, null where the row is not ok (and a target measure
        where the target is not listed)."""
        not_ok = ~valid_rows(self.status)
        mask = not_ok if not_ok.any() else None
        unlisted = self.status == TARGET_UNLISTED
        means = self.means() if self.layout.sequence else None
        arrays = []
        for i, _ in enumerate(self.measures):
            vmask = mask
            if unlisted.any():
                vmask = not_ok | (unlisted & np.isnan(self.values[i]))
            arrays.append(pa.array(self.values[i], mask=vmask))
            if means is not None:
                arrays.append(pa.array(means[i], mask=vmask))
            if self.layout.bounds:
                arrays += [pa.array(self.lower[i], mask=mask), pa.array(self.upper[i], mask=mask)]
            if self.layout.per_token:
                arrays.append(self._token_lists(i, self._no_sequence()))
        if self.layout.sequence:
            arrays.append(pa.array(self.tokens, type=pa.int64(), mask=self._no_sequence()))
        if self.layout.sparse:
            # NaN beside an ok row: no q was read (entropy alone)
            arrays += [pa.array(x, mask=np.isnan(x) | not_ok) for x in self.listed]
        if status:
            arrays.append(status_array(self.status))
        return pa.Table.from_arrays(arrays, schema=pa.schema(output_fields(self.layout, status)))

    def _no_sequence(self) -> np.ndarray | None:
        """Rows with no usable positions: null or invalid (a sequence whose mask counts
        nothing still has its positions, none counted)."""
        bad = ~valid_rows(self.status) & (self.status != NO_TOKENS)
        return bad if bad.any() else None

    def _token_lists(self, i: int, null: np.ndarray | None) -> pa.Array:
        t = self.per_token
        values = pa.array(t.values[i], mask=~valid_rows(t.status) | np.isnan(t.values[i]))
        offsets = pa.array(t.offsets.astype(np.int32 if t.offsets[-1] < 2**31 else np.int64))
        cls = pa.ListArray if offsets.type == pa.int32() else pa.LargeListArray
        lists = cls.from_arrays(offsets, values, mask=None if null is None else pa.array(null))
        return lists.cast(pa.list_(pa.float64()))


def concat(layout: Layout, options: Options, parts: list[tuple[int, Result]]) -> Result:
    """One Result from the Results of consecutive pieces of the rows."""
    if len(parts) == 1:
        return parts[0][1]
    rs = [r for _, r in parts]

    def cat(name: str, axis: int = -1):
        got = [getattr(r, name) for r in rs]
        return None if got[0] is None else np.concatenate(got, axis=axis)

    per_token = None
    if rs[0].per_token is not None:
        starts = np.cumsum([0] + [r.per_token.offsets[-1] for r in rs])
        offsets = np.concatenate([[0]] + [r.per_token.offsets[1:] + s for r, s in zip(rs, starts)])
        tokens = [r.per_token for r in rs]

        def fill() -> tuple[np.ndarray, np.ndarray]:
            return (np.concatenate([t.values for t in tokens], axis=1),
                    np.concatenate([t.status for t in tokens]))

        if all(t.filled for t in tokens):
            per_token = PerToken(offsets.astype(np.int64), *fill())
        else:  # read only if used
            per_token = PerToken(offsets.astype(np.int64), fill=fill)
    describe = [(first + f, n, fn) for first, r in parts for f, n, fn in r._describe]
    return Result(layout, cat("values"), cat("status"), options, cat("lower"), cat("upper"), cat("listed"),
                  cat("tokens"), per_token, describe)


def empty(layout: Layout, options: Options) -> Result:
    m = len(layout.measures)
    per_token = PerToken(np.zeros(1, np.int64), np.zeros((m, 0)), np.zeros(0, np.uint8)) if layout.sequence else None
    return Result(layout, np.zeros((m, 0)), np.zeros(0, np.uint8), options,
                  np.zeros((m, 0)) if layout.bounds else None, np.zeros((m, 0)) if layout.bounds else None,
                  np.zeros((2, 0)) if layout.sparse else None,
                  np.zeros(0, np.int64) if layout.sequence else None, per_token)


_STATUS_DICT = pa.array(STATUSES, type=pa.string())


def status_array(status: np.ndarray) -> pa.Array:
    """Status codes as a string column, built without Python-level loops."""
    codes = pa.array(status.astype(np.int8, copy=False))
    return pa.DictionaryArray.from_arrays(codes, _STATUS_DICT).cast(pa.string())
