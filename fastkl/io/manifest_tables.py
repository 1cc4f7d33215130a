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
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

INPUTS_TABLE = "_fastkl_inputs.parquet"
PARTS_TABLE = "_fastkl_parts.parquet"
ROW_GROUP = 1 << 16  # rows per row group: a reader takes a slice without the rest


def inputs_table(files: Sequence) -> pa.Table:
    """The `inputs` of the manifest (InputFile.to_dict, one row per file) as columns."""
    etags = {"etag": pa.array([f.etag for f in files], pa.string())} if any(f.etag for f in files) else {}
    return pa.table({
        "path": pa.array([f.display if f.store is not None else f.path for f in files], pa.string()),
        "format": pa.array([f.fmt for f in files], pa.string()),
        "size": pa.array([f.size for f in files], pa.int64()),
        "mtime_ns": pa.array([f.mtime_ns for f in files], pa.int64()),
        "inode": pa.array([f.ino for f in files], pa.int64()),
        "ctime_ns": pa.array([f.ctime_ns for f in files], pa.int64()),
        "footer": pa.array([f.footer for f in files], pa.string()),
        **etags,  # S3 objects (the version planned from)
        "rows": pa.array([f.rows for f in files], pa.int64()),
        "units": pa.array([len(f.units) for f in files], pa.int32()),
    })


def parts_table(tasks: Sequence, part_name: Callable[[int], str]) -> pa.Table:
    """The `parts` of the manifest as columns: part file, first input file (and last, for a part of
    grouped files), first row in it, rows, first and last row group / record batch (one file)."""
    return pa.table({
        "file": pa.array([part_name(t.index) for t in tasks], pa.string()),
        "input": pa.array([t.file.index for t in tasks], pa.int64()),
        "input_last": pa.array([t.group[-1].file.index if t.group else t.file.index for t in tasks], pa.int64()),
        "row_start": pa.array([t.row_start for t in tasks], pa.int64()),
        "rows": pa.array([t.rows for t in tasks], pa.int64()),
        "unit_first": pa.array([t.units[0].index for t in tasks], pa.int64()),
        "unit_last": pa.array([t.group[-1].units[-1].index if t.group else t.units[-1].index for t in tasks],
                              pa.int64()),
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


def write(root: Path, inputs: pa.Table, parts: pa.Table) -> None:
    for name, t in ((INPUTS_TABLE, inputs), (PARTS_TABLE, parts)):
        tmp = root / f".{name}.tmp"
        pq.write_table(t, tmp, compression="zstd", row_group_size=ROW_GROUP)
        os.replace(tmp, root / name)


def _read(dest: str | os.PathLike, manifest: dict, key: str, name: str, columns=None) -> pa.Table:
    value = manifest.get(key)
    if isinstance(value, list):
        return pa.Table.from_pylist(value).select(columns) if columns else pa.Table.from_pylist(value)
    return pq.read_table(Path(dest) / (value or {}).get("table", name), columns=columns)


def read_parts(dest: str | os.PathLike, manifest: dict, columns=None) -> pa.Table:
    """DEST's parts (from the manifest `manifest` read from DEST), inline or in their table."""
    return _read(dest, manifest, "parts", PARTS_TABLE, columns)


def read_inputs(dest: str | os.PathLike, manifest: dict, columns=None) -> pa.Table:
    """DEST's input files (from its manifest), inline or in their table."""
    return _read(dest, manifest, "inputs", INPUTS_TABLE, columns)
