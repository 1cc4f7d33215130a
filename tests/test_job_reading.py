"""The job's read path: batches aligned to row groups, the read-ahead thread."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from fastkl.jobs.run import _aligned_batch_rows, _prefetched


def units(*rows):
    return [SimpleNamespace(rows=r) for r in rows]


@pytest.mark.parametrize(
    "bound, rows, want",
    [
        (16384, (25000, 25000), 12500),  # big row groups: equal halves, none straddles
        (10000, (25000,), 8334),
        (16384, (5000, 5000, 5000, 5000), 15000),  # small equal row groups: three whole ones per batch
        (16384, (5000, 7000), 16384),  # unequal and small: the bound
        (100, (100, 100), 100),
        (7, (), 7),
    ],
)
def test_aligned_batch_rows(bound, rows, want):
    got = _aligned_batch_rows(bound, units(*rows))
    assert got == want and 1 <= got <= bound


def gen(n, fail_at=None, log=None):
    try:
        for i in range(n):
            if i == fail_at:
                raise OSError(f"broken at {i}")
            yield i
    finally:
        if log is not None:
            log.append("closed")


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_keeps_order(depth):
    assert list(_prefetched(gen(50), depth, "t")) == list(range(50))


def test_prefetched_raises_the_readers_error_in_order():
    got = []
    with pytest.raises(OSError, match="broken at 3"):
        for x in _prefetched(gen(10, fail_at=3), 1, "t"):
            got.append(x)
    assert got == [0, 1, 2]


def test_prefetched_stops_the_reader_when_the_consumer_stops():
    log = []
    before = threading.active_count()
    it = _prefetched(gen(10**9, log=log), 2, "fastkl-test-reader")
    assert next(it) == 0
    it.close()  # what run_task does when the kernel or the writer fails
    assert log == ["closed"]
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "fastkl-test-reader" for t in threading.enumerate())


def test_prefetched_reads_at_most_depth_ahead():
    produced = []

    def counting():
        for i in range(100):
            produced.append(i)
            yield i

    it = _prefetched(counting(), 1, "t")
    assert next(it) == 0
    time.sleep(0.2)
    # one being consumed, one queued, one read and waiting for room
    assert len(produced) <= 3
    it.close()


def _file(path, rows=400, k=8, row_group=100, bad_row=None):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    p = rng.random((rows, k)) + 0.1
    p /= p.sum(1, keepdims=True)
    q = p[::-1].copy()
    if bad_row is not None:
        p[bad_row, 0] = -0.5
    col = lambda x: pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), k).cast(pa.list_(pa.float64()))
    pq.write_table(pa.table({"id": np.arange(rows), "p": col(p), "q": col(q)}), path, row_group_size=row_group)
    return p, q


@pytest.mark.parametrize("scheduler, task_bytes", [("sync", 4000), ("threads", 4000), ("sync", None),
                                                   ("threads", None)])
def test_job_with_read_ahead_matches_memory(tmp_path, scheduler, task_bytes):
    """sync (or a single task) gives a task every core, so it reads ahead; with
    task_bytes=4000 every row group is a task, by default one task holds them all."""
    import numpy as np
    import pyarrow.parquet as pq

    import fastkl

    p, q = _file(tmp_path / "a.parquet", rows=1000, row_group=70)  # 15 row groups, the last one short
    kw = {"task_bytes": task_bytes} if task_bytes else {}
    fastkl.run(str(tmp_path / "a.parquet"), str(tmp_path / "out"), scheduler=scheduler, quiet=True, **kw)
    got = pq.read_table(tmp_path / "out").column("kl").to_numpy()
    np.testing.assert_allclose(got, fastkl.kl(p, q), rtol=1e-12)


@pytest.mark.parametrize("bad_row", [33, 333])
def test_job_with_read_ahead_reports_the_bad_row(tmp_path, bad_row):
    """One task of 4 row groups with every core: the read-ahead path names the row and its row group."""
    import fastkl

    _file(tmp_path / "a.parquet", bad_row=bad_row)
    with pytest.raises(fastkl.InvalidRowError, match=f"row {bad_row}\\b.*row group {bad_row // 100}"):
        fastkl.run(str(tmp_path / "a.parquet"), str(tmp_path / "out"), scheduler="sync", quiet=True)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ the task pool


def test_job_pool_shutdown_cancels_queued_and_waits_for_running():
    from fastkl.jobs.run import _JobPool, _task_pool

    shared = _task_pool(1)
    job = _JobPool(shared, 1)
    started, done = threading.Event(), []

    def slow():
        started.set()
        time.sleep(0.2)
        done.append("slow")

    running = job.submit(slow)
    queued = job.submit(done.append, "queued")
    started.wait(5)
    job.shutdown(wait=True, cancel_futures=True)
    assert running.done() and done == ["slow"]  # waited for the running one
    assert queued.cancelled()  # the queued one never ran
    assert shared.submit(lambda: 7).result(5) == 7  # the shared pool lives on


def test_task_pool_is_shared_and_recreated_after_fork():
    import os

    from fastkl.jobs.run import _task_pool

    pool = _task_pool(2)
    assert _task_pool(2) is pool
    assert pool.submit(lambda: 1).result(5) == 1
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its copy of the pool has no threads
        try:
            import fastkl.jobs.run as J

            ok = J._task_pool(2) is not pool and J._task_pool(2).submit(lambda: 2).result(5) == 2
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)


def test_concurrent_jobs_share_the_pool(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    import fastkl

    p, q = _file(tmp_path / "a.parquet")
    errors = []

    def job(i):
        try:
            fastkl.run(str(tmp_path / "a.parquet"), str(tmp_path / f"out{i}"), quiet=True, task_bytes=4000)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    want = fastkl.kl(p, q)
    for i in range(3):
        np.testing.assert_allclose(pq.read_table(tmp_path / f"out{i}").column("kl").to_numpy(), want, rtol=1e-12)
