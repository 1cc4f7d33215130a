"""What a job knows about an input file without reading its data, and how it checks it is still that file.

A job plans from a file's identity (device, inode, size, mtime, ctime) and
its footer, then its tasks open the file again, possibly minutes later. A
file replaced (a new inode at the same path) or rewritten in place (mtime
can be restored with `os.utime`, ctime cannot) must not be read as if it
were the one planned: every check here runs on an open handle (`os.fstat`
of its descriptor), never on a second `stat` of the path, so a replace
between the check and the read cannot slip through.

Arrow IPC is read through regular file handles, never memory-mapped: a
mapped file truncated by another process kills the reader with SIGBUS,
where a read through a handle is an ordinary error that names the file.
The IPC metadata a plan needs (rows and sizes of each record batch) is read
from the message headers with a small flatbuffer reader, so planning reads
neither the data nor a map of it.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

IPC_FILE_MAGIC = b"ARROW1"
_CONTINUATION = b"\xff\xff\xff\xff"
SCHEMA, DICTIONARY_BATCH, RECORD_BATCH = 1, 2, 3  # Message.header_type (Message.fbs)
_MAX_HEADER = 64 << 20  # larger message metadata is not believed (a corrupt length)


@dataclass(frozen=True)
class Identity:
    """The fstat fields a file must keep for a job to go on reading it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    etag: str = ""  # an S3 object's version tag (fastkl.io.store_reads): what it is, where it has no inode

    @classmethod
    def of(cls, fd: int) -> "Identity":
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @classmethod
    def of_object(cls, info) -> "Identity":
        """An object in a store (a pyarrow FileInfo): size and modification time are all it has
        (no inode, no ctime); the footer digest, checked beside it, catches a rewrite within
        the same second (stores keep mtimes to the second)."""
        if info.size is None:
            raise FileNotFoundError(info.path)
        return cls(0, 0, info.size, info.mtime_ns or 0, 0)

    def differences(self, other: "Identity") -> str:
        """'' if equal, else what changed, for the one-line message.

        Objects pinned by ETag compare by it alone: the same ETag is the same
        bytes, whatever its mtime (a rewrite of the same bytes changes no output).
        """
        if self.etag or other.etag:
            return "" if self.etag == other.etag else f"ETag {self.etag or '?'} -> {other.etag or '?'}"
        if (self.dev, self.ino) != (other.dev, other.ino):
            return "replaced by another file"
        if self.size != other.size:
            return f"size {self.size} -> {other.size} bytes"
        if self.mtime_ns != other.mtime_ns:
            return "modified"
        if self.ctime_ns != other.ctime_ns:
            return "rewritten (ctime changed)"
        return ""


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_at(f: pa.NativeFile, offset: int, n: int) -> bytes:
    if offset < 0 or n < 0:
        raise ValueError(f"bad file range {offset}+{n}")
    return f.read_at(n, offset)


# --------------------------------------------------------------------------
# Footers


def parquet_footer(f: pa.NativeFile, size: int) -> bytes:
    """The Parquet footer (Thrift metadata, its length and PAR1) of an open file."""
    if size < 12:
        raise ValueError(f"{size} bytes is too short for a Parquet file")
    tail = read_at(f, size - 8, 8)
    n = struct.unpack("<I", tail[:4])[0]
    if tail[4:] != b"PAR1" or n > size - 12:
        raise ValueError("no Parquet footer at the end of the file")
    return read_at(f, size - 8 - n, n + 8)


def ipc_file_footer(f: pa.NativeFile, size: int) -> bytes:
    """The Arrow IPC file footer (flatbuffer, its length and ARROW1) of an open file."""
    if size < 16:
        raise ValueError(f"{size} bytes is too short for an Arrow IPC file")
    tail = read_at(f, size - 10, 10)
    n = struct.unpack("<i", tail[:4])[0]
    if tail[4:] != IPC_FILE_MAGIC or n <= 0 or n > size - 16:
        raise ValueError("no Arrow IPC footer at the end of the file")
    return read_at(f, size - 10 - n, n + 10)


# --------------------------------------------------------------------------
# A minimal flatbuffer reader (tables, scalars, vectors of structs)


class _Table:
    def __init__(self, buf: bytes, pos: int):
        self.buf = buf
        self.pos = pos
        self.vt = pos - self._unpack("<i", pos)
        self.vt_size = self._unpack("<H", self.vt)

    def _unpack(self, fmt: str, at: int):
        if at < 0 or at + struct.calcsize(fmt) > len(self.buf):
            raise ValueError("flatbuffer offset outside the message")
        return struct.unpack_from(fmt, self.buf, at)[0]

    def _slot(self, i: int) -> int:
        o = 4 + 2 * i
        return self._unpack("<H", self.vt + o) if o + 2 <= self.vt_size else 0

    def scalar(self, i: int, fmt: str, default: int = 0) -> int:
        o = self._slot(i)
        return self._unpack(fmt, self.pos + o) if o else default

    def table(self, i: int) -> "_Table | None":
        o = self._slot(i)
        if not o:
            return None
        at = self.pos + o
        return _Table(self.buf, at + self._unpack("<I", at))

    def structs(self, i: int, size: int) -> list[int]:
        """Positions of the elements of a vector of structs of `size` bytes."""
        o = self._slot(i)
        if not o:
            return []
        at = self.pos + o
        at += self._unpack("<I", at)
        n = self._unpack("<I", at)
        if at + 4 + n * size > len(self.buf):
            raise ValueError("flatbuffer vector outside the message")
        return [at + 4 + k * size for k in range(n)]


def _root(buf: bytes) -> _Table:
    if len(buf) < 8:
        raise ValueError("message metadata too short")
    return _Table(buf, struct.unpack_from("<I", buf, 0)[0])


@dataclass(frozen=True)
class Message:
    """One IPC message's header: what it is, its record batch's rows and field nodes, its body size."""

    kind: int
    rows: int
    nodes: tuple[tuple[int, int], ...]  # (length, null_count) per field, pre-order
    body: int
    metadata: bytes  # the flatbuffer, for digests
    buffers: tuple[tuple[int, int], ...] = ()  # (offset in the body, length), pre-order
    compressed: bool = False


def parse_message(flat: bytes) -> Message:
    m = _root(flat)
    kind = m.scalar(1, "<B")
    body = m.scalar(3, "<q")
    rows, nodes, buffers, compressed = 0, (), (), False
    if kind == RECORD_BATCH:
        rb = m.table(2)
        if rb is None:
            raise ValueError("record batch message without its header")
        rows = rb.scalar(0, "<q")
        nodes = tuple(struct.unpack_from("<qq", flat, at) for at in rb.structs(1, 16))
        buffers = tuple(struct.unpack_from("<qq", flat, at) for at in rb.structs(2, 16))
        compressed = rb.table(3) is not None
    if body < 0 or rows < 0:
        raise ValueError("negative length in a message header")
    return Message(kind, rows, nodes, body, flat, buffers, compressed)


def _prefix(head: bytes) -> tuple[int, int]:
    """(flatbuffer length, prefix length) of an encapsulated message (the 0.15+ and the older framing)."""
    if head[:4] == _CONTINUATION:
        return struct.unpack("<i", head[4:8])[0], 8
    return struct.unpack("<i", head[:4])[0], 4


def read_message_header(f: pa.NativeFile, offset: int, size: int) -> tuple[Message | None, int]:
    """The message at `offset` (None at an end-of-stream marker) and the offset of the next one."""
    head = read_at(f, offset, 8)
    if len(head) < 4:
        return None, offset  # end of file without an end-of-stream marker (allowed by readers)
    n, skip = _prefix(head)
    if n == 0:
        return None, offset + skip
    if n < 0 or n > _MAX_HEADER or offset + skip + n > size:
        raise ValueError(f"bad message length {n} at byte {offset}")
    msg = parse_message(read_at(f, offset + skip, n))
    end = offset + skip + n + msg.body
    if end > size:
        raise ValueError(f"message at byte {offset} ends at byte {end}, after the end of the file ({size})")
    return msg, end


def ipc_file_blocks(footer: bytes) -> list[tuple[int, int, int]]:
    """(offset, metadata length, body length) of every record batch, from an IPC file footer."""
    flat = footer[:-10]
    ft = _root(flat)
    return [struct.unpack_from("<qi4xq", flat, at) for at in ft.structs(3, 24)]


def ipc_file_batch(f: pa.NativeFile, block: tuple[int, int, int], size: int) -> Message:
    offset, meta_len, body = block
    if offset < 0 or meta_len < 8 or offset + meta_len + body > size:
        raise ValueError(f"record batch block at byte {offset} lies outside the file")
    raw = read_at(f, offset, meta_len)
    n, skip = _prefix(raw)
    if n <= 0 or skip + n > meta_len:
        raise ValueError(f"bad message length {n} at byte {offset}")
    msg = parse_message(raw[skip : skip + n])
    if msg.kind != RECORD_BATCH:
        raise ValueError(f"the block at byte {offset} is not a record batch")
    return msg


def stream_messages(f: pa.NativeFile, size: int) -> Iterator[tuple[int, Message]]:
    """(offset, header) of every message of an IPC stream, reading only the headers."""
    pos = 0
    while pos < size:
        msg, nxt = read_message_header(f, pos, size)
        if msg is None:
            return
        yield pos, msg
        pos = nxt


def sniff_ipc(f) -> str | None:
    """'ipc' (an IPC file: ARROW1 magic), 'ipc_stream' or None, from an open binary file at its start.

    A stream has no magic: it starts with a Schema message (the continuation
    marker, the metadata length, the flatbuffer), which is parsed to tell it
    from any file that happens to start with the same bytes.
    """
    head = f.read(8)
    if head[:6] == IPC_FILE_MAGIC:
        return "ipc"
    if len(head) < 8:
        return None
    n, skip = _prefix(head)
    if n <= 0 or n > _MAX_HEADER:
        return None
    flat = head[skip:] + f.read(n - (8 - skip))
    try:
        return "ipc_stream" if len(flat) == n and parse_message(flat).kind == SCHEMA else None
    except (ValueError, struct.error):
        return None


# --------------------------------------------------------------------------
# Decoded size of the columns read, from a record batch's field nodes


def _nodes(t: pa.DataType) -> int:
    if isinstance(t, pa.ExtensionType):
        t = t.storage_type
    return 1 + sum(_nodes(t.field(i).type) for i in range(t.num_fields))


def _width(t: pa.DataType) -> int:
    try:
        return max(1, t.bit_width // 8)
    except ValueError:
        return 8


_MAX_NODE = 1 << 48


def check_batch_length(schema: pa.Schema, msg: Message) -> None:
    """Refuse a record batch whose length disagrees with its columns' (the top-level field
    nodes'): planning counts a batch's rows from its length, so a length damaged to 0 would
    drop the batch's rows without a word. Layouts whose nodes are not counted here are left
    to pyarrow. So is a field node of a negative or an impossible length (2**48 values or more:
    their sizes would overflow the plan's 64-bit columns)."""
    for length, nulls in msg.nodes:
        if not (0 <= length < _MAX_NODE and 0 <= nulls <= length):
            raise ValueError(f"a record batch's field node declares {length} values with {nulls} nulls")
    at = 0
    tops = []
    for fld in schema:
        tops.append(at)
        at += _nodes(fld.type)
    if at != len(msg.nodes):
        return
    for name, i in zip(schema.names, tops):
        if msg.nodes[i][0] != msg.rows:
            raise ValueError(f"a record batch of {msg.rows} rows holds {msg.nodes[i][0]} values of column {name!r}")


def field_bytes(schema: pa.Schema, names: list[str], msg: Message) -> int | None:
    """Decoded bytes of the named float-list columns in this batch; None when it cannot tell."""
    starts, at = {}, 0
    for fld in schema:
        starts[fld.name] = at
        at += _nodes(fld.type)
    if at != len(msg.nodes):
        return None
    total = 0
    for name in names:
        t = schema.field(name).type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
            return None
        rows, _ = msg.nodes[starts[name]]
        values, _ = msg.nodes[starts[name] + 1]
        offsets = 0 if pa.types.is_fixed_size_list(t) else (rows + 1) * (8 if pa.types.is_large_list(t) else 4)
        total += values * _width(t.value_type) + offsets + (rows + 7) // 8 + (values + 7) // 8
    return total


# --------------------------------------------------------------------------
# Reading a row range of a record batch without reading the whole batch
#
# A memory map made slicing a big record batch free; through a handle,
# pyarrow reads whole buffers. A batch split into several tasks (one batch
# of a million rows of logits) would then be read whole by every task. So
# the columns a task reads are cut out of the uncompressed body here: only
# the bytes of its rows (bitmaps realigned, offsets rebased).


def _buffer_count(t: pa.DataType) -> int | None:
    """Buffers of one field (itself, not its children) in the IPC format; None if not handled here."""
    if isinstance(t, pa.ExtensionType):
        t = t.storage_type
    if pa.types.is_null(t):
        return 0
    if (pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t)
            or pa.types.is_large_string(t)):
        return 3
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_map(t):
        return 2
    if pa.types.is_fixed_size_list(t) or pa.types.is_struct(t):
        return 1
    if pa.types.is_union(t):
        return 2 if t.mode == "dense" else 1
    if pa.types.is_run_end_encoded(t):
        return 0
    if pa.types.is_dictionary(t) or _is_fixed(t):
        return 2
    return None  # views (variadic buffers) and anything newer


def _is_fixed(t: pa.DataType) -> bool:
    try:
        return t.bit_width > 0 and t.num_fields == 0 and not pa.types.is_dictionary(t)
    except ValueError:
        return False


def _all_buffers(t: pa.DataType) -> int | None:
    if isinstance(t, pa.ExtensionType):
        t = t.storage_type
    n = _buffer_count(t)
    if n is None:
        return None
    for i in range(t.num_fields):
        c = _all_buffers(t.field(i).type)
        if c is None:
            return None
        n += c
    return n


class _Body:
    """Reads byte ranges of one record batch's body through a file handle."""

    def __init__(self, src: pa.NativeFile, start: int, msg: Message):
        self.src, self.start, self.msg = src, start, msg

    def read(self, buf: int, first: int, n: int) -> bytes:
        off, length = self.msg.buffers[buf]
        if first < 0 or n < 0 or first + n > length:
            raise ValueError(f"rows outside buffer {buf} of the record batch ({first}+{n} > {length})")
        data = read_at(self.src, self.start + off + first, n)
        if len(data) != n:
            raise EOFError(f"the file ends inside buffer {buf} of the record batch")
        return data

    def bits(self, buf: int, a: int, n: int) -> pa.Buffer | None:
        """Bits a..a+n of a bitmap, realigned to bit 0; None for an absent bitmap (no nulls)."""
        if self.msg.buffers[buf][1] == 0 or n == 0:
            return None
        first, last = a // 8, (a + n + 7) // 8
        raw = np.frombuffer(self.read(buf, first, last - first), dtype=np.uint8)
        bits = np.unpackbits(raw, bitorder="little")[a % 8 : a % 8 + n]
        return pa.py_buffer(np.packbits(bits, bitorder="little").tobytes())

    def offsets(self, buf: int, a: int, n: int, wide: bool) -> tuple[int, int, pa.Buffer]:
        dt = np.int64 if wide else np.int32
        w = np.dtype(dt).itemsize
        off = np.frombuffer(self.read(buf, a * w, (n + 1) * w), dtype=dt)
        lo, hi = int(off[0]), int(off[-1])
        if hi < lo or (np.diff(off) < 0).any():
            raise ValueError("decreasing offsets in the record batch")
        return lo, hi - lo, pa.py_buffer((off - dt(lo)).astype(dt).tobytes())


def _slice(body: _Body, t: pa.DataType, bi: int, a: int, n: int) -> pa.Array:
    """Rows a..a+n of the field whose first buffer is `bi` (types of `_sliceable`)."""
    valid = body.bits(bi, a, n)
    if pa.types.is_boolean(t):
        return pa.Array.from_buffers(t, n, [valid, body.bits(bi + 1, a, n) or pa.py_buffer(bytes((n + 7) // 8))])
    if _is_fixed(t):
        w = t.bit_width // 8
        return pa.Array.from_buffers(t, n, [valid, pa.py_buffer(body.read(bi + 1, a * w, n * w))])
    if pa.types.is_fixed_size_list(t):
        k = t.list_size
        child = _slice(body, t.value_type, bi + 1, a * k, n * k)
        return pa.Array.from_buffers(t, n, [valid], children=[child])
    wide = pa.types.is_large_list(t) or pa.types.is_large_binary(t) or pa.types.is_large_string(t)
    lo, m, offsets = body.offsets(bi + 1, a, n, wide)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        child = _slice(body, t.value_type, bi + 2, lo, m)
        return pa.Array.from_buffers(t, n, [valid, offsets], children=[child])
    return pa.Array.from_buffers(t, n, [valid, offsets, pa.py_buffer(body.read(bi + 2, lo, m))])


def _sliceable(t: pa.DataType) -> bool:
    if pa.types.is_boolean(t) or _is_fixed(t):
        return True
    if (pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t)
            or pa.types.is_large_string(t)):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _sliceable(t.value_type)
    return False


def read_rows(src: pa.NativeFile, pos: int, size: int, schema: pa.Schema, names: list[str],
              a: int, n: int) -> pa.RecordBatch | None:
    """Rows a..a+n of the columns `names` of the record batch whose message is at `pos`.

    None when the range is the whole batch (pyarrow reads it) or when it
    cannot be done by cutting byte ranges (compressed body, a column type or
    a preceding layout not handled here): the caller reads the whole batch.
    The file must be little-endian (see `big_endian`).
    """
    head = read_at(src, pos, 8)
    if len(head) < 8:
        raise EOFError(f"the file ends before the record batch at byte {pos}")
    flat_len, skip = _prefix(head)
    if flat_len <= 0 or flat_len > _MAX_HEADER:
        raise ValueError(f"bad message length {flat_len} at byte {pos}")
    msg = parse_message(read_at(src, pos + skip, flat_len))
    if msg.kind != RECORD_BATCH or msg.compressed or a + n > msg.rows or (a == 0 and n == msg.rows):
        return None
    first: dict[str, int] = {}
    bi = 0
    for fld in schema:
        first[fld.name] = bi
        c = _all_buffers(fld.type)
        if c is None:
            if any(name not in first for name in names):
                return None
            break
        bi += c
    if not all(_sliceable(schema.field(name).type) for name in names):
        return None
    if len(msg.buffers) < bi:
        raise ValueError("the record batch lists fewer buffers than its schema needs")
    body = _Body(src, pos + skip + flat_len, msg)
    if body.start + msg.body > size:
        raise EOFError(f"the record batch at byte {pos} ends after the end of the file")
    arrays = [_slice(body, schema.field(name).type, first[name], a, n) for name in names]
    return pa.RecordBatch.from_arrays(arrays, names=names)


def big_endian(src: pa.NativeFile, fmt: str, size: int) -> bool:
    """Whether the IPC file or stream's schema says big-endian (Schema.endianness, 1 = Big)."""
    if fmt == "ipc":
        schema = _root(ipc_file_footer(src, size)[:-10]).table(1)
    else:
        msg, _ = read_message_header(src, 0, size)
        schema = _root(msg.metadata).table(2) if msg is not None else None
    return schema is not None and schema.scalar(0, "<h") == 1
