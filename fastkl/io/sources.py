"""Input side of a job: find the files, check their columns, cut the work into tasks.

A SOURCE is a Parquet file, an Arrow IPC (Feather v2) file or stream, a
directory of them (hive-partitioned directories included), a glob, or several of these.
Discovery reads only file footers (Parquet metadata, the IPC footer and
message headers, through a regular file handle); no data is read here.

Tasks are defined by the input alone (never by the number of workers), so the
output parts and the summary are the same however the job is scheduled:

* Parquet: consecutive row groups of one file are grouped into a task while
  the task stays under `task_rows` rows and `task_bytes` bytes (uncompressed
  size of the columns read, from the footer). A row group larger than the
  bound is a task of its own; the task streams it in batches of bounded size
  (`ParquetFile.iter_batches` over a buffered input stream), so a file with one
  huge row group still runs in bounded memory.
* Arrow IPC (file or stream): record batches are read through a regular
  file handle (a memory map of a file truncated by another process would
  kill the reader with SIGBUS), only the columns used; a batch larger than
  the bound is split into several tasks of row ranges. Planning reads only
  the message headers (`filemeta`), never the data.

Every file is planned from one open handle: its identity (device, inode,
size, mtime, ctime from `fstat`) and a digest of its footer (for an IPC
stream, of all its message headers) go with every task, which checks them
on its own handle before and after reading, and into `--resume`'s
fingerprint: a file replaced or rewritten after planning is never read as
the planned one.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import posixpath
import struct
import zlib
import re
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .._config import DEFAULT_BATCH_BYTES, DEFAULT_TASK_BYTES, GROUP_FILES, GROUP_MIN_TASKS
from .filemeta import (
    Identity,
    RECORD_BATCH,
    check_batch_length,
    digest,
    field_bytes,
    ipc_file_batch,
    ipc_file_blocks,
    ipc_file_footer,
    parquet_footer,
    sniff_ipc,
    stream_messages,
)
from .footer_checks import check_footer, row_group_spans
from .plan_columns import Files, Tasks, cut
from .store_reads import open_pinned, pins
from .stores import Store, is_store_url, resolve
from ..errors import DataError, FastKLWarning, OptionError

PARQUET_EXT = (".parquet", ".parq", ".pq")
IPC_EXT = (".arrow", ".feather", ".ipc", ".fea")
_IGNORE_PREFIXES = (".", "_")  # pyarrow.dataset's convention: _SUCCESS, _metadata, .crc ...
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"

# Default task and batch bounds: fastkl._config.


@dataclass(frozen=True, slots=True)  # slots: a plan holds one per row group / task / file
class Unit:
    """A row group (Parquet) or record batch (IPC) slice that a task reads."""

    index: int  # row group / record batch number in the file
    offset: int  # first row inside the unit (IPC slices; 0 for Parquet)
    rows: int
    nbytes: int  # estimated decoded bytes of the columns read
    pos: int = 0  # IPC stream: byte offset of the record batch's message
    meta: tuple[int, int, int] = ()  # Parquet: its RowGroup entry in the footer (start, end, crc32)
    # Parquet on S3: the byte ranges of the column chunks a task reads, from the footer planning read, so
    # that a task fetches them with its footer pieces at once (no GET of the object's tail first)
    chunks: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)  # slots: a plan holds one per row group / task / file
class FileRef:
    """What a task needs to know about its file (small: shipped with every task)."""

    index: int
    path: str  # absolute
    display: str  # as the user wrote / discovered it, for messages
    fmt: str  # "parquet" | "ipc" (IPC file) | "ipc_stream"
    size: int
    mtime_ns: int
    partition: tuple[tuple[str, str | None], ...] = ()
    dev: int = 0
    ino: int = 0
    ctime_ns: int = 0
    footer: str = ""  # digest of the footer planned from (IPC stream: of all its message headers)
    store: Store | None = None  # an object in a store (path is then the store's path, display its URL)
    # Parquet: (footer offset in the file, footer length, end of its head, start of its tail, crc32 of
    # head and tail): a task reads the head, its row groups' entries and the tail, not the whole footer
    meta: tuple[int, int, int, int, int] = ()
    etag: str = ""  # an S3 object: the ETag planned from, which every read of a task is pinned to

    def identity(self) -> Identity:
        return Identity(self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns, self.etag)


@dataclass(frozen=True, slots=True)  # slots: a plan holds one per row group / task / file
class InputFile(FileRef):
    rows: int = 0
    units: tuple[Unit, ...] = ()  # one per row group / record batch, full

    def ref(self) -> FileRef:
        return FileRef(**{f.name: getattr(self, f.name) for f in fields(FileRef)})

    def to_dict(self) -> dict:
        return {
            "path": self.display if self.store is not None else self.path,
            "format": self.fmt,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "inode": self.ino,
            "ctime_ns": self.ctime_ns,
            "footer": self.footer,
            **({"etag": self.etag} if self.etag else {}),
            "rows": self.rows,
            "row_groups" if self.fmt == "parquet" else "record_batches": len(self.units),
        }


@dataclass(frozen=True, slots=True)  # slots: a plan holds one per row group / task / file
class Task:
    index: int
    file: FileRef
    units: tuple[Unit, ...]  # consecutive; Parquet units are whole row groups
    row_start: int  # row number of the task's first row inside the file
    rows: int
    nbytes: int
    # small files grouped into one task (one part): its one-file slices in input order, each a Task
    # of its own; then file, units and row_start are the first slice's, rows and nbytes the totals
    group: tuple["Task", ...] = ()

    def pieces(self) -> tuple["Task", ...]:
        """The one-file slices this task reads, in order (itself, unless it groups small files)."""
        return self.group or (self,)

    def fingerprint(self) -> dict:
        """What must be unchanged for a finished part to be reused by --resume.

        Size and mtime alone are not enough: `touch -r` / `os.utime` restore
        an mtime, but not the ctime (set by the kernel on every write), the
        inode of a replaced file, or its footer. A grouped task: every file's.
        """
        if self.group:
            return {"group": [t.fingerprint() for t in self.group]}
        return {
            "path": self.file.path,
            "size": self.file.size,
            "mtime_ns": self.file.mtime_ns,
            "inode": self.file.ino,
            "ctime_ns": self.file.ctime_ns,
            "footer": self.file.footer,
            **({"etag": self.file.etag} if self.file.etag else {}),
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
    # token data: each side's token ids (top-k rows); which positions of a sequence count
    p_ids: str | None = None
    q_ids: str | None = None
    mask: str | None = None
    lengths: str | None = None
    # diagonal Gaussians: p and q are the means, these the log-variances
    p_logvar: str | None = None
    q_logvar: str | None = None
    target: str | None = None  # the token id that came next (nll_p, nll_q, delta_p)
    # --group-by: the column whose values split the summary (a file column, or a hive partition key)
    group_by: str | None = None
    group_type: pa.DataType | None = None
    group_partition: bool = False

    def roles(self) -> list[tuple[str, str]]:
        """(role, column) of every column the kernels read: p, q, p_ids, q_ids, mask, lengths
        (or p_logvar, q_logvar)."""
        named = (("p", self.p), ("q", self.q), ("p_ids", self.p_ids), ("q_ids", self.q_ids),
                 ("mask", self.mask), ("lengths", self.lengths), ("p_logvar", self.p_logvar),
                 ("q_logvar", self.q_logvar), ("target", self.target))
        return [(role, name) for role, name in named if name is not None]

    def read(self) -> list[str]:
        """File columns a task reads, each once: p, q, mask, lengths, then the kept ones."""
        out: list[str] = []
        for c in (*(name for _, name in self.roles()), *self.keep):
            if c is not None and c not in self.partition_keep and c not in out:
                out.append(c)
        if self.group_by is not None and not self.group_partition and self.group_by not in out:
            out.append(self.group_by)
        return out


@dataclass
class Plan:
    files: Files  # columns; files[i] is an InputFile
    tasks: Tasks  # columns; tasks[i] is a Task, built when it is submitted
    columns: Columns
    batch_rows: np.ndarray  # per task: rows per read batch
    # every (p, q) pair of list value types among the files: what the kernel will be specialised for
    value_types: frozenset = frozenset()
    sequence: bool = False  # sequence rows (lists of lists): the output has m_mean, tokens, ...

    @property
    def rows(self) -> int:
        return int(self.files.rows.sum())

    @property
    def nbytes(self) -> int:
        return int(self.tasks.nbytes.sum())


# --------------------------------------------------------------------------
# Discovery


def _has_magic(pattern: str) -> bool:
    return glob.has_magic(pattern)


_SUMMARY_FILES = ("_metadata", "_common_metadata")  # a dataset's footers in one file: no data of their own
# What fastkl writes beside a DEST (DEST.fastkl-staging, DEST.fastkl-old, DEST.fastkl-lock and their
# temporaries): never input, whatever the way SOURCE names it.
_FASTKL_NAME = re.compile(r"\.fastkl-[a-z]+(\.[^" + re.escape(os.sep) + r"]*)?$")
_MANIFEST = "_fastkl.json"


def shown(path: str) -> str:
    """A path as a message names it: as given, or escaped like repr() if it holds a newline
    or another unprintable character (an undecodable byte too), so every message stays one line."""
    return path if path.isprintable() else repr(path)


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _unreadable(display: str, e: OSError) -> DataError:
    return DataError(f"{display}: cannot read it ({_why(e)})")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "an unknown kind of file"


def _refuse_special(display: str, mode: int) -> DataError:
    """Reading a FIFO blocks until a writer comes, a device may never end: refuse them unopened."""
    return DataError(f"{display}: {_kind(mode)}, not a regular file: refused without opening it")


def _stat(path: str) -> os.stat_result:
    """stat() following links; an error names the path (a dangling link says so)."""
    try:
        return os.stat(path)
    except OSError as e:
        if os.path.islink(path) and isinstance(e, FileNotFoundError):
            raise DataError(f"{shown(path)}: a symbolic link to nothing ({os.readlink(path)!r})") from None
        raise _unreadable(shown(path), e) from None


def _sniff(path: str, display: str) -> str | None:
    """The format of a regular file: by its extension, else by its first bytes.

    Opened non-blocking and checked again through the descriptor, so a file
    replaced by a FIFO since it was listed cannot hang discovery; an error
    reading it is an error naming it (a file nobody can read is not a stray).
    """
    low = path.lower()
    if low.endswith(PARQUET_EXT):
        return "parquet"
    if low.endswith(IPC_EXT):
        return _ipc_kind(path) or "ipc"  # not IPC at all: the reader says so, naming the file
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _unreadable(display, e) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse_special(display, mode)
        head = os.read(fd, 6)
    except OSError as e:
        raise _unreadable(display, e) from None
    finally:
        os.close(fd)
    if head[:4] == b"PAR1":
        return "parquet"
    return _ipc_kind(path)


def _ipc_kind(path: str) -> str | None:
    """'ipc' (an IPC file: ARROW1 magic), 'ipc_stream' (no magic: a Schema message first) or None.

    Streams are what `pa.ipc.new_stream` and Hugging Face datasets' cache
    files (named .arrow) are.
    """
    try:
        with open(path, "rb") as f:
            return sniff_ipc(f)
    except OSError:
        return None


def _is_fastkl_output(d: str) -> bool:
    """A fastkl output, staging or old-output directory: never input (it has no list columns)."""
    return _FASTKL_NAME.search(os.path.basename(d)) is not None or os.path.exists(os.path.join(d, _MANIFEST))


def _skipped_name(name: str, asked: str = "") -> bool:
    """Hidden and underscore names (_SUCCESS, _temporary/, .crc ...) unless the glob
    component `asked` starts with that character too, and fastkl's own names always."""
    if _FASTKL_NAME.search(name):
        return True
    return name.startswith(_IGNORE_PREFIXES) and not asked.startswith(name[0])


def _listing(d: str) -> list[os.DirEntry]:
    """A directory's entries by name; a directory that cannot be read is an error, not empty."""
    try:
        with os.scandir(d or os.curdir) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{shown(d or os.curdir)}: cannot read the directory ({_why(e)})") from None


def _entry_mode(e: os.DirEntry, path: str) -> int:
    """File type of an entry, links followed; stat() only when the listing does not say."""
    if e.is_file():
        return stat.S_IFREG
    if e.is_dir():
        return stat.S_IFDIR
    return _stat(path).st_mode  # a FIFO, a socket, a device, or a dangling link (an error)


def _walk(root: str, on_link=lambda path: None) -> Iterator[tuple[str, int]]:
    """(path, file type) of the files under a directory, in sorted order, skipping
    hidden/underscore entries and fastkl outputs (the rules of pyarrow.dataset, plus ours).

    Files of a directory come before its subdirectories, depth first (os.walk's
    order). Symlinked directories are followed, as pyarrow.dataset does; a directory
    whose real path was already walked (a cycle of links, or two links to one
    place) is walked once. `on_link` hears of every followed link.
    """
    visited: set[str] = set()
    stack = [(root, False)]
    while stack:
        d, linked = stack.pop()
        real = os.path.realpath(d)
        if real in visited:
            continue
        visited.add(real)
        if linked:
            on_link(d)
        subdirs = []
        for e in _listing(d):
            if _skipped_name(e.name):
                continue
            path = os.path.join(d, e.name)
            mode = _entry_mode(e, path)
            if not stat.S_ISDIR(mode):
                yield path, mode
            elif not _is_fastkl_output(path):
                subdirs.append((path, e.is_symlink()))
        stack.extend(reversed(subdirs))


def _glob(pattern: str) -> list[str]:
    """Paths matching a glob (`**` spans directories), under the rules of the directory walk.

    Python's glob skips only dot names, lists fastkl outputs and swallows
    unreadable directories; here every component below the fixed prefix is
    held to `_walk`'s rules (an `_` or `.` name only where the pattern's own
    component asks for it), unreadable directories are errors and `**` does
    not loop through a cycle of links. Sorted, like sorted(glob.glob(...)).
    """
    parts = pattern.split(os.sep)
    fixed = 0
    while fixed < len(parts) and not _has_magic(parts[fixed]):
        fixed += 1
    base = os.sep.join(parts[:fixed]) or (os.sep if fixed else "")
    rest = [c for c in parts[fixed:] if c]
    dirs_only = parts[-1] == ""
    try:
        if not stat.S_ISDIR(os.stat(base or os.curdir).st_mode):
            return []
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise _unreadable(shown(base), e) from None
    out: set[str] = set()

    def matched(path: str, mode: int, last: bool) -> bool:
        """Record `path` if it matches the last component; True if the pattern goes on inside it."""
        if stat.S_ISDIR(mode) and _is_fastkl_output(path):
            return False
        if last and not (dirs_only and not stat.S_ISDIR(mode)) and os.path.basename(path) not in _SUMMARY_FILES:
            out.add(path)
        return not last and stat.S_ISDIR(mode)

    def expand(d: str, k: int, chain: frozenset[str]) -> None:
        if k == len(rest):
            out.add(d or os.curdir)
            return
        comp, last = rest[k], k == len(rest) - 1
        if comp == "**" and last:  # d and all below it: what walking d reads
            out.add(d or os.curdir)
        elif comp == "**":
            expand(d, k + 1, chain)  # zero directories
            for e in _listing(d):
                path = os.path.join(d, e.name)
                if _skipped_name(e.name) or not e.is_dir() or _is_fastkl_output(path):
                    continue
                real = os.path.realpath(path)
                if real not in chain:
                    expand(path, k, chain | {real})
        elif not _has_magic(comp):
            path = os.path.join(d, comp)
            try:
                mode = os.stat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return
            except OSError as e:
                raise _unreadable(shown(path), e) from None
            if not _FASTKL_NAME.search(comp) and matched(path, mode, last):
                expand(path, k + 1, chain)
        else:
            for e in _listing(d):
                if fnmatch.fnmatchcase(e.name, comp) and not _skipped_name(e.name, comp):
                    path = os.path.join(d, e.name)
                    if matched(path, _entry_mode(e, path), last):
                        expand(path, k + 1, chain)

    expand(base, 0, frozenset({os.path.realpath(base or os.curdir)}))
    return sorted(out)


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
    store: Store | None = None


def _stat_source(s: str) -> os.stat_result | None:
    """stat() of a SOURCE argument; None if nothing is there (it may be a glob)."""
    try:
        return os.stat(s)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(s):
            raise DataError(f"SOURCE {s!r} is a symbolic link to nothing ({os.readlink(s)!r})") from None
        return None
    except OSError as e:
        raise DataError(f"SOURCE {s!r}: cannot read it ({_why(e)})") from None


def dataset_sources(source, storage_options: dict | None = None) -> tuple[object, dict | None]:
    """(SOURCE, storage_options) of a `pyarrow.dataset.Dataset` given as SOURCE: its files, in
    its order, as local paths or store URLs of its filesystem (the filesystem's own options, an
    S3 endpoint and keys included, become storage_options). Anything else is returned unchanged.

    The files are read by fastkl's rules, as if listed one by one: a hive partition key of the
    dataset is not a column (give the dataset's directory as SOURCE to keep one). Local files
    inside an earlier fastkl output, which pyarrow lists, are left out.
    """
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    if not isinstance(source, pads.Dataset):
        return source, storage_options
    if not isinstance(source, pads.FileSystemDataset):
        raise OptionError(f"SOURCE: a pyarrow {type(source).__name__} has no files; write it to Parquet first "
                          "(pyarrow.dataset.write_dataset) or pass its data to fastkl.divergences")
    fs, files = source.filesystem, list(source.files)
    if not files:
        raise OptionError("SOURCE: the dataset holds no file")
    base = ""
    if isinstance(fs, pafs.SubTreeFileSystem):
        fs, base = fs.base_fs, fs.base_path
    if isinstance(fs, pafs.LocalFileSystem):
        files = [os.path.join(base, f) if base else f for f in files]
        root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
        files = [f for f in files if not _in_fastkl_output(os.path.abspath(f), root)]  # pyarrow lists them
        if not files:
            raise OptionError("SOURCE: the dataset holds no file besides earlier fastkl outputs")
        return files, storage_options
    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, pafs.FSSpecHandler):
        protocol, options = fs.handler.fs.protocol, dict(fs.handler.fs.storage_options)
        protocol = protocol if isinstance(protocol, str) else protocol[0]
    elif fs.type_name in ("s3", "gcs"):
        protocol = "s3" if fs.type_name == "s3" else "gs"
        options = {k: v for k, v in fs.__reduce__()[1][0].items()  # the constructor's arguments
                   if v not in ("", None, -1) and not (isinstance(v, dict) and not any(x not in ("", -1)
                                                                                       for x in v.values()))}
    else:
        raise OptionError(f"SOURCE: a dataset on a {fs.type_name} filesystem; give its files' URL instead")
    if storage_options:
        raise OptionError("storage_options: a dataset given as SOURCE brings its filesystem's options; "
                          "give one or the other")
    return [f"{protocol}://{posixpath.join(base, f).lstrip('/')}" for f in files], options


def _in_fastkl_output(path: str, root: str) -> bool:
    """A file inside a fastkl output (or staging) directory at or below `root`."""
    d = os.path.dirname(path)
    while True:
        if _is_fastkl_output(d):
            return True
        if d == root or os.path.dirname(d) == d:
            return False
        d = os.path.dirname(d)


def discover(sources: str | os.PathLike | Sequence[str | os.PathLike],
             storage_options: dict | None = None) -> tuple[list[_Found], list[str]]:
    """Expand SOURCE arguments into data files (sorted within each argument).

    Returns the files and the "roots" (directories or files) the job reads,
    which the output checks against DEST: every argument, every glob match and
    every symlinked directory followed. A file reached twice (the same argument
    twice, links) is read once. Files, directories and globs follow the same
    rules: see `_walk` and `_glob`.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [os.fspath(s) for s in sources]
    if not sources:
        raise OptionError("no SOURCE given")
    found: list[_Found] = []
    roots: list[str] = []
    seen: set[str] = set()

    def add(path: str, mode: int, partition=(), explicit=False) -> bool:
        """Take a file if it is data; True if it is (read now or already)."""
        display = shown(path)
        if not stat.S_ISREG(mode):
            raise _refuse_special(display, mode)
        real = os.path.realpath(path)
        if real in seen:
            return True
        fmt = _sniff(path, display)
        if fmt is None:
            if explicit:
                raise DataError(f"{display}: not a Parquet or Arrow IPC file")
            return False  # stray file in a dataset directory (docs/guide/inputs.md)
        seen.add(real)
        found.append(_Found(os.path.abspath(path), display, fmt, partition))
        return True

    def add_dir(d: str) -> bool:
        data = False
        for path, mode in _walk(d, on_link=lambda link: roots.append(os.path.abspath(link))):
            data |= add(path, mode, _hive(os.path.relpath(os.path.dirname(path), d)))
        return data

    for s in sources:
        if is_store_url(s):
            _discover_store(s, storage_options, found, roots, seen)
            continue
        st = _stat_source(s)
        if st is None and not _has_magic(s):
            raise OptionError(f"SOURCE {s!r} does not exist")
        if st is None:
            matches = _glob(s)
            if not matches:
                raise OptionError(f"SOURCE {s!r} matches no file")
            data = False
            for m in matches:
                roots.append(os.path.abspath(m))
                mode = _stat(m).st_mode
                data |= add_dir(m) if stat.S_ISDIR(mode) else add(m, mode)
            if not data:
                raise OptionError(f"SOURCE {s!r} matches no Parquet or Arrow IPC file")
        elif stat.S_ISDIR(st.st_mode):
            roots.append(os.path.abspath(s))
            if not add_dir(s):
                raise OptionError(f"SOURCE {s!r} holds no Parquet or Arrow IPC file")
        else:
            roots.append(os.path.abspath(s))
            if os.path.basename(s) in _SUMMARY_FILES:
                raise OptionError(
                    f"{shown(s)} is a Parquet summary file (the footers of a dataset's files), not data: "
                    "give the dataset's directory as SOURCE"
                )
            add(s, st.st_mode, explicit=True)
    return found, roots


def _discover_store(url: str, storage_options: dict | None, found: list, roots: list, seen: set) -> None:
    """One SOURCE URL: a file, a prefix (walked) or a glob, under the rules of the local walk."""
    from . import store_discovery as sd

    store, path = resolve(url, storage_options)

    def add(p: str, partition=(), explicit=False) -> bool:
        key = store.url(p)
        if key in seen:
            return True
        fmt = sd.sniff(store, p, PARQUET_EXT, IPC_EXT, sniff_ipc)
        if fmt is None:
            if explicit:
                raise DataError(f"{key}: not a Parquet or Arrow IPC file")
            return False
        seen.add(key)
        found.append(_Found(p, key, fmt, partition, store))
        return True

    def add_dir(d: str, first=None) -> bool:
        data = False
        for p in sd.walk(store, d, first):
            data |= add(p, _hive(posixpath.relpath(posixpath.dirname(p), d)))
        return data

    # most SOURCE URLs are prefixes: list first, unless the name says it is a file or a glob
    named_file = path.lower().endswith(PARQUET_EXT + IPC_EXT) or _has_magic(path)
    first = None if named_file else sd.prefix_listing(store, path)
    kind = "dir" if first else sd.source_kind(store, path, url)
    if kind == "file":
        roots.append(store.url(path))
        if posixpath.basename(path) in _SUMMARY_FILES:
            raise OptionError(f"{url} is a Parquet summary file (the footers of a dataset's files), not data: "
                              "give the dataset's prefix as SOURCE")
        add(path, explicit=True)
    elif kind == "dir":
        roots.append(store.url(path))
        if not add_dir(path, first):
            raise OptionError(f"SOURCE {url!r} holds no Parquet or Arrow IPC file")
    else:
        matches = sd.expand_glob(store, path)
        if not matches:
            raise OptionError(f"SOURCE {url!r} matches no file")
        data = False
        for m in matches:
            roots.append(store.url(m))
            is_dir = sd.info(store, m).type == sd.pafs.FileType.Directory
            data |= add_dir(m) if is_dir else add(m)
        if not data:
            raise OptionError(f"SOURCE {url!r} matches no Parquet or Arrow IPC file")


# --------------------------------------------------------------------------
# Footers and schemas


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_float_list(t: pa.DataType) -> bool:
    """A list of floats (token rows) or a list of lists of floats (sequence rows); or of
    16-bit integers (bfloat16/float16 bits: the job checks that they are declared so, `p_dtype`)."""
    if not _is_list(t):
        return False
    t = t.value_type
    if _is_list(t):
        t = t.value_type
    return pa.types.is_floating(t) or _is_16bit_int(t)


def is_sequence_type(t: pa.DataType) -> bool:
    """Sequence rows: one list of values per position."""
    return _is_list(t) and _is_list(t.value_type)


def _element_type(t: pa.DataType) -> pa.DataType | None:
    """The values' type of a (nested) list type; None for a `null`-typed empty column."""
    while _is_list(t):
        t = t.value_type
    return None if pa.types.is_null(t) else t


# What each role's column must hold: (test of its type, what to say when it fails).
def _is_sampled_column(t: pa.DataType) -> bool:
    """A sampled token's log-prob per row (a float) or per position of a sequence (a list of floats)."""
    if _is_list(t):
        t = t.value_type
    return pa.types.is_floating(t)


_SAMPLED_TYPE = (_is_sampled_column, "a float per token or a list of floats per sequence (kind='sampled')")

_ROLE_TYPES = {
    "p": (_is_float_list, "a list of floats (or of lists of floats, for sequence rows)"),
    "q": (_is_float_list, "a list of floats (or of lists of floats, for sequence rows)"),
    "mask": (lambda t: _is_list(t) and (pa.types.is_boolean(t.value_type) or pa.types.is_integer(t.value_type)),
             "a list of booleans or integers (list<bool> or list<int8>)"),
    "lengths": (pa.types.is_integer, "an integer per sequence"),
    "target": (lambda t: pa.types.is_integer(t) or (_is_list(t) and pa.types.is_integer(t.value_type)),
               "an integer token id per row (or a list of them per sequence)"),
    "p_logvar": (lambda t: _is_list(t) and pa.types.is_floating(t.value_type), "a list of floats"),
    "q_logvar": (lambda t: _is_list(t) and pa.types.is_floating(t.value_type), "a list of floats"),
    "p_ids": (lambda t: _is_ids_list(t), "a list of integer token ids (or of lists, for sequence rows)"),
    "q_ids": (lambda t: _is_ids_list(t), "a list of integer token ids (or of lists, for sequence rows)"),
}


_SHAPED = ("p", "q", "p_ids", "q_ids")  # roles that are token rows or sequence rows alike


def _is_ids_list(t: pa.DataType) -> bool:
    """list<int> or list<list<int>> (float ids are read too: integral ones are ids, others bad rows)."""
    if not _is_list(t):
        return False
    t = t.value_type
    if _is_list(t):
        t = t.value_type
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_16bit_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) and t.bit_width == 16


# Decoded width of one value of a Parquet physical type (levels not counted).
_WIDTH = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8, "FIXED_LEN_BYTE_ARRAY": 8}


def _leaf_count(t: pa.DataType) -> int:
    """Parquet leaf columns that an Arrow field of type `t` is stored in."""
    if isinstance(t, pa.ExtensionType):
        t = t.storage_type
    if pa.types.is_struct(t):
        return sum(_leaf_count(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_map(t):
        return _leaf_count(t.key_type) + _leaf_count(t.item_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or (
        hasattr(pa.types, "is_list_view") and (pa.types.is_list_view(t) or pa.types.is_large_list_view(t))
    ):
        return _leaf_count(t.value_type)
    return 1


def _leaf_columns(md: pq.FileMetaData, names: list[str]) -> list[int]:
    """Indices of the Parquet leaf columns of the named top-level fields.

    Leaves are stored depth first in field order, so each top-level field owns
    the next `_leaf_count` of them. Not by splitting the dotted leaf paths: a
    column named `dist.p` and a struct `dist` with a child `p` have the same
    path, and the name would match no leaf (sized 0 bytes, its footer
    unchecked).
    """
    leaves: dict[str, list[int]] = {}
    j = 0
    for f in md.schema.to_arrow_schema():
        n = _leaf_count(f.type)
        leaves.setdefault(f.name, []).extend(range(j, j + n))
        j += n
    if j != md.num_columns:
        raise ValueError(f"its schema's fields make {j} leaf columns, but it declares {md.num_columns}")
    out = []
    for n in names:
        for j in leaves.get(n, []):
            path = md.schema.column(j).path
            if path != n and not path.startswith(n + "."):
                raise ValueError(f"leaf column {j} ({path}) is not under field {n!r}, which it belongs to")
            out.append(j)
    return out


_MAX_DECLARED = 1 << 48  # bytes or values of one column chunk: 256 TiB is no real file's


def _check_parquet_footer(md: pq.FileMetaData, names: list[str], file_size: int) -> list[int]:
    """Refuse a footer that contradicts itself or the file, before any page is read; the decoded
    bytes of the named columns per row group, from the same one pass.

    Decoded bytes: not just `total_uncompressed_size`, which is the size of
    the *encoded* pages; a dictionary- or RLE-encoded column chunk of a few
    hundred bytes can decode to gigabytes (one row of 10^8 equal floats). The
    number of values declared in the footer times the value width bounds what
    the reader materialises, so tasks and read batches are sized on that.

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
    sizes = []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        n = rg.num_rows
        if n < 0:
            raise ValueError(f"row group {g} declares {n} rows")
        total += n
        nbytes = 0
        for j in idx:
            c = rg.column(j)
            nbytes += max(c.total_uncompressed_size, c.num_values * _WIDTH.get(c.physical_type, 0))
            if c.num_values < n:
                where = f"row group {g}, column {c.path_in_schema}"
                raise ValueError(f"{where} declares {c.num_values} values for {n} rows")
            if c.total_compressed_size < 0 or c.total_uncompressed_size < 0:
                raise ValueError(f"row group {g}, column {c.path_in_schema} declares a negative size")
            if max(c.total_uncompressed_size, c.num_values) >= _MAX_DECLARED:  # sizes past 64-bit sums
                raise ValueError(f"row group {g}, column {c.path_in_schema} declares "
                                 f"{c.total_uncompressed_size} bytes for {c.num_values} values")
            if c.num_values == 0:
                continue  # an empty chunk may have no page at all
            starts = [c.data_page_offset]
            if c.has_dictionary_page and c.dictionary_page_offset:
                starts.append(c.dictionary_page_offset)
            start = min(starts)
            if start < 4 or start + c.total_compressed_size > data_end:
                raise ValueError(
                    f"row group {g}, column {c.path_in_schema} declares bytes "
                    f"{start}..{start + c.total_compressed_size} "
                    f"outside the data of the file (4..{data_end})"
                )
        sizes.append(nbytes)
    if total != md.num_rows:
        raise ValueError(f"the row groups hold {total} rows but the footer declares {md.num_rows}")
    return sizes


def _present(schema: pa.Schema, names: list[str]) -> list[str]:
    """The named columns that a file holds once (a duplicated one is refused by _check_columns)."""
    return [n for n in names if schema.names.count(n) == 1]


@dataclass(frozen=True)
class _Footer:
    """What planning learnt from one file, all through one open handle."""

    schema: pa.Schema
    units: list[tuple[int, int, int]]  # (rows, decoded bytes of the columns read, message offset)
    identity: Identity
    digest: str
    meta: tuple = ()  # Parquet: see FileRef.meta
    spans: list[tuple[int, int, int]] | None = None  # Parquet: see Unit.meta, per row group
    chunks: list[list[tuple[int, int]]] | None = None  # Parquet on S3: see Unit.chunks, per row group
    slow_half: tuple[str, ...] = ()  # Parquet: columns read whose float16 values are dictionary-encoded


def open_input(path: str, store: Store | None) -> tuple[pa.NativeFile, Callable[[], Identity]]:
    """A read handle on a file or object, and how to get its identity now.

    Local: a regular file handle (never a memory map: see filemeta), fstat of
    its descriptor. Store: a random-access object (range GETs of only what is
    read), its size and mtime from the store (a store has no descriptor to ask);
    on S3 one version of it, that every read is pinned to (`store_reads`), found
    by the GET of its tail that holds the footer (no HEAD).
    """
    if store is None:
        src = pa.OSFile(path)
        return src, lambda: Identity.of(src.fileno())
    if pins(store):
        pinned = open_pinned(store, path)
        return pinned, pinned.identity
    fs = store.fs
    first = [Identity.of_object(fs.get_file_info(path))]  # before opening: the handle's size must be it
    src = fs.open_input_file(path)
    if src.size() != first[0].size:
        src.close()
        raise OSError(f"size {first[0].size} -> {src.size()} bytes while opening it")

    def ident() -> Identity:  # the first answer is the one just read (one request fewer per file)
        return first.pop() if first else Identity.of_object(fs.get_file_info(path))

    return src, ident


def _read_footers(found: list[_Found], names: list[str], fetched: Sequence[str] = ()) -> Iterator[_Footer]:
    """Every file's footer, in order: objects in a store by 16 threads (each read waits on a round trip),
    local files in this thread. Local reads gain nothing from threads (the parsing holds the
    GIL: 10^4 small files took 5.3 s with 16 threads, 3.2 s in one), and pyarrow's metadata
    parsed in pool threads left ~10 KB per file in glibc's per-thread arenas (+110 MB peak
    RSS at 10^4 files). `names`, `fetched`: see `_read_footer`."""
    if all(f.store is None for f in found):
        yield from (_read_footer(f, names, fetched) for f in found)
        return
    with ThreadPoolExecutor(max_workers=min(16, len(found))) as ex:
        yield from ex.map(lambda f: _read_footer(f, names, fetched), found)


def _read_footer(f: _Found, names: list[str], fetched: Sequence[str] = ()) -> _Footer:
    """What planning learns from one file: `names` are the columns it is sized on, `fetched` the
    ones a task reads (their chunks' byte ranges are kept for pinned S3 objects)."""
    what = {"parquet": "Parquet file", "ipc": "Arrow IPC file", "ipc_stream": "Arrow IPC stream"}[f.fmt]
    try:
        src, identity = open_input(f.path, f.store)
        with src:
            ident = identity()
            read = {"parquet": _plan_parquet, "ipc": _plan_ipc_file, "ipc_stream": _plan_ipc_stream}[f.fmt]
            schema, units, footer, *where = read(f, src, ident.size, names, *((fetched,) if f.fmt == "parquet" else ()))
            changed = ident.differences(identity())
    except DataError:
        raise
    except (pa.ArrowException, OSError, ValueError, struct.error) as e:
        raise DataError(f"{f.display}: not a readable {what} ({_short(e)})") from e
    if changed:
        raise DataError(f"{f.display}: changed while the job read its footer ({changed})")
    return _Footer(schema, units, ident, footer, *where)


def _warn_dictionary_float16(found: list[tuple[str, tuple[str, ...]]], n_files: int) -> None:
    display, names = found[0]
    more = f" (and {len(found) - 1} more of the {n_files} files)" if len(found) > 1 else ""
    warnings.warn(FastKLWarning(
        f"{display}{more}: {'columns' if len(names) > 1 else 'column'} {', '.join(names)} "
        f"{'store' if len(names) > 1 else 'stores'} float16 values dictionary-encoded, pyarrow's "
        "default for 16-bit values, which reads 3-6x slower than plain; write them with "
        "pyarrow.parquet.write_table(..., use_dictionary=False) (see 'Writing tables that read fast' in the docs)"
    ), stacklevel=3)


def _plan_parquet(f: _Found, src: pa.NativeFile, size: int, names: list[str], fetched: Sequence[str] = ()):
    footer = parquet_footer(src, size)
    md = pq.read_metadata(src)
    schema = md.schema.to_arrow_schema()
    present = _present(schema, names)
    try:
        check_footer(f.path, md, size, footer)  # before pyarrow builds any column chunk's metadata
        sizes = _check_parquet_footer(md, present, size)
    except ValueError as e:
        raise DataError(f"{f.display}: corrupt Parquet footer: {e}") from None
    units = [(md.row_group(g).num_rows, sizes[g], 0) for g in range(md.num_row_groups)]
    pinned = pins(f.store)  # a pinned S3 object of one row group too: its task then needs no tail GET
    meta, spans = _footer_spans(footer, md.num_row_groups, size, single=pinned)
    chunks = None
    if spans and pinned:  # a task of it can then skip the GET of its tail (see fastkl.jobs.run)
        got = [c for c in fetched if c in schema.names]
        chunks = [chunk_ranges(md, [g], got) for g in range(md.num_row_groups)]
    half = [n for n in present if _element_type(schema.field(n).type) == pa.float16()]  # most files: none
    return schema, units, digest(footer), meta, spans, chunks, _dictionary_float16(md, half) if half else ()


def _dictionary_float16(md: pq.FileMetaData, names: list[str]) -> tuple[str, ...]:
    """The named (float16) columns whose values the first row group stores dictionary-encoded:
    pyarrow's default for 16-bit values, and several times slower to decode than plain
    (docs/guide/writing-tables.md)."""
    if md.num_row_groups == 0:
        return ()
    rg, out = md.row_group(0), []
    for name in names:
        for j in _leaf_columns(md, [name]):
            c = rg.column(j)
            if (c.physical_type == "FIXED_LEN_BYTE_ARRAY" and c.has_dictionary_page
                    and str(md.schema.column(j).logical_type) == "Float16"):
                out.append(name)
                break
    return tuple(out)


def chunk_ranges(md: pq.FileMetaData, groups: Sequence[int], cols: Sequence[str]) -> list[tuple[int, int]]:
    """Byte ranges of the column chunks a Parquet read of `cols` in row groups `groups` reads."""
    out, leaves = [], _leaf_columns(md, list(cols))
    for g in groups:
        rg = md.row_group(g)
        for j in leaves:
            c = rg.column(j)
            start = c.data_page_offset
            if c.has_dictionary_page and c.dictionary_page_offset and c.dictionary_page_offset < start:
                start = c.dictionary_page_offset
            out.append((start, start + c.total_compressed_size))
    return out


def _footer_spans(footer: bytes, n_row_groups: int, size: int, single: bool = False):
    """Where the footer's head, each row group's entry and its tail lie (FileRef.meta, Unit.meta),
    with their crc32: what lets a task check and parse only its own part of the footer. Only
    for footers of more than one row group (else the whole footer is that part), or `single`
    (a footer of one row group: then a task knows where its footer lies without asking)."""
    found = row_group_spans(footer, n_row_groups) if n_row_groups > 1 or (single and n_row_groups == 1) else None
    if found is None:
        return (), None
    head, first, ends, tail = found
    n = len(footer) - 8
    starts = [first, *ends[:-1].tolist()]
    spans = [(a, b, zlib.crc32(footer[a:b])) for a, b in zip(starts, ends.tolist())]
    meta = (size - 8 - n, n, head, tail, zlib.crc32(footer[tail:n], zlib.crc32(footer[:head])))
    return meta, spans


def _plan_ipc_file(f: _Found, src: pa.NativeFile, size: int, names: list[str]):
    """Rows and sizes of every record batch from its message header (a few hundred bytes each)."""
    footer = ipc_file_footer(src, size)
    reader = pa.ipc.open_file(src)
    schema = reader.schema
    present = _present(schema, names)
    blocks = ipc_file_blocks(footer)
    if len(blocks) != reader.num_record_batches:
        raise ValueError(f"footer lists {len(blocks)} record batches, pyarrow reads {reader.num_record_batches}")
    units = []
    for i, block in enumerate(blocks):
        msg = ipc_file_batch(src, block, size)
        check_batch_length(schema, msg)
        nbytes = field_bytes(schema, present, msg)
        if nbytes is None:  # a layout the header reader does not know: read the columns once
            nbytes = _read_bytes(src, schema, present, i)
        units.append((msg.rows, nbytes, block[0]))
    return schema, units, digest(footer)


def _read_bytes(src: pa.NativeFile, schema: pa.Schema, present: list[str], i: int) -> int:
    if not present:
        return 0
    idx = sorted(schema.get_field_index(n) for n in present)
    reader = pa.ipc.open_file(src, options=pa.ipc.IpcReadOptions(included_fields=idx))
    return reader.get_batch(i).nbytes


def _plan_ipc_stream(f: _Found, src: pa.NativeFile, size: int, names: list[str]):
    """An IPC stream has no footer: walk its message headers once (skipping the bodies).

    The digest covers every header (the schema, the dictionaries, every
    batch's lengths and buffer layout): the stream's equivalent of a footer.
    """
    schema = pa.ipc.open_stream(src).schema
    present = _present(schema, names)
    h = hashlib.blake2b(digest_size=16)
    units = []
    for pos, msg in stream_messages(src, size):
        h.update(msg.metadata)
        if msg.kind == RECORD_BATCH:
            check_batch_length(schema, msg)
            nbytes = field_bytes(schema, present, msg)
            if nbytes is None:  # unknown layout: estimate from the body
                nbytes = msg.body
            units.append((msg.rows, nbytes, pos))
    return schema, units, h.hexdigest()


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

    The kernel reads float32 and float64 as they are and decodes 16-bit
    sides (float16, bfloat16 bits) row by row; only beside a float64 side is
    a narrower side converted to float64, a copy beside the values read, so
    a batch holds 1 + 8 / stored width bytes per stored byte (5 for float16)
    instead of 1.
    """
    # getattr: an empty shard's column may be typed plain `null` (no values at all)
    types = [_element_type(schema.field(c).type) for c in names if c in schema.names]
    floats = [t for t in types if t is not None and (pa.types.is_floating(t) or _is_16bit_int(t))]
    if not any(pa.types.is_float64(t) for t in floats):
        return 1.0
    narrow = min(t.bit_width // 8 for t in floats)
    return 1.0 if narrow >= 8 else 1.0 + 8 / narrow


def _null_typed(t: pa.DataType) -> bool:
    """`null` or a list of `null`: the type an empty pandas frame writes for a column of objects."""
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
    return pa.types.is_null(t)


def _check_duplicates(f: _Found, s: pa.Schema, names: Iterable[str | None]) -> None:
    """A column read by name must be there once: which of two `id` columns would be meant?"""
    for name in dict.fromkeys(n for n in names if n is not None):
        n = s.names.count(name)
        if n > 1:
            raise DataError(f"{f.display}: column {name!r} appears {n} times; column names must be unique")


def _group_kind(t: pa.DataType) -> str | None:
    """What values a group-by column holds: "str", "int" or "bool" (dictionaries: their values'), or None."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t):
        return "str"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_boolean(t):
        return "bool"
    return None


def group_type_ok(t: pa.DataType, empty: bool = False) -> bool:
    """A type --group-by accepts (an empty file's column may be typed null)."""
    return _group_kind(t) is not None or (empty and pa.types.is_null(t))


def _check_columns(
    found: list[_Found], schemas: list[pa.Schema], cols: Columns, rows: Sequence[int] | None = None,
    sampled: bool = False,
) -> None:
    """Unknown column in the reference file: usage error. Differing files: data error.

    The reference is the first file with rows (the first file if none has):
    an empty shard whose columns are typed `null` / `list<null>` (as empty
    pandas frames write) has nothing to read, so it is accepted with any of
    them null-typed; it contributes no row and no type.
    """
    rows = list(rows) if rows is not None else [1] * len(found)
    ref = next((i for i, r in enumerate(rows) if r > 0), 0)
    ptypes = _partition_types(found)
    first, s0 = found[ref], schemas[ref]
    roles = cols.roles()
    named = dict(roles)
    _check_duplicates(first, s0, (*(n for _, n in roles), *cols.keep))

    def unknown(name: str, role: str) -> OptionError:
        names = ", ".join(s0.names)
        return OptionError(f"unknown {role} column {name!r} in {first.display} (columns: {names})")

    role_types = {**_ROLE_TYPES, **({"p": _SAMPLED_TYPE, "q": _SAMPLED_TYPE} if sampled else {})}
    shape_of = _is_list if sampled else is_sequence_type

    def usable(role: str, t: pa.DataType, empty: bool) -> bool:
        return role_types[role][0](t) or (empty and _null_typed(t))

    for role, name in roles:
        if name not in s0.names:
            raise unknown(name, role)
        t = s0.field(name).type
        if not usable(role, t, rows[ref] == 0):
            raise OptionError(
                f"column {name!r} ({role}) in {first.display} has type {t}; expected {role_types[role][1]}"
            )
    shapes = {role: shape_of(s0.field(name).type) for role, name in roles if role in _SHAPED}
    if len(set(shapes.values())) > 1:
        kinds = ", ".join(f"{role} ({named[role]!r}) {s0.field(named[role]).type}" for role in shapes)
        raise OptionError(f"{first.display}: the values and ids columns must all be sequence rows (lists of "
                          f"lists) or all token rows; got {kinds}")
    if (cols.mask or cols.lengths) and not shapes.get("p"):
        raise OptionError(f"--mask and --lengths are for sequence rows (lists of lists); column {cols.p!r} "
                          f"in {first.display} has type {s0.field(cols.p).type}")
    for name in cols.keep:
        if name in s0.names:
            cols.keep_types[name] = s0.field(name).type
        elif name in ptypes and all(name in dict(f.partition) for f in found):
            cols.partition_keep[name] = ptypes[name]
            cols.keep_types[name] = ptypes[name]
        else:
            raise unknown(name, "keep")
    g = cols.group_by
    if g is not None:
        if g in s0.names:
            _check_duplicates(first, s0, (g,))
            cols.group_type = s0.field(g).type
        elif g in ptypes and all(g in dict(f.partition) for f in found):
            cols.group_type, cols.group_partition = ptypes[g], True
        else:
            raise unknown(g, "group-by")
        if not group_type_ok(cols.group_type, rows[ref] == 0):
            raise OptionError(f"group-by column {g!r} in {first.display} has type {cols.group_type}; expected "
                              "a string, integer, boolean or dictionary column (a low-cardinality one)")
    for i, (f, s) in enumerate(zip(found, schemas)):
        if i == ref:
            continue
        empty = rows[i] == 0
        _check_duplicates(f, s, (*(n for _, n in roles), *cols.keep))
        for role, name in roles:
            if name not in s.names:
                raise DataError(f"{f.display}: no column {name!r} ({role}), unlike {first.display}")
            t = s.field(name).type
            if not usable(role, t, empty):
                raise DataError(
                    f"{f.display}: column {name!r} ({role}) has type {t}; expected {role_types[role][1]}"
                )
            if role in _SHAPED and not (empty and _null_typed(t)) and shape_of(t) != shapes[role]:
                raise DataError(f"{f.display}: column {name!r} ({role}) has type {t}, but "
                                f"{s0.field(name).type} in {first.display}")
        if g is not None and not cols.group_partition:
            if g not in s.names:
                raise DataError(f"{f.display}: no column {g!r} (group-by), unlike {first.display}")
            _check_duplicates(f, s, (g,))
            t = s.field(g).type
            if not (empty and pa.types.is_null(t)) and _group_kind(t) != _group_kind(cols.group_type):
                raise DataError(f"{f.display}: group-by column {g!r} has type {t}, "
                                f"but {cols.group_type} in {first.display}")
        for name in cols.keep:
            if name in cols.partition_keep:
                continue
            if name not in s.names:
                raise DataError(f"{f.display}: no column {name!r} (keep), unlike {first.display}")
            t = s.field(name).type
            if t != cols.keep_types[name] and not (empty and pa.types.is_null(t)):
                raise DataError(
                    f"{f.display}: column {name!r} has type {t}, "
                    f"but {cols.keep_types[name]} in {first.display}"
                )


def cut_tasks(files: Files, task_rows: int | None, task_bytes: int | None,
              batch_bytes: int = DEFAULT_BATCH_BYTES, group_files: int | None = None) -> Tasks:
    """The input cut into tasks (`fastkl.io.plan_columns.cut`): group_files at most this many small
    files per task; None: GROUP_FILES once there are GROUP_MIN_TASKS tasks, else 1. Each task's rows
    per read batch (what cut_tasks returned beside the tasks before the plan was columns; part of a
    part's state, so --resume redoes a part read in other batches) are `tasks.batch_rows`."""
    return cut(files, task_rows, task_bytes, batch_bytes, group_files, GROUP_MIN_TASKS, GROUP_FILES)


def scan(
    sources,
    *,
    p: str,
    q: str | None,
    keep: Sequence[str],
    mask: str | None = None,
    lengths: str | None = None,
    p_ids: str | None = None,
    q_ids: str | None = None,
    sampled: bool = False,
    logvars: tuple[str, str] | None = None,
    target: str | None = None,
    group_by: str | None = None,
    task_rows: int | None = None,
    task_bytes: int | None = DEFAULT_TASK_BYTES,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    check=None,
    storage_options: dict | None = None,
    group_files: int | None = None,
) -> tuple[Plan, list[str]]:
    """Discover, read footers, check columns and cut the input into tasks.

    group_files: at most this many small files share a task (1: a task per
    file); None: GROUP_FILES once there are GROUP_MIN_TASKS tasks, else 1.
    """
    if task_rows is not None and task_rows < 1:
        raise OptionError(f"task_rows must be >= 1, got {task_rows}")
    if task_bytes is not None and task_bytes < 1:
        raise OptionError(f"task_bytes must be >= 1, got {task_bytes}")
    if group_files is not None and group_files < 1:
        raise OptionError(f"group_files must be >= 1, got {group_files}")
    found, roots = discover(sources, storage_options)
    if check is not None:
        check(roots)  # e.g. DEST against SOURCE: before any file is opened
    cols = Columns(p=p, q=q, keep=tuple(keep), p_ids=p_ids, q_ids=q_ids, mask=mask, lengths=lengths,
                   p_logvar=logvars[0] if logvars else None, q_logvar=logvars[1] if logvars else None,
                   target=target, group_by=group_by)
    names = [c for c in (p, q) if c is not None]
    read = [c for _, c in cols.roles()]  # sized on all the columns a task reads (ids, masks too)
    # Each footer goes into the plan's columns as it is read: only its schema (one object
    # for all the files that share it) and row count are kept for the checks.
    files = Files()
    schemas: list[pa.Schema] = []
    distinct: dict[pa.Schema, tuple[pa.Schema, float]] = {}
    rows: list[int] = []
    slow_half: list[tuple[str, tuple[str, ...]]] = []  # (file, columns): float16 values dictionary-encoded
    for f, ft in zip(found, _read_footers(found, read, cols.read())):
        if ft.schema not in distinct:
            try:
                distinct[ft.schema] = (ft.schema, kernel_bytes_scale(ft.schema, names))
            except KeyError:  # a column named twice: _check_columns says so below
                distinct[ft.schema] = (ft.schema, 1.0)
        schema, scale = distinct[ft.schema]
        schemas.append(schema)
        rows.append(sum(u[0] for u in ft.units))
        if ft.slow_half:
            slow_half.append((f.display, ft.slow_half))
        units = [(r, int(b * scale), pos) for r, b, pos in ft.units]
        files.append(f.path, f.display, f.fmt, ft.identity, f.partition, f.store, ft.digest, ft.meta, units,
                     ft.spans, ft.chunks)
    _check_columns(found, schemas, cols, rows, sampled)
    if slow_half:
        _warn_dictionary_float16(slow_half, len(found))
    tasks = cut_tasks(files.freeze(), task_rows, task_bytes, batch_bytes, group_files)
    # the kernel dtypes the job will meet (warm-up), from files with rows: an empty shard may be typed null
    with_rows = {id(sc): sc for sc, n in zip(schemas, rows) if n > 0}.values()
    value_types = frozenset(tuple(_element_type(sc.field(c).type) for c in names) for sc in with_rows)
    ref = next((sc for sc, n in zip(schemas, rows) if n > 0), schemas[0] if schemas else None)
    shape_of = _is_list if sampled else is_sequence_type
    sequence = ref is not None and shape_of(ref.field(p).type)
    return Plan(files, tasks, cols, tasks.batch_rows, value_types, sequence), roots
