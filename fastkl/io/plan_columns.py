"""A job's plan as columns: its files, their row groups / record batches, its tasks.

At 10^6 shards a plan of Python objects (an InputFile, a Unit and a Task per
shard, ~1 KB each with their strings and ints) was most of the client's
memory: 1.55 GB in the planning-and-merge benchmark (scripts/bench_scale.py).
Here each attribute is one column (array.array while planning, NumPy once
frozen, Arrow for strings): about 150 bytes per file and 100 per task.
`Files[i]` and `Tasks[i]` build the small objects the rest of the job knows
(`InputFile`, `FileRef`, `Task`, `Unit` of `fastkl.io.sources`) only when
one is needed: a task's when it is submitted, a file's when a message names it.

A task is one or more pieces (small files grouped into one task, one piece
each); a piece is a run of one file's units [unit_first, unit_last] that
starts `first_offset` rows into its first unit and ends `last_end` rows into
its last (an IPC record batch larger than a task is cut into row slices).
"""

from __future__ import annotations

from array import array
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

FORMATS = ("parquet", "ipc", "ipc_stream")
_CHUNK = 1 << 16  # strings per Arrow chunk: a Python list of at most this many lives while planning


class _Strings:
    """An append-only column of strings kept as Arrow chunks (about their bytes plus 4 each)."""

    def __init__(self) -> None:
        self._chunks: list[pa.Array] = []
        self._pending: list[str] = []

    def append(self, s: str) -> None:
        self._pending.append(s)
        if len(self._pending) == _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._chunks.append(pa.array(self._pending, pa.string()))
            self._pending = []

    def __getitem__(self, i: int) -> str:
        self._flush()
        return self._chunks[i // _CHUNK][i % _CHUNK].as_py()

    def arrow(self) -> pa.ChunkedArray:
        self._flush()
        return pa.chunked_array(self._chunks, pa.string())


class _Interned:
    """Values shared by many files (a hive partition, a store) stored once, files hold an index."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self._index: dict[Any, int] = {}

    def add(self, value: Any) -> int:
        key = (type(value), id(value)) if not isinstance(value, (tuple, str, type(None))) else value
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.values)
            self.values.append(value)
        return i


def _frozen(a: array) -> np.ndarray:
    """The array's own buffer seen by NumPy (no copy: at 10^6 files a copy doubled the peak)."""
    return np.frombuffer(a, dtype=np.dtype(a.typecode)) if len(a) else np.zeros(0, np.dtype(a.typecode))


class Files:
    """The plan's input files as columns; `files[i]` is an `InputFile` built on demand."""

    _INTS = ("size", "mtime_ns", "dev", "ino", "ctime_ns", "rows", "fmt", "partition", "store")
    _UNITS = ("unit_rows", "unit_nbytes", "unit_pos")

    def __init__(self) -> None:
        self.path, self.display, self.footer = _Strings(), _Strings(), _Strings()
        self.etag = _Strings()  # an S3 object's ETag planned from (store_reads pins every read to it), else ""
        self._etags = False  # any file has one
        self._partitions, self._stores = _Interned(), _Interned()
        self.cols: dict[str, Any] = {name: array("q") for name in (*self._INTS, *self._UNITS)}
        for small in ("fmt", "partition", "store"):  # codes and indexes: 1-4 bytes, not 8
            self.cols[small] = array("b" if small == "fmt" else "i")
        self.cols["meta"] = array("q")  # 5 per file (FileRef.meta), zeros with has_meta 0
        self.cols["unit_meta"] = array("q")  # 3 per unit (Unit.meta), zeros where absent
        self.cols["has_meta"] = array("b")
        self.cols["unit_start"] = array("q", [0])
        self._n = 0

    def append(self, path: str, display: str, fmt: str, identity: Any, partition: tuple, store: Any,
               footer: str, meta: tuple, units: Sequence[tuple[int, int, int]],
               spans: Sequence[tuple[int, int, int]] | None,
               chunks: Sequence[Sequence[tuple[int, int]]] | None = None) -> None:
        """One file as planned from its footer: units are (rows, decoded bytes, message offset)."""
        c = self.cols
        self.path.append(path)
        self.display.append("" if display == path else display)
        self.footer.append(footer)
        etag = getattr(identity, "etag", "") or ""
        self.etag.append(etag)
        self._etags = self._etags or bool(etag)
        for name, v in (("size", identity.size), ("mtime_ns", identity.mtime_ns), ("dev", identity.dev),
                        ("ino", identity.ino), ("ctime_ns", identity.ctime_ns),
                        ("rows", sum(u[0] for u in units)), ("fmt", FORMATS.index(fmt)),
                        ("partition", self._partitions.add(partition)), ("store", self._stores.add(store))):
            c[name].append(v)
        c["has_meta"].append(1 if meta else 0)
        c["meta"].extend(meta or (0, 0, 0, 0, 0))
        for rows, nbytes, pos in units:
            c["unit_rows"].append(rows)
            c["unit_nbytes"].append(nbytes)
            c["unit_pos"].append(pos)
        if spans:
            for s in spans:
                c["unit_meta"].extend(s)
        else:
            c["unit_meta"].extend((0, 0, 0) * len(units))
        c["unit_start"].append(c["unit_start"][-1] + len(units))
        leaves = len(chunks[0]) if chunks and len(chunks) == len(units) else 0
        if leaves and any(len(r) != leaves for r in chunks):
            leaves = 0
        if leaves and "leaves" not in c:  # Unit.chunks: from the first file that has them (pinned S3 objects),
            # so a plan of local files has none of these columns. File i's units have `leaves` (start, end)
            # pairs each, from pair chunk_start[i] on
            c["leaves"], c["chunk_start"] = array("i", [0] * self._n), array("q", [0] * (self._n + 1))
            c["chunks"] = array("q")
        if "leaves" in c:
            for ranges in chunks if leaves else ():
                for a, b in ranges:
                    c["chunks"].extend((a, b))
            c["leaves"].append(leaves)
            c["chunk_start"].append(len(c["chunks"]) // 2)
        self._n += 1

    def freeze(self) -> "Files":
        """NumPy columns from here on (the planning buffers are let go)."""
        for name, a in list(self.cols.items()):
            if isinstance(a, array):
                self.cols[name] = _frozen(a)
        self.cols["meta"] = self.cols["meta"].reshape(-1, 5)
        self.cols["unit_meta"] = self.cols["unit_meta"].reshape(-1, 3)
        if "chunks" in self.cols:
            self.cols["chunks"] = self.cols["chunks"].reshape(-1, 2)
        return self

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.__dict__["cols"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator:
        return (self[i] for i in range(self._n))

    @property
    def n_units(self) -> int:
        return int(self.cols["unit_start"][-1])

    def has_etags(self) -> bool:
        """Whether any file is pinned by an ETag (the manifest's inputs then have an "etag" column)."""
        return self._etags

    def fmt_of(self, i: int) -> str:
        return FORMATS[int(self.cols["fmt"][i])]

    def store_of(self, i: int) -> Any:
        return self._stores.values[int(self.cols["store"][i])]

    def _fields(self, i: int) -> tuple:
        c = self.cols
        path = self.path[i]
        meta = tuple(c["meta"][i].tolist()) if c["has_meta"][i] else ()
        return (i, path, self.display[i] or path, self.fmt_of(i), int(c["size"][i]), int(c["mtime_ns"][i]),
                self._partitions.values[int(c["partition"][i])], int(c["dev"][i]), int(c["ino"][i]),
                int(c["ctime_ns"][i]), self.footer[i], self.store_of(i), meta, self.etag[i])

    def ref(self, i: int):
        """What a task needs of file i (`FileRef`: no units)."""
        from .sources import FileRef

        return FileRef(*self._fields(i))

    def unit(self, i: int, g: int, offset: int = 0, end: int | None = None):
        """Unit g of file i (its rows from `offset` to `end`: a slice of an IPC record batch)."""
        from .sources import Unit

        c = self.cols
        k = int(c["unit_start"][i]) + g
        rows = int(c["unit_rows"][k])
        end = rows if end is None else end
        nbytes = int(c["unit_nbytes"][k])
        if (offset, end) != (0, rows):
            nbytes = int(nbytes / rows * (end - offset))
            return Unit(g, offset, end - offset, nbytes, int(c["unit_pos"][k]))
        meta = tuple(c["unit_meta"][k].tolist()) if c["has_meta"][i] else ()
        chunks: tuple = ()
        if "leaves" in c and c["leaves"][i]:
            leaves = int(c["leaves"][i])
            at = int(c["chunk_start"][i]) + g * leaves
            chunks = tuple(map(tuple, c["chunks"][at:at + leaves].tolist()))
        return Unit(g, 0, rows, nbytes, int(c["unit_pos"][k]), meta, chunks)

    def __getitem__(self, i: int):
        from .sources import InputFile

        if not 0 <= i < self._n:
            raise IndexError(i)
        n = int(self.cols["unit_start"][i + 1] - self.cols["unit_start"][i])
        return InputFile(*self._fields(i), int(self.cols["rows"][i]), tuple(self.unit(i, g) for g in range(n)))

    def local_paths(self) -> list[str]:
        """Paths of the files not in a store (checked against `--summary-json`)."""
        return [self.path[i] for i in range(self._n) if self.store_of(i) is None]

    def arrow(self, name: str) -> pa.Array | pa.ChunkedArray:
        """A column for the manifest's inputs table: "path" (a store's as its URL), "format", or an int one."""
        if name == "path":
            shown = self.display.arrow()
            if all(s is None for s in self._stores.values):
                return self.path.arrow()
            import pyarrow.compute as pc

            path = self.path.arrow()
            in_store = pa.array(np.array([s is not None for s in self._stores.values])[self.cols["store"]])
            return pc.if_else(in_store, pc.if_else(pc.equal(shown, ""), path, shown), path)
        if name == "format":
            return pa.DictionaryArray.from_arrays(pa.array(self.cols["fmt"].astype(np.int8)),
                                                  pa.array(FORMATS)).cast(pa.string())
        return pa.array(self.cols[name])


class Tasks:
    """The plan's tasks as columns; `tasks[i]` is a `Task` built on demand (when it is submitted)."""

    _PIECES = ("file", "unit_first", "first_offset", "unit_last", "last_end", "row_start", "rows", "nbytes")

    def __init__(self, files: Files, pieces: dict[str, np.ndarray], first_piece: np.ndarray,
                 rows: np.ndarray, nbytes: np.ndarray, batch_rows: np.ndarray):
        self.files = files
        self.pieces = pieces  # column -> one value per piece
        self.first_piece = first_piece  # task i is pieces first_piece[i] .. first_piece[i + 1] - 1
        self.rows, self.nbytes, self.batch_rows = rows, nbytes, batch_rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator:
        return (self[i] for i in range(len(self)))

    def _piece(self, k: int, index: int):
        from .sources import Task

        p = self.pieces
        f, g0, g1 = int(p["file"][k]), int(p["unit_first"][k]), int(p["unit_last"][k])
        off0, end1 = int(p["first_offset"][k]), int(p["last_end"][k])
        units = []
        for g in range(g0, g1 + 1):
            u = self.files.unit(f, g, off0 if g == g0 else 0, end1 if g == g1 else None)
            if u.rows or g0 == g1:  # empty row groups between full ones are not part of a task
                units.append(u)
        return Task(index, self.files.ref(f), tuple(units), int(p["row_start"][k]), int(p["rows"][k]),
                    int(p["nbytes"][k]))

    def __getitem__(self, i: int):
        from .sources import Task

        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.first_piece[i]), int(self.first_piece[i + 1])
        if b - a == 1:
            return self._piece(a, i)
        group = tuple(self._piece(k, i) for k in range(a, b))
        g = group[0]
        return Task(i, g.file, g.units, g.row_start, int(self.rows[i]), int(self.nbytes[i]), group)

    @property
    def grouped(self) -> int:
        """How many tasks hold several small files."""
        return int(np.count_nonzero(np.diff(self.first_piece) > 1))

    def select(self, indices: np.ndarray) -> "TaskSubset":
        return TaskSubset(self, indices)


class TaskSubset:
    """Some of the plan's tasks (those --resume has to run), built on demand like `Tasks`."""

    def __init__(self, tasks: Tasks, indices: np.ndarray):
        self.tasks, self.indices = tasks, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        return self.tasks[int(self.indices[k])]

    def __iter__(self) -> Iterator:
        return (self[k] for k in range(len(self)))


def _batch_rows(rows: int, nbytes: int, max_rows: int, batch_bytes: int) -> int:
    per_row = nbytes / rows if rows else 1.0
    return int(max(1, min(max_rows, batch_bytes // max(per_row, 1.0))))


def cut(files: Files, task_rows: int | None, task_bytes: int | None, batch_bytes: int,
        group_files: int | None, group_min_tasks: int, default_group: int) -> Tasks:
    """The input cut into tasks: a file's units in runs of at most task_rows rows and task_bytes
    bytes (an IPC record batch larger than that cut into row slices), then small files grouped
    (`_group`). Linear in the units; only what planning learnt from the footers, no I/O."""
    max_rows = task_rows or (1 << 62)
    max_bytes = task_bytes or (1 << 62)
    batch_bytes = min(batch_bytes, max_bytes)
    out = {name: array("q") for name in (*Tasks._PIECES, "batch_rows")}
    c = files.cols
    starts, u_rows, u_bytes = c["unit_start"], c["unit_rows"], c["unit_nbytes"]
    for f in range(len(files)):
        ipc = int(c["fmt"][f]) != 0
        row = 0
        run: list[int] | None = None  # [unit_first, first_offset, unit_last, last_end, row_start, rows, nbytes]
        for g, (rows, nbytes) in enumerate(zip(u_rows[starts[f]:starts[f + 1]].tolist(),
                                               u_bytes[starts[f]:starts[f + 1]].tolist())):
            if rows == 0:
                continue
            step = rows
            if ipc and (rows > max_rows or nbytes > max_bytes):
                step = int(max(1, min(max_rows, max_bytes // max(nbytes / rows, 1.0))))
            for o in range(0, rows, step):
                n = min(step, rows - o)
                b = nbytes if n == rows else int(nbytes / rows * n)
                if run is not None and (run[5] + n > max_rows or run[6] + b > max_bytes):
                    _emit(out, f, run, max_rows, batch_bytes)
                    run = None
                if run is None:
                    run = [g, o, g, o + n, row, 0, 0]
                run[2], run[3] = g, o + n
                run[5] += n
                run[6] += b
                row += n
        if run is not None:
            _emit(out, f, run, max_rows, batch_bytes)
    pieces = {name: _frozen(out[name]) for name in Tasks._PIECES}
    piece_batch = _frozen(out["batch_rows"])
    n = len(piece_batch)
    if group_files is None:
        group_files = default_group if n >= group_min_tasks else 1
    if group_files > 1:
        first, rows, nbytes, batch = _group(pieces, piece_batch, group_files, max_rows, max_bytes, batch_bytes)
    else:
        first, rows, nbytes, batch = np.arange(n + 1, dtype=np.int64), pieces["rows"], pieces["nbytes"], piece_batch
    return Tasks(files, pieces, first, rows, nbytes, batch)


def _emit(out: dict, f: int, run: list[int], max_rows: int, batch_bytes: int) -> None:
    for name, v in zip(Tasks._PIECES, (f, *run)):
        out[name].append(v)
    out["batch_rows"].append(_batch_rows(run[5], run[6], max_rows, batch_bytes))


def _group(pieces: dict, piece_batch: np.ndarray, most: int, max_rows: int, max_bytes: int,
           batch_bytes: int) -> tuple[np.ndarray, ...]:
    """Consecutive pieces of different files joined into tasks of at most `most` files, `max_rows`
    rows and `max_bytes` bytes (a file's last slice may join the files after it; a file cut into
    several tasks keeps its full ones). Linear in the pieces; input order is kept."""
    first, t_rows, t_bytes, t_batch = array("q"), array("q"), array("q"), array("q")
    cur = c_rows = c_bytes = 0
    start = 0

    def flush(k: int) -> None:
        first.append(start)
        t_rows.append(c_rows)
        t_bytes.append(c_bytes)
        t_batch.append(int(piece_batch[start]) if k - start == 1 else
                       _batch_rows(c_rows, c_bytes, max_rows, batch_bytes))

    files, rows, nbytes = (pieces[n].tolist() for n in ("file", "rows", "nbytes"))
    for k in range(len(rows)):
        if cur and (cur >= most or c_rows + rows[k] > max_rows or c_bytes + nbytes[k] > max_bytes
                    or files[k] == files[k - 1]):
            flush(k)
            start, cur, c_rows, c_bytes = k, 0, 0, 0
        cur += 1
        c_rows += rows[k]
        c_bytes += nbytes[k]
    if cur:
        flush(len(rows))
    first.append(len(rows))
    return _frozen(first), _frozen(t_rows), _frozen(t_bytes), _frozen(t_batch)
