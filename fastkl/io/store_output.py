"""Output side of a job whose DEST is in an object store: claim, staging, rename-free commit (docs/guide/storage.md).

Object stores have no rename and no lock, so the local design of
`fastkl.io.output` (flock, rename of the staging directory) is kept another
way, with conditional writes (`store_conditional`)::

    DEST/_fastkl-claim.json                  1. created If-None-Match: * (exactly one job gets it);
                                                refreshed If-Match: <etag> every few seconds
    DEST/_fastkl-staging/<job id>/job.json   2. the job's fingerprint (what --resume may adopt)
        part-000003.<attempt>.parquet           tasks upload parts here (an upload is invisible until
        states-000001-000001.log                complete); the client logs their states in batch objects
                                                (fastkl.io.state_log): a state names the attempt that counts
        _commit.json                         3. the manifest to be, written when every part is staged
    DEST/part-000003.parquet                 4. server-side copies of the staged parts (no data
                                                through the client)
    DEST/_fastkl.json                        5. the manifest, created If-None-Match: * -- the commit
                                             6. staging removed, pending uploads aborted, claim deleted

Readers (pyarrow.dataset, Polars, DuckDB, Spark) skip `_` names, so before
step 4 a reader lists nothing at DEST. DEST exists when its manifest does.
A kill at any step leaves what --resume needs: before 3 the staged parts
(reused), after 3 the commit record (4-6 are redone from it, nothing is
recomputed). A dead job's claim is taken over (If-Match on its ETag, so
of two jobs taking it over one wins) when its process is gone (same host)
or when it has not been refreshed for `FASTKL_CLAIM_STALE_S` seconds.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import posixpath
import socket
import threading
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import DataError, DestTakenError, FastKLWarning, OptionError
from .store_conditional import Conditional, conditional
from . import manifest_tables as mt
from .state_log import FinishedParts, StoreLogs
from .stores import Store, resolve

MANIFEST = "_fastkl.json"
CLAIM = "_fastkl-claim.json"
STAGING = "_fastkl-staging"
COMMIT = "_commit.json"
JOB = "job.json"
PROBE = "_fastkl-probe"


def claim_stale_s() -> float:
    """Seconds without a refresh after which a claim counts as its job's death."""
    return float(os.environ.get("FASTKL_CLAIM_STALE_S", "60"))


@dataclass(frozen=True)
class StoreDest:
    """DEST in a store: picklable, so staging and tasks can carry it."""

    store: Store
    path: str

    def __str__(self) -> str:
        return self.store.url(self.path)

    def key(self, *names: str) -> str:
        return posixpath.join(self.path, *names)

    @property
    def fs(self) -> pafs.FileSystem:
        return self.store.fs


def _why(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def read_json(cond: Conditional, path: str) -> Any | None:
    v = cond.read(path)
    if v is None:
        return None
    try:
        return json.loads(v.data)
    except ValueError:
        return None


def put_json(store: Store, path: str, obj: Any) -> None:
    """An unconditional small object (state files; an upload is atomic: whole or absent)."""
    data = (json.dumps(obj, separators=(",", ":"), allow_nan=True) + "\n").encode()  # C encoder: fast
    conditional(store).put(path, data)


def _entries(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except FileNotFoundError:
        return []


def visible(dest: StoreDest) -> list[str]:
    """What a dataset reader lists at DEST: objects and prefixes not starting with `_` or `.`."""
    return sorted(e.path for e in _entries(dest.fs, dest.path)
                  if not posixpath.basename(e.path).startswith(("_", ".")))


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def store_dest(dest: str, storage_options: dict | None) -> StoreDest:
    store, path = resolve(dest, storage_options)
    if "/" not in path.strip("/") and store.is_s3:
        raise OptionError(f"DEST {dest!r} is a whole bucket: give a prefix inside it (s3://bucket/out)")
    return StoreDest(store, path)


def dest_kind(dest: StoreDest) -> str | None:
    """None (nothing), "output" (a manifest), "interrupted" (a commit killed while publishing:
    --resume or --overwrite finish it), "empty", or what else it is, for the refusal."""
    return dest_state(dest)[0]


def dest_state(dest: StoreDest) -> tuple[str | None, Any]:
    """`dest_kind` and the manifest it read (parsed; None if absent or not JSON): one GET."""
    cond = conditional(dest.store)
    found = cond.read(dest.key(MANIFEST))
    if found is not None:
        try:
            return "output", json.loads(found.data)
        except ValueError:
            return "output", None
    shown = visible(dest)
    if not shown:
        return (None if not _entries(dest.fs, dest.path) else "empty"), None
    if pending_commits(dest):
        return "interrupted", None
    return f"a prefix holding {len(shown)} other object(s), e.g. {dest.store.url(shown[0])}", None


def _in_thread(name: str, fn: Callable[[], Any], daemon: bool = True) -> Future:
    """`fn()` run in a thread of its own: its result, or its error, raised where the job waits for it."""
    out: Future = Future()

    def run() -> None:
        try:
            out.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - raised by whoever takes the result
            out.set_exception(e)

    threading.Thread(target=run, name=name, daemon=daemon).start()
    return out


def state_ahead(dest: str, storage_options: dict | None) -> Future:
    """`dest_state` read in a thread, so that it overlaps SOURCE's listing; `check_store_dest` takes
    it (a read only: DEST is not touched before its checks, and an error is raised where they run)."""
    return _in_thread("fastkl-dest", lambda: dest_state(store_dest(dest, storage_options)))


def check_store_dest(dest: str, roots: Iterable[str], *, overwrite: bool, exists_ok: bool,
                     storage_options: dict | None, ahead: Future | None = None) -> StoreDest:
    """Refuse DEST overlapping SOURCE, a foreign DEST, or an existing one without overwrite
    (`ahead`: `state_ahead`'s read of DEST, else DEST is read here)."""
    d = store_dest(dest, storage_options)
    for root in roots:
        if isinstance(root, str) and root.startswith(d.store.protocol + "://"):
            if _overlaps(str(d), root):
                raise OptionError(f"DEST {dest!r} overlaps SOURCE {root!r}: "
                                  "DEST must be outside the input and must not contain it")
    kind = ahead.result()[0] if ahead is not None else dest_kind(d)
    if kind not in (None, "output", "empty", "interrupted"):
        raise OptionError(f"DEST {dest!r} exists and is not a fastkl output ({kind}): refusing to replace it; "
                          "choose another DEST")
    if kind == "output" and not overwrite and not exists_ok:
        raise OptionError(f"DEST {dest!r} already exists (pass --overwrite to replace it)")
    return d


def pending_commits(dest: StoreDest) -> list[str]:
    """Staged jobs whose commit had started (their commit record exists)."""
    out = []
    for e in _entries(dest.fs, dest.key(STAGING)):
        if e.type == pafs.FileType.Directory and dest.fs.get_file_info(posixpath.join(e.path, COMMIT)).size:
            out.append(e.path)
    return out


# --------------------------------------------------------------------------
# The claim: one job per DEST


def _alive_here(info: dict) -> bool | None:
    """Whether the claim's process runs (None: it is on another host, so we cannot tell)."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return None
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(info: Any) -> str:
    if not isinstance(info, dict):
        return "which has not said who it is"
    job = f", job {info['job_id']}" if info.get("job_id") else ""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}{job}"


class Probe:
    """Whether a store DEST honours conditional creates, asked in a thread of its own so that the
    job can plan meanwhile (run() starts it once DEST has passed its checks, beside the footer reads):
    two creates of `DEST/_fastkl-probe-<random>` (a `_` name: no reader lists it), the second must be
    refused. `ok()` waits for the answer, `join()` for the probe's delete, which nothing waits for
    before the claim is taken (a probe a kill leaves is dropped by later jobs, `drop_stale_probes`)."""

    def __init__(self, dest: StoreDest):
        self.cond = conditional(dest.store)
        self._answer: Future = Future()
        self._thread: threading.Thread | None = None
        if not self.cond.supported:
            self._answer.set_result(False)
            return
        # the probe's key is its own (not under the staging prefix, which the winner of a race clears)
        path = dest.key(f"{PROBE}-{uuid.uuid4().hex[:12]}")
        self._thread = threading.Thread(target=self._run, args=(path,), name="fastkl-probe", daemon=True)
        self._thread.start()

    def _run(self, path: str) -> None:
        try:
            self.cond.probe(path, self._answer.set_result)
        except BaseException as e:  # noqa: BLE001 - handed to the thread that waits for the answer
            if not self._answer.done():
                self._answer.set_exception(e)

    def ok(self) -> bool:
        return self._answer.result()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


class StoreClaim:
    """One job's hold on a store DEST: `DEST/_fastkl-claim.json`, created conditionally and
    refreshed by a thread. The store's counterpart of `DestLock` (same methods)."""

    def __init__(self, dest: StoreDest, display: str, cond: Conditional, etag: str, info: dict,
                 probe: Probe | None = None):
        self.dest, self.display, self.cond, self._probe = dest, display, cond, probe
        self.path = dest.key(CLAIM)
        self._etag, self.info = etag, info
        self._mutex = threading.Lock()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="fastkl-claim", daemon=True)
        self._beat.start()

    @classmethod
    def acquire(cls, dest: StoreDest, display: str, *, last_writer_wins: bool = False,
                probe: Probe | None = None, job_id: str | None = None) -> "StoreClaim":
        """Take DEST or raise DestTakenError naming the live job that holds it.

        `probe`: the conditional-write probe, started earlier (else started
        now); no claim is written before its answer. `job_id`: named in the
        claim as it is created (a job that knows its id saves the `announce`).
        """
        probe = probe if probe is not None else Probe(dest)
        try:
            supported = probe.ok()
        except BaseException:
            probe.join()
            raise
        if not supported:
            if not last_writer_wins:
                probe.join()  # nothing of this job is left at DEST
                raise OptionError(
                    f"DEST {display!r}: this store does not support conditional writes (If-None-Match), so two "
                    "jobs could both write DEST; pass --last-writer-wins (last_writer_wins=True) to accept that")
            warnings.warn(FastKLWarning(f"DEST {display!r}: no conditional writes on this store: "
                                        "last writer wins if two jobs run at once"), stacklevel=2)
        cond = probe.cond
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "job_id": job_id, "token": uuid.uuid4().hex}
        data = json.dumps(info).encode()
        path = dest.key(CLAIM)
        try:
            return cls._take(dest, display, cond, path, data, info, probe)
        except BaseException:
            probe.join()
            raise

    @classmethod
    def _take(cls, dest: StoreDest, display: str, cond: Conditional, path: str, data: bytes, info: dict,
              probe: Probe) -> "StoreClaim":
        for _ in range(5):
            etag = cond.create(path, data)
            if etag is not None:
                return cls(dest, display, cond, etag, info, probe)
            old = cond.read(path)
            if old is None:
                continue  # released meanwhile: try again
            try:
                held = json.loads(old.data)
            except ValueError:
                held = None
            if not _dead(held, old.mtime):
                raise DestTakenError(f"DEST {display!r} is taken by another fastkl job ({holder(held)}); "
                                     "wait for it to end or stop it")
            etag = cond.replace(path, data, old.etag)  # of two jobs taking over a dead claim, one wins
            if etag is not None:
                return cls(dest, display, cond, etag, info, probe)
        raise DestTakenError(f"DEST {display!r} is taken by other fastkl jobs starting and ending in turn")

    def _refresh(self) -> None:
        with self._mutex:
            if self._lost:
                return
            etag = self.cond.replace(self.path, json.dumps(self.info).encode(), self._etag)
            if etag is None:
                now = read_json(self.cond, self.path)
                self._lost = f"(it now names {holder(now)})" if now else "(it was removed)"
            else:
                self._etag = etag

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.2, claim_stale_s() / 4)):
            try:
                self._refresh()
            except OSError:
                pass  # a transient failure: the next beat tries again

    @property
    def job_id(self) -> str | None:
        """The job id the claim names now."""
        return self.info.get("job_id")

    def announce(self, job_id: str | None) -> None:
        """Name the job id in the claim, for a job that finds DEST taken."""
        self.info["job_id"] = job_id
        self._refresh()

    def check(self, staging: Any = None) -> None:
        """Before the commit: the claim is still this job's (refreshed now)."""
        self._refresh()
        if self._lost:
            raise DestTakenError(f"the claim {self.dest.store.url(self.path)} of DEST {self.display!r} was taken "
                                 f"while this job ran {self._lost}; not committing")

    def release(self) -> None:
        """Stop refreshing and delete the claim if it is still ours: the version this job wrote
        last (a conditional delete, If-Match its ETag: one request, no read before)."""
        self._stop.set()
        try:
            with self._mutex:
                if self._lost:
                    return
                self._lost = "(released)"
                try:
                    self.cond.delete_if(self.path, self._etag)
                except OSError:
                    pass  # a claim left behind is taken over by the next job
        finally:
            if self._probe is not None:
                self._probe.join()

    def __enter__(self) -> "StoreClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _dead(held: Any, mtime: float) -> bool:
    """A claim whose process is gone (same host), or that nobody refreshed for a while."""
    if time.time() - mtime > claim_stale_s():  # a live job refreshes it 4 times as often (pid reuse too)
        return True
    return isinstance(held, dict) and _alive_here(held) is False


# --------------------------------------------------------------------------
# Staging and commit


class StoreStaging:
    """The staging prefix of one store DEST; the methods of `fastkl.io.output.Staging`."""

    def __init__(self, dest: StoreDest, n_parts: int):
        self.dest = dest
        self.n_parts = n_parts
        self.width = max(6, len(str(max(n_parts - 1, 0))))
        self.job_id: str | None = None
        self.retries = 4  # a task whose upload fails transiently runs again (backoff)
        self._uploads: dict[str, Any] = {}  # tmp -> its upload, in the process writing it
        self._setup: Future | None = None  # prepare's writes that run beside the tasks (a new job id)
        self._logging: Future | None = None  # the last batch of states, logged beside the manifest's making

    def __getstate__(self) -> dict:
        # each stays in the process that has it
        return dict(self.__dict__, _uploads={}, _setup=None, _logging=None)

    @property
    def top(self) -> str:
        return self.dest.key(STAGING)

    @property
    def root(self) -> str:
        return posixpath.join(self.top, self.job_id or "_none")

    def __str__(self) -> str:
        return self.dest.store.url(self.root)

    def part_name(self, index: int) -> str:
        return f"part-{index:0{self.width}d}.parquet"

    def _cond(self) -> Conditional:
        return conditional(self.dest.store)

    def pending_manifest(self) -> dict | None:
        """The manifest of an attempt killed during its commit (its commit record), if any."""
        for root in pending_commits(self.dest):
            rec = read_json(self._cond(), posixpath.join(root, COMMIT))
            if isinstance(rec, dict) and isinstance(rec.get("manifest"), dict):
                m = dict(rec["manifest"])
                m["_staged_root"] = root
                return m
        return None

    def rewrite_pending(self, manifest: dict) -> None:
        """Adopt the interrupted commit of `manifest` (its record stays as it was written)."""
        root = manifest.pop("_staged_root")
        self.job_id = posixpath.basename(root)
        rec = read_json(self._cond(), posixpath.join(root, COMMIT))
        put_json(self.dest.store, posixpath.join(root, COMMIT), {"manifest": manifest, "objects": rec["objects"]})

    def staged_job_id(self, job: dict) -> str | None:
        """The id of a staged attempt of this very job (its fingerprint is `job`)."""
        for e in _entries(self.dest.fs, self.top):
            if e.type == pafs.FileType.Directory:
                mark = read_json(self._cond(), posixpath.join(e.path, JOB))
                if isinstance(mark, dict) and mark.get("job") == job and isinstance(mark.get("job_id"), str):
                    return mark["job_id"]
        return None

    def prepare(self, job: dict, job_id: str, *, resume: bool) -> FinishedParts:
        """Start staging job `job_id` (every other staged attempt is dead: this job holds the claim
        and removes them); its finished parts (with resume, those the staged attempt of this very
        job logged whose objects are still the ones it uploaded).

        A new job id has nothing staged under it, so nothing the tasks do waits for these writes:
        the removal of dead attempts and the job's mark run in a thread beside the tasks, and the
        commit (or the end of a failed job) waits for them (`settle`). The mark is one PUT sent as
        the tasks start, so it lands long before a part is finished; a kill before it lands leaves
        parts that --resume cannot adopt (without the mark they are not this job's): they are redone,
        never mixed in."""
        self.job_id = job_id
        mark = {"job_id": job_id, "job": job}
        fs, cond = self.dest.fs, self._cond()
        n = max(1, self.n_parts)
        if not resume:  # a new job id: nothing is staged under it (nothing read, no log listed)
            self._setup = _in_thread("fastkl-staging", lambda: self._setup_new(mark))
            return FinishedParts(StoreLogs(fs, self.root, cond, fresh=True), n, job_id)
        self._drop_others()
        if read_json(cond, posixpath.join(self.root, JOB)) != mark:
            cond.delete_prefix(self.root)
            put_json(self.dest.store, posixpath.join(self.root, JOB), mark)
            return FinishedParts(StoreLogs(fs, self.root, cond, fresh=True), n, job_id)
        finished = FinishedParts(StoreLogs(fs, self.root, cond), n, job_id)
        sizes: dict[str, int] = {}  # the staged objects' sizes: one listing, not a HEAD per part

        def vouched(st: Any) -> bool:
            if not sizes:
                sizes.update((posixpath.basename(e.path), e.size) for e in _entries(fs, self.root)
                             if e.type == pafs.FileType.File)
            return self._vouched(st, sizes)

        finished.load(vouched)
        return finished

    def _drop_others(self) -> None:
        cond = self._cond()
        for e in _entries(self.dest.fs, self.top):
            if e.path != self.root and posixpath.basename(e.path) != CLAIM:
                _delete(cond, e)

    def _setup_new(self, mark: dict) -> None:
        with ThreadPoolExecutor(max_workers=2) as ex:  # two independent round trips at once
            done = [ex.submit(self._drop_others),
                    ex.submit(put_json, self.dest.store, posixpath.join(self.root, JOB), mark)]
            for f in done:
                f.result()

    def settle(self) -> None:
        """Wait for prepare's writes that ran beside the tasks; their failure is the job's."""
        setup, self._setup = self._setup, None
        if setup is not None:
            setup.result()

    def log_beside(self, finished: FinishedParts) -> None:
        """Every task has finished: the states still waiting for their batch are logged in a thread
        while the job makes its manifest (and uploads its tables); the commit waits for that beside
        its first round trips. Not a daemon: a job failing meanwhile still logs them for --resume.
        prepare's writes are waited for first: nothing of them may land after a later failure
        released the claim."""
        self.settle()
        self._logging = _in_thread("fastkl-states", finished.flush, daemon=False)

    def _logged(self, finished: FinishedParts) -> None:
        """Every state logged (those `log_beside` sent, then any added since), and the logs closed."""
        logging, self._logging = self._logging, None
        if logging is not None:
            logging.result()
        finished.flush()
        finished.close()

    def _vouched(self, st: Any, sizes: dict[str, int] | None = None) -> bool:
        """The staged object this state names exists with its size, written by this job
        (`sizes`: the staged objects' sizes from a listing, else a HEAD of the one named)."""
        if not isinstance(st, dict) or st.get("job_id") != self.job_id or not isinstance(st.get("object"), str):
            return False
        if sizes is not None:
            return sizes.get(st["object"]) == st.get("part_size")
        info = self.dest.fs.get_file_info(posixpath.join(self.root, st["object"]))
        return info.type == pafs.FileType.File and info.size == st.get("part_size")

    def check_parts(self, n_parts: int, finished: FinishedParts) -> list[str]:
        """Before the commit: every part is staged and vouched; the staged object of each. The
        states are those the client holds (`finished`): what its tasks reported for the objects
        they uploaded, and those --resume vouched for by a listing; none is read back."""
        out = []
        for i in range(n_parts):
            st = finished.record(i)
            if st is None or not self._vouched(st, {st.get("object"): st.get("part_size")}):
                raise DataError(f"{self.part_name(i)} in {self} is not the part this job wrote; "
                                "not committing: run the job again with --resume")
            out.append(st["object"])
        return out

    # The methods below run inside Dask tasks, possibly on other machines: only the store is shared.
    def tmp_part(self, index: int) -> str:
        return posixpath.join(self.root, f"{self.part_name(index)[:-8]}.{uuid.uuid4().hex[:12]}.parquet")

    def part_writer(self, tmp: str, schema: pa.Schema) -> pq.ParquetWriter:
        """A part written to the store as it is computed (on S3 one PUT when it closes, if small)."""
        upload = self._cond().open_upload(tmp)
        self._uploads[tmp] = upload
        return pq.ParquetWriter(upload, schema)

    def open_upload(self, path: str) -> Any:
        """A writable file whose bytes appear at `path` once closed (on S3 one PUT if small)."""
        return self._cond().open_upload(path)

    def discard_tmp(self, tmp: str) -> None:
        upload = self._uploads.pop(tmp, None)
        if hasattr(upload, "abort"):
            upload.abort()
        try:
            self._cond().delete(tmp)
        except OSError:
            pass

    def publish_part(self, index: int, tmp: str) -> dict:
        """Upload the written part (if its writer did not) and say what names the attempt in the
        part's state (logged by the client): the last finished attempt counts. Its size is what
        was uploaded (no HEAD)."""
        upload = self._uploads.pop(tmp, None)
        if upload is not None:
            size = upload.tell()
            upload.close()  # uploaded now if the writer did not close it
        else:
            size = self.dest.fs.get_file_info(tmp).size
        return {"object": posixpath.basename(tmp), "part_size": size}

    def write_empty_part(self, schema: pa.Schema) -> dict:
        """Empty input: one empty part keeps DEST a readable dataset; its state, to log."""
        tmp = self.tmp_part(0)
        with self.part_writer(tmp, schema) as w:
            w.write_table(schema.empty_table())
        return self.publish_part(0, tmp)

    def discard_if_nothing_finished(self) -> None:
        try:
            self.settle()
        except OSError:
            pass
        try:
            if not StoreLogs(self.dest.fs, self.root, self._cond()).any():
                self._cond().delete_prefix(self.root)
                self._cond().drop_if_empty(self.top)
        except OSError:
            pass

    def drop_extra_parts(self, n_parts: int) -> None:
        """Nothing to do before the commit: only the attempts the states name are published."""

    def commit(self, manifest: dict, *, overwrite: bool, lock: StoreClaim, n_parts: int,
               finished: FinishedParts) -> None:
        self.settle()
        objects = self.check_parts(max(1, n_parts), finished)
        rec = json.loads(json.dumps({"manifest": manifest, "objects": objects}, allow_nan=True))
        self.commit_written(overwrite=overwrite, lock=lock, rec=rec, beside=lambda: self._logged(finished))

    def commit_written(self, *, overwrite: bool, lock: StoreClaim, rec: dict | None = None,
                       beside: Callable[[], None] | None = None) -> None:
        """Steps 3-6: the commit record (`rec` is written; None: read, after a kill and by
        `fastkl clean`), then the copies and the manifest. The claim's refresh, the record, the
        read of the old manifest (and `beside`: the last states logged) are independent round
        trips, made at once; no copy starts before all of them are done."""
        cond, fs, dest = self._cond(), self.dest.fs, self.dest
        record = posixpath.join(self.root, COMMIT)
        with ThreadPoolExecutor(max_workers=4) as ex:
            logged = ex.submit(beside) if beside is not None else None
            checked = ex.submit(lock.check)
            got = (ex.submit(put_json, dest.store, record, rec) if rec is not None
                   else ex.submit(read_json, cond, record))
            previous = ex.submit(read_json, cond, dest.key(MANIFEST))
            checked.result()
            rec = rec if rec is not None else got.result()
            got.result()
            old = previous.result()
            if logged is not None:
                logged.result()
        manifest, objects = rec["manifest"], rec["objects"]
        if old is not None:
            if not overwrite:
                raise OptionError(f"DEST {dest} appeared while the job ran; output left in {self}")
            cond.delete(dest.key(MANIFEST))  # DEST stops existing (for fastkl) while it is replaced
        names = mt.part_files(manifest)  # a large job's parts and inputs are tables, copied beside the manifest
        tables = [t for t in (mt.INPUTS_TABLE, mt.PARTS_TABLE) if isinstance(manifest.get("parts"), dict)]
        copies = list(zip(names, objects)) + [(t, t) for t in tables]
        with ThreadPoolExecutor(max_workers=min(16, len(copies) + 3)) as ex:
            # beside the copies: DEST's listing (the new names are kept anyway), and what step 6 removes (every
            # object of this job is staged by now, its logs and commit record included; nothing is deleted
            # before step 5)
            listed = ex.submit(_entries, fs, dest.path)
            staged = ex.submit(cond.keys, self.root) if cond.flat else None
            pending = ex.submit(cond.pending_uploads, self.top)
            list(ex.map(lambda no: fs.copy_file(posixpath.join(self.root, no[1]), dest.key(no[0])), copies))
            keep = set(names)
            old_tables = {mt.INPUTS_TABLE, mt.PARTS_TABLE} - set(tables)  # an older output's: not this manifest's
            entries = listed.result()
            for e in entries:  # parts of an older, longer output, and its manifest tables
                name = posixpath.basename(e.path)
                if name in old_tables or (not name.startswith(("_", ".")) and name not in keep):
                    _delete(cond, e)
        data = json.dumps(manifest, indent=1, allow_nan=True).encode() + b"\n"
        if cond.create(dest.key(MANIFEST), data) is None:
            other = read_json(cond, dest.key(MANIFEST))
            job = other.get("job_id") if isinstance(other, dict) else "?"
            raise DestTakenError(f"DEST {dest} was committed by another fastkl job (job {job}) meanwhile")
        # on a store without directories (S3) what step 6 removes is named already, so the claim goes at
        # the same time: a job taking DEST meanwhile has nothing of its own there that this one could remove
        self.remove(entries, staged.result() if staged is not None else None, pending.result(),
                    release=lock.release if staged is not None else None)

    def remove(self, listed: list[pafs.FileInfo] | None = None, staged: list[str] | None = None,
               pending: list[tuple[str, str]] | None = None, release: Callable[[], None] | None = None) -> None:
        """Drop this job's staged objects and pending uploads, and the staging prefix if empty;
        what the commit listed beside its copies is not listed again (`listed`: DEST, for the stale
        probes; `staged`: this job's objects; `pending`: the uploads under staging; `release`: the
        claim's, at the same time)."""
        cond = self._cond()
        with ThreadPoolExecutor(max_workers=4) as ex:  # independent round trips at once
            done = [ex.submit(cond.delete_prefix, self.root) if staged is None else ex.submit(cond.delete_keys, staged),
                    # this job holds DEST: any upload under staging is dead
                    ex.submit(cond.abort_uploads, self.top, pending),
                    ex.submit(drop_stale_probes, self.dest, 60.0, listed)]
            if release is not None:
                done.append(ex.submit(release))
            for f in done:
                f.result()
        cond.drop_if_empty(self.top)


def drop_stale_probes(dest: StoreDest, age_s: float = 60.0, listed: list[pafs.FileInfo] | None = None) -> None:
    """Probe objects of jobs killed while probing. A probe lives milliseconds: one older than
    `age_s` is a dead job's (a younger one may be another job's probe in progress: kept).
    `listed`: a listing of DEST taken moments ago (the commit's), else DEST is listed here."""
    now = time.time()
    for e in (listed if listed is not None else _entries(dest.fs, dest.path)):
        name = posixpath.basename(e.path)
        if name.startswith(PROBE) and e.type == pafs.FileType.File and now - (e.mtime_ns or 0) / 1e9 > age_s:
            _delete(conditional(dest.store), e)


def _delete(cond: Conditional, e: pafs.FileInfo) -> None:
    if e.type == pafs.FileType.Directory:
        cond.delete_prefix(e.path)
    elif e.type == pafs.FileType.File:
        cond.delete(e.path)


def remove_leftovers(dest: StoreDest) -> None:
    """After a job found DEST already complete: what a kill after its commit left."""
    cond = conditional(dest.store)
    cond.delete_prefix(dest.key(STAGING))
    cond.abort_uploads(dest.key(STAGING))
    drop_stale_probes(dest)


def clean(dest: StoreDest, display: str) -> str:
    """`fastkl clean DEST`: finish a commit a dead job had started, else drop what it staged.

    Refused (DestTakenError) while a live job holds DEST. Returns what was done.
    """
    with StoreClaim.acquire(dest, display, last_writer_wins=True) as claim:
        staging = StoreStaging(dest, 1)
        pending = staging.pending_manifest()
        if pending is not None:
            staging.rewrite_pending(pending)
            staging.commit_written(overwrite=True, lock=claim)
            what = f"finished the commit of job {staging.job_id}"
        else:
            staged = [posixpath.basename(e.path) for e in _entries(dest.fs, dest.key(STAGING))
                      if e.type == pafs.FileType.Directory]
            aborted = conditional(dest.store).abort_uploads(dest.key(STAGING))
            conditional(dest.store).delete_prefix(dest.key(STAGING))
            drop_stale_probes(dest, age_s=0.0)  # clean is explicit: the user says no job is starting
            what = (f"removed the staged parts of {len(staged)} job(s)" if staged else "nothing staged")
            if aborted:
                what += f", aborted {aborted} pending upload(s)"
        return what
