"""Memory limits of `fastkl run` (hostile input must never exhaust the machine).

Memory of a job is bounded by workers x task size when the input's
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
2 GiB leaves little room for data, and below it a process may not even
start (an import fails, or OpenBLAS spins forever on a failed allocation):
caps below MIN_CAP are refused with one line. The Python API sets no limit
(the caller's process is the caller's).

The cap is a total for the job: the local cluster that `--scheduler
processes` starts shares it between the client (which keeps PROCESS_NEED)
and its worker processes (the rest, split equally, at least PROCESS_NEED
each): fewer workers when more would not fit, and a refusal naming the cap
when not even one fits or `--workers` asks for more than fit. A cluster
given by address runs under its own workers' limits.
"""

from __future__ import annotations

import contextlib
import os
import re

from .._config import MEMORY_FLOOR, MEMORY_SHARE, PROCESS_NEED
from ..errors import OptionError

ENV = "FASTKL_MEMORY_LIMIT"
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40,
          "tib": 1 << 40}
MIN_CAP = PROCESS_NEED


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
        return None if avail is None else max(MEMORY_FLOOR, int(avail * MEMORY_SHARE))
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|[a-z]*)", raw)
    if m is None or (m.group(2) != "%" and m.group(2) not in _UNITS):
        raise OptionError(f"{ENV}={raw!r}: expected a size like 6G or 512M, a share like 50%, or none")
    value = float(m.group(1))
    if m.group(2) == "%":
        if avail is None:
            return None
        limit = int(avail * value / 100)
    else:
        limit = int(value * _UNITS[m.group(2)])
    if limit < MIN_CAP:
        written = (os.environ.get(ENV, "") if setting is None else setting).strip()
        raise OptionError(
            f"{ENV}={written} ({_gib(limit)}) is too small for fastkl to start: a fastkl process needs at "
            f"least {_gib(MIN_CAP)} of address space; set {ENV}={MIN_CAP >> 30}G or more, or none"
        )
    return limit


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


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


def _set_soft(limit: int, *, may_raise: bool) -> None:
    """Set RLIMIT_DATA's soft limit to `limit`, at most the hard limit; unless
    `may_raise`, only ever lower it."""
    try:
        import resource
    except ImportError:  # pragma: no cover
        return
    soft, hard = _get()
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if may_raise or soft == resource.RLIM_INFINITY or soft > limit:
        try:
            resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
        except (ValueError, OSError):  # pragma: no cover
            pass


def lower_limit(limit: int) -> None:
    """Lower this process's RLIMIT_DATA soft limit to `limit` (never raise it)."""
    _set_soft(limit, may_raise=False)


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


def local_workers(wanted: int, explicit: bool = False) -> tuple[int, int | None]:
    """(workers, cap of each) for a local cluster started under this process's cap.

    The cap is a total: this process (the client, with the scheduler and the
    nannies) keeps PROCESS_NEED, the workers share the rest equally and each
    needs PROCESS_NEED too. More workers than fit: fewer, unless the caller
    asked for that many (`explicit`); none fits: OptionError naming the cap.
    """
    total = current_limit()
    if total is None:
        return wanted, None
    fits = (total - PROCESS_NEED) // PROCESS_NEED
    if fits >= wanted or (fits >= 1 and not explicit):
        n = max(1, min(wanted, fits))
        return n, (total - PROCESS_NEED) // n
    need = ((wanted if explicit else 1) + 1) * PROCESS_NEED
    setting = os.environ.get(ENV, "").strip()
    cap = f"{ENV}={setting}" if setting else f"the default cap ({ENV} unset)"
    allows = "no worker process" if fits < 1 else f"{fits} worker process{'es' if fits > 1 else ''}"
    hint = "use --scheduler threads" if fits < 1 else f"pass --workers {fits}"
    raise OptionError(
        f"{cap} ({_gib(total)}, a total for the job) allows {allows} for "
        f"--scheduler processes (the client and each worker need {_gib(PROCESS_NEED)}); "
        f"{hint}, or set {ENV}={-(-need // (1 << 30))}G or more"
    )


def set_limit(limit: int) -> None:
    """Set this process's RLIMIT_DATA soft limit to `limit` (at most the hard limit).

    Unlike `lower_limit`, may raise it: a worker process restarted by its
    nanny inherits the client's (smaller) share and takes its own here.
    """
    _set_soft(limit, may_raise=True)


class ClientShare:
    """The client's own share of a total cap while its local cluster runs; `close` gives back the rest."""

    def __init__(self) -> None:
        self.before = current_limit()
        if self.before is not None:
            lower_limit(PROCESS_NEED)

    def close(self) -> None:
        if self.before is not None:
            set_limit(self.before)


def _set_worker_limit(limit: int) -> None:
    set_limit(limit)


def __getattr__(name: str):
    # The worker plugin class is built on first use, so that importing this
    # module (the CLI does) does not import distributed. Pickled by reference
    # as fastkl.jobs.limits.LocalWorker, it is rebuilt the same way on the workers.
    if name == "LocalWorker":
        from distributed.diagnostics.plugin import WorkerPlugin

        class LocalWorker(WorkerPlugin):
            """Set-up of each worker process of fastkl's local cluster when it starts (restarted ones too):
            its share of the memory cap, and SIGINT ignored (a Ctrl-C reaches the whole process group:
            the client stops the job and its workers, which print nothing)."""

            name = "fastkl-local-worker"

            def __init__(self, limit: int | None):
                self.limit = None if limit is None else int(limit)

            def setup(self, worker=None) -> None:
                import signal
                import threading

                if self.limit is not None:
                    _set_worker_limit(self.limit)
                if threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGINT, signal.SIG_IGN)

        LocalWorker.__module__ = __name__
        LocalWorker.__qualname__ = "LocalWorker"
        globals()["LocalWorker"] = LocalWorker
        return LocalWorker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
