"""A large job's manifest: its inputs and parts as two Parquet tables beside `_fastkl.json`.

Up to MANIFEST_INLINE inputs and parts, `_fastkl.json` lists them inline, one
JSON object each (what tests and users read: `manifest["parts"]`). A job of
10^5-10^6 shards would make that one JSON document of hundreds of MB (330 B
per file, 141 B per part), written and read whole. Beyond MANIFEST_INLINE the
manifest holds `{"table": "_fastkl_parts.parquet", "count": N}` instead, the
rows are columns of a zstd Parquet file (tens of bytes per part, written
from the plan's own lists, no dict per row), readable a row group or a column
at a time; `plan_digest` (of both tables) stands for them in the job's
identity (--resume, an already committed DEST). `read_parts` / `read_inputs`
read either form. Names start with `_`: dataset readers skip them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from .plan_columns import Files, Tasks

INPUTS_TABLE = "_fastkl_inputs.parquet"
PARTS_TABLE = "_fastkl_parts.parquet"
ROW_GROUP = 1 << 16  # rows per row group: a reader takes a slice without the rest


def inputs_table(files: "Files") -> pa.Table:
    """The `inputs` of the manifest (InputFile.to_dict, one row per file), from the plan's columns;
    an "etag" column (after "footer") when an input is a pinned S3 object (the version planned from)."""
    etags = {"etag": files.etag.arrow()} if files.has_etags() else {}
    return pa.table({
        "path": files.arrow("path"),
        "format": files.arrow("format"),
        "size": files.arrow("size"),
        "mtime_ns": files.arrow("mtime_ns"),
        "inode": files.arrow("ino"),
        "ctime_ns": files.arrow("ctime_ns"),
        "footer": files.footer.arrow(),
        **etags,  # S3 objects (the version planned from)
        "rows": files.arrow("rows"),
        "units": pa.array(np.diff(files.unit_start).astype(np.int32)),
    })


def part_names(n: int, width: int) -> pa.Array:
    """"part-000000.parquet" ... for n parts, built as one buffer (no Python string per part)."""
    digits = max(width, len(str(max(n - 1, 0))))
    size = 5 + digits + 8
    chars = np.empty((n, size), np.uint8)
    chars[:, :5] = np.frombuffer(b"part-", np.uint8)
    chars[:, 5 + digits:] = np.frombuffer(b".parquet", np.uint8)
    rest = np.arange(n, dtype=np.int64)
    for k in range(5 + digits - 1, 4, -1):  # decimal digits, last first
        chars[:, k] = ord("0") + rest % 10
        rest //= 10
    offsets = np.arange(0, (n + 1) * size, size, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars))


def parts_table(tasks: "Tasks", width: int) -> pa.Table:
    """The `parts` of the manifest as columns: part file, first input file (and last, for a part of
    grouped files), first row in it, rows, first and last row group / record batch (one file)."""
    first, last = tasks.first_piece[:-1], tasks.first_piece[1:] - 1
    p = tasks.pieces
    return pa.table({
        "file": part_names(len(tasks), width),
        "input": pa.array(p["file"][first]),
        "input_last": pa.array(p["file"][last]),
        "row_start": pa.array(p["row_start"][first]),
        "rows": pa.array(tasks.rows),
        "unit_first": pa.array(p["unit_first"][first]),
        "unit_last": pa.array(p["unit_last"][last]),
    })


def digest(*tables: pa.Table) -> str:
    """A digest of the tables' content (the job's identity stands on it)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tables:  # the columns' own buffers, hashed in place (no serialised copy of the tables)
        h.update(str(t.schema).encode())
        for column in t.columns:
            for chunk in column.chunks:
                h.update(str(len(chunk)).encode())
                for buf in chunk.buffers():
                    if buf is not None:
                        h.update(buf)
    return h.hexdigest()


def write(root: Path | str, inputs: pa.Table, parts: pa.Table, filesystem=None, open_output=None) -> None:
    """Both tables into the staging directory (tmp + rename), or under a store's staging prefix
    (`open_output(path)`: a file whose upload is whole or absent, on S3 one PUT if small; else
    `filesystem`'s output stream)."""
    for name, t in ((INPUTS_TABLE, inputs), (PARTS_TABLE, parts)):
        if open_output is not None:
            out = open_output(f"{root}/{name}")
            pq.write_table(t, out, compression="zstd", row_group_size=ROW_GROUP)
            out.close()  # uploaded now, if the writer did not close it
            continue
        if filesystem is not None:
            pq.write_table(t, f"{root}/{name}", compression="zstd", row_group_size=ROW_GROUP, filesystem=filesystem)
            continue
        tmp = Path(root) / f".{name}.tmp"
        pq.write_table(t, tmp, compression="zstd", row_group_size=ROW_GROUP)
        os.replace(tmp, Path(root) / name)


def part_files(manifest: dict) -> list[str]:
    """The part files a manifest names, inline or counted (the names of a table's "file" column)."""
    parts = manifest["parts"]
    if isinstance(parts, list):
        return [p["file"] for p in parts]
    n = parts["count"]
    return part_names(n, max(6, len(str(max(n - 1, 0))))).to_pylist()


def _open(dest, name: str, storage_options: dict | None = None):
    """A table of DEST: a local path, or (a store URL) a file of the store's filesystem."""
    from .stores import is_store_url, resolve

    if isinstance(dest, str) and is_store_url(dest):
        store, path = resolve(dest, storage_options)
        return store.fs.open_input_file(f"{path.rstrip('/')}/{name}")
    return Path(dest) / name


def _read(dest: str | os.PathLike, manifest: dict, key: str, name: str, columns=None,
          storage_options: dict | None = None) -> pa.Table:
    value = manifest.get(key)
    if isinstance(value, list):
        return pa.Table.from_pylist(value).select(columns) if columns else pa.Table.from_pylist(value)
    return pq.read_table(_open(dest, (value or {}).get("table", name), storage_options), columns=columns)


def read_parts(dest: str | os.PathLike, manifest: dict, columns=None, storage_options: dict | None = None) -> pa.Table:
    """DEST's parts (from the manifest `manifest` read from DEST), inline or in their table.
    A large table need not be read whole: `pq.ParquetFile(DEST/_fastkl_parts.parquet)` reads
    row groups of ROW_GROUP parts (and only the columns asked for)."""
    return _read(dest, manifest, "parts", PARTS_TABLE, columns, storage_options)


def read_inputs(dest: str | os.PathLike, manifest: dict, columns=None,
                storage_options: dict | None = None) -> pa.Table:
    """DEST's input files (from its manifest), inline or in their table (DEST a path or a store URL)."""
    return _read(dest, manifest, "inputs", INPUTS_TABLE, columns, storage_options)
