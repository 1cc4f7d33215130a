"""Numba kernels over flat buffers: the only place where the math happens.

The kernels know nothing of Arrow, NumPy shapes or Dask. A side (P or Q) is
three buffers: `offsets` (int64, row i is values[offsets[i]:offsets[i+1]]),
`values` (float32 or float64) and an optional element-validity bitmap (Arrow
layout, LSB first, empty when the side has no null elements). The kernel
walks rows `start..stop`, writes one float64 per requested measure into
`out` and one status code per row into `status`; rows are independent, so
any split of the row range gives bit-identical results.

Choices, made on purpose:

* Serial, `nogil=True` kernels. Parallelism comes from calling the kernel on
  disjoint row ranges from several Python threads (see `_engine.py`); this is
  thread-safe by construction (no Numba threading layer, whose default
  workqueue layer is not safe to enter from several threads at once) and the
  same kernel serves a laptop call and a Dask task with one thread.
* fastmath: only `nsz` (ignore the sign of zero), `contract` (allow FMA) and
  `reassoc` (reorder sums so LLVM can vectorise reductions). Never `nnan`/
  `ninf`: +inf is a correct KL and NaN must be detected (SPEC §2, §4). No
  `afn`/`arcp`: approximate functions would break the error bound.
* `cache=True`: the compiled kernels go to Numba's on-disk cache, so only the
  very first call on a machine pays the compile. Two specialisations exist
  (float32 and float64 values; mixed inputs are cast to float64 first).
* Accuracy (SPEC §2): sums are in float64; log(p/q) is taken as
  log1p((p-q)/q) when p/q is near 1 (where log(p)-log(q) would cancel) and
  the Jensen-Shannon and Hellinger terms are written in forms that do not
  cancel when P and Q are close.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

FASTMATH = {"nsz", "contract", "reassoc"}

# Kinds (fastkl._registry.KINDS order).
PROBS, LOGPROBS, LOGITS = 0, 1, 2

# Status codes (fastkl._registry.STATUSES order).
OK, NULL, LENGTH_MISMATCH, EMPTY, NULL_ELEMENT, NAN, NON_FINITE, NEGATIVE, NOT_NORMALIZED = range(9)

# Measure slots (fastkl._registry.MEASURES order).
KL, REVERSE_KL, JEFFREYS, JS, ENTROPY, CROSS_ENTROPY, TV, HELLINGER = range(8)
N_MEASURES = 8

LN2 = math.log(2.0)
INF = math.inf
NAN_ = math.nan

_jit = njit(nogil=True, cache=True, fastmath=FASTMATH)


@_jit
def _is_null(mask, mask_offset, idx):
    """True when element `idx` is null in an Arrow validity bitmap (empty = none null)."""
    if mask.size == 0:
        return False
    bit = mask_offset + idx
    return ((mask[bit >> 3] >> (bit & 7)) & 1) == 0


@_jit
def _scan_side(values, start, k, mask, mask_offset, kind, inv_t, normalize, sum_tol):
    """Validate one side of a row and find how to decode it.

    Returns (status, scale, centre, log_norm): probs decode as x * scale;
    logprobs and logits as (x - centre) * inv_t - log_norm.
    """
    code = OK
    total = 0.0
    top = -INF
    for j in range(k):
        idx = start + j
        if _is_null(mask, mask_offset, idx):
            code = min(code, NULL_ELEMENT) if code else NULL_ELEMENT
            continue
        x = np.float64(values[idx])
        if x != x:
            c = NAN
        elif kind == PROBS:
            if math.isinf(x):
                c = NON_FINITE
            elif x < 0.0:
                c = NEGATIVE
            else:
                total += x
                continue
        elif x == INF:
            c = NON_FINITE
        elif kind == LOGPROBS:
            if x > sum_tol:
                c = NEGATIVE
            else:
                total += math.exp(x)
                continue
        else:  # LOGITS
            if x > top:
                top = x
            continue
        code = min(code, c) if code else c
    if code:
        return code, 1.0, 0.0, 0.0
    if kind == PROBS:
        if normalize:
            if not total > 0.0:
                return NOT_NORMALIZED, 1.0, 0.0, 0.0
            return OK, 1.0 / total, 0.0, 0.0
        if abs(total - 1.0) > sum_tol:
            return NOT_NORMALIZED, 1.0, 0.0, 0.0
        return OK, 1.0, 0.0, 0.0
    if kind == LOGPROBS:
        if normalize:
            if not total > 0.0:
                return NOT_NORMALIZED, 1.0, 0.0, 0.0
            return OK, 1.0, 0.0, math.log(total)
        if abs(total - 1.0) > sum_tol:
            return NOT_NORMALIZED, 1.0, 0.0, 0.0
        return OK, 1.0, 0.0, 0.0
    # LOGITS: stable log-sum-exp around the row maximum, nothing materialised.
    if top == -INF:
        return NON_FINITE, 1.0, 0.0, 0.0
    for j in range(k):
        idx = start + j
        total += math.exp((np.float64(values[idx]) - top) * inv_t)
    return OK, 1.0, top, math.log(total)


@_jit
def _log_ratio(p, q):
    """log(p / q) for p, q > 0, accurate to a few ulps of the result."""
    d = p - q
    if abs(d) <= 0.5 * q:
        return math.log1p(d / q)  # p/q in [0.5, 1.5]: no cancellation
    r = p / q
    if 1e-300 < r < 1e300:
        return math.log(r)
    return math.log(p) - math.log(q)  # ratio out of range; far from 1, so no cancellation


@_jit
def _diff_from_logs(p, q, d):
    """p - q from p, q and d = log(p/q), without cancelling when p ~ q."""
    if d <= 0.0:
        return q * math.expm1(d)
    return -p * math.expm1(-d)


@_jit
def _js_logs(d):
    """(log(2p/(p+q)), log(2q/(p+q))) from d = log(p/q), stable for every d."""
    if abs(d) <= 1.0:
        return -math.log1p(0.5 * math.expm1(-d)), -math.log1p(0.5 * math.expm1(d))
    if d > 0.0:
        tail = math.log1p(math.exp(-d))
        return LN2 - tail, LN2 - d - tail
    tail = math.log1p(math.exp(d))
    return LN2 + d - tail, LN2 - tail


@_jit
def divergence_rows(
    p_offsets, p_values, p_mask, p_mask_offset,
    q_offsets, q_values, q_mask, q_mask_offset,
    row_null, use_q,
    p_kind, q_kind, p_inv_t, q_inv_t,
    normalize, smoothing, sum_tol, inv_log_base,
    slots, out, status, start, stop,
):
    """Compute the requested measures for rows start..stop.

    `slots[m]` is the row of `out` that receives measure m (MEASURES order),
    or -1 when m is not requested. Rows that are null or invalid get NaN.
    """
    want_kl = slots[KL] >= 0
    want_rkl = slots[REVERSE_KL] >= 0
    want_jef = slots[JEFFREYS] >= 0
    want_js = slots[JS] >= 0
    want_ent = slots[ENTROPY] >= 0
    want_ce = slots[CROSS_ENTROPY] >= 0
    want_tv = slots[TV] >= 0
    want_hel = slots[HELLINGER] >= 0
    want_ratio = want_kl or want_rkl or want_jef or want_js
    p_logdom = p_kind != PROBS and smoothing == 0.0
    q_logdom = q_kind != PROBS and smoothing == 0.0
    both_log = p_logdom and q_logdom

    for i in range(start, stop):
        code = OK
        if row_null[i]:
            code = NULL
        ps = p_offsets[i]
        k = p_offsets[i + 1] - ps
        qs = q_offsets[i]
        if code == OK and use_q and q_offsets[i + 1] - qs != k:
            code = LENGTH_MISMATCH
        if code == OK and k == 0:
            code = EMPTY
        p_scale = q_scale = 1.0
        p_c = q_c = p_ln = q_ln = 0.0
        if code == OK:
            code, p_scale, p_c, p_ln = _scan_side(
                p_values, ps, k, p_mask, p_mask_offset, p_kind, p_inv_t, normalize, sum_tol
            )
            if use_q:
                q_code, q_scale, q_c, q_ln = _scan_side(
                    q_values, qs, k, q_mask, q_mask_offset, q_kind, q_inv_t, normalize, sum_tol
                )
                if q_code and (code == OK or q_code < code):
                    code = q_code
        status[i] = code
        if code != OK:
            for m in range(N_MEASURES):
                if slots[m] >= 0:
                    out[slots[m], i] = NAN_
            continue

        smooth_norm = 1.0 / (1.0 + k * smoothing)
        kl = rkl = js = ent = ce = tv = hel = 0.0
        kl_inf = rkl_inf = False
        for j in range(k):
            # Decode: p, q probabilities; a, b their logs when the side lives in log space.
            x = np.float64(p_values[ps + j])
            if p_kind == PROBS:
                p = x * p_scale
                a = 0.0
            else:
                a = (x - p_c) * p_inv_t - p_ln
                p = math.exp(a)
            if smoothing > 0.0:
                p = (p + smoothing) * smooth_norm
            p_pos = a > -INF if p_logdom else p > 0.0
            if use_q:
                y = np.float64(q_values[qs + j])
                if q_kind == PROBS:
                    q = y * q_scale
                    b = 0.0
                else:
                    b = (y - q_c) * q_inv_t - q_ln
                    q = math.exp(b)
                if smoothing > 0.0:
                    q = (q + smoothing) * smooth_norm
                q_pos = b > -INF if q_logdom else q > 0.0
            else:
                q, b, q_pos = p, a, p_pos

            if want_ent and p_pos:
                ent -= p * (a if p_logdom else math.log(p))
            if p_pos and q_pos:
                if want_ratio:
                    if both_log:
                        d = a - b
                    elif not p_logdom and not q_logdom:
                        d = _log_ratio(p, q)
                    else:
                        d = (a if p_logdom else math.log(p)) - (b if q_logdom else math.log(q))
                    kl += p * d
                    rkl -= q * d
                    if want_js:
                        lp, lq = _js_logs(d)
                        js += p * lp + q * lq
                if want_ce:
                    ce -= p * (b if q_logdom else math.log(q))
                if want_tv or want_hel:
                    if both_log:
                        diff = _diff_from_logs(p, q, a - b)
                    else:
                        diff = p - q
                    tv += abs(diff)
                    if want_hel:
                        root_sum = math.sqrt(p) + math.sqrt(q)
                        if root_sum > 0.0:  # both may underflow to 0 in log space
                            h = diff / root_sum
                            hel += h * h
            elif p_pos:  # q_i = 0
                kl_inf = True
                js += p * LN2
                tv += p
                hel += p
            elif q_pos:  # p_i = 0
                rkl_inf = True
                js += q * LN2
                tv += q
                hel += q

        if want_kl:
            out[slots[KL], i] = INF if kl_inf else max(kl, 0.0) * inv_log_base
        if want_rkl:
            out[slots[REVERSE_KL], i] = INF if rkl_inf else max(rkl, 0.0) * inv_log_base
        if want_jef:
            out[slots[JEFFREYS], i] = (
                INF if (kl_inf or rkl_inf) else (max(kl, 0.0) + max(rkl, 0.0)) * inv_log_base
            )
        if want_js:
            out[slots[JS], i] = min(max(0.5 * js, 0.0), LN2) * inv_log_base
        if want_ent:
            out[slots[ENTROPY], i] = min(max(ent, 0.0), math.log(k)) * inv_log_base
        if want_ce:
            out[slots[CROSS_ENTROPY], i] = INF if kl_inf else max(ce, 0.0) * inv_log_base
        if want_tv:
            out[slots[TV], i] = min(0.5 * tv, 1.0)
        if want_hel:
            out[slots[HELLINGER], i] = math.sqrt(min(0.5 * hel, 1.0))
