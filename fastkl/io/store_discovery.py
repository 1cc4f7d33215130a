"""Discovery of SOURCE files in an object store, under the rules of the local walk (`fastkl.io.sources`).

The same files are read whichever way SOURCE names them: names starting
with `_` or `.` are skipped (unless a glob's own component asks for them),
a "directory" holding a fastkl manifest is an earlier output and is
skipped, hive partitions come from `key=value` prefixes, and a listing that
fails is an error, never an empty dataset. An object store has no links,
FIFOs or devices, so those rules have nothing to do here. One listing per
prefix level (a walk) or one recursive listing (a glob): no per-object HEAD.
"""

from __future__ import annotations

import fnmatch
import glob
import posixpath
from typing import Callable, Iterator

import pyarrow.fs as pafs

from ..errors import DataError, OptionError
from .stores import Store

MANIFEST = "_fastkl.json"
STAGING = "_fastkl-staging"


def _why(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def info(store: Store, path: str) -> pafs.FileInfo:
    """get_file_info of one path; an error names the URL."""
    try:
        return store.fs.get_file_info(path)
    except OSError as e:
        raise DataError(f"{store.url(path)}: cannot read it ({_why(e)})") from None


def listing(store: Store, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    """The entries under a prefix, sorted by path; a failing listing is an error, not empty."""
    try:
        entries = store.fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except (OSError, FileNotFoundError) as e:
        raise DataError(f"{store.url(path)}: cannot list it ({_why(e)})") from None
    return sorted(entries, key=lambda e: e.path)


def is_output(store: Store, path: str, names: set[str] | None = None) -> bool:
    """A prefix holding a fastkl manifest (an earlier output): never input."""
    if names is not None:
        return MANIFEST in names
    return info(store, posixpath.join(path, MANIFEST)).type == pafs.FileType.File


def _skipped(name: str, asked: str = "") -> bool:
    return name.startswith((".", "_")) and not asked.startswith(name[:1])


def walk(store: Store, root: str, first: list[pafs.FileInfo] | None = None) -> Iterator[str]:
    """Files under a prefix in sorted order, files of a level before its sub-prefixes, depth first
    (`first`: the root's listing, if the caller has it already)."""
    stack = [root]
    while stack:
        d = stack.pop()
        entries = first if d == root and first is not None else listing(store, d)
        names = {posixpath.basename(e.path) for e in entries}
        if d != root and is_output(store, d, names):
            continue
        subdirs = []
        for e in entries:
            name = posixpath.basename(e.path)
            if _skipped(name):
                continue
            if e.type == pafs.FileType.Directory:
                subdirs.append(e.path)
            elif e.type == pafs.FileType.File:
                yield e.path
        stack.extend(reversed(subdirs))


def _component_match(name: str, comp: str) -> bool:
    return fnmatch.fnmatchcase(name, comp) and not _skipped(name, comp)


def _matches(parts: list[str], comps: list[str]) -> bool:
    """Path components below the glob's fixed prefix against the pattern's (`**`: any number of
    prefixes, none of them an `_` or `.` name)."""
    if not comps:
        return not parts
    if comps[0] == "**":
        return _matches(parts, comps[1:]) or (bool(parts) and not _skipped(parts[0]) and _matches(parts[1:], comps))
    return bool(parts) and _component_match(parts[0], comps[0]) and _matches(parts[1:], comps[1:])


def expand_glob(store: Store, pattern: str) -> list[str]:
    """Objects and prefixes matching a glob, from one recursive listing of its fixed prefix."""
    parts = pattern.split("/")
    fixed = 0
    while fixed < len(parts) and not glob.has_magic(parts[fixed]):
        fixed += 1
    base = "/".join(parts[:fixed])
    comps = [c for c in parts[fixed:] if c]
    if info(store, base).type != pafs.FileType.Directory:
        return []
    entries = listing(store, base, recursive=True)
    outputs = {posixpath.dirname(e.path) for e in entries if posixpath.basename(e.path) == MANIFEST}
    out: dict[str, bool] = {}  # path -> is a prefix
    for e in entries:
        rel = e.path[len(base):].strip("/").split("/")
        if any(e.path == o or e.path.startswith(o + "/") for o in outputs):
            continue
        if _matches(rel, comps) and posixpath.basename(e.path) not in ("_metadata", "_common_metadata"):
            out[e.path] = e.type == pafs.FileType.Directory
    # a matched prefix stands for everything below it (it is walked): drop what it already covers
    dirs = [p for p, is_dir in out.items() if is_dir]
    return sorted(p for p in out if not any(p.startswith(d + "/") for d in dirs))


def sniff(store: Store, path: str, ext_parquet: tuple, ext_ipc: tuple,
          sniff_ipc: Callable) -> str | None:
    """The format of an object: by its extension, else by its first bytes (one small range read)."""
    low = path.lower()
    if low.endswith(ext_parquet):
        return "parquet"
    try:
        with store.fs.open_input_file(path) as f:
            head = f.read_at(6, 0) if f.size() >= 6 else b""
            if not low.endswith(ext_ipc) and head[:4] == b"PAR1":
                return "parquet"
            f.seek(0)
            kind = sniff_ipc(f)
    except OSError as e:
        raise DataError(f"{store.url(path)}: cannot read it ({_why(e)})") from None
    return kind or ("ipc" if low.endswith(ext_ipc) else None)


def prefix_listing(store: Store, path: str) -> list[pafs.FileInfo] | None:
    """The listing of `path` as a prefix if it holds anything, else None: one request where
    asking what `path` is first takes two or three (a HEAD, then a listing of one key)."""
    try:
        entries = store.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return None  # not a prefix, or an error that source_kind reports in its own words
    return sorted(entries, key=lambda e: e.path) or None


def source_kind(store: Store, path: str, url: str) -> str:
    """'file', 'dir' or 'glob' for a SOURCE URL; a URL naming nothing is a usage error."""
    t = info(store, path).type
    if t == pafs.FileType.File:
        return "file"
    if t == pafs.FileType.Directory:
        return "dir"
    if glob.has_magic(path):
        return "glob"
    raise OptionError(f"SOURCE {url!r} does not exist")
