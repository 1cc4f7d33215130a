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
"""

from __future__ import annotations

import json
import os
import shutil
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


def check_dest(dest: str | os.PathLike, roots: Iterable[str], *, overwrite: bool) -> Path:
    """Refuse DEST overlapping SOURCE, or an existing DEST without overwrite. Before any work."""
    dest_p = Path(os.path.abspath(os.fspath(dest)))
    if dest_p.name in ("", ".", ".."):
        raise OptionError(f"DEST {os.fspath(dest)!r} must name a directory to create")
    real_dest = _real(dest_p)
    for root in roots:
        r = _real(root)
        for d in (real_dest, _real(staging_path(dest_p)), _real(old_path(dest_p))):
            if _overlaps(d, r):
                raise OptionError(
                    f"DEST {os.fspath(dest)!r} overlaps SOURCE {root!r}: "
                    "DEST must be outside the input and must not contain it"
                )
    if dest_p.exists() or dest_p.is_symlink():
        if not overwrite:
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
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


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
        return (self.state / "job.json").exists() or (self.root / MANIFEST).exists()

    def prepare(self, job: dict, *, resume: bool) -> dict[int, dict]:
        """Create the staging directory; with resume, return the reusable part states."""
        if self.root.exists() or self.root.is_symlink():
            if not self.root.is_dir() or not self._is_ours():
                raise OptionError(
                    f"{str(self.root)!r} exists and is not a fastkl staging directory; remove it first"
                )
            if not (resume and _read_json(self.state / "job.json") == job):
                shutil.rmtree(self.root)
        if not self.root.exists():
            self.state.mkdir(parents=True)  # and DEST's parent directories, like `mkdir -p`
            _write_json(self.state / "job.json", job)
        if not resume:
            return {}
        done = {}
        for f in self.state.glob("part-*.json"):
            st = _read_json(f)
            if not isinstance(st, dict) or "index" not in st:
                continue
            part = self.root / self.part_name(st["index"])
            if part.is_file() and part.stat().st_size == st.get("part_size"):
                done[int(st["index"])] = st
        return done

    # The two functions below run inside Dask tasks, possibly on other machines.
    def tmp_part(self, index: int) -> Path:
        return self.root / f".{self.part_name(index)}.{uuid.uuid4().hex}.tmp"

    def finish_part(self, index: int, tmp: Path, state: dict) -> None:
        part = self.root / self.part_name(index)
        os.replace(tmp, part)
        state = dict(state, index=index, part=part.name, part_size=part.stat().st_size)
        _write_json(self.state / f"{part.stem}.json", state)

    def drop_extra_parts(self, n_parts: int) -> None:
        """Remove parts (and temporaries) not part of this job, e.g. after a resume."""
        keep = {self.part_name(i) for i in range(n_parts)}
        for f in self.root.iterdir():
            if f.is_file() and f.name not in keep:
                f.unlink()

    def commit(self, manifest: dict, *, overwrite: bool) -> None:
        _write_json(self.root / MANIFEST, manifest)
        shutil.rmtree(self.state)
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
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
