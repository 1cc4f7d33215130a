"""Numba kernels over flat buffers: the only place where the math happens.

The kernels know nothing of Arrow, NumPy shapes or Dask. A side (P or Q) is
three buffers: `offsets` (int64, row i is values[offsets[i]:offsets[i+1]]),
`values` (float32 or float64) and an optional element-validity bitmap (Arrow
layout, LSB first, empty when the side has no null elements). The kernel
walks rows `start..stop`, writes one float64 per requested measure into
`out` and one status code per row into `status`. Rows are independent, so
any split of the row range gives bit-identical results.

Each row is handled by short loops over the row (it stays in L1 between them):

1. the common cases first: float32 probs or logprobs used as they are
   (no normalize, smoothing or null elements) go straight to float32 term
   loops that validate as they go (float32 row sums, and a flag for any
   element the fast loop does not do exactly); a flagged row, or one whose
   sum is not clearly inside sum_tol, falls through to the steps below.
2. scan: validate each side and find how to decode it (row sum, or max and
   log-sum-exp for logits); a row with a problem is scanned again slowly to
   name the reason;
3. terms: one small branch-free loop per group of measures, written with
   `fastmath`'s vectorisable log/exp so LLVM emits SIMD code. The common
   cases (both sides probabilities; both sides in log space for the log
   measures) take these loops; the rest (mixed kinds, JS/TV/Hellinger on
   log-space input, float64 ratios beyond the float range) take one general
   loop with libm calls. All follow the same formulas.

There is one kernel per family of encodings (`KERNELS`: probs, logs,
mixed), built from one function with closure constants, so each compiles
only the loops its inputs can reach.

Choices, made on purpose:

* Serial, `nogil=True` kernels. Parallelism comes from calling the kernel on
  disjoint row ranges from several Python threads (see `fastkl/_engine.py`); this is
  thread-safe by construction (no Numba threading layer, whose default
  workqueue layer is not safe to enter from several threads at once) and the
  same kernel serves a laptop call and a Dask task with one thread.
* fastmath: only `nsz` (ignore the sign of zero), `contract` (allow FMA) and
  `reassoc` (reorder sums so LLVM can vectorise reductions). Never `nnan`/
  `ninf`: +inf is a correct KL and NaN must be detected. No
  `afn`/`arcp`: approximate functions would break the error bound. The
  log/exp helpers are compiled without `reassoc` (their operation order is
  the algorithm) and are inlined by LLVM with their own flags.
* `error_model="numpy"`: float division by zero gives inf/NaN (which the
  loops mask) instead of a Python exception check that blocks vectorisation.
* `cache=True`: the compiled kernels go to Numba's on-disk cache, so only the
  first call on a machine pays the compile: per family, float32 and float64
  values (mixed inputs are cast to float64 first). INLINES_DIGEST ties the
  cache to `fastmath.py`, `half.py` and `views.py`, whose helpers the kernels inline.
* Accuracy: sums are in float64; log(p/q) takes its mantissa from
  (p-q)/q when p/q is near 1 (where log(p)-log(q) would cancel), and the
  Jensen-Shannon and Hellinger terms are written in forms that do not cancel
  when P and Q are close.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from .half import FLOAT16, as_float32, decode_row, float16_value
from .views import borrowed
from .fastmath import (exp32, exp_neg, exp_nonpositive, expm1_32, expm1_f64, expm1_with32, from_order_key, inf_keys, log_pos, log_ratio,
                       log_ratio32, not_normal32, order_key, float32_bits, normal_offset32, NORMAL_SPAN_F)

FASTMATH = {"nsz", "contract", "reassoc"}

# Kinds (fastkl._registry.KINDS order).
PROBS, LOGPROBS, LOGITS = 0, 1, 2

# Status codes (fastkl._registry.STATUSES order).
OK, NULL, NO_TOKENS, TARGET_UNLISTED, LENGTH_MISMATCH, EMPTY, NULL_ELEMENT, NAN, NON_FINITE, NEGATIVE, NOT_NORMALIZED = range(11)

# Measure slots (fastkl._registry.MEASURES order).
KL, REVERSE_KL, JEFFREYS, JS, ENTROPY, CROSS_ENTROPY, TV, HELLINGER, GJS, RENYI, BHATTACHARYYA = range(11)
N_MEASURES = 11

LN2 = math.log(2.0)
INF = math.inf
NAN_ = math.nan
MIN_NORMAL = 2.2250738585072014e-308
MAX_FLOAT = 1.7976931348623157e308

_jit = njit(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy")
# For the small steps of the kernel's per-row path (its wrappers, checks and stores):
# inlined by Numba, so that LLVM sees them in the row loop (a call per row each cost
# ~10% of a row of 256).
_inline = njit(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")

# Numba's on-disk cache is checked against this file's timestamp only, but the
# kernels inline the helpers of the modules imported above: after an edit there,
# cached kernels would keep the old code. tests/test_layout.py checks that this
# digest of those modules is current, so any change there changes this file too
# (each kernel module has one).
INLINES_DIGEST = "63032e08cda36b6e"


def _is_float32(values):
    """True when `values` holds float32 or 16-bit halves (decoded to float32);
    a compile-time constant inside kernels."""
    return values.dtype in (np.float32, np.uint16)


@overload(_is_float32)
def _is_float32_typed(values):
    result = isinstance(values, types.Array) and values.dtype in (types.float32, types.uint16)
    return lambda values: result


# ------------------------------------------- half-precision sides (uint16 bits)
# A 16-bit side (float16 or bfloat16 bits, `decode` 1 or 2) is decoded one row
# at a time into a float32 scratch row; every loop below then runs on that row
# as on a float32 side. The choice is made on the values' dtype when Numba
# types the kernel, so float32/float64 sides compile to exactly the code they
# had (plain row views, no scratch).


def _scratch(values, offsets, start, stop):
    """A float32 row buffer for rows start..stop of a 16-bit side (empty otherwise)."""


@overload(_scratch)
def _scratch_typed(values, offsets, start, stop):
    if isinstance(values, types.Array) and values.dtype == types.uint16:
        def impl(values, offsets, start, stop):
            longest = 0
            for i in range(start, stop):
                longest = max(longest, offsets[i + 1] - offsets[i])
            return np.empty(longest, dtype=np.float32)
        return impl
    return lambda values, offsets, start, stop: np.empty(0, dtype=np.float32)


def _row(values, start, k, decode, scratch):
    """Row values[start:start + k] as the loops read it: a view, or decoded into scratch."""


@overload(_row, inline="always")
def _row_typed(values, start, k, decode, scratch):
    if isinstance(values, types.Array) and values.dtype == types.uint16:
        return lambda values, start, k, decode, scratch: decode_row(values, start, k, decode, scratch)
    return lambda values, start, k, decode, scratch: values[start:start + k]


def _side_at(values, start, mask_offset, scratch):
    """(values, start, mask_offset) for the scans of one row: a 16-bit side's
    row is scratch[0:k] (already decoded by `_row`), its mask bits stay where they are."""


@overload(_side_at, inline="always")
def _side_at_typed(values, start, mask_offset, scratch):
    if isinstance(values, types.Array) and values.dtype == types.uint16:
        return lambda values, start, mask_offset, scratch: (scratch, 0, mask_offset + start)
    return lambda values, start, mask_offset, scratch: (values, start, mask_offset)


# ---------------------------------------------------------------- scanning


@_jit
def valid_bit(mask, mask_offset, idx):
    """Is element idx valid in an Arrow validity bitmap (LSB first; empty: no null at all)?"""
    if mask.size == 0:
        return True
    bit = mask_offset + idx
    return ((mask[bit >> 3] >> (bit & 7)) & 1) == 1


@_jit
def _has_null(mask, mask_offset, start, k):
    if mask.size == 0:
        return False
    for j in range(k):
        bit = mask_offset + start + j
        if ((mask[bit >> 3] >> (bit & 7)) & 1) == 0:
            return True
    return False


@_jit
def _problem(values, start, k, mask, mask_offset, kind, sum_tol):
    """The status of a side that failed the fast scan (lowest code wins)."""
    code = NOT_NORMALIZED + 1
    for j in range(k):
        idx = start + j
        if mask.size:
            bit = mask_offset + idx
            if ((mask[bit >> 3] >> (bit & 7)) & 1) == 0:
                code = min(code, NULL_ELEMENT)
                continue
        x = np.float64(values[idx])
        if x != x:
            code = min(code, NAN)
        elif kind == PROBS:
            if math.isinf(x):
                code = min(code, NON_FINITE)
            elif x < 0.0:
                code = min(code, NEGATIVE)
        elif x == INF:
            code = min(code, NON_FINITE)
        elif kind == LOGPROBS and x > sum_tol:
            code = min(code, NEGATIVE)
    return code if code <= NOT_NORMALIZED else NON_FINITE  # logits with no finite value


@_jit
def _scan_probs(row):
    # The shapes below are the ones LLVM vectorises: an unconditional sum
    # (a bad row is rescanned anyway) and a float count of bad elements.
    total = 0.0
    bad = 0.0
    for j in range(row.size):
        x = np.float64(row[j])
        total += x
        bad += 0.0 if ((x >= 0.0) & (x < INF)) else 1.0  # NaN compares False
    return total, bad


@_jit
def _scan_logprobs(row, sum_tol):
    total = 0.0
    bad = 0.0
    for j in range(row.size):
        x = np.float64(row[j])
        ok = x <= sum_tol  # False for NaN and +inf
        total += exp_neg(x) if ok else 0.0
        bad += 0.0 if ok else 1.0
    return total, bad


@_jit
def _count_bad_logprobs(row, sum_tol):
    bad = 0.0
    for j in range(row.size):
        bad += 0.0 if np.float64(row[j]) <= sum_tol else 1.0  # NaN, +inf, > 0
    return bad


@_jit
def _scan_logits(row):
    """(row maximum, 1.0 if the row holds NaN or +inf else 0.0), from the
    integer-key max and min (`order_key`), which vectorise where a float max
    does not: NaN keys lie beyond those of +inf and -inf."""
    top = bottom = order_key(row[0])
    for j in range(row.size):
        key = order_key(row[j])
        top = key if key > top else top
        bottom = key if key < bottom else bottom
    key_ninf, key_pinf = inf_keys(row)
    bad = 1.0 if (top >= key_pinf or bottom < key_ninf) else 0.0
    return np.float64(from_order_key(top)), bad


@_jit
def _sum_exp(row, top, inv_t):
    total = 0.0
    for j in range(row.size):
        total += exp_nonpositive((np.float64(row[j]) - top) * inv_t)
    return total


@_jit
def _scan_probs_side(values, start, k, mask, mask_offset, normalize, sum_tol):
    """Validate one probs side of a row: (status, scale); probs decode as x * scale."""
    # Row views, not values[start + j]: a signed index makes Numba emit a
    # negative-index wraparound per element, which halves the loop's speed.
    row = values[start:start + k]
    if _has_null(mask, mask_offset, start, k):
        return _problem(values, start, k, mask, mask_offset, PROBS, sum_tol), 1.0
    total, bad = _scan_probs(row)
    if bad > 0.0:
        return _problem(values, start, k, mask, mask_offset, PROBS, sum_tol), 1.0
    if normalize:
        if not (0.0 < total < INF):  # nothing to divide by, or the sum overflows
            return NOT_NORMALIZED, 1.0
        return OK, 1.0 / total
    if abs(total - 1.0) > sum_tol:
        return NOT_NORMALIZED, 1.0
    return OK, 1.0


@_jit
def _scan_log_side(values, start, k, mask, mask_offset, kind, inv_t, normalize, sum_tol, defer_sum):
    """Validate one logprobs or logits side of a row and find how to decode it.

    Returns (status, centre, log_norm): x decodes as (x - centre) * inv_t - log_norm.
    With `defer_sum` (logprobs, no normalize) the exp-sum check is left to the
    term loop, which computes the same exponentials anyway.
    """
    row = values[start:start + k]
    if _has_null(mask, mask_offset, start, k):
        return _problem(values, start, k, mask, mask_offset, kind, sum_tol), 0.0, 0.0
    if kind == LOGITS:
        top, bad = _scan_logits(row)
        if bad > 0.0 or not top > -INF:
            return _problem(values, start, k, mask, mask_offset, kind, sum_tol), 0.0, 0.0
        if defer_sum:  # the term loop sums the exponentials itself (_logits_terms)
            return OK, top, 0.0
        # stable log-sum-exp around the row maximum; nothing materialised
        return OK, top, math.log(_sum_exp(row, top, inv_t))
    if defer_sum:
        total, bad = 1.0, _count_bad_logprobs(row, sum_tol)
    else:
        total, bad = _scan_logprobs(row, sum_tol)
    if bad > 0.0:
        return _problem(values, start, k, mask, mask_offset, kind, sum_tol), 0.0, 0.0
    if normalize:
        # renormalise around the row maximum, like logits: exp() of a row
        # of very negative log-probabilities underflows to a zero sum
        top, _ = _scan_logits(row)
        if not top > -INF:
            return NOT_NORMALIZED, 0.0, 0.0
        return OK, top, math.log(_sum_exp(row, top, 1.0))
    if abs(total - 1.0) > sum_tol:
        return NOT_NORMALIZED, 0.0, 0.0
    return OK, 0.0, 0.0


# ------------------------------------------- terms: both sides probabilities
# p = x * p_mul + p_add (p_mul folds normalisation and smoothing, p_add = eps/(1+K eps)).
#
# Loop shapes LLVM vectorises, learned by reading the assembly: compute the
# log unconditionally and then select (`x if c else y` in Numba is a branch
# around the call), count with float sums, and combine conditions with `&`.
# "Mass where the other side is zero" (a float sum) flags the +inf cases.


@_jit
def _ratio_terms_probs(prow, qrow, p_mul, p_add, q_mul, q_add):
    """sum p log(p/q), sum q log(q/p), mass of p where q = 0 and of q where p = 0,
    and a count of ratios outside the float range (float64 input only)."""
    kl = 0.0
    rkl = 0.0
    p_only = 0.0
    q_only = 0.0
    odd = 0.0
    for j in range(prow.size):
        p = np.float64(prow[j]) * p_mul + p_add
        q = np.float64(qrow[j]) * q_mul + q_add
        both = (p > 0.0) & (q > 0.0)
        inv_q = 1.0 / q
        r = p * inv_q
        lr = log_ratio(p, inv_q, p - q)
        lr = lr if both else 0.0
        kl += p * lr
        rkl -= q * lr
        p_only += p if q == 0.0 else 0.0
        q_only += q if p == 0.0 else 0.0
        odd += 1.0 if (both & ((r < MIN_NORMAL) | (r > MAX_FLOAT))) else 0.0
    return kl, rkl, p_only, q_only, odd


@_jit
def _entropy_terms_probs(prow, p_mul, p_add):
    ent = 0.0
    for j in range(prow.size):
        p = np.float64(prow[j]) * p_mul + p_add
        lp = log_pos(p)
        lp = lp if p > 0.0 else 0.0
        ent -= p * lp
    return ent


@_jit
def _cross_entropy_terms_probs(prow, qrow, p_mul, p_add, q_mul, q_add):
    ce = 0.0
    for j in range(prow.size):
        p = np.float64(prow[j]) * p_mul + p_add
        q = np.float64(qrow[j]) * q_mul + q_add
        lq = log_pos(q)
        lq = lq if ((p > 0.0) & (q > 0.0)) else 0.0
        ce -= p * lq
    return ce


@_jit
def _js_terms_probs(prow, qrow, p_mul, p_add, q_mul, q_add):
    """sum p log(2p/(p+q)) + q log(2q/(p+q)), count of ratios out of float range."""
    js = 0.0
    odd = 0.0
    for j in range(prow.size):
        p = np.float64(prow[j]) * p_mul + p_add
        q = np.float64(qrow[j]) * q_mul + q_add
        s = p + q
        inv_s = 1.0 / s
        d = p - q
        lp = log_ratio(2.0 * p, inv_s, d)
        lq = log_ratio(2.0 * q, inv_s, -d)
        js += (p * lp if p > 0.0 else 0.0) + (q * lq if q > 0.0 else 0.0)
        small = min(p, q)
        odd += 1.0 if ((small > 0.0) & (2.0 * small < MIN_NORMAL * s)) else 0.0
    return js, odd


@_jit
def _gjs_terms_probs(prow, qrow, p_mul, p_add, q_mul, q_add, beta):
    """sum b p log(p/m) + (1-b) q log(q/m), m = b p + (1-b) q (0 < b < 1), and a count of
    ratios p/m, q/m below the normal range. As in JS, p - m = (1-b)(p - q) gives
    the logs their mantissa where p ~ m, so nothing cancels when P ~ Q."""
    c = 1.0 - beta
    gjs = 0.0
    odd = 0.0
    for j in range(prow.size):
        p = np.float64(prow[j]) * p_mul + p_add
        q = np.float64(qrow[j]) * q_mul + q_add
        m = beta * p + c * q
        inv_m = 1.0 / m
        d = p - q
        lp = log_ratio(p, inv_m, c * d)
        lq = log_ratio(q, inv_m, -beta * d)
        gjs += (beta * p * lp if p > 0.0 else 0.0) + (c * q * lq if q > 0.0 else 0.0)
        small = min(p, q)
        odd += 1.0 if ((small > 0.0) & (small * inv_m < MIN_NORMAL)) else 0.0
    return gjs, odd


@_jit
def _renyi_log_probs(prow, qrow, p_mul, p_add, q_mul, q_add, am1):
    """log(sum p^alpha q^(1-alpha) / sum p) by a log-sum-exp, for rows whose sum
    overflows (q far below p with alpha > 1); entries with q = 0 add nothing."""
    top = -INF
    p_sum = 0.0
    for j in range(prow.size):
        p = np.float64(prow[j]) * p_mul + p_add
        q = np.float64(qrow[j]) * q_mul + q_add
        p_sum += p
        if p > 0.0 and q > 0.0:
            top = max(top, math.log(p) + am1 * _log_ratio_exact(p, q))
    total = 0.0
    for j in range(prow.size):
        p = np.float64(prow[j]) * p_mul + p_add
        q = np.float64(qrow[j]) * q_mul + q_add
        if p > 0.0 and q > 0.0:
            total += math.exp(math.log(p) + am1 * _log_ratio_exact(p, q) - top)
    return top + math.log(total) - math.log(p_sum)


@_jit
def _renyi_log(ren, direct, p_sum, p_only, am1):
    """log(S / sum p), S = sum p^alpha q^(1-alpha), from ren = S - sum p (exact near S = sum p)
    or from direct = S (exact where S is far below sum p, as for mass mostly where q = 0):
    +inf where some q = 0 < p and alpha > 1, -inf where S = 0 (disjoint, alpha < 1), NaN
    where the sums overflowed or S underflowed (the caller then takes a log-sum-exp)."""
    if p_only > 0.0 and am1 > 0.0:
        return INF
    if not ren < INF:  # inf, or 0 * inf where p underflowed
        return NAN_
    r = ren / p_sum
    if r < -0.5:  # S far below sum p: from S itself, in log space where it underflowed (or is 0)
        return math.log(direct / p_sum) if direct > 0.0 else NAN_
    return math.log1p(r)


@_jit
def _renyi_terms_probs(prow, qrow, p_mul, p_add, q_mul, q_add, am1):
    """(sum p expm1(x), sum p e^x, sum p, count of q = 0 < p), x = (alpha-1) log(p/q), with
    libm: Renyi's sum of p^alpha q^(1-alpha) less sum p (no cancelling near alpha = 1) and itself."""
    ren = direct = p_sum = p_only = 0.0
    for j in range(prow.size):
        p = np.float64(prow[j]) * p_mul + p_add
        q = np.float64(qrow[j]) * q_mul + q_add
        p_sum += p
        if p > 0.0 and q > 0.0:
            x = am1 * _log_ratio_exact(p, q)
            ren += p * math.expm1(x)
            direct += p * math.exp(x)
        elif p > 0.0:
            p_only += 1.0
            ren -= p
    return ren, direct, p_sum, p_only


@_jit
def _tv_hellinger_terms_probs(prow, qrow, p_mul, p_add, q_mul, q_add):
    """(sum |p - q|, sum (sqrt p - sqrt q)^2, sum sqrt(p q), sum p, sum q)."""
    tv = hel = bc = p_sum = q_sum = 0.0
    for j in range(prow.size):
        p = np.float64(prow[j]) * p_mul + p_add
        q = np.float64(qrow[j]) * q_mul + q_add
        d = p - q
        tv += abs(d)
        sp = math.sqrt(p)
        sq = math.sqrt(q)
        root_sum = sp + sq
        h = d / root_sum  # = sqrt p - sqrt q, without cancelling
        hel += h * h if root_sum > 0.0 else 0.0
        bc += sp * sq
        p_sum += p
        q_sum += q
    return tv, hel, bc, p_sum, q_sum


@_jit
def _bhattacharyya(hel, bc, p_sum, q_sum):
    """-log of the Bhattacharyya coefficient of P / sum p and Q / sum q, from
    hel = sum (sqrt p - sqrt q)^2 and bc = sum sqrt(p q): through hellinger's
    stable sum while the distributions are close (1 - BC = (hel/2 - (sqrt sum p -
    sqrt sum q)^2 / 2) / sqrt(sum p sum q), nothing cancels), from bc itself once
    BC < 1/2 (where 1 - hel/2 would lose the digits of a small BC)."""
    norm = math.sqrt(p_sum * q_sum)
    gap = math.sqrt(p_sum) - math.sqrt(q_sum)
    h2 = (0.5 * hel - 0.5 * gap * gap) / norm
    if h2 <= 0.5:
        return -math.log1p(-max(h2, 0.0))
    return -math.log(bc / norm) if bc > 0.0 else INF


# ------------------------------ float32 probabilities used as they are
# The common case (float32 probs, no normalize, no smoothing) skips the scan:
# the term loops validate as they go. Each returns its sums and a `flag`,
# a float sum that is 0 only when every element was fit for the float32 log
# (ratio a normal float32: no zero denominator under a non-zero numerator,
# nothing beyond the float32 range, no NaN, inf or negative value; a
# subnormal or zero numerator is fine, it gives a term of 0 * finite = 0).
# A flagged row is redone by the scan and the general loops, which name the
# problem or handle the +inf, subnormal and out-of-range cases exactly. Row
# sums are float32 here (the caller allows for their rounding).
# The flag sums are written `abs(x if c else 0)`: LLVM 22 leaves the loop
# scalar for the equivalent `abs(x) if c else 0` (4x slower).


@_jit
def _sum64(terms, n):
    """float64 sum of the first n float32 terms. The term loops store their
    float32 terms and this sums them: accumulating float64 inside a float32
    loop would make LLVM vectorise all of it at the float64 width (half the
    lanes; measured 2x slower), while a float32 accumulator would lose the
    error bound."""
    total = 0.0
    for j in range(n):
        total += np.float64(terms[j])
    return total


_U32_0 = np.uint32(0)
_I32_0 = np.int32(0)


@_inline
def _flag(worst, q_bits):
    """A float32 loop's flag (1: the row needs the general loops) from what it kept: the
    largest `normal_offset32` of what must be a normal float32, and the least bits of q
    (negative when some q has its sign bit set)."""
    return np.float32(1.0) if (worst >= NORMAL_SPAN_F) | (q_bits < _I32_0) else np.float32(0.0)


@_jit
def _kl32(prow, qrow, terms, p_decode, q_decode):
    """(sum p log(p/q), sum p, sum q, flag): the one-measure loop of `fastkl.kl`; rows of
    16-bit patterns (uint16) are decoded in the loop by p_decode / q_decode. The flag
    is nonzero when the row needs the general loops: a ratio p/q that is not a
    normal float32 where p != 0 (the largest offset from the smallest normal's
    bits, one unsigned max), or a q with its sign bit set (the least bits, one min)."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    p_sum = q_sum = zero
    worst = _U32_0
    q_bits = _I32_0
    for j in range(prow.size):
        p = as_float32(prow[j], p_decode)
        q = as_float32(qrow[j], q_decode)
        p_sum += p
        q_sum += q
        inv_q = one / q
        terms[0, j] = p * log_ratio32(p, inv_q, p - q)
        # the select comes before the offset: `offset if p != 0 else 0` stays scalar (LLVM 22)
        worst = max(worst, normal_offset32(p * inv_q if p != zero else one))
        q_bits = min(q_bits, float32_bits(q))
    kl = _sum64(terms[0], prow.size)
    return kl, p_sum, q_sum, _flag(worst, q_bits)


# The largest float16 bit pattern of a finite positive value (65504): above it
# are +inf, NaN and every negative value (-0 included).
_MAX_FINITE_F16 = np.uint16(0x7BFF)
_U16_0 = np.uint16(0)


@_jit
def _kl16(prow, qrow, terms, p_decode, q_decode):
    """`_kl32` for two float16 rows (uint16 bit patterns): the flag is found on
    the 16-bit patterns (integer max, no float compares). A ratio of two finite positive float16
    values lies in [2**-40, 2**40], always a normal float32, so a row needs the
    slow loops only for a value that is not finite, a negative one, or p > 0 = q."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    p_sum = q_sum = zero
    worst = unseen = _U16_0
    for j in range(prow.size):
        hp = prow[j]
        hq = qrow[j]
        worst = max(worst, max(hp, hq))
        unseen = max(unseen, hp if hq == _U16_0 else _U16_0)
        p = float16_value(hp)
        q = float16_value(hq)
        p_sum += p
        q_sum += q
        inv_q = one / q
        terms[0, j] = p * log_ratio32(p, inv_q, p - q)
    kl = _sum64(terms[0], prow.size)
    flag = one if (worst > _MAX_FINITE_F16) | (unseen != _U16_0) else zero
    return kl, p_sum, q_sum, flag


@_jit
def _kl_reverse32(prow, qrow, terms):
    """`_kl32` plus sum q log(q/p); flags q > 0 = p (reverse KL = +inf) too."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    kl = 0.0
    rkl = 0.0
    p_sum = q_sum = flag = zero
    for j in range(prow.size):
        p = prow[j]
        q = qrow[j]
        p_sum += p
        q_sum += q
        inv_q = one / q
        lr = log_ratio32(p, inv_q, p - q)
        terms[0, j] = p * lr
        terms[1, j] = q * lr
        odd = not_normal32(p * inv_q)
        flag += abs(p if odd else zero) + abs(q if odd else zero) - min(q, zero)
    kl = _sum64(terms[0], prow.size)
    rkl = -_sum64(terms[1], prow.size)
    return kl, rkl, p_sum, q_sum, flag


@_jit
def _kl_rkl_js_ent32(prow, qrow, terms):
    """(kl, reverse_kl, js sum, entropy, sum p, sum q, flag) in one pass with three logs
    per element (`_kl_reverse32`, `_js32` and `_entropy32` take four, in three passes).
    js's smaller side's log comes from the larger side's and the ratio's: with
    a = max(p, q), b = min(p, q), s = p + q, log(2b/s) = log(2a/s) - |log(p/q)|.
    That difference cancels only where p ~ q, and there by about 2 (log(2a/s) ~ d/2,
    |log(p/q)| ~ d, d = (a - b)/b), so each js term stays within ~3e-7 of itself;
    a row with a zero on one side only is flagged (kl or reverse_kl is +inf) and
    taken by the general loops."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    p_sum = q_sum = zero
    worst = _U32_0
    q_bits = _I32_0
    for j in range(prow.size):
        p = prow[j]
        q = qrow[j]
        p_sum += p
        q_sum += q
        inv_q = one / q
        lr = log_ratio32(p, inv_q, p - q)
        a = max(p, q)
        b = min(p, q)
        la = log_ratio32(a + a, one / (p + q), a - b)
        terms[0, j] = p * lr
        terms[1, j] = q * lr
        terms[2, j] = a * la + b * (la - abs(lr))
        terms[3, j] = p * log_ratio32(p, one, p - one)
        worst = max(worst, max(normal_offset32(p * inv_q if (p != zero) | (q != zero) else one),
                               normal_offset32(p if p != zero else one)))
        q_bits = min(q_bits, float32_bits(q))
    n = prow.size
    return (_sum64(terms[0], n), -_sum64(terms[1], n), _sum64(terms[2], n), -_sum64(terms[3], n), p_sum, q_sum,
            _flag(worst, q_bits))


@_jit
def _entropy32(prow, terms):
    """(-sum p log p, sum p, flag)."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    ent = 0.0
    p_sum = flag = zero
    for j in range(prow.size):
        p = prow[j]
        p_sum += p
        terms[0, j] = p * log_ratio32(p, one, p - one)
        flag += abs(p if not_normal32(p) else zero)
    ent = -_sum64(terms[0], prow.size)
    return ent, p_sum, flag


@_jit
def _cross_entropy32(prow, qrow, terms):
    zero = np.float32(0.0)
    one = np.float32(1.0)
    ce = 0.0
    flag = zero
    for j in range(prow.size):
        p = prow[j]
        q = qrow[j]
        terms[0, j] = p * log_ratio32(q, one, q - one)
        flag += abs(p if not_normal32(q) else zero)
    ce = -_sum64(terms[0], prow.size)
    return ce, flag


@_jit
def _js32(prow, qrow, terms):
    """sum p log(2p/(p+q)) + q log(2q/(p+q)); near p = q the logs take their
    mantissa from (p - q)/(p + q), as in `_js_terms_probs`."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    js = 0.0
    flag = zero
    for j in range(prow.size):
        p = prow[j]
        q = qrow[j]
        inv_s = one / (p + q)
        d = p - q
        pp = p + p
        qq = q + q
        terms[0, j] = p * log_ratio32(pp, inv_s, d) + q * log_ratio32(qq, inv_s, -d)
        flag += abs(p if not_normal32(pp * inv_s) else zero) + abs(q if not_normal32(qq * inv_s) else zero)
    js = _sum64(terms[0], prow.size)
    return js, flag


@_jit
def _gjs32(prow, qrow, terms, beta):
    """(sum b p log(p/m) + (1-b) q log(q/m), flag), m = b p + (1-b) q, 0 < b < 1: `_js32`
    with the mixture's weights (p - m = (1-b)(p - q) carries the mantissa near p ~ q)."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    b = np.float32(beta)
    c = np.float32(1.0 - beta)
    flag = zero
    for j in range(prow.size):
        p = prow[j]
        q = qrow[j]
        d = p - q
        inv_m = one / (b * p + c * q)
        terms[0, j] = b * p * log_ratio32(p, inv_m, c * d) + c * q * log_ratio32(q, inv_m, -b * d)
        flag += abs(p if not_normal32(p * inv_m) else zero) + abs(q if not_normal32(q * inv_m) else zero)
    return _sum64(terms[0], prow.size), flag


# Renyi's float32 loop is exact to 1e-6 only while x = (alpha-1) log(p/q) stays moderate:
# the log's ~1e-7 relative error moves e^x - 1 by ~1e-7 x e^x. The loop sums each
# term's |t| x (x > 0) and the row is redone in float64 when that could matter.
RENYI_X_MAX32 = np.float32(80.0)  # e^80 is far inside the float32 range


@_jit
def _renyi_direct32(prow, qrow, am1, terms):
    """sum p^alpha q^(1-alpha) of a float32 probs row (chunked float64 sum), for rows whose S is
    far below sum p (where S - sum p would lose S's digits)."""
    one = np.float32(1.0)
    a = np.float32(am1)
    total = 0.0
    for b0 in range(0, prow.size, SUM_BLOCK):
        b1 = min(b0 + SUM_BLOCK, prow.size)
        for j in range(b1 - b0):
            p = prow[b0 + j]
            q = qrow[b0 + j]
            inv_q = one / q
            e = exp32(a * log_ratio32(p, inv_q, p - q))
            terms[0, j] = p * e if p > np.float32(0.0) else np.float32(0.0)
        total += _sum64(terms[0], b1 - b0)
    return total


@_jit
def _kl_renyi32(prow, qrow, terms, am1):
    """`_kl32` and renyi's sum of p expm1(x), x = (alpha-1) log(p/q), in one loop sharing the log:
    (kl, p_sum, q_sum, flag, ren, sum |t|, sum |t| max(x, 0)); q = 0 < p, ratios out of range
    and x > 80 are flagged. The terms go to rows 0-1 of `terms` (S itself, rarely needed, is
    `_renyi_direct32`'s)."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    a = np.float32(am1)
    p_sum = q_sum = flag = size = growth = zero
    for j in range(prow.size):
        p = prow[j]
        q = qrow[j]
        p_sum += p
        q_sum += q
        inv_q = one / q
        lr = log_ratio32(p, inv_q, p - q)
        terms[0, j] = p * lr
        x = a * lr
        em1 = expm1_32(x)
        t = p * em1 if p > zero else zero
        terms[1, j] = t
        size += abs(t)
        growth += abs(t) * max(x, zero)
        flag += abs(p if (not_normal32(p * inv_q) | (x > RENYI_X_MAX32)) else zero) - min(q, zero)
    n = prow.size
    return _sum64(terms[0], n), p_sum, q_sum, flag, _sum64(terms[1], n), size, growth


@_jit
def _tv_hellinger32(prow, qrow, terms):
    tv = 0.0
    hel = 0.0
    zero = np.float32(0.0)
    for j in range(prow.size):
        p = prow[j]
        q = qrow[j]
        d = p - q
        root_sum = np.sqrt(p) + np.sqrt(q)
        h = d / root_sum  # = sqrt p - sqrt q, without cancelling
        terms[0, j] = abs(d)
        terms[1, j] = h * h if root_sum > zero else zero
        terms[2, j] = np.sqrt(p * q)
    tv = _sum64(terms[0], prow.size)
    hel = _sum64(terms[1], prow.size)
    return tv, hel, _sum64(terms[2], prow.size)


@_jit
def _sums32(prow, qrow):
    """(sum p, sum q, flag) when no ratio loop validates the row: NaN and inf
    show in the sums, negative values in the flag."""
    zero = np.float32(0.0)
    p_sum = q_sum = flag = zero
    for j in range(prow.size):
        p = prow[j]
        q = qrow[j]
        p_sum += p
        q_sum += q
        flag -= min(p, zero) + min(q, zero)
    return p_sum, q_sum, flag


# Long rows are summed in chunks of SUM_BLOCK values: a float32 sum of k values
# >= 0 is off by < k 2**-24 of it, too loose to tell a sum within sum_tol of 1
# once k is in the thousands (K = 131,072: 0.8%); float32 within a chunk, float64
# across chunks keeps the bound at SUM_BLOCK 2**-24 whatever K, and every chunk
# still runs the vectorised one-pass loops (a chunk of both rows fits in L1).
SUM_BLOCK = 1024


def _in_chunks(kl_loop):
    """`kl_loop` (a float32 kl loop: (kl, p_sum, q_sum, flag)) over chunks of
    SUM_BLOCK, its sums and flag added in float64."""

    def chunked(arow, brow, terms, a_decode, b_decode):
        if arow.size <= SUM_BLOCK:  # one chunk: no slicing (measured 7% of a row of 256)
            a, ps, qs, f = kl_loop(arow, brow, terms, a_decode, b_decode)
            return a, np.float64(ps), np.float64(qs), np.float64(f)
        kl = p_sum = q_sum = flag = 0.0
        for b0 in range(0, arow.size, SUM_BLOCK):
            b1 = min(b0 + SUM_BLOCK, arow.size)
            a, ps, qs, f = kl_loop(arow[b0:b1], brow[b0:b1], terms, a_decode, b_decode)
            kl += a
            p_sum += np.float64(ps)
            q_sum += np.float64(qs)
            flag += np.float64(f)
        return kl, p_sum, q_sum, flag

    chunked.__qualname__ = chunked.__name__ = f"{kl_loop.__name__}_blocked"
    return _inline(chunked)


_kl32_blocked = _in_chunks(_kl32)
_kl16_blocked = _in_chunks(_kl16)


def _kl_probs(prow, qrow, terms, p_decode, q_decode):
    """The kl loop for a row of probabilities: `_kl16` for two float16 rows, else `_kl32`."""


@overload(_kl_probs, inline="always")
def _kl_probs_typed(prow, qrow, terms, p_decode, q_decode):
    if not (isinstance(prow.dtype, types.Integer) and isinstance(qrow.dtype, types.Integer)):
        return lambda prow, qrow, terms, p_decode, q_decode: _kl32_blocked(prow, qrow, terms, p_decode, q_decode)

    def halves(prow, qrow, terms, p_decode, q_decode):
        if p_decode == FLOAT16 and q_decode == FLOAT16:
            return _kl16_blocked(prow, qrow, terms, p_decode, q_decode)
        return _kl32_blocked(prow, qrow, terms, p_decode, q_decode)
    return halves


@_jit
def _probs32_chunk(prow, qrow, use_q, want_kl, want_rkl, want_ent, want_ce, want_js, want_gjs, want_renyi, beta,
                   am1, terms):
    """The requested sums over one chunk of a float32 probs row:
    (flag, p_sum, q_sum, kl, rkl, ent, ce, js, gjs, ren); a Renyi sum that float32 cannot
    give within the error bound sets the flag."""
    kl = rkl = ent = ce = js = gjs = ren = 0.0
    flag = np.float32(0.0)
    p_sum = q_sum = np.float32(0.0)
    if not use_q:
        ent, p_sum, flag = _entropy32(prow, terms)
    elif want_rkl and want_js and want_ent and not want_renyi:  # the four in one pass
        kl, rkl, js, ent, p_sum, q_sum, flag = _kl_rkl_js_ent32(prow, qrow, terms)
        if want_ce:
            ce, f = _cross_entropy32(prow, qrow, terms)
            flag += f
        if want_gjs and 0.0 < beta < 1.0:
            gjs, f = _gjs32(prow, qrow, terms, beta)
            flag += f
    else:
        if want_renyi:  # renyi shares kl's log in one loop (which also gives kl and the sums)
            kl, p_sum, q_sum, f, ren, size, growth = _kl_renyi32(prow, qrow, terms, am1)
            flag += f + (np.float32(1.0) if growth > np.float32(2.0) * size else np.float32(0.0))
        if want_rkl:
            kl, rkl, p_sum, q_sum, f = _kl_reverse32(prow, qrow, terms)
            flag += f
        elif want_kl and not want_renyi:
            kl, p_sum, q_sum, flag = _kl32(prow, qrow, terms, 0, 0)
        elif not want_renyi:
            p_sum, q_sum, flag = _sums32(prow, qrow)
        if want_ent:
            ent, _, f = _entropy32(prow, terms)
            flag += f
        if want_ce:
            ce, f = _cross_entropy32(prow, qrow, terms)
            flag += f
        if want_js:
            js, f = _js32(prow, qrow, terms)
            flag += f
        if want_gjs and 0.0 < beta < 1.0:  # gjs is 0 at beta = 0 and 1
            gjs, f = _gjs32(prow, qrow, terms, beta)
            flag += f
    return flag, p_sum, q_sum, kl, rkl, ent, ce, js, gjs, ren


@_jit
def _probs32_terms(prow, qrow, use_q, want_kl, want_rkl, want_ent, want_ce, want_js, want_gjs, want_renyi,
                   want_tvh, want_bha, beta, am1, sum_tol, terms):
    """All requested sums for a float32 probs row (renyi as log(S / sum p)), or ok = False
    when the row needs the scan and the general loops (a flag, or a row sum not clearly
    within `sum_tol`)."""
    kl = rkl = ent = ce = js = gjs = ren = tv = hel = 0.0
    flag = p_sum = q_sum = 0.0
    for b0 in range(0, prow.size, SUM_BLOCK):
        b1 = min(b0 + SUM_BLOCK, prow.size)
        f, ps, qs, a, b, c, d, e, g, r = _probs32_chunk(prow[b0:b1], qrow[b0:b1], use_q, want_kl, want_rkl,
                                                        want_ent, want_ce, want_js, want_gjs, want_renyi, beta,
                                                        am1, terms)
        flag += np.float64(f)
        p_sum += np.float64(ps)
        q_sum += np.float64(qs)
        kl += a
        rkl += b
        ent += c
        ce += d
        js += e
        gjs += g
        ren += r
    if not use_q:
        q_sum = 1.0
    if want_renyi:  # divided by the float64 sum of p: the chunked float32 one is too coarse here
        p64 = _sum64(prow, prow.size)
        direct = _renyi_direct32(prow, qrow, am1, terms) if ren < -0.5 * p64 else 0.0
        ren = _renyi_log(ren, direct, p64, 0.0, am1)
        flag += 0.0 if ren == ren else 1.0  # S underflowed: the general loop's log-sum-exp
    ok = flag == 0.0 and _sums_within32(p_sum, q_sum, min(prow.size, SUM_BLOCK), sum_tol)
    bha = 0.0
    if ok and want_tvh:
        bc = 0.0
        for b0 in range(0, prow.size, SUM_BLOCK):
            b1 = min(b0 + SUM_BLOCK, prow.size)
            a, b, c = _tv_hellinger32(prow[b0:b1], qrow[b0:b1], terms)
            tv += a
            hel += b
            bc += c
        if want_bha:  # with float64 row sums: the chunked float32 ones are too coarse here
            bha = _bhattacharyya(hel, bc, _sum64(prow, prow.size), _sum64(qrow, qrow.size))
    return ok, kl, rkl, ent, ce, js, gjs, ren, tv, hel, bha


# ------------------------------ float32 log-probabilities used as they are
# Same scheme as float32 probs: exp in float32 (`exp32`), float32 row sums of
# the exponentials, and a flag for what the fast loop does not do exactly: a
# log-probability in (-inf, -87) (its exp is subnormal) and a zero probability
# under a non-zero one (+inf measures). NaN, +inf and log-probabilities > 0
# need no flag: they show in the sums (exp(a) > 1 + sum_tol for a > sum_tol).
# -inf (probability 0) is fine: exp32 gives exactly 0 and the term is selected to 0.

LOG_MIN32 = np.float32(-87.0)
NEG_INF32 = np.float32(-np.inf)


@_jit
def _kl_logs32(arow, brow, terms, p_decode, q_decode):
    """(sum p (a - b), sum p, sum q, flag) for log-probabilities a, b (16-bit rows decoded in the loop)."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    kl = 0.0
    p_sum = q_sum = flag = zero
    for j in range(arow.size):
        a = as_float32(arow[j], p_decode)
        b = as_float32(brow[j], q_decode)
        p = exp32(a)
        p_sum += p
        q_sum += exp32(b)
        p_pos = a > NEG_INF32
        terms[0, j] = p * (a - b if p_pos else zero)
        flag += one if (p_pos & ((a < LOG_MIN32) | (b == NEG_INF32))) else zero
    kl = _sum64(terms[0], arow.size)
    return kl, p_sum, q_sum, flag


@_jit
def _kl_renyi_logs32(arow, brow, terms, am1):
    """`_kl_logs32` and renyi's sum of p expm1(x), x = (alpha-1)(a - b), in one loop sharing
    a - b and exp(a): (kl, p_sum, q_sum, flag, ren, sum |t|, sum |t| max(x, 0), float64 sum p),
    flagged as `_kl_logs32` flags and, as `_kl_renyi32`, x > 80. Rows 0-2 of `terms`."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    c = np.float32(am1)
    p_sum = q_sum = flag = size = growth = zero
    for j in range(arow.size):
        a = arow[j]
        b = brow[j]
        p = exp32(a)
        p_sum += p
        q_sum += exp32(b)
        p_pos = a > NEG_INF32
        d = a - b if p_pos else zero
        terms[0, j] = p * d
        terms[2, j] = p
        x = c * d
        t = p * expm1_32(x)  # (p = 0: d = x = 0, t = 0)
        terms[1, j] = t
        size += abs(t)
        growth += abs(t) * max(x, zero)
        flag += one if (p_pos & ((a < LOG_MIN32) | (b == NEG_INF32) | (x > RENYI_X_MAX32))) else zero
    n = arow.size
    return _sum64(terms[0], n), p_sum, q_sum, flag, _sum64(terms[1], n), size, growth, _sum64(terms[2], n)


@_jit
def _kl_reverse_logs32(arow, brow, terms):
    """`_kl_logs32` plus sum q (b - a)."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    kl = 0.0
    rkl = 0.0
    p_sum = q_sum = flag = zero
    for j in range(arow.size):
        a = arow[j]
        b = brow[j]
        p = exp32(a)
        q = exp32(b)
        p_sum += p
        q_sum += q
        p_pos = a > NEG_INF32
        q_pos = b > NEG_INF32
        d = a - b if (p_pos & q_pos) else zero
        terms[0, j] = p * d
        terms[1, j] = q * d
        p_alone = p_pos & ((a < LOG_MIN32) | (b == NEG_INF32))
        q_alone = q_pos & ((b < LOG_MIN32) | (a == NEG_INF32))
        flag += one if (p_alone | q_alone) else zero
    kl = _sum64(terms[0], arow.size)
    rkl = -_sum64(terms[1], arow.size)
    return kl, rkl, p_sum, q_sum, flag


@_jit
def _entropy_logs32(arow, terms):
    """(-sum p a, sum p, flag)."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    ent = 0.0
    p_sum = flag = zero
    for j in range(arow.size):
        a = arow[j]
        p = exp32(a)
        p_sum += p
        p_pos = a > NEG_INF32
        terms[0, j] = p * (a if p_pos else zero)
        flag += one if (p_pos & (a < LOG_MIN32)) else zero
    ent = -_sum64(terms[0], arow.size)
    return ent, p_sum, flag


@_jit
def _cross_entropy_logs32(arow, brow, terms):
    """(-sum p b, flag)."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    ce = 0.0
    flag = zero
    for j in range(arow.size):
        a = arow[j]
        b = brow[j]
        p_pos = a > NEG_INF32
        terms[0, j] = exp32(a) * (b if p_pos else zero)
        flag += one if (p_pos & ((a < LOG_MIN32) | (b == NEG_INF32))) else zero
    ce = -_sum64(terms[0], arow.size)
    return ce, flag


_kl_logs32_blocked = _in_chunks(_kl_logs32)

# JS, TV and Hellinger of float32 log-probabilities: per element one exponential of the
# larger side (big) and one of the difference of the logs, e^-|a-b| = small / big, with
# em = expm1(-|a - b|) (its series near 0, so p - q = big em keeps its digits however
# close p and q are), and what each
# measure needs of em. Both sides -inf: big = 0 and every term 0; one side -inf: em = -1.
# A side in (-inf, -87) (a subnormal exponential) or a NaN is flagged (the scan names it).
INF32 = np.float32(np.inf)


@njit(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _pair_logs32(a, b):
    """(big, small, e^-|a-b|, em, |a - b|, both > -inf, p, q, flag) of one element of two float32
    log-probability rows. Inlined: what a loop does not use is not computed."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    p_pos = a > NEG_INF32
    q_pos = b > NEG_INF32
    both = p_pos & q_pos
    big = exp32(a if a >= b else b)
    ad = abs(a - b) if both else (INF32 if (p_pos | q_pos) else zero)
    ex = exp32(-ad)  # small / big, exact to ~1e-7 of itself however small
    em = expm1_with32(-ad, ex)
    small = big * ex
    p_big = a >= b
    bad = (a != a) | (b != b) | (p_pos & (a < LOG_MIN32)) | (q_pos & (b < LOG_MIN32))
    return big, small, ex, em, ad, both, big if p_big else small, small if p_big else big, one if bad else zero


@_jit
def _js_logs32(arow, brow, terms):
    """(sum p log(2p/(p+q)) + q log(2q/(p+q)), sum p, sum q, flag) for float32 log-probabilities:
    with L = log1p(em/2) (one log, its mantissa from em/2), the larger side's half is
    -big L and the smaller's small (-|d| - L), the halves of `_js_terms_logs`."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    half = np.float32(0.5)
    p_sum = q_sum = flag = zero
    for j in range(arow.size):
        big, small, ex, em, ad, both, p, q, bad = _pair_logs32(arow[j], brow[j])
        h = half * em
        lg = log_ratio32(one + h, one, h)
        terms[0, j] = -big * lg + (small * (-ad - lg) if both else zero)
        p_sum += p
        q_sum += q
        flag += bad
    return _sum64(terms[0], arow.size), p_sum, q_sum, flag


@_jit
def _gjs_logs32(arow, brow, terms, beta):
    """(sum b p log(p/m) + (1-b) q log(q/m), sum p, sum q, flag), m = b p + (1-b) q, 0 < b < 1,
    for float32 log-probabilities, with w_big, w_small the weights of the larger and the
    smaller side. log(m / big) = log1p(w_small em), or the log of the sum of positives
    w_big + w_small e^-|d| where that argument is below -1/2 (it would cancel); log(m / small)
    = log1p(w_big expm1(|d|)) on its own (from log(m / big) - |d| it would cancel near the
    ends of beta, where float32 rounds 1 - b to 1)."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    b = np.float32(beta)
    c = np.float32(1.0 - beta)
    p_sum = q_sum = flag = zero
    for j in range(arow.size):
        x = arow[j]
        y = brow[j]
        big, small, ex, em, ad, both, p, q, bad = _pair_logs32(x, y)
        w_big = b if x >= y else c
        w_small = c if x >= y else b
        arg = w_small * em
        below = arg < np.float32(-0.5)
        num = w_big + w_small * ex if below else one + arg
        to_big = log_ratio32(num, one, num - one if below else arg)
        up = w_big * (-em / ex)  # w_big expm1(|d|) >= 0
        to_small = log_ratio32(one + up, one, up)
        terms[0, j] = -w_big * big * to_big - (w_small * small * to_small if both else zero)
        p_sum += p
        q_sum += q
        flag += bad
    return _sum64(terms[0], arow.size), p_sum, q_sum, flag


@_jit
def _tv_hellinger_logs32(arow, brow, terms, want_bha):
    """(sum |p - q|, sum (sqrt p - sqrt q)^2, sum p, sum q, flag, and with `want_bha` the float64
    sums of sqrt(p q), p and q) for float32 log-probabilities: |p - q| = -big em, sqrt p - sqrt q
    = sqrt(big) em / (1 + sqrt(e^-|d|)) (no cancelling), sqrt(p q) = big sqrt(e^-|d|)."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    p_sum = q_sum = flag = zero
    for j in range(arow.size):
        big, small, ex, em, ad, both, p, q, bad = _pair_logs32(arow[j], brow[j])
        root = np.sqrt(ex)
        r = em / (one + root)
        terms[0, j] = -big * em
        terms[1, j] = big * r * r
        terms[2, j] = big * root
        terms[3, j] = p
        terms[4, j] = q
        p_sum += p
        q_sum += q
        flag += bad
    n = arow.size
    bc = p64 = q64 = 0.0
    if want_bha:
        bc, p64, q64 = _sum64(terms[2], n), _sum64(terms[3], n), _sum64(terms[4], n)
    return _sum64(terms[0], n), _sum64(terms[1], n), p_sum, q_sum, flag, bc, p64, q64


@_jit
def _logprobs32_chunk(arow, brow, use_q, want_kl, want_rkl, want_ent, want_ce, want_js, want_tvh, want_gjs, beta,
                      want_bha, want_renyi, am1, terms):
    """The requested sums over one chunk of a float32 logprobs row: (flag, p_sum, q_sum, kl, rkl,
    ent, ce, js, tv, hel, gjs, bc, p64, q64, ren); the first loop that runs gives the row sums
    (bc, p64, q64: bhattacharyya's sum of sqrt(p q) and float64 row sums, with want_bha; p64
    also with want_renyi, whose ren is the sum of p expm1((alpha-1) log(p/q)))."""
    kl = rkl = ent = ce = js = tv = hel = gjs = bc = p64 = q64 = ren = 0.0
    want_gjs = want_gjs and 0.0 < beta < 1.0  # gjs is 0 at beta = 0 and 1
    flag = np.float32(0.0)
    p_sum = q_sum = np.float32(0.0)
    sums = False  # the row sums are there
    if use_q:
        if want_renyi:  # renyi shares kl's a - b and exp(a) in one loop (which also gives kl and the sums)
            kl, p_sum, q_sum, f, ren, size, growth, p64 = _kl_renyi_logs32(arow, brow, terms, am1)
            flag += f + (np.float32(1.0) if growth > np.float32(2.0) * size else np.float32(0.0))
            sums = True
        if want_rkl:
            kl, rkl, p_sum, q_sum, f = _kl_reverse_logs32(arow, brow, terms)
            flag += f
            sums = True
        elif not want_renyi and (want_kl or not (want_js or want_tvh or want_gjs)):  # also checks ent / ce's sums
            kl, p_sum, q_sum, flag = _kl_logs32(arow, brow, terms, 0, 0)
            sums = True
        if want_js:
            js, ps, qs, f = _js_logs32(arow, brow, terms)
            p_sum, q_sum, sums = (p_sum, q_sum, sums) if sums else (ps, qs, True)
            flag += f
        if want_gjs:
            gjs, ps, qs, f = _gjs_logs32(arow, brow, terms, beta)
            p_sum, q_sum, sums = (p_sum, q_sum, sums) if sums else (ps, qs, True)
            flag += f
        if want_tvh:
            tv, hel, ps, qs, f, bc, pc, q64 = _tv_hellinger_logs32(arow, brow, terms, want_bha)
            p_sum, q_sum = (p_sum, q_sum) if sums else (ps, qs)
            p64 = p64 if want_renyi else pc
            flag += f
    if want_ent or not use_q:
        ent, p_sum, f = _entropy_logs32(arow, terms)
        flag += f
    if use_q and want_ce:
        ce, f = _cross_entropy_logs32(arow, brow, terms)
        flag += f
    return flag, p_sum, q_sum, kl, rkl, ent, ce, js, tv, hel, gjs, bc, p64, q64, ren


@_jit
def _logprobs32_terms(arow, brow, use_q, want_kl, want_rkl, want_ent, want_ce, want_js, want_tvh, want_gjs, beta,
                      want_bha, want_renyi, am1, sum_tol, terms):
    """All requested sums for a float32 logprobs row (renyi as log(S / sum p)), or ok = False
    when the row needs the scan and the float64 loops (a flag, a row sum not clearly within
    `sum_tol`, or S far below sum p, which S - sum p cannot give)."""
    kl = rkl = ent = ce = js = tv = hel = gjs = bc = p64 = q64 = ren = 0.0
    flag = p_sum = q_sum = 0.0
    for b0 in range(0, arow.size, SUM_BLOCK):
        b1 = min(b0 + SUM_BLOCK, arow.size)
        f, ps, qs, a, b, c, d, e, g, h, m, bcc, pc, qc, r = _logprobs32_chunk(
            arow[b0:b1], brow[b0:b1], use_q, want_kl, want_rkl, want_ent, want_ce, want_js, want_tvh, want_gjs, beta,
            want_bha, want_renyi, am1, terms)
        ren += r
        flag += np.float64(f)
        p_sum += np.float64(ps)
        q_sum += np.float64(qs)
        kl += a
        rkl += b
        ent += c
        ce += d
        js += e
        tv += g
        hel += h
        gjs += m
        bc += bcc
        p64 += pc
        q64 += qc
    if not use_q:
        q_sum = 1.0
    if want_renyi:  # NaN where S is far below sum p or underflowed: the general loops then
        ren = _renyi_log(ren, 0.0, p64, 0.0, am1)
        flag += 0.0 if ren == ren else 1.0
    ok = flag == 0.0 and _sums_within32(p_sum, q_sum, min(arow.size, SUM_BLOCK), sum_tol)
    bha = _bhattacharyya(hel, bc, p64, q64) if (ok and want_bha) else 0.0
    return ok, kl, rkl, ent, ce, js, tv, hel, gjs, bha, ren


@_inline
def _sums_within32(p_sum, q_sum, k, sum_tol):
    """Both row sums clearly within sum_tol of 1: a float32 sum of k values
    >= 0 is off by < k 2**-24 of it (k: the chunk length, for sums chunked
    into float64), and float32 exponentials by 1e-7 each (the margin doubles both)."""
    margin = (2.0 * k * 2.0**-24 + 2e-7) * (1.0 + sum_tol)
    return abs(np.float64(p_sum) - 1.0) <= sum_tol - margin and abs(np.float64(q_sum) - 1.0) <= sum_tol - margin


# ------------------------------------------- terms: both sides in log space
# a = (x - centre) * inv_t - log_norm; p = exp(a).


@_jit
def _ratio_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln):
    kl = 0.0
    rkl = 0.0
    p_only = 0.0
    q_only = 0.0
    p_sum = 0.0
    q_sum = 0.0
    for j in range(prow.size):
        a = (np.float64(prow[j]) - p_c) * p_it - p_ln
        b = (np.float64(qrow[j]) - q_c) * q_it - q_ln
        p_pos = a > -INF
        q_pos = b > -INF
        d = a - b
        d = d if (p_pos & q_pos) else 0.0
        p = exp_neg(a)
        q = exp_neg(b)
        kl += p * d
        rkl -= q * d
        p_sum += p
        q_sum += q
        # counts, not masses: exp(a) may underflow to 0 while a > -inf
        p_only += 1.0 if (p_pos & (b == -INF)) else 0.0
        q_only += 1.0 if (q_pos & (a == -INF)) else 0.0
    return kl, rkl, p_only, q_only, p_sum, q_sum


@_jit
def _entropy_terms_logs(prow, p_c, p_it, p_ln):
    ent = 0.0
    p_sum = 0.0
    for j in range(prow.size):
        a = (np.float64(prow[j]) - p_c) * p_it - p_ln
        p = exp_neg(a)
        a = a if a > -INF else 0.0  # p = 0 contributes 0
        ent -= p * a
        p_sum += p
    return ent, p_sum


@_jit
def _cross_entropy_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln):
    ce = 0.0
    for j in range(prow.size):
        a = (np.float64(prow[j]) - p_c) * p_it - p_ln
        b = (np.float64(qrow[j]) - q_c) * q_it - q_ln
        b = b if ((a > -INF) & (b > -INF)) else 0.0
        ce -= exp_neg(a) * b
    return ce


@_jit
def _log_over_mix(d, ex, em, w):
    """log(p / m), m = w p + (1-w) q, 0 < w < 1, from d = log(p/q) (finite), ex = e^-|d| and
    em = expm1(-|d|), with one log: -log1p((1-w) expm1(-d)) (its mantissa from the
    argument near 0), or the log of a sum of positives where that form would lose
    digits (far below 1: -log(w + (1-w) e^-d)) or overflow (q far above p:
    d - log((1-w) + w e^d))."""
    pos = d >= 0.0
    a = (1.0 - w) * (em if pos else -em / ex)  # (1-w) expm1(-d)
    below = pos & (a < -0.5)
    above = (~pos) & (a >= 1e300)
    num = w + (1.0 - w) * ex if below else ((1.0 - w) + w * ex if above else 1.0 + a)
    diff = num - 1.0 if below else (w * em if above else a)
    shift = d if above else 0.0
    return shift - log_ratio(num, 1.0, diff)


@njit(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _pair_logs(x, y, p_c, p_it, p_ln, q_c, q_it, q_ln):
    """One element of two log-space rows: (a, b, p, q, both, only_p, only_q, d, |d|, e^-|d|,
    expm1(-|d|)), d = a - b where both are > -inf, else 0. Inlined: what a loop does not use
    is not computed."""
    a = (np.float64(x) - p_c) * p_it - p_ln
    b = (np.float64(y) - q_c) * q_it - q_ln
    p_pos = a > -INF
    q_pos = b > -INF
    both = p_pos & q_pos
    d = a - b if both else 0.0
    ad = abs(d)
    only_p = p_pos & (b == -INF)
    only_q = q_pos & (a == -INF)
    return a, b, exp_neg(a), exp_neg(b), both, only_p, only_q, d, ad, exp_neg(-ad), expm1_f64(-ad)


@njit(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _add_sums(p_sum, q_sum, p_only, q_only, p, q, only_p, only_q):
    """The row sums and +inf counts every log-space loop of js / tv / gjs / renyi carries."""
    return p_sum + p, q_sum + q, p_only + (1.0 if only_p else 0.0), q_only + (1.0 if only_q else 0.0)


# One loop per group of measures, like the float32 loops: a loop with several groups
# behind run-time flags computes all of them (the vectoriser if-converts the branches).


@_jit
def _js_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln):
    """(sum p log(2p/(p+q)) + q log(2q/(p+q)), *sums): the terms as sum -(p + q) log1p(em/2)
    - min(p, q) |d|; sums = (sum p, sum q, count of q = 0 < p, of p = 0 < q), which every
    loop of this group returns (whichever runs first gives them)."""
    js = p_sum = q_sum = p_only = q_only = 0.0
    for j in range(prow.size):
        a, b, p, q, both, only_p, only_q, d, ad, ex, em = _pair_logs(prow[j], qrow[j], p_c, p_it, p_ln,
                                                                     q_c, q_it, q_ln)
        half = 0.5 * em
        t = -(p + q) * log_ratio(1.0 + half, 1.0, half) - (q if d >= 0.0 else p) * ad
        js += t if both else (p * LN2 if only_p else (q * LN2 if only_q else 0.0))
        p_sum, q_sum, p_only, q_only = _add_sums(p_sum, q_sum, p_only, q_only, p, q, only_p, only_q)
    return js, p_sum, q_sum, p_only, q_only


@_jit
def _tv_hellinger_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln):
    """(sum |p - q|, sum (sqrt p - sqrt q)^2, sum sqrt(p q), *sums), p - q from expm1 (no
    cancelling); sums as `_js_terms_logs`."""
    tv = hel = bc = p_sum = q_sum = p_only = q_only = 0.0
    for j in range(prow.size):
        a, b, p, q, both, only_p, only_q, d, ad, ex, em = _pair_logs(prow[j], qrow[j], p_c, p_it, p_ln,
                                                                     q_c, q_it, q_ln)
        diff = -p * em if d >= 0.0 else q * em
        diff = diff if both else p - q
        tv += abs(diff)
        root_sum = np.sqrt(p) + np.sqrt(q)
        h = diff / root_sum
        hel += h * h if root_sum > 0.0 else 0.0
        bc += exp_neg(0.5 * (a + b)) if both else 0.0
        p_sum, q_sum, p_only, q_only = _add_sums(p_sum, q_sum, p_only, q_only, p, q, only_p, only_q)
    return tv, hel, bc, p_sum, q_sum, p_only, q_only


@_jit
def _gjs_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln, w):
    """(sum w p log(p/m) + (1-w) q log(q/m), *sums), m = w p + (1-w) q, 0 < w < 1
    (`_log_over_mix`); sums as `_js_terms_logs`."""
    gjs = p_sum = q_sum = p_only = q_only = 0.0
    p_alone = -w * math.log(w)
    q_alone = -(1.0 - w) * math.log1p(-w)
    for j in range(prow.size):
        a, b, p, q, both, only_p, only_q, d, ad, ex, em = _pair_logs(prow[j], qrow[j], p_c, p_it, p_ln,
                                                                     q_c, q_it, q_ln)
        t = w * p * _log_over_mix(d, ex, em, w) + (1.0 - w) * q * _log_over_mix(-d, ex, em, 1.0 - w)
        gjs += t if both else (p * p_alone if only_p else (q * q_alone if only_q else 0.0))
        p_sum, q_sum, p_only, q_only = _add_sums(p_sum, q_sum, p_only, q_only, p, q, only_p, only_q)
    return gjs, p_sum, q_sum, p_only, q_only


@_jit
def _renyi_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln, am1):
    """(sum p expm1(x), sum p e^x, odd, *sums), x = (alpha-1)(a - b); odd > 0: a sum this loop
    cannot hold (e^x overflows, or p underflowed under a large e^x); sums as `_js_terms_logs`."""
    ren = direct = p_sum = q_sum = p_only = q_only = odd = 0.0
    for j in range(prow.size):
        a, b, p, q, both, only_p, only_q, d, ad, ex, em = _pair_logs(prow[j], qrow[j], p_c, p_it, p_ln,
                                                                     q_c, q_it, q_ln)
        x = am1 * d
        odd += 1.0 if (both & ((x > 700.0) | ((p == 0.0) & (x > 0.0)))) else 0.0
        x = min(x, 700.0)
        ren += p * expm1_f64(x) if both else (-p if only_p else 0.0)
        direct += exp_neg(min(a + x, 700.0)) if both else 0.0
        p_sum, q_sum, p_only, q_only = _add_sums(p_sum, q_sum, p_only, q_only, p, q, only_p, only_q)
    return ren, direct, odd, p_sum, q_sum, p_only, q_only


@_jit
def _logits_terms(prow, qrow, p_top, p_it, q_top, q_it):
    """Logits on both sides in one pass, 2 exponentials per element.

    With u = (x - max x) / T, v likewise for Q, e = exp(u), f = exp(v):
    a - b = u - v - (ln sum e - ln sum f), so KL(P||Q) = sum e (u - v) / sum e
    - (ln sum e - ln sum f); reverse KL, entropy and cross-entropy follow the
    same way. The rounding this adds is within the decode slack of the error bound
    for logits (a few ulps of the log-normalisers).
    Returns sum e, sum f, sum e u, sum e (u - v), sum f (v - u), and counts
    of elements where only P (resp. only Q) is unmasked.
    """
    p_sum = 0.0
    q_sum = 0.0
    pu = 0.0
    pv = 0.0
    qv = 0.0
    p_only = 0.0
    q_only = 0.0
    for j in range(prow.size):
        u = (np.float64(prow[j]) - p_top) * p_it
        v = (np.float64(qrow[j]) - q_top) * q_it
        e = exp_nonpositive(u)
        f = exp_nonpositive(v)
        p_pos = u > -INF
        q_pos = v > -INF
        d = u - v
        d = d if (p_pos & q_pos) else 0.0
        uu = u if p_pos else 0.0
        p_sum += e
        q_sum += f
        pu += e * uu
        pv += e * d
        qv -= f * d
        p_only += 1.0 if (p_pos & (v == -INF)) else 0.0
        q_only += 1.0 if (q_pos & (u == -INF)) else 0.0
    return p_sum, q_sum, pu, pv, qv, p_only, q_only


@_jit
def _logits_kl(prow, qrow, p_top, p_it, q_top, q_it):
    """kl and the count of elements where only P is unmasked: `_logits_terms`
    for kl alone (a third fewer sums to carry)."""
    p_sum = 0.0
    q_sum = 0.0
    pv = 0.0
    p_only = 0.0
    for j in range(prow.size):
        u = (np.float64(prow[j]) - p_top) * p_it
        v = (np.float64(qrow[j]) - q_top) * q_it
        e = exp_nonpositive(u)
        p_sum += e
        q_sum += exp_nonpositive(v)
        p_pos = u > -INF
        q_pos = v > -INF
        pv += e * (u - v if (p_pos & q_pos) else 0.0)
        p_only += 1.0 if (p_pos & ~q_pos) else 0.0
    return pv / p_sum - (math.log(p_sum) - math.log(q_sum)), p_only


# ------------------------------------------- general loop (any combination)


@_jit
def _log_ratio_exact(p, q):
    """log(p / q) for any p, q > 0 (libm), accurate to a few ulps."""
    d = p - q
    if abs(d) <= 0.5 * q:
        return math.log1p(d / q)  # p/q in [0.5, 1.5]: no cancellation
    r = p / q
    if MIN_NORMAL <= r <= MAX_FLOAT:
        return math.log(r)
    return math.log(p) - math.log(q)  # far from 1, so no cancellation


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
def _log_over_mixture(d, w):
    """log(p / m) for m = w p + (1-w) q, 0 < w < 1, from d = log(p/q) (finite): log1p of
    (1-w) expm1(-d) where that is accurate, the plain log of a sum of positives elsewhere."""
    a = (1.0 - w) * math.expm1(-d)
    if a < -0.5:  # far below: 1 + a = w + (1-w) e^-d, in (0, 1/2)
        return -math.log(w + (1.0 - w) * math.exp(-d))
    if a < 1e300:
        return -math.log1p(a)
    return d - math.log((1.0 - w) + w * math.exp(d))  # e^-d overflows: q far above p


@_jit
def _general_terms(prow, qrow, use_q, p_kind, q_kind,
                   p_scale, p_c, p_it, p_ln, q_scale, q_c, q_it, q_ln, smoothing, beta, am1, want_gjs, want_renyi):
    """All sums for one row, element by element with libm: any kinds, any measures
    (gjs and renyi only when asked: they cost a few libm calls per element)."""
    p_logdom = p_kind != PROBS and smoothing == 0.0
    q_logdom = q_kind != PROBS and smoothing == 0.0
    both_log = p_logdom and q_logdom
    smooth_norm = 1.0 / (1.0 + prow.size * smoothing)
    kl = rkl = js = ent = ce = tv = hel = 0.0
    kl_inf = rkl_inf = 0.0
    gjs = ren = p_sum = q_sum = bc = 0.0
    ren_top = -INF  # renyi's sum in log space as well (a running log-sum-exp), for rows where it overflows
    ren_scaled = 0.0
    mixed = want_gjs and 0.0 < beta < 1.0
    gjs_p_alone = -beta * math.log(beta) if mixed else 0.0  # b p log(p/m) with q = 0, per unit of p
    gjs_q_alone = -(1.0 - beta) * math.log1p(-beta) if mixed else 0.0
    for j in range(prow.size):
        x = np.float64(prow[j])
        if p_kind == PROBS:
            p = x * p_scale
            a = 0.0
        else:
            a = (x - p_c) * p_it - p_ln
            p = math.exp(a)
        if smoothing > 0.0:
            p = (p + smoothing) * smooth_norm
        p_pos = a > -INF if p_logdom else p > 0.0
        if use_q:
            y = np.float64(qrow[j])
            if q_kind == PROBS:
                q = y * q_scale
                b = 0.0
            else:
                b = (y - q_c) * q_it - q_ln
                q = math.exp(b)
            if smoothing > 0.0:
                q = (q + smoothing) * smooth_norm
            q_pos = b > -INF if q_logdom else q > 0.0
        else:
            q, b, q_pos = p, a, p_pos

        p_sum += p
        q_sum += q
        if p_pos:
            ent -= p * (a if p_logdom else math.log(p))
        if p_pos and q_pos:
            if both_log:
                d = a - b
            elif not p_logdom and not q_logdom:
                d = _log_ratio_exact(p, q)
            else:
                d = (a if p_logdom else math.log(p)) - (b if q_logdom else math.log(q))
            kl += p * d
            rkl -= q * d
            lp, lq = _js_logs(d)
            js += p * lp + q * lq
            ce -= p * (b if q_logdom else math.log(q))
            diff = _diff_from_logs(p, q, d) if both_log else p - q
            tv += abs(diff)
            root_sum = math.sqrt(p) + math.sqrt(q)
            if root_sum > 0.0:  # both may underflow to 0 in log space
                h = diff / root_sum
                hel += h * h
            bc += math.exp(0.5 * (a + b)) if both_log else math.sqrt(p) * math.sqrt(q)
            if mixed:
                gjs += beta * p * _log_over_mixture(d, beta) + (1.0 - beta) * q * _log_over_mixture(-d, 1.0 - beta)
            if want_renyi:
                x = am1 * d
                ren += p * math.expm1(x)
                y = (a if p_logdom else math.log(p)) + x
                if y > ren_top:
                    ren_scaled = ren_scaled * math.exp(ren_top - y) + 1.0
                    ren_top = y
                else:
                    ren_scaled += math.exp(y - ren_top)
        elif p_pos:  # q_i = 0
            kl_inf += 1.0
            js += p * LN2
            tv += p
            hel += p
            gjs += p * gjs_p_alone
            ren -= p
        elif q_pos:  # p_i = 0
            rkl_inf += 1.0
            js += q * LN2
            tv += q
            hel += q
            gjs += q * gjs_q_alone
    if want_renyi:
        ren = _renyi_log(ren, math.exp(ren_top) * ren_scaled, p_sum, kl_inf, am1)
        if ren != ren:  # the sum overflowed: its log-sum-exp instead
            ren = ren_top + math.log(ren_scaled) - math.log(p_sum)
    bha = _bhattacharyya(hel, bc, p_sum, q_sum)
    return kl, rkl, js, ent, ce, tv, hel, kl_inf, rkl_inf, gjs, ren, bha


# ---------------------------------------------------------------- the kernel


@_jit
def _probs_row(prow, qrow, p_values, ps, p_mask, p_mask_offset, q_values, qs, q_mask, q_mask_offset,
               use_q, normalize, smoothing, sum_tol, want_kl, want_rkl, want_js, want_ent, want_ce, want_tvh,
               want_gjs, want_renyi, beta, am1):
    """Status and sums of one row whose sides are probabilities (rows the
    kernel's float32 loops did not settle)."""
    k = prow.size
    kl = rkl = js = ent = ce = tv = hel = 0.0
    kl_inf = rkl_inf = 0.0  # > 0: some p_i > 0 = q_i (resp. q_i > 0 = p_i)
    gjs = ren = bha = 0.0
    code, p_scale = _scan_probs_side(p_values, ps, k, p_mask, p_mask_offset, normalize, sum_tol)
    q_scale = 1.0
    if use_q:
        q_code, q_scale = _scan_probs_side(q_values, qs, k, q_mask, q_mask_offset, normalize, sum_tol)
        if q_code and (code == OK or q_code < code):
            code = q_code
    if code != OK:
        return code, kl, rkl, js, ent, ce, tv, hel, kl_inf, rkl_inf, gjs, ren, bha
    smooth_norm = 1.0 / (1.0 + k * smoothing)
    p_mul, q_mul, add = p_scale * smooth_norm, q_scale * smooth_norm, smoothing * smooth_norm
    general = False
    if use_q and (want_kl or want_rkl or want_ce):
        kl, rkl, kl_inf, rkl_inf, odd = _ratio_terms_probs(prow, qrow, p_mul, add, q_mul, add)
        general = odd > 0
    if want_ent:
        ent = _entropy_terms_probs(prow, p_mul, add)
    if want_ce:
        ce = _cross_entropy_terms_probs(prow, qrow, p_mul, add, q_mul, add)
    if want_js:
        js, odd = _js_terms_probs(prow, qrow, p_mul, add, q_mul, add)
        general = general or odd > 0
    if want_tvh:
        tv, hel, bc, p_sum, q_sum = _tv_hellinger_terms_probs(prow, qrow, p_mul, add, q_mul, add)
        bha = _bhattacharyya(hel, bc, p_sum, q_sum)
    if want_gjs and 0.0 < beta < 1.0:
        gjs, odd = _gjs_terms_probs(prow, qrow, p_mul, add, q_mul, add, beta)
        general = general or odd > 0
    if want_renyi:
        ren, direct, p_sum, p_only = _renyi_terms_probs(prow, qrow, p_mul, add, q_mul, add, am1)
        ren = _renyi_log(ren, direct, p_sum, p_only, am1)
        if ren != ren:
            ren = _renyi_log_probs(prow, qrow, p_mul, add, q_mul, add, am1)
    if general:
        return _general_row(prow, qrow, use_q, PROBS, PROBS, p_scale, 0.0, 1.0, 0.0, q_scale, 0.0, 1.0, 0.0,
                            smoothing, beta, am1, want_gjs, want_renyi)
    return OK, kl, rkl, js, ent, ce, tv, hel, kl_inf, rkl_inf, gjs, ren, bha


@_jit
def _logs_row(prow, qrow, p_values, ps, p_mask, p_mask_offset, q_values, qs, q_mask, q_mask_offset,
              use_q, p_kind, q_kind, p_it, q_it, normalize, sum_tol,
              want_kl, want_rkl, want_js, want_ent, want_ce, want_tvh, want_gjs, want_renyi, beta, am1):
    """Status and sums of one row whose sides are both in log space (no smoothing;
    rows the kernel's float32 loops did not settle)."""
    k = prow.size
    kl = rkl = js = ent = ce = tv = hel = gjs = ren = bha = 0.0
    kl_inf = rkl_inf = 0.0
    more = use_q and (want_js or want_tvh or want_gjs or want_renyi)  # their loops read normalised sides
    # logits on both sides: one fused pass (_logits_terms) after the row maxima
    logits_fused = not more and p_kind == LOGITS and (q_kind == LOGITS or not use_q)
    # logprobs rows check their exp-sum inside the term loop
    p_defer = logits_fused or (p_kind == LOGPROBS and not normalize)
    q_defer = logits_fused or (use_q and q_kind == LOGPROBS and not normalize)
    code, p_c, p_ln = _scan_log_side(p_values, ps, k, p_mask, p_mask_offset, p_kind, p_it, normalize, sum_tol,
                                     p_defer)
    q_c = q_ln = 0.0
    if use_q:
        q_code, q_c, q_ln = _scan_log_side(q_values, qs, k, q_mask, q_mask_offset, q_kind, q_it, normalize,
                                           sum_tol, q_defer)
        if q_code and (code == OK or q_code < code):
            code = q_code
    if code != OK:
        return code, kl, rkl, js, ent, ce, tv, hel, kl_inf, rkl_inf, gjs, ren, bha
    if logits_fused and use_q and not (want_rkl or want_ent or want_ce):
        kl, p_only = _logits_kl(prow, qrow, p_c, p_it, q_c, q_it)
        return OK, kl, rkl, js, ent, ce, tv, hel, p_only, 0.0, gjs, ren, bha
    if logits_fused:
        p_sum, q_sum, pu, pv, qv, p_only, q_only = _logits_terms(prow, qrow, p_c, p_it, q_c, q_it)
        p_ln = math.log(p_sum)
        q_ln = math.log(q_sum)
        shift = p_ln - q_ln
        kl = pv / p_sum - shift
        rkl = qv / q_sum + shift
        ent = p_ln - pu / p_sum
        ce = q_ln - (pu - pv) / p_sum
        return OK, kl, rkl, js, ent, ce, tv, hel, p_only, q_only, gjs, ren, bha
    p_sum = q_sum = 1.0
    if use_q and (want_kl or want_rkl or want_ce or not more):
        kl, rkl, kl_inf, rkl_inf, p_sum, q_sum = _ratio_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln)
    if more:  # each loop also gives the sums and +inf counts (taken from the first that runs)
        odd = 0.0
        if want_renyi:
            ren, direct, odd, ps, qs, po, qo = _renyi_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln, am1)
        elif want_js:
            js, ps, qs, po, qo = _js_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln)
        elif want_tvh:
            tv, hel, bc, ps, qs, po, qo = _tv_hellinger_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln)
        else:  # gjs alone (0 at beta = 0 and 1: the loop still gives the sums)
            gjs, ps, qs, po, qo = _gjs_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln,
                                                  beta if 0.0 < beta < 1.0 else 0.5)
            gjs = gjs if 0.0 < beta < 1.0 else 0.0
        if not (want_kl or want_rkl or want_ce):
            p_sum, q_sum, kl_inf, rkl_inf = ps, qs, po, qo
        if (p_defer and abs(ps - 1.0) > sum_tol) or (q_defer and abs(qs - 1.0) > sum_tol):
            return NOT_NORMALIZED, kl, rkl, js, ent, ce, tv, hel, kl_inf, rkl_inf, gjs, ren, bha
        if want_renyi:
            ren = NAN_ if odd > 0.0 else _renyi_log(ren, direct, ps, po, am1)
            if ren != ren:  # a sum this loop cannot hold, or S underflowed: the general loop's log-sum-exp
                return _general_row(prow, qrow, use_q, p_kind, q_kind, 1.0, p_c, p_it, p_ln, 1.0, q_c, q_it, q_ln,
                                    0.0, beta, am1, want_gjs, want_renyi)
        if want_js and want_renyi:
            js, _, _, _, _ = _js_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln)
        if want_tvh and (want_renyi or want_js):
            tv, hel, bc, _, _, _, _ = _tv_hellinger_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln)
        if want_tvh:
            bha = _bhattacharyya(hel, bc, ps, qs)
        if want_gjs and 0.0 < beta < 1.0 and (want_renyi or want_js or want_tvh):
            gjs, _, _, _, _ = _gjs_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln, beta)
    if want_ent:
        ent, p_sum = _entropy_terms_logs(prow, p_c, p_it, p_ln)
    if want_ce:
        ce = _cross_entropy_terms_logs(prow, qrow, p_c, p_it, p_ln, q_c, q_it, q_ln)
    if (p_defer and abs(p_sum - 1.0) > sum_tol) or (q_defer and abs(q_sum - 1.0) > sum_tol):
        code = NOT_NORMALIZED
    return code, kl, rkl, js, ent, ce, tv, hel, kl_inf, rkl_inf, gjs, ren, bha


@_jit
def _mixed_row(prow, qrow, p_values, ps, p_mask, p_mask_offset, q_values, qs, q_mask, q_mask_offset,
               use_q, p_kind, q_kind, p_it, q_it, normalize, smoothing, sum_tol, beta, am1, want_gjs, want_renyi):
    """Status and sums of any other row (probs against log space, or smoothing of
    log-space input): element by element in the general loop."""
    k = prow.size
    p_scale = q_scale = 1.0
    p_c = q_c = p_ln = q_ln = 0.0
    if p_kind == PROBS:
        code, p_scale = _scan_probs_side(p_values, ps, k, p_mask, p_mask_offset, normalize, sum_tol)
    else:
        code, p_c, p_ln = _scan_log_side(p_values, ps, k, p_mask, p_mask_offset, p_kind, p_it, normalize,
                                         sum_tol, False)
    if use_q:
        if q_kind == PROBS:
            q_code, q_scale = _scan_probs_side(q_values, qs, k, q_mask, q_mask_offset, normalize, sum_tol)
        else:
            q_code, q_c, q_ln = _scan_log_side(q_values, qs, k, q_mask, q_mask_offset, q_kind, q_it, normalize,
                                               sum_tol, False)
        if q_code and (code == OK or q_code < code):
            code = q_code
    if code != OK:
        return code, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    return _general_row(prow, qrow, use_q, p_kind, q_kind, p_scale, p_c, p_it, p_ln, q_scale, q_c, q_it, q_ln,
                        smoothing, beta, am1, want_gjs, want_renyi)


@_jit
def _general_row(prow, qrow, use_q, p_kind, q_kind, p_scale, p_c, p_it, p_ln, q_scale, q_c, q_it, q_ln,
                 smoothing, beta, am1, want_gjs, want_renyi):
    kl, rkl, js, ent, ce, tv, hel, kl_inf, rkl_inf, gjs, ren, bha = _general_terms(
        prow, qrow, use_q, p_kind, q_kind, p_scale, p_c, p_it, p_ln, q_scale, q_c, q_it, q_ln, smoothing,
        beta, am1, want_gjs, want_renyi)
    return OK, kl, rkl, js, ent, ce, tv, hel, kl_inf, rkl_inf, gjs, ren, bha


FAMILIES = ("probs", "logs", "mixed")


def family(p_kind: int, q_kind: int, use_q: bool, smoothing: float) -> str:
    """Which kernel serves these kinds: both probs, both log space, or mixed."""
    if p_kind == PROBS and (q_kind == PROBS or not use_q):
        return "probs"
    if smoothing == 0.0 and p_kind != PROBS and (q_kind != PROBS or not use_q):
        return "logs"
    return "mixed"


def _make_kernel(name):
    """The row kernel for one family of kinds.

    `probs` and `logs` are closure constants, so Numba prunes the other
    families' branches before typing them: a kernel compiles only the loops
    its inputs can reach (a first call compiles seconds less), and each
    family is cached on disk separately.
    """
    probs = name == "probs"
    logs = name == "logs"

    def divergence_rows(
        p_offsets, p_values, p_mask, p_mask_offset, p_decode,
        q_offsets, q_values, q_mask, q_mask_offset, q_decode,
        pre_status, use_q,
        p_kind, q_kind, p_inv_t, q_inv_t,
        normalize, smoothing, sum_tol, inv_log_base, beta, am1,
        slots, out, status, start, stop,
    ):
        """Compute the requested measures for rows start..stop.

        `slots[m]` is the row of `out` that receives measure m (MEASURES order),
        or -1 when m is not requested. Rows that are null or invalid get NaN.
        `p_decode` / `q_decode` (fastkl.kernels.half codes): 0 for float32/float64
        values, FLOAT16 or BFLOAT16 for uint16 values holding those bits.
        `beta` is gjs's weight, `am1` renyi's alpha - 1 (unused unless asked).
        """
        # views that Numba does not reference-count (kernels.views): of the arguments, and of
        # the terms buffer, which `terms_owner` keeps alive to the end
        p_offsets, p_values, p_mask = borrowed(p_offsets), borrowed(p_values), borrowed(p_mask)
        q_offsets, q_values, q_mask = borrowed(q_offsets), borrowed(q_values), borrowed(q_mask)
        want_kl = slots[KL] >= 0 or slots[JEFFREYS] >= 0
        want_rkl = slots[REVERSE_KL] >= 0 or slots[JEFFREYS] >= 0
        want_js = slots[JS] >= 0
        want_ent = slots[ENTROPY] >= 0
        want_ce = slots[CROSS_ENTROPY] >= 0
        want_tvh = slots[TV] >= 0 or slots[HELLINGER] >= 0 or slots[BHATTACHARYYA] >= 0
        want_gjs = slots[GJS] >= 0
        want_renyi = slots[RENYI] >= 0
        want_bha = slots[BHATTACHARYYA] >= 0
        # Common calls go straight to their loops (LLVM inlines them here):
        # float32 probs or logprobs used as they are, rows without null
        # elements (the loops validate as they go), and kl alone on logits.
        # Other calls, and rows those loops flag, take the family's row function.
        no_nulls = p_mask.size == 0 and (q_mask.size == 0 or not use_q)
        kl_only = use_q and want_kl and not (want_rkl or want_js or want_ent or want_ce or want_tvh or want_gjs
                                             or want_renyi)
        as_is32 = _is_float32(p_values) and not normalize and smoothing == 0.0
        probs32 = probs and as_is32
        logprobs32 = logs and as_is32 and p_kind == LOGPROBS and (q_kind == LOGPROBS or not use_q)
        logits_kl = logs and kl_only and p_kind == LOGITS and q_kind == LOGITS and no_nulls
        kl = rkl = js = ent = ce = tv = hel = kl_inf = rkl_inf = gjs = ren = bha = 0.0
        terms_owner = np.empty((5, SUM_BLOCK), dtype=np.float32)  # the float32 loops' terms, summed in float64
        terms = borrowed(terms_owner)
        p_scratch = _scratch(p_values, p_offsets, start, stop)  # empty unless a 16-bit side
        q_scratch = _scratch(q_values, q_offsets, start, stop) if use_q else p_scratch
        for i in range(start, stop):
            code = np.int64(pre_status[i])  # a code other than OK: settled before the kernel
            ps = p_offsets[i]
            k = p_offsets[i + 1] - ps
            qs = q_offsets[i]
            if code == OK and use_q and q_offsets[i + 1] - qs != k:
                code = LENGTH_MISMATCH
            if code == OK and k == 0:
                code = EMPTY
            if code == OK:
                # float32 used as it is, and no null element in this row
                fast = (probs32 or logprobs32) and (no_nulls or not (
                    _has_null(p_mask, p_mask_offset, ps, k) or (use_q and _has_null(q_mask, q_mask_offset, qs, k))))
                done = False
                kl_inf = rkl_inf = 0.0
                if fast and kl_only:
                    # the common call, straight to its loop over the values as stored
                    # (a 16-bit side decoded in the loop, without a decoded copy)
                    p_raw = p_values[ps:ps + k]
                    q_raw = q_values[qs:qs + k]
                    if probs:
                        kl, p_sum, q_sum, flag = _kl_probs(p_raw, q_raw, terms, p_decode, q_decode)
                    else:
                        kl, p_sum, q_sum, flag = _kl_logs32_blocked(p_raw, q_raw, terms, p_decode, q_decode)
                    done = flag == 0.0 and _sums_within32(p_sum, q_sum, min(k, SUM_BLOCK), sum_tol)
                if not done:
                    prow = _row(p_values, ps, k, p_decode, p_scratch)
                    qrow = _row(q_values, qs, k, q_decode, q_scratch) if use_q else prow
                    # what the scans read: the row's values, or its decoded copy
                    pv, pvs, pmo = _side_at(p_values, ps, p_mask_offset, p_scratch)
                    qv, qvs, qmo = _side_at(q_values, qs, q_mask_offset, q_scratch)
                    if probs:
                        if fast and not kl_only:
                            done, kl, rkl, ent, ce, js, gjs, ren, tv, hel, bha = _probs32_terms(
                                prow, qrow, use_q, want_kl, want_rkl, want_ent, want_ce, want_js, want_gjs,
                                want_renyi, want_tvh, want_bha, beta, am1, sum_tol, terms)
                        if not done:
                            code, kl, rkl, js, ent, ce, tv, hel, kl_inf, rkl_inf, gjs, ren, bha = _probs_row(
                                prow, qrow, pv, pvs, p_mask, pmo, qv, qvs, q_mask, qmo,
                                use_q, normalize, smoothing, sum_tol, want_kl, want_rkl, want_js, want_ent, want_ce,
                                want_tvh, want_gjs, want_renyi, beta, am1)
                    elif logs:
                        if fast and not kl_only:
                            done, kl, rkl, ent, ce, js, tv, hel, gjs, bha, ren = _logprobs32_terms(
                                prow, qrow, use_q, want_kl, want_rkl, want_ent, want_ce, want_js, want_tvh, want_gjs,
                                beta, want_bha, want_renyi, am1, sum_tol, terms)
                        elif logits_kl:  # the common logits call, straight to its loops
                            p_top, p_bad = _scan_logits(prow)
                            q_top, q_bad = _scan_logits(qrow)
                            if p_bad == 0.0 and q_bad == 0.0 and p_top > -INF and q_top > -INF:
                                kl, kl_inf = _logits_kl(prow, qrow, p_top, p_inv_t, q_top, q_inv_t)
                                done = True
                        if not done:
                            code, kl, rkl, js, ent, ce, tv, hel, kl_inf, rkl_inf, gjs, ren, bha = _logs_row(
                                prow, qrow, pv, pvs, p_mask, pmo, qv, qvs, q_mask, qmo,
                                use_q, p_kind, q_kind, p_inv_t, q_inv_t, normalize, sum_tol,
                                want_kl, want_rkl, want_js, want_ent, want_ce, want_tvh, want_gjs, want_renyi,
                                beta, am1)
                    else:
                        code, kl, rkl, js, ent, ce, tv, hel, kl_inf, rkl_inf, gjs, ren, bha = _mixed_row(
                            prow, qrow, pv, pvs, p_mask, pmo, qv, qvs, q_mask, qmo,
                            use_q, p_kind, q_kind, p_inv_t, q_inv_t, normalize, smoothing, sum_tol,
                            beta, am1, want_gjs, want_renyi)
            status[i] = code
            if code != OK:
                for m in range(N_MEASURES):
                    if slots[m] >= 0:
                        out[slots[m], i] = NAN_
                continue
            _write_row(out, slots, i, k, inv_log_base, kl, rkl, js, ent, ce, tv, hel, kl_inf, rkl_inf, gjs, ren,
                       bha, beta, am1)
        terms_owner[0, 0] = 0.0  # the buffer's last use: alive until here

    divergence_rows.__qualname__ = divergence_rows.__name__ = f"divergence_rows_{name}"
    return _jit(divergence_rows)


KERNELS = {name: _make_kernel(name) for name in FAMILIES}


@_inline
def _write_row(out, slots, i, k, inv_log_base, kl, rkl, js, ent, ce, tv, hel, kl_inf, rkl_inf, gjs, ren, bha, beta,
               am1):
    """Clamp each requested measure into its range (rounding never
    leaves it) and store it. kl_inf > 0: some p_i > 0 = q_i (reverse: q_i > 0 = p_i);
    ren = log(S / sum p), S renyi's sum."""
    if slots[KL] >= 0:
        out[slots[KL], i] = INF if kl_inf else max(kl, 0.0) * inv_log_base
    if slots[REVERSE_KL] >= 0:
        out[slots[REVERSE_KL], i] = INF if rkl_inf else max(rkl, 0.0) * inv_log_base
    if slots[JEFFREYS] >= 0:
        # the exact sum is >= 0 even where kl or reverse_kl alone is not
        # (rows normalised only within sum_tol): clamp the total only
        out[slots[JEFFREYS], i] = INF if (kl_inf or rkl_inf) else max(kl + rkl, 0.0) * inv_log_base
    if slots[JS] >= 0:
        out[slots[JS], i] = min(max(0.5 * js, 0.0), LN2) * inv_log_base
    if slots[ENTROPY] >= 0:
        out[slots[ENTROPY], i] = min(max(ent, 0.0), math.log(k)) * inv_log_base
    if slots[CROSS_ENTROPY] >= 0:
        out[slots[CROSS_ENTROPY], i] = INF if kl_inf else max(ce, 0.0) * inv_log_base
    if slots[TV] >= 0:
        out[slots[TV], i] = min(0.5 * tv, 1.0)
    if slots[HELLINGER] >= 0:
        out[slots[HELLINGER], i] = math.sqrt(min(0.5 * hel, 1.0))
    if slots[GJS] >= 0:  # at most the binary entropy of beta (disjoint P and Q); 0 at beta = 0 and 1
        top = 0.0 if not 0.0 < beta < 1.0 else -beta * math.log(beta) - (1.0 - beta) * math.log1p(-beta)
        out[slots[GJS], i] = min(max(gjs, 0.0), top) * inv_log_base
    if slots[RENYI] >= 0:
        out[slots[RENYI], i] = max(ren / am1, 0.0) * inv_log_base
    if slots[BHATTACHARYYA] >= 0:
        out[slots[BHATTACHARYYA], i] = max(bha, 0.0) * inv_log_base
