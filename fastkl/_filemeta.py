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

    @classmethod
    def of(cls, fd: int) -> "Identity":
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def differences(self, other: "Identity") -> str:
        """'' if equal, else what changed, for the one-line message."""
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


def parse_message(flat: bytes) -> Message:
    m = _root(flat)
    kind = m.scalar(1, "<B")
    body = m.scalar(3, "<q")
    rows, nodes = 0, ()
    if kind == RECORD_BATCH:
        rb = m.table(2)
        if rb is None:
            raise ValueError("record batch message without its header")
        rows = rb.scalar(0, "<q")
        nodes = tuple(struct.unpack_from("<qq", flat, at) for at in rb.structs(1, 16))
    if body < 0 or rows < 0:
        raise ValueError("negative length in a message header")
    return Message(kind, rows, nodes, body, flat)


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
