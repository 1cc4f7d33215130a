"""Borrowed array views: arrays the kernels use without reference counting.

Numba counts references to every array view it makes (a slice per row, per
chunk) with an atomic increment and decrement of the array's meminfo, tens of
cycles each and a barrier to the CPU's overlapping of one chunk's loads with
the previous chunk's arithmetic. A view whose meminfo is NULL is never
counted, and neither are the views made from it.

Only for arrays that outlive every use of the view: a kernel's arguments (the
caller holds them) and buffers the kernel allocated and uses again after its
last use of the view (Numba frees an array after its last use).
"""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array


@intrinsic
def borrowed(typingctx, array):
    """`array` as a view that Numba does not reference-count (same type, data, shape and strides)."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, sig, args):
        source = context.make_array(sig.args[0])(context, builder, value=args[0])
        view = context.make_array(sig.return_type)(context, builder)
        populate_array(view, data=source.data, shape=source.shape, strides=source.strides,
                       itemsize=source.itemsize, meminfo=None)
        return view._getvalue()

    return array(array), codegen
