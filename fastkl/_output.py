"""Output side of a job: staging beside DEST, per-part state for --resume, atomic commit.

Layout while a job runs (SPEC §6)::

    DEST.fastkl-staging/
        part-000000.parquet          finished parts, final names
        _state/job.json              marks the directory as fastkl's
        _state/part-000000.json      per finished part: input fingerprint, rows, size, stats

A part is written to a unique temporary name and renamed into place, then its
state file is written (also tmp + rename): a part without its state file is
not trusted and is redone. The commit writes `_fastkl.json`, drops `_state/`
and renames the staging directory to DEST in one step, so DEST either does not
exist or holds the complete output with its manifest. With --overwrite the old
DEST is first renamed to DEST.fastkl-old and deleted only after the new output
is in place.

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

import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Iterable

from .errors import OptionError

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


def resolve_dest(dest: str | os.PathLike) -> Path:
    """DEST with its parent resolved physically: symlinks, then `..`, as the kernel does.

    `os.path.abspath` would drop `link/..` lexically, naming another directory
    than the one the user meant (and than the one the overlap check must see).
    The last component is kept as given: DEST itself is created or replaced,
    never followed.
    """
    raw = os.fspath(dest)
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


def check_dest(dest: str | os.PathLike, roots: Iterable[str], *, overwrite: bool, exists_ok: bool = False) -> Path:
    """Refuse DEST overlapping SOURCE, or an existing DEST without overwrite. Before any work.

    exists_ok (for --resume): an existing DEST is left for the job to judge
    (it is accepted only if it is already this job's complete output).
    """
    dest_p = resolve_dest(dest)
    real_dest = _real(dest_p)  # follows DEST itself too, if it is a symlink
    for root in roots:
        r = _real(root)
        for d in (real_dest, _real(staging_path(dest_p)), _real(old_path(dest_p))):
            if _overlaps(d, r):
                raise OptionError(
                    f"DEST {os.fspath(dest)!r} overlaps SOURCE {root!r}: "
                    "DEST must be outside the input and must not contain it"
                )
    if os.path.lexists(dest_p):
        if not overwrite:
            if exists_ok:
                return dest_p
            raise OptionError(f"DEST {os.fspath(dest)!r} already exists (pass --overwrite to replace it)")
        if dest_p.is_dir() and not (dest_p / MANIFEST).exists() and any(dest_p.iterdir()):
            raise OptionError(
                f"DEST {os.fspath(dest)!r} is a non-empty directory that is not a fastkl output; "
                "refusing to overwrite it (remove it yourself if it should go)"
            )
    if dest_p.parent.exists() and not dest_p.parent.is_dir():
        raise OptionError(f"the parent of DEST {os.fspath(dest)!r} is not a directory")
    return dest_p


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x") as f:  # a fresh file: never through a planted link
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


class Staging:
    """The staging directory of one DEST."""

    def __init__(self, dest: Path, n_parts: int):
        self.dest = dest
        self.root = staging_path(dest)
        self.state = self.root / STATE_DIR
        self.width = max(6, len(str(max(n_parts - 1, 0))))

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

    def prepare(self, job: dict, *, resume: bool) -> dict[int, dict]:
        """Create the staging directory; with resume, return the reusable part states."""
        self._refuse_foreign()
        if os.path.lexists(self.root):
            if not (resume and is_real_dir(self.state) and _read_json(self.state / "job.json") == job):
                shutil.rmtree(self.root)
        if not os.path.lexists(self.root):
            self.state.mkdir(parents=True)  # and DEST's parent directories, like `mkdir -p`
            _write_json(self.state / "job.json", job)
        if not resume:
            return {}
        done = {}
        for f in self.state.glob("part-*.json"):
            if not is_regular_file(f):
                continue
            st = _read_json(f)
            if not isinstance(st, dict) or not isinstance(st.get("index"), int) or st["index"] < 0:
                continue
            part = self.root / self.part_name(st["index"])
            if f.name == f"{part.stem}.json" and is_regular_file(part) and part.stat().st_size == st.get("part_size"):
                done[int(st["index"])] = st
        return done

    # The two functions below run inside Dask tasks, possibly on other machines.
    def tmp_part(self, index: int) -> Path:
        return self.root / f".{self.part_name(index)}.{uuid.uuid4().hex}.tmp"

    def finish_part(self, index: int, tmp: Path, state: dict) -> None:
        part = self.root / self.part_name(index)
        size = os.stat(tmp).st_size
        try:
            os.replace(tmp, part)  # replaces a planted symlink, never writes through it
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        state = dict(state, index=index, part=part.name, part_size=size)
        _write_json(self.state / f"{part.stem}.json", state)

    def discard_if_nothing_finished(self) -> None:
        """After a failed job: drop the staging directory when no part is
        finished (nothing for --resume to reuse), so no empty directory stays
        beside DEST. With finished parts it stays for --resume."""
        try:
            if is_real_dir(self.root) and not any(self.state.glob("part-*.json")):
                _remove(self.root)
        except OSError:
            pass  # a failing job reports its own error, not this one

    def drop_extra_parts(self, n_parts: int) -> None:
        """Remove everything that is not a part of this job (temporaries of lost
        attempts, parts of a longer earlier job, stray links or directories)."""
        keep = {self.part_name(i) for i in range(n_parts)}
        for f in self.root.iterdir():
            if f.name == STATE_DIR and is_real_dir(f):
                continue
            if f.name in keep and is_regular_file(f):
                continue
            _remove(f)

    def commit(self, manifest: dict, *, overwrite: bool) -> None:
        _write_json(self.root / MANIFEST, manifest)
        self.commit_written(overwrite=overwrite)

    def commit_written(self, *, overwrite: bool) -> None:
        """The commit once the manifest is in the staging directory (also after a kill)."""
        _remove(self.state)
        dest, old = self.dest, old_path(self.dest)
        if dest.exists() or dest.is_symlink():
            if not overwrite:  # appeared while we ran
                raise OptionError(f"DEST {str(dest)!r} appeared while the job ran; output left in {self.root}")
            _remove(old)  # left by an overwrite killed between its two renames
            os.rename(dest, old)
            os.rename(self.root, dest)
        else:
            os.rename(self.root, dest)
        _remove(old)


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
