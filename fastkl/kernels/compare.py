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

from .dense import OK

ID_OUT_OF_RANGE = 12  # fastkl._registry.STATUSES order (checked by tests/test_compare.py)
from .half import as_float32

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
