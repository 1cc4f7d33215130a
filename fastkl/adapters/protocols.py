"""Inputs by protocol, not by library: the Arrow PyCapsule interface and DLPack.

Whatever library made a column, fastkl asks it for its memory through a
protocol and reads that memory in place:

- `__arrow_c_stream__` / `__arrow_c_array__` (the Arrow PyCapsule interface:
  Polars, DuckDB, pandas, nanoarrow, pyarrow itself) and pyarrow's older
  `__arrow_array__` (pandas' ArrowExtensionArray) are imported by pyarrow,
  which wraps the producer's buffers without copying. A stream of a table
  with one column (a DuckDB relation, a one-column DataFrame) is that column;
  a table of several columns is refused by the adapter, which asks for one.
- `__dlpack__` (torch, JAX, CuPy, NumPy-like arrays) is imported by NumPy,
  zero-copy, after checking `__dlpack_device__`: memory the CPU cannot read
  (a GPU tensor) is refused in one line naming the device. NumPy has no
  bfloat16, so a bfloat16 tensor is relabelled uint16 in the DLPack capsule
  before NumPy imports it; its element type travels beside it as the
  declared dtype "bfloat16" (see `imported`).

A Hugging Face `datasets` Column exports no protocol (datasets 5.2): it is
read through its dataset in Arrow format, the one library case left here.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import OptionError

# DLPack device types (dlpack.h) whose memory the CPU reads: CPU, CUDA host
# (pinned), ROCm host, CUDA managed; NumPy imports these.
_HOST_DEVICES = {1, 3, 11, 13}
_DEVICE_NAMES = {2: "cuda", 4: "opencl", 7: "vulkan", 8: "metal", 9: "vpi", 10: "rocm", 12: "ext_dev",
                 14: "oneapi", 15: "webgpu", 16: "hexagon", 17: "maia"}
_DL_UINT, _DL_BFLOAT = 1, 4  # DLDataTypeCode


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64), ("dl_tensor", _DLTensor)]


_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype, _capsule_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


def _dl_tensor(capsule: Any) -> _DLTensor:
    """The DLTensor inside an unconsumed DLPack capsule (versioned or not)."""
    name = _capsule_name(capsule)
    managed = _DLManagedTensorVersioned if name == b"dltensor_versioned" else _DLManagedTensor
    return managed.from_address(_capsule_pointer(capsule, name)).dl_tensor


class _Capsule:
    """A capsule already exported, handed to `np.from_dlpack` (which asks an object for it)."""

    def __init__(self, capsule: Any, device: tuple[int, int]):
        self.capsule, self.device = capsule, device

    def __dlpack__(self, **_: Any) -> Any:
        return self.capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.device


def is_dlpack(x: Any) -> bool:
    return hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__") and not isinstance(x, np.ndarray)


def _device(x: Any, name: str) -> tuple[int, int]:
    """`x.__dlpack_device__()`, checked: memory the CPU cannot read is refused in one line."""
    lib = type(x).__module__.split(".")[0]
    try:
        device = tuple(int(v) for v in x.__dlpack_device__())
    except Exception:  # e.g. torch's meta device, which DLPack cannot name
        device = None
    if device is not None and device[0] in _HOST_DEVICES:
        return device  # type: ignore[return-value]
    where = (f"{_DEVICE_NAMES.get(device[0], f'device type {device[0]}')}:{device[1]}" if device is not None
             else str(getattr(x, "device", "a device DLPack cannot name")))
    raise OptionError(f"{name}: a {lib} tensor on {where}; fastkl reads CPU memory, there is no GPU path yet: "
                      "copy it to the CPU first (torch: x.cpu(), CuPy: x.get(), JAX: jax.device_get(x))")


def from_dlpack(x: Any, name: str) -> tuple[np.ndarray, bool]:
    """(a NumPy view of x's memory, True if it holds bfloat16 bits as uint16), no copy."""
    device = _device(x, name)
    if getattr(x, "requires_grad", False) and callable(getattr(x, "detach", None)):
        x = x.detach()  # torch exports no tensor that requires grad; the values are the same
    try:
        try:
            capsule = x.__dlpack__(max_version=(1, 0))
        except TypeError:  # a producer from before DLPack 1.0
            capsule = x.__dlpack__()
        dtype = _dl_tensor(capsule).dtype
        bfloat16 = dtype.code == _DL_BFLOAT and dtype.bits == 16 and dtype.lanes == 1
        if bfloat16:  # NumPy has no bfloat16: the same 16 bits, as uint16 (decoded by the kernel)
            dtype.code = _DL_UINT
        return np.from_dlpack(_Capsule(capsule, device)), bfloat16
    except (RuntimeError, BufferError, TypeError, ValueError) as e:  # e.g. sparse tensors, complex or lane types
        raise OptionError(f"{name}: cannot read this {type(x).__name__} through DLPack: {e}") from None


def arrow_import(x: Any) -> pa.Array | pa.ChunkedArray | None:
    """An Arrow producer's data as pyarrow, zero-copy; None if x exports no Arrow protocol.
    A table of one column is that column (see `_one_column`)."""
    if hasattr(x, "__arrow_c_stream__"):
        return _one_column(pa.chunked_array(x))
    if hasattr(x, "__arrow_c_array__") or hasattr(x, "__arrow_array__"):
        return _one_column(pa.array(x))
    if hasattr(getattr(x, "array", None), "__arrow_array__"):  # a pandas < 3 Series of an Arrow dtype
        return pa.array(x.array)
    return None


def _one_column(x: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A table (a struct without null rows) of exactly one column as that column."""
    t = x.type
    if not (pa.types.is_struct(t) and t.num_fields == 1 and x.null_count == 0):
        return x
    if isinstance(x, pa.ChunkedArray):
        return pa.chunked_array([c.flatten()[0] for c in x.chunks], type=t.field(0).type)
    return x.flatten()[0]


def hf_column(x: Any, name: str) -> pa.ChunkedArray | None:
    """A Hugging Face `datasets` Column as the Arrow column of its dataset (no copy unless the
    dataset holds an indices mapping, from select/shuffle/filter); None if x is none."""
    if not (type(x).__module__.startswith("datasets.") and hasattr(x, "source") and hasattr(x, "column_name")):
        return None
    source = x.source
    if not hasattr(source, "with_format"):
        raise OptionError(f"{name}: a nested datasets Column; pass the dataset's column with the "
                          "distributions, e.g. ds['p']")
    table = source.with_format("arrow").select_columns([x.column_name])[:]
    return table.column(x.column_name)


def imported(x: Any, declared: str | None, name: str) -> tuple[Any, str | None]:
    """(x, the declared element type of its values): a DLPack tensor as a NumPy view,
    declaring bfloat16 itself; anything else unchanged (`aligned_columns` reads it)."""
    if not is_dlpack(x) or isinstance(x, (pa.Array, pa.ChunkedArray)):
        return x, declared
    values, bfloat16 = from_dlpack(x, name)
    if not bfloat16:
        return values, declared
    if declared not in (None, "bfloat16"):
        raise OptionError(f"{name}: declared {name}_dtype={declared!r} but got a bfloat16 tensor "
                          f"({type(x).__module__.split('.')[0]}.bfloat16)")
    return values, "bfloat16"
