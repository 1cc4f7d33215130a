"""Thin adapter: turn user input into the flat buffers the kernels read.

Arrow list arrays are read in place: the offsets buffer (which already
accounts for the array's slice offset) indexes the unsliced child values,
and null elements are read from the child's validity bitmap. Nothing here
loops over rows in Python or builds per-row objects. The only copies are
small ones (int32 offsets widened to int64, fixed-size offsets built from
the stride) and explicit casts (float16 -> float32, mixed float32/float64
sides -> float64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError, OptionError

_EMPTY_MASK = np.zeros(0, dtype=np.uint8)


@dataclass(frozen=True)
class Side:
    """One side (P or Q) of a run of rows, as flat buffers."""

    offsets: np.ndarray  # int64, n + 1 entries into `values`
    values: np.ndarray  # float32 or float64
    mask: np.ndarray  # Arrow validity bitmap of `values` (LSB first), empty if no null element
    mask_offset: int  # bit of mask that belongs to values[0]
    row_null: np.ndarray | None  # bool per row, None if no null row

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        """The values of row i (for error messages only)."""
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def row_nulls(self, i: int) -> np.ndarray:
        """Positions of null elements in row i (for error messages only)."""
        if self.mask.size == 0:
            return np.zeros(0, dtype=np.int64)
        bits = self.mask_offset + np.arange(self.offsets[i], self.offsets[i + 1])
        null = ((self.mask[bits >> 3] >> (bits & 7)) & 1) == 0
        return np.flatnonzero(null)

    def __post_init__(self) -> None:
        # Arrow buffers are read-only; make every buffer read-only so that the
        # kernel sees one array type and Numba compiles one specialisation.
        for name in ("offsets", "values", "mask", "row_null"):
            a = getattr(self, name)
            if a is not None and a.flags.writeable:
                a = a.view()
                a.flags.writeable = False
                object.__setattr__(self, name, a)

    def astype(self, dtype: np.dtype) -> "Side":
        """The same rows with values of `dtype`: only the values these rows use are converted
        (a slice of a big list array shares its whole child)."""
        if self.values.dtype == dtype:
            return self
        lo, hi = (int(self.offsets[0]), int(self.offsets[-1])) if self.n else (0, 0)
        mask_offset = self.mask_offset + lo if self.mask.size else 0
        return Side(self.offsets - lo, self.values[lo:hi].astype(dtype), self.mask, mask_offset, self.row_null)


_INTEGER_HINT = (
    "integer values are not probabilities (bfloat16 stored as uint16 needs a declared element type, "
    "which fastkl does not read yet): convert them to float first"
)


def _float_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """The kernel dtype for NumPy input: integer or boolean values are refused, not
    taken as probabilities (a bfloat16 buffer viewed as uint16 would give garbage)."""
    if dtype in (np.float32, np.float64):
        return np.dtype(dtype)
    if dtype == np.float16:
        return np.dtype(np.float32)
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        raise OptionError(f"{name}: got dtype {dtype}; {_INTEGER_HINT}")
    raise OptionError(f"{name}: expected floating-point values, got dtype {dtype}")


def _from_numpy(x: np.ndarray, name: str) -> Side:
    if x.ndim != 2:
        raise OptionError(
            f"{name}: expected a 2-D array (rows x K), got {x.ndim}-D"
            + ("; for one distribution use x[None, :]" if x.ndim == 1 else "")
        )
    dtype = _float_dtype(x.dtype, name)
    x = np.ascontiguousarray(x, dtype=dtype)  # no copy when already C-ordered float32/64
    n, k = x.shape
    offsets = np.arange(n + 1, dtype=np.int64) * k
    return Side(offsets, x.reshape(-1), _EMPTY_MASK, 0, None)


def _child_buffers(child: pa.Array, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(values, validity bitmap, bit offset) of a float child array, without copying."""
    t = child.type
    if pa.types.is_float16(t):
        child = pc.cast(child, pa.float32())
    elif pa.types.is_integer(t) or pa.types.is_boolean(t):
        raise OptionError(f"{name}: got list<{t}>; {_INTEGER_HINT}")
    elif not (pa.types.is_float32(t) or pa.types.is_float64(t)):
        raise OptionError(f"{name}: expected a list of float16/float32/float64, got list<{t}>")
    dtype = np.float32 if pa.types.is_float32(child.type) else np.float64
    validity, data = child.buffers()[:2]
    start, n = child.offset, len(child)
    values = np.frombuffer(data, dtype=dtype, count=start + n)[start:] if data is not None else np.zeros(0, dtype)
    if validity is not None and child.null_count > 0:
        return values, np.frombuffer(validity, dtype=np.uint8), start
    return values, _EMPTY_MASK, 0


def _needs_cast(t: pa.DataType) -> bool:
    return pa.types.is_float16(t) or pa.types.is_integer(t)


def is_list_type(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def list_offsets(arr: pa.Array, name: str, what: str = "floats") -> tuple[np.ndarray, pa.Array]:
    """(int64 offsets into the whole child, the whole child) of a list-like array, checked.

    The child is not sliced (a slice of the list array shares it); the offsets
    already account for the array's slice offset.
    """
    t = arr.type
    n = len(arr)
    if pa.types.is_fixed_size_list(t):
        offsets = (np.arange(n + 1, dtype=np.int64) + arr.offset) * t.list_size
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        offsets = arr.offsets.to_numpy().astype(np.int64, copy=False)
    elif pa.types.is_struct(t):
        cols = ", ".join(t.field(i).name for i in range(t.num_fields))
        raise OptionError(
            f"{name}: got a table (columns {cols}); pass the one column that holds the distributions, "
            "e.g. df['p'] or table['p'], or a 2-D array"
        )
    else:
        raise OptionError(f"{name}: expected a list, large_list or fixed_size_list array of {what}, got {t}")
    child = arr.values  # the whole child, also for a slice of the list array
    if n and (offsets[0] < 0 or offsets[-1] > len(child) or np.any(np.diff(offsets) < 0)):
        # the kernel trusts offsets: corrupt ones (e.g. a damaged IPC file) would read out of bounds
        raise DataError(f"{name}: corrupt list offsets (not increasing or beyond the {len(child)} values)")
    return offsets, child


def _from_arrow(arr: pa.Array, name: str) -> Side:
    n = len(arr)
    offsets, child = list_offsets(arr, name)
    if n and _needs_cast(child.type) and (offsets[0] > 0 or offsets[-1] < len(child)):
        # convert only the values of these rows: a batch sliced out of a big record batch
        # would otherwise convert the whole record batch's child, every batch
        lo = int(offsets[0])
        child = child.slice(lo, int(offsets[-1]) - lo)
        offsets = offsets - lo
    values, mask, mask_offset = _child_buffers(child, name)
    row_null = None
    if arr.null_count > 0:
        row_null = arr.is_null().to_numpy(zero_copy_only=False)
    return Side(offsets, values, mask, mask_offset, row_null)


def _masked_to_arrow(x: np.ma.MaskedArray, name: str) -> pa.Array:
    """A masked 2-D array as lists: masked elements are null elements (an invalid
    row, `null_element`), a row masked entirely is a null row (its measures are null)."""
    if x.ndim != 2:
        raise OptionError(f"{name}: expected a 2-D masked array (rows x K), got {x.ndim}-D")
    dtype = _float_dtype(x.dtype, name)
    data = np.ascontiguousarray(np.ma.getdata(x), dtype=dtype)
    mask = np.ma.getmaskarray(x)
    values = pa.array(data.reshape(-1), mask=mask.reshape(-1))
    rows = pa.FixedSizeListArray.from_arrays(values, data.shape[1])
    whole = mask.all(axis=1) if data.shape[1] else np.zeros(data.shape[0], dtype=bool)
    if whole.any():
        offsets = pa.array(np.arange(data.shape[0] + 1, dtype=np.int32) * data.shape[1])
        rows = pa.ListArray.from_arrays(offsets, values, mask=pa.array(whole))
    return rows


def _as_arrow_or_numpy(x: Any, name: str) -> pa.Array | pa.ChunkedArray | np.ndarray:
    if isinstance(x, np.ndarray) and x.ndim == 0 or isinstance(x, (int, float, np.generic)):
        raise OptionError(f"{name}: got a single number; expected rows of distributions (a 2-D array or lists)")
    if np.ma.isMaskedArray(x):
        return _masked_to_arrow(x, name) if np.ma.is_masked(x) else np.ma.getdata(x)
    if isinstance(x, (pa.Array, pa.ChunkedArray, np.ndarray)):
        return x
    if isinstance(x, (list, tuple)):
        return _from_python(x, name)
    if hasattr(x, "__arrow_c_array__") or hasattr(x, "__arrow_c_stream__"):
        return pa.array(x) if hasattr(x, "__arrow_c_array__") else pa.chunked_array(x)
    if hasattr(x, "__array__"):
        return np.asarray(x)
    raise OptionError(f"{name}: unsupported input type {type(x).__name__}")


def _from_python(x: list | tuple, name: str) -> pa.Array:
    """Python lists: floats for values (lists of lists for sequences), as typed for ids and masks."""
    if name in ("p", "q"):
        types = (pa.list_(pa.float64()), pa.list_(pa.list_(pa.float64())))
    else:
        types = (None,)
    for t in types:
        try:
            return pa.array(x, type=t)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
            error = e
    raise OptionError(f"{name}: could not read a list of lists of numbers: {error}") from None


def _side(x: pa.Array | np.ndarray, name: str) -> Side:
    return _from_numpy(x, name) if isinstance(x, np.ndarray) else _from_arrow(x, name)


def _length(x: pa.Array | pa.ChunkedArray | np.ndarray) -> int:
    return x.shape[0] if isinstance(x, np.ndarray) else len(x)


def _pieces(x: pa.Array | pa.ChunkedArray | np.ndarray, bounds: list[int]) -> Iterator[Any]:
    """Split x at the row boundaries `bounds` (zero-copy slices)."""
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if isinstance(x, np.ndarray):
            yield x[lo:hi]
        elif isinstance(x, pa.ChunkedArray):
            # bounds include every chunk boundary, so this is one slice of one chunk
            chunks = [c for c in x.slice(lo, hi - lo).chunks if len(c)]
            yield chunks[0] if len(chunks) == 1 else pa.concat_arrays(chunks)
        else:
            yield x.slice(lo, hi - lo)


def _chunk_bounds(x: Any) -> list[int]:
    if isinstance(x, pa.ChunkedArray):
        return [int(b) for b in np.cumsum([0] + [len(c) for c in x.chunks])]
    return [0, _length(x)]


def aligned_columns(columns: dict[str, Any]) -> tuple[int, list[tuple[int, dict[str, Any]]]]:
    """Split columns of one table (p, q, ids, masks: Arrow or NumPy) into pieces whose rows line up.

    Returns (rows, [(first_row, {name: piece}), ...]). Chunked arrays with
    different chunk boundaries are cut at the union of the boundaries, so each
    piece is a plain zero-copy slice of one chunk of each column.
    """
    cols = {name: _as_arrow_or_numpy(x, name) for name, x in columns.items() if x is not None}
    names = list(cols)
    n = _length(cols[names[0]])
    for name in names[1:]:
        if _length(cols[name]) != n:
            raise OptionError(f"{names[0]} has {n} rows but {name} has {_length(cols[name])}")
    if n == 0:
        return 0, []
    bounds = sorted(set().union(*(_chunk_bounds(x) for x in cols.values())))
    split = [_pieces(cols[name], bounds) for name in names]
    return n, [(lo, dict(zip(names, parts))) for lo, *parts in zip(bounds[:-1], *split)]


def side_pair(p: Any, q: Any | None) -> tuple[Side, Side | None]:
    """The Sides of one piece of p (and q), on one values dtype (mixed float32/float64: float64)."""
    ps = _side(p, "p")
    qs = _side(q, "q") if q is not None else None
    if qs is not None and ps.values.dtype != qs.values.dtype:
        ps, qs = ps.astype(np.float64), qs.astype(np.float64)
    return ps, qs


def aligned_sides(p: Any, q: Any | None) -> tuple[int, list[tuple[int, Side, Side | None]]]:
    """Convert p (and q) to Sides, split into pieces whose rows line up (see `aligned_columns`)."""
    n, pieces = aligned_columns({"p": p, "q": q})
    return n, [(lo, *side_pair(cols["p"], cols.get("q"))) for lo, cols in pieces]
