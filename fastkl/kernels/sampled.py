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

Two kernels, both branch-free in their position loops so LLVM emits SIMD
code (`k3_vec` has no libm call: one Cody-Waite reduction, one polynomial
and selects, see there):

* `sampled_rows`: one value per measure and position (token rows);
* `sampled_sequences`: sequence rows in one pass. Each sequence's positions
  are validated and their estimators summed chunk by chunk through L1
  scratch buffers: for float32 (and 16-bit, widened) input r and k3 in
  float32 at full width, whose error bound allows it, then their sums in
  float64 (`_chunk_32`, `_chunk_sum32`); for float64 input, and float32
  chunks that hold an r the float32 form does not take, r with the sums of
  k1, k2 and abs, then k3 from r, then its sum; no per-position
  array is written unless asked for (`m_tokens`, the summary's token level).
  A sequence holding a bad position is scanned again by the scalar rules to
  name the first one.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .dense import (FASTMATH, _is_float32, LENGTH_MISMATCH as FIRST_INVALID, NAN, NEGATIVE, NO_TOKENS, NON_FINITE, NULL,
                    NULL_ELEMENT, OK, valid_bit)  # FIRST_INVALID: the first invalid-position code
from .fastmath import bits_float, bits_float32, float32_bits
from .views import borrowed

# Numba checks its on-disk cache against this file only: this digest of the kernel
# modules imported above ties the cache to them too (tests/test_layout.py).
INLINES_DIGEST = "9f812b794934ac36"

K1, K2, K3, ABS = 0, 1, 2, 3  # slots: fastkl._registry.SAMPLED_MEASURES order
N_SAMPLED = 4
CHUNK = 1024  # positions per pass through L1-sized pieces (scratch: r and k3 in float64 and float32, 24 KiB; 8 KiB on the float32 path)
INF = math.inf

_jit = njit(nogil=True, cache=True, error_model="numpy")
# Loops of terms: no `reassoc` (the operation order of k3_vec is the algorithm);
# only the loops that sum (`_chunk_r`, `_chunk_k3_sum`, `_chunk_sum32`) have it, so that LLVM
# vectorises their float sums. The helpers
# are inlined into the loops by Numba (LLVM leaves a function as large as k3_vec
# called, and a loop with a call is not vectorised); they take the flags of the
# loop they are inlined into, which are these.
_TERMS = {"nsz", "contract"}
_kernel = njit(nogil=True, cache=True, error_model="numpy", fastmath=_TERMS)
_inline = njit(nogil=True, cache=True, error_model="numpy", fastmath=_TERMS, inline="always")

# 1/n! for n = 2..18: the series of e^r - 1 - r, below an ulp for |r| < 0.5 (0.5^19/19! ~ 2e-23)
_INV_FACT = np.array([1.0 / math.factorial(n) for n in range(2, 19)])


@_jit
def k3_term(r):
    """e^r - 1 - r for a float64 r (-inf gives +inf). Scalar (a branch and libm's expm1);
    kept for fastkl.kernels.gaussian, whose cached kernel inlines it."""
    if abs(r) < 0.5:
        acc = 0.0
        for n in range(_INV_FACT.size - 1, -1, -1):
            acc = acc * r + _INV_FACT[n]
        return acc * r * r
    return math.expm1(r) - r


# ------------------------------------------------------------------ k3 without branches
# r = k ln2 + s with k = 0 for |r| < 1/2 (then s = r) and k = round(r / ln2) elsewhere
# (|s| <= ln2/2; Cody-Waite, ln2 in two parts). With g(s) = (e^s - 1 - s) / s^2,
#   e^r - 1 - r = 2^k s^2 g(s) + ((2^k - 1) s + c_k),   c_k = 2^k - 1 - k ln2 (k3 at k ln2),
# an identity in which r itself no longer appears: c_k is exact but its last rounding
# (for |k| <= 60), so where k3 is small (|r| near 1/2) nothing cancels beyond a factor
# 1.5, and for k = 0 it is the series s^2 g(s). For |r| > 41.5 (|k| >= 60), 1 + r or
# e^r is negligible beside the other: k3 = (e^r - 1) - r, e^r = 2^(k-1) (2 e^s), from r
# clamped to [-708, 710] (e^r is then a tiny normal number below, +inf above); -inf gives +inf.
# g: the polynomial of degree 11 from mpmath.chebyfit(g, [-1/2, 1/2], 12) at 50 digits
# (2.8e-18 relative before its coefficients are rounded to float64, 1.6e-17 after).
_G0 = 0.5
_G1 = 0.16666666666666666
_G2 = 0.04166666666666706
_G3 = 0.00833333333333336
_G4 = 0.001388888888870455
_G5 = 0.00019841269841146993
_G6 = 2.4801587616145414e-05
_G7 = 2.755731943362024e-06
_G8 = 2.7557076636642725e-07
_G9 = 2.505194670972162e-08
_G10 = 2.0962955815976076e-09
_G11 = 1.6116496514371548e-10
_INV_LN2 = 1.44269504088896338700e00
_LN2_HI = 6.93147180369123816490e-01  # 32 significant bits: k * _LN2_HI is exact for |k| < 2^20
_LN2_LO = 1.90821492927058770002e-10
_R_MIN, _R_MAX = -708.0, 710.0  # the reduction's range: 2^(k-1) is a normal number, or overflows
_R_NEAR = 41.5  # |r| <= _R_NEAR: |k| <= 60


@_inline
def _g(s):
    """(e^s - 1 - s) / s^2 for |s| <= 1/2, by Horner."""
    c = _G11
    c = c * s + _G10
    c = c * s + _G9
    c = c * s + _G8
    c = c * s + _G7
    c = c * s + _G6
    c = c * s + _G5
    c = c * s + _G4
    c = c * s + _G3
    c = c * s + _G2
    c = c * s + _G1
    return c * s + _G0


@_inline
def k3_vec(r):
    """e^r - 1 - r for a float64 r, without branches or calls (vectorisable).

    >= 0 for every r; +inf for r = -inf and where e^r overflows; the value
    for a NaN r is unspecified (callers select it away).
    """
    x = min(max(r, _R_MIN), _R_MAX)  # (vmaxpd / vminpd; for a NaN r, k is 0 below whatever x is)
    k = np.floor(x * _INV_LN2 + 0.5)
    a = abs(r)
    k = k if a >= 0.5 else 0.0  # (and 0 for a NaN: no undefined conversion below)
    s = (x - k * _LN2_HI) - k * _LN2_LO
    s2g = s * s * _g(s)
    half = bits_float((np.int64(k) + 0x3FE) << 52)  # 2^(k-1), k in [-1021, 1024]
    two_k = half + half
    c_k = ((two_k - 1.0) - k * _LN2_HI) - k * _LN2_LO
    near = two_k * s2g + ((two_k - 1.0) * s + c_k)
    e = (1.0 + s) + s2g
    far = ((e + e) * half - 1.0) - r
    out = near if a <= _R_NEAR else far
    return out if out > 0.0 else 0.0  # -0.0 and roundings below 0 (none known) become 0; NaN stays NaN


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


@_inline
def _usable(p, q, sum_tol):
    """Both log-probs usable (the branch-free form of `_bad(p) == _bad(q) == OK`)."""
    return (p <= sum_tol) & (p != -INF) & (q <= sum_tol)


@_jit
def sampled_rows(p_values, p_mask, p_mask_offset, q_values, q_mask, q_mask_offset, pre_status, sum_tol,
                 slots, out, status, start, stop):
    """The requested estimators (slots[m]: row of `out`, or -1) for positions start..stop
    and their statuses: a pre-status other than OK or a null element (either validity
    bitmap) first, then the stored values (`_position_code`). Chunk by chunk, so that
    each estimator's loop reads p and q from L1."""
    has_mask = p_mask.size > 0 or q_mask.size > 0
    nan = np.nan
    for lo in range(start, stop, CHUNK):
        hi = min(lo + CHUNK, stop)
        for m in range(N_SAMPLED):
            if slots[m] >= 0:
                _terms(m, p_values, q_values, pre_status, sum_tol, out[slots[m]], lo, hi)
        _codes(p_values, q_values, pre_status, sum_tol, status, lo, hi)
        if has_mask:
            for i in range(lo, hi):
                if pre_status[i] == OK and not (valid_bit(p_mask, p_mask_offset, i)
                                                and valid_bit(q_mask, q_mask_offset, i)):
                    status[i] = NULL_ELEMENT
                    for m in range(N_SAMPLED):
                        if slots[m] >= 0:
                            out[slots[m], i] = nan


@_kernel
def _codes(p_values, q_values, pre, sum_tol, status, lo, hi):
    """`_position_code` of positions lo..hi into status, without branches."""
    pv, qv, pr, st = p_values[lo:hi], q_values[lo:hi], pre[lo:hi], status[lo:hi]
    for j in range(hi - lo):
        p = np.float64(pv[j])
        q = np.float64(qv[j])
        c = np.uint8(pr[j])
        pc = np.uint8(NAN) if p != p else (np.uint8(NON_FINITE) if abs(p) == INF else
                                          (np.uint8(NEGATIVE) if p > sum_tol else np.uint8(OK)))
        qc = np.uint8(NAN) if q != q else (np.uint8(NON_FINITE) if q == INF else
                                          (np.uint8(NEGATIVE) if q > sum_tol else np.uint8(OK)))
        st[j] = c if c != OK else (pc if pc != OK else qc)


@_jit
def _terms(m, p_values, q_values, pre, sum_tol, out, lo, hi):
    """Estimator m of positions lo..hi into out[lo:hi]: NaN where a position's pre-status
    is not OK or its log-probs are not usable."""
    if m == K1:
        _k1_loop(p_values, q_values, pre, sum_tol, out, lo, hi)
    elif m == K2:
        _k2_loop(p_values, q_values, pre, sum_tol, out, lo, hi)
    elif m == K3:
        _k3_loop(p_values, q_values, pre, sum_tol, out, lo, hi)
    else:
        _abs_loop(p_values, q_values, pre, sum_tol, out, lo, hi)


# One loop per estimator, each branch-free (written out: LLVM does not hoist a switch
# on the estimator out of a loop, and a loop with one inside is not vectorised).
# They index slices from 0 (an index known to be >= 0 needs no wraparound select,
# which would turn the loads into gathers).

@_kernel
def _k1_loop(p_values, q_values, pre, sum_tol, out, lo, hi):
    pv, qv, pr, o = p_values[lo:hi], q_values[lo:hi], pre[lo:hi], out[lo:hi]
    for j in range(hi - lo):
        p = np.float64(pv[j])
        q = np.float64(qv[j])
        ok = (pr[j] == OK) & _usable(p, q, sum_tol)
        o[j] = (p - q) if ok else np.nan  # -r, without a -0.0 where they agree


@_kernel
def _k2_loop(p_values, q_values, pre, sum_tol, out, lo, hi):
    pv, qv, pr, o = p_values[lo:hi], q_values[lo:hi], pre[lo:hi], out[lo:hi]
    for j in range(hi - lo):
        p = np.float64(pv[j])
        q = np.float64(qv[j])
        ok = (pr[j] == OK) & _usable(p, q, sum_tol)
        r = q - p
        o[j] = 0.5 * r * r if ok else np.nan


@_kernel
def _k3_loop(p_values, q_values, pre, sum_tol, out, lo, hi):
    pv, qv, pr, o = p_values[lo:hi], q_values[lo:hi], pre[lo:hi], out[lo:hi]
    for j in range(hi - lo):
        p = np.float64(pv[j])
        q = np.float64(qv[j])
        ok = (pr[j] == OK) & _usable(p, q, sum_tol)
        v = k3_vec(q - p)  # computed for every position: a branch around it would stop vectorisation
        o[j] = v if ok else np.nan


@_kernel
def _abs_loop(p_values, q_values, pre, sum_tol, out, lo, hi):
    pv, qv, pr, o = p_values[lo:hi], q_values[lo:hi], pre[lo:hi], out[lo:hi]
    for j in range(hi - lo):
        p = np.float64(pv[j])
        q = np.float64(qv[j])
        ok = (pr[j] == OK) & _usable(p, q, sum_tol)
        o[j] = abs(q - p) if ok else np.nan


# ------------------------------------------------------------------ sequence rows

@njit(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def _chunk_r(p_values, q_values, pre, has_pre, sum_tol, rbuf, lo, hi, acc):
    """r = q - p of positions lo..hi into rbuf (0.0 where a position does not count or
    is bad: every estimator is 0 there), with the sums of k1, k2 and abs added to acc
    (vectorised: one fixed order for a given chunk; k1 as -sum(r), exactly the sum of
    the -r); returns (counted ok positions, bad positions)."""
    pv, qv, pr = p_values[lo:hi], q_values[lo:hi], pre[lo:hi]
    ok_count = 0
    nulls = 0  # (not counted, so neither ok nor bad)
    s_r = 0.0
    s_k2 = 0.0
    s_abs = 0.0
    for j in range(hi - lo):
        c = pr[j] if has_pre else OK
        p = np.float64(pv[j])
        q = np.float64(qv[j])
        ok = (c == OK) & _usable(p, q, sum_tol)
        ok_count += ok
        nulls += c == NULL
        r = q - p if ok else 0.0
        rbuf[j] = r
        s_r += r
        s_k2 += 0.5 * r * r
        s_abs += abs(r)
    acc[K1] -= s_r
    acc[K2] += s_k2
    acc[ABS] += s_abs
    return ok_count, (hi - lo) - ok_count - nulls


@_kernel
def _chunk_k3(rbuf, k3buf, n):
    """k3 of the chunk's n positions (from their r) into k3buf."""
    for j in range(n):
        k3buf[j] = k3_vec(rbuf[j])


# ------------------------------------------------------------------ k3 in float32
# For float32 inputs the error bound is 1e-6 of the terms (float64: 1e-12), so
# k3 may be evaluated in float32: twice the lanes per vector and a shorter
# polynomial. The near form of `k3_vec` with k in [-6, 6], valid for
# 2^-60 <= |r| <= 4 (and r = 0): there the rounding of r to float32 moves k3 by
# at most 4 * 2^-24 of it, and the evaluation adds a few float32 roundings,
# which the near form does not amplify beyond 1.5x. Few operations (16 lanes
# each): s = x - k L and c_k = (2^k - 1) - k L with L = ln2 rounded to float32,
# whose 21 significant bits make k L exact for |k| <= 7 (LLVM computes it once
# for both), so each is rounded once, and the pair is the exact identity with L
# for ln2 (k3 moves by |k| |ln2 - L| e^x <= 2e-8 of it); g of degree 5; no
# clamp at 0 (for |x| < 1/2, k = 0 and the result is s^2 g(s) + (0 s + 0) >= 0;
# for |x| >= 1/2, k3 >= 0.1 and the error is ~1e-7 of it). Measured against
# `k3_vec` over 8.6M float32 r in that range (uniform, log-uniform down to
# 2^-60, and around |r| = 1/2, (k + 1/2) ln2 and 4): 2.0e-7 relative at most.
# A chunk holding any other r (|r| > 4, where the rounding of r alone would
# cost |r| 2^-24; tiny r, whose square is subnormal in float32) is computed
# again in float64 (see `_chunk_32`).
# g: mpmath.chebyfit(g, [-1/2, 1/2], 6) (1.3e-8 absolute, g ~ 1/2, before float32 rounding).
_G32 = tuple(np.float32(c) for c in (0.5000000121607167, 0.16666666801683436, 0.04166579123000645,
                                     0.008333236133521863, 0.001398218604627775, 0.00019944874441589592))
_INV_LN2_F = np.float32(_INV_LN2)
_LN2_F = np.float32(math.log(2.0))
_HALF_F, _ONE_F, _ZERO_F = np.float32(0.5), np.float32(1.0), np.float32(0.0)
_R32_MAX = 4.0
_R32_MIN = 2.0 ** -60


@_inline
def k3_32(x):
    """e^x - 1 - x for a float32 x with 2^-60 <= |x| <= 4 or x = 0 (see above); >= 0."""
    k = np.floor(x * _INV_LN2_F + _HALF_F)
    k = k if abs(x) >= _HALF_F else _ZERO_F
    s = x - k * _LN2_F
    g = _G32[5]
    g = g * s + _G32[4]
    g = g * s + _G32[3]
    g = g * s + _G32[2]
    g = g * s + _G32[1]
    g = g * s + _G32[0]
    s2g = s * s * g
    two_k = bits_float32(np.int32(np.int32(np.int32(k) + np.int32(127)) << np.int32(23)))
    tkm1 = two_k - _ONE_F  # exact for |k| <= 6
    c_k = tkm1 - k * _LN2_F
    return two_k * s2g + (tkm1 * s + c_k)


# ------------------------------------------------------------------ float32 sequences
# For float32 sides each chunk is first taken in float32 at full vector width
# (`_chunk_32`, 16 lanes): one pass reads p and q, validates them (the rules of
# `_usable`, with sum_tol as the largest float32 below it), forms r = q - p in
# float32 and k3_32(r) into float32 scratch, and notes in one boolean whether
# the chunk is clean (no counters: an int64 one would halve the lanes of the
# whole loop, and k-register pressure made even int32 ones cost); then one
# reassociated pass (`_chunk_sum32`) sums r, r^2 and k3 from that scratch in
# float64: each term converted, never accumulated in float32. k3 is skipped in
# both when not asked for (compiled apart: k3buf None), |r| summed apart when asked.
# q - p of two float32 values in float32 is their exact difference rounded once,
# so k1 = -r and abs are within 2^-24 of their terms and k2 within 2^-23, well
# inside the float32 bound (1e-6 of the terms), and k3's error is the single
# rounding of r that the analysis above `k3_32` assumes. A chunk that is not
# clean (an r outside `k3_32`'s range, q = -inf, or a bad position, which the
# float64 pass counts and names) is taken again by the float64 passes; nothing
# of it reached acc before.
_R32_MAX_F, _R32_MIN_F = np.float32(_R32_MAX), np.float32(_R32_MIN)


@_jit
def _tol32(sum_tol):
    """The largest float32 <= sum_tol (>= 0): x <= it in float32 iff x <= sum_tol in float64."""
    t = np.float32(sum_tol)
    return bits_float32(np.int32(float32_bits(t) - np.int32(1))) if np.float64(t) > sum_tol else t


@_kernel
def _chunk_32(p_values, q_values, pre, has_pre, sum_tol, rbuf, k3buf, lo, hi):
    """Float32 sides: r = q - p of positions lo..hi in float32 into rbuf (0 where a position
    does not count) and k3_32(r) into k3buf (unless None). Returns whether the chunk is clean: no bad
    position and no r that `k3_32` does not take (see above); a chunk that is not is taken
    again by the float64 passes, which count and name what is bad. No `reassoc`: k3_32's
    order is its algorithm; one boolean for the whole chunk, not counters, so that the loop
    keeps 16 float32 lanes and few registers."""
    if not has_pre:
        return _chunk_32_all(p_values, q_values, sum_tol, rbuf, k3buf, lo, hi)
    pv, qv, pr = p_values[lo:hi], q_values[lo:hi], pre[lo:hi]
    tol32 = _tol32(sum_tol)
    clean = True
    for j in range(hi - lo):
        counted = (pr[j] != np.uint8(NULL)) if has_pre else True  # (booleans: an int64 code
        code_ok = (pr[j] == np.uint8(OK)) if has_pre else True  # would take 64-bit lanes)
        p = pv[j]
        q = qv[j]
        ok = code_ok & (p <= tol32) & (q <= tol32)  # p = -inf too: its r (+inf or NaN) is far
        r = q - p if ok else _ZERO_F
        a = abs(r)
        far = ~(a <= _R32_MAX_F) | ((a < _R32_MIN_F) & (a != _ZERO_F))  # (q = -inf: r = -inf is far)
        clean &= ~far & (ok | ~counted)
        rbuf[j] = r
        if k3buf is not None:  # (None: k3 is not asked for; a compile-time branch)
            k3buf[j] = k3_32(r)
    return clean



# The same tests on the bits, for a chunk whose positions all count: a float32 x <= t
# (t >= 0) exactly when bits(x) <= bits(t) as int32, but for a NaN with its sign bit set,
# whose r is NaN and far; |r| is far exactly when bits(|r|) > bits(4) or 0 < bits(|r|) <
# bits(2^-60), i.e. bits(|r|) - 1 (unsigned, wrapping 0 away) < bits(2^-60) - 1.
_R32_MAX_BITS = np.uint32(0x40800000)  # bits(4.0)
_R32_MIN_BITS_1 = np.uint32(((127 - 60) << 23) - 1)  # bits(2^-60) - 1
_U32_1 = np.uint32(1)
_U32_ALL = np.uint32(0xFFFFFFFF)


@_kernel
def _chunk_32_all(p_values, q_values, sum_tol, rbuf, k3buf, lo, hi):
    """`_chunk_32` where every position counts: its tests as three integer
    extremes of the bits (one max of p's and q's, one max and one min of |r|'s),
    not selects and masks per position."""
    pv, qv = p_values[lo:hi], q_values[lo:hi]
    tol_bits = float32_bits(_tol32(sum_tol))
    top = float32_bits(_ZERO_F)
    a_max = np.uint32(0)
    a_min = _U32_ALL
    for j in range(hi - lo):
        p = pv[j]
        q = qv[j]
        top = max(top, max(float32_bits(p), float32_bits(q)))
        r = q - p
        a_bits = np.uint32(float32_bits(abs(r)))
        a_max = max(a_max, a_bits)
        a_min = min(a_min, np.uint32(a_bits - _U32_1))
        rbuf[j] = r
        if k3buf is not None:
            k3buf[j] = k3_32(r)
    return (top <= tol_bits) & (a_max <= _R32_MAX_BITS) & (a_min >= _R32_MIN_BITS_1)


@_jit
def _counted_ok(pre, has_pre, lo, hi):
    """How many of positions lo..hi count (pre-status OK): all of them without `pre`."""
    if not has_pre:
        return hi - lo
    n = 0
    for j in range(lo, hi):
        n += pre[j] == OK
    return n


@njit(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def _chunk_sum32(rbuf, k3buf, n, acc):
    """Add the sums of k1, k2 and k3 of the chunk's n float32 r and k3 to acc.

    Four terms, a quarter of the chunk apart, are first added in float32 (r^2
    formed there too), then the group is converted and summed in float64: a
    quarter of the conversions and float64 adds. Each group is a tree of depth
    2 (3 after reassociation), so it adds at most 3 * 2^-24 of its terms' sum
    of magnitudes (r^2: 1 more), which the float32 bound leaves room for (see
    `_chunk_32`). Vectorised; one fixed order for a given n."""
    m = n // 4
    s_r = 0.0
    s_rr = 0.0
    s_k3 = 0.0
    for j in range(m):
        a, b, c, d = rbuf[j], rbuf[j + m], rbuf[j + 2 * m], rbuf[j + 3 * m]
        s_r += np.float64((a + b) + (c + d))
        s_rr += np.float64((a * a + b * b) + (c * c + d * d))
        if k3buf is not None:  # (as in `_chunk_32`)
            s_k3 += np.float64((k3buf[j] + k3buf[j + m]) + (k3buf[j + 2 * m] + k3buf[j + 3 * m]))
    for j in range(4 * m, n):
        r = np.float64(rbuf[j])
        s_r += r
        s_rr += r * r
        if k3buf is not None:
            s_k3 += np.float64(k3buf[j])
    acc[K1] -= s_r
    acc[K2] += 0.5 * s_rr
    acc[K3] += s_k3


@njit(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def _chunk_abs32(rbuf, n, acc):
    """Add the sum of abs of the chunk's n float32 r to acc, in float64 (a pass of its own:
    abs is seldom asked for, and its two conversions and adds would cost every call)."""
    s_abs = 0.0
    for j in range(n):
        s_abs += abs(np.float64(rbuf[j]))
    acc[ABS] += s_abs


@njit(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)
def _chunk_k3_sum(k3buf, n, acc):
    """Add the chunk's sum of k3 to acc (vectorised: one fixed order for a given n)."""
    s_k3 = 0.0
    for j in range(n):
        s_k3 += k3buf[j]
    acc[K3] += s_k3


@_jit
def _position_code(c, p, q, sum_tol):
    """The status of one position: its pre-status, else the first bad side."""
    if c != OK:
        return c
    code = _bad(p, sum_tol, True)
    return code if code != OK else _bad(q, sum_tol, False)


@_jit
def _first_bad(p_values, q_values, pre, has_pre, sum_tol, lo, hi):
    """(code, position) of the first bad position in lo..hi ((OK, -1) if none)."""
    for j in range(lo, hi):
        code = _position_code(pre[j] if has_pre else OK, np.float64(p_values[j]), np.float64(q_values[j]),
                              sum_tol)
        if code >= FIRST_INVALID:
            return code, j
    return OK, -1


@_jit
def sampled_sequences(offsets, seq_status, pre, has_pre, p_values, q_values, sum_tol, slots,
                      sums, tokens, status, first_bad, want_tokens, token_values, token_status, start, stop):
    """Sequence i (positions offsets[i]:offsets[i+1], i in start..stop): per requested
    estimator (slots[m]: row of `sums`, or -1) the sum over its counted positions
    (NaN unless the sequence is ok), how many count (`tokens`), its status and
    its first bad position (`first_bad`, -1 if none).

    `seq_status`: codes settled before the kernel (OK to compute); `pre`, when
    `has_pre`: per position OK (counted), NULL (not counted) or NULL_ELEMENT. A
    sequence is invalid at its first bad position, `no_tokens` when none counts.
    With `want_tokens`, also each position's value (`token_values`, rows as
    `sums`, NaN where not ok) and status (`token_status`). The sums do not
    depend on `want_tokens` nor on how the sequences are split into blocks.
    """
    # views that Numba does not reference-count (kernels.views): of the arguments, and of
    # scratch that `owners` keeps alive to the end
    offsets, pre, p_values, q_values = borrowed(offsets), borrowed(pre), borrowed(p_values), borrowed(q_values)
    owners = (np.empty(CHUNK), np.zeros(CHUNK), np.empty(CHUNK, dtype=np.float32),
              np.empty(CHUNK, dtype=np.float32), np.zeros(N_SAMPLED))
    rbuf, k3buf, rbuf32, k3buf32, acc = (borrowed(owners[0]), borrowed(owners[1]), borrowed(owners[2]),
                                         borrowed(owners[3]), borrowed(owners[4]))
    want_k3 = slots[K3] >= 0
    want_abs = slots[ABS] >= 0
    # (compile-time constants; the sides are float32 or float64 here: `scalar_values` widens 16-bit ones)
    in_float32 = _is_float32(p_values) and _is_float32(q_values)
    for i in range(start, stop):
        code = np.int64(seq_status[i])
        lo, hi = offsets[i], offsets[i + 1]
        acc[:] = 0.0
        count = 0
        bad = 0
        if code == OK:
            for a in range(lo, hi, CHUNK):
                b = min(a + CHUNK, hi)
                if in_float32 and (_chunk_32(p_values, q_values, pre, has_pre, sum_tol, rbuf32, k3buf32, a, b)
                                   if want_k3 else
                                   _chunk_32(p_values, q_values, pre, has_pre, sum_tol, rbuf32, None, a, b)):
                    count += _counted_ok(pre, has_pre, a, b)  # (a clean chunk: every counted position is ok)
                    if want_k3:
                        _chunk_sum32(rbuf32, k3buf32, b - a, acc)
                    else:
                        _chunk_sum32(rbuf32, None, b - a, acc)
                    if want_abs:
                        _chunk_abs32(rbuf32, b - a, acc)
                    if want_tokens:
                        _chunk_tokens(p_values, q_values, pre, has_pre, sum_tol, slots, rbuf32, k3buf32, a, b,
                                      token_values, token_status)
                    continue
                ok_n, bad_n = _chunk_r(p_values, q_values, pre, has_pre, sum_tol, rbuf, a, b, acc)
                count += ok_n
                bad += bad_n
                if bad and not want_tokens:
                    break  # the sums are lost anyway: name the first bad position
                if want_k3:  # (a pass of its own: fused with the reads above it was slower)
                    _chunk_k3(rbuf, k3buf, b - a)
                    _chunk_k3_sum(k3buf, b - a, acc)
                if want_tokens:
                    _chunk_tokens(p_values, q_values, pre, has_pre, sum_tol, slots, rbuf, k3buf, a, b,
                                  token_values, token_status)
        first_bad[i] = -1
        if code == OK and bad:
            code, first_bad[i] = _first_bad(p_values, q_values, pre, has_pre, sum_tol, lo, hi)
        if code == OK and count == 0:
            code = NO_TOKENS
        status[i] = code
        tokens[i] = count if code == OK else 0
        for m in range(N_SAMPLED):
            if slots[m] >= 0:
                sums[slots[m], i] = acc[m] if code == OK else np.nan
    owners[4][0] = 0.0  # the scratch's last use: alive until here


@_kernel
def _chunk_tokens(p_values, q_values, pre, has_pre, sum_tol, slots, rbuf, k3buf, lo, hi, token_values,
                  token_status):
    """Per-position statuses and values of positions lo..hi, from the chunk's r and k3
    (k1 again from p and q, so that it has no -0.0, as in `_k1_loop`)."""
    nan = np.nan
    pv, qv, pr = p_values[lo:hi], q_values[lo:hi], pre[lo:hi]
    ts = token_status[lo:hi]
    for j in range(hi - lo):
        ts[j] = _position_code(pr[j] if has_pre else OK, np.float64(pv[j]), np.float64(qv[j]), sum_tol)
    for m in range(N_SAMPLED):
        if slots[m] < 0:
            continue
        o = token_values[slots[m], lo:hi]
        for j in range(hi - lo):
            r = rbuf[j]
            if m == K1:
                v = np.float64(pv[j]) - np.float64(qv[j])
            elif m == K2:
                v = 0.5 * r * r
            elif m == K3:
                v = k3buf[j]
            else:
                v = abs(r)
            o[j] = v if ts[j] == OK else nan
