"""Memory limits of `fastkl run` (hostile input must never exhaust the machine).

Memory of a job is bounded by workers x task size (SPEC §6) when the input's
metadata is honest. Input can lie: a Parquet column chunk of a few kilobytes
can declare, through dictionary and run-length encoding, a row of 10^9 equal
floats; a compressed page or IPC buffer can inflate to gigabytes. No footer
tells that before the reader materialises it. So `fastkl run` caps its own
data segment (RLIMIT_DATA: heap and anonymous mappings, not memory-mapped
input files): an allocation beyond the cap fails, pyarrow or NumPy raises
MemoryError, and the job stops with one line naming the file and row group
(exit 1, DEST not written) instead of feeding the kernel's out-of-memory
killer.

FASTKL_MEMORY_LIMIT sets the cap: a size ("6G", "512M", bytes), a share of
the memory available when the job starts ("50%"), or "none". Default: 80% of
the available memory, at least 4 GiB. The cap counts address space that the
allocators reserve, not only what is touched: on Linux a process that has
imported fastkl's kernels already holds ~1.3 GiB of it (pyarrow's mimalloc
reserves a 1 GiB arena up front) while its RSS is ~0.25 GiB, so a cap below
2 GiB leaves little room for data. The Python API sets no limit (the
caller's process is the caller's); the local cluster that `--scheduler
processes` starts splits the cap between its worker processes.
"""

from __future__ import annotations

import contextlib
import os
import re

from .errors import OptionError

ENV = "FASTKL_MEMORY_LIMIT"
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40,
          "tib": 1 << 40}
DEFAULT_SHARE = 0.8
DEFAULT_FLOOR = 4 << 30
WORKER_FLOOR = 3 << 30


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_limit(setting: str | None = None) -> int | None:
    """The cap in bytes for a setting (default: $FASTKL_MEMORY_LIMIT); None for no cap."""
    raw = (os.environ.get(ENV, "") if setting is None else setting).strip().lower()
    if raw in ("none", "off", "unlimited", "0"):
        return None
    avail = mem_available()
    if not raw:
        return None if avail is None else max(DEFAULT_FLOOR, int(avail * DEFAULT_SHARE))
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|[a-z]*)", raw)
    if m is None or (m.group(2) != "%" and m.group(2) not in _UNITS):
        raise OptionError(f"{ENV}={raw!r}: expected a size like 6G or 512M, a share like 50%, or none")
    value = float(m.group(1))
    if m.group(2) == "%":
        return None if avail is None else max(1 << 28, int(avail * value / 100))
    return max(1 << 28, int(value * _UNITS[m.group(2)]))


def _get():
    import resource

    return resource.getrlimit(resource.RLIMIT_DATA)


def current_limit() -> int | None:
    """This process's RLIMIT_DATA soft limit, None if unlimited or unknown."""
    try:
        import resource

        soft = _get()[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


def lower_limit(limit: int) -> None:
    """Lower this process's RLIMIT_DATA soft limit to `limit` (never raise it)."""
    try:
        import resource
    except ImportError:  # pragma: no cover
        return
    soft, hard = _get()
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft == resource.RLIM_INFINITY or soft > limit:
        try:
            resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
        except (ValueError, OSError):  # pragma: no cover
            pass


@contextlib.contextmanager
def capped():
    """Apply `memory_limit()` to this process for the duration (the `fastkl run` command).

    The previous limit is restored afterwards, so that calling the command
    in-process (tests, a notebook) leaves the caller's process as it was.
    """
    limit = memory_limit()
    try:
        import resource

        before = resource.getrlimit(resource.RLIMIT_DATA)
    except ImportError:  # pragma: no cover
        yield None
        return
    if limit is not None:
        lower_limit(limit)
    try:
        yield current_limit()
    finally:
        try:
            resource.setrlimit(resource.RLIMIT_DATA, before)
        except (ValueError, OSError):  # pragma: no cover
            pass


def note() -> str:
    """For out-of-memory messages: the cap in force, if any."""
    soft = current_limit()
    return "" if soft is None else f"; this process may use {soft / 2**30:.1f} GiB, see {ENV}"


def worker_limit(n_workers: int) -> int | None:
    """This process's cap shared by n local worker processes (at least 3 GiB each)."""
    soft = current_limit()
    return None if soft is None else max(WORKER_FLOOR, soft // max(1, n_workers))


def _set_worker_limit(limit: int) -> None:
    lower_limit(limit)


def __getattr__(name: str):
    # The worker plugin class is built on first use, so that importing this
    # module (the CLI does) does not import distributed. Pickled by reference
    # as fastkl._limits.DataLimit, it is rebuilt the same way on the workers.
    if name == "DataLimit":
        from distributed.diagnostics.plugin import WorkerPlugin

        class DataLimit(WorkerPlugin):
            """Caps each worker's RLIMIT_DATA when it starts (restarted workers too)."""

            name = "fastkl-data-limit"

            def __init__(self, limit: int):
                self.limit = int(limit)

            def setup(self, worker=None) -> None:
                _set_worker_limit(self.limit)

        DataLimit.__module__ = __name__
        DataLimit.__qualname__ = "DataLimit"
        globals()["DataLimit"] = DataLimit
        return DataLimit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
