"""RLHF estimators of KL(policy || reference) from sampled-token log-probs (flat buffers only).

Per position, p is the log-probability of the sampled token under the
policy and q under the reference; with r = q - p the estimators are
k1 = -r, k2 = r^2 / 2, k3 = e^r - 1 - r and abs = |r| (Schulman's k1-k3).
k3 is computed without cancellation (a series near r = 0, expm1 elsewhere)
and never clamped: it is >= 0 always and +inf only when e^r overflows.
A reference log-prob of -inf (the reference gives the token probability 0)
makes every estimator +inf; a policy log-prob of -inf cannot be (the policy
sampled that token) and is a bad position, as are NaN, +inf and
log-probs > sum_tol.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .dense import NAN, NEGATIVE, NON_FINITE, NULL_ELEMENT, OK, valid_bit

K1, K2, K3, ABS = 0, 1, 2, 3  # slots: fastkl._registry.SAMPLED_MEASURES order
N_SAMPLED = 4
INF = math.inf

_jit = njit(nogil=True, cache=True, error_model="numpy")

# 1/n! for n = 2..18: the series of e^r - 1 - r, below an ulp for |r| < 0.5 (0.5^19/19! ~ 2e-23)
_INV_FACT = np.array([1.0 / math.factorial(n) for n in range(2, 19)])


@_jit
def k3_term(r):
    """e^r - 1 - r for a float64 r (-inf gives +inf)."""
    if abs(r) < 0.5:
        acc = 0.0
        for n in range(_INV_FACT.size - 1, -1, -1):
            acc = acc * r + _INV_FACT[n]
        return acc * r * r
    return math.expm1(r) - r


@_jit
def _bad(x, sum_tol, is_policy):
    """The reason a stored log-prob cannot be used (OK if it can)."""
    if x != x:
        return NAN
    if x == INF or (is_policy and x == -INF):
        return NON_FINITE
    if x > sum_tol:
        return NEGATIVE  # a log-probability > 0: a probability > 1
    return OK


@_jit
def sampled_rows(p_values, p_mask, p_mask_offset, q_values, q_mask, q_mask_offset, pre_status, sum_tol,
                 slots, out, status, start, stop):
    """The requested estimators (slots[m]: row of `out`, or -1) for positions start..stop."""
    for i in range(start, stop):
        code = np.int64(pre_status[i])
        if code == OK and not (valid_bit(p_mask, p_mask_offset, i) and valid_bit(q_mask, q_mask_offset, i)):
            code = NULL_ELEMENT
        p = np.float64(p_values[i])
        q = np.float64(q_values[i])
        if code == OK:
            code = _bad(p, sum_tol, True)
        if code == OK:
            code = _bad(q, sum_tol, False)
        status[i] = code
        if code != OK:
            for m in range(N_SAMPLED):
                if slots[m] >= 0:
                    out[slots[m], i] = np.nan
            continue
        r = q - p  # the log-probs as stored (up to sum_tol above 0 is accepted, as rounding)
        if slots[K1] >= 0:
            out[slots[K1], i] = p - q  # -r, without a -0.0 where they agree
        if slots[K2] >= 0:
            out[slots[K2], i] = 0.5 * r * r
        if slots[K3] >= 0:
            out[slots[K3], i] = k3_term(r)
        if slots[ABS] >= 0:
            out[slots[ABS], i] = abs(r)
