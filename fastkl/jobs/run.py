"""`fastkl.run`: a Dask job from a sharded Parquet/Arrow dataset to a Parquet dataset (docs/guide/jobs.md).

The job is: scan (footers only) -> tasks defined by the input -> every task
reads its slice, runs the same `_engine.compute` as the in-memory API, writes
its own part into the staging directory and sends back only its row count and
its `PartStats` -> the client merges the stats in task order, writes the
manifest and commits (see `fastkl.io.output`).

Sharing the cores between Dask and the kernel
---------------------------------------------
Two levels could use the cores: Dask runs tasks concurrently, and
`compute(..., threads=k)` splits one batch's rows over k threads. Running
both at full width oversubscribes (cores x cores threads); running the kernel
serial when there are fewer tasks than cores idles cores. So each run sizes
both levels from the same core count C (CPU affinity of the process) and the
number T of tasks that actually have to run:

* threads scheduler (default): n = min(workers or C, T) Dask threads, each
  task calls the kernel with k = max(1, C // n). With many tasks, n = C and
  k = 1 (serial nogil kernel in every thread: no nested pools); a single task
  (one file, one row group) gets k = C. The kernel's helper pool is one
  process-wide pool of C threads, so even k > 1 in several tasks at once
  never runs more than C kernel threads.
* processes (a LocalCluster started by fastkl on 127.0.0.1): n = min(workers
  or C, T) worker processes of one thread each, and k = max(1, C // n).
* an existing cluster (address or `distributed.Client`): on each host, k =
  max(1, cores of the host // Dask threads of all workers on that host), so
  several worker processes on one machine split its cores between them.
* sync: one task at a time, k = C.

Reading and writing happen in the task threads too (pyarrow releases the GIL).
With k = 1 a core alternates between decoding a batch and running the kernel
on it, while the other cores do the same for other tasks, so reading and
computing overlap across tasks and no core waits on a second stage (a read-
ahead thread per task was measured slower here: more threads than cores). A
task that owns k > 1 cores (fewer tasks than cores) reads its next batch in a
helper thread while the kernel runs on the current one (`_prefetched`), so the
decode, which uses one thread per column, does not leave cores idle. Memory
per task stays bounded: at most three batches (being read, ready, being
computed) of at most DEFAULT_BATCH_BYTES each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import _config
from .._config import (BATCH_BYTES, BATCH_TASKS, DEFAULT_TASK_BYTES, FIRST_WORKER_TIMEOUT, MANIFEST_INLINE,
                       NO_WORKER_TIMEOUT, PREFETCH, READ_BUFFER, WINDOW_PER_THREAD)
from .._options import OnInvalid, Options, check_measures, check_request, documented, needs_q
from ..io.output import (
    MANIFEST,
    DestLock,
    Staging,
    _read_json,
    check_dest,
    check_side_file,
    dest_kind,
    is_regular_file,
    local_path,
    new_job_id,
    old_path,
    refuse_foreign_dest,
)
from ..errors import DataError, FastKLError, InvalidRowError, OptionError
from ..io.filemeta import Identity, big_endian, digest, ipc_file_footer, parquet_footer, read_at, read_rows
from ..io.stores import is_store_url, scheme_of
from ..io.store_output import (
    Probe,
    StoreClaim,
    StoreDest,
    StoreStaging,
    check_store_dest,
)
from ..io.store_output import dest_state as store_dest_state
from ..io.store_output import remove_leftovers as store_remove_leftovers
from ..io.store_output import state_ahead as store_state_ahead
from ..io.sources import Columns, FileRef, Plan, Task, chunk_ranges, dataset_sources, open_input, scan
from ..io.store_reads import ObjectChanged, PinnedFile, open_pinned, pins
from .._registry import Dtype, Kind, Tail
from .._result import Layout, layout_for, output_fields
from .groups import batch_groups
from .progress import Progress

LOCAL_SCHEDULERS = ("threads", "processes", "sync", "synchronous")


def _version() -> str:
    from .. import __version__

    return __version__


STORE_READ_BUFFER = 8 << 20  # bytes per range GET of a column chunk in an object store (large tasks)
STORE_PREBUFFER_MAX = 256 << 20  # decoded bytes of a task up to which its chunks are pre-buffered

# --------------------------------------------------------------------------
# One task (runs on a Dask worker thread or process)


@dataclass(frozen=True)
class JobSpec:
    """Everything a task needs besides its own slice; small and picklable."""

    measures: tuple[str, ...]
    options: Options
    columns: Columns
    out_schema: pa.Schema
    status: bool
    staging: Staging
    job_fp: str
    layout: Layout | None = None  # which columns compute gives (sequence rows: m_mean, tokens, ...)
    group_by: Any = None  # fastkl.summary.stats.GroupBy: per-group stats by the column columns.group_by


def _kernel_threads(setting: int | dict | None) -> int:
    if isinstance(setting, int):
        return setting
    try:
        from distributed import get_worker

        w = get_worker()
    except (ImportError, ValueError):
        return 1
    if isinstance(setting, dict) and w.address in setting:
        return setting[w.address]
    return max(1, _config.cores() // max(1, w.state.nthreads))


def _reporter(report: Callable | str | None, task: Task) -> Callable[[int], None]:
    if report is None:
        return lambda rows: None
    per_row = task.nbytes / task.rows if task.rows else 0.0
    if callable(report):
        return lambda rows: report(task.index, rows, int(rows * per_row), task.rows, task.nbytes)
    from distributed import get_worker

    worker = get_worker()
    return lambda rows: worker.log_event(report, (task.index, rows, task.rows, task.nbytes))


def _aligned_batch_rows(batch_rows: int, units: Sequence[Any]) -> int:
    """At most `batch_rows`, cut so that no read batch straddles two row groups.

    `iter_batches` stitches a batch that spans a row-group boundary out of
    both (an extra copy): a row group larger than the bound is split into
    equal batches, and equal row groups smaller than it are read whole, as
    many per batch as fit.
    """
    big = max((u.rows for u in units), default=0)
    if big <= 0:
        return batch_rows
    if big > batch_rows:
        parts = -(-big // batch_rows)
        return -(-big // parts)
    if all(u.rows == big for u in units):
        return big * (batch_rows // big)
    return batch_rows


def _open_planned(f: FileRef) -> pa.NativeFile:
    """Open the task's file and check, on the open handle, that it is the file the job planned from.

    Same device and inode (not replaced), size, mtime and ctime (not
    rewritten: `os.utime` can restore an mtime, not a ctime), same footer.
    Checked on `fstat` of the descriptor, so nothing can replace the file
    between this check and the reads, which all go through this handle.
    """
    return _open_task(f)[0]


def _open_task(f: FileRef, units: Sequence[Any] = (), prebuffer: bool = False,
               ) -> tuple[pa.NativeFile, pq.FileMetaData | None]:
    """`_open_planned`, and for a Parquet slice whose footer entries scan located, the
    metadata of just its row groups (row group k of it is units[k]), read from the file and
    checked against the planned bytes: a task reads and parses the footer's head and tail and
    its own row groups' entries, not the whole footer (which is O(row groups of the file)).

    A pinned S3 object whose units' column chunks planning located is opened without a request
    (no GET of its tail): its footer pieces and, with `prebuffer`, the chunks are fetched at once,
    in the same coalesced GETs, every one If-Match the planned ETag."""
    own = f.fmt == "parquet" and f.meta and units and all(u.meta for u in units)
    planned = bool(own and f.etag and all(u.chunks for u in units))
    try:
        src = _open_source(f, planned)
    except ObjectChanged as e:
        raise _changed_error(f, e.what) from None
    except FileNotFoundError:
        raise _changed_error(f, "removed") from None
    except OSError as e:
        raise DataError(f"{f.display}: cannot open it ({_short(e)})") from None
    md = None
    try:
        changed = f.identity().differences(_now(src, f))
        if not changed and own and isinstance(src, PinnedFile):
            # its footer pieces: one GET (most often none after a tail GET), with its chunks if planned
            chunks = [r for u in units for r in u.chunks] if planned and prebuffer else []
            src.pinned.prefetch(_footer_ranges(f, units) + chunks)
        if not changed and own:
            md, changed = _own_footer(src, f, units)
        elif not changed and f.fmt != "ipc_stream":  # a stream's digest covers all its headers: see fastkl.io.sources
            footer = parquet_footer(src, f.size) if f.fmt == "parquet" else ipc_file_footer(src, f.size)
            changed = "" if digest(footer) == f.footer else "footer differs"
    except (OSError, ValueError, pa.ArrowException) as e:
        changed = _pinned_change(src) or f"footer unreadable: {_short(e)}"
    except BaseException:
        src.close()
        raise
    if changed:
        src.close()
        raise _changed_error(f, changed)
    return src, md


def _open_source(f: FileRef, planned: bool = False) -> pa.NativeFile:
    """A read handle on the planned file: never a memory map (a truncated mapped file is a SIGBUS,
    not an error); on S3 the planned version only (every GET If-Match its ETag; `planned`: opened
    as planned, without a request); on other stores range reads of the object, checked by size and mtime."""
    if f.store is None:
        return pa.OSFile(f.path)
    if f.etag and pins(f.store):
        return open_pinned(f.store, f.path, f.etag, (f.size, f.mtime_ns) if planned else None)
    return open_input(f.path, f.store)[0]


def _footer_ranges(f: FileRef, units: Sequence[Any]) -> list[tuple[int, int]]:
    """The byte ranges `_own_footer` reads: the footer's head, the units' entries, its tail."""
    at, n, head, tail, _ = f.meta
    a, b = units[0].meta[0], units[-1].meta[1]
    return [(at, at + head), (at + a, at + b), (at + tail, f.size)]


def _pinned_change(src: pa.NativeFile) -> str:
    """What a pinned read found changed ('' for any other handle or failure)."""
    return src.pinned.changed if isinstance(src, PinnedFile) else ""


def _own_footer(src: pa.NativeFile, f: FileRef, units: Sequence[Any]) -> tuple[pq.FileMetaData | None, str]:
    """The FileMetaData of only `units` (consecutive row groups), built from the footer's head, their
    entries and the tail, each checked (crc32) against what planning read; or why it differs."""
    import struct
    import zlib

    from ..io.footer_checks import list_header

    at, n, head, tail, crc = f.meta
    if read_at(src, f.size - 8, 8) != struct.pack("<I", n) + b"PAR1":
        return None, "footer differs"
    a, b = units[0].meta[0], units[-1].meta[1]
    if a < head or b > tail or a > b:
        return None, "footer differs"
    h, body, t = read_at(src, at, head), read_at(src, at + a, b - a), read_at(src, at + tail, n - tail)
    if zlib.crc32(t, zlib.crc32(h)) != crc:
        return None, "footer differs"
    entries = []
    for u in units:
        e = body[u.meta[0] - a:u.meta[1] - a]
        if zlib.crc32(e) != u.meta[2]:
            return None, "footer differs"
        entries.append(e)
    thrift = b"".join([h, list_header(len(units)), *entries, t])
    return pq.read_metadata(pa.BufferReader(thrift + struct.pack("<I", len(thrift)) + b"PAR1")), ""


def _changed_error(f: FileRef, what: str) -> DataError:
    return DataError(f"{f.display}: changed since the job started ({what})")


def _now(src: pa.NativeFile, f: FileRef) -> Identity:
    """The file's identity now: fstat of the handle, the version a pinned handle reads (a read
    of any other fails), or what the store says of the object."""
    if f.store is None:
        return Identity.of(src.fileno())
    if isinstance(src, PinnedFile):
        return src.identity()
    return Identity.of_object(f.store.fs.get_file_info(f.path))


def _difference(src: pa.NativeFile, f: FileRef) -> str:
    """What changed in the open file since planning ('' if nothing): size, mtime, ctime of the handle."""
    if _pinned_change(src):
        return _pinned_change(src)
    try:
        return f.identity().differences(_now(src, f))
    except FileNotFoundError:
        return "removed"
    except OSError as e:
        return f"cannot stat it: {_short(e)}"


def _ipc_batches(src: pa.NativeFile, f: FileRef, cols: list[str], units) -> Iterator[pa.RecordBatch]:
    """The slices `units` of an IPC file or stream, only the columns `cols`, read through `src`.

    A slice of a batch split into several tasks is cut out of the file
    (`read_rows`: only its rows' bytes); a whole batch, or a compressed one,
    is read by pyarrow, only the columns `cols`.
    """
    if f.fmt == "ipc":
        schema = pa.ipc.open_file(src).schema
        idx = sorted(schema.get_field_index(c) for c in cols)
        reader = pa.ipc.open_file(src, options=pa.ipc.IpcReadOptions(included_fields=idx))  # reads only these

        def whole(u):
            return reader.get_batch(u.index)
    else:
        src.seek(0)
        schema = pa.ipc.read_schema(pa.ipc.read_message(src))
        if any(pa.types.is_dictionary(t) for t in schema.types):
            yield from _stream_from_start(src, cols, units)  # dictionaries come earlier in the stream
            return

        def whole(u):
            src.seek(u.pos)
            return pa.ipc.read_record_batch(pa.ipc.read_message(src), schema)
    cut = not big_endian(src, f.fmt, f.size)
    for u in units:
        b = read_rows(src, u.pos, f.size, schema, cols, u.offset, u.rows) if cut else None
        yield b if b is not None else whole(u).select(cols).slice(u.offset, u.rows)


def _stream_from_start(src: pa.NativeFile, cols: list[str], units) -> Iterator[pa.RecordBatch]:
    wanted: dict[int, list] = {}
    for u in units:
        wanted.setdefault(u.index, []).append(u)
    src.seek(0)
    for i, b in enumerate(pa.ipc.open_stream(src)):
        for u in wanted.get(i, ()):
            yield b.select(cols).slice(u.offset, u.rows)
        if i >= units[-1].index:
            return


def _batches(task: Task, spec: JobSpec, batch_rows: int, use_threads: bool, src: pa.NativeFile,
             md: pq.FileMetaData | None = None):
    cols = spec.columns.read()
    if task.file.fmt == "parquet":
        # Read through a small buffered stream, without pre-buffering. Pre-
        # buffering first copies all the task's column chunks into one fresh
        # allocation (page faults, memory: measured 2-5x the system time of
        # the decode) and pays off only on high-latency object stores; the
        # stream also keeps a task made of one huge row group in bounded memory.
        # page_checksum_verification: pages written with a CRC (parquet-mr
        # writes them by default) are checked, so a flipped bit is an error,
        # not a silently different number (cost not measurable).
        # On a store, pre-buffering pays: it fetches the task's column chunks with
        # few coalesced, concurrent range GETs (measured 2x faster than buffered
        # streams on moto, where each request costs ~5 ms). It holds the task's
        # compressed chunks in memory, so only up to STORE_PREBUFFER_MAX; a larger
        # task streams each chunk through a buffer of STORE_READ_BUFFER.
        buf, pre = READ_BUFFER, False
        if task.file.store is not None:
            buf, pre = STORE_READ_BUFFER, task.nbytes <= STORE_PREBUFFER_MAX
        # md: the metadata of only this task's row groups (see _open_task), numbered from 0
        groups = list(range(len(task.units))) if md is not None else [u.index for u in task.units]
        if isinstance(src, PinnedFile):  # pinned S3 reads: we fetch the chunks (each GET If-Match), not pyarrow
            md = md or pq.read_metadata(src)
            if pre:
                src.pinned.prefetch(chunk_ranges(md, groups, cols))  # (fetched with the footer if planned)
                buf = 0  # each chunk read whole from the fetched bytes, without a copy
            pre = False
        pf = pq.ParquetFile(src, metadata=md, buffer_size=0 if pre else buf, pre_buffer=pre,
                            page_checksum_verification=True)
        yield from pf.iter_batches(
            batch_size=_aligned_batch_rows(batch_rows, task.units),
            row_groups=groups,
            columns=cols,
            use_threads=use_threads,
        )
    else:
        for b in _ipc_batches(src, task.file, cols, task.units):
            for o in range(0, b.num_rows, batch_rows):
                yield b.slice(o, batch_rows)


# What reading a file that is damaged, or changed under the reader, raises
# (pyarrow's IPC reader: ValueError for a batch number beyond the footer's).
_READ_ERRORS = (pa.ArrowException, OSError, MemoryError, ValueError, EOFError)


def _read(task: Task, spec: JobSpec, batch_rows: int, use_threads: bool):
    """`_batches` from the planned file, with read failures turned into a DataError naming the file.

    A file found changed (replaced, rewritten, truncated) before, during or
    at the end of the read fails the task: its part would mix two versions.
    """
    src, md = _open_task(task.file, task.units, prebuffer=task.nbytes <= STORE_PREBUFFER_MAX)
    try:
        it = _batches(task, spec, batch_rows, use_threads, src, md)
        done = 0
        while True:
            try:
                batch = next(it)
                # Offsets inside the values, lengths inside the buffers: the kernel
                # trusts them (an IPC record batch is not checked when read).
                batch.validate(full=True)
            except StopIteration:
                break
            except _READ_ERRORS as e:
                changed = _difference(src, task.file)
                if changed:
                    raise _changed_error(task.file, changed) from e
                raise _read_error(task, e, _locate(task, spec, batch_rows, done, e, src)) from e
            done += batch.num_rows
            yield batch
        changed = _difference(src, task.file)
        if changed:  # rewritten in place while it was read
            raise _changed_error(task.file, changed)
    finally:
        src.close()


def _locate(task: Task, spec: JobSpec, batch_rows: int, done: int, e: BaseException, src) -> int | None:
    """On a read error only: which unit (row group, record batch) fails when read alone.

    A batch may span several row groups; reading the ones not yet read one by
    one (in bounded batches) names the damaged one. Not after a MemoryError
    (reading again would only fail again): then the first unread unit.
    """
    first = _unit_of(task, task.row_start + done)
    rest = [u for u in task.units if u.index >= first]
    if isinstance(e, MemoryError) or len({u.index for u in rest}) <= 1:
        return first
    cols = spec.columns.read()
    try:
        if task.file.fmt == "parquet":
            pf = pq.ParquetFile(src, page_checksum_verification=True)
            for u in rest:
                try:
                    for b in pf.iter_batches(batch_size=batch_rows, row_groups=[u.index], columns=cols):
                        b.validate(full=True)
                except (pa.ArrowException, OSError, ValueError):
                    return u.index
        else:
            for u in rest:
                try:
                    for b in _ipc_batches(src, task.file, cols, [u]):
                        b.validate(full=True)
                except (pa.ArrowException, OSError, ValueError, EOFError):
                    return u.index
    except (pa.ArrowException, OSError, MemoryError, ValueError):
        pass
    return None


def _units(task: Task) -> str:
    return f"{task.units[0].index}" + (f"-{task.units[-1].index}" if len(task.units) > 1 else "")


def _where(task: Task) -> str:
    """The data a task reads, for messages: a file's units, or the first and last of grouped files."""
    if task.group:
        a, b = task.group[0], task.group[-1]
        return f"{a.file.display} ... {b.file.display} ({len(task.group)} files grouped in one task)"
    return f"{task.file.display} {task.unit_name()} {_units(task)}"


def _read_error(task: Task, e: BaseException, unit: int | None = None) -> DataError:
    where = _units(task) if unit is None else str(unit)
    what = f"{task.file.display}: {{}} {task.unit_name()} {where}"
    if isinstance(e, MemoryError):
        from .limits import note

        return DataError(what.format("out of memory reading") + f" ({_short(e)}{note()})")
    return DataError(what.format("cannot read") + f" ({_short(e)})")


def _prefetched(batches, depth: int, name: str):
    """Iterate `batches` in a helper thread, at most `depth` batches ahead of the consumer.

    Reading (Parquet decoding releases the GIL) then overlaps the kernel and
    the write of the previous batch. Memory per task: the batch being
    computed, `depth` ready ones and the one being read. An exception from
    the reader is raised in the consumer; when the consumer stops early
    (error, cancellation) the reader stops after its current batch.
    """
    if depth <= 0:
        yield from batches
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put((True, batch)):
                    return
            put((True, end))
        except BaseException as e:  # handed to the consumer
            put((False, e))
        finally:
            batches.close()

    reader = threading.Thread(target=produce, name=name, daemon=True)
    reader.start()
    try:
        while True:
            ok, item = ready.get()
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:
        stop.set()
        reader.join()


def _read_ahead(task: Task, spec: JobSpec, batch_rows: int, threads: int):
    """The task's batches, in order, read the way the task's share of cores allows.

    One core: read and compute in turn, no helper thread (the other cores run
    other tasks). Several cores: one read-ahead thread, pyarrow decoding the
    columns in parallel. (Measured and dropped: several reader threads over
    runs of row groups, 1.3-1.7x slower: concurrent `iter_batches` calls
    scale worse than pyarrow's own column-parallel decode; `use_threads` in
    one-core tasks: no gain.)
    """
    if threads <= 1:
        return _read_pieces(task, spec, batch_rows, use_threads=False)
    return _prefetched(_read_pieces(task, spec, batch_rows, use_threads=True), PREFETCH, f"fastkl-read-{task.index}")


def _read_pieces(task: Task, spec: JobSpec, batch_rows: int, use_threads: bool):
    """(piece, batch) for every batch of every one-file slice of the task, in order; a slice
    that gives other than its planned rows fails the task (its file changed or is corrupt)."""
    for piece in task.pieces():
        done = 0
        with contextlib.closing(_read(piece, spec, batch_rows, use_threads)) as batches:  # closed with us
            for batch in batches:
                done += batch.num_rows
                yield piece, batch
        if done != piece.rows:
            raise DataError(
                f"{piece.file.display}: read {done} rows from {piece.unit_name()}s of {piece.rows} rows; "
                "the file changed or is corrupt"
            )


def _const_column(value: str | None, type_: pa.DataType, n: int) -> pa.Array:
    if value is None:
        return pa.nulls(n, type_)
    return pc.fill_null(pa.nulls(n, type_), pa.scalar(value).cast(type_))


def _unit_of(task: Task, row_in_file: int) -> int:
    r = row_in_file - task.row_start
    for u in task.units:
        if r < u.rows:
            return u.index
        r -= u.rows
    return task.units[-1].index


class _Regroup(Exception):
    """A batch of several grouped files holds an invalid row: computed again file by file."""


class Cancelled(Exception):
    """The job this task belongs to was interrupted: the task stops between two batches."""


def run_task(task: Task, batch_rows: int, spec: JobSpec, kernel_threads, report=None,
             cancelled: threading.Event | None = None) -> dict:
    """`_run_task_once`, run again with backoff when an upload to a store fails transiently.

    Throttling, 5xx and dropped connections are the weather of object stores:
    the S3 client retries each request itself; a task whose part still fails
    to upload is run again whole (its part goes to a fresh object), rather
    than failing the job. Local staging is never retried (a full disk stays full).
    """
    retries = getattr(spec.staging, "retries", 0)
    for attempt in range(retries + 1):
        try:
            return _run_task_once(task, batch_rows, spec, kernel_threads, report, cancelled)
        except OSError as e:
            if attempt == retries or not _transient(e):
                raise
            time.sleep(min(8.0, 0.25 * 2 ** attempt))
    raise AssertionError("unreachable")


_TRANSIENT = ("503", "500", "502", "504", "429", "slowdown", "slow down", "slow_down", "throttl", "unavailable", "reset", "timed out",
              "timeout", "connection", "network", "internalerror", "internal_failure", "internal error",
              "serviceunavailable", "service_unavailable", "broken pipe", "curl", "requesttimeout",
              "request_timeout", "try again")


def _transient(e: OSError) -> bool:
    """An OSError from a store that a second attempt may not meet (not a missing bucket, not a denial)."""
    text = str(e).lower()
    return any(w in text for w in _TRANSIENT) and "access denied" not in text and "nosuchbucket" not in text


def _run_task_once(task: Task, batch_rows: int, spec: JobSpec, kernel_threads, report=None,
                   cancelled: threading.Event | None = None) -> dict:
    """Read the task's slice, compute, write its part, return its row count and stats.

    `cancelled` (threads scheduler): once set, the task stops before its next
    batch and removes its temporary part, so that an interrupted job returns
    within a batch's time, not a task's.
    """
    from .._engine import compute, compute_gaussian
    from ..summary.stats import PartStats

    t0 = time.perf_counter()
    threads = _kernel_threads(kernel_threads)
    progress = _reporter(report, task)
    cols = spec.columns
    staging = spec.staging
    tmp = staging.tmp_part(task.index)
    stats: list = []
    first_error: InvalidRowError | None = None
    error_piece: Task | None = None
    invalid = 0
    done = 0
    writer = staging.part_writer(tmp, spec.out_schema)
    # grouped small files: their batches are written together, in row groups of up to batch_rows
    # rows, not one tiny row group per file
    held: list[pa.RecordBatch] = []
    held_rows = 0
    batches = piece = None
    try:
        def one(piece: Task, p_done: int, batch: pa.RecordBatch, keep: list) -> None:
            """Compute one batch (of one file, or of several grouped ones when `piece` is None)."""
            nonlocal first_error, error_piece, invalid, stats, held, held_rows
            n = batch.num_rows
            data = {role: batch.column(name) for role, name in cols.roles()}
            if spec.measures == ("gaussian_kl",):
                res = compute_gaussian({"p_mean": data["p"], "p_logvar": data["p_logvar"], "q_mean": data["q"],
                                        "q_logvar": data["q_logvar"]}, spec.options, threads=threads)
            else:
                res = compute(data.pop("p"), data.pop("q", None), spec.measures, spec.options, threads=threads,
                              **data)
            bad = res.invalid_count() if spec.options.on_invalid == "raise" else 0
            if bad and piece is None:
                raise _Regroup  # several files: the caller computes them one by one to name the row
            if bad:
                if first_error is None:
                    first_error = res.error(file=piece.file.display, row_offset=piece.row_start + p_done)
                    error_piece = piece
                invalid += bad
            if first_error is None:
                mt = res.to_table(status=spec.status)
                arrays = keep + [c.combine_chunks() for c in mt.columns]
                out = pa.RecordBatch.from_arrays(arrays, schema=spec.out_schema)
                if task.group:
                    held.append(out)
                    held_rows += n
                    if held_rows >= batch_rows:
                        writer.write_table(pa.Table.from_batches(held), row_group_size=held_rows)
                        held, held_rows = [], 0
                else:
                    writer.write_batch(out)
                if spec.group_by is None:
                    stats.append(PartStats.from_result(res))
                else:  # (grouped small files share no partition: they are computed one by one then)
                    keys, codes = batch_groups(batch, cols, piece.file.partition if piece is not None else ())
                    stats.append(PartStats.from_result(res, spec.group_by, keys, codes))
                if len(stats) >= 32:  # many small batches: bounded state
                    stats = [PartStats.merge_all(stats)]

        def keep_of(piece: Task, batch: pa.RecordBatch) -> list:
            f = piece.file
            return [_const_column(dict(f.partition).get(name), cols.partition_keep[name], batch.num_rows)
                    if name in cols.partition_keep else batch.column(name) for name in cols.keep]

        # Small files grouped into this task: their batches are computed together, up to
        # batch_rows rows at a time (the kernel call and the summary's update cost ~0.5 ms each
        # however few the rows), as long as they have the same columns.
        waiting: list[tuple[Task, int, pa.RecordBatch]] = []
        w_rows = 0

        def flush() -> None:
            nonlocal w_rows
            if len(waiting) == 1 or first_error is not None or (spec.group_by is not None and cols.group_partition):
                for args in waiting:
                    one(*args, keep_of(args[0], args[2]))
            elif waiting:
                batch = pa.concat_batches([b for _, _, b in waiting])
                keep = [pa.concat_arrays(k) for k in zip(*(keep_of(pc_, b) for pc_, _, b in waiting))]
                try:
                    one(None, 0, batch, keep)
                except _Regroup:
                    for args in waiting:
                        one(*args, keep_of(args[0], args[2]))
            waiting.clear()
            w_rows = 0

        # A task that owns one core reads and computes in turn (the other
        # cores run other tasks); a task that owns several reads ahead.
        batches = _read_ahead(task, spec, batch_rows, threads)
        p_done = 0
        for at, batch in batches:
            if at is not piece:
                piece, p_done = at, 0
            if cancelled is not None and cancelled.is_set():
                raise Cancelled(f"{piece.file.display}: interrupted")
            n = batch.num_rows
            if task.group:
                if waiting and (w_rows + n > batch_rows or not waiting[-1][2].schema.equals(batch.schema)):
                    flush()
                waiting.append((piece, p_done, batch))
                w_rows += n
            else:
                one(piece, p_done, batch, keep_of(piece, batch))
            p_done += n
            done += n
            progress(n)
        flush()
        if held and first_error is None:
            writer.write_table(pa.Table.from_batches(held), row_group_size=held_rows)
            held = []
        writer.close()
        if first_error is not None:
            e = first_error
            where = f"{error_piece.unit_name()} {_unit_of(error_piece, e.row)}"
            raise InvalidRowError(
                e.reason, e.row, invalid, file=e.file, detail=e.detail, position=e.position, unit=where,
            )
    except BaseException as e:
        if batches is not None:
            batches.close()  # stop the read-ahead thread before removing the part
        try:
            writer.close()
        except Exception:
            pass
        staging.discard_tmp(tmp)
        if isinstance(e, MemoryError) and not isinstance(e, FastKLError):
            raise _read_error(piece or task, e) from e  # the kernel's outputs: still name the data
        if isinstance(e, OSError):  # reading errors are DataErrors by now: this is the output side
            raise OSError(e.errno, f"cannot write {staging.part_name(task.index)} into {staging.root}: "
                          f"{e.strerror or _short(e)}") from e
        raise
    stats_json = PartStats.merge_all([PartStats.for_layout(spec.layout, spec.group_by), *stats]).to_json()
    state = {"fingerprint": _fingerprint(task), "batch_rows": batch_rows, "rows": done,
             **staging.publish_part(task.index, tmp)}  # the part is in place before the client logs its state
    # the stats also as the JSON the client logs: encoded here, in parallel, not by the client
    stats_text = json.dumps(stats_json, separators=(",", ":"), allow_nan=True)
    return {"index": task.index, "rows": done, "stats": stats_json, "stats_text": stats_text, "state": state,
            "seconds": time.perf_counter() - t0}


def _fingerprint(task: Task) -> str:
    """A digest of `Task.fingerprint` (what --resume compares; a grouped task's lists 256 files)."""
    import hashlib

    text = json.dumps(task.fingerprint(), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


# --------------------------------------------------------------------------
# Schedulers


def _run_sync(todo, plan, spec, progress, on_result):
    progress.start()
    for t in todo:
        on_result(run_task(t, int(plan.batch_rows[t.index]), spec, _config.cores(), progress.add))


class _Window:
    """Which of `todo` may be submitted now: none more than `size` places past the oldest
    unfinished one. So at most `size` tasks are in flight, and at most `size` results wait for
    an earlier one to be merged in task order, whatever the number of tasks (the client's
    memory and the scheduler's bookkeeping stay O(size), not O(tasks))."""

    def __init__(self, todo: list, size: int):
        self.todo = todo
        self.size = max(1, size)
        self.next = 0
        self.running: dict[int, Any] = {}  # place in todo -> the handle of its submitted task

    def fill(self, submit) -> list:
        """Submit (submit(task) -> handle) what the window allows; the new handles."""
        oldest = min(self.running) if self.running else self.next
        new = []
        while self.next < len(self.todo) and self.next < oldest + self.size:
            h = self.running[self.next] = submit(self.todo[self.next])
            new.append(h)
            self.next += 1
        return new

    def finished(self, place: int) -> None:
        del self.running[place]


_task_pools: dict[int, Any] = {}
_task_pools_lock = threading.Lock()


def _task_pool(n: int):
    """The process-wide pool of `n` task threads, shared by the jobs of this process.

    A thread that stays alive keeps its allocator's memory from one job to
    the next: measured on a 400 MB job, a pool started per job cost 0.04 s
    more system time (page faults on fresh memory) and 4-16% more wall time
    on repeated runs. Dask's own threaded scheduler keeps its pools the
    same way. Recreated in a forked child, whose copy has no threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    with _task_pools_lock:
        pool = _task_pools.get(n)
        if pool is None:
            pool = _task_pools[n] = ThreadPoolExecutor(n, thread_name_prefix="fastkl-task")
        return pool


def _forget_task_pools_after_fork() -> None:
    """A forked child has none of the parent's threads, and may have copied the lock held."""
    global _task_pools_lock
    _task_pools.clear()
    _task_pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_task_pools_after_fork)


class _JobPool:
    """One job's view of a shared task pool: `submit`, and a `shutdown` that cancels this
    job's queued tasks and waits for its running ones, so that no task of a failed or
    interrupted job still writes once `run` has returned."""

    def __init__(self, pool, n: int):
        self._pool = pool
        self._max_workers = n
        self._futures: set = set()  # not yet finished (a finished one drops itself)

    def submit(self, fn, /, *args, **kwargs):
        f = self._pool.submit(fn, *args, **kwargs)
        self._futures.add(f)
        f.add_done_callback(self._futures.discard)
        return f

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        from concurrent.futures import wait as wait_all

        pending = list(self._futures)
        if cancel_futures:
            for f in pending:
                f.cancel()
        if wait:
            wait_all(pending)


def _run_threads(todo, plan, spec, progress, workers, on_result):
    """The tasks on this process's pool of n threads, submitted through a window of
    WINDOW_PER_THREAD tasks per thread, results handed to `on_result` as they finish.

    (Through `dask.compute` of one delayed object per task, the graph's
    culling and the packing of results grew quadratically: 68 s for 30,000
    no-op tasks. A task here costs a pool submit and a wait.)
    """
    from concurrent.futures import FIRST_COMPLETED, wait

    cores = _config.cores()
    n = max(1, min(workers or cores, len(todo)))
    k = max(1, cores // n)
    cancelled = threading.Event()  # set on the way out: running tasks stop at their next batch
    pool = _JobPool(_task_pool(n), n)
    window = _Window(todo, n * WINDOW_PER_THREAD)
    place: dict = {}

    def submit(t):
        fut = pool.submit(run_task, t, int(plan.batch_rows[t.index]), spec, k, progress.add, cancelled)
        place[fut] = window.next
        return fut

    progress.start()
    try:
        window.fill(submit)
        while window.running:
            done, _ = wait(list(window.running.values()), return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=place.__getitem__):
                r = fut.result()  # raises the task's exception
                window.finished(place.pop(fut))
                on_result(r)
            window.fill(submit)
    finally:
        cancelled.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _check_element_types(plan, options: Options) -> None:
    """Every file's p/q element types against the declared ones (`p_dtype`): a
    list<uint16> is bfloat16 or float16 only when declared so. Refused before any task runs."""
    from ..adapters.arrow import element_type

    cols = plan.columns
    roles = [(r, c, d) for r, c, d in (("p", cols.p, options.p_dtype), ("q", cols.q, options.q_dtype)) if c is not None]
    for types in plan.value_types:
        for t, (role, column, declared) in zip(types, roles):
            element_type(t, declared, f"column {column!r} ({role})", role)


def _kernel_dtypes(plan) -> tuple:
    """Every kernel dtype this job's files will need (float32, float64, float16), from the
    p/q value types of every file's schema read at scan time: a plan of mixed float32 and
    float64 shards must not leave one of them to be compiled by several workers at once.
    float16 stands for the 16-bit kernel, which float16 and bfloat16 sides share (a half
    side beside a float32 one needs a kernel of its own, compiled where it is first met)."""
    from .._engine import kernel_dtype

    def half(t: pa.DataType) -> bool:
        return pa.types.is_float16(t) or (pa.types.is_integer(t) and t.bit_width == 16)

    dtypes = {np.dtype(np.float16) if all(half(t) for t in types) else kernel_dtype(*types)
              for types in plan.value_types}
    return tuple(sorted(dtypes, key=str))


def _warm_worker(dtypes: tuple = (), options: Options | None = None, measures: tuple = ("kl",),
                 sparse: bool = False) -> None:
    from .._engine import warmup

    warmup(dtypes, _warm_options(options), measures, sparse)


def _warm_options(options: Options | None) -> Options | None:
    """The options a warm-up runs with: its sample rows are float32/float64, so
    declared element types (p_dtype) are dropped."""
    return None if options is None else dataclasses.replace(options, p_dtype=None, q_dtype=None)


def _cluster_threads(client) -> dict[str, int]:
    """Kernel threads per worker: a host's cores divided by the Dask threads on that host."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    cores = client.run(_config.cores, on_error="ignore")  # a worker that just died is left out
    per_host: dict[str, int] = {}
    host_cores: dict[str, int] = {}
    for addr, w in info.items():
        h = w.get("host", addr)
        per_host[h] = per_host.get(h, 0) + int(w.get("nthreads", 1))
        host_cores[h] = max(host_cores.get(h, 1), int(cores.get(addr, 1)))
    return {
        addr: max(1, host_cores[w.get("host", addr)] // max(1, per_host[w.get("host", addr)]))
        for addr, w in info.items()
    }


def _run_distributed(todo, plan, spec, progress, client, on_result):
    info = client.scheduler_info(n_workers=-1)["workers"]
    if not info:
        client.wait_for_workers(1, timeout=FIRST_WORKER_TIMEOUT)
        info = client.scheduler_info(n_workers=-1)["workers"]
    # Numba's on-disk cache must not be written by many processes at once
    # (numba issue 4807): the client has warmed it up; warm one worker per
    # host first (it compiles or loads), the others then only load.
    first: dict[str, str] = {}
    for addr, w in info.items():
        first.setdefault(w.get("host", addr), addr)
    # on_error="ignore": a worker dying now is the scheduler's business (its tasks go elsewhere)
    client.run(_warm_worker, _kernel_dtypes(plan), spec.options, spec.measures, spec.layout.sparse,
               workers=list(first.values()),
               on_error="ignore")
    threads = _cluster_threads(client)
    topic = f"fastkl-progress-{uuid.uuid4().hex}"
    reported = progress.enabled

    def on_event(event):
        _, (index, rows, task_rows, task_bytes) = event
        progress.add(index, rows, int(task_bytes * rows / task_rows) if task_rows else 0, task_rows, task_bytes)

    if reported:
        client.subscribe_topic(topic, on_event)
    progress.start()
    # A window of tasks in flight (in task order, by priority), refilled as results come back:
    # the client holds O(window) futures and results, the scheduler O(window) tasks.
    total_threads = sum(int(w.get("nthreads", 1)) for w in info.values())
    batches = _task_batches(todo, total_threads)
    in_flight = max(256, total_threads * WINDOW_PER_THREAD)  # tasks
    window = _Window(batches, max(2 * total_threads, in_flight * len(batches) // max(1, len(todo))))
    by_key: dict[str, list[Task]] = {}  # the tasks of each Dask task in flight
    live: dict[str, Any] = {}  # their futures
    place: dict[str, int] = {}  # their batch's place in the window
    left: dict[int, int] = {}  # Dask tasks still running a batch's tasks

    def send(batch: list[Task], at: int):
        first = batch[0]
        rows = [int(plan.batch_rows[t.index]) for t in batch]
        topic_arg = topic if reported else None
        if len(batch) == 1:
            fut = client.submit(run_task, first, rows[0], spec, threads, topic_arg,
                                key=f"fastkl-part-{first.index}-{topic[-8:]}", pure=False, priority=-first.index)
        else:
            fut = client.submit(run_tasks, batch, rows, spec, threads, topic_arg,
                                key=f"fastkl-parts-{first.index}-{batch[-1].index}-{topic[-8:]}", pure=False,
                                priority=-first.index)
        by_key[fut.key], live[fut.key], place[fut.key] = batch, fut, at
        left[at] = left.get(at, 0) + 1
        return fut

    def submit(batch: list[Task]):
        return send(batch, window.next)

    def split(fut) -> list:
        """A batch whose workers died: its tasks again one by one, so that a task that
        kills its worker is the one named (and the others are not given up with it)."""
        batch, at = by_key.pop(fut.key), place.pop(fut.key)
        del live[fut.key]
        fut.release()
        left[at] -= 1
        return [send([t], at) for t in batch]

    try:
        for fut, r in _completed(client, window, submit, by_key, split):
            batch, at = by_key.pop(fut.key), place.pop(fut.key)
            del live[fut.key]
            left[at] -= 1
            if not left[at]:
                del left[at]
                window.finished(at)
            fut.release()
            for t, result in zip(batch, r if len(batch) > 1 else [r]):
                progress.done(t.index, t.rows, t.nbytes)
                on_result(result)
    except BaseException as e:
        client.cancel(list(live.values()))
        lost = _killed_worker_error(e, by_key, client)
        if lost is not None:
            raise lost from e
        raise
    finally:
        if reported:
            try:
                client.unsubscribe_topic(topic)
            except Exception:
                pass


def _task_batches(todo: list[Task], threads: int) -> list[list[Task]]:
    """Consecutive small tasks grouped to run as one Dask task (BATCH_BYTES, BATCH_TASKS),
    each other task alone; never so few batches that a thread would wait for work."""
    most = max(1, min(BATCH_TASKS, len(todo) // (8 * max(1, threads))))
    out: list[list[Task]] = []
    size = 0
    for t in todo:
        last = out[-1] if out else None
        if (last is not None and len(last) < most and t.nbytes < BATCH_BYTES
                and size + t.nbytes <= BATCH_BYTES and last[0].nbytes < BATCH_BYTES):
            last.append(t)
            size += t.nbytes
        else:
            out.append([t])
            size = t.nbytes
    return out


def run_tasks(tasks: list[Task], batch_rows: list[int], spec: JobSpec, kernel_threads, report=None) -> list[dict]:
    """Several small tasks in one Dask task (see `_task_batches`), their results in order."""
    return [run_task(t, b, spec, kernel_threads, report) for t, b in zip(tasks, batch_rows)]


_SPLIT = object()  # in `_completed`: a batch to split, not a result


def _completed(client, window: _Window, submit, by_key, split):
    """Submit the window's tasks and yield (future, result) as they finish, like `as_completed`
    refilled from the window after every batch of results (a batch of tasks whose Dask task
    Dask gave up on is `split` and its tasks resubmitted), but never wait forever
    on a cluster without workers: neither for a task to run nor for a result held by a
    worker that died after finishing it (Dask recomputes it, once a worker exists)."""
    from distributed import as_completed

    alone = {"since": None, "checked": time.monotonic()}

    def check_workers(force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - alone["checked"] < 2:
            return
        alone["checked"] = now
        if client.scheduler_info(n_workers=-1)["workers"]:
            alone["since"] = None
        elif alone["since"] is None:
            alone["since"] = now
        elif now - alone["since"] > NO_WORKER_TIMEOUT:
            raise DataError(
                f"no Dask worker left for {NO_WORKER_TIMEOUT:.0f} s (they died and were not restarted)"
                + _suspects_note(client, by_key)
            )

    ready = as_completed(window.fill(submit), loop=client.loop)
    while not ready.is_empty():
        if not ready.has_ready():
            time.sleep(0.02)
            check_workers()
            continue
        for fut in ready.next_batch(block=False):
            while True:
                try:
                    result = fut.result(timeout=2)  # raises the task's exception
                    break
                except TimeoutError:
                    check_workers(force=True)
                except Exception as e:
                    if len(by_key.get(fut.key, ())) > 1 and _is_killed_worker(e):
                        result = _SPLIT  # its workers died: the tasks again, one by one
                        break
                    raise
            alone["since"] = None
            if result is _SPLIT:
                ready.update(split(fut))
                continue
            yield fut, result  # the caller marks it finished in the window
        ready.update(window.fill(submit))


def _is_killed_worker(e: BaseException) -> bool:
    """Dask gave up on a task whose workers kept dying."""
    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, KilledWorker)


def _suspects(client, by_key) -> list[tuple[Task, int]]:
    """Tasks of this job that were on workers when they died, most often first."""

    def count(keys, dask_scheduler=None):
        return {k: dask_scheduler.tasks[k].suspicious for k in keys if k in dask_scheduler.tasks}

    try:
        counts = client.run_on_scheduler(count, list(by_key))
    except Exception:  # noqa: BLE001 - only for the message
        return []
    out = [(t, n) for k, n in counts.items() if n for t in by_key[k]]
    return sorted(out, key=lambda x: (-x[1], x[0].index))


def _suspects_note(client, by_key, skip=None) -> str:
    sus = [(t, n) for t, n in _suspects(client, by_key) if t is not skip][:3]
    if not sus:
        return ""
    return "; workers died while holding " + ", ".join(
        f"{_where(t)} ({n}x)" for t, n in sus
    )


def _killed_worker_error(e: BaseException, by_key: dict, client=None) -> DataError | None:
    """Dask gives up on a task whose workers died `allowed-failures` times: name its data.

    A worker may hold more tasks than it runs (queued ones are charged for its
    death too), so the other tasks charged as often are named as well.
    """
    if not _is_killed_worker(e):
        return None
    batch = by_key.get(getattr(e, "task", None))
    t = batch[0] if batch else None  # a batch is split before Dask gives up on one of its tasks alone
    tries = getattr(e, "allowed_failures", None)
    times = f"{tries + 1} times" if isinstance(tries, int) else "repeatedly"
    if t is None:
        return DataError(f"a task's worker process died {times}; giving up ({_short(e)})")
    others = ""
    if client is not None and isinstance(tries, int):
        same = [u for u, n in _suspects(client, by_key) if u is not t and n >= tries + 1]
        if same:
            others = " (or " + ", ".join(_where(u) for u in same[:3]) + \
                ", held by the same workers)"
    return DataError(
        f"{_where(t) if t.group else f'{t.file.display}: {t.unit_name()} {_units(t)}'}: "
        f"the worker process running it died {times}{others} "
        "(killed, out of memory or crashed on this data); giving up"
    )


class _AfterInterrupt:
    """A logging filter for distributed's handlers: quiet once a local cluster was interrupted.

    LocalCluster silences distributed's logs in this process only while it is
    open, and restores their level when it closes; the comms of the killed
    workers may report their end after that ("Batched Comm Closed" with a
    traceback), beside the one line an interrupt gets. A filter on the
    handlers holds whatever the level.
    """

    active = False

    @classmethod
    def filter(cls, record) -> bool:
        return not cls.active

    @classmethod
    def install(cls) -> None:
        import logging

        cls.active = False
        for h in logging.getLogger("distributed").handlers:
            if cls not in h.filters:
                h.addFilter(cls)


def _local_cluster(n_workers: int, worker_cap: int | None = None):
    """A LocalCluster of `n_workers` one-thread processes on 127.0.0.1, each capped at `worker_cap`."""
    import logging

    from distributed import Client, LocalCluster

    _AfterInterrupt.install()

    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",  # never listen beyond this machine
        dashboard_address="127.0.0.1:0",  # no fixed port, localhost only
        # a failed task is reported once, by fastkl (one line), not by the worker's log too
        silence_logs=logging.CRITICAL,
    )
    client = Client(cluster, set_as_default=False)
    from . import limits

    try:
        client.register_plugin(limits.LocalWorker(worker_cap))
    except BaseException:
        client.close()
        cluster.close()
        raise
    return cluster, client


def _hold_interrupts():
    """Block SIGINT and SIGTERM in this (main) thread while the local cluster starts.

    The cluster's event-loop thread and the worker processes it spawns inherit
    the blocked mask (kept across exec): a Ctrl-C, which reaches the whole
    process group, never makes a starting worker print its traceback, and the
    client gets it, pending, once the cluster object exists and can be
    stopped. Returns the mask to restore (None where there is nothing to do).
    """
    import signal

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _release_interrupts(held) -> None:
    import signal

    if held is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _kill_local_workers(cluster) -> None:
    """On an interrupt: close the nannies of the local cluster and SIGKILL their worker processes.

    The workers' tasks are lost anyway, and a graceful close would wait for
    the running ones (seconds); killed, they print nothing. Each nanny's close
    starts first, so that it does not restart its dying worker, and then
    returns at once. Parts are written to temporary names first, so a killed
    task leaves no part that --resume would take for finished.
    """
    import asyncio
    import signal

    _AfterInterrupt.active = True  # the killed workers' comms may still report their end
    nannies = list(getattr(cluster, "workers", {}).values())

    async def stop():
        closing = [asyncio.ensure_future(n.close(timeout=1, reason="fastkl-interrupted")) for n in nannies]
        await asyncio.sleep(0)  # every close has marked its nanny closing: no restart
        for n in nannies:
            try:
                if n.pid:
                    os.kill(n.pid, signal.SIGKILL)
            except (OSError, AttributeError):  # already gone
                pass
        await asyncio.gather(*closing, return_exceptions=True)

    try:
        cluster.sync(stop, callback_timeout=5)
    except Exception:  # noqa: BLE001 - the cluster's own close comes next
        pass


# --------------------------------------------------------------------------
# The job


def _out_schema(cols: Columns, layout: Layout, status: bool) -> pa.Schema:
    """The kept columns, then the measures' columns (`fastkl._result.output_fields`)."""
    fields = [pa.field(k, cols.keep_types[k]) for k in cols.keep]
    return pa.schema(fields + output_fields(layout, status))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)



def _run_tasks(todo, plan, spec, progress, kind, scheduler, client, workers, to_close, on_result) -> None:
    """Run the tasks on the chosen scheduler, each result handed to `on_result` as it arrives;
    clusters and clients it opens go to `to_close`."""
    if kind in ("sync", "synchronous"):
        return _run_sync(todo, plan, spec, progress, on_result)
    if kind == "threads":
        return _run_threads(todo, plan, spec, progress, workers, on_result)
    if kind == "processes":
        from .limits import ClientShare, local_workers

        # the memory cap is a total: the client keeps its share, the workers split the rest
        n, worker_cap = local_workers(max(1, min(workers or _config.cores(), len(todo))), explicit=workers is not None)
        held = _hold_interrupts()
        try:
            cluster, client = _local_cluster(n, worker_cap)
            to_close += [ClientShare(), cluster, client]
            try:
                _release_interrupts(held)  # a Ctrl-C during the start is raised here
                return _run_distributed(todo, plan, spec, progress, client, on_result)
            except KeyboardInterrupt:
                _kill_local_workers(cluster)  # then closed with the cluster, quickly
                raise
        finally:
            _release_interrupts(held)
    elif client is None:
        from distributed import Client

        try:
            client = Client(scheduler, set_as_default=False, timeout="10s")
        except OSError as e:
            raise OptionError(f"cannot reach Dask scheduler {scheduler!r}: {_short(e)}") from e
        to_close.append(client)
    return _run_distributed(todo, plan, spec, progress, client, on_result)


@documented
def run(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    dest: str | os.PathLike,
    *,
    p: str = "p",
    q: str | None = "q",
    measures: Sequence[str] | str = ("kl",),
    keep: Sequence[str] | str = (),
    scheduler: Any = None,
    workers: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    status: bool = False,
    quiet: bool = False,
    summary_json: str | os.PathLike | None = None,
    task_rows: int | None = None,
    task_bytes: int | None = DEFAULT_TASK_BYTES,
    group_files: int | None = None,
    dry_run: bool = False,
    mask: str | None = None,
    lengths: str | None = None,
    p_ids: str | None = None,
    q_ids: str | None = None,
    p_mean: str | None = None,
    p_logvar: str | None = None,
    q_mean: str | None = None,
    q_logvar: str | None = None,
    target: str | None = None,
    storage_options: dict | None = None,
    last_writer_wins: bool = False,
    kind: Kind = "probs",
    p_kind: Kind | None = None,
    q_kind: Kind | None = None,
    dtype: Dtype | None = None,
    p_dtype: Dtype | None = None,
    q_dtype: Dtype | None = None,
    temperature: float = 1.0,
    p_temperature: float | None = None,
    q_temperature: float | None = None,
    base: float = math.e,
    normalize: bool = False,
    smoothing: float = 0.0,
    sum_tol: float = 1e-3,
    on_invalid: OnInvalid = "raise",
    beta: float | None = None,
    alpha: float | None = None,
    vocab: int | None = None,
    tail: Tail = "bucket",
    bounds: bool = True,
    per_token: bool = False,
    group_by: str | None = None,
    max_groups: int | None = None,
):
    """Compute `measures` for every row of SOURCE and write them to the Parquet dataset DEST.

    DEST appears only when the job is complete (all or nothing), one job at a
    time per DEST; the output and summary are the same whatever the scheduler,
    the number of workers, retries or resuming (user guide: Jobs; Storage).
    Returns the job's `fastkl.Summary`, also stored in DEST/_fastkl.json.

    Examples:
        >>> import os, tempfile, pyarrow as pa, pyarrow.parquet as pq
        >>> d = tempfile.mkdtemp()
        >>> os.mkdir(os.path.join(d, "shards"))
        >>> pq.write_table(pa.table({"id": [1, 2], "p": [[0.7, 0.3], [0.5, 0.5]], "q": [[0.6, 0.4], [0.5, 0.5]]}),
        ...                os.path.join(d, "shards", "shard-0.parquet"))
        >>> summary = fastkl.run(os.path.join(d, "shards"), os.path.join(d, "scores"), measures=("kl", "js"),
        ...                      keep="id", quiet=True)
        >>> pq.read_table(os.path.join(d, "scores")).column_names
        ['id', 'kl', 'js']

    Args:
        source: a Parquet or Arrow IPC file, a directory of them (hive partitions included), a glob,
            a list of these, URLs (s3://, gs://, memory://, any fsspec protocol), or a
            pyarrow.dataset.Dataset (its files and filesystem).
        dest: the output directory or URL; it must not exist (see overwrite) nor overlap SOURCE.
        p: the column holding P.
        q: the column holding Q (None for entropy alone).
        measures: names of the measures, as for fastkl.divergences.
        keep: input columns copied to the output beside the measures.
        scheduler: None or "threads" (this machine), "processes" (a local cluster of worker
            processes), "sync", a Dask scheduler address, or a distributed.Client.
        workers: how many threads / processes run tasks locally (None: the cores).
        overwrite: replace an earlier fastkl output at DEST, once the new one is complete.
        resume: reuse the finished parts of an interrupted run of the same job.
        status: add a string column "status": "ok", "null" or the reason the row is invalid.
        quiet: no progress bar and no summary table.
        summary_json: also write the summary as JSON to this path.
        task_rows: at most this many rows per task.
        task_bytes: at most this many bytes of decoded input per task (memory is about workers x this).
        group_files: at most this many small files share a task and a part (1: one per file; None:
            256 once the job has 256 tasks or more, else 1).
        dry_run: plan only and return that DryRun (files, rows, bytes, tasks, parts, an estimated
            time); nothing is read beyond footers, nothing is written.
        mask: sequence rows: the column saying which positions count (list<bool> or list<int8>).
        lengths: sequence rows: the integer column of how many leading positions count.
        p_ids: top-k rows: the column of P's token ids.
        q_ids: top-k rows: the column of Q's token ids.
        p_mean: diagonal Gaussians (gaussian_kl): the column of P's means (with the next three).
        p_logvar: diagonal Gaussians: the column of P's log-variances.
        q_mean: diagonal Gaussians: the column of Q's means.
        q_logvar: diagonal Gaussians: the column of Q's log-variances.
        target: the column of the tokens that came next (nll_p, nll_q, delta_p).
        storage_options: options of the object store's filesystem (endpoint_url, key, secret, region, ...).
        last_writer_wins: accept a store without conditional writes (two jobs at once could both write DEST).
        group_by: a low-cardinality column (string, integer, bool or dictionary; or a hive
            partition key) whose every value, null included, gets its own summary (Summary.groups),
            merged exactly like the whole.
        max_groups: with group_by, fail (TooManyGroupsError) past this many distinct values
            (default 10,000).
    """

    t_start = time.perf_counter()
    source, storage_options = dataset_sources(source, storage_options)  # a pyarrow Dataset: its files
    gaussian = (p_mean, p_logvar, q_mean, q_logvar)
    if any(c is not None for c in gaussian):
        if any(c is None for c in gaussian):
            raise OptionError("diagonal Gaussians need all four columns: p_mean, p_logvar, q_mean, q_logvar "
                              "(--p-mean --p-logvar --q-mean --q-logvar)")
        p, q, measures = p_mean, q_mean, ("gaussian_kl",)
    else:
        measures = check_measures(measures)
    options = Options.from_call(locals())
    if isinstance(keep, str):
        keep = (keep,)
    keep = tuple(dict.fromkeys(keep))
    if measures != ("gaussian_kl",) and not needs_q(measures):
        q = None
    elif q is None:
        raise OptionError(f"q is required for {', '.join(m for m in measures if m != 'entropy')}")
    for k in keep:
        if k in measures or (status and k == "status"):
            raise OptionError(f"keep column {k!r} has the name of an output column")
    if workers is not None and int(workers) < 1:
        raise OptionError(f"workers must be >= 1, got {workers}")
    grouping = _grouping(group_by, max_groups)
    client = None
    if scheduler is not None and not isinstance(scheduler, str):
        try:
            from distributed import Client
        except ImportError:  # pragma: no cover
            Client = ()
        if not isinstance(scheduler, Client):
            raise OptionError(f"scheduler must be a name, an address or a distributed.Client, got {scheduler!r}")
        client = scheduler
    elif isinstance(scheduler, str) and scheduler not in LOCAL_SCHEDULERS and "://" not in scheduler and ":" not in scheduler:
        raise OptionError(
            f"unknown scheduler {scheduler!r}; expected threads, processes, sync or a scheduler address (host:port)"
        )

    source = _local_sources(source)
    _refuse_memory_across_processes(source, dest, scheduler)
    if summary_json is not None:
        summary_json = local_path(summary_json, "--summary-json")
    checked = []
    probes: list[Probe] = []

    store_dest = is_store_url(dest)
    ahead: list = []  # DEST's state, read beside SOURCE's listing

    def check(roots) -> None:  # before any file is opened
        local_roots = [r for r in roots if not is_store_url(r)]
        if store_dest:
            checked.append(check_store_dest(dest, roots, overwrite=overwrite, exists_ok=resume and not overwrite,
                                            storage_options=storage_options, ahead=ahead[0]))
            if not dry_run:  # DEST passed its checks: ask whether it honours conditions while footers are read
                probes.append(Probe(checked[0]))
        else:
            checked.append(check_dest(dest, local_roots, overwrite=overwrite, exists_ok=resume and not overwrite))
        if summary_json is not None and not dry_run:
            check_side_file(summary_json, "--summary-json", None if store_dest else checked[0], local_roots)

    if mask is not None and lengths is not None:
        raise OptionError("give mask or lengths, not both")
    if q is None:
        q_ids = None
    sparse = False
    if measures != ("gaussian_kl",):
        sparse = check_request(measures, options, p_ids=p_ids is not None, q_ids=q_ids is not None,
                               has_q=q is not None, has_target=target is not None)
    sampled = options.p_kind == "sampled"
    if store_dest:
        ahead.append(store_state_ahead(dest, storage_options))
    try:
        plan, roots = scan(source, p=p, q=q, keep=keep, mask=mask, lengths=lengths, p_ids=p_ids, q_ids=q_ids,
                           sampled=sampled, logvars=(p_logvar, q_logvar) if measures == ("gaussian_kl",) else None,
                           target=target, group_by=group_by,
                           task_rows=task_rows, task_bytes=task_bytes, check=check, storage_options=storage_options,
                           group_files=group_files)
        layout = (Layout(measures) if measures == ("gaussian_kl",)
                  else layout_for(measures, options, sequence=plan.sequence, sparse=sparse))
        for k in keep:
            if k in {f.name for f in output_fields(layout, status)}:
                raise OptionError(f"keep column {k!r} has the name of an output column")
        _check_element_types(plan, options)
        if summary_json is not None:
            check_side_file(summary_json, "--summary-json", None if store_dest else checked[0],
                            [r for r in roots if not is_store_url(r)], plan.files.local_paths())
    except BaseException:
        for pr in probes:  # the probe started beside the footers leaves nothing at DEST
            pr.join()
        raise
    dest_p = checked[0]
    if dry_run:
        return DryRun.of(plan, time.perf_counter() - t_start, scheduler, workers)
    # DEST is this job's from here on (one job per DEST): nothing beside DEST (and its probe) was touched before
    job_id = None if resume else new_job_id()  # a resumed job may adopt a staged one's id: named later
    if store_dest:
        hold = StoreClaim.acquire(dest_p, os.fspath(dest), last_writer_wins=last_writer_wins,
                                  probe=probes[0] if probes else None, job_id=job_id)
    else:
        hold = DestLock.acquire(dest_p, os.fspath(dest))
    with hold as lock:
        return _run_locked(
            source, dest, dest_p, plan, lock, layout=layout, options=options, status=status,
            task_rows=task_rows, task_bytes=task_bytes, group_files=group_files, scheduler=scheduler, client=client,
            workers=workers,
            overwrite=overwrite, resume=resume, quiet=quiet, summary_json=summary_json, t_start=t_start,
            grouping=grouping, job_id=job_id,
        )


@dataclass(frozen=True)
class DryRun:
    """What `fastkl run --dry-run` finds: the job's size and an estimate of its wall time.

    The estimate is a model, not a measurement: planning as measured, then
    per task TASK_OVERHEAD_S (scheduling, opening, the part's write), per
    file FILE_OVERHEAD_S (open, footer check), per row group or record batch
    UNIT_OVERHEAD_S (its read set-up), plus the decoded bytes at
    BYTES_PER_CORE_S per core, over the cores or workers used (README: Scale).
    """

    files: int
    rows: int
    file_bytes: int  # bytes of the input files
    decoded_bytes: int  # bytes of the columns read, decoded
    tasks: int
    parts: int
    grouped_tasks: int  # tasks that hold several small files
    plan_s: float
    workers: int
    estimated_s: float

    TASK_OVERHEAD_S = 2e-3
    FILE_OVERHEAD_S = 0.5e-3
    UNIT_OVERHEAD_S = 0.1e-3
    BYTES_PER_CORE_S = 250e6

    @classmethod
    def of(cls, plan: Plan, plan_s: float, scheduler, workers: int | None) -> "DryRun":
        local = scheduler is None or scheduler in LOCAL_SCHEDULERS
        n = (workers or _config.cores()) if local and scheduler not in ("sync", "synchronous") else (workers or 1)
        n = max(1, n)
        work = (len(plan.tasks) * cls.TASK_OVERHEAD_S + len(plan.files) * cls.FILE_OVERHEAD_S
                + plan.files.n_units * cls.UNIT_OVERHEAD_S + plan.nbytes / cls.BYTES_PER_CORE_S)
        return cls(
            files=len(plan.files), rows=plan.rows, file_bytes=int(plan.files.size.sum()),
            decoded_bytes=plan.nbytes, tasks=len(plan.tasks), parts=max(1, len(plan.tasks)),
            grouped_tasks=plan.tasks.grouped, plan_s=plan_s, workers=n,
            estimated_s=plan_s + work / min(n, max(1, len(plan.tasks))),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format_table(self) -> str:
        mb = 1 << 20
        lines = [
            f"files          {self.files:,}",
            f"rows           {self.rows:,}",
            f"input          {self.file_bytes / mb:,.1f} MiB in files, {self.decoded_bytes / mb:,.1f} MiB decoded",
            f"tasks          {self.tasks:,}" + (f" ({self.grouped_tasks:,} of grouped small files)"
                                               if self.grouped_tasks else ""),
            f"parts          {self.parts:,}",
            f"planning       {self.plan_s:.2f} s",
            f"estimated      {self.estimated_s:,.1f} s on {self.workers} worker(s) (a model: README, Scale)",
        ]
        return "\n".join(lines)


def _grouping(group_by, max_groups):
    """group_by / max_groups checked into a `GroupBy` (None without group_by)."""
    from ..summary.stats import DEFAULT_MAX_GROUPS, GroupBy

    if max_groups is not None and (isinstance(max_groups, bool) or not isinstance(max_groups, int)
                                   or max_groups < 1):
        raise OptionError(f"max_groups must be an integer >= 1, got {max_groups!r}")
    if group_by is None:
        return None
    if not isinstance(group_by, str) or not group_by:
        raise OptionError(f"group_by must be a column name, got {group_by!r}")
    return GroupBy(group_by, DEFAULT_MAX_GROUPS if max_groups is None else max_groups)


def _refuse_memory_across_processes(source, dest, scheduler) -> None:
    """memory:// lives in one process: worker processes would each see an empty store."""
    args = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if scheduler in (None, "threads", "sync", "synchronous"):
        return
    if any(scheme_of(a) == "memory" for a in [*args, dest]):
        raise OptionError("memory:// lives in this process only: use the threads scheduler (the default), "
                          "or a store the workers can reach (s3://, gs://, ...)")


def _local_sources(source):
    """SOURCE arguments as local paths (`file://` URLs mapped); store URLs are kept as they are."""
    def one(s):
        return s if is_store_url(s) else local_path(s, "SOURCE")

    if isinstance(source, (str, os.PathLike)):
        return one(source)
    return [one(s) for s in source]


def _run_locked(source, dest, dest_p: Path, plan: Plan, lock: DestLock, *, layout, options, status, task_rows,
                task_bytes, group_files, scheduler, client, workers, overwrite, resume, quiet, summary_json, t_start,
                grouping=None, job_id=None):
    """The job once it holds DEST: everything that reads or writes DEST and its staging directory
    (`job_id`: the new job's id, which a store claim names already)."""
    from ..summary.stats import PartStats, Summary

    cols = plan.columns
    measures = layout.measures
    schema = _out_schema(cols, layout, status)
    in_store = isinstance(dest_p, StoreDest)
    staging = (StoreStaging if in_store else Staging)(dest_p, len(plan.tasks))
    job = {
        "fastkl_version": _version(),
        "columns": {"p": cols.p, "q": cols.q, "keep": list(cols.keep),
                    **{role: name for role, name in cols.roles() if role not in ("p", "q")},
                    **({"group_by": cols.group_by} if cols.group_by is not None else {})},
        "schema": str(schema),
        "measures": list(measures),
        "options": options.to_dict(),
        "status": status,
        "task_rows": task_rows,
        "task_bytes": task_bytes,
        **({"group_files": group_files} if group_files is not None else {}),
    }
    job_fp = json.dumps(job, sort_keys=True, default=_json_default)
    # a large job's inputs and parts go to Parquet tables beside the manifest (fastkl.io.manifest_tables)
    tables = None
    if max(len(plan.tasks), len(plan.files)) > MANIFEST_INLINE:
        from ..io import manifest_tables as mt

        tables = (mt.inputs_table(plan.files), mt.parts_table(plan.tasks, staging.width))
        files = {"table": mt.INPUTS_TABLE, "count": len(plan.files)}
        planned = _identity({**job, "rows": plan.rows, "inputs": files, "plan_digest": mt.digest(*tables)})
    else:
        files = [f.to_dict() for f in plan.files]
        planned = _identity({**job, "rows": plan.rows, "inputs": files, "parts": _parts(plan, staging)})
    if in_store and overwrite and not resume:
        # what is at DEST changes nothing for this job (the commit reads the old manifest anyway): one
        # request less. Otherwise DEST is read again, now that it is ours: another job may have committed
        kind, old = None, None
    else:
        kind, old = _existing(dest, dest_p)
    if kind == "output" or (kind is not None and not in_store and not overwrite):
        # with resume: done already if it is this job's output
        if resume and not overwrite and isinstance(old, dict) and _identity(old) == planned:
            _forget_leftovers(dest_p)
            return _finished(Summary.from_dict(old["summary"]), summary_json)
        # without resume, DEST was absent when checked: another job committed it before this one took
        # DEST, and this one stops as if it had come later ("already exists", exit 2), even when that
        # output is identical (it exited 0 then, committing nothing: two racing jobs both "succeeded")
        if not overwrite:
            raise OptionError(f"DEST {os.fspath(dest)!r} already exists (pass --overwrite to replace it)")
    if resume:
        pending = staging.pending_manifest()  # a commit killed after every part was finished
        if pending is not None and _identity(pending) == planned:
            for part in pending["parts"] if isinstance(pending["parts"], list) else ():
                if "resumed" in part:
                    part["resumed"] = True  # nothing is recomputed
            lock.announce(pending.get("job_id") if isinstance(pending.get("job_id"), str) else None)
            staging.rewrite_pending(pending)
            # an interrupted store commit may have deleted the old manifest already: finish it
            staging.commit_written(overwrite=overwrite or kind == "interrupted", lock=lock)
            return _finished(Summary.from_dict(pending["summary"]), summary_json)
    # --resume continues the staged attempt only if it was this very job; any other is a new job
    job_id = (staging.staged_job_id(job) if resume else None) or job_id or new_job_id()
    if not (in_store and lock.job_id == job_id):  # a store claim names a new job's id from its creation
        lock.announce(job_id)
    finished = staging.prepare(job, job_id, resume=resume)
    spec = JobSpec(measures, options, cols, schema, status, staging, job_fp, layout, grouping)
    resumed = _reusable(plan, finished)
    todo = plan.tasks.select(np.flatnonzero(~resumed))
    staging.drop_extra_parts(len(plan.tasks))

    t_plan = time.perf_counter()
    progress = Progress(plan.rows, plan.nbytes, enabled=Progress.wanted(quiet))
    for i in np.flatnonzero(resumed).tolist():
        progress.done(i, int(plan.tasks.rows[i]), int(plan.tasks.nbytes[i]))
    kind = "threads" if scheduler is None else scheduler if isinstance(scheduler, str) else "client"
    to_close: list = []  # a cluster / connection this call opened, closed in reverse
    merge = _OrderedMerge(resumed, finished.stats, PartStats.for_layout(layout, grouping))

    def on_result(result: dict) -> None:
        finished.add(result["index"], result["state"], result["stats_text"])
        merge.add(result)

    failed = True
    try:
        from .._engine import warmup

        # compile / load the kernel once here, before any worker process starts
        # (numba issue 4807), for every dtype the files of the plan need
        warmup(_kernel_dtypes(plan), _warm_options(options), measures, spec.layout.sparse)
        if todo:
            _run_tasks(todo, plan, spec, progress, kind, scheduler, client, workers, to_close, on_result)
        merge.drain(len(plan.tasks))
        failed = False
    finally:
        progress.close()
        for obj in reversed(to_close):
            try:
                obj.close()
            except Exception:
                pass
        if failed or not in_store or not plan.tasks:
            _keep_states(finished, close=failed)  # logged now: the merge's end may fail too (too many groups)
        else:  # logged beside what follows: the commit's first round trips wait for it (the same if it fails)
            staging.log_beside(finished)
        if failed:  # workers are stopped: keep the staging directory only if --resume has parts to reuse
            staging.discard_if_nothing_finished()
    t_compute = time.perf_counter()

    # Merge in task order: identical whatever ran where and when (this job's cap on groups applies).
    if plan.tasks:
        merged = merge.merged
    else:  # empty input: one empty part keeps DEST a readable dataset
        merged = PartStats.for_layout(layout, grouping)
        empty = staging.write_empty_part(schema)
        if empty is not None:
            finished.add(0, {**empty, "rows": 0, "stats": merged.to_json()})
    timings = {
        "plan_s": t_plan - t_start,
        "compute_s": t_compute - t_plan,
        "task_s": merge.seconds,
    }
    if tables is None:
        parts = _parts(plan, staging)
        for i, part in enumerate(parts[:len(plan.tasks)]):
            part["resumed"] = bool(resumed[i])
    else:
        parts = {"table": mt.PARTS_TABLE, "count": len(plan.tasks)}
    timings["total_s"] = time.perf_counter() - t_start
    summary = Summary.from_stats(
        merged, dest=str(dest_p), options=options.to_dict(), timings=timings, files=len(plan.files)
    )
    manifest = {
        "fastkl_version": _version(),
        "job_id": job_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": [os.fspath(s) for s in ([source] if isinstance(source, (str, os.PathLike)) else source)],
        "dest": str(dest_p),
        "columns": job["columns"],
        "measures": list(measures),
        "options": options.to_dict(),
        "status": status,
        "task_rows": task_rows,
        "task_bytes": task_bytes,
        "rows": plan.rows,
        "inputs": files,
        "parts": parts,
        **({"plan_digest": planned["plan_digest"]} if tables is not None else {}),
        "summary": summary.to_dict(),
        "timings": timings,
    }
    manifest = json.loads(json.dumps(manifest, default=_json_default))
    staging.drop_extra_parts(max(1, len(plan.tasks)))  # temporaries of attempts lost with a dead worker
    if tables is not None:
        mt.write(staging.root, tables[0], tables[1].append_column("resumed", pa.array(resumed)),
                 open_output=staging.open_upload if in_store else None)
    if not in_store:  # a store's staging logs what is left beside its commit's first round trips
        finished.flush()
    staging.commit(manifest, overwrite=overwrite, lock=lock, n_parts=len(plan.tasks), finished=finished)
    return _finished(summary, summary_json)


def _reusable(plan: Plan, finished) -> np.ndarray:
    """Which parts an earlier attempt finished (logged, their files unchanged) on input that is
    unchanged too (same fingerprint, read batch size and rows): --resume does not redo them."""
    resumed = np.zeros(len(plan.tasks), bool)
    for i in np.flatnonzero(finished.done[:len(plan.tasks)]).tolist():
        st, t = finished.record(i), plan.tasks[i]
        resumed[i] = (st.get("fingerprint") == _fingerprint(t) and st.get("batch_rows") == int(plan.batch_rows[i])
                      and st.get("rows") == t.rows)
    return resumed


def _keep_states(finished, close: bool) -> None:
    """Once the tasks have stopped: log the states still waiting, so that --resume reuses their
    parts whatever fails next; a failing job's error is its own, not this one's."""
    try:
        finished.flush()
    except OSError:
        if not close:
            raise
    if close:
        finished.close()


class _OrderedMerge:
    """Task results merged into one summary state as they arrive, in task order.

    A result that arrives before an earlier task's waits (the scheduler's
    window bounds how many), then everything up to the first missing task is
    merged and dropped: the client holds one merged state, not one per task.
    The merge is `PartStats.merge` in task order, the same fold as merging the
    list of every task's state, so the summary does not depend on the order
    of arrival (nor, its sums being exact, on how the job was split).
    `reused[i]`: part i was finished by an earlier attempt (--resume), its state
    read with `stats_of(i)` when its turn comes; `start`: the state merged into first.
    """

    BATCH = 64  # states merged at once by `PartStats.merge_all` (which copies its first: once per batch)

    def __init__(self, reused: np.ndarray, stats_of: Callable[[int], dict], start=None):
        self.reused, self.stats_of = reused, stats_of
        self.waiting: dict[int, dict] = {}
        self.next = 0
        self._merged = start  # an empty state of the job's layout (and its cap on groups), or None
        self._ready: list = []  # in task order, not yet folded into _merged
        self.seconds = 0.0

    @property
    def merged(self):
        self._fold()
        return self._merged

    def _fold(self) -> None:
        from ..summary.stats import PartStats

        if self._ready:
            self._merged = PartStats.merge_all(([self._merged] if self._merged is not None else []) + self._ready)
            self._ready = []

    def add(self, result: dict) -> None:
        self.seconds += result["seconds"]
        self.waiting[result["index"]] = result["stats"]
        self._advance()

    def _advance(self) -> None:
        from ..summary.stats import PartStats

        while True:
            st = self.waiting.pop(self.next, None)
            if st is None and self.next < len(self.reused) and self.reused[self.next]:
                st = self.stats_of(self.next)
            if st is None:
                return
            self._ready.append(PartStats.from_json(st))
            if len(self._ready) >= self.BATCH:
                self._fold()
            self.next += 1

    def drain(self, n_tasks: int) -> None:
        self._advance()
        if self.next != n_tasks:  # a scheduler lost a result: never commit a summary without it
            raise AssertionError(f"merged {self.next} of {n_tasks} task results")


def _finished(summary, summary_json):
    if summary_json is not None:
        with open(summary_json, "w") as fh:
            json.dump(summary.to_dict(), fh, indent=1)
            fh.write("\n")
    return summary


def _parts(plan: Plan, staging: Staging) -> list[dict]:
    """The manifest's list of parts (without the `resumed` flags)."""
    if not plan.tasks:  # empty input: one empty part keeps DEST a readable dataset
        return [{"file": staging.part_name(0), "input": None, "row_start": 0, "rows": 0}]
    return [_part(t, staging) for t in plan.tasks]


def _part(t: Task, staging) -> dict:
    """One part in the manifest: its input file (the first one and `inputs`, the range of the
    files it groups, if it groups small files), its first row in that file, its rows, and
    (one file) the row groups or record batches it holds."""
    out = {"file": staging.part_name(t.index), "input": t.file.index, "row_start": t.row_start, "rows": t.rows}
    if t.group:
        out["inputs"] = [t.group[0].file.index, t.group[-1].file.index]
    else:
        out[t.unit_name().replace(" ", "_") + "s"] = [u.index for u in t.units]
    return out


_IDENTITY = ("fastkl_version", "columns", "measures", "options", "status", "task_rows", "task_bytes", "rows",
             "inputs", "parts", "plan_digest")


def _identity(m: dict) -> dict:
    """What makes a manifest this job's, on this input: not when, where or how fast it ran."""
    out = {k: m.get(k) for k in _IDENTITY}
    parts = m.get("parts")
    out["parts"] = [
        {k: v for k, v in p.items() if k != "resumed"}
        for p in (parts if isinstance(parts, list) else [])
        if isinstance(p, dict)
    ]
    return json.loads(json.dumps(out, default=_json_default))


def _existing(dest, dest_p) -> tuple[str | None, dict | None]:
    """What is at DEST now (kind as `dest_kind` says) and its manifest; a foreign DEST is refused."""
    if isinstance(dest_p, StoreDest):
        kind, old = store_dest_state(dest_p)
        if kind not in (None, "output", "empty", "interrupted"):
            raise OptionError(f"DEST {os.fspath(dest)!r} exists and is not a fastkl output ({kind})")
        return (None if kind == "empty" else kind), old
    kind = dest_kind(dest_p)
    if kind not in (None, "output", "empty"):
        refuse_foreign_dest(dest, kind)
    old = _read_json(dest_p / MANIFEST) if is_regular_file(dest_p / MANIFEST) else None
    return kind, old


def _forget_leftovers(dest_p) -> None:
    """DEST is already this job's complete output: drop what a kill after the commit left."""
    if isinstance(dest_p, StoreDest):
        store_remove_leftovers(dest_p)
    else:
        _remove_quietly(old_path(dest_p))


def _remove_quietly(path: Path) -> None:
    from ..io.output import _remove

    try:
        _remove(path)
    except OSError:
        pass
