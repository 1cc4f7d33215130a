"""A source that changes under a job (SPEC §6 "Changing input"), IPC streams, IPC read through handles.

A file replaced (new inode) or rewritten in place (same inode; mtime can be
restored with os.utime, ctime cannot) after the job planned from it must fail
the job naming the file, or be redone by --resume: never a part mixing two
versions. Real processes, real files, real signals; the in-process variants
only use run_task / open_file as timing hooks.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fastkl
import fastkl.jobs.run as job
from fastkl.io.output import MANIFEST, staging_path
from test_jobs import _rows, check_rows, expected, read_dest

ROWS = 240  # rows per file; tasks of 2 rows: a CLI job of hundreds of tasks that a signal can catch mid-way


def _write_parquet(path, table, group):
    """Uncompressed, plain: a rewrite with new values keeps the size and the row-group layout."""
    tmp = f"{path}.new"
    pq.write_table(table, tmp, row_group_size=group, compression="none", use_dictionary=False)
    os.replace(tmp, path)


def _parquet_dataset(root, rng, *, files=3, rows=ROWS, group=2):
    os.makedirs(root, exist_ok=True)
    rows = rows if isinstance(rows, list) else [rows] * files
    tables = [_rows(rng, n, 1000 * i) for i, n in enumerate(rows)]
    paths = [os.path.join(root, f"shard-{i}.parquet") for i in range(files)]
    for path, t in zip(paths, tables):
        _write_parquet(path, t, group)
    return paths, tables


def _ipc_dataset(root, rng, *, files=3, rows=ROWS, batch=2):
    os.makedirs(root, exist_ok=True)
    tables = [_rows(rng, rows, 1000 * i) for i in range(files)]
    paths = [os.path.join(root, f"shard-{i}.arrow") for i in range(files)]
    for path, t in zip(paths, tables):
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
            for b in t.to_batches(max_chunksize=batch):
                w.write_batch(b)
    return paths, tables


def _cli(source, dest, *extra):
    cmd = [sys.executable, "-m", "fastkl.cli", "run", str(source), str(dest), "--keep", "id", "--quiet", *extra]
    env = dict(os.environ, FASTKL_STATE_FLUSH_S="0")  # each finished part's state logged at once: a kill keeps it
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finished_parts(dest):
    return glob.glob(os.path.join(staging_path(dest), "part-*.parquet"))


def _pause_after_first_part(proc, dest, timeout=120.0, parts=1):
    """SIGSTOP the job as soon as it has finished `parts` parts (so it planned and is reading)."""
    t0 = time.monotonic()
    while len(_finished_parts(dest)) < parts:
        if proc.poll() is not None:
            raise AssertionError(f"job ended before its first part: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("no part written")
        time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)


def _one_line_error(proc, name):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], err
    return lines[0]


# --------------------------------------------------------------------------
# A file replaced or rewritten while the job runs


@pytest.mark.parametrize("fmt", ["parquet", "ipc"])
def test_shard_replaced_while_job_is_paused_fails_naming_it(tmp_path, rng, fmt):
    paths, tables = (_parquet_dataset if fmt == "parquet" else _ipc_dataset)(str(tmp_path / "src"), rng)
    dest = tmp_path / "out"
    proc = _cli(tmp_path / "src", dest, "--task-rows", "2", "--scheduler", "sync")  # tasks in order
    _pause_after_first_part(proc, dest)
    try:
        newer = _rows(np.random.default_rng(7), ROWS, 1000)  # same layout, other values
        if fmt == "parquet":
            _write_parquet(paths[1], newer, 2)
        else:
            _ipc_dataset(str(tmp_path / "new"), np.random.default_rng(7), files=1)
            os.replace(tmp_path / "new" / "shard-0.arrow", paths[1])
    finally:
        proc.send_signal(signal.SIGCONT)
    line = _one_line_error(proc, "shard-1")
    assert "changed since the job started" in line
    assert not dest.exists()


def _before_task(monkeypatch, n: int, action) -> None:
    """Run `action()` just before the job's n-th task (1-based; the sync scheduler runs them in order)."""
    real, calls = job.run_task, []

    def spy(task, *a, **k):
        calls.append(task.index)
        if len(calls) == n:
            action()
        return real(task, *a, **k)

    monkeypatch.setattr(job, "run_task", spy)


def test_shard_replaced_between_tasks_in_process(tmp_path, rng, monkeypatch):
    """Replaced after its first task: the part would mix the old and the new file."""
    paths, _ = _parquet_dataset(str(tmp_path / "src"), rng, files=2, rows=20, group=4)
    _before_task(monkeypatch, 2, lambda: _write_parquet(paths[0], _rows(np.random.default_rng(3), 20, 0), 4))
    with pytest.raises(fastkl.DataError, match=r"shard-0.parquet: changed since the job started \(replaced"):
        fastkl.run(tmp_path / "src", tmp_path / "out", keep=("id",), task_rows=4, scheduler="sync")
    assert not (tmp_path / "out").exists()


def _rewrite_in_place(path, table, group):
    """New values into the same inode, size and mtime restored: only ctime (and the data) tell."""
    st = os.stat(path)
    tmp = f"{path}.new"
    pq.write_table(table, tmp, row_group_size=group, compression="none", use_dictionary=False)
    with open(tmp, "rb") as f:
        data = f.read()
    os.unlink(tmp)
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


def test_shard_rewritten_in_place_with_mtime_restored_fails(tmp_path, rng, monkeypatch):
    paths, _ = _parquet_dataset(str(tmp_path / "src"), rng, files=2, rows=20, group=4)
    def rewrite():
        time.sleep(0.01)  # a ctime tick
        _rewrite_in_place(paths[0], _rows(np.random.default_rng(3), 20, 0), 4)

    _before_task(monkeypatch, 2, rewrite)
    with pytest.raises(fastkl.DataError, match=r"shard-0.parquet: changed since the job started"):
        fastkl.run(tmp_path / "src", tmp_path / "out", keep=("id",), task_rows=4, scheduler="sync")


def test_shard_rewritten_while_a_task_reads_it_fails(tmp_path, rng):
    """Checked again at the end of the read, on the task's own handle."""
    paths, _ = _parquet_dataset(str(tmp_path / "src"), rng, files=1, rows=20, group=4)
    real = job._batches

    def rewrite_after_first_batch(*a, **k):
        for i, b in enumerate(real(*a, **k)):
            yield b
            if i == 0:
                time.sleep(0.01)
                _rewrite_in_place(paths[0], _rows(np.random.default_rng(3), 20, 0), 4)

    job._batches = rewrite_after_first_batch
    try:
        with pytest.raises(fastkl.DataError, match=r"shard-0.parquet: changed since the job started"):
            fastkl.run(tmp_path / "src", tmp_path / "out", keep=("id",), task_rows=20, scheduler="sync")
    finally:
        job._batches = real
    assert not (tmp_path / "out").exists()


def test_ipc_file_that_lost_batches_is_named(tmp_path, rng):
    paths, _ = _ipc_dataset(str(tmp_path / "src"), rng, files=1, rows=40, batch=4)
    real, calls = job.run_task, []

    def shorten_before_last_task(task, *a, **k):
        calls.append(task.index)
        if task.index == 9:
            t = _rows(np.random.default_rng(3), 8, 0)
            with pa.OSFile(paths[0] + ".new", "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
                for b in t.to_batches(max_chunksize=4):
                    w.write_batch(b)
            os.replace(paths[0] + ".new", paths[0])
        return real(task, *a, **k)

    job.run_task = shorten_before_last_task
    try:
        with pytest.raises(fastkl.DataError) as err:
            fastkl.run(tmp_path / "src", tmp_path / "out", keep=("id",), task_rows=4, scheduler="sync")
    finally:
        job.run_task = real
    msg = str(err.value)
    assert msg.startswith(paths[0]) and "\n" not in msg and "changed since the job started" in msg


# --------------------------------------------------------------------------
# --resume after the input changed with the same size and mtime


def test_resume_redoes_parts_of_a_file_rewritten_with_mtime_restored(tmp_path, rng):
    paths, _ = _parquet_dataset(str(tmp_path / "src"), rng, files=2, rows=[8, 2 * ROWS])
    dest = tmp_path / "out"
    proc = _cli(tmp_path / "src", dest, "--task-rows", "2", "--scheduler", "sync")  # tasks in order
    _pause_after_first_part(proc, dest, parts=6)  # file 0's 4 parts and some of file 1's
    proc.kill()
    proc.communicate()
    assert not dest.exists() and len(_finished_parts(dest)) >= 6
    time.sleep(0.01)
    _rewrite_in_place(paths[0], _rows(np.random.default_rng(5), 8, 0), 2)

    clean = tmp_path / "clean"
    for out, extra in ((clean, ()), (dest, ("--resume",))):
        proc = _cli(tmp_path / "src", out, "--task-rows", "2", *extra)
        assert proc.wait(timeout=300) == 0, proc.communicate()
    manifest = json.loads((dest / MANIFEST).read_text())
    assert any(p["resumed"] for p in manifest["parts"])  # a real resume ...
    assert not any(p["resumed"] for p in manifest["parts"] if p["input"] == 0)  # ... that redid file 0
    assert read_dest(dest).equals(read_dest(clean))
    st = os.stat(paths[0])
    entry = manifest["inputs"][0]
    assert (entry["inode"], entry["ctime_ns"], entry["size"]) == (st.st_ino, st.st_ctime_ns, st.st_size)
    assert len(entry["footer"]) == 32


# --------------------------------------------------------------------------
# Arrow IPC: never memory-mapped


def test_ipc_truncated_while_job_is_paused_fails_naming_it(tmp_path, rng):
    paths, _ = _ipc_dataset(str(tmp_path / "src"), rng)
    dest = tmp_path / "out"
    proc = _cli(tmp_path / "src", dest, "--task-rows", "2", "--scheduler", "sync")  # tasks in order
    _pause_after_first_part(proc, dest)
    try:
        os.truncate(paths[0], os.path.getsize(paths[0]) // 2)  # the file being read
    finally:
        proc.send_signal(signal.SIGCONT)
    line = _one_line_error(proc, "shard-0")
    assert "changed since the job started" in line
    assert not dest.exists()


_TRUNCATE_WHILE_OPEN = textwrap.dedent(
    """
    import os, sys
    import pyarrow as pa
    import fastkl, fastkl.jobs.run as job

    path, src, dest = sys.argv[1:4]
    real_task, real_open = job.run_task, pa.ipc.open_file
    state = {"task": None, "done": False}

    def run_task(task, *a, **k):
        state["task"] = task.index
        return real_task(task, *a, **k)

    def open_file(source, *a, **k):  # the task's reader opens, then the file shrinks under it
        reader = real_open(source, *a, **k)
        if state["task"] == 9 and not state["done"]:
            state["done"] = True
            os.truncate(path, 64)
        return reader

    job.run_task, pa.ipc.open_file = run_task, open_file
    try:
        fastkl.run(src, dest, keep=("id",), task_rows=4, scheduler="sync")
    except fastkl.DataError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
    """
)


def test_ipc_truncated_after_the_task_opened_it_is_an_error_not_sigbus(tmp_path, rng):
    """A memory-mapped file truncated under the reader was a SIGBUS (exit -7, no message)."""
    paths, _ = _ipc_dataset(str(tmp_path / "src"), rng, files=1, rows=40, batch=4)
    r = subprocess.run(
        [sys.executable, "-c", _TRUNCATE_WHILE_OPEN, paths[0], str(tmp_path / "src"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(paths[0]) and "changed since the job started" in lines[0]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------
# Arrow IPC streams (Hugging Face datasets' cache files)


def _write_stream(path, table, batch):
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        for b in table.to_batches(max_chunksize=batch):
            w.write_batch(b)


@pytest.mark.parametrize("name", ["data-{}.arrow", "data-{}"])
def test_ipc_stream_files_are_read_row_by_row(tmp_path, rng, name):
    root = tmp_path / "src"
    root.mkdir()
    tables = [_rows(rng, 30 + 7 * i, 1000 * i) for i in range(3)]
    for i, t in enumerate(tables):
        _write_stream(str(root / name.format(i)), t, batch=8 + i)
    table = pa.concat_tables([t.cast(tables[0].schema) for t in tables])
    dest = tmp_path / "out"
    fastkl.run(root, dest, measures=("kl", "js"), keep=("id",), task_rows=5)  # batches split into tasks
    got = read_dest(dest)
    assert got.column("id").to_pylist() == table.column("id").to_pylist()
    for m in ("kl", "js"):
        check_rows(got.column(m).to_pylist(), expected(table, m), m)
    manifest = json.loads((dest / MANIFEST).read_text())
    assert {f["format"] for f in manifest["inputs"]} == {"ipc_stream"}
    assert all(len(f["footer"]) == 32 and f["inode"] for f in manifest["inputs"])


def test_ipc_stream_with_a_dictionary_column_and_compression(tmp_path, rng):
    t = _rows(rng, 50, 0)
    t = t.append_column("split", pa.array(["train", "test"] * 25).dictionary_encode())
    path = str(tmp_path / "cache-0001.arrow")
    opts = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, t.schema, options=opts) as w:
        for b in t.to_batches(max_chunksize=16):
            w.write_batch(b)
    dest = tmp_path / "out"
    fastkl.run(path, dest, keep=("id", "split"), task_rows=6)
    got = read_dest(dest)
    assert got.column("split").to_pylist() == t.column("split").to_pylist()
    check_rows(got.column("kl").to_pylist(), expected(t, "kl"), "kl")


def test_ipc_stream_rewritten_before_resume_is_redone(tmp_path, rng):
    root = tmp_path / "src"
    root.mkdir()
    path = str(root / "a.arrow")
    _write_stream(path, _rows(rng, 30, 0), 8)
    dest = tmp_path / "out"
    real, calls = job.run_task, []

    def interrupted(task, *a, **k):
        calls.append(task.index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task, *a, **k)

    job.run_task = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            fastkl.run(root, dest, keep=("id",), task_rows=8, scheduler="sync")
    finally:
        job.run_task = real
    st = os.stat(path)
    time.sleep(0.01)
    _write_stream(path + ".new", _rows(np.random.default_rng(1), 30, 0), 8)  # same layout, new values
    with open(path + ".new", "rb") as f, open(path, "r+b") as g:
        g.write(f.read())
    os.unlink(path + ".new")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(path) == st.st_size
    fastkl.run(root, dest, keep=("id",), task_rows=8, resume=True)
    clean = tmp_path / "clean"
    fastkl.run(root, clean, keep=("id",), task_rows=8)
    assert read_dest(dest).equals(read_dest(clean))
    assert not any(p["resumed"] for p in json.loads((dest / MANIFEST).read_text())["parts"])


def test_random_bytes_named_arrow_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "x.arrow"
    path.write_bytes(b"\xff\xff\xff\xff\x10\x00\x00\x00" + bytes(range(40)))
    with pytest.raises(fastkl.DataError, match=r"x.arrow: not a readable Arrow IPC file"):
        fastkl.run(path, tmp_path / "out")


# --------------------------------------------------------------------------
# A big record batch split into tasks: each task reads only its rows


def _typed_table(rng, n):
    t = _rows(rng, n, 0)
    k = len(t.column("p")[0].as_py() or t.column("p")[1].as_py())
    p = pa.FixedSizeListArray.from_arrays(
        pa.array(np.concatenate([np.asarray(r if r is not None else [1.0 / k] * k) for r in t.column("p").to_pylist()])),
        k,
    )
    return pa.table({
        "id": t.column("id"),
        "name": pa.array([None if i % 5 == 0 else f"row-{i}" * (i % 3) for i in range(n)], pa.string()),
        "flag": pa.array([None if i % 7 == 0 else i % 2 == 0 for i in range(n)]),
        "score": pa.array([None if i % 4 == 0 else i / 3 for i in range(n)], pa.float32()),
        "p": p,
        "q": t.column("q"),  # large_list<double> with null rows
    })


@pytest.mark.parametrize("kind", ["file", "stream", "file-lz4"])
def test_slices_of_a_big_batch_are_read_row_by_row(tmp_path, rng, kind):
    t = _typed_table(rng, 101)
    path = str(tmp_path / "one.arrow")
    opts = pa.ipc.IpcWriteOptions(compression="lz4" if kind == "file-lz4" else None)
    with pa.OSFile(path, "wb") as sink:
        new = pa.ipc.new_stream if kind == "stream" else pa.ipc.new_file
        with new(sink, t.schema, options=opts) as w:
            w.write_table(t)  # one batch
    dest = tmp_path / "out"
    keep = ("id", "name", "flag", "score")
    fastkl.run(path, dest, measures=("kl", "tv"), keep=keep, task_rows=13)
    got = read_dest(dest)
    assert len(json.loads((dest / MANIFEST).read_text())["parts"]) == 8
    assert got.select(list(keep)).equals(t.select(list(keep)))
    for m in ("kl", "tv"):
        check_rows(got.column(m).to_pylist(), expected(t, m), m)


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_each_slice_of_a_big_batch_reads_only_its_rows(tmp_path):
    """20 tasks of one 4 MB batch read about 4 MB, not 20 x 4 MB (each task reading the whole batch)."""
    n, k = 2000, 256
    vals = np.random.default_rng(0).random(n * k).astype(np.float32) + np.float32(0.01)
    p = pa.FixedSizeListArray.from_arrays(pa.array(vals), k)
    t = pa.table({"id": np.arange(n), "p": p, "q": p})
    path = str(tmp_path / "one.arrow")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
        w.write_table(t)
    kw = dict(keep=("id",), task_rows=n // 20, normalize=True)
    fastkl.run(path, tmp_path / "warm", **kw)  # imports, kernel cache: not counted
    before = _bytes_read()
    fastkl.run(path, tmp_path / "out", **kw)
    read = _bytes_read() - before
    assert len(json.loads((tmp_path / "out" / MANIFEST).read_text())["parts"]) == 20
    assert read < 3 * os.path.getsize(path), read


def test_shard_removed_while_job_runs_is_named(tmp_path, rng, monkeypatch):
    paths, _ = _parquet_dataset(str(tmp_path / "src"), rng, files=2, rows=20, group=4)
    _before_task(monkeypatch, 2, lambda: os.unlink(paths[1]))
    with pytest.raises(fastkl.DataError, match=r"shard-1.parquet: changed since the job started \(removed\)"):
        fastkl.run(tmp_path / "src", tmp_path / "out", keep=("id",), task_rows=4, scheduler="sync")
