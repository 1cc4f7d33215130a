"""Run the kernel over any accepted input: the one entry point every layer uses.

`compute` converts the input with the Arrow adapter, splits the rows into
blocks of about equal element counts and runs the serial `nogil` kernel on
the blocks from a thread pool. The in-memory API calls it with all cores; a
Dask task calls it with `threads=1` (or the share of cores its worker has),
so the same kernel runs at every scale and nothing oversubscribes.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from . import _config
from ._config import MIN_ELEMENTS_PER_BLOCK
from .adapters.arrow import Side, aligned_sides
from .kernels import dense as K
from ._options import Options, check_measures, check_threads, needs_q
from ._registry import FIRST_INVALID, KIND_CODE, MEASURE_INDEX, OK, STATUSES
from .errors import InvalidRowError, OptionError

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_config.cores(), thread_name_prefix="fastkl")
        return _pool


def _forget_pool_after_fork() -> None:
    """In a forked child (multiprocessing, DataLoader workers, gunicorn): start afresh.

    Only the forking thread survives a fork: the parent's pool threads do not
    exist in the child, so work handed to the copied pool would wait forever,
    and the lock may have been copied while another thread held it.
    """
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


@dataclass
class Result:
    """Per-row measures and statuses of one `compute` call."""

    measures: tuple[str, ...]
    values: np.ndarray  # float64, (len(measures), rows); NaN where status != ok
    status: np.ndarray  # uint8 codes of fastkl.STATUSES
    options: Options
    _pieces: list[tuple[int, Side, Side | None]] = field(repr=False, default_factory=list)

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
        return InvalidRowError(
            reason, row_offset + row, int(bad.size), file=file, detail=self._describe(row, reason)
        )

    def to_table(self, status: bool = False) -> pa.Table:
        """Measures as float64 columns (null where the row is not ok), then `status`."""
        not_ok = self.status != OK
        has_nulls = bool(not_ok.any())
        cols = {
            m: pa.array(self.values[i], mask=not_ok if has_nulls else None)
            for i, m in enumerate(self.measures)
        }
        if status:
            cols["status"] = status_array(self.status)
        return pa.table(cols)

    def _describe(self, row: int, reason: str) -> str:
        """A short human explanation of why `row` is invalid."""
        for first, p, q in self._pieces:
            if first <= row < first + p.n:
                i = row - first
                break
        else:
            return ""
        sides = [("p", p, self.options.p_kind)]
        if q is not None:
            sides.append(("q", q, self.options.q_kind))
        if reason == "length_mismatch" and q is not None:
            return f"p has {len(p.row(i))} elements, q has {len(q.row(i))}"
        if reason == "empty":
            return "the row has no elements"
        for name, side, kind in sides:
            x = side.row(i).astype(np.float64)
            nulls = side.row_nulls(i)
            if reason == "null_element" and nulls.size:
                return f"{name}[{nulls[0]}] is null"
            if nulls.size:
                continue
            if reason == "nan" and np.isnan(x).any():
                return f"{name}[{np.flatnonzero(np.isnan(x))[0]}] is NaN"
            if reason == "non_finite":
                bad = np.isposinf(x) if kind != "probs" else np.isinf(x)
                if bad.any():
                    return f"{name}[{np.flatnonzero(bad)[0]}] is {x[bad][0]} ({kind})"
                if kind == "logits" and not np.isfinite(x).any():
                    return f"{name} has no finite logit"
            if reason == "negative":
                bad = x < 0 if kind == "probs" else x > self.options.sum_tol
                if bad.any():
                    j = int(np.flatnonzero(bad)[0])
                    what = "a negative probability" if kind == "probs" else "a positive log-probability"
                    return f"{name}[{j}] = {float(x[j])!r} is {what}"
            if reason == "not_normalized" and kind in ("probs", "logprobs"):
                total = math.fsum(x) if kind == "probs" else math.fsum(np.exp(x))
                if self.options.normalize and kind == "logprobs":
                    bad = not np.isfinite(x).any()
                elif self.options.normalize:
                    bad = not 0 < total < math.inf
                else:
                    bad = abs(total - 1) > self.options.sum_tol
                if bad:
                    if self.options.normalize:
                        return f"{name} sums to {total!r}: cannot normalize"
                    return f"{name} sums to {total!r}, not within sum_tol={self.options.sum_tol:g} of 1" + (
                        _TOP_K_HINT if 0 < total < _TOP_K_MASS else " (use normalize=True to renormalise)"
                    )
        return ""


# A row holding clearly less than all the mass is most often a top-k row (only
# the k largest of a vocabulary), which normalising and comparing by position
# would get wrong: say so instead of suggesting normalize=True.
_TOP_K_MASS = 0.99
_TOP_K_HINT = (
    ": it looks like a top-k row (only the largest entries of a vocabulary); top-k rows must be "
    "compared by token id (p_ids / q_ids, not in this version yet), not by position nor with normalize=True"
)


_STATUS_DICT = pa.array(STATUSES, type=pa.string())


def status_array(status: np.ndarray) -> pa.Array:
    """Status codes as a string column, built without Python-level loops."""
    codes = pa.array(status.astype(np.int8, copy=False))
    return pa.DictionaryArray.from_arrays(codes, _STATUS_DICT).cast(pa.string())


def _blocks(offsets: np.ndarray, n_blocks: int) -> list[tuple[int, int]]:
    """Split rows into up to n_blocks ranges holding about as many elements each."""
    n = len(offsets) - 1
    total = int(offsets[-1] - offsets[0])
    n_blocks = max(1, min(n_blocks, n, total // MIN_ELEMENTS_PER_BLOCK))
    if n_blocks == 1:
        return [(0, n)]
    targets = offsets[0] + (np.arange(1, n_blocks) * total) // n_blocks
    cuts = np.unique(np.concatenate(([0], np.searchsorted(offsets[:-1], targets), [n])))
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _run_piece(p: Side, q: Side | None, slots: np.ndarray, opts: Options, use_q: bool,
               out: np.ndarray, status: np.ndarray, threads: int) -> None:
    qq = q if q is not None else p
    row_null = p.row_null
    if q is not None and q.row_null is not None:
        row_null = q.row_null if row_null is None else (row_null | q.row_null)
    row_null = np.zeros(p.n, dtype=np.uint8) if row_null is None else row_null.astype(np.uint8)
    row_null.flags.writeable = False  # same array type as the other inputs: one specialisation
    p_kind, q_kind = KIND_CODE[opts.p_kind], KIND_CODE[opts.q_kind]
    args = (
        p.offsets, p.values, p.mask, int(p.mask_offset), int(p.decode),
        qq.offsets, qq.values, qq.mask, int(qq.mask_offset), int(qq.decode),
        row_null, bool(use_q),
        int(p_kind), int(q_kind),
        1.0 / opts.p_temperature if opts.p_kind == "logits" else 1.0,
        1.0 / opts.q_temperature if opts.q_kind == "logits" else 1.0,
        bool(opts.normalize), float(opts.smoothing), float(opts.sum_tol),
        1.0 / math.log(opts.base),
        slots, out, status,
    )
    kernel = K.KERNELS[K.family(p_kind, q_kind, use_q, opts.smoothing)]
    blocks = _blocks(p.offsets, threads * 4) if threads > 1 else [(0, p.n)]
    if len(blocks) == 1:
        kernel(*args, 0, p.n)
        return
    futures = [_get_pool().submit(kernel, *args, lo, hi) for lo, hi in blocks]
    for f in futures:
        f.result()


def compute(
    p: Any,
    q: Any | None,
    measures: tuple[str, ...] | list[str] | str,
    options: Options,
    *,
    threads: int | None = None,
) -> Result:
    """Compute `measures` for every row of (p, q). Never raises for bad rows: see `Result.status`."""
    measures = check_measures(measures)
    use_q = needs_q(measures)
    if use_q and q is None:
        raise OptionError(f"q is required for {', '.join(m for m in measures if m != 'entropy')}")
    n, pieces = aligned_sides(p, q if use_q else None, options.p_dtype, options.q_dtype)
    threads = _config.cores() if threads is None else check_threads(threads)
    values = np.empty((len(measures), n), dtype=np.float64)
    status = np.empty(n, dtype=np.uint8)
    slots = np.full(K.N_MEASURES, -1, dtype=np.int64)
    for i, m in enumerate(measures):
        slots[MEASURE_INDEX[m]] = i
    for first, ps, qs in pieces:
        last = first + ps.n
        # Column slices of a C-ordered 2-D array are strided; give the kernel
        # contiguous buffers (one specialisation) and copy back when needed.
        piece_out = values if len(pieces) == 1 else np.empty((len(measures), ps.n))
        _run_piece(ps, qs, slots, options, use_q, piece_out, status[first:last], threads)
        if piece_out is not values:
            values[:, first:last] = piece_out
    return Result(measures, values, status, options, pieces)


def kernel_dtype(*value_types: Any) -> np.dtype:
    """The values dtype the kernel runs on for sides of these element types
    (pyarrow or NumPy): float64 if any side is float64, else float32."""
    wide = any(np.dtype(t.to_pandas_dtype() if isinstance(t, pa.DataType) else t) == np.float64
               for t in value_types)
    return np.dtype(np.float64 if wide else np.float32)


def warmup(dtypes: tuple[Any, ...] = (np.float32, np.float64), options: Options | None = None,
           measures: tuple[str, ...] = ("kl",)) -> None:
    """Compile (or load from Numba's on-disk cache) the kernel for these dtypes,
    the kinds of `options` (default: probs) and `measures` (with or without q:
    another kernel family for some kinds).

    Each specialisation costs seconds to compile the first time on a machine,
    so callers that know their data warm only the ones they will use.
    """
    opts = options or Options()
    measures = check_measures(measures)
    for dtype in dtypes:
        x = np.full((1, 2), 0.5, dtype=dtype)
        compute(x, x if needs_q(measures) else None, measures, opts, threads=1)
