"""fastkl's tuning constants, in one place: sizes, buffers, timeouts, memory shares, and the core count.

They were spread over the engine, the job layer, input planning and the
memory caps; a newcomer tuning fastkl for a machine looks here first. The
modules that use a value import it by name, so each module still has its
own global (tests patch those: `fastkl.jobs.run.NO_WORKER_TIMEOUT`, ...).

None of these changes a measure's value or the summary. DEFAULT_TASK_BYTES
changes how DEST is cut into parts (tasks are defined by the input and this
bound, never by the number of workers), so it is part of a job's identity
for --resume.

Left beside the code they belong to, on purpose: bounds that an exactness
proof or a check depends on (`summary.stats._CHUNK` / `_FLUSH`,
`io.filemeta._MAX_HEADER`, `io.footer_checks._INTERPRET_BYTES`) and
the short polling intervals inside the job loop.
"""

from __future__ import annotations

import os

# --- planning and reading (fastkl.io.sources, fastkl.jobs.run) -------------

# A task covers at most this many bytes of decoded input columns (the p and q
# values the kernel holds); it reads and computes in batches of at most
# DEFAULT_BATCH_BYTES (or task_rows rows), so a worker holds about one batch
# of each column, not a whole task.
DEFAULT_TASK_BYTES = 128 << 20
DEFAULT_BATCH_BYTES = 32 << 20

# Small files are grouped: consecutive files (or a file's last slice and the
# files after it) whose tasks are smaller than DEFAULT_TASK_BYTES share one
# task and one part, of at most GROUP_FILES files, once a job has at least
# GROUP_MIN_TASKS tasks (below that a task per file costs milliseconds and
# keeps one part per input file). GROUP_FILES bounds a task's retry cost and
# keeps a few tasks per core at 10^4 files; both are part of a job's identity.
GROUP_MIN_TASKS = 256
GROUP_FILES = 256

# Up to this many inputs and parts the manifest lists them inline (one JSON
# object each); beyond, in Parquet tables beside it (fastkl.io.manifest_tables).
MANIFEST_INLINE = 10_000

# Finished parts' states (what --resume reuses) are appended by the client to
# a log in batches (fastkl.io.state_log): written and fsync'd once at least
# STATE_FLUSH_S seconds have passed since the last batch, or STATE_BATCH
# records wait, and when the job stops. A kill loses at most that much
# finished work (redone by --resume), not one file per part at 10^6 parts.
# FASTKL_STATE_FLUSH_S=0: every state at once (the tests that kill a job at a
# chosen part use it).
STATE_FLUSH_S = float(os.environ.get("FASTKL_STATE_FLUSH_S", "1.0"))
STATE_BATCH = 4096

# The threads scheduler keeps at most this many tasks per worker thread
# submitted at once (and so at most as many results waiting to be merged in
# task order): planning, scheduling and merging stay linear in the tasks.
WINDOW_PER_THREAD = 8

# On a Dask cluster, tasks reading less than BATCH_BYTES in all run together, up to
# BATCH_TASKS of them, as one Dask task: Dask costs 1-3 ms per task (scheduler, worker,
# transfers), more than a task of a few KB takes.
BATCH_BYTES = 1 << 20
BATCH_TASKS = 16

# Parquet is read through a buffered stream of this many bytes.
READ_BUFFER = 1 << 20

# Batches read ahead of the kernel by a task that owns several cores.
PREFETCH = 1

# --- the kernel's thread pool (fastkl._engine) -----------------------------

# Below this many elements a call runs on the calling thread: handing work to
# the pool costs more than it saves.
MIN_ELEMENTS_PER_BLOCK = 1 << 16

# --- timeouts (seconds, fastkl.jobs.run) -----------------------------------

# A job whose cluster has had no worker at all for this long fails: the
# nannies may stop restarting workers that keep dying, and tasks would
# otherwise wait forever.
NO_WORKER_TIMEOUT = 120.0

# A job given a cluster with no worker yet waits this long for the first one.
FIRST_WORKER_TIMEOUT = 60.0

# --- memory caps (fastkl.jobs.limits) --------------------------------------

# With FASTKL_MEMORY_LIMIT unset, a job caps itself at this share of
# MemAvailable, but never below MEMORY_FLOOR.
MEMORY_SHARE = 0.8
MEMORY_FLOOR = 4 << 30

# What one fastkl process (the CLI, a local worker) needs under the cap to
# start and to run a task of the default size: ~1.3 GiB of reserved address
# space after imports (measured VmData of a worker: 1.25 GiB, of a client with
# its local cluster: 1.4 GiB), the rest for the task's batches.
PROCESS_NEED = 2 << 30


def cores() -> int:
    """CPUs this process may run on: its affinity mask where there is one
    (taskset, cpusets), else the machine's count. The kernel's pool, the
    job's workers and each task's share of threads are all sized on it."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def prefer_wide_vectors() -> None:
    """On CPUs with AVX-512, let LLVM vectorise the kernels' loops with 512-bit registers.

    LLVM's tuning for Intel AVX-512 server cores prefers 256-bit vectors
    (older cores lowered their clock for 512-bit code); fastkl's term loops
    are compute-bound, and measured on a Sapphire Rapids core kl at K=131,072
    runs 1.5x faster with 512-bit vectors. Numba has one code generator per
    process, so this applies to the process's other Numba code too; it is done
    only before Numba has compiled anything, and never when NUMBA_CPU_FEATURES
    is set or FASTKL_VECTOR_WIDTH=256 (the opt-out). CPUs without AVX-512 are
    left as they are.
    """
    if os.environ.get("FASTKL_VECTOR_WIDTH") == "256" or os.environ.get("NUMBA_CPU_FEATURES"):
        return
    from numba.core import config, registry

    if config.CPU_FEATURES is not None or "_toplevel_target_context" in vars(registry.cpu_target):
        return  # Numba's code generator exists already: its features are fixed
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    if features.get("avx512f") and features.get("avx512vl"):
        config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"
