"""Token tables: sequence rows flattened to positions, ids columns, masks.

A sequence row holds one distribution per position (`list<list<float>>`, a
3-D array) and optionally a mask (`list<bool|int8>`) or a length saying
which positions count. The kernels know only rows, so a sequence column is
read as its positions (the inner lists, zero-copy) plus the sequence
offsets; each position gets a pre-status (compute, not counted, or bad
before the kernel) and the kernel's per-position results are summed back
per sequence (`fastkl.kernels.sequences`). Sequences whose columns disagree
on their number of positions are invalid before any kernel runs; only then
are the positions of the others gathered (a copy, on bad input only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .._registry import NULL, OK, STATUS_CODE
from ..errors import OptionError
from .arrow import is_list_type, list_offsets

NULL_ELEMENT = STATUS_CODE["null_element"]
# Per-sequence checks before the kernel, in the order they are reported.
_SEQUENCE_REASONS = ("length_mismatch", "ids_length_mismatch", "mask_length_mismatch")


def is_sequence(x: Any, sampled: bool = False) -> bool:
    """True for sequence rows: lists of lists (any list kind at either level) or a 3-D array;
    for sampled-token log-probs (one value per position), lists or a 2-D array."""
    if isinstance(x, np.ndarray):
        return x.ndim == (2 if sampled else 3)
    t = x.type
    return is_list_type(t) and (sampled or is_list_type(t.value_type))


@dataclass(frozen=True)
class _Nested:
    """One sequence column: where each sequence's positions are, and which sequences are null."""

    offsets: np.ndarray  # int64, n + 1, into `positions`
    positions: pa.Array | np.ndarray  # the whole inner array (positions of every sequence)
    null: np.ndarray | None  # bool per sequence

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def _nested(x: pa.Array | np.ndarray, name: str, sampled: bool = False) -> _Nested:
    if sampled:
        return _flat(x, name)
    if isinstance(x, np.ndarray):
        if x.ndim != 3:
            raise OptionError(f"{name}: expected a 3-D array (sequences x positions x K), got {x.ndim}-D")
        n, t = x.shape[:2]
        return _Nested(np.arange(n + 1, dtype=np.int64) * t, x.reshape(n * t, x.shape[2]), None)
    if not is_sequence(x):
        raise OptionError(f"{name}: expected sequence rows (lists of lists), got {x.type}")
    offsets, child = list_offsets(x, name)
    return _Nested(offsets, child, _nulls(x))


def _flat(x: pa.Array | np.ndarray, name: str) -> _Nested:
    """A per-sequence list of scalars (mask) as a `_Nested` of its elements."""
    if isinstance(x, np.ndarray):
        if x.ndim != 2:
            raise OptionError(f"{name}: expected a 2-D array (sequences x positions), got {x.ndim}-D")
        n, t = x.shape
        return _Nested(np.arange(n + 1, dtype=np.int64) * t, x.reshape(-1), None)
    offsets, child = list_offsets(x, name, "booleans or integers")
    return _Nested(offsets, child, _nulls(x))


def _nulls(x: pa.Array) -> np.ndarray | None:
    return x.is_null().to_numpy(zero_copy_only=False) if x.null_count else None


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + c) for each (s, c), without a Python loop."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    shift = np.repeat(starts - (ends - counts), counts)
    return np.arange(total, dtype=np.int64) + shift


def _take(col: _Nested, keep: np.ndarray | None) -> tuple[np.ndarray, pa.Array | np.ndarray]:
    """(positions of the kept sequences, their offsets): a zero-copy slice when all are kept."""
    if keep is None:
        lo, hi = int(col.offsets[0]), int(col.offsets[-1])
        pos = col.positions[lo:hi] if isinstance(col.positions, np.ndarray) else col.positions.slice(lo, hi - lo)
        return col.offsets - lo, pos
    counts = np.where(keep, col.counts, 0)
    idx = _ranges(col.offsets[:-1], counts)
    pos = col.positions[idx] if isinstance(col.positions, np.ndarray) else col.positions.take(pa.array(idx))
    return np.concatenate(([0], np.cumsum(counts))).astype(np.int64), pos


@dataclass(frozen=True)
class Sequences:
    """Sequence rows as positions: what the kernels run on and how to sum back."""

    offsets: np.ndarray  # int64, n + 1: sequence i is positions offsets[i]:offsets[i+1]
    status: np.ndarray  # uint8 per sequence: OK, NULL or a reason found before the kernel
    pre: np.ndarray | None  # uint8 per position: OK (compute), NULL (not counted), NULL_ELEMENT; None: all OK
    columns: dict[str, Any]  # the position-level columns (token rows), same keys as given
    counts: dict[str, np.ndarray]  # positions per sequence of each input column (error messages)

    @property
    def n(self) -> int:
        return len(self.status)

    @property
    def pre_status(self) -> np.ndarray:
        """`pre` as an array also when every position counts (built then: 1 byte per position)."""
        if self.pre is not None:
            return self.pre
        return np.full(int(self.offsets[-1]), OK, dtype=np.uint8)


def flatten(columns: dict[str, Any], mask: Any | None = None, lengths: Any | None = None,
            sampled: bool = False, target: Any | None = None) -> Sequences:
    """Sequence columns (p, q, p_ids, q_ids: same keys out) as position-level columns.

    `mask`: per sequence, a list of booleans or integers (nonzero = counted);
    `lengths`: per sequence, the number of leading positions counted;
    `sampled`: a position is one value (a sampled token's log-prob), not a list;
    `target`: per sequence, the token id that came next at each position.
    """
    nested = {name: _nested(x, name, sampled) for name, x in columns.items()}
    if mask is not None:
        nested["mask"] = _flat(mask, "mask")
    if target is not None:
        nested["target"] = _flat(target, "target")
    n = len(next(iter(nested.values())).offsets) - 1
    status = np.full(n, OK, dtype=np.uint8)
    null = np.zeros(n, dtype=bool)
    for col in nested.values():
        if col.null is not None:
            null |= col.null
    lengths_np = _lengths(lengths, n, null) if lengths is not None else None
    counts = {name: col.counts for name, col in nested.items()}
    for reason, bad in zip(_SEQUENCE_REASONS, _mismatches(counts, lengths_np)):
        status[(status == OK) & bad & ~null] = STATUS_CODE[reason]
    status[null] = NULL
    keep = None if (status == OK).all() else status == OK
    out: dict[str, Any] = {}
    offsets = None
    for name, col in nested.items():
        offsets, out[name] = _take(col, keep)
    mask_pos = out.pop("mask", None)
    counted = _counted(mask_pos, offsets, lengths_np)
    nulls = [pos.is_null().to_numpy(zero_copy_only=False) for pos in [mask_pos] + list(out.values())
             if pos is not None and not isinstance(pos, np.ndarray) and pos.null_count]
    pre = None
    if counted is not None or nulls:
        pre = np.full(int(offsets[-1]), OK, dtype=np.uint8)
        for null in nulls:
            pre[null] = NULL_ELEMENT  # a null position that counts
        if counted is not None:
            pre[~counted] = NULL
    if lengths_np is not None:
        counts["lengths"] = lengths_np
    return Sequences(offsets, status, pre, out, counts)


def describe_sequence(seqs: Sequences, i: int, reason: str) -> str:
    """Why sequence `i` was invalid before any kernel ran (its columns disagree on its length)."""
    c = {name: int(v[i]) for name, v in seqs.counts.items()}
    if reason == "length_mismatch":
        if "q" in c and c["q"] != c["p"]:
            return f"p has {c['p']} positions, q has {c['q']}"
        return f"p has {c['p']} positions, target has {c.get('target')}"
    if reason == "ids_length_mismatch":
        for side in ("p", "q"):
            if f"{side}_ids" in c and side in c and c[f"{side}_ids"] != c[side]:
                return f"{side} has {c[side]} positions, {side}_ids has {c[side + '_ids']}"
    if reason == "mask_length_mismatch":
        if "mask" in c and c["mask"] != c["p"]:
            return f"the mask has {c['mask']} entries, the sequence {c['p']} positions"
        if "lengths" in c:
            return f"lengths = {c['lengths']}, the sequence has {c['p']} positions"
    return ""


def _lengths(lengths: Any, n: int, null: np.ndarray) -> np.ndarray:
    if isinstance(lengths, (pa.Array, pa.ChunkedArray)):
        if lengths.null_count:
            null |= lengths.is_null().to_numpy(zero_copy_only=False)
            lengths = pc.fill_null(lengths, 0)
        lengths = lengths.to_numpy()
    lengths = np.asarray(lengths)
    if lengths.shape != (n,) or not (np.issubdtype(lengths.dtype, np.integer) or lengths.size == 0):
        raise OptionError(f"lengths: expected one whole number per sequence ({n}), got {lengths.dtype} "
                          f"of shape {lengths.shape}")
    return lengths.astype(np.int64, copy=False)


def _mismatches(counts: dict[str, np.ndarray], lengths: np.ndarray | None):
    """Per sequence-level reason, which sequences have it."""
    ref = counts["p"]
    none = np.zeros(len(ref), dtype=bool)
    yield (counts["q"] != ref if "q" in counts else none) | (counts["target"] != ref if "target" in counts else none)
    ids = none
    for side in ("p", "q"):
        if f"{side}_ids" in counts and side in counts:
            ids = ids | (counts[f"{side}_ids"] != counts[side])
    yield ids
    bad = counts["mask"] != ref if "mask" in counts else none
    if lengths is not None:
        bad = bad | (lengths < 0) | (lengths > ref)
    yield bad


def _counted(mask: Any | None, offsets: np.ndarray, lengths: np.ndarray | None) -> np.ndarray | None:
    """Which positions count (None: all), from the mask values or the lengths."""
    if mask is not None:
        if isinstance(mask, np.ndarray):
            if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)):
                raise OptionError(f"mask: expected booleans or integers, got {mask.dtype}")
            return mask != 0
        t = mask.type
        if not (pa.types.is_boolean(t) or pa.types.is_integer(t)):
            raise OptionError(f"mask: expected list<bool> or list<int8>, got list<{t}>")
        counted = pc.not_equal(mask.cast(pa.int8()) if pa.types.is_boolean(t) else mask, 0)
        # a null mask entry: the position is neither counted nor skipped silently
        return pc.fill_null(counted, True).to_numpy(zero_copy_only=False)
    if lengths is not None:
        within = np.arange(int(offsets[-1]), dtype=np.int64) - np.repeat(offsets[:-1], np.diff(offsets))
        return within < np.repeat(lengths, np.diff(offsets))
    return None


# ------------------------------------------------------------------ ids


@dataclass(frozen=True)
class Ids:
    """The ids column of a sparse side, as flat buffers."""

    offsets: np.ndarray  # int64, n + 1
    ids: np.ndarray  # int32, int64, uint32 or uint16
    pre_status: np.ndarray | None  # uint8 per row: NULL (null list), NULL_ELEMENT, ID_NOT_INTEGER

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]: self.offsets[i + 1]]


_NATIVE_IDS = (np.int32, np.int64, np.uint32, np.uint16)
ID_NOT_INTEGER = STATUS_CODE["id_not_integer"]


def ids_side(x: pa.Array | np.ndarray, name: str) -> Ids:
    """Token ids per row: integers read in place; floats accepted where integral."""
    pre = None
    if isinstance(x, np.ndarray):
        if x.ndim != 2:
            raise OptionError(f"{name}: expected a 2-D array of token ids (rows x k), got {x.ndim}-D")
        n, k = x.shape
        offsets = np.arange(n + 1, dtype=np.int64) * k
        values, valid = x.reshape(-1), None
    else:
        offsets, child = list_offsets(x, name, "integers")
        lo, hi = (int(offsets[0]), int(offsets[-1])) if len(x) else (0, 0)
        child = child.slice(lo, hi - lo)
        offsets = offsets - lo
        if not (pa.types.is_integer(child.type) or pa.types.is_floating(child.type)):
            raise OptionError(f"{name}: token ids must be integers, got list<{child.type}>")
        valid = child.is_valid().to_numpy(zero_copy_only=False) if child.null_count else None
        values = child.to_numpy(zero_copy_only=False) if valid is None else pc.fill_null(child, 0).to_numpy()
        if x.null_count:
            pre = np.where(x.is_null().to_numpy(zero_copy_only=False), NULL, OK).astype(np.uint8)
    if valid is not None:
        pre = _flag_rows(pre, offsets, ~valid, NULL_ELEMENT)
    if np.issubdtype(values.dtype, np.floating):
        integral = np.isfinite(values) & (values == np.round(values))
        pre = _flag_rows(pre, offsets, ~integral, ID_NOT_INTEGER)
        values = np.where(integral, values, -1).astype(np.int64)
    elif not np.issubdtype(values.dtype, np.integer):
        raise OptionError(f"{name}: token ids must be integers, got {values.dtype}")
    elif values.dtype.type not in _NATIVE_IDS:
        values = values.astype(np.int64)  # int8/int16/uint8: small, widen; uint64: range-checked as int64
    values = np.ascontiguousarray(values)
    values.flags.writeable = False
    return Ids(offsets, values, pre)


def _flag_rows(pre: np.ndarray | None, offsets: np.ndarray, bad: np.ndarray, code: int) -> np.ndarray | None:
    """Give `code` to the rows (still OK) holding any bad element."""
    if not bad.any():
        return pre
    pre = np.zeros(len(offsets) - 1, dtype=np.uint8) if pre is None else pre
    seen = np.concatenate(([0], np.cumsum(bad, dtype=np.int64)))
    pre[(pre == OK) & (seen[offsets[1:]] > seen[offsets[:-1]])] = code
    return pre


def empty_ids() -> Ids:
    return Ids(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64), None)



def merge_pre_status(pre: np.ndarray, *ids: Ids | None) -> np.ndarray:
    """Row codes settled before the kernel: `pre`'s, then those the ids columns found (a null
    ids list is a null row, a null id or a non-integral one makes the row invalid)."""
    out = np.array(pre, dtype=np.uint8)  # a writable copy
    for side in ids:
        if side is not None and side.pre_status is not None:
            free = out == OK
            out[free] = side.pre_status[free]
    return out


def describe_sparse(sides: dict[str, tuple[Any, Ids | None, str]], options: Any, i: int, reason: str) -> str:
    """Why sparse row `i` is invalid, for the reasons of ids and listed mass ('' for the others)."""
    for name, (side, ids, kind) in sides.items():
        if side is None or ids is None:
            continue
        values, row = side.row(i), ids.row(i).astype(np.int64)
        if reason == "ids_length_mismatch" and len(values) != len(row):
            return f"{name} has {len(values)} values, {name}_ids {len(row)} ids"
        if reason == "id_not_integer" and (row == -1).any():
            return f"{name}_ids[{int(np.flatnonzero(row == -1)[0])}] is not a whole number"
        if reason == "id_out_of_range":
            bad = (row < 0) | (row >= options.vocab) if options.vocab is not None else row < 0
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                where = f"in [0, {options.vocab})" if options.vocab is not None else ">= 0"
                return f"{name}_ids[{j}] = {int(row[j])} is not {where}"
        if reason == "duplicate_id":
            _, first, counts = np.unique(row, return_index=True, return_counts=True)
            if (counts > 1).any():
                v = int(np.unique(row)[counts > 1][0])
                j0, j1 = np.flatnonzero(row == v)[:2]
                return f"{name}_ids[{j1}] = {v} repeats {name}_ids[{j0}]"
        if reason == "not_normalized" and len(values) == len(row):
            x = values.astype(np.float64)
            total = float(np.sum(x if kind == "probs" else np.exp(x)))
            if total > 1 + options.sum_tol:
                return f"{name} lists a mass of {total!r}, more than 1 + sum_tol={options.sum_tol:g}"
    return ""


def target_ids(x: pa.Array | np.ndarray, name: str = "target") -> tuple[np.ndarray, np.ndarray | None]:
    """(int64 token id per row, which rows are null or None) of a target column."""
    if isinstance(x, np.ndarray):
        if x.ndim != 1 or not np.issubdtype(x.dtype, np.integer):
            raise OptionError(f"{name}: expected one integer token id per row, got {x.dtype} of {x.ndim}-D")
        return x.astype(np.int64, copy=False), None
    if not pa.types.is_integer(x.type):
        raise OptionError(f"{name}: expected integer token ids, got {x.type}")
    null = x.is_null().to_numpy(zero_copy_only=False) if x.null_count else None
    return pc.fill_null(x, 0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False), null
