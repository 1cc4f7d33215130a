"""Hand surgery on Parquet files, for fault-injection tests: no dependency but pyarrow.

A tiny Thrift compact-protocol codec (the encoding of Parquet footers and page
headers) that decodes a struct into nested `[field id, type, value]` lists and
encodes it back byte for byte, so a test can change one declared number (rows
of a row group, values of a page, sizes) and write a file that lies about
itself. Used by tests/test_faults.py and scripts/fault_trials.py.

    footer, data = read_footer(path)            # FileMetaData as a Struct, bytes before it
    set_field(footer, [4, 0, 3], 10**15)        # row_groups[0].num_rows
    write_with_footer(path, data, footer)
"""

from __future__ import annotations

import struct
from typing import Any

STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)


class Struct(list):
    """Fields in file order: [fid, type, value]; lists are ("list", elem_type, [values])."""

    def get(self, fid: int, default=None):
        for f in self:
            if f[0] == fid:
                return f[2]
        return default

    def set(self, fid: int, value) -> None:
        for f in self:
            if f[0] == fid:
                f[2] = value
                return
        raise KeyError(fid)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = out = 0
    while True:
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, pos
        shift += 7


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _read_value(buf: bytes, pos: int, t: int) -> tuple[Any, int]:
    if t in (TRUE, FALSE):  # inside a list: one byte
        return buf[pos] == 1, pos + 1
    if t == BYTE:
        return struct.unpack_from("b", buf, pos)[0], pos + 1
    if t in (I16, I32, I64):
        v, pos = _varint(buf, pos)
        return _zigzag(v), pos
    if t == DOUBLE:
        return struct.unpack_from("<d", buf, pos)[0], pos + 8
    if t == BINARY:
        n, pos = _varint(buf, pos)
        return bytes(buf[pos : pos + n]), pos + n
    if t in (LIST, SET):
        h = buf[pos]
        pos += 1
        n, et = h >> 4, h & 0x0F
        if n == 15:
            n, pos = _varint(buf, pos)
        vals = []
        for _ in range(n):
            v, pos = _read_value(buf, pos, et)
            vals.append(v)
        return ("list", et, vals), pos
    if t == MAP:
        n, pos = _varint(buf, pos)
        if n == 0:
            return ("map", 0, 0, []), pos
        kv = buf[pos]
        pos += 1
        items = []
        for _ in range(n):
            k, pos = _read_value(buf, pos, kv >> 4)
            v, pos = _read_value(buf, pos, kv & 0x0F)
            items.append((k, v))
        return ("map", kv >> 4, kv & 0x0F, items), pos
    if t == STRUCT:
        return read_struct(buf, pos)
    raise ValueError(f"bad thrift type {t} at {pos}")


def read_struct(buf: bytes, pos: int = 0) -> tuple[Struct, int]:
    out = Struct()
    last = 0
    while True:
        h = buf[pos]
        pos += 1
        if h == STOP:
            return out, pos
        delta, t = h >> 4, h & 0x0F
        if delta:
            fid = last + delta
        else:
            v, pos = _varint(buf, pos)
            fid = _zigzag(v)
        if t in (TRUE, FALSE):
            out.append([fid, t, t == TRUE])
        else:
            v, pos = _read_value(buf, pos, t)
            out.append([fid, t, v])
        last = fid


def _w_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _w_zigzag(n: int) -> bytes:
    return _w_varint((n << 1) ^ (n >> 63))


def _write_value(v: Any, t: int) -> bytes:
    if t in (TRUE, FALSE):
        return b"\x01" if v else b"\x02"
    if t == BYTE:
        return struct.pack("b", v)
    if t in (I16, I32, I64):
        return _w_zigzag(v)
    if t == DOUBLE:
        return struct.pack("<d", v)
    if t == BINARY:
        return _w_varint(len(v)) + bytes(v)
    if t in (LIST, SET):
        _, et, vals = v
        head = bytes([(len(vals) << 4) | et]) if len(vals) < 15 else bytes([0xF0 | et]) + _w_varint(len(vals))
        return head + b"".join(_write_value(x, et) for x in vals)
    if t == MAP:
        _, kt, vt, items = v
        if not items:
            return b"\x00"
        return _w_varint(len(items)) + bytes([(kt << 4) | vt]) + b"".join(
            _write_value(k, kt) + _write_value(x, vt) for k, x in items
        )
    if t == STRUCT:
        return write_struct(v)
    raise ValueError(t)


def write_struct(s: Struct) -> bytes:
    out = bytearray()
    last = 0
    for fid, t, v in s:
        wire_t = (TRUE if v else FALSE) if t in (TRUE, FALSE) else t
        if 0 < fid - last <= 15:
            out.append(((fid - last) << 4) | wire_t)
        else:
            out.append(wire_t)
            out += _w_zigzag(fid)
        if t not in (TRUE, FALSE):
            out += _write_value(v, t)
        last = fid
    out.append(STOP)
    return bytes(out)


# --------------------------------------------------------------------------
# Parquet files

# FileMetaData: 2 schema, 3 num_rows, 4 row_groups; RowGroup: 1 columns, 2 total_byte_size, 3 num_rows;
# ColumnChunk: 3 meta_data; ColumnMetaData: 4 codec, 5 num_values, 6 total_uncompressed_size,
# 7 total_compressed_size, 9 data_page_offset, 11 dictionary_page_offset.
# PageHeader: 1 type, 2 uncompressed_page_size, 3 compressed_page_size, 4 crc, 5 data_page_header
# (1 num_values), 7 dictionary_page_header (1 num_values), 8 data_page_header_v2 (1 num_values, 3 num_rows).


def read_footer(path: str) -> tuple[Struct, bytes]:
    """(FileMetaData, the file's bytes before the footer)."""
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[-4:] == b"PAR1", "not a parquet file"
    n = struct.unpack("<I", raw[-8:-4])[0]
    start = len(raw) - 8 - n
    md, end = read_struct(raw, start)
    assert end == len(raw) - 8
    return md, raw[:start]


def write_with_footer(path: str, data: bytes, md: Struct) -> None:
    enc = write_struct(md)
    with open(path, "wb") as f:
        f.write(data + enc + struct.pack("<I", len(enc)) + b"PAR1")


def get_field(s: Any, path: list[int]) -> Any:
    """Follow field ids through structs; an int after a list field indexes the list."""
    cur = s
    for step in path:
        cur = cur[2][step] if isinstance(cur, tuple) else cur.get(step)
    return cur


def set_field(s: Struct, path: list[int], value: Any) -> None:
    parent = get_field(s, path[:-1])
    if isinstance(parent, tuple):
        parent[2][path[-1]] = value
    else:
        parent.set(path[-1], value)


def column_meta(md: Struct, rg: int, col: int) -> Struct:
    return get_field(md, [4, rg, 1, col, 3])


def pages(data: bytes, md: Struct, rg: int, col: int) -> list[tuple[int, Struct, int, int]]:
    """[(header offset, PageHeader, data offset, data length)] of one column chunk."""
    cm = column_meta(md, rg, col)
    start = cm.get(11) if cm.get(11) is not None else cm.get(9)
    end = start + cm.get(7)
    out = []
    pos = start
    while pos < end:
        h, body = read_struct(data, pos)
        n = h.get(3)
        out.append((pos, h, body, n))
        pos = body + n
    return out


def replace_page_header(data: bytes, md: Struct, rg: int, col: int, page: int, header: Struct) -> bytes:
    """Swap one page header (sizes may change: later offsets in the footer are shifted)."""
    pos, old, body, n = pages(data, md, rg, col)[page]
    new = write_struct(header)
    shift = len(new) - (body - pos)
    data = data[:pos] + new + data[body:]
    if shift:
        cm = column_meta(md, rg, col)
        cm.set(7, cm.get(7) + shift)
        cm.set(6, cm.get(6) + shift)
        for g, rgs in enumerate(get_field(md, [4])[2]):
            for c, cc in enumerate(rgs.get(1)[2]):
                m = cc.get(3)
                for fid in (9, 11, 10):
                    off = m.get(fid)
                    if off is not None and off > pos:
                        m.set(fid, off + shift)
                fo = cc.get(2)
                if fo is not None and fo > pos:
                    cc.set(2, fo + shift)
    return data
