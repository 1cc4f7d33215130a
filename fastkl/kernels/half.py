"""Half-precision decoders: float16 and bfloat16 bit patterns (uint16) to float32.

The dense kernel reads 16-bit sides as they are stored (an Arrow float16
buffer, a `list<uint16>` declared bfloat16, a NumPy or torch half array
viewed as uint16) and decodes one row at a time into a float32 scratch row
that stays in L1, so a table is never copied to float32 as a whole. Both
decoders are exact for every one of the 65,536 bit patterns (subnormals,
±inf, NaN with its payload, -0) and written with integer selects only, so
LLVM vectorises the row loop. float16 subnormals go through an exact
int -> float32 conversion (m * 2**-24 is a normal float32): no float32
subnormal is ever formed, so a flush-denormals CPU mode cannot change them.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Decode codes of a side (the kernel's p_decode / q_decode; fastkl._registry.DECODES order).
AS_IS, FLOAT16, BFLOAT16 = 0, 1, 2

_jit = njit(nogil=True, cache=True, error_model="numpy")  # integer code: no fastmath needed


@intrinsic
def _f32_bits(typingctx, x):
    """The bits of a float32 as uint32 (a bitcast: Numba has no scalar view)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, x):
    """The float32 whose bits are the low 32 bits of the integer x (Numba widens
    integer arithmetic to 64 bits, so x is truncated, or zero-extended)."""
    if not isinstance(x, types.Integer):
        return None
    width = x.bitwidth

    def codegen(context, builder, sig, args):
        v = args[0]
        if width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


_SUB_SCALE = np.float32(2.0**-24)  # a float16 subnormal is m * 2**-24


@_jit
def float16_to_float32(h):
    """The float32 value of the float16 bit pattern h (an integer < 2**16)."""
    h = np.uint32(h)
    em = h & np.uint32(0x7FFF)  # exponent and mantissa
    # normal: rebias the exponent by 127 - 15; inf/NaN: exponent field 31 -> 255
    shift = np.uint32(224 << 23) if em >= np.uint32(0x7C00) else np.uint32(112 << 23)
    bits = (em << np.uint32(13)) + shift
    sub = _f32_bits(np.float32(em) * _SUB_SCALE)  # exact: em < 1024 here
    bits = sub if em < np.uint32(0x400) else bits
    return _bits_f32(bits | ((h & np.uint32(0x8000)) << np.uint32(16)))


@_jit
def bfloat16_to_float32(h):
    """The float32 value of the bfloat16 bit pattern h: the top half of a float32."""
    return _bits_f32(np.uint32(h) << np.uint32(16))


@_jit
def decode_row(values_u16, start, k, code, scratch_f32):
    """Decode values_u16[start:start + k] (FLOAT16 or BFLOAT16 bits) into
    scratch_f32[:k] and return that view."""
    row = values_u16[start:start + k]  # a view, not values[start + j]: no wraparound check per element
    out = scratch_f32[:k]
    if code == BFLOAT16:
        for j in range(k):
            out[j] = bfloat16_to_float32(row[j])
    else:
        for j in range(k):
            out[j] = float16_to_float32(row[j])
    return out
