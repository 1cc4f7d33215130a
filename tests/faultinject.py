"""Fault injection for fastkl jobs, shared by tests/test_faults.py and scripts/fault_trials.py.

As a program: run the `fastkl` command line with a fault at the N-th call of
a file-system operation, in this process::

    python tests/faultinject.py kill-after:replace:3 -- run SRC DEST --scheduler sync -q
    python tests/faultinject.py fail:write_batch:2:28 -- run SRC DEST -q    # ENOSPC

Operations: replace (os.replace), rename (os.rename), rmtree (shutil.rmtree),
write_batch (pyarrow.parquet.ParquetWriter.write_batch), mkdir (Path.mkdir),
fsync (os.fsync: the finished parts' state log, fastkl.io.state_log).
Actions: kill-before / kill-after (SIGKILL this process just before / after
the call: nothing of Python's cleanup runs, as with `kill -9` or a lost
machine) and fail (raise OSError with that errno instead of the call: a full
disk, a read-only file system).

As a library: `KillTask`, a Dask worker plugin that SIGKILLs the worker
process running a chosen task (once, or on every attempt).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    """Install one fault, e.g. "kill-after:replace:3" or "fail:write_batch:2:28"."""
    import shutil
    from pathlib import Path

    import pyarrow.parquet as pq

    parts = spec.split(":")
    action, op, nth = parts[0], parts[1], int(parts[2])
    err = int(parts[3]) if len(parts) > 3 else errno.ENOSPC
    if action not in ("kill-before", "kill-after", "fail"):
        raise SystemExit(f"unknown action {action!r}")
    targets = {
        "replace": (os, "replace"),
        "rename": (os, "rename"),
        "rmtree": (shutil, "rmtree"),
        "write_batch": (pq.ParquetWriter, "write_batch"),
        "mkdir": (Path, "mkdir"),
        "fsync": (os, "fsync"),
    }
    owner, name = targets[op]
    real = getattr(owner, name)
    lock = threading.Lock()
    count = [0]

    def wrapped(*args, **kwargs):
        with lock:
            count[0] += 1
            hit = count[0] == nth
        if hit and action == "kill-before":
            _die()
        if hit and action == "fail":
            raise OSError(err, os.strerror(err))
        out = real(*args, **kwargs)
        if hit and action == "kill-after":
            _die()
        return out

    setattr(owner, name, wrapped)


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit(__doc__)
    i = argv.index("--")
    for spec in argv[:i]:
        install(spec)
    from fastkl.cli import main as cli

    cli(argv[i + 1 :], prog_name="fastkl")


# --------------------------------------------------------------------------
# Dask workers


def _kill_plugin_base():
    from distributed.diagnostics.plugin import WorkerPlugin

    return WorkerPlugin


class KillTask(_kill_plugin_base()):
    """Worker plugin: SIGKILL the worker process when it starts the task whose file
    name ends with `file_suffix` and whose index is `task_index`.

    always=False: only the first attempt (a marker file under `marker_dir`
    records it, across worker processes); always=True: every attempt, so Dask
    gives up on the task after `allowed-failures` deaths. The plugin stays
    registered on the scheduler, so restarted workers get it too.
    """

    name = "fastkl-test-kill-task"

    def __init__(self, file_suffix: str, task_index: int, marker_dir: str, always: bool = False):
        self.file_suffix = file_suffix
        self.task_index = task_index
        self.marker_dir = marker_dir
        self.always = always
        self._real = None

    def setup(self, worker=None) -> None:
        import fastkl.jobs.run as job

        real = job.run_task
        if getattr(real, "_fault_wrapped", False):
            real = real._fault_real
        self._real = real
        plugin = self

        def run_task(task, *args, **kwargs):
            if task.file.path.endswith(plugin.file_suffix) and task.index == plugin.task_index:
                if plugin.always or plugin._first_time():
                    _die()
            return real(task, *args, **kwargs)

        run_task._fault_wrapped = True
        run_task._fault_real = real
        job.run_task = run_task

    def _first_time(self) -> bool:
        try:
            fd = os.open(os.path.join(self.marker_dir, f"killed-{self.task_index}"), os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def teardown(self, worker=None) -> None:
        import fastkl.jobs.run as job

        if self._real is not None:
            job.run_task = self._real


if __name__ == "__main__":
    main(sys.argv[1:])
