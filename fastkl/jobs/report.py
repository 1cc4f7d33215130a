"""`fastkl report DEST`: read a job's manifest through the storage layer and write its HTML page.

The page itself is `fastkl.summary.html.render` (docs/guide/report.md); this module
only finds DEST's `_fastkl.json` (a local path, `file://`, or any store URL,
as jobs read and write them), checks it, and writes the file atomically
(never inside DEST: the output stays as the job committed it).
"""

from __future__ import annotations

import json
import os
import posixpath
import re

from ..errors import DataError, OptionError
from ..io.output import MANIFEST, local_path
from ..io.stores import is_store_url, resolve
from ..summary.html import render
from ..summary.stats import Summary


def load_manifest(dest: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """DEST's manifest, read through fastkl's storage layer (a local path or a URL)."""
    shown = os.fspath(dest)
    try:
        if is_store_url(dest):
            store, path = resolve(str(dest), storage_options)
            with store.fs.open_input_stream(posixpath.join(path.rstrip("/"), MANIFEST)) as f:
                data = f.read()
        else:
            with open(os.path.join(os.fspath(local_path(dest, "DEST")), MANIFEST), "rb") as f:
                data = f.read()
    except FileNotFoundError:
        raise OptionError(f"DEST {shown!r} is not a finished fastkl output (no {MANIFEST} in it)") from None
    except IsADirectoryError:
        raise OptionError(f"DEST {shown!r}: {MANIFEST} is not a file") from None
    except OSError as e:
        raise DataError(f"DEST {shown!r}: cannot read {MANIFEST} ({e.strerror or e})") from None
    try:
        manifest = json.loads(data)
        Summary.from_dict(manifest["summary"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"DEST {shown!r}: {MANIFEST} is not a fastkl manifest ({type(e).__name__}: {e})") from None
    return manifest


def default_out(dest: str | os.PathLike) -> str:
    """Where the report goes without --out: beside a local DEST, in the current directory for a URL."""
    text = os.fspath(dest).rstrip("/")
    if is_store_url(text):
        name = re.sub(r"[^\w.-]+", "_", text.rsplit("/", 1)[-1]) or "fastkl"
        return f"{name}-report.html"
    if text.startswith("file://"):
        text = os.fspath(local_path(text, "DEST")).rstrip("/")
    return text + "-report.html"


def write_report(dest: str | os.PathLike, out: str | os.PathLike | None = None,
                 storage_options: dict | None = None) -> str:
    """Write the HTML report of the job at DEST to `out` (default: `default_out(dest)`); returns its path."""
    manifest = load_manifest(dest, storage_options)
    out = os.fspath(out) if out is not None else default_out(dest)
    if not is_store_url(dest):
        d = os.path.realpath(os.fspath(local_path(dest, "DEST")))
        o = os.path.realpath(out)
        if o == d or o.startswith(d.rstrip(os.sep) + os.sep):
            raise OptionError(f"the report file {out!r} (--out) is inside DEST: it would change the output; "
                              "write it elsewhere")
    page = render(manifest, os.fspath(dest))
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, out)
    return out
