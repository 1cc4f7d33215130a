"""Checks on a Parquet footer that pyarrow must not be the one to make.

pyarrow 26 validates a column chunk's size statistics while building its
`ColumnChunkMetaData` and throws a C++ exception there; from the Python
metadata API (`RowGroupMetaData.column(j)`) nothing catches it and the
process aborts (SIGABRT, found by scripts/fault_trials.py's fuzzing). The
conditions, from pyarrow's own messages:

* a repetition / definition level histogram whose length is not the
  column's max level + 1 (when not empty);
* `unencoded_byte_array_data_bytes` on a column that is not BYTE_ARRAY;

and, for the same reason, encrypted column metadata (no key to read it).
`check_footer` walks the footer's Thrift (compact protocol) bytes itself, in
a Numba loop (microseconds for thousands of column chunks), and raises
ValueError before pyarrow is asked for any column chunk. It only skips what
it does not need, and says nothing when it cannot parse (pyarrow already
did: its own errors are ordinary exceptions).
"""

from __future__ import annotations

import os
import struct
import types

import numpy as np
from numba import njit

# per (row group, column): present, rep hist len, def hist len, unencoded bytes set, encrypted, physical type
_F_PRESENT, _F_REP, _F_DEF, _F_UNENC, _F_CRYPT, _F_TYPE = range(6)
_NF = 6
_BYTE_ARRAY = 6  # parquet.thrift Type


@njit(cache=True, nogil=True)
def _varint(buf, pos):
    out = 0
    shift = 0
    while True:
        if pos >= buf.size or shift > 63:
            return 0, -1
        b = np.int64(buf[pos])
        pos += 1
        out |= (b & 0x7F) << shift
        if b & 0x80 == 0:
            return out, pos
        shift += 7


@njit(cache=True, nogil=True)
def _zigzag(n):
    return (n >> 1) ^ -(n & 1)


@njit(cache=True, nogil=True)
def _skip(buf, pos, t):
    """Skip one value of compact type t; -1 if malformed."""
    # explicit stack of (kind, remaining, elem_type): kind 0 = struct, 1 = list, 2 = map
    kinds = np.empty(64, np.int64)
    rem = np.empty(64, np.int64)
    et = np.empty(64, np.int64)
    et2 = np.empty(64, np.int64)
    depth = 0
    cur = t
    while True:
        # read one value of type `cur`
        if cur == 1 or cur == 2:  # bool inside a container: one byte
            pos += 1
        elif cur == 3:
            pos += 1
        elif cur == 4 or cur == 5 or cur == 6:
            _, pos = _varint(buf, pos)
        elif cur == 7:
            pos += 8
        elif cur == 8:
            n, pos = _varint(buf, pos)
            if pos < 0:
                return -1
            pos += n
        elif cur == 9 or cur == 10:
            if pos >= buf.size or depth >= 64:
                return -1
            h = np.int64(buf[pos])
            pos += 1
            n = h >> 4
            if n == 15:
                n, pos = _varint(buf, pos)
            kinds[depth] = 1
            rem[depth] = n
            et[depth] = h & 0x0F
            depth += 1
        elif cur == 11:
            n, pos = _varint(buf, pos)
            if pos < 0 or depth >= 64:
                return -1
            if n > 0:
                if pos >= buf.size:
                    return -1
                kv = np.int64(buf[pos])
                pos += 1
                kinds[depth] = 2
                rem[depth] = 2 * n
                et[depth] = kv >> 4
                et2[depth] = kv & 0x0F
                depth += 1
        elif cur == 12:
            if depth >= 64:
                return -1
            kinds[depth] = 0
            rem[depth] = 0
            depth += 1
        elif cur != -100:
            return -1
        if pos < 0 or pos > buf.size:
            return -1
        # find the next value to read
        while True:
            if depth == 0:
                return pos
            k = kinds[depth - 1]
            if k == 0:  # struct: next field header
                if pos >= buf.size:
                    return -1
                h = np.int64(buf[pos])
                pos += 1
                if h == 0:
                    depth -= 1
                    continue
                if h >> 4 == 0:
                    _, pos = _varint(buf, pos)
                    if pos < 0:
                        return -1
                ft = h & 0x0F
                cur = -100 if ft == 1 or ft == 2 else ft  # a bool field has its value in the header
                break
            if rem[depth - 1] == 0:
                depth -= 1
                continue
            rem[depth - 1] -= 1
            if k == 1:
                cur = et[depth - 1]
            else:
                cur = et[depth - 1] if rem[depth - 1] % 2 == 1 else et2[depth - 1]
            break


@njit(cache=True, nogil=True)
def _skip_field(buf, pos, t):
    """Skip a field's value: a bool field has none (its value is in the field header)."""
    if t == 1 or t == 2:
        return pos
    return _skip(buf, pos, t)


@njit(cache=True, nogil=True)
def _field(buf, pos, last):
    """(field id, type, pos) of the next field header; type 0 at the struct's end; pos -1 if malformed."""
    if pos >= buf.size:
        return 0, 0, -1
    h = np.int64(buf[pos])
    pos += 1
    if h == 0:
        return 0, 0, pos
    t = h & 0x0F
    if h >> 4:
        return last + (h >> 4), t, pos
    v, pos = _varint(buf, pos)
    return _zigzag(v), t, pos


@njit(cache=True, nogil=True)
def _list_header(buf, pos):
    if pos >= buf.size:
        return 0, 0, -1
    h = np.int64(buf[pos])
    pos += 1
    n = h >> 4
    if n == 15:
        n, pos = _varint(buf, pos)
    return n, h & 0x0F, pos


@njit(cache=True, nogil=True)
def _walk(buf, out):
    """Fill out[rg, col, :] for the footer in buf; returns 0, or -1 if it cannot parse, -2 if counts differ."""
    n_rg, n_col = out.shape[0], out.shape[1]
    pos = 0
    last = 0
    while True:
        fid, t, pos = _field(buf, pos, last)
        if pos < 0:
            return -1
        if t == 0:
            return 0
        last = fid
        if fid != 4 or t != 9:
            pos = _skip_field(buf, pos, t)
            if pos < 0:
                return -1
            continue
        n, et, pos = _list_header(buf, pos)
        if pos < 0 or et != 12 or n != n_rg:
            return -2 if pos >= 0 else -1
        for g in range(n):  # RowGroup
            last_rg = 0
            while True:
                fid, t, pos = _field(buf, pos, last_rg)
                if pos < 0:
                    return -1
                if t == 0:
                    break
                last_rg = fid
                if fid != 1 or t != 9:
                    pos = _skip_field(buf, pos, t)
                    if pos < 0:
                        return -1
                    continue
                m, et, pos = _list_header(buf, pos)
                if pos < 0 or et != 12 or m != n_col:
                    return -2 if pos >= 0 else -1
                for c in range(m):  # ColumnChunk
                    out[g, c, _F_PRESENT] = 1
                    last_cc = 0
                    while True:
                        fid, t, pos = _field(buf, pos, last_cc)
                        if pos < 0:
                            return -1
                        if t == 0:
                            break
                        last_cc = fid
                        if fid == 8 or fid == 9:
                            out[g, c, _F_CRYPT] = 1
                        if fid != 3 or t != 12:
                            pos = _skip_field(buf, pos, t)
                            if pos < 0:
                                return -1
                            continue
                        last_md = 0
                        while True:  # ColumnMetaData
                            fid, t, pos = _field(buf, pos, last_md)
                            if pos < 0:
                                return -1
                            if t == 0:
                                break
                            last_md = fid
                            if fid == 1 and t == 5:
                                v, pos = _varint(buf, pos)
                                out[g, c, _F_TYPE] = _zigzag(v)
                                continue
                            if fid != 16 or t != 12:
                                pos = _skip_field(buf, pos, t)
                                if pos < 0:
                                    return -1
                                continue
                            last_ss = 0
                            while True:  # SizeStatistics
                                fid, t, pos = _field(buf, pos, last_ss)
                                if pos < 0:
                                    return -1
                                if t == 0:
                                    break
                                last_ss = fid
                                if fid == 1:
                                    out[g, c, _F_UNENC] = 1
                                if (fid == 2 or fid == 3) and t == 9:
                                    k, et, p2 = _list_header(buf, pos)
                                    if p2 < 0:
                                        return -1
                                    out[g, c, _F_REP if fid == 2 else _F_DEF] = k
                                pos = _skip_field(buf, pos, t)
                                if pos < 0:
                                    return -1


def _blank(out: np.ndarray) -> np.ndarray:
    """Reset the per-column-chunk findings: nothing seen yet (-1), no flags set (0)."""
    out[:] = -1
    out[:, :, _F_UNENC] = 0
    out[:, :, _F_CRYPT] = 0
    return out


def _interpreted(fn):
    """`fn` run by the Python interpreter (its helpers too): the same code, no compile."""
    ns = dict(globals())
    for f in (_varint, _zigzag, _skip, _skip_field, _field, _list_header, _walk):
        ns[f.__name__] = types.FunctionType(f.py_func.__code__, ns, f.__name__, f.py_func.__defaults__)
    return ns[fn.__name__]


# Compiling _walk takes ~2 s on a machine's first job, more than interpreting
# the footers of most jobs: the first footer bytes of a process are walked by
# the interpreter (~1 MB/s: 64 KiB in < 0.1 s), the rest by the compiled
# (cached) loop.
_INTERPRET_BYTES = 1 << 16
_interpreted_walk = None
_interpreted_so_far = 0


def _walk_footer(buf: np.ndarray, out: np.ndarray) -> int:
    global _interpreted_walk, _interpreted_so_far
    if _interpreted_so_far + buf.size <= _INTERPRET_BYTES:
        _interpreted_so_far += buf.size
        if _interpreted_walk is None:
            _interpreted_walk = _interpreted(_walk)
        try:
            with np.errstate(all="ignore"):
                return _interpreted_walk(buf, out)
        except Exception:  # noqa: BLE001 - e.g. an overflow the compiled loop wraps: let it decide
            _blank(out)
    return _walk(buf, out)


def check_footer(path: str, md, file_size: int | None = None, raw: bytes | None = None) -> None:
    """Raise ValueError if pyarrow would abort on this file's column chunk metadata.

    raw: the footer bytes (Thrift, length, PAR1) if the caller read them
    already, from the handle `md` came from (then `path` is not opened).
    """
    n_rg, n_col = md.num_row_groups, md.num_columns
    if n_rg == 0 or n_col == 0:
        return
    n = md.serialized_size
    if raw is None:
        size = os.path.getsize(path) if file_size is None else file_size
        with open(path, "rb") as f:
            f.seek(size - 8 - n)
            raw = f.read(n + 8)
    if len(raw) != n + 8 or raw[-4:] != b"PAR1" or struct.unpack("<I", raw[-8:-4])[0] != n:
        return  # not the footer pyarrow read (the file changed, or an encrypted footer): leave it to pyarrow
    out = _blank(np.empty((n_rg, n_col, _NF), dtype=np.int64))
    status = _walk_footer(np.frombuffer(raw, dtype=np.uint8, count=n), out)
    if status == -1:
        return
    if status == -2:
        raise ValueError("the row groups do not hold one column chunk per column of the schema")
    schema = md.schema
    rep = np.array([schema.column(j).max_repetition_level + 1 for j in range(n_col)])
    dfn = np.array([schema.column(j).max_definition_level + 1 for j in range(n_col)])
    for what, k, want in (("repetition", _F_REP, rep), ("definition", _F_DEF, dfn)):
        got = out[:, :, k]
        bad = (got > 0) & (got != want[None, :])
        if bad.any():
            g, j = map(int, np.argwhere(bad)[0])
            raise ValueError(
                f"row group {g}, column {schema.column(j).path}: {what} level histogram of {got[g, j]} "
                f"entries, expected {want[j]}"
            )
    bad = (out[:, :, _F_UNENC] == 1) & (out[:, :, _F_TYPE] != _BYTE_ARRAY)
    if bad.any():
        g, j = map(int, np.argwhere(bad)[0])
        raise ValueError(f"row group {g}, column {schema.column(j).path}: byte-array sizes on a non-byte-array column")
    if (out[:, :, _F_CRYPT] == 1).any():
        g, j = map(int, np.argwhere(out[:, :, _F_CRYPT] == 1)[0])
        raise ValueError(f"row group {g}, column {schema.column(j).path}: encrypted column metadata")


# --------------------------------------------------------------------------
# Where each row group's metadata lies in the footer (issue 15): a task reads
# and parses only the footer's head (schema, ...), its own row groups'
# entries and the tail, not the whole footer once per task.


@njit(cache=True, nogil=True)
def _row_group_spans(buf, ends):
    """Fill ends[g] with the end of row group g's RowGroup struct in the FileMetaData `buf`.

    Returns (list header start, first row group start, end of the list), or
    list header start -1 if it cannot parse or the count is not ends.size."""
    pos = 0
    last = 0
    while True:
        fid, t, pos = _field(buf, pos, last)
        if pos < 0 or t == 0:
            return -1, 0, 0
        last = fid
        if fid != 4 or t != 9:
            pos = _skip_field(buf, pos, t)
            if pos < 0:
                return -1, 0, 0
            continue
        head = pos
        n, et, pos = _list_header(buf, pos)
        if pos < 0 or et != 12 or n != ends.size:
            return -1, 0, 0
        first = pos
        for g in range(n):
            pos = _skip(buf, pos, 12)
            if pos < 0:
                return -1, 0, 0
            ends[g] = pos
        return head, first, pos


def row_group_spans(raw: bytes, n_row_groups: int):
    """(head, ends, tail) of a Parquet footer `raw` (Thrift bytes, length, PAR1): head is where the
    row group list's header starts, ends[g] where row group g's entry ends (row group g starts at
    ends[g - 1], row group 0 right after the list header), tail where the bytes after the list
    start. None if it cannot parse."""
    n = len(raw) - 8
    buf = np.frombuffer(raw, dtype=np.uint8, count=n)
    ends = np.zeros(n_row_groups, dtype=np.int64)
    head, first, tail = _row_group_spans(buf, ends)
    if head < 0:
        return None
    return head, first, ends, tail


def list_header(n: int, elem_type: int = 12) -> bytes:
    """The compact-protocol header of a list of n elements (a list of structs by default)."""
    if n < 15:
        return bytes([(n << 4) | elem_type])
    out = bytearray([0xF0 | elem_type])
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
