"""Thin adapter: turn user input into the flat buffers the kernels read.

Arrow list arrays are read in place: the offsets buffer (which already
accounts for the array's slice offset) indexes the unsliced child values,
and null elements are read from the child's validity bitmap. Nothing here
loops over rows in Python or builds per-row objects. The only copies are
small ones (int32 offsets widened to int64, fixed-size offsets built from
the stride) and explicit casts (a float32 or half side beside a float64
one -> float64; see `side_pair`).

Half precision (float16, bfloat16) is not converted: its buffer is viewed
as uint16 and the Side says how to decode it (`Side.decode`); the kernel
decodes row by row (fastkl.kernels.half). Arrow has no bfloat16, so a
`list<uint16>` (or a NumPy uint16 array) is bfloat16 or float16 only when
declared so (`p_dtype` / `q_dtype`); NumPy arrays of `ml_dtypes.bfloat16`
and DLPack tensors (torch, JAX) carry their type (`fastkl.adapters.protocols`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .._registry import DECODE_CODE, DTYPES
from ..errors import DataError, OptionError
from . import protocols

AS_IS, FLOAT16, BFLOAT16 = DECODE_CODE["as_is"], DECODE_CODE["float16"], DECODE_CODE["bfloat16"]

_EMPTY_MASK = np.zeros(0, dtype=np.uint8)


@dataclass(frozen=True)
class Side:
    """One side (P or Q) of a run of rows, as flat buffers."""

    offsets: np.ndarray  # int64, n + 1 entries into `values`
    values: np.ndarray  # float32 or float64
    mask: np.ndarray  # Arrow validity bitmap of `values` (LSB first), empty if no null element
    mask_offset: int  # bit of mask that belongs to values[0]
    row_null: np.ndarray | None  # bool per row, None if no null row
    decode: int = 0  # 0: float values; 1 / 2: uint16 values holding float16 / bfloat16 bits (_registry.DECODES)

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        """The values of row i, half precision decoded to float32 (for error messages only)."""
        return _decoded(self.values[self.offsets[i] : self.offsets[i + 1]], self.decode)

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
        if self.values.dtype == dtype and not self.decode:
            return self
        lo, hi = (int(self.offsets[0]), int(self.offsets[-1])) if self.n else (0, 0)
        mask_offset = self.mask_offset + lo if self.mask.size else 0
        values = _decoded(self.values[lo:hi], self.decode).astype(dtype, copy=False)
        return Side(self.offsets - lo, values, self.mask, mask_offset, self.row_null)

    @property
    def kernel_dtype(self) -> np.dtype:
        """What the kernel computes on: half precision is decoded to float32."""
        return np.dtype(np.float32) if self.decode else self.values.dtype


def _decoded(bits_or_values: np.ndarray, decode: int) -> np.ndarray:
    """uint16 half-precision bits as float32 (NumPy; the kernel has its own decoder)."""
    if decode == FLOAT16:
        return bits_or_values.view(np.float16).astype(np.float32)
    if decode == BFLOAT16:
        return (bits_or_values.astype(np.uint32) << 16).view(np.float32)
    return bits_or_values


_HALF = {"float16": FLOAT16, "bfloat16": BFLOAT16}


def _integer_hint(side: str) -> str:
    return ("integer values are not probabilities: convert them to float first, or, if they are bfloat16 "
            f"or float16 bits stored as uint16, declare it ({side}_dtype='bfloat16')")


def _element_kind(t: Any) -> tuple[str, str]:
    """(kind, label for messages) of a pyarrow or NumPy element type: float16, bfloat16,
    float32, float64, int16 (16-bit integers), integer or other."""
    if isinstance(t, pa.DataType):
        label = f"list<{t}>"
        if pa.types.is_float16(t):
            return "float16", label
        if pa.types.is_float32(t) or pa.types.is_float64(t):
            return np.dtype(t.to_pandas_dtype()).name, label
        if pa.types.is_integer(t):
            return ("int16" if t.bit_width == 16 else "integer"), label
        return ("integer" if pa.types.is_boolean(t) else "other"), label
    dt = np.dtype(t)
    label = f"dtype {dt.name}"
    if dt.name == "bfloat16" or dt in (np.float16, np.float32, np.float64):  # bfloat16: ml_dtypes, not imported
        return dt.name, label
    if dt in (np.uint16, np.int16):
        return "int16", label
    return ("integer" if np.issubdtype(dt, np.integer) or dt == np.bool_ else "other"), label


def element_type(t: Any, declared: str | None, name: str, side: str | None = None) -> tuple[np.dtype, int]:
    """(NumPy dtype of the stored values, decode code) of one side's elements, checked
    against the declared element type; `t` is a pyarrow or NumPy element type.

    Undeclared, float16/float32/float64 (and NumPy `ml_dtypes.bfloat16`) are
    read as they are and integers are refused (a bfloat16 buffer viewed as
    uint16 would give garbage). Declared float16/bfloat16 needs 16-bit values
    (float16, uint16, int16; bfloat16 for bfloat16); declared float32/float64
    needs exactly that type. `name` opens error messages; `side` ("p" or "q",
    default `name`) names the option.
    """
    side = side or name
    kind, label = _element_kind(t)
    if declared is not None and declared not in DTYPES:
        raise OptionError(f"unknown {side}_dtype {declared!r}; expected one of {', '.join(DTYPES)}")
    if declared in _HALF:
        if kind == "int16" or kind == declared:
            return np.dtype(np.uint16), _HALF[declared]
        raise OptionError(f"{name}: declared {side}_dtype={declared!r} but got {label}; {declared} needs 16-bit "
                          f"values ({'list<halffloat> or ' if declared == 'float16' else ''}list<uint16> holding "
                          f"its bits{', or ml_dtypes.bfloat16' if declared == 'bfloat16' else ''})")
    if declared is not None and kind != declared:
        raise OptionError(f"{name}: declared {side}_dtype={declared!r} but got {label}")
    if kind in _HALF:
        return np.dtype(np.uint16), _HALF[kind]
    if kind in ("float32", "float64"):
        return np.dtype(kind), AS_IS
    if kind in ("int16", "integer"):
        raise OptionError(f"{name}: got {label}; {_integer_hint(side)}")
    if isinstance(t, pa.DataType):
        raise OptionError(f"{name}: expected a list of float16/float32/float64, got {label}")
    raise OptionError(f"{name}: expected floating-point values, got {label}")


def _from_numpy(x: np.ndarray, name: str, declared: str | None = None) -> Side:
    if x.ndim != 2:
        raise OptionError(
            f"{name}: expected a 2-D array (rows x K), got {x.ndim}-D"
            + ("; for one distribution use x[None, :]" if x.ndim == 1 else "")
        )
    dtype, decode = element_type(x.dtype, declared, name)
    x = np.ascontiguousarray(x)  # no copy when already C-ordered
    n, k = x.shape
    offsets = _row_offsets(n, k) if n <= _CACHED_ROWS else _new_row_offsets(n, k)
    return Side(offsets, x.reshape(-1).view(dtype), _EMPTY_MASK, 0, None, decode)


_CACHED_ROWS = 1 << 20  # offsets of up to 8 MiB are kept for the next call of that shape


def _new_row_offsets(n: int, k: int) -> np.ndarray:
    """0, k, 2k, ..., nk as read-only int64 (one allocation)."""
    offsets = np.arange(0, (n + 1) * k, k, dtype=np.int64) if k else np.zeros(n + 1, dtype=np.int64)
    offsets.flags.writeable = False
    return offsets


@lru_cache(maxsize=4)
def _row_offsets(n: int, k: int) -> np.ndarray:
    """`_new_row_offsets`, shared by both sides of a call and by the calls that follow on
    arrays of that shape: building them (fresh pages) cost 5% of a kl call on 200,000 x 256."""
    return _new_row_offsets(n, k)


def _child_buffers(child: pa.Array, name: str, declared: str | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(values, validity bitmap, bit offset, decode) of a float child array, without
    copying (half precision: its bits as uint16)."""
    dtype, decode = element_type(child.type, declared, name)
    validity, data = child.buffers()[:2]
    start, n = child.offset, len(child)
    values = np.frombuffer(data, dtype=dtype, count=start + n)[start:] if data is not None else np.zeros(0, dtype)
    if validity is not None and child.null_count > 0:
        return values, np.frombuffer(validity, dtype=np.uint8), start, decode
    return values, _EMPTY_MASK, 0, decode


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


def _from_arrow(arr: pa.Array, name: str, declared: str | None = None) -> Side:
    offsets, child = list_offsets(arr, name)
    values, mask, mask_offset, decode = _child_buffers(child, name, declared)
    row_null = None
    if arr.null_count > 0:
        row_null = arr.is_null().to_numpy(zero_copy_only=False)
    return Side(offsets, values, mask, mask_offset, row_null, decode)


def _masked_to_arrow(x: np.ma.MaskedArray, name: str) -> pa.Array:
    """A masked 2-D array as lists: masked elements are null elements (an invalid
    row, `null_element`), a row masked entirely is a null row (its measures are null)."""
    if x.ndim != 2:
        raise OptionError(f"{name}: expected a 2-D masked array (rows x K), got {x.ndim}-D")
    data = np.ascontiguousarray(np.ma.getdata(x))
    if data.dtype.name == "bfloat16":  # Arrow has no bfloat16: a masked one is rare, decode it
        data = _decoded(data.view(np.uint16), BFLOAT16)
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
    arrow = protocols.arrow_import(x)  # Polars, DuckDB, pandas, nanoarrow, ...: zero-copy
    if arrow is not None:
        return arrow
    if protocols.is_dlpack(x):  # torch, JAX, CuPy, ...: zero-copy, CPU memory only
        values, bfloat16 = protocols.from_dlpack(x, name)
        if bfloat16:  # p and q come here as NumPy, declared by `protocols.imported`
            raise OptionError(f"{name}: a bfloat16 tensor; convert it to float32 first")
        return values
    hf = protocols.hf_column(x, name)
    if hf is not None:
        return hf
    if hasattr(x, "__array__"):
        return np.asarray(x)
    raise OptionError(f"{name}: unsupported input type {type(x).__name__}; expected a 2-D array, lists, or an "
                      "object exporting the Arrow PyCapsule interface or DLPack")


def _from_python(x: list | tuple, name: str) -> pa.Array:
    """Python lists: floats for values (lists of lists for sequences), as typed for ids and masks."""
    if name in ("p", "q", "p_mean", "p_logvar", "q_mean", "q_logvar"):  # values: floats
        types = (pa.list_(pa.float64()), pa.list_(pa.list_(pa.float64())))
    else:
        types = (None,)
    for t in types:
        try:
            return pa.array(x, type=t)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
            error = e
    raise OptionError(f"{name}: could not read a list of lists of numbers: {error}") from None


def _side(x: pa.Array | np.ndarray, name: str, declared: str | None = None) -> Side:
    return _from_numpy(x, name, declared) if isinstance(x, np.ndarray) else _from_arrow(x, name, declared)


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


def _pieces_of_nothing(x: Any) -> Any:
    """An empty column as one plain (unchunked) empty piece."""
    if isinstance(x, pa.ChunkedArray):
        return x.combine_chunks() if x.num_chunks != 1 else x.chunk(0)
    return x


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
    if n == 0:  # one empty piece: its types still say what the rows are (sequences or not)
        return 0, [(0, {name: _pieces_of_nothing(x) for name, x in cols.items()})]
    bounds = sorted(set().union(*(_chunk_bounds(x) for x in cols.values())))
    split = [_pieces(cols[name], bounds) for name in names]
    return n, [(lo, dict(zip(names, parts))) for lo, *parts in zip(bounds[:-1], *split)]


def side_pair(p: Any, q: Any | None, p_dtype: str | None = None,
              q_dtype: str | None = None) -> tuple[Side, Side | None]:
    """The Sides of one piece of p (and q), checked against their declared element types.

    The kernel computes both sides in one precision: float32 when neither
    side is float64 (a float16 or bfloat16 side stays 16-bit and is decoded
    row by row, also beside a float32 side), else float64 (a float64 side
    converts the other side, decoded if half, to float64 for this piece).
    """
    ps = _side(p, "p", p_dtype)
    qs = _side(q, "q", q_dtype) if q is not None else None
    if qs is not None and ps.kernel_dtype != qs.kernel_dtype:
        ps, qs = ps.astype(np.float64), qs.astype(np.float64)
    return ps, qs

def scalar_values(x: pa.Array | np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """(values, validity bitmap, its bit offset, null rows or None) of one float per row
    (a sampled token's log-prob), read-only. float16 and bfloat16 are widened to float32
    (one value per token: small)."""
    if isinstance(x, np.ndarray):
        if x.ndim != 1:
            raise OptionError(f"{name}: expected one log-prob per row (a 1-D array), got {x.ndim}-D")
        dtype, decode = element_type(x.dtype, None, name)
        if decode:  # half precision: one value per token, widened
            x, dtype = x.astype(np.float32), np.dtype(np.float32)
        values, mask, offset, null = np.ascontiguousarray(x, dtype=dtype), _EMPTY_MASK, 0, None
    else:
        if not pa.types.is_floating(x.type):
            raise OptionError(f"{name}: expected floats (log-probs of the sampled tokens), got {x.type}")
        if pa.types.is_float16(x.type):
            x = pc.cast(x, pa.float32())
        values, mask, offset, _ = _child_buffers(x, name)
        null = x.is_null().to_numpy(zero_copy_only=False) if x.null_count else None
    if values.flags.writeable:  # one array type for the kernels: one specialisation
        values = values.view()
        values.flags.writeable = False
    return values, mask, offset, null


def scalar_side(x: pa.Array | np.ndarray, name: str) -> Side:
    """One float per row (a sampled token's log-prob) as a Side of rows of one value;
    a null value is a null row (see `scalar_values`)."""
    values, mask, offset, null = scalar_values(x, name)
    return Side(np.arange(len(values) + 1, dtype=np.int64), values, mask, offset, null)


def aligned_sides(p: Any, q: Any | None, p_dtype: str | None = None,
                  q_dtype: str | None = None) -> tuple[int, list[tuple[int, Side, Side | None]]]:
    """Convert p (and q) to Sides, split into pieces whose rows line up (see `aligned_columns`),
    as the engine reads token rows. `p_dtype` / `q_dtype` declare the element type of a side
    (None: as stored; see `element_type`); a bfloat16 DLPack tensor declares itself."""
    p, p_dtype = protocols.imported(p, p_dtype, "p")
    q, q_dtype = protocols.imported(q, q_dtype, "q")
    n, pieces = aligned_columns({"p": p, "q": q})
    return n, [(lo, *side_pair(cols["p"], cols.get("q"), p_dtype, q_dtype)) for lo, cols in pieces]
