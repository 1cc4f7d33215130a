"""Model comparison per row: does P's most likely token equal Q's (flat buffers only).

The argmax of the stored values is the argmax of the distribution for every
encoding (probs, log-probs, logits at any temperature > 0: the decodings are
increasing), so no row is decoded; a tie goes to the first position. A side
with token ids names its token by id (the top-k list holds the true top-1).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .dense import OK, TARGET_UNLISTED
from .half import as_float32

# Numba checks its on-disk cache against this file only: this digest of the kernel
# modules imported above ties the cache to them too (tests/test_layout.py).
INLINES_DIGEST = "8d136917092d2ae4"

ID_OUT_OF_RANGE = 13  # fastkl._registry.STATUSES order (checked by tests/test_compare.py)

_jit = njit(nogil=True, cache=True, error_model="numpy")


@_jit
def _top1(values, start, k, decode, id_offsets, ids, has_ids, row):
    best = 0
    top = as_float32(values[start], decode) if k else 0.0
    for j in range(1, k):
        x = as_float32(values[start + j], decode)
        if x > top:
            top = x
            best = j
    return np.int64(ids[id_offsets[row] + best]) if has_ids else np.int64(best)


@_jit
def top1_rows(p_offsets, p_values, p_decode, p_id_offsets, p_ids, p_has_ids,
              q_offsets, q_values, q_decode, q_id_offsets, q_ids, q_has_ids, status, out, start, stop):
    """out[i] = 1.0 where the top token of P is Q's, 0.0 where not, NaN where status[i] != OK."""
    for i in range(start, stop):
        if status[i] != OK:
            out[i] = np.nan
            continue
        ps, qs = p_offsets[i], q_offsets[i]
        a = _top1(p_values, ps, p_offsets[i + 1] - ps, p_decode, p_id_offsets, p_ids, p_has_ids, i)
        b = _top1(q_values, qs, q_offsets[i + 1] - qs, q_decode, q_id_offsets, q_ids, q_has_ids, i)
        out[i] = 1.0 if a == b else 0.0


@_jit
def _log_prob_at(values, start, k, decode, kind, inv_t, t):
    """The natural log-probability of entry t of one row, decoded by `kind` (0 probs, 1 log-probs,
    2 logits at 1/inv_t): log p_t, x_t, or x_t/T - log sum exp(x/T) (max-shifted, exact to rounding)."""
    x = np.float64(as_float32(values[start + t], decode))
    if kind == 0:
        return math.log(x) if x > 0.0 else -math.inf
    if kind == 1:
        return x
    top = -math.inf
    for j in range(k):
        top = max(top, np.float64(as_float32(values[start + j], decode)) * inv_t)
    total = 0.0
    for j in range(k):
        total += math.exp(np.float64(as_float32(values[start + j], decode)) * inv_t - top)
    return x * inv_t - top - math.log(total)


@_jit
def target_rows(p_offsets, p_values, p_decode, p_kind, p_inv_t, q_offsets, q_values, q_decode, q_kind, q_inv_t,
                target, status, nll_p, nll_q, delta_p, start, stop):
    """-log p(target), -log q(target) and q(target) - p(target) per row; a target outside the row
    makes it id_out_of_range (status is updated), rows not OK get NaN."""
    for i in range(start, stop):
        t = np.int64(target[i])
        ps, qs = p_offsets[i], q_offsets[i]
        k = p_offsets[i + 1] - ps
        if status[i] == OK and not (0 <= t < k):
            status[i] = ID_OUT_OF_RANGE
        if status[i] != OK:
            nll_p[i] = nll_q[i] = delta_p[i] = np.nan
            continue
        lp = _log_prob_at(p_values, ps, k, p_decode, p_kind, p_inv_t, t)
        lq = _log_prob_at(q_values, qs, k, q_decode, q_kind, q_inv_t, t)
        nll_p[i] = -lp
        nll_q[i] = -lq
        delta_p[i] = math.exp(lq) - math.exp(lp)


@_jit
def _listed_at(values, start, k, decode, kind, id_offsets, ids, has_ids, row, t):
    """(log p of token t or NaN when it is not listed, smallest listed probability, listed mass)
    of one side of a top-k row; a dense side lists every token of its row (t < k)."""
    lp = np.nan
    smallest = math.inf
    mass = 0.0
    for j in range(k):
        x = np.float64(as_float32(values[start + j], decode))
        prob = x if kind == 0 else math.exp(x)
        smallest = min(smallest, prob)
        mass += prob
        if (ids[id_offsets[row] + j] if has_ids else j) == t:
            lp = math.log(x) if kind == 0 else x
            if kind == 0 and x == 0.0:
                lp = -math.inf
    return lp, smallest, mass


@_jit
def _unlisted_cap(smallest, mass):
    """The most an unlisted token can have: no more than the smallest listed value
    (the list is the top k) nor than the mass left unlisted."""
    return max(min(smallest, 1.0 - mass), 0.0)


@_jit
def target_rows_sparse(p_offsets, p_values, p_decode, p_kind, p_id_offsets, p_ids, p_has_ids,
                       q_offsets, q_values, q_decode, q_kind, q_id_offsets, q_ids, q_has_ids,
                       target, vocab, need_p, need_q, status, nll_p, nll_q, delta_p, lower, upper, start, stop):
    """nll_p, nll_q, delta_p of top-k rows (rows 0-2 of lower / upper their bounds): exact where
    the target is listed; else NaN, with bounds from the unlisted token's cap, and the row's
    status target_unlisted when a side a requested measure needs (need_p, need_q) misses it.
    A target outside [0, vocab) (vocab < 0: unknown), or beyond a dense row, is id_out_of_range."""
    for i in range(start, stop):
        t = np.int64(target[i])
        if status[i] == OK and (t < 0 or (0 <= vocab <= t)
                                or (not p_has_ids and t >= p_offsets[i + 1] - p_offsets[i])
                                or (not q_has_ids and t >= q_offsets[i + 1] - q_offsets[i])):
            status[i] = ID_OUT_OF_RANGE
        if status[i] != OK:
            nll_p[i] = nll_q[i] = delta_p[i] = np.nan
            for r in range(3):
                lower[r, i] = upper[r, i] = np.nan
            continue
        lp, p_min, p_mass = _listed_at(p_values, p_offsets[i], p_offsets[i + 1] - p_offsets[i], p_decode, p_kind,
                                       p_id_offsets, p_ids, p_has_ids, i, t)
        lq, q_min, q_mass = _listed_at(q_values, q_offsets[i], q_offsets[i + 1] - q_offsets[i], q_decode, q_kind,
                                       q_id_offsets, q_ids, q_has_ids, i, t)
        p_lo, p_hi = (math.exp(lp), math.exp(lp)) if lp == lp else (0.0, _unlisted_cap(p_min, p_mass))
        q_lo, q_hi = (math.exp(lq), math.exp(lq)) if lq == lq else (0.0, _unlisted_cap(q_min, q_mass))
        nll_p[i] = -lp
        nll_q[i] = -lq
        delta_p[i] = math.exp(lq) - math.exp(lp)  # NaN unless both are listed
        lower[0, i] = -math.log(p_hi) if p_hi > 0.0 else math.inf
        upper[0, i] = -math.log(p_lo) if p_lo > 0.0 else math.inf
        lower[1, i] = -math.log(q_hi) if q_hi > 0.0 else math.inf
        upper[1, i] = -math.log(q_lo) if q_lo > 0.0 else math.inf
        lower[2, i] = q_lo - p_hi
        upper[2, i] = q_hi - p_lo
        if (need_p and lp != lp) or (need_q and lq != lq):
            status[i] = TARGET_UNLISTED
