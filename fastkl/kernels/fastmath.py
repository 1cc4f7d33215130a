"""log and exp that LLVM can vectorise, at float64 accuracy (a few ulps).

Numba lowers `math.log` / `math.exp` to scalar libm calls (the llvmlite
wheels carry no SVML), which caps a KL loop at a fraction of memory
bandwidth. These are the classic fdlibm/Cody-Waite algorithms written as
straight-line float and integer arithmetic (no calls, no branches, only
selects), so a loop that uses them compiles to SIMD code.

The kernels inline these helpers, and Numba's cache only watches the file of
a cached function: each kernel module carries a digest of the kernel modules
it imports (INLINES_DIGEST, checked by tests/test_layout.py), so that editing
here invalidates them.

Callers must compile with `error_model="numpy"`: Numba's default Python
error model puts a zero-division check on every float division, and that
branch alone stops vectorisation.

Domains: `log_pos(x)` for x >= 0 (0 gives -inf, +inf gives +inf);
`exp_neg(x)` for x <= ~709 (-inf gives 0). NaN handling is the caller's job:
fastkl validates rows before computing terms.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

_fast = njit(error_model="numpy", fastmath={"nsz", "contract"})


def _bitcast(src, dst, llvm_dst, doc):
    """A Numba intrinsic that reinterprets the bits of a `src` value as `dst`."""

    @intrinsic
    def cast(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm_dst)

        return dst(src), codegen

    cast.__doc__ = doc
    return cast


float_bits = _bitcast(types.float64, types.int64, ir.IntType(64), "float64 -> int64 bits")
bits_float = _bitcast(types.int64, types.float64, ir.DoubleType(), "int64 bits -> float64")
float32_bits = _bitcast(types.float32, types.int32, ir.IntType(32), "float32 -> int32 bits")
bits_float32 = _bitcast(types.int32, types.float32, ir.FloatType(), "int32 bits -> float32")


# fdlibm e_log.c coefficients: log(1+f) = f - hfsq + s*(hfsq+R(s^2)), s = f/(2+f).
_LG1 = 6.666666666666735130e-01
_LG2 = 3.999999999940941908e-01
_LG3 = 2.857142874366239149e-01
_LG4 = 2.222219843214978396e-01
_LG5 = 1.818357216161805012e-01
_LG6 = 1.531383769920937332e-01
_LG7 = 1.479819860511658591e-01
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_TWO54 = 18014398509481984.0
_MIN_NORMAL = 2.2250738585072014e-308
_SQRT_HALF_HI = 0x3FE6A09E  # high word of sqrt(2)/2


@_fast
def log1p_core(k, f):
    """k*ln2 + log(1+f) for 1+f in [sqrt(2)/2, sqrt(2)); relative error < 1 ulp."""
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_LG2 + w * (_LG4 + w * _LG6))
    t2 = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7)))
    r = t2 + t1
    hfsq = 0.5 * f * f
    return k * _LN2_HI - ((hfsq - (s * (hfsq + r) + k * _LN2_LO)) - f)


@_fast
def _reduce(x):
    """(k, f) with x = 2**k * (1+f), 1+f in [sqrt(2)/2, sqrt(2)); x > 0 finite."""
    sub = x < _MIN_NORMAL
    x = x * _TWO54 if sub else x
    ix = float_bits(x) + ((0x3FF00000 - _SQRT_HALF_HI) << 32)
    k = (ix >> 52) - 0x3FF - (54 if sub else 0)
    ix = (ix & 0x000FFFFFFFFFFFFF) + (_SQRT_HALF_HI << 32)
    return np.float64(k), bits_float(ix) - 1.0


@_fast
def log_pos(x):
    """log(x) for x >= 0: -inf at 0, +inf at +inf."""
    k, f = _reduce(x)
    r = log1p_core(k, f)
    r = -np.inf if x == 0.0 else r
    return np.inf if x == np.inf else r


@_fast
def log_ratio(num, inv_den, diff):
    """log(num/den) for num, den > 0 with num/den in the normal range.

    Takes 1/den (divisions are the slow part of a vector loop, so callers
    share one reciprocal) and `diff` = num - den computed without
    cancellation error: near a ratio of 1 the mantissa is taken from
    diff/den, so the result stays accurate to a few ulps even when num and
    den agree to many digits (where log(num) - log(den) would lose them all).
    """
    k, f = _reduce(num * inv_den)
    f = diff * inv_den if k == 0.0 else f
    return log1p_core(k, f)


@_fast
def _exp_reduce(x):
    """(k, r) with x = k ln2 + r, |r| <= ln2/2 (Cody-Waite, two-part ln2)."""
    x = max(x, -1080.0)
    kf = np.floor(x * _INV_LN2 + 0.5)
    return kf, (x - kf * _LN2_HI) - kf * _LN2_LO


@_fast
def _exp_scale(p, kf):
    """p * 2**k, in two steps so that subnormal results are formed correctly."""
    k = np.int64(kf)
    k1 = k >> 1
    k2 = k - k1
    return p * bits_float((k1 + 0x3FF) << 52) * bits_float((k2 + 0x3FF) << 52)


# exp(r) for |r| <= ln2/2: the near-minimax polynomial of degree 11 from
# mpmath.chebyfit(mpmath.exp, [-ln2/2, ln2/2], 12) at 50 digits, 4.5e-18
# relative before its coefficients are rounded (Taylor needs degree 14 for
# that); ~1 ulp in float64 Horner, like the series it replaces.
_EXP11 = 2.5110037605963777e-08
_EXP10 = 2.763263963904103e-07
_EXP9 = 2.755724091857897e-06
_EXP8 = 2.4801485482328494e-05
_EXP7 = 0.00019841269890047113
_EXP6 = 0.0013888888952314775
_EXP5 = 0.008333333333319601
_EXP4 = 0.0416666666664881
_EXP3 = 0.1666666666666668
_EXP2 = 0.5000000000000019


@_fast
def _exp_poly(r):
    p = _EXP11
    p = p * r + _EXP10
    p = p * r + _EXP9
    p = p * r + _EXP8
    p = p * r + _EXP7
    p = p * r + _EXP6
    p = p * r + _EXP5
    p = p * r + _EXP4
    p = p * r + _EXP3
    p = p * r + _EXP2
    p = p * r + 1.0
    return p * r + 1.0


@_fast
def exp_neg(x):
    """exp(x) for x <= 709.78 (callers pass log-probabilities); -inf gives 0."""
    kf, r = _exp_reduce(x)
    p = _exp_poly(r)
    return _exp_scale(p, kf)


_SHIFTER = 6755399441055744.0  # 1.5 * 2**52: x + _SHIFTER rounds x to an integer, kept in the low bits
_LN2 = 0.6931471805599453


@_fast
def exp_nonpositive(x):
    """`exp_neg` for x <= 0 (logits centred on their row maximum, the
    log-sum-exp of a decode) with a cheaper reduction: k comes from the bits
    of x / ln2 + 1.5 * 2**52 (no floor, no float-to-int conversion, one
    scaling) and ln2 is one double, 2.3e-17 |k| relative, which the error bound's
    decode slack covers (it grows with |x| the same way); results flush to 0
    from about 2**-1023 down. Same polynomial as exp_neg: a shorter one
    (7e-12) broke the bound for a logprobs row normalised against a close
    probs row (hypothesis)."""
    x = max(x, -1080.0)
    t = x * _INV_LN2 + _SHIFTER
    kf = t - _SHIFTER
    r = x - kf * _LN2
    p = _exp_poly(r)
    k = float_bits(t) - float_bits(_SHIFTER)
    k = -1023 if k < -1023 else k  # the bits of +0.0
    return p * bits_float((k + 0x3FF) << 52)



# e^x - 1 for |x| < 0.3: Taylor to degree 13 (truncation 0.3^13 / 14! < 2e-17 relative)
_EXPM1_SERIES = tuple(1.0 / math.factorial(n) for n in range(13, 1, -1))
_EXPM1_SMALL = 0.3


@_fast
def expm1_f64(x):
    """e**x - 1 in float64 for x <= 709 without the cancellation near 0 (a few ulps):
    the series for |x| < 0.3, exp_neg(x) - 1 elsewhere, both computed and one selected
    (so a loop using it stays SIMD)."""
    p = _EXPM1_SERIES[0]
    for c in _EXPM1_SERIES[1:]:
        p = p * x + c
    small = (p * x + 1.0) * x
    big = exp_neg(x) - 1.0
    return small if abs(x) < _EXPM1_SMALL else big

# ---------------------------------------------------------------- float32
# For float32 input the error bound is 1e-6 relative, so the log
# can be taken in float32: 8 or 16 SIMD lanes instead of 4 or 8. No
# division: x = 2**n * (1 + r) with 1 + r in [2/3, 4/3) (the reduction
# offset 0x3f2aaaab = 2/3 puts r in [-1/3, 1/3)), then
# log(1 + r) = r + r**2 * P(r), P of degree 7 fitted for relative error
# (scripts/fit_log32.py: weighted minimax by Lawson's iteration, 2.6e-8 before
# rounding the coefficients to float32; 1.3e-7 evaluated in float32 over
# every binade). Divisions are the slowest vector instructions, and
# fdlibm's s = f / (2 + f) was one per element.

_F1 = np.float32(1.0)
_P0 = np.float32(-float.fromhex("0x1.ffffd6p-2"))
_P1 = np.float32(float.fromhex("0x1.5554fap-2"))
_P2 = np.float32(-float.fromhex("0x1.001480p-2"))
_P3 = np.float32(float.fromhex("0x1.99d428p-3"))
_P4 = np.float32(-float.fromhex("0x1.5032eap-3"))
_P5 = np.float32(float.fromhex("0x1.1ea256p-3"))
_P6 = np.float32(-float.fromhex("0x1.3b2844p-3"))
_P7 = np.float32(float.fromhex("0x1.1f4284p-3"))
_LN2_F = np.float32(0.6931471805599453)
_OFFSET_F = np.int32(0x3F2AAAAB)  # bits of float32(2/3)
_MANT_F = np.int32(0x007FFFFF)
_I23 = np.int32(23)
_I31 = np.int32(31)
_I0 = np.int32(0)
_MIN_NORMAL_BITS_F = np.uint32(0x00800000)
NORMAL_SPAN_F = np.uint32(0x7F000000)  # bits(+inf) - bits(min normal)

# Numba types int32 arithmetic as int64; every integer step below is cast
# back to int32 so LLVM keeps 8/16 lanes per vector instead of 4/8.


@_fast
def log_ratio32(num, inv_den, diff):
    """float32 log(num/den) for num, den > 0 with num/den a normal float32.

    Same scheme as `log_ratio`: near a ratio of 1 (n = 0) r comes from
    diff/den (diff = num - den, exact for float32 inputs within a factor 2),
    so the result keeps ~1e-7 relative accuracy however close num and den are.
    For any other finite or infinite input the result is finite (garbage that
    callers must flag with `not_normal32`), so 0 * result is 0.
    """
    u = np.int32(float32_bits(num * inv_den) - _OFFSET_F)
    n = np.int32(u >> _I23)
    r = bits_float32(np.int32(np.int32(u & _MANT_F) + _OFFSET_F)) - _F1
    r = diff * inv_den if n == _I0 else r
    nf = np.float32(n)
    r2 = r * r
    r4 = r2 * r2
    poly = ((_P0 + _P1 * r) + (_P2 + _P3 * r) * r2) + ((_P4 + _P5 * r) + (_P6 + _P7 * r) * r2) * r4
    return (nf * _LN2_F + r) + r2 * poly  # ln2's float32 rounding: < 7e-9 relative once n != 0


@_fast
def normal_offset32(x):
    """How far x's bits lie above the smallest normal float32's, as uint32:
    below `NORMAL_SPAN_F` exactly when x is a positive normal float32, so a
    loop can keep the largest and test once."""
    return np.uint32(np.uint32(float32_bits(x)) - _MIN_NORMAL_BITS_F)


@_fast
def not_normal32(x):
    """True for x <= 0 (incl. -0), subnormal, inf or NaN: one integer compare."""
    return normal_offset32(x) >= NORMAL_SPAN_F


_INV_LN2_F = np.float32(1.4426950408889634)
_LN2_HI_F = np.float32(0.693145751953125)  # 16 significant bits: k * _LN2_HI_F is exact for |k| < 256
_LN2_LO_F = np.float32(0.6931471805599453 - 0.693145751953125)
_EXP_LO_F = np.float32(-88.0)
_EXP_HI_F = np.float32(88.0)
_HALF_F = np.float32(0.5)
_I127 = np.int32(127)
_E2 = np.float32(1 / 2)
_E3 = np.float32(1 / 6)
_E4 = np.float32(1 / 24)
_E5 = np.float32(1 / 120)
_E6 = np.float32(1 / 720)
_E7 = np.float32(1 / 5040)


@_fast
def exp32(x):
    """float32 exp(x), ~1e-7 relative for x in [-87.3, 88]; 0 for x <= -88 and
    -inf; e**88 for x >= 88 and +inf; NaN for NaN. Between -88 and -87.3 the
    result is subnormal and inexact: callers flag such inputs.

    Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, then the Taylor series of
    degree 7 (5e-9 relative) and a scale by 2**k built from its bits.
    """
    x = _EXP_LO_F if x < _EXP_LO_F else x  # comparisons written so that NaN stays NaN
    x = _EXP_HI_F if x > _EXP_HI_F else x
    kf = np.floor(x * _INV_LN2_F + _HALF_F)
    r = (x - kf * _LN2_HI_F) - kf * _LN2_LO_F
    p = _E7
    p = p * r + _E6
    p = p * r + _E5
    p = p * r + _E4
    p = p * r + _E3
    p = p * r + _E2
    p = p * r + _F1
    p = p * r + _F1
    # k = -127 (x <= -88) gives the bits of +0.0: exp underflows to exactly 0
    return p * bits_float32(np.int32(np.int32(np.int32(kf) + _I127) << _I23))


_M8 = np.float32(1 / 40320)
_HALF_RANGE_F = np.float32(0.5)


@_fast
def expm1_series32(x):
    """float32 e**x - 1 for |x| < 1/2 by its Taylor series of degree 8 (truncation
    < 1.1e-8 relative): no cancellation near 0, where exp32(x) - 1 has it."""
    p = _M8
    p = p * x + _E7
    p = p * x + _E6
    p = p * x + _E5
    p = p * x + _E4
    p = p * x + _E3
    p = p * x + _E2
    p = p * x + _F1
    return p * x


@_fast
def expm1_with32(x, e):
    """float32 e**x - 1 given e = exp32(x) (a loop that needs both computes the exp once):
    the series for |x| < 1/2, e - 1 elsewhere (< 2.6e-7 relative there); both are computed
    and one selected, so a loop using it stays SIMD."""
    return expm1_series32(x) if abs(x) < _HALF_RANGE_F else e - _F1


@_fast
def expm1_32(x):
    """float32 e**x - 1 (`expm1_with32`)."""
    return expm1_with32(x, exp32(x))

# ---------------------------------------------------------------- ordering keys
# Floating-point max does not vectorise without `nnan` (the NaN rule of a
# compare-and-select is not associative), integer max does: map each float to
# an integer with the same order (negative floats: flip the magnitude bits).
# NaN maps above +inf or below -inf; callers detect NaN separately.


def order_key(x):  # pragma: no cover - replaced by the overload inside Numba code
    raise NotImplementedError


def from_order_key(key):  # pragma: no cover - replaced by the overload inside Numba code
    raise NotImplementedError


@overload(order_key)
def _order_key(x):
    if x == types.float32:
        mask32 = np.int32(0x7FFFFFFF)
        return lambda x: np.int32(float32_bits(x) ^ (np.int32(float32_bits(x) >> _I31) & mask32))
    if x == types.float64:
        mask64 = np.int64(0x7FFFFFFFFFFFFFFF)
        return lambda x: float_bits(x) ^ ((float_bits(x) >> 63) & mask64)


@overload(from_order_key)
def _from_order_key(key):
    if key == types.int32:
        mask32 = np.int32(0x7FFFFFFF)
        return lambda key: bits_float32(np.int32(key ^ (np.int32(key >> _I31) & mask32)))
    if key == types.int64:
        mask64 = np.int64(0x7FFFFFFFFFFFFFFF)
        return lambda key: bits_float(key ^ ((key >> 63) & mask64))


def _py_key(bits: int, width: int) -> int:
    """order_key of a float given its bits as an unsigned integer (plain Python, for constants)."""
    signed = bits - (1 << width) if bits >> (width - 1) else bits
    return signed ^ ((1 << (width - 1)) - 1) if signed < 0 else signed


def inf_keys(row):  # pragma: no cover - replaced by the overload inside Numba code
    raise NotImplementedError


@overload(inf_keys)
def _inf_keys(row):
    """(order_key(-inf), order_key(+inf)) for the row's dtype: keys outside are NaN."""
    if isinstance(row, types.Array) and row.dtype == types.float32:
        lo, hi = np.int32(_py_key(0xFF800000, 32)), np.int32(_py_key(0x7F800000, 32))
        return lambda row: (lo, hi)
    if isinstance(row, types.Array) and row.dtype == types.float64:
        lo, hi = np.int64(_py_key(0xFFF0000000000000, 64)), np.int64(_py_key(0x7FF0000000000000, 64))
        return lambda row: (lo, hi)
