"""Finished parts' states in a few append-only logs, not one file per part (docs/guide/scale.md).

A finished part's state (its input's fingerprint, rows, read batch size,
summary stats, and what identifies the part file) is what `--resume` needs
to reuse the part instead of redoing it. One JSON file per part meant 10^6
files at 10^6 parts, each written by its task and each opened again by
`--resume` and by the commit. Instead the client appends the states of the
results it receives to a log, in batches: one write and one fsync per batch
(`STATE_FLUSH_S`, `STATE_BATCH` in fastkl._config)::

    DEST.fastkl-staging/_state/states-000002.log          local: one log per attempt, appended
    DEST/_fastkl-staging/<job id>/states-000002-000017.log  store: one object per batch (no appends)

A record is one line: the crc32 of its JSON as 8 hex digits, a space, the
JSON, a newline. A reader stops at the first record that is incomplete or
whose crc differs (a kill tears at most the last write of a log), so nothing
half-written is trusted; a later attempt writes a log of its own, never
after a torn tail. Logs are read in name order and a later record of a part
replaces an earlier one. A state names the part file it vouches for (local:
size, inode, mtime; store: the uploaded attempt and its size), and a part
whose file is missing or differs is redone, as before.

The part is renamed into place (uploaded) by its task before the client
logs its state, so a logged state never names an unfinished part; a part
whose state was still waiting for its batch when the job was killed is
redone: at most the results of the last STATE_FLUSH_S seconds.

Memory: the client keeps a few numbers per part (columns) and, for parts
an earlier attempt finished, only where their stats are in the log: they
are read back when their turn in the ordered merge comes.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import time
import zlib
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np

from .._config import STATE_BATCH, STATE_FLUSH_S

_NAME = re.compile(r"^states-(\d{6})(?:-(\d{6}))?\.log$")


def encode(record: dict, stats_text: str | None = None) -> bytes:
    """One record as its line: crc32 of the JSON, a space, the JSON (C encoder, compact), a newline.
    stats_text: the record's "stats" already as JSON (encoded by the task, not by the client)."""
    body = json.dumps(record, separators=(",", ":"), allow_nan=True).encode()
    if stats_text is not None:
        body = b'%s,"stats":%s}' % (body[:-1], stats_text.encode())
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode_line(line: bytes) -> dict | None:
    """The record of one complete line, or None if it is torn or damaged."""
    if len(line) < 10 or not line.endswith(b"\n") or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        record = json.loads(body)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def decode(stream: IO[bytes]) -> Iterator[tuple[int, int, dict]]:
    """(offset, length, record) of every record of a log, up to the first torn or damaged one."""
    offset = 0
    for line in iter(stream.readline, b""):
        record = _decode_line(line)
        if record is None:
            return
        yield offset, len(line), record
        offset += len(line)


def _session(names: list[str]) -> int:
    """The number of the next attempt's log(s): one more than any there."""
    found = [int(m.group(1)) for m in map(_NAME.match, names) if m]
    return max(found, default=0) + 1


class LocalLogs:
    """The logs of a local staging directory's `_state/`: one per attempt, appended and fsync'd."""

    def __init__(self, state_dir: Path):
        self.dir = state_dir
        self._fd: int | None = None

    def __str__(self) -> str:
        return str(self.dir)

    def names(self) -> list[str]:
        out = []
        for e in os.scandir(self.dir):
            if _NAME.match(e.name) and e.is_file(follow_symlinks=False):
                out.append(e.name)
        return sorted(out)

    def open(self, name: str) -> IO[bytes]:
        fd = os.open(self.dir / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        return os.fdopen(fd, "rb")

    def write(self, data: bytes) -> None:
        """Append a batch to this attempt's log and make it durable."""
        if self._fd is None:
            name = f"states-{_session(self.names()):06d}.log"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
            self._fd = os.open(self.dir / name, flags, 0o644)  # a fresh file: never through a planted link
            _fsync_dir(self.dir)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except BaseException:  # a full disk: what follows goes to a new log, never after a torn tail
            self.close()
            raise

    def any(self) -> bool:
        return any((self.dir / n).stat().st_size > 0 for n in self.names())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreLogs:
    """The logs of a store staging prefix: a store has no append, so each batch is an object of its own
    (an upload is whole or absent). `cond` (fastkl.io.store_conditional): a batch is one PUT and a
    log read back one GET (on S3 through boto3; pyarrow's filesystem takes three requests to write a
    small object). `fresh`: nothing is staged under `root` (a new job id), so the first batch is
    numbered without listing the prefix."""

    def __init__(self, fs: Any, root: str, cond: Any = None, fresh: bool = False):
        self.fs, self.root, self.cond = fs, root, cond
        self._session: int | None = 1 if fresh else None
        self._batches = 0

    def __str__(self) -> str:
        return self.root

    def names(self) -> list[str]:
        import pyarrow.fs as pafs

        try:
            found = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except FileNotFoundError:
            return []
        names = sorted(n for n in (posixpath.basename(e.path) for e in found if e.type == pafs.FileType.File)
                       if _NAME.match(n))
        if self._session is None and not self._batches:  # this listing numbers the next batches too
            self._session = _session(names)
        return names

    def open(self, name: str) -> IO[bytes]:
        import io

        path = posixpath.join(self.root, name)
        if self.cond is not None:
            found = self.cond.read(path)
            if found is None:
                raise FileNotFoundError(path)
            return io.BytesIO(found.data)  # a batch object is small (STATE_BATCH records at most)
        with self.fs.open_input_stream(path) as f:
            return io.BytesIO(f.read())

    def write(self, data: bytes) -> None:
        if self._session is None:
            self._session = _session(self.names())
        self._batches += 1
        path = posixpath.join(self.root, f"states-{self._session:06d}-{self._batches:06d}.log")
        if self.cond is not None:
            self.cond.put(path, data)
            return
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def any(self) -> bool:
        return bool(self.names())

    def close(self) -> None:
        pass


class FinishedParts:
    """The states of a job's finished parts: those read back from the logs (--resume) and those of
    this attempt, logged in batches as results arrive. Columns, one row per part."""

    def __init__(self, logs: LocalLogs | StoreLogs, n_parts: int, job_id: str,
                 flush_s: float | None = None, most: int = STATE_BATCH):
        self.logs, self.n, self.job_id = logs, n_parts, job_id
        self.flush_s = STATE_FLUSH_S if flush_s is None else flush_s
        self.most = most
        self.done = np.zeros(n_parts, bool)
        self._cols: dict[str, np.ndarray] = {}
        self._where: np.ndarray | None = None  # (load) log number, offset, length of a read-back record
        self._names: list[str] = []
        self._reader: tuple[int, IO[bytes]] | None = None  # the log being read back (one: a store's is in memory)
        self._pending: list[bytes] = []
        self._last = time.monotonic()

    def _set(self, i: int, record: dict) -> None:
        for key, v in record.items():
            if key in ("stats", "index", "job_id"):
                continue
            col = self._cols.get(key)
            if isinstance(v, str):
                v = v.encode()
                if col is None or col.dtype.itemsize < len(v):  # as wide as the longest (a digest: 32)
                    col = self._cols[key] = (np.zeros(self.n, f"S{len(v)}") if col is None
                                             else col.astype(f"S{len(v)}"))
            elif isinstance(v, bool) or not isinstance(v, int):
                continue  # states hold ints and strings only: anything else is not ours
            elif col is None:
                col = self._cols[key] = np.zeros(self.n, np.int64)
            col[i] = v
        self.done[i] = True

    def record(self, i: int) -> dict | None:
        """Part i's state without its stats (what vouches for its file), or None if not finished."""
        if not self.done[i]:
            return None
        out: dict[str, Any] = {"index": i, "job_id": self.job_id}
        for key, col in self._cols.items():
            v = col[i]
            out[key] = v.decode() if isinstance(v, bytes) else int(v)
        return out

    def load(self, vouched: Callable[[dict], bool]) -> None:
        """Read every log of the staged attempt; keep the parts whose file `vouched(state)` confirms."""
        self._names = self.logs.names()
        self._where = np.full((self.n, 3), -1, np.int64)
        for k, name in enumerate(self._names):
            with self.logs.open(name) as stream:
                for offset, length, rec in decode(stream):
                    i = rec.get("index")
                    if (rec.get("job_id") == self.job_id and isinstance(i, int) and not isinstance(i, bool)
                            and 0 <= i < self.n and isinstance(rec.get("stats"), dict)):
                        self._set(i, rec)
                        self._where[i] = (k, offset, length)
        for i in np.flatnonzero(self.done).tolist():
            if not vouched(self.record(i)):
                self.done[i] = False

    def stats(self, i: int) -> dict:
        """The stats of a part read back by `load`, from its place in the log."""
        k, offset, length = self._where[i].tolist()
        if self._reader is None or self._reader[0] != k:  # parts come in order: logs change rarely
            self._close_reader()
            self._reader = (k, self.logs.open(self._names[k]))
        stream = self._reader[1]
        stream.seek(offset)
        rec = _decode_line(stream.read(length))
        if rec is None or rec.get("index") != i:
            raise OSError(f"the state of part {i} in {self._names[k]} changed while the job ran")
        return rec["stats"]

    def add(self, i: int, record: dict, stats_text: str | None = None) -> None:
        """Part i is finished (its file in place): log its state, with the next batch (its stats in
        `record` or, encoded by the task, in `stats_text`: encoded by the client, they cost it
        5.1 s instead of 4.0 s for 20,000 results of the planning-and-merge benchmark)."""
        self._set(i, record)
        if self._where is not None:
            self._where[i] = -1
        self._pending.append(encode({"index": i, "job_id": self.job_id, **record}, stats_text))
        if len(self._pending) >= self.most or time.monotonic() - self._last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Write and sync the waiting states (one write per batch)."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending = []  # (not written: those parts are redone by --resume)
            try:
                self.logs.write(data)
            except OSError as e:
                raise OSError(e.errno, f"cannot log finished parts' states in {self.logs}: "
                                       f"{e.strerror or e}") from e
        self._last = time.monotonic()

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader[1].close()
            self._reader = None

    def close(self) -> None:
        self._close_reader()
        self.logs.close()


def read_local(state_dir: str | os.PathLike) -> dict[int, dict]:
    """Every readable state in a local `_state/` directory, the last one of each part (tests, trials)."""
    logs = LocalLogs(Path(state_dir))
    out: dict[int, dict] = {}
    for name in logs.names():
        with logs.open(name) as stream:
            for _, _, rec in decode(stream):
                if isinstance(rec.get("index"), int):
                    out[rec["index"]] = rec
    return out
