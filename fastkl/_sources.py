"""Input side of a job: find the files, check their columns, cut the work into tasks.

A SOURCE is a Parquet file, an Arrow IPC (Feather v2) file, a directory of
them (hive-partitioned directories included), a glob, or several of these.
Discovery reads only file footers (Parquet metadata, the IPC footer through a
memory map); no data is read here.

Tasks are defined by the input alone (never by the number of workers), so the
output parts and the summary are the same however the job is scheduled:

* Parquet: consecutive row groups of one file are grouped into a task while
  the task stays under `task_rows` rows and `task_bytes` bytes (uncompressed
  size of the columns read, from the footer). A row group larger than the
  bound is a task of its own; the task streams it in batches of bounded size
  (`ParquetFile.iter_batches` over a buffered input stream), so a file with one
  huge row group still runs in bounded memory.
* Arrow IPC: record batches are memory-mapped, so slicing is free; a batch
  larger than the bound is split into several tasks of row ranges.
"""

from __future__ import annotations

import glob
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

from ._footer import check_footer
from .errors import DataError, OptionError

PARQUET_EXT = (".parquet", ".parq", ".pq")
IPC_EXT = (".arrow", ".feather", ".ipc", ".fea")
_IGNORE_PREFIXES = (".", "_")  # pyarrow.dataset's convention: _SUCCESS, _metadata, .crc ...
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"

# Default task bound: 128 MiB of decoded input columns per task; each task
# reads and computes in batches of at most 32 MiB (or task_rows rows).
DEFAULT_TASK_BYTES = 128 << 20
DEFAULT_BATCH_BYTES = 32 << 20


@dataclass(frozen=True)
class Unit:
    """A row group (Parquet) or record batch (IPC) slice that a task reads."""

    index: int  # row group / record batch number in the file
    offset: int  # first row inside the unit (IPC slices; 0 for Parquet)
    rows: int
    nbytes: int  # estimated decoded bytes of the columns read


@dataclass(frozen=True)
class FileRef:
    """What a task needs to know about its file (small: shipped with every task)."""

    index: int
    path: str  # absolute
    display: str  # as the user wrote / discovered it, for messages
    fmt: str  # "parquet" | "ipc"
    size: int
    mtime_ns: int
    partition: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class InputFile(FileRef):
    rows: int = 0
    units: tuple[Unit, ...] = ()  # one per row group / record batch, full

    def ref(self) -> FileRef:
        return FileRef(self.index, self.path, self.display, self.fmt, self.size, self.mtime_ns, self.partition)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "format": self.fmt,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "rows": self.rows,
            "row_groups" if self.fmt == "parquet" else "record_batches": len(self.units),
        }


@dataclass(frozen=True)
class Task:
    index: int
    file: FileRef
    units: tuple[Unit, ...]  # consecutive; Parquet units are whole row groups
    row_start: int  # row number of the task's first row inside the file
    rows: int
    nbytes: int

    def fingerprint(self) -> dict:
        """What must be unchanged for a finished part to be reused by --resume."""
        return {
            "path": self.file.path,
            "size": self.file.size,
            "mtime_ns": self.file.mtime_ns,
            "units": [[u.index, u.offset, u.rows] for u in self.units],
            "row_start": self.row_start,
        }

    def unit_name(self) -> str:
        return "row group" if self.file.fmt == "parquet" else "record batch"


@dataclass
class Columns:
    p: str
    q: str | None
    keep: tuple[str, ...]
    keep_types: dict[str, pa.DataType] = field(default_factory=dict)
    partition_keep: dict[str, pa.DataType] = field(default_factory=dict)  # keep cols from hive paths

    def read(self) -> list[str]:
        """File columns a task reads, each once: p, q, then the kept ones."""
        out: list[str] = []
        for c in (self.p, self.q, *self.keep):
            if c is not None and c not in self.partition_keep and c not in out:
                out.append(c)
        return out


@dataclass
class Plan:
    files: list[InputFile]
    tasks: list[Task]
    columns: Columns
    batch_rows: list[int]  # per task: rows per read batch
    # every (p, q) pair of list value types among the files: what the kernel will be specialised for
    value_types: frozenset = frozenset()

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)


# --------------------------------------------------------------------------
# Discovery


def _has_magic(pattern: str) -> bool:
    return glob.has_magic(pattern)


def _sniff(path: str) -> str | None:
    low = path.lower()
    if low.endswith(PARQUET_EXT):
        return "parquet"
    if low.endswith(IPC_EXT):
        return "ipc"
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return None
    if head[:4] == b"PAR1":
        return "parquet"
    if head == b"ARROW1":
        return "ipc"
    return None


def _is_fastkl_output(d: str) -> bool:
    """A fastkl output, staging or old-output directory: never input (it has no list columns)."""
    return d.endswith((".fastkl-staging", ".fastkl-old")) or os.path.exists(os.path.join(d, "_fastkl.json"))


def _walk(root: str) -> Iterable[str]:
    """Files under a directory in sorted order, skipping hidden/underscore entries and fastkl outputs."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(_IGNORE_PREFIXES) and not _is_fastkl_output(os.path.join(dirpath, d))
        )
        for name in sorted(filenames):
            if not name.startswith(_IGNORE_PREFIXES):
                yield os.path.join(dirpath, name)


def _hive(rel_dir: str) -> tuple[tuple[str, str | None], ...]:
    out = []
    for part in Path(rel_dir).parts:
        m = re.fullmatch(r"([^=]+)=(.*)", part)
        if m:
            value = unquote(m.group(2))
            out.append((unquote(m.group(1)), None if value == _HIVE_NULL else value))
    return tuple(out)


@dataclass(frozen=True)
class _Found:
    path: str
    display: str
    fmt: str
    partition: tuple[tuple[str, str | None], ...]


def discover(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[_Found], list[str]]:
    """Expand SOURCE arguments into data files (sorted within each argument).

    Returns the files and the "roots" (directories or files) the job reads,
    which the output checks against DEST.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [os.fspath(s) for s in sources]
    if not sources:
        raise OptionError("no SOURCE given")
    found: list[_Found] = []
    roots: list[str] = []
    seen: set[str] = set()

    def add(path: str, display: str, partition=(), explicit=False) -> None:
        real = os.path.realpath(path)
        if real in seen:
            return
        fmt = _sniff(path)
        if fmt is None:
            if explicit:
                raise DataError(f"{display}: not a Parquet or Arrow IPC file")
            return  # stray file in a dataset directory (README, .crc, ...)
        seen.add(real)
        found.append(_Found(os.path.abspath(path), display, fmt, partition))

    def add_dir(d: str) -> None:
        roots.append(os.path.abspath(d))
        n0 = len(found)
        for f in _walk(d):
            add(f, f, _hive(os.path.relpath(os.path.dirname(f), d)))
        if len(found) == n0:
            raise OptionError(f"SOURCE {d!r} holds no Parquet or Arrow IPC file")

    for s in sources:
        if os.path.isdir(s):
            add_dir(s)
        elif os.path.isfile(s):
            roots.append(os.path.abspath(s))
            add(s, s, explicit=True)
        elif _has_magic(s):
            matches = sorted(glob.glob(s, recursive=True))
            if not matches:
                raise OptionError(f"SOURCE {s!r} matches no file")
            n0 = len(found)
            for m in matches:
                if os.path.isdir(m):
                    add_dir(m)
                elif not os.path.basename(m).startswith(_IGNORE_PREFIXES) or os.path.basename(s).startswith(
                    _IGNORE_PREFIXES
                ):
                    roots.append(os.path.abspath(m))
                    add(m, m)
            if len(found) == n0:
                raise OptionError(f"SOURCE {s!r} matches no Parquet or Arrow IPC file")
        else:
            raise OptionError(f"SOURCE {s!r} does not exist")
    return found, roots


# --------------------------------------------------------------------------
# Footers and schemas


def _is_float_list(t: pa.DataType) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        return False
    return pa.types.is_floating(t.value_type)


# Decoded width of one value of a Parquet physical type (levels not counted).
_WIDTH = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8, "FIXED_LEN_BYTE_ARRAY": 8}


def _leaf_columns(md: pq.FileMetaData, names: list[str]) -> list[int]:
    roots: dict[str, list[int]] = {}
    for j in range(md.num_columns):
        roots.setdefault(md.schema.column(j).path.split(".")[0], []).append(j)
    return [j for n in names for j in roots.get(n, [])]


def _leaf_bytes(md: pq.FileMetaData, names: list[str]) -> list[int]:
    """Decoded bytes of the named top-level columns, per row group.

    Not just `total_uncompressed_size`: that is the size of the *encoded*
    pages, and a dictionary- or RLE-encoded column chunk of a few hundred
    bytes can decode to gigabytes (one row of 10^8 equal floats). The number
    of values declared in the footer times the value width bounds what the
    reader materialises, so tasks and read batches are sized on that.
    """
    idx = _leaf_columns(md, names)
    out = []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        total = 0
        for j in idx:
            c = rg.column(j)
            width = _WIDTH.get(c.physical_type, 0)
            total += max(c.total_uncompressed_size, c.num_values * width)
        out.append(total)
    return out


def _check_parquet_footer(md: pq.FileMetaData, names: list[str], file_size: int) -> None:
    """Refuse a footer that contradicts itself or the file, before any page is read.

    A footer is what the reader trusts to allocate and to count rows: a row
    group declaring a negative row count made pyarrow silently drop rows, one
    declaring 10^15 rows made it reserve memory for them. Every column chunk
    holds at least one value (level) per row, and its pages lie inside the
    file, before the footer.
    """
    data_end = file_size - 8 - md.serialized_size
    if md.num_rows < 0:
        raise ValueError(f"the footer declares {md.num_rows} rows")
    total = 0
    idx = _leaf_columns(md, names)
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        n = rg.num_rows
        if n < 0:
            raise ValueError(f"row group {g} declares {n} rows")
        total += n
        for j in idx:
            c = rg.column(j)
            where = f"row group {g}, column {c.path_in_schema}"
            if c.num_values < n:
                raise ValueError(f"{where} declares {c.num_values} values for {n} rows")
            if c.total_compressed_size < 0 or c.total_uncompressed_size < 0:
                raise ValueError(f"{where} declares a negative size")
            if c.num_values == 0:
                continue  # an empty chunk may have no page at all
            starts = [c.data_page_offset]
            if c.has_dictionary_page and c.dictionary_page_offset:
                starts.append(c.dictionary_page_offset)
            start = min(starts)
            if start < 4 or start + c.total_compressed_size > data_end:
                raise ValueError(
                    f"{where} declares bytes {start}..{start + c.total_compressed_size} "
                    f"outside the data of the file (4..{data_end})"
                )
    if total != md.num_rows:
        raise ValueError(f"the row groups hold {total} rows but the footer declares {md.num_rows}")


def _read_footer(f: _Found, names: list[str]) -> tuple[pa.Schema, list[tuple[int, int]], int, int]:
    st = os.stat(f.path)
    try:
        if f.fmt == "parquet":
            md = pq.read_metadata(f.path)
            schema = md.schema.to_arrow_schema()
            present = [n for n in names if n in schema.names]
            try:
                check_footer(f.path, md, st.st_size)  # before pyarrow builds any column chunk's metadata
                _check_parquet_footer(md, present, st.st_size)
            except ValueError as e:
                raise DataError(f"{f.display}: corrupt Parquet footer: {e}") from None
            sizes = _leaf_bytes(md, present)
            units = [(md.row_group(g).num_rows, sizes[g]) for g in range(md.num_row_groups)]
        else:
            with pa.memory_map(f.path) as src:
                reader = pa.ipc.open_file(src)
                schema = reader.schema
                present = [n for n in names if n in schema.names]
                units = []
                for i in range(reader.num_record_batches):
                    b = reader.get_batch(i)
                    b.validate()  # declared lengths against buffer sizes (offsets: in the task)
                    units.append((b.num_rows, b.select(present).nbytes if present else 0))
    except (pa.ArrowException, OSError, ValueError) as e:
        what = "Parquet" if f.fmt == "parquet" else "Arrow IPC"
        raise DataError(f"{f.display}: not a readable {what} file ({_short(e)})") from e
    return schema, units, st.st_size, st.st_mtime_ns


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _partition_types(found: list[_Found]) -> dict[str, pa.DataType]:
    values: dict[str, list[str | None]] = {}
    for f in found:
        for k, v in f.partition:
            values.setdefault(k, []).append(v)
    out = {}
    for k, vs in values.items():
        ints = [v for v in vs if v is not None]
        if ints and all(re.fullmatch(r"-?\d+", v) for v in ints):
            big = max(abs(int(v)) for v in ints) >= 2**31
            out[k] = pa.int64() if big else pa.int32()
        else:
            out[k] = pa.string()
    return out


def kernel_bytes_scale(schema: pa.Schema, names: Sequence[str]) -> float:
    """Bytes a task holds per byte of its stored p/q values, to size tasks and batches on.

    The kernel runs on float32, or float64 when a side is float64: a float16
    side (or a float32 side beside a float64 one) is converted, a copy beside
    the values read, so a batch holds 1 + kernel width / stored width bytes
    per stored byte (3 for float16) instead of 1.
    """
    types = [schema.field(c).type.value_type for c in names if c in schema.names]
    floats = [t for t in types if pa.types.is_floating(t)]
    wide = 8 if any(pa.types.is_float64(t) for t in floats) else 4
    narrow = min((t.bit_width // 8 for t in floats), default=wide)
    return 1.0 if narrow >= wide else 1.0 + wide / narrow


def _check_columns(found: list[_Found], schemas: list[pa.Schema], cols: Columns) -> None:
    """Unknown column in the first file: usage error. Differing files: data error."""
    ptypes = _partition_types(found)
    first, s0 = found[0], schemas[0]

    def unknown(name: str, role: str) -> OptionError:
        names = ", ".join(s0.names)
        return OptionError(f"unknown {role} column {name!r} in {first.display} (columns: {names})")

    for role, name in (("p", cols.p), ("q", cols.q)):
        if name is None:
            continue
        if name not in s0.names:
            raise unknown(name, role)
        t = s0.field(name).type
        if not _is_float_list(t):
            raise OptionError(
                f"column {name!r} ({role}) in {first.display} has type {t}; expected a list of floats"
            )
    for name in cols.keep:
        if name in s0.names:
            cols.keep_types[name] = s0.field(name).type
        elif name in ptypes and all(name in dict(f.partition) for f in found):
            cols.partition_keep[name] = ptypes[name]
            cols.keep_types[name] = ptypes[name]
        else:
            raise unknown(name, "keep")
    for f, s in zip(found[1:], schemas[1:]):
        for role, name in (("p", cols.p), ("q", cols.q)):
            if name is None:
                continue
            if name not in s.names:
                raise DataError(f"{f.display}: no column {name!r} ({role}), unlike {first.display}")
            if not _is_float_list(s.field(name).type):
                raise DataError(
                    f"{f.display}: column {name!r} ({role}) has type {s.field(name).type}; "
                    "expected a list of floats"
                )
        for name in cols.keep:
            if name in cols.partition_keep:
                continue
            if name not in s.names:
                raise DataError(f"{f.display}: no column {name!r} (keep), unlike {first.display}")
            if s.field(name).type != cols.keep_types[name]:
                raise DataError(
                    f"{f.display}: column {name!r} has type {s.field(name).type}, "
                    f"but {cols.keep_types[name]} in {first.display}"
                )


def scan(
    sources,
    *,
    p: str,
    q: str | None,
    keep: Sequence[str],
    task_rows: int | None = None,
    task_bytes: int | None = DEFAULT_TASK_BYTES,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    check=None,
) -> tuple[Plan, list[str]]:
    """Discover, read footers, check columns and cut the input into tasks."""
    if task_rows is not None and task_rows < 1:
        raise OptionError(f"task_rows must be >= 1, got {task_rows}")
    if task_bytes is not None and task_bytes < 1:
        raise OptionError(f"task_bytes must be >= 1, got {task_bytes}")
    found, roots = discover(sources)
    if check is not None:
        check(roots)  # e.g. DEST against SOURCE: before any file is opened
    cols = Columns(p=p, q=q, keep=tuple(keep))
    names = [c for c in (p, q) if c is not None]
    with ThreadPoolExecutor(max_workers=min(16, len(found))) as ex:
        footers = list(ex.map(lambda f: _read_footer(f, names), found))
    _check_columns(found, [s for s, *_ in footers], cols)

    files: list[InputFile] = []
    for i, (f, (schema, units, size, mtime)) in enumerate(zip(found, footers)):
        scale = kernel_bytes_scale(schema, names)
        us = tuple(Unit(g, 0, r, int(b * scale)) for g, (r, b) in enumerate(units))
        files.append(
            InputFile(i, f.path, f.display, f.fmt, size, mtime, f.partition, sum(r for r, _ in units), us)
        )

    tasks: list[Task] = []
    batch_rows: list[int] = []
    max_rows = task_rows or (1 << 62)
    max_bytes = task_bytes or (1 << 62)
    batch_bytes = min(batch_bytes, max_bytes)

    def emit(file: InputFile, units: list[Unit], row_start: int) -> None:
        rows = sum(u.rows for u in units)
        nbytes = sum(u.nbytes for u in units)
        tasks.append(Task(len(tasks), file.ref(), tuple(units), row_start, rows, nbytes))
        per_row = nbytes / rows if rows else 1.0
        batch_rows.append(int(max(1, min(max_rows, batch_bytes // max(per_row, 1.0)))))

    for file in files:
        row = 0
        cur: list[Unit] = []
        cur_start = 0
        c_rows = c_bytes = 0  # running totals of `cur` (summing it per unit was quadratic in the row groups)
        for u in file.units:
            if u.rows == 0:
                continue
            pieces = [u]
            if file.fmt == "ipc" and (u.rows > max_rows or u.nbytes > max_bytes):
                # split a big record batch into zero-copy row slices
                per_row = u.nbytes / u.rows
                step = int(max(1, min(max_rows, max_bytes // max(per_row, 1.0))))
                pieces = [
                    Unit(u.index, o, min(step, u.rows - o), int(per_row * min(step, u.rows - o)))
                    for o in range(0, u.rows, step)
                ]
            for piece in pieces:
                if cur and (c_rows + piece.rows > max_rows or c_bytes + piece.nbytes > max_bytes):
                    emit(file, cur, cur_start)
                    cur = []
                    c_rows = c_bytes = 0
                if not cur:
                    cur_start = row
                cur.append(piece)
                c_rows += piece.rows
                c_bytes += piece.nbytes
                row += piece.rows
        if cur:
            emit(file, cur, cur_start)
    value_types = frozenset(tuple(sc.field(c).type.value_type for c in names) for sc, *_ in footers)
    return Plan(files, tasks, cols, batch_rows, value_types), roots
