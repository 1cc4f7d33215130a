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
        from fastkl import _engine, _job

        src, dest = {str(tmp_path / "src")!r}, {str(tmp_path / "out")!r}
        os.makedirs(src)
        col = pa.FixedSizeListArray.from_arrays(pa.array(x[:400].ravel()), 256)
        for i in range(3):
            pq.write_table(pa.table({{"p": col, "q": col}}), f"{{src}}/{{i}}.parquet", row_group_size=100)
        fastkl.run(src, dest + "-parent", quiet=True, workers=2)
        fastkl.kl(x, x, threads=4)

        held, release = threading.Event(), threading.Event()
        def hold():
            with _engine._pool_lock, _job._task_pools_lock:
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
