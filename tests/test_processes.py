"""fastkl and processes (SPEC §6 "Processes", "Memory"): forked children,
interrupts, memory caps shared by worker processes.

Every test runs real processes: a forked child that would hang is killed by
the script's own watchdog, an interrupted job gets a real SIGINT / SIGTERM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX processes")


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_DIR + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _python(code: str, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=timeout, env=_env(**env),
    )


# --------------------------------------------------------------------------
# The in-memory API in a forked child


# A child that hangs is killed after CHILD_SECONDS and the script exits 3.
_FORK_PRELUDE = """
import os, sys, threading, time
import numpy as np
import fastkl

CHILD_SECONDS = 30
x = np.full((4000, 256), 1 / 256, dtype=np.float32)  # 16 blocks of 64k elements: the pool is used

def wait_child(pid):
    deadline = time.monotonic() + CHILD_SECONDS
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            sys.exit(0 if status == 0 else 2)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print("the forked child hung", flush=True)
    sys.exit(3)

def in_child(fn):
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    wait_child(pid)
"""


def _fork_script(body: str) -> subprocess.CompletedProcess:
    r = _python(_FORK_PRELUDE + textwrap.dedent(body))
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_kl_in_a_forked_child_after_the_pool_was_used():
    _fork_script("""
        fastkl.kl(x, x, threads=4)  # the parent starts the kernel's thread pool
        def child():
            assert np.all(fastkl.kl(x, x, threads=4) == 0)
            assert np.all(fastkl.kl(x, x) == 0)
        in_child(child)
    """)


def test_kl_in_multiprocessing_fork_workers_after_the_pool_was_used():
    _fork_script("""
        import multiprocessing

        def work(i):
            return float(fastkl.kl(x, x, threads=4).sum())

        fastkl.kl(x, x, threads=4)
        pool = multiprocessing.get_context("fork").Pool(2)
        try:
            assert pool.map_async(work, range(4)).get(timeout=CHILD_SECONDS) == [0.0] * 4
        except multiprocessing.TimeoutError:
            print("the fork workers hung", flush=True)
            sys.exit(3)
        finally:
            pool.terminate()
    """)


def test_fork_while_another_thread_holds_the_pool_locks(tmp_path):
    # A thread of the parent holds the kernel pool's and the job task pools'
    # locks at the moment of the fork: in the child nobody will release them.
    _fork_script(f"""
        import pyarrow as pa, pyarrow.parquet as pq
        from fastkl import _engine
        from fastkl.jobs import run as job

        src, dest = {str(tmp_path / "src")!r}, {str(tmp_path / "out")!r}
        os.makedirs(src)
        col = pa.FixedSizeListArray.from_arrays(pa.array(x[:400].ravel()), 256)
        for i in range(3):
            pq.write_table(pa.table({{"p": col, "q": col}}), f"{{src}}/{{i}}.parquet", row_group_size=100)
        fastkl.run(src, dest + "-parent", quiet=True, workers=2)
        fastkl.kl(x, x, threads=4)

        held, release = threading.Event(), threading.Event()
        def hold():
            with _engine._pool_lock, job._task_pools_lock:
                held.set()
                release.wait()
        threading.Thread(target=hold, daemon=True).start()
        held.wait()

        def child():
            assert np.all(fastkl.kl(x, x, threads=4) == 0)
            assert fastkl.run(src, dest, quiet=True, workers=2).rows == 1200
        in_child(child)
        release.set()
    """)


# --------------------------------------------------------------------------
# Interrupts: one line, exit 130 / 143, workers gone, in about a second


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory):
    """4 files of 20,000 logits rows (K=256), cut into 40 tasks of 2,000 rows: seconds of work."""
    import shutil

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("slow") / "src"
    d.mkdir()
    x = np.random.default_rng(9).standard_normal((20_000, 256), dtype=np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 256)
    pq.write_table(pa.table({"p": col, "q": col}), d / "0.parquet", row_group_size=2000, compression="none")
    for i in range(1, 4):
        shutil.copy(d / "0.parquet", d / f"{i}.parquet")
    return d


def _descendants(pid: int) -> set[int]:
    """Processes below `pid` (from /proc: no psutil needed)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out.update(kids)
        todo.extend(kids)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _data_cap(pid: int) -> int | None:
    """RLIMIT_DATA soft limit of a process, None if unlimited."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max data size"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    return None


def _connected(pid: int) -> bool:
    """A process holding a socket: a Dask worker has imported everything and joined its scheduler."""
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def _started(proc, staging: str, at_start: bool) -> bool:
    workers = [p for p in _descendants(proc.pid) if b"spawn_main" in _cmdline(p)]
    if at_start:  # a local worker process is starting (importing), no task has run yet
        return bool(workers)
    # a first part is done and every worker is up: a worker still importing when the
    # group's Ctrl-C comes prints its own traceback (the known gap guarded below)
    return (os.path.isdir(staging) and any(n.endswith(".parquet") for n in os.listdir(staging))
            and all(_connected(p) for p in workers))


def _interrupt(src, dest, sig, scheduler, *extra, env=None, at_start=False) -> dict:
    """Start `fastkl run` in its own process group, signal the whole group (as a terminal's
    Ctrl-C does) once a first part is finished (or a first worker process exists);
    return what happened."""
    import signal
    import time

    staging = f"{dest}.fastkl-staging"
    cmd = [sys.executable, "-m", "fastkl.cli", "run", str(src), str(dest), "-q", "--kind", "logits",
           "-m", "kl", "-m", "js", "--task-rows", "2000", "--scheduler", scheduler, *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=_env(**(env or {})),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _started(proc, staging, at_start):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.02)
        workers = _descendants(proc.pid)
        caps = {p: _data_cap(p) for p in [proc.pid, *workers] if _alive(p)}
        spawned = {p for p in workers if b"spawn_main" in _cmdline(p)}  # not the resource tracker
        t0 = time.monotonic()
        os.killpg(proc.pid, getattr(signal, sig))
        err = proc.stderr.read()
        proc.wait(timeout=30)
        seconds = time.monotonic() - t0
        time.sleep(0.5)  # the resource tracker leaves once its pipe closes
        left = [p for p in workers if _alive(p)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"code": proc.returncode, "stderr": err, "seconds": seconds, "left": left, "caps": caps,
            "pid": proc.pid, "workers": spawned}


@pytest.mark.parametrize("scheduler,sig,code", [
    ("threads", "SIGINT", 130),
    ("threads", "SIGTERM", 143),
    ("processes", "SIGINT", 130),
    ("processes", "SIGTERM", 143),
])
def test_interrupt_stops_the_job_with_one_line(slow_source, tmp_path, scheduler, sig, code):
    dest = tmp_path / "out"
    r = _interrupt(slow_source, dest, sig, scheduler)
    lines = r["stderr"].splitlines()
    assert r["code"] == code, r
    what = "interrupted" if sig == "SIGINT" else "terminated (SIGTERM)"
    assert len(lines) == 1 and lines[0].startswith(f"fastkl: error: {what}"), r
    assert r["seconds"] < 3, r
    assert r["left"] == [], r
    assert not dest.exists()
    if scheduler == "processes":
        assert r["workers"], r  # the workers were there (and are gone)


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupt_while_the_local_workers_start(slow_source, tmp_path, sig, code):
    """An interrupt inside the cluster's start left the cluster to the exit handlers (10 s).

    Not guarded (known gap): a worker process still importing when a terminal's
    Ctrl-C reaches it prints its own traceback (it has no handler yet, and SIGINT
    cannot be ignored in it without losing the user's Ctrl-C in the client), so
    only the last line is the client's.
    """
    r = _interrupt(slow_source, tmp_path / "out", sig, "processes", at_start=True)
    lines = r["stderr"].splitlines()
    assert r["code"] == code and lines and lines[-1].startswith("fastkl: error: "), r
    if sig == "SIGTERM":  # a worker dies of it silently
        assert len(lines) == 1, r
    assert r["seconds"] < 3 and r["left"] == [], r


def test_memory_cap_is_a_total_over_the_local_worker_processes(slow_source, tmp_path):
    # before: the client kept the whole 6G and each worker got max(3G, 6G / 2)
    r = _interrupt(slow_source, tmp_path / "out", "SIGINT", "processes", "--workers", "2",
                   env={"FASTKL_MEMORY_LIMIT": "6G"})
    workers = [c for p, c in r["caps"].items() if p in r["workers"]]
    assert len(workers) == 2, r
    client = r["caps"][r["pid"]]
    assert None not in workers and client is not None, r
    assert client + sum(workers) <= 6 << 30, r
    assert min(workers) >= 2 << 30, r


def test_memory_cap_refuses_more_workers_than_fit(slow_source, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "fastkl.cli", "run", str(slow_source), str(tmp_path / "out"), "-q",
         "--task-rows", "2000", "--scheduler", "processes", "--workers", "3"],
        capture_output=True, text=True, timeout=120, env=_env(FASTKL_MEMORY_LIMIT="4G"),
    )
    assert r.returncode == 2, r
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "FASTKL_MEMORY_LIMIT=4G" in lines[0] and "allows 1 worker process" in lines[0], r
    assert "--workers 1" in lines[0] and "8G" in lines[0], r
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting", ["1G", "1500M"])
def test_memory_cap_too_small_to_start_is_one_line(tmp_path, setting):
    r = subprocess.run(
        [sys.executable, "-m", "fastkl.cli", "run", str(tmp_path / "nothing.parquet"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=_env(FASTKL_MEMORY_LIMIT=setting),
    )
    assert r.returncode == 2, r
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and f"FASTKL_MEMORY_LIMIT={setting}" in lines[0] and "too small" in lines[0], r
    assert "2G" in lines[0], r


# --------------------------------------------------------------------------
# Numba's cache is written by the client only: every dtype is warmed up first


def test_warmup_covers_every_dtype_of_mixed_shards(tmp_path):
    """float32 and float64 shards: the client compiles (or loads) both kernels before any
    worker starts, so no two workers write the same cache files (numba issue 4807)."""
    r = _python(f"""
        import numpy as np, pyarrow as pa, pyarrow.parquet as pq
        from fastkl.kernels import dense as K
        from fastkl._engine import warmup
        from fastkl.jobs.run import _kernel_dtypes
        from fastkl._options import Options
        from fastkl.io.sources import scan

        src = {str(tmp_path)!r}
        for i, t in enumerate([pa.float32(), pa.float32(), pa.float64(), pa.float16()]):
            col = pa.array([[0.25, 0.75]] * 10, pa.list_(t))
            pq.write_table(pa.table({{"p": col, "q": col}}), f"{{src}}/{{i}}.parquet")
        plan, _ = scan(src, p="p", q="q", keep=())
        dtypes = _kernel_dtypes(plan)
        assert [str(d) for d in dtypes] == ["float16", "float32", "float64"], dtypes  # float16: the 16-bit kernel
        warmup(dtypes, Options(), ("kl",))
        assert len(K.KERNELS["probs"].signatures) == 3, K.KERNELS["probs"].signatures
        warmup(dtypes, Options.from_kwargs(kind="logits"), ("entropy",))  # p only: the logs family
        assert len(K.KERNELS["logs"].signatures) == 3, K.KERNELS["logs"].signatures
    """)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------
# Memory of a float16 job: tasks and batches sized on the bytes the kernel holds


_PEAK_RSS = """
import resource, subprocess, sys
r = subprocess.run([sys.executable, "-m", "fastkl.cli", "run", *sys.argv[1:]], capture_output=True, text=True)
assert r.returncode == 0, r.stderr
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def _peak_rss(*args: str) -> int:
    """Peak RSS in bytes of one `fastkl run` (a fresh parent: its only child is the job)."""
    r = _python(_PEAK_RSS, *args)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


def test_float16_job_memory_is_bounded_like_float32(tmp_path):
    """One IPC record batch of 1,000 rows x K=32,000: 2.8x the float32 job's RSS before
    (every read batch converted the whole record batch's child to float32)."""
    import numpy as np
    import pyarrow as pa

    x = np.random.default_rng(3).random((1000, 32_000), dtype=np.float32) + 0.5
    x /= x.sum(1, keepdims=True)
    peaks = {}
    for t in (np.float16, np.float32):
        col = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(t).ravel()), 32_000)
        table = pa.table({"p": col, "q": col})
        path = tmp_path / f"{np.dtype(t).name}.arrow"
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table, max_chunksize=1000)
        del col, table
        peaks[t] = _peak_rss(str(path), str(tmp_path / f"out-{np.dtype(t).name}"), "-q", "--sum-tol", "0.1")
    assert peaks[np.float16] < peaks[np.float32] * 1.25 + (64 << 20), peaks
