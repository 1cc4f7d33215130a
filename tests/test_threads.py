"""fastkl called from many Python threads at once (SPEC §9: kernels must be
safe to call concurrently): every result equals the single-threaded one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

import fastkl
import naive
from naive import MEASURES, chunked, list_array

N_THREADS = 8
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)


def _job(i: int):
    """Input i: a different size, dtype, kind, container and option set per job."""
    rng = np.random.default_rng(1000 + i)
    kind = naive.KINDS[i % 3]
    dtype = (np.float32, np.float64)[i % 2]
    n, k = 200 + 37 * i, 3 + 5 * i
    P = naive.make_rows(rng, kind, n, k, dtype, zero_frac=0.2)
    Q = naive.make_rows(rng, kind, n, k, dtype, zero_frac=0.1)
    P[::17, 0] = np.nan  # some invalid rows
    opts = dict(kind=kind, on_invalid="null", base=2.0 if i % 4 == 0 else np.e)
    if kind == "logits":
        opts["temperature"] = 0.5 + i
    if i % 3 == 1:
        opts["smoothing"] = 1e-6
    if i >= 4:  # Arrow inputs, sliced and chunked, with null rows
        rows_p = [None if r % 11 == 5 else list(map(float, P[r])) for r in range(n)]
        rows_q = [list(map(float, Q[r])) for r in range(n)]
        vt = "float32" if dtype == np.float32 else "float64"
        p = chunked(list_array(rows_p, vt, ("list", "large_list", "fixed_size_list")[i % 3], pad=3), [n // 3])
        q = chunked(list_array(rows_q, vt, "list"), [n // 2, n - 5])
        return p, q, opts
    return P, Q, opts


def _run(i: int) -> pa.Table:
    p, q, opts = _job(i)
    return fastkl.divergences(p, q, measures=MEASURES, **naive.params(MEASURES), status=True, **opts)


def _same(a: pa.Table, b: pa.Table) -> bool:
    if a.column_names != b.column_names or a.num_rows != b.num_rows:
        return False
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if x != y:  # null == null; values must be bitwise equal
            return False
    return True


def test_divergences_from_eight_threads():
    jobs = list(range(N_THREADS))
    single = [_run(i) for i in jobs]
    # the inputs really differ, and every job has valid and invalid rows
    assert len({t.num_rows for t in single}) == N_THREADS
    for t in single:
        st = t.column("status").to_pylist()
        assert "ok" in st and "nan" in st
    with ThreadPoolExecutor(max_workers=N_THREADS) as pool:
        for _ in range(3):  # several rounds: more chances for threads to overlap
            # each thread runs its own job, twice over in a different order
            order = jobs + jobs[::-1]
            results = list(pool.map(_run, order))
            for i, t in zip(order, results):
                assert _same(t, single[i]), f"job {i} differs when run concurrently"


def test_measure_functions_from_threads():
    rng = np.random.default_rng(7)
    inputs = [
        (naive.make_probs(rng, 300, 20, np.float32), naive.make_probs(rng, 300, 20, np.float64))
        for _ in range(N_THREADS)
    ]
    fns = [getattr(fastkl, m) for m in MEASURES]

    def work(j):
        P, Q = inputs[j]
        fn = fns[j % len(fns)]
        return fn(P) if fn is fastkl.entropy else fn(P, Q)

    single = [work(j) for j in range(N_THREADS)]
    with ThreadPoolExecutor(max_workers=N_THREADS) as pool:
        for _ in range(3):
            for j, out in zip(range(N_THREADS), pool.map(work, range(N_THREADS))):
                np.testing.assert_array_equal(out, single[j])


def test_errors_from_threads_stay_in_their_thread():
    """A thread whose input is invalid raises; the others are unaffected."""
    rng = np.random.default_rng(3)
    good = [(naive.make_probs(rng, 50, 8), naive.make_probs(rng, 50, 8)) for _ in range(N_THREADS)]
    bad_rows = {j: 7 + j for j in range(0, N_THREADS, 2)}
    inputs = []
    for j, (P, Q) in enumerate(good):
        P = P.copy()
        if j in bad_rows:
            P[bad_rows[j]] = -P[bad_rows[j]]
        inputs.append((P, Q))
    expected = {j: fastkl.kl(*good[j]) for j in range(N_THREADS) if j not in bad_rows}

    def work(j):
        try:
            return fastkl.kl(*inputs[j])
        except fastkl.InvalidRowError as e:
            return e

    with ThreadPoolExecutor(max_workers=N_THREADS) as pool:
        out = list(pool.map(work, range(N_THREADS)))
    for j, res in enumerate(out):
        if j in bad_rows:
            assert isinstance(res, fastkl.InvalidRowError)
            assert (res.reason, res.row, res.count) == ("negative", bad_rows[j], 1)
        else:
            np.testing.assert_array_equal(res, expected[j])


def test_first_calls_from_threads_in_a_fresh_process(tmp_path):
    """The very first calls (kernel compile or cache load) made by 8 threads at once."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{TESTS_DIR!r}, {REPO_DIR!r}]
        from concurrent.futures import ThreadPoolExecutor
        import numpy as np
        import fastkl, naive
        assert fastkl.__file__.startswith({REPO_DIR!r}), fastkl.__file__

        def run(i):
            rng = np.random.default_rng(i)
            dtype = (np.float32, np.float64)[i % 2]
            P = naive.make_probs(rng, 64, 5 + i, dtype)
            Q = naive.make_probs(rng, 64, 5 + i, dtype)
            return fastkl.divergences(P, Q, measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES)).to_pylist()

        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(run, range(8)))
        assert concurrent == [run(i) for i in range(8)]
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "ok"


def _counting_kernel(blocks_done, running, peak, lock, fail_at=None):
    """A stand-in for a kernel: records each block and the most threads in it at once."""
    import threading
    import time

    def kernel(lo, hi):
        with lock:
            running.add(threading.get_ident())
            peak[0] = max(peak[0], len(running))
        try:
            time.sleep(0.002)  # long enough for the other threads to overlap
            if fail_at == lo:
                raise ValueError(f"block {lo}")
            with lock:
                blocks_done.append((lo, hi))
        finally:
            with lock:
                running.discard(threading.get_ident())
    return kernel


def test_threads_caps_the_threads_a_call_uses(monkeypatch):
    """threads=N means N threads (the caller and N - 1 pool helpers) even when the
    pool has more, every block run once; an error stops the blocks not yet taken."""
    import threading

    from fastkl import _config, _engine

    monkeypatch.setattr(_config, "cores", lambda: 8)
    monkeypatch.setattr(_engine, "_pool", None)  # a pool of 8 for this test
    blocks = [(i, i + 1) for i in range(24)]
    for threads in (1, 2, 3):
        done, running, peak, lock = [], set(), [0], threading.Lock()
        _engine._run_ranges(_counting_kernel(done, running, peak, lock), (), blocks, threads)
        assert sorted(done) == blocks
        assert peak[0] == threads
    done, running, peak, lock = [], set(), [0], threading.Lock()
    try:
        _engine._run_ranges(_counting_kernel(done, running, peak, lock, fail_at=3), (), blocks, 2)
    except ValueError as e:
        assert str(e) == "block 3"
    else:
        raise AssertionError("the block's error was not raised")
    assert len(done) < len(blocks) - 10  # the rest were not started
    _engine._pool.shutdown()


def test_a_call_does_not_wait_for_helpers_the_busy_pool_never_started(monkeypatch):
    """With the pool's workers all busy with another call's long blocks, a second call runs
    its blocks in its own thread and returns without waiting for them."""
    import threading
    import time

    from fastkl import _config, _engine

    monkeypatch.setattr(_config, "cores", lambda: 1)
    monkeypatch.setattr(_engine, "_pool", None)  # one worker, kept busy below
    release = threading.Event()
    _engine._get_pool().submit(release.wait, 10)
    done = []
    t0 = time.perf_counter()
    _engine._run_ranges(lambda lo, hi: done.append(lo), (), [(i, i + 1) for i in range(8)], 2)
    elapsed = time.perf_counter() - t0
    release.set()
    assert sorted(done) == list(range(8)) and elapsed < 2.0
    _engine._pool.shutdown()
