"""Reads of SOURCE objects on S3 pinned to the version the job planned from (docs/guide/storage.md).

An object replaced while a job runs must fail the job, never give a part
that mixes two versions. A local file is checked on its open descriptor; an
object has none, and a HEAD before and after the reads leaves a window (an
object replaced, read, then put back). So every GET of a task carries
`If-Match: <ETag planned>` (as Hadoop's S3A change detection does): S3
answers 412 to a read of any other version, and the task fails naming the
object with both ETags. The ETag is learnt at planning from the same GET
that fetches the footer (a suffix range: the last `TAIL` bytes, the object's
size and its ETag in one request), so pinning costs no request.

pyarrow's S3 filesystem cannot send If-Match, so these reads go through
boto3 (already used for the conditional writes), wrapped as a pyarrow
`PythonFile` that serves pyarrow's reads from ranges fetched in advance
(`prefetch`: coalesced, concurrent GETs of a task's footer and column
chunks) and reads anything else on demand through a small read-ahead.
"""

from __future__ import annotations

import bisect
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import pyarrow as pa

from .filemeta import Identity
from .store_conditional import _s3_client, _split
from .stores import Store

TAIL = 64 << 10  # bytes read from an object's end when it is opened: its footer, most often whole
READ_AHEAD = 1 << 20  # smallest on-demand GET (IPC message headers are read a few hundred bytes at a time)
GAP = 1 << 20  # prefetched ranges closer than this are fetched by one GET (one request costs ~1 MB of transfer)
PIECE = 16 << 20  # ranges are joined into one GET up to this size (more GETs run concurrently)
THREADS = 8  # concurrent GETs of one prefetch


class ObjectChanged(OSError):
    """The object is no longer the version planned (412 on If-Match, or it is gone)."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _etag(tag: str) -> str:
    return tag.strip('"')


class Pinned:
    """A raw, seekable, read-only file over one version of an S3 object (what PythonFile wraps)."""

    closed = False

    def __init__(self, store: Store, path: str, etag: str | None = None, planned: tuple[int, int] | None = None):
        self.store, self.path = store, path
        self.bucket, self.key = _split(path)
        self.etag = etag
        self.size = 0
        self.mtime_ns = 0
        self.changed = ""  # what made a read fail: the one-line reason
        self.pos = 0
        self._kept: list[tuple[int, bytes]] = []  # prefetched blocks, sorted by start (held until close)
        self._ahead: tuple[int, bytes] = (0, b"")  # the last on-demand block
        self._lock = threading.Lock()
        if planned is not None and etag:  # size and mtime as planned: the first GET, If-Match, checks them
            self.size, self.mtime_ns = planned
        else:
            self._open()

    # ------------------------------------------------------------------ requests

    def _get(self, start: int | None, end: int | None = None, suffix: int = 0):
        """One GET of [start, end) (or of the last `suffix` bytes), If-Match the pinned ETag."""
        from botocore.exceptions import BotoCoreError, ClientError

        rng = f"bytes=-{suffix}" if suffix else f"bytes={start}-{end - 1}"
        kw = {"IfMatch": self.etag} if self.etag else {}
        try:
            r = _s3_client(self.store.options).get_object(Bucket=self.bucket, Key=self.key, Range=rng, **kw)
            if self.etag and _etag(r.get("ETag") or "") != _etag(self.etag):  # a server ignoring If-Match
                self.changed = self.changed or f"ETag {_etag(self.etag)} -> {_etag(r.get('ETag') or '?')}"
                raise ObjectChanged(self.changed)
            return r, r["Body"].read()
        except BotoCoreError as e:
            raise OSError(f"{self.store.url(self.path)}: {e}") from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                raise self._lost() from None
            if code in ("NoSuchKey", "404") or status == 404:
                raise self._gone() from None
            if code == "InvalidRange" or status == 416:  # a suffix range of an empty object
                return None, b""
            raise OSError(f"{self.store.url(self.path)}: {code or status}: {e}") from None

    def _lost(self) -> ObjectChanged:
        """The 412 of a pinned read: ask which version is there now, for the message."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            now = _s3_client(self.store.options).head_object(Bucket=self.bucket, Key=self.key)["ETag"]
            what = f"ETag {_etag(self.etag or '')} -> {_etag(now)}"
        except (BotoCoreError, ClientError):
            what = f"ETag {_etag(self.etag or '')} -> another version"
        self.changed = self.changed or what
        return ObjectChanged(self.changed)

    def _gone(self) -> ObjectChanged:
        self.changed = self.changed or "removed"
        return ObjectChanged(self.changed)

    def _open(self) -> None:
        """The tail GET: size, ETag and mtime of the version read, and its last TAIL bytes kept."""
        r, data = self._get(None, suffix=TAIL)
        if r is None:  # empty object: a HEAD says which version
            from botocore.exceptions import ClientError

            try:
                r = _s3_client(self.store.options).head_object(Bucket=self.bucket, Key=self.key,
                                                               **({"IfMatch": self.etag} if self.etag else {}))
            except ClientError as e:
                raise (self._lost() if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412
                       else self._gone()) from None
            self.size = int(r["ContentLength"])
        else:
            total = (r.get("ContentRange") or "").rpartition("/")[2]
            self.size = int(total) if total.isdigit() else len(data)
        self.etag = self.etag or r["ETag"]
        self.mtime_ns = int(r["LastModified"].timestamp()) * 1_000_000_000
        self._kept.append((self.size - len(data), data))

    def prefetch(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Fetch byte ranges [a, b) now, coalesced and concurrently, and keep them until close."""
        pieces: list[list[int]] = []  # a range is never split: pyarrow reads a column chunk in one call
        for a, b in sorted((max(0, a), min(self.size, b)) for a, b in ranges):
            if b <= a or self._find(a, b - a) is not None:
                continue
            if pieces and a - pieces[-1][1] <= GAP and b - pieces[-1][0] <= PIECE:
                pieces[-1][1] = max(pieces[-1][1], b)
            else:
                pieces.append([a, b])
        if not pieces:
            return
        if len(pieces) == 1:
            got = [self._get(*pieces[0])[1]]
        else:
            with ThreadPoolExecutor(min(THREADS, len(pieces))) as ex:
                got = list(ex.map(lambda p: self._get(*p)[1], pieces))
        with self._lock:
            for (a, _), data in zip(pieces, got):
                bisect.insort(self._kept, (a, data), key=lambda kv: kv[0])

    # ------------------------------------------------------------------ the raw file protocol

    def _find(self, pos: int, n: int) -> memoryview | None:
        """The bytes [pos, pos + n) from a kept block, without a copy."""
        blocks = self._kept + [self._ahead]
        for start, data in blocks:
            if start <= pos and pos + n <= start + len(data):
                return memoryview(data)[pos - start:pos - start + n]
        return None

    def read(self, n: int = -1) -> memoryview | bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        with self._lock:
            out = self._find(self.pos, n)
        if out is None:
            end = min(self.size, self.pos + max(n, READ_AHEAD))
            data = self._get(self.pos, end)[1]
            if len(data) < n:
                raise OSError(f"{self.store.url(self.path)}: short read ({len(data)} of {n} bytes)")
            with self._lock:
                self._ahead = (self.pos, data)
            out = memoryview(data)[:n]
        self.pos += n
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self._kept, self._ahead = [], (0, b"")


class PinnedFile(pa.PythonFile):
    """A pyarrow file over a `Pinned` object; `.pinned` says its version and what failed."""

    pinned: Pinned

    def identity(self) -> Identity:
        """The identity of the version read (no inode or ctime on a store; the ETag stands for them)."""
        p = self.pinned
        return Identity(0, 0, p.size, p.mtime_ns, 0, _etag(p.etag or ""))


def open_pinned(store: Store, path: str, etag: str = "", planned: tuple[int, int] | None = None) -> PinnedFile:
    """Open one version of an S3 object: the planned `etag`, or (planning) whatever is there now,
    which every later read of this handle is pinned to. Raises ObjectChanged if that version is gone.
    `planned`: its size and mtime_ns as planned with that ETag: no request now (the tail is not
    fetched; the first read finds a version that is gone)."""
    p = Pinned(store, path, f'"{etag}"' if etag else None, planned)
    f = PinnedFile(p, mode="r")
    f.pinned = p
    return f


def pins(store: Store | None) -> bool:
    """Whether reads of this store are pinned to a version (S3: If-Match on every GET)."""
    return store is not None and store.is_s3
