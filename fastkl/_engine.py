"""Run the kernel over any accepted input: the one entry point every layer uses.

`compute` converts the input with the Arrow adapter, splits the rows into
blocks of about equal element counts and runs the serial `nogil` kernel on
the blocks from a thread pool. The in-memory API calls it with all cores; a
Dask task calls it with `threads=1` (or the share of cores its worker has),
so the same kernel runs at every scale and nothing oversubscribes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from . import _config
from ._config import MIN_ELEMENTS_PER_BLOCK
from ._options import Options, check_measures, check_request, check_threads, needs_q
from ._registry import KIND_CODE, MEASURE_INDEX, NULL, OK, SAMPLED_INDEX, TAILS, TARGET_MEASURES, valid_rows
from ._result import Layout, PerToken, Result, concat, empty, layout_for
from .adapters.arrow import Side, aligned_columns, scalar_values, side_pair
from .adapters.protocols import imported
from .adapters.tokens import (describe_sequence, describe_sparse, empty_ids, flatten, ids_side, is_sequence,
                              merge_pre_status, target_ids)
from .errors import OptionError
from .kernels import dense as K
from .kernels.sequences import sum_positions

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


def _describe_dense(p: Side, q: Side | None, options: Options, i: int, reason: str) -> str:
    """A short human explanation of why token row `i` of (p, q) is invalid."""
    sides = [("p", p, options.p_kind)]
    if q is not None:
        sides.append(("q", q, options.q_kind))
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
            bad = x < 0 if kind == "probs" else x > options.sum_tol
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                what = "a negative probability" if kind == "probs" else "a positive log-probability"
                return f"{name}[{j}] = {float(x[j])!r} is {what}"
        if reason == "not_normalized" and kind in ("probs", "logprobs"):
            total = math.fsum(x) if kind == "probs" else math.fsum(np.exp(x))
            if options.normalize and kind == "logprobs":
                bad = not np.isfinite(x).any()
            elif options.normalize:
                bad = not 0 < total < math.inf
            else:
                bad = abs(total - 1) > options.sum_tol
            if bad:
                if options.normalize:
                    return f"{name} sums to {total!r}: cannot normalize"
                return f"{name} sums to {total!r}, not within sum_tol={options.sum_tol:g} of 1" + (
                    _TOP_K_HINT if 0 < total < _TOP_K_MASS else " (use normalize=True to renormalise)"
                )
    return ""


# A row holding clearly less than all the mass is most often a top-k row (only
# the k largest of a vocabulary), which normalising and comparing by position
# would get wrong: say so instead of suggesting normalize=True.
_TOP_K_MASS = 0.99
_TOP_K_HINT = (
    ": it looks like a top-k row (only the largest entries of a vocabulary); top-k rows must be "
    "compared by token id, not by position nor with normalize=True: pass each side's ids as p_ids / q_ids "
    "(CLI --p-ids / --q-ids)"
)


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


def _pre_status(pre: np.ndarray | None, *sides: Side | None) -> np.ndarray:
    """Per-row codes settled before the kernel: `pre` where given, else null rows of either side."""
    if pre is None:
        pre = np.zeros(sides[0].n, dtype=np.uint8)
        for side in sides:
            if side is not None and side.row_null is not None:
                pre[side.row_null] = NULL
    pre = pre.view()
    pre.flags.writeable = False  # same array type as the other inputs: one specialisation
    return pre


def _run_blocks(kernel, args: tuple, offsets: np.ndarray, threads: int) -> None:
    """kernel(*args, start, stop) over blocks of rows of about equal element counts, in `threads` threads."""
    n = len(offsets) - 1
    _run_ranges(kernel, args, _blocks(offsets, threads * 4) if threads > 1 else [(0, n)], threads)


def _even_blocks(n: int, threads: int) -> list[tuple[int, int]]:
    """`_blocks` for n rows of one element each (no offsets to build)."""
    k = max(1, min(threads * 4 if threads > 1 else 1, n // MIN_ELEMENTS_PER_BLOCK))
    cuts = [n * b // k for b in range(k + 1)]
    return [(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo] or [(0, n)]


def _run_ranges(kernel, args: tuple, blocks: list[tuple[int, int]], threads: int) -> None:
    """kernel(*args, start, stop) for each (start, stop) of `blocks`, in at most `threads` threads.

    The calling thread takes blocks too, beside threads - 1 helpers from the
    pool: each thread takes the next block when it is done with one, so a
    helper that starts late (an idle core waking up, a pool busy with another
    call) costs only the blocks it did not take.
    """
    if len(blocks) == 1 or threads <= 1:
        for lo, hi in blocks:
            kernel(*args, lo, hi)
        return
    todo = iter(blocks)
    lock = threading.Lock()

    def take_blocks() -> None:
        try:
            while True:
                with lock:
                    block = next(todo, None)
                if block is None:
                    return
                kernel(*args, *block)
        except BaseException:
            with lock:
                for _ in todo:  # the other threads stop after the block they are in
                    pass
            raise

    helpers = [_get_pool().submit(take_blocks) for _ in range(min(threads, len(blocks)) - 1)]
    try:
        take_blocks()
    finally:
        for h in helpers:
            if not h.cancel():  # one still queued (the pool busy with other calls) is not waited for
                h.result()


def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view (the kernels' inputs are all read-only: one specialisation)."""
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _run_piece(p: Side, q: Side | None, pre: np.ndarray, slots: np.ndarray, opts: Options, use_q: bool,
               out: np.ndarray, status: np.ndarray, threads: int) -> None:
    qq = q if q is not None else p
    p_kind, q_kind = KIND_CODE[opts.p_kind], KIND_CODE[opts.q_kind]
    args = (
        p.offsets, p.values, p.mask, int(p.mask_offset), int(p.decode),
        qq.offsets, qq.values, qq.mask, int(qq.mask_offset), int(qq.decode),
        pre, bool(use_q),
        int(p_kind), int(q_kind),
        1.0 / opts.p_temperature if opts.p_kind == "logits" else 1.0,
        1.0 / opts.q_temperature if opts.q_kind == "logits" else 1.0,
        bool(opts.normalize), float(opts.smoothing), float(opts.sum_tol),
        1.0 / math.log(opts.base), float(opts.gjs_beta), float(opts.alpha - 1.0) if opts.alpha else 0.0,
        slots, out, status,
    )
    _run_blocks(K.KERNELS[K.family(p_kind, q_kind, use_q, opts.smoothing)], args, p.offsets, threads)


@dataclass
class _Rows:
    """The kernel's per-row (token-level) outputs for one piece."""

    values: np.ndarray  # float64 (measures, rows)
    status: np.ndarray  # uint8
    describe: Callable[[int, str], str]
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    listed: np.ndarray | None = None


def _slots(measures: tuple[str, ...]) -> np.ndarray:
    """Which row of the outputs receives each kernel measure (-1: not asked; top1_agree is
    filled by its own pass, `_fill_top1`)."""
    slots = np.full(K.N_MEASURES, -1, dtype=np.int64)
    for i, m in enumerate(measures):
        if m in MEASURE_INDEX:
            slots[MEASURE_INDEX[m]] = i
    return slots


def _target_request(rows: "_Rows", layout: Layout, target: Any) -> tuple[list[str], Any, np.ndarray]:
    """(the target measures asked, the target ids, the rows' status with null targets made null rows)."""
    wanted = [m for m in layout.measures if m in TARGET_MEASURES]
    if not wanted:
        return wanted, None, rows.status
    ids, null = target_ids(target)
    if null is not None:
        rows.status[null & (rows.status == OK)] = NULL
    return wanted, ids, rows.status


def _fill_target(rows: "_Rows", layout: Layout, ps: Side, qs: Side | None, target: Any, options: Options,
                 threads: int = 1) -> "_Rows":
    """The nll_p, nll_q and delta_p rows of `rows`, at the token that came next (`target`)."""
    wanted, ids, status = _target_request(rows, layout, target)
    if not wanted:
        return rows
    from .kernels.compare import target_rows

    inv_t = [1.0 / t if kind == "logits" else 1.0 for kind, t in
             ((options.p_kind, options.p_temperature), (options.q_kind, options.q_temperature))]
    outs = {m: np.empty(len(status)) for m in ("nll_p", "nll_q", "delta_p")}
    args = (ps.offsets, ps.values, int(ps.decode), KIND_CODE[options.p_kind], inv_t[0],
            qs.offsets, qs.values, int(qs.decode), KIND_CODE[options.q_kind], inv_t[1],
            np.ascontiguousarray(ids), status, outs["nll_p"], outs["nll_q"], outs["delta_p"])
    _run_blocks(target_rows, args, ps.offsets, threads)
    bad = status != OK
    for m in wanted:
        rows.values[layout.measures.index(m)] = outs[m]
    rows.values[:, bad] = np.nan  # a target outside its row: the row is invalid for every measure
    return rows


def _fill_top1(rows: "_Rows", layout: Layout, ps: Side, qs: Side | None, p_ids: Any = None,
               q_ids: Any = None, threads: int = 1) -> "_Rows":
    """The top1_agree row of `rows`, where the kernel left the rows it validated ok."""
    if "top1_agree" not in layout.measures:
        return rows
    from .kernels.compare import top1_rows

    if qs is None:
        raise OptionError("q is required for top1_agree")
    i = layout.measures.index("top1_agree")
    none = empty_ids()
    args = tuple(a for side, ids in ((ps, p_ids), (qs, q_ids)) for a in (
        side.offsets, side.values, int(side.decode), (ids or none).offsets, (ids or none).ids, ids is not None))
    out = np.empty(len(rows.status), dtype=np.float64)
    _run_blocks(top1_rows, args + (rows.status, out), ps.offsets, threads)
    rows.values[i] = out
    if rows.lower is not None:  # a top-k list holds the true top-1: exact
        rows.lower[i] = rows.upper[i] = out
    return rows


def _run_rows(cols: dict[str, Any], pre: np.ndarray | None, layout: Layout, options: Options,
              use_q: bool, threads: int) -> _Rows:
    """Run the kernel over token rows (`pre`: codes settled before it, e.g. from a sequence's mask)."""
    if options.p_kind == "sampled":
        return _run_sampled(cols, pre, layout, options, threads)
    if layout.sparse:
        return _run_sparse(cols, pre, layout, options, use_q, threads)
    ps, qs = side_pair(cols["p"], cols.get("q"), options.p_dtype, options.q_dtype)
    n = ps.n
    values = np.empty((len(layout.measures), n), dtype=np.float64)
    status = np.empty(n, dtype=np.uint8)
    _run_piece(ps, qs, _pre_status(pre, ps, qs), _slots(layout.measures), options, use_q, values, status, threads)
    rows = _Rows(values, status, lambda i, reason: _describe_target(cols, i, reason) or
                 _describe_dense(ps, qs, options, i, reason))
    rows = _fill_top1(rows, layout, ps, qs, threads=threads)
    return _fill_target(rows, layout, ps, qs, cols.get("target"), options, threads)


def _run_sparse(cols: dict[str, Any], pre: np.ndarray | None, layout: Layout, options: Options,
                use_q: bool, threads: int) -> _Rows:
    """The sparse kernel over token rows: a side with ids lists its top-k, one without is dense."""
    from .kernels.sparse import sparse_rows

    ps, qs = side_pair(cols["p"], cols.get("q"), options.p_dtype, options.q_dtype)
    p_ids = ids_side(cols["p_ids"], "p_ids") if "p_ids" in cols else None
    q_ids = ids_side(cols["q_ids"], "q_ids") if use_q and "q_ids" in cols else None
    pre = _pre_status(merge_pre_status(_pre_status(pre, ps, qs), p_ids, q_ids), ps)
    n, m = ps.n, len(layout.measures)
    values = np.empty((m, n), dtype=np.float64)
    bounds = (m, n) if layout.bounds else (m, 0)
    lower, upper = np.empty(bounds), np.empty(bounds)
    listed = np.empty((2, n), dtype=np.float64)
    status = np.empty(n, dtype=np.uint8)
    qq, q_id = (qs, q_ids) if qs is not None else (ps, p_ids)
    none = empty_ids()
    args = (
        ps.offsets, (p_ids or none).offsets, (p_ids or none).ids, ps.values, ps.mask, int(ps.mask_offset),
        p_ids is None, int(ps.decode),
        qq.offsets, (q_id or none).offsets, (q_id or none).ids, qq.values, qq.mask, int(qq.mask_offset),
        q_id is None, int(qq.decode),
        pre, bool(use_q), KIND_CODE[options.p_kind], KIND_CODE[options.q_kind],
        -1 if options.vocab is None else int(options.vocab), TAILS.index(options.tail), bool(layout.bounds),
        float(options.sum_tol), 1.0 / math.log(options.base),
        float(options.gjs_beta), float(options.alpha - 1.0) if options.alpha else 0.0,
        _slots(layout.measures), values, lower, upper, listed, status,
    )
    _run_blocks(sparse_rows, args, ps.offsets, threads)
    sides = {"p": (ps, p_ids, options.p_kind), "q": (qs, q_ids, options.q_kind)}

    def describe(i: int, reason: str) -> str:
        return (describe_sparse(sides, options, i, reason) or _describe_target(cols, i, reason, options.vocab)
                or _describe_dense(ps, qs, options, i, reason))

    rows = _Rows(values, status, describe, lower if layout.bounds else None,
                 upper if layout.bounds else None, listed)
    rows = _fill_top1(rows, layout, ps, qs, p_ids, q_ids, threads)
    return _fill_target_sparse(rows, layout, ps, qs, p_ids, q_ids, cols.get("target"), options, threads)


def _fill_target_sparse(rows: "_Rows", layout: Layout, ps: Side, qs: Side, p_ids, q_ids, target: Any,
                        options: Options, threads: int = 1) -> "_Rows":
    """nll_p, nll_q, delta_p of top-k rows: exact where the target is listed, else null (status
    target_unlisted) with bounds from what an unlisted token can hold."""
    wanted, ids, status = _target_request(rows, layout, target)
    if not wanted:
        return rows
    from .kernels.compare import target_rows_sparse

    n = len(status)
    outs = {m: np.empty(n) for m in ("nll_p", "nll_q", "delta_p")}
    lower, upper = np.empty((3, n)), np.empty((3, n))
    none = empty_ids()
    sides = [a for side, sid, kind in ((ps, p_ids, options.p_kind), (qs, q_ids, options.q_kind)) for a in (
        side.offsets, side.values, int(side.decode), KIND_CODE[kind], (sid or none).offsets, (sid or none).ids,
        sid is not None)]
    need_p = "nll_p" in wanted or "delta_p" in wanted
    need_q = "nll_q" in wanted or "delta_p" in wanted
    args = (*sides, np.ascontiguousarray(ids), -1 if options.vocab is None else int(options.vocab), need_p, need_q,
            status, outs["nll_p"], outs["nll_q"], outs["delta_p"], lower, upper)
    _run_blocks(target_rows_sparse, args, ps.offsets, threads)
    for m in wanted:
        i, r = layout.measures.index(m), ("nll_p", "nll_q", "delta_p").index(m)
        rows.values[i] = outs[m]
        if rows.lower is not None:
            rows.lower[i], rows.upper[i] = lower[r], upper[r]
    bad = ~valid_rows(status)
    rows.values[:, bad] = np.nan  # a target outside its row: the row is invalid for every measure
    if rows.lower is not None:
        rows.lower[:, bad] = rows.upper[:, bad] = np.nan
    return rows


def _run_sampled(cols: dict[str, Any], pre: np.ndarray | None, layout: Layout, options: Options,
                 threads: int) -> _Rows:
    """The RLHF estimators over token rows of one sampled log-prob per side."""
    from .kernels.sampled import sampled_rows

    p, q = scalar_values(cols["p"], "p"), scalar_values(cols["q"], "q")
    n = len(p[0])
    if pre is None:
        pre = np.zeros(n, dtype=np.uint8)
        for null in (p[3], q[3]):
            if null is not None:
                pre[null] = NULL
    values = np.empty((len(layout.measures), n), dtype=np.float64)
    status = np.empty(n, dtype=np.uint8)
    args = (*p[:3], *q[:3], _read_only(pre), float(options.sum_tol), _sampled_slots(layout), values, status)
    _run_ranges(sampled_rows, args, _even_blocks(n, threads), threads)
    return _Rows(values, status, _sampled_describe(cols["p"], cols["q"], options))


def _sampled_slots(layout: Layout) -> np.ndarray:
    """Which row of the outputs receives each estimator (kernels.sampled slot order; -1: not asked)."""
    from .kernels.sampled import N_SAMPLED

    slots = np.full(N_SAMPLED, -1, dtype=np.int64)
    for i, m in enumerate(layout.measures):
        slots[SAMPLED_INDEX[m]] = i
    return slots


def _sampled_describe(p: Any, q: Any, options: Options) -> Callable[[int, str], str]:
    """Why position (token row) `i` of the sampled log-prob columns p, q is bad."""
    def value(col: Any, i: int) -> float | None:
        if isinstance(col, np.ndarray):
            return float(col[i])
        x = col[i]
        return float(x.as_py()) if x.is_valid else None

    def describe(i: int, reason: str) -> str:
        for name, col, what in (("p", p, "the log-prob of a token the policy sampled"),
                                ("q", q, "a log-prob under the reference")):
            x = value(col, i)
            if x is None:
                return f"{name} is null"
            bad = {"nan": x != x, "negative": x > options.sum_tol,
                   "non_finite": x == math.inf or (name == "p" and x == -math.inf)}
            if bad.get(reason):
                return f"{name} = {x!r} cannot be {what}"
        return ""

    return describe


_NO_PRE = np.zeros(0, dtype=np.uint8)


def _sampled_sequence_result(cols: dict[str, Any], layout: Layout, options: Options, threads: int) -> Result:
    """Sequence rows of sampled log-probs in one fused pass (kernels.sampled.sampled_sequences):
    sums, counts and statuses per sequence; the per-position values only for `m_tokens`,
    else on first use (the summary's token level)."""
    from .kernels.sampled import sampled_sequences

    seqs = flatten({"p": cols["p"], "q": cols["q"]}, cols.get("mask"), cols.get("lengths"), sampled=True)
    p = scalar_values(seqs.columns["p"], "p")[0]
    q = scalar_values(seqs.columns["q"], "q")[0]
    # nulls of either side are in it (NULL_ELEMENT where counted); None: every position counts
    pre = _read_only(seqs.pre if seqs.pre is not None else _NO_PRE)
    slots = _sampled_slots(layout)
    n, m, positions = seqs.n, len(layout.measures), int(seqs.offsets[-1])

    def run(want_tokens: bool) -> tuple[np.ndarray, ...]:
        """(sums, tokens, status, first bad position, token values, token statuses) of every sequence."""
        out = (np.empty((m, n)), np.empty(n, dtype=np.int64), np.empty(n, dtype=np.uint8), np.empty(n, dtype=np.int64),
               np.empty((m, positions if want_tokens else 0)), np.empty(positions if want_tokens else 0, np.uint8))
        args = (seqs.offsets, _read_only(seqs.status), pre, seqs.pre is not None, p, q, float(options.sum_tol),
                slots, out[0], out[1], out[2], out[3], want_tokens, out[4], out[5])
        _run_blocks(sampled_sequences, args, seqs.offsets, threads)
        return out

    sums, tokens, status, first_bad, token_values, token_status = run(layout.per_token)
    if layout.per_token:
        per_token = PerToken(seqs.offsets, token_values, token_status)
    else:  # the same run with them, if they are read (the summary's token level)
        per_token = PerToken(seqs.offsets, fill=lambda: run(True)[4:])
    at = _sampled_describe(seqs.columns["p"], seqs.columns["q"], options)

    def describe(i: int, reason: str) -> tuple[int | None, str]:
        j = int(first_bad[i])
        if j < 0:
            return None, describe_sequence(seqs, i, reason)
        return j - int(seqs.offsets[i]), at(j, reason)

    return Result(layout, sums, status, options, tokens=tokens, per_token=per_token, _describe=[(0, n, describe)])


def _describe_target(cols: dict[str, Any], i: int, reason: str, vocab: int | None = None) -> str:
    if reason != "id_out_of_range" or cols.get("target") is None:
        return ""
    ids, _ = target_ids(cols["target"])
    t = int(ids[i])
    if "p_ids" in cols or "q_ids" in cols:  # top-k rows: ids of a vocabulary
        within = f"[0, {vocab})" if vocab is not None else "the ids (>= 0) and of the dense side's row"
        return f"target = {t} is outside {within}"
    return f"target = {t} is not a position of the row"


def _token_result(cols: dict[str, Any], layout: Layout, options: Options, use_q: bool, threads: int) -> Result:
    if "mask" in cols or "lengths" in cols:
        raise OptionError("mask and lengths are for sequence rows (a list of positions per row, "
                          "lists of lists); these rows hold one distribution each")
    rows = _run_rows(cols, None, layout, options, use_q, threads)
    describe = lambda i, reason: (None, rows.describe(i, reason))  # noqa: E731
    return Result(layout, rows.values, rows.status, options, rows.lower, rows.upper, rows.listed,
                  _describe=[(0, len(rows.status), describe)])


def _sequence_result(cols: dict[str, Any], layout: Layout, options: Options, use_q: bool,
                     threads: int) -> Result:
    """Sequence rows: the kernel over their counted positions, then sums per sequence."""
    if options.p_kind == "sampled":
        return _sampled_sequence_result(cols, layout, options, threads)
    seqs = flatten({k: v for k, v in cols.items() if k not in ("mask", "lengths", "target")},
                   cols.get("mask"), cols.get("lengths"), sampled=options.p_kind == "sampled",
                   target=cols.get("target"))
    rows = _run_rows(seqs.columns, seqs.pre_status, layout, options, use_q, threads)
    stacked = [a for a in (rows.values, rows.lower, rows.upper, rows.listed) if a is not None]
    per_position = np.ascontiguousarray(np.concatenate(stacked) if len(stacked) > 1 else stacked[0])
    n = seqs.n
    sums = np.empty((per_position.shape[0], n), dtype=np.float64)
    tokens = np.empty(n, dtype=np.int64)
    status = np.empty(n, dtype=np.uint8)
    first_bad = np.empty(n, dtype=np.int64)
    sum_positions(seqs.offsets, seqs.status, rows.status, per_position, sums, tokens, status, first_bad)
    parts = iter(np.split(sums, np.cumsum([len(a) for a in stacked])[:-1]))
    values = next(parts)
    lower, upper = (next(parts), next(parts)) if rows.lower is not None else (None, None)
    listed = None
    if rows.listed is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            listed = next(parts) / tokens
    per_token = PerToken(seqs.offsets, rows.values, rows.status)  # the summary's token level

    def describe(i: int, reason: str) -> tuple[int | None, str]:
        j = int(first_bad[i])
        if j < 0:
            return None, describe_sequence(seqs, i, reason)
        return j - int(seqs.offsets[i]), rows.describe(j, reason)

    return Result(layout, values, status, options, lower, upper, listed, tokens, per_token, [(0, n, describe)])


def compute(
    p: Any,
    q: Any | None,
    measures: tuple[str, ...] | list[str] | str,
    options: Options,
    *,
    p_ids: Any | None = None,
    q_ids: Any | None = None,
    mask: Any | None = None,
    lengths: Any | None = None,
    target: Any | None = None,
    threads: int | None = None,
) -> Result:
    """Compute `measures` for every row of (p, q). Never raises for bad rows: see `Result.status`.

    Rows are token rows (one distribution each) or sequence rows (one per
    position, lists of lists); `mask` / `lengths` say which positions of a
    sequence count.
    """
    measures = check_measures(measures)
    # a DLPack tensor (torch, JAX, ...) is read as NumPy; a bfloat16 one declares itself (uint16 bits)
    p, p_dtype = imported(p, options.p_dtype, "p")
    q, q_dtype = imported(q, options.q_dtype, "q")
    options = dataclasses.replace(options, p_dtype=p_dtype, q_dtype=q_dtype)
    use_q = needs_q(measures)
    if use_q and q is None:
        raise OptionError(f"q is required for {', '.join(m for m in measures if m != 'entropy')}")
    sparse = check_request(measures, options, p_ids=p_ids is not None, q_ids=q_ids is not None, has_q=use_q,
                           has_target=target is not None)
    columns = {"p": p, "q": q if use_q else None, "p_ids": p_ids, "q_ids": q_ids if use_q else None,
               "mask": mask, "lengths": lengths, "target": target}
    n, pieces = aligned_columns(columns)
    sequence = _is_sequence_input(pieces, sampled=options.p_kind == "sampled")
    layout = layout_for(measures, options, sequence=sequence, sparse=sparse)
    threads = _config.cores() if threads is None else check_threads(threads)
    run = _sequence_result if sequence else _token_result
    parts = [(first, run(cols, layout, options, use_q, threads)) for first, cols in pieces]
    return concat(layout, options, parts) if parts else empty(layout, options)


def _is_sequence_input(pieces: list[tuple[int, dict[str, Any]]], sampled: bool = False) -> bool:
    """Sequence rows or token rows; p and q must agree."""
    if not pieces:
        return False
    cols = pieces[0][1]
    kinds = {name: is_sequence(cols[name], sampled) for name in ("p", "q") if name in cols}
    if len(set(kinds.values())) > 1:
        seq = [k for k, v in kinds.items() if v][0]
        raise OptionError(f"{seq} holds sequence rows (lists of lists) but the other side holds token rows; "
                          "give both sides the same shape")
    return kinds["p"]


def kernel_dtype(*value_types: Any) -> np.dtype:
    """The values dtype the kernel runs on for sides of these element types
    (pyarrow or NumPy): float64 if any side is float64, else float32."""
    wide = any(np.dtype(t.to_pandas_dtype() if isinstance(t, pa.DataType) else t) == np.float64
               for t in value_types)
    return np.dtype(np.float64 if wide else np.float32)


def warmup(dtypes: tuple[Any, ...] = (np.float32, np.float64), options: Options | None = None,
           measures: tuple[str, ...] = ("kl",), sparse: bool = False) -> None:
    """Compile (or load from Numba's on-disk cache) the kernel for these dtypes,
    the kinds of `options` (default: probs) and `measures` (with or without q:
    another kernel family for some kinds); `sparse`: the top-k kernel, for the
    usual ids types (int32, int64).

    Each specialisation costs seconds to compile the first time on a machine,
    so callers that know their data warm only the ones they will use.
    """
    opts = dataclasses.replace(options or Options(), per_token=False)  # warmed on token rows
    for dtype in dtypes:
        if measures == ("gaussian_kl",):
            x = np.zeros((1, 2), dtype=dtype)
            compute_gaussian(dict.fromkeys(GAUSSIAN_COLUMNS, x), opts, threads=1)
            continue
        if opts.p_kind == "sampled":
            x = np.full(2, -0.5, dtype=dtype)
            compute(x, x, measures, opts, threads=1)  # token rows
            x = pa.array([[-0.5, -0.25]], type=pa.list_(pa.from_numpy_dtype(dtype)))
            compute(x, x, measures, opts, threads=1)  # sequence rows (the fused kernel)
            continue
        x = np.full((1, 2), 0.5, dtype=dtype)
        q = x if needs_q(check_measures(measures)) else None
        target = np.zeros(1, dtype=np.int64) if TARGET_MEASURES.intersection(measures) else None
        for ids in ((np.array([[0, 1]], dtype=np.int32), np.array([[0, 1]])) if sparse else (None,)):
            compute(x, q, measures, opts, p_ids=ids, q_ids=ids, target=target, threads=1)


GAUSSIAN_COLUMNS = ("p_mean", "p_logvar", "q_mean", "q_logvar")


def compute_gaussian(columns: dict[str, Any], options: Options, *, threads: int | None = None) -> Result:
    """KL between diagonal Gaussians per row, from four columns of per-dimension values
    (`GAUSSIAN_COLUMNS`: lists of floats, or 2-D arrays). Never raises for bad rows."""
    from .kernels.gaussian import gaussian_rows

    layout = Layout(("gaussian_kl",))
    n, pieces = aligned_columns({name: columns[name] for name in GAUSSIAN_COLUMNS})
    threads = _config.cores() if threads is None else check_threads(threads)
    parts = []
    for first, cols in pieces:
        sides = [_side(cols[name], name) for name in GAUSSIAN_COLUMNS]
        pre = _pre_status(None, *sides)
        values = np.empty((1, sides[0].n), dtype=np.float64)
        status = np.empty(sides[0].n, dtype=np.uint8)
        args = tuple(a for s in sides for a in (s.offsets, s.values, s.mask, int(s.mask_offset)))
        args += (pre, 1.0 / math.log(options.base), values[0], status)
        _run_blocks(gaussian_rows, args, sides[0].offsets, threads)
        describe = _gaussian_describe(sides)
        parts.append((first, Result(layout, values, status, options, _describe=[(0, sides[0].n, describe)])))
    return concat(layout, options, parts) if parts else empty(layout, options)


def _side(x: Any, name: str) -> Side:
    side = side_pair(x, None)[0]
    return side.astype(np.float64) if side.decode else side  # half precision: widened (small rows)


def _gaussian_describe(sides: list[Side]) -> Callable[[int, str], tuple[int | None, str]]:
    def describe(i: int, reason: str) -> tuple[int | None, str]:
        if reason == "length_mismatch":
            counts = ", ".join(f"{name} {len(s.row(i))}" for name, s in zip(GAUSSIAN_COLUMNS, sides))
            return None, f"the four columns have different numbers of dimensions ({counts})"
        for name, s in zip(GAUSSIAN_COLUMNS, sides):
            x, nulls = s.row(i).astype(np.float64), s.row_nulls(i)
            if reason == "null_element" and nulls.size:
                return None, f"{name}[{nulls[0]}] is null"
            bad = np.isnan(x) if reason == "nan" else ~np.isfinite(x)
            if reason in ("nan", "non_finite") and bad.any():
                j = int(np.flatnonzero(bad)[0])
                return None, f"{name}[{j}] is {x[j]}"
        return None, ""

    return describe
