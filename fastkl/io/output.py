"""Output side of a job: staging beside DEST, per-part state for --resume, atomic commit.

Layout while a job runs::

    DEST.fastkl-lock                 held (flock) by the running job: pid, host, start, job id
    DEST.fastkl-staging/
        part-000000.parquet          finished parts, final names
        _state/job.json              marks the directory as fastkl's: the job's id and fingerprint
        _state/states-000001.log     the finished parts' states, appended by the client in batches
                                     (fastkl.io.state_log): job id, input fingerprint, rows, the
                                     part file's size / inode / mtime, stats

DEST is exclusive: a job takes `DestLock` before it looks at DEST or touches
the staging directory and holds it until it has committed or given up. The
lock is `flock` on the lock file, which the kernel drops when the process
dies (SIGKILL, a lost machine's NFS lease), so a dead job never blocks the
next one; its file stays behind, unlocked, and is taken over. A job that
finds the lock held fails at once naming the holder. Before the commit's
rename the job checks that the lock file is still the one it holds.

Every job has a random id, kept in `_state/job.json`; `--resume` adopts the
id of the staged attempt only if that attempt's fingerprint is its own, and
otherwise starts a fresh staging directory. A part is written to a unique
temporary name and renamed into place by its task, then the client logs its
state, naming the job's id and the part file's size, inode and mtime: a part
without a logged state, or whose state names another job or another file (a
part renamed over it by another process), is never accepted, neither by
`--resume` nor by the commit, which checks every part again.

The commit writes `_fastkl.json`, drops `_state/` and renames the staging
directory to DEST in one step, so DEST either does not exist or holds the
complete output with its manifest. With --overwrite the old DEST is first
renamed to DEST.fastkl-old and deleted only after the new output is in
place; if it cannot be deleted, the job still succeeded (a FastKLWarning says
what is left where) and the next --overwrite removes it. Only a fastkl output
(a directory holding its manifest, or a symlink to one: the link is replaced)
or an empty directory is ever replaced: a file or a foreign directory at DEST
is refused whatever the options.

Kills and hostile directories:

* A kill at any moment leaves DEST absent or complete. A kill after the
  manifest was written into the staging directory (the commit had started,
  every part is finished) is finished by `--resume` without recomputing:
  `pending_manifest()` returns that manifest and the job compares it with
  its own. A kill after the final rename leaves a complete DEST, which
  `--resume` of the same job accepts as done.
* Nothing here follows a symlink planted in the staging directory or DEST:
  a staging directory or `_state` that is a symlink is refused, only regular
  files (lstat) are reused as finished parts, and any other entry is removed
  before the commit, so DEST never holds a link to elsewhere. Parts and state
  files are written to fresh unique names and renamed over whatever was
  there (a rename replaces a link, it never writes through it).
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import DataError, DestTakenError, FastKLWarning, OptionError
from .state_log import FinishedParts, LocalLogs

MANIFEST = "_fastkl.json"
STATE_DIR = "_state"


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(p)))


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def staging_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".fastkl-staging")


def old_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".fastkl-old")


def lock_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".fastkl-lock")


def beside(dest: Path) -> tuple[Path, Path, Path]:
    """What a job writes beside DEST: its staging directory, the old output of an overwrite, the lock."""
    return staging_path(dest), old_path(dest), lock_path(dest)


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_path(arg: str | os.PathLike, role: str) -> str | os.PathLike:
    """A SOURCE or DEST argument as a local path: `file://` URLs name one, other URLs are refused.

    Object stores are a later issue; until then `s3://bucket/out`
    must not become the local directory `./s3:/bucket/out`. The path of a
    `file://` URL is percent-decoded; `?` and `#` stay part of it (a glob).
    """
    if not isinstance(arg, str) or not _URL.match(arg):
        return arg
    scheme, rest = arg.split("://", 1)
    if scheme.lower() != "file":
        raise OptionError(
            f"{role} {arg!r}: object stores and URLs ({scheme}://) are not supported yet; "
            "give a local path (or a file:// URL)"
        )
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost") or not slash:
        raise OptionError(f"{role} {arg!r}: a file:// URL must name a local absolute path (file:///path)")
    from urllib.parse import unquote

    return unquote("/" + path)


def resolve_dest(dest: str | os.PathLike) -> Path:
    """DEST with its parent resolved physically: symlinks, then `..`, as the kernel does.

    `os.path.abspath` would drop `link/..` lexically, naming another directory
    than the one the user meant (and than the one the overlap check must see).
    The last component is kept as given: DEST itself is created or replaced,
    never followed.
    """
    raw = os.fspath(local_path(dest, "DEST"))
    head, name = os.path.split(raw.rstrip(os.sep) or raw)
    if name in ("", ".", ".."):
        raise OptionError(f"DEST {raw!r} must name a directory to create")
    return Path(os.path.realpath(head or os.curdir)) / name


def _lstat_kind(p: Path) -> int | None:
    try:
        return stat.S_IFMT(os.lstat(p).st_mode)
    except OSError:
        return None


def is_regular_file(p: Path) -> bool:
    """A regular file, not a symlink to one."""
    return _lstat_kind(p) == stat.S_IFREG


def is_real_dir(p: Path) -> bool:
    """A directory, not a symlink to one."""
    return _lstat_kind(p) == stat.S_IFDIR


def dest_kind(dest_p: Path) -> str | None:
    """What is at DEST: None (nothing), "output" (a fastkl output: a directory holding its
    manifest, or a symlink to one, which is replaced, never followed), "empty" (an empty
    directory), or else what it is, for the message refusing it."""
    try:
        st = os.lstat(dest_p)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        target = _real(dest_p)
        if is_real_dir(target) and is_regular_file(target / MANIFEST):
            return "output"
        return "a symbolic link to something else"
    if stat.S_ISDIR(st.st_mode):
        if is_regular_file(dest_p / MANIFEST):
            return "output"
        try:
            empty = not any(os.scandir(dest_p))
        except OSError:
            empty = False
        return "empty" if empty else f"a directory without {MANIFEST}"
    if stat.S_ISREG(st.st_mode):
        return "a file"
    return "not a regular file or directory"


def refuse_foreign_dest(dest: str | os.PathLike, kind: str) -> None:
    """Only a fastkl output (or an empty directory) may be replaced: never suggest --overwrite for the rest."""
    hint = "choose another DEST"
    if kind == "a file":
        hint = "the last argument is DEST, the output directory to create (fastkl run SOURCE... DEST)"
    raise OptionError(
        f"DEST {os.fspath(dest)!r} exists and is not a fastkl output ({kind}): refusing to replace it; {hint}"
    )


def check_dest(dest: str | os.PathLike, roots: Iterable[str], *, overwrite: bool, exists_ok: bool = False) -> Path:
    """Refuse DEST overlapping SOURCE, or an existing DEST without overwrite. Before any work.

    exists_ok (for --resume): an existing fastkl output is left for the job to
    judge (it is accepted only if it is already this job's complete output).
    What is not a fastkl output is refused whatever the options.
    """
    dest_p = resolve_dest(dest)
    real_dest = _real(dest_p)  # follows DEST itself too, if it is a symlink
    for root in roots:
        r = _real(root)
        # not the lock: a glob SOURCE may match a killed job's lock file, which is never read as input
        for d in (real_dest, _real(staging_path(dest_p)), _real(old_path(dest_p))):
            if _overlaps(d, r):
                raise OptionError(
                    f"DEST {os.fspath(dest)!r} overlaps SOURCE {root!r}: "
                    "DEST must be outside the input and must not contain it"
                )
    kind = dest_kind(dest_p)
    if kind not in (None, "output", "empty"):
        refuse_foreign_dest(dest, kind)
    if kind is not None and not overwrite and not exists_ok:
        raise OptionError(f"DEST {os.fspath(dest)!r} already exists (pass --overwrite to replace it)")
    if dest_p.parent.exists() and not dest_p.parent.is_dir():
        raise OptionError(f"the parent of DEST {os.fspath(dest)!r} is not a directory")
    return dest_p


def check_side_file(path: str | os.PathLike, option: str, dest_p: Path | None, roots: Iterable[str],
                    inputs: Sequence[str] = ()) -> None:
    """A file the job writes besides DEST (--summary-json): never an input, never inside DEST
    or what lies beside it. Checked before any work: after the commit it would be too late."""
    raw = os.fspath(path)
    real = _real(raw)
    if os.path.isdir(real) or raw.endswith(os.sep):
        raise OptionError(f"{option} {raw!r} is a directory; give a file name")
    for root in roots:
        r = _real(root)
        if real == r:
            raise OptionError(f"{option} {raw!r} is the input {root!r}: fastkl never writes into its input")
        if r in real.parents:
            raise OptionError(f"{option} {raw!r} is inside SOURCE {root!r}: fastkl never writes into its input")
    for f in inputs:
        if real == _real(f):
            raise OptionError(f"{option} {raw!r} is the input file {f!r}: fastkl never writes into its input")
    for d in ((dest_p, _real(dest_p), *beside(dest_p)) if dest_p is not None else ()):  # None: DEST in a store
        if real == d or d in real.parents:
            raise OptionError(
                f"{option} {raw!r} is inside DEST {str(dest_p)!r} or its staging place; "
                "DEST holds only the dataset: write it elsewhere"
            )
    if not os.path.isdir(real.parent):
        raise OptionError(f"{option} {raw!r}: the directory {str(real.parent)!r} does not exist")


def _write_json(path: Path, obj: Any, *, compact: bool = False) -> None:
    """`obj` as JSON at `path`, atomically. compact: one line (json's C encoder, ~10x faster than
    the indented form, which is Python code: what a task's state with its summary sketch needs)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x") as f:  # a fresh file: never through a planted link
            if compact:
                f.write(json.dumps(obj, separators=(",", ":"), allow_nan=True))
            else:
                json.dump(obj, f, indent=1, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:  # a full disk: leave no temporary behind
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def _read_json(path: Path) -> Any | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class DestLock:
    """One job's exclusive hold on DEST: `flock` on DEST.fastkl-lock, from before the job looks
    at DEST or its staging directory until it has committed or given up.

    flock, not a bare O_EXCL file: the kernel releases it when the holder dies,
    even by SIGKILL, so a dead job never blocks DEST (its lock file stays,
    unlocked, and the next job takes it over). The file names the holder (pid,
    host, start, job id) for the message of a job that finds it taken. The
    holder unlinks the file when it is done; a job that locked a file just
    unlinked this way sees that the path no longer names it and tries again.
    Locks from other hosts are seen where the file system supports them (NFS
    forwards flock as a POSIX lock). `fastkl clean DEST` (a later issue) can
    take this lock to know that no job is running before it removes leftovers.
    """

    def __init__(self, dest: Path, display: str, fd: int):
        self.dest = dest
        self.path = lock_path(dest)
        self.display = display
        self._fd: int | None = fd
        self.started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    @classmethod
    def acquire(cls, dest: Path, display: str) -> "DestLock":
        """Take the lock or raise DestTakenError naming the job that holds it."""
        path = lock_path(dest)
        os.makedirs(path.parent, exist_ok=True)  # DEST's parents, like `mkdir -p` (not Path.mkdir)
        for _ in range(20):
            fd = _open_lock_file(path, display)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise DestTakenError(
                    f"DEST {display!r} is taken by another fastkl job ({holder}); "
                    "wait for it to end or stop it"
                ) from None
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    os.close(fd)
                    raise OSError(e.errno, f"cannot lock {str(path)!r} for DEST {display!r}: {e.strerror}") from e
                # a file system without locks (some Lustre / NFS mounts): run, but say it
                warnings.warn(FastKLWarning(
                    f"cannot lock {str(path)!r} ({e.strerror}): this file system does not support locks, "
                    f"so nothing stops another job from using DEST {display!r} at the same time"
                ), stacklevel=2)
            if _same_file(fd, path):
                lock = cls(dest, display, fd)
                try:
                    lock.announce(None)  # at once: a job that finds DEST taken names this one
                except BaseException:
                    lock.release()
                    raise
                return lock
            os.close(fd)  # its holder finished and unlinked it meanwhile: lock the path's new file
        raise DestTakenError(f"DEST {display!r} is taken by other fastkl jobs starting and ending in turn")

    def announce(self, job_id: str | None) -> None:
        """Write who holds DEST into the lock file, for a job that finds it taken."""
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": self.started,
            "job_id": job_id,
        }
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def check(self, staging: Path) -> None:
        """Before the commit: the lock file at DEST.fastkl-lock is still the one this job holds.
        (Someone removed it, and another job may have taken DEST meanwhile: commit nothing.)"""
        if self._fd is None or not _same_file(self._fd, self.path):
            raise DestTakenError(
                f"the lock file {str(self.path)!r} of DEST {self.display!r} was removed or replaced while "
                f"this job ran{_current_holder(self.path)}; not committing (finished parts stay in {str(staging)!r})"
            )

    def release(self) -> None:
        """Unlink the lock file (if it is still ours), then drop the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass  # a lock file left unlocked blocks nobody
        finally:
            os.close(fd)

    def __enter__(self) -> "DestLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# flock errors meaning "this file system has no locks", not "someone holds it"
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def _open_lock_file(path: Path, display: str) -> int:
    """Open (or create) the lock file, refusing anything that is not a regular file (a planted link)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise OptionError(
                f"{str(path)!r} exists and is not a fastkl lock file (DEST {display!r}); remove it first"
            ) from e
        raise OSError(e.errno, f"cannot create the lock file {str(path)!r} for DEST {display!r}: {e.strerror}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OptionError(f"{str(path)!r} exists and is not a fastkl lock file (DEST {display!r}); remove it first")
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder(fd: int) -> str:
    """Who holds a lock, from its file. The holder writes it right after locking: wait a little for it."""
    info = None
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            break
        time.sleep(0.05)
    if not isinstance(info, dict):
        return "which has not said who it is yet"
    job = f", job {info['job_id']}" if info.get("job_id") else ""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}{job}"


def _current_holder(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return f" (it now names {_holder(fd)})" if stat.S_ISREG(os.fstat(fd).st_mode) else ""
    finally:
        os.close(fd)


class Staging:
    """The staging directory of one DEST."""

    def __init__(self, dest: Path, n_parts: int):
        self.dest = dest
        self.root = staging_path(dest)
        self.state = self.root / STATE_DIR
        self.n_parts = n_parts
        self.width = max(6, len(str(max(n_parts - 1, 0))))
        self.job_id: str | None = None  # set by prepare(); travels with the Staging to the tasks

    def part_name(self, index: int) -> str:
        return f"part-{index:0{self.width}d}.parquet"

    def _is_ours(self) -> bool:
        """A real directory with fastkl's marks, no symlink on the way: its `_state`
        directory, or (a commit was interrupted) the manifest, or nothing at all
        (a job killed while creating it)."""
        if not is_real_dir(self.root):
            return False
        if is_real_dir(self.state):
            return True
        if os.path.lexists(self.state):
            return False
        return is_regular_file(self.root / MANIFEST) or not any(os.scandir(self.root))

    def _refuse_foreign(self) -> None:
        if os.path.lexists(self.root) and not self._is_ours():
            raise OptionError(
                f"{str(self.root)!r} exists and is not a fastkl staging directory "
                "(or holds a symlink); remove it first"
            )

    def pending_manifest(self) -> dict | None:
        """The manifest of an attempt killed during its commit (all parts were finished), if any."""
        self._refuse_foreign()
        if not os.path.lexists(self.root) or not is_regular_file(self.root / MANIFEST):
            return None
        m = _read_json(self.root / MANIFEST)
        return m if isinstance(m, dict) else None

    def staged_job_id(self, job: dict) -> str | None:
        """The id of the attempt staged here, if it was this very job (its fingerprint is `job`):
        the only staged parts `--resume` may adopt."""
        self._refuse_foreign()
        if not is_real_dir(self.state):
            return None
        staged = _read_json(self.state / "job.json")
        if isinstance(staged, dict) and isinstance(staged.get("job_id"), str) and staged.get("job") == job:
            return staged["job_id"]
        return None

    def prepare(self, job: dict, job_id: str, *, resume: bool) -> FinishedParts:
        """Create the staging directory of job `job_id`; its finished parts (with resume, those an
        earlier attempt of this job logged whose files are still the ones it wrote).

        A staging directory of another job id (another fingerprint, or not
        resuming) is removed: nothing of another job is ever reused.
        """
        self._refuse_foreign()
        self.job_id = job_id
        mark = {"job_id": job_id, "job": job}
        if os.path.lexists(self.root):
            if not (resume and is_real_dir(self.state) and _read_json(self.state / "job.json") == mark):
                shutil.rmtree(self.root)
        if not os.path.lexists(self.root):
            self.state.mkdir(parents=True)
            _write_json(self.state / "job.json", mark)
        finished = FinishedParts(LocalLogs(self.state), max(1, self.n_parts), job_id)
        if resume:
            finished.load(lambda st: self._vouched(st, self.root / self.part_name(st["index"])))
        return finished

    def _vouched(self, state: Any, part: Path) -> bool:
        """The part file is the one this job's state describes: written by this job
        (its id) and not replaced since (size, inode, mtime of a regular file, no link)."""
        if self.job_id is None or not isinstance(state, dict) or state.get("job_id") != self.job_id:
            return False
        try:
            st = os.lstat(part)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and [st.st_size, st.st_ino, st.st_mtime_ns] == [
            state.get("part_size"), state.get("part_inode"), state.get("part_mtime_ns")
        ]

    def check_parts(self, n_parts: int, finished: FinishedParts) -> None:
        """Before the commit: every part is this job's (a process still writing into the
        staging directory, or one that wrote into it, is caught here, not in DEST)."""
        for i in range(n_parts):
            part = self.root / self.part_name(i)
            if not self._vouched(finished.record(i), part):
                raise DataError(
                    f"{part.name} in {str(self.root)!r} is not the part this job wrote (another process "
                    "wrote into the staging directory); not committing: run the job again with --resume"
                )

    def rewrite_pending(self, manifest: dict) -> None:
        """Write back the manifest of an interrupted commit (its parts now marked resumed)."""
        _write_json(self.root / MANIFEST, manifest)

    def write_empty_part(self, schema) -> dict | None:
        """Empty input: one empty part keeps DEST a readable dataset (in place: no state to log)."""
        import pyarrow.parquet as pq

        pq.write_table(schema.empty_table(), self.root / self.part_name(0))
        return None

    # The functions below run inside Dask tasks, possibly on other machines.
    def tmp_part(self, index: int) -> Path:
        return self.root / f".{self.part_name(index)}.{uuid.uuid4().hex}.tmp"

    def part_writer(self, tmp: Path, schema):
        import pyarrow.parquet as pq

        return pq.ParquetWriter(tmp, schema)

    def discard_tmp(self, tmp: Path) -> None:
        tmp.unlink(missing_ok=True)

    def publish_part(self, index: int, tmp: Path) -> dict:
        """Rename the written part into place; what identifies it, for its state (logged by the client)."""
        part = self.root / self.part_name(index)
        written = os.lstat(tmp)  # a rename keeps size, inode and mtime: they identify the part
        try:
            os.replace(tmp, part)  # replaces a planted symlink, never writes through it
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return {"part_size": written.st_size, "part_inode": written.st_ino, "part_mtime_ns": written.st_mtime_ns}

    def discard_if_nothing_finished(self) -> None:
        """After a failed job: drop the staging directory when no part is
        finished (nothing for --resume to reuse), so no empty directory stays
        beside DEST. With finished parts it stays for --resume."""
        try:
            if is_real_dir(self.root) and not (is_real_dir(self.state) and LocalLogs(self.state).any()):
                _remove(self.root)
        except OSError:
            pass  # a failing job reports its own error, not this one

    def drop_extra_parts(self, n_parts: int) -> None:
        """Remove everything that is not a part of this job (temporaries of lost
        attempts, parts of a longer earlier job, stray links or directories)."""
        name = re.compile(rf"part-(\d{{{self.width}}})\.parquet")  # no set of 10^6 names
        for f in os.scandir(self.root):
            if f.name == STATE_DIR and is_real_dir(Path(f.path)):
                continue
            m = name.fullmatch(f.name)
            if m and int(m.group(1)) < n_parts and f.is_file(follow_symlinks=False):
                continue
            _remove(Path(f.path))

    def commit(self, manifest: dict, *, overwrite: bool, lock: DestLock, n_parts: int,
               finished: FinishedParts) -> None:
        self.check_parts(n_parts, finished)
        finished.close()
        _write_json(self.root / MANIFEST, manifest)
        self.commit_written(overwrite=overwrite, lock=lock)

    def commit_written(self, *, overwrite: bool, lock: DestLock) -> None:
        """The commit once the manifest is in the staging directory (also after a kill)."""
        lock.check(self.root)
        dest, old = self.dest, old_path(self.dest)
        kind = dest_kind(dest)
        if kind not in (None, "output", "empty"):  # appeared while we ran: never replaced
            refuse_foreign_dest(dest, kind)
        if kind is not None and not overwrite:
            raise OptionError(f"DEST {str(dest)!r} appeared while the job ran; output left in {self.root}")
        _remove(self.state)
        if kind is not None:
            try:
                _remove(old)  # left by an overwrite killed between its two renames, or not removable then
            except OSError as e:
                raise OSError(e.errno, f"cannot remove {str(old)!r}, left by an earlier --overwrite "
                                       f"({e.strerror or e}); remove it, then run again with --resume") from e
            os.rename(dest, old)
            os.rename(self.root, dest)
        else:
            os.rename(self.root, dest)
        try:
            _remove(old)
        except OSError as e:  # the new output IS committed: a warning, not a failed job
            warnings.warn(FastKLWarning(
                f"DEST {str(dest)!r} is complete, but the old output it replaced could not be removed "
                f"({e.strerror or e}): what is left of it is in {str(old)!r}"
            ), stacklevel=2)


def _remove(path: Path) -> None:
    """Remove a file, a link (not its target) or a directory tree (links inside it are not followed)."""
    if is_real_dir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def remove_leftovers(dest: Path) -> None:
    """Drop what a job killed right after its commit may have left beside DEST."""
    for p in (staging_path(dest), old_path(dest)):
        if os.path.lexists(p):
            _remove(p)
