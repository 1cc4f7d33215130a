"""Throughput measurement: fastkl against the machine's limits and against peers.

One module feeds `fastkl bench`, the pytest-benchmark suite (benchmarks/) and
scripts/bench_jobs.py, so the three measure the same things the same way:

* data: dense float32/float64 softmax rows (no zeros, so that the peers'
  plain expressions are defined everywhere), their log-probabilities and
  logits; a Parquet file of such rows (list<float32>, snappy, row groups);
* the streaming limit: Numba kernels that read the same two buffers row by
  row and only sum them into one float64 per row, split over the same
  threads as fastkl. `stream_vec` is compiled with fastmath `reassoc` so LLVM
  vectorises the reduction (the real limit); `stream_scalar` without it (a
  plain scalar loop, for reference);
* the I/O floor of a job: pyarrow reading the p and q columns of the file
  (`pq.read_table`, all threads) and writing one float64 column of as many
  rows (random values, so it is as large as a real result);
* peers (imported lazily, the `bench` extra): scipy.special.rel_entr, a
  NumPy expression, a Polars list expression and DuckDB SQL computing
  sum(p * log(p / q)) per row; for jobs, DuckDB `COPY (SELECT ...) TO` and
  Polars `scan_parquet(...).select(...).sink_parquet(...)`; for logits at an
  LLM vocabulary size, PyTorch on the CPU (`kl_div` of `log_softmax`, float32
  and float64) where it is installed, timed and checked against an
  extended-precision reference;
* the streamed read: the row groups split over the cores, each read the way
  a fastkl task reads them (buffered, no pre-buffering, batches inside row
  groups) and dropped; what separates a job from it is the kernel and the
  engine's own work;
* timing: every case is warmed up, then the cases run in turn (the order
  rotates every round). Times are medians over rounds; a ratio between two
  cases is the median over rounds of the ratio within each round (`ratio`),
  so a load that other processes put on the machine for a while weighs on
  both sides. Each call also records how much of the machine other processes
  used meanwhile (`Timing.load`). Targets are such ratios, never absolute
  times.

Nothing here is imported by the rest of fastkl.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numba import njit

from .._engine import _run_ranges

# --------------------------------------------------------------------------
# Data


def softmax_rows(rows: int, k: int, dtype=np.float32, seed: int = 0, spread: float = 2.0):
    """(p, q, p_logits, q_logits): dense softmax rows (rows x k) and the logits they come from.

    Q is P's logits plus noise, renormalised: a realistic teacher/student gap.
    All probabilities are > 0 (float32 softmax of logits within a few units).
    """
    rng = np.random.default_rng(seed)
    p_logits = (rng.standard_normal((rows, k), dtype=np.float32) * np.float32(spread)).astype(dtype)
    q_logits = (p_logits + rng.standard_normal((rows, k), dtype=np.float32).astype(dtype) * dtype(0.5)).astype(dtype)
    return _softmax(p_logits), _softmax(q_logits), p_logits, q_logits


def _softmax(x: np.ndarray) -> np.ndarray:
    y = np.exp(x - x.max(axis=1, keepdims=True), dtype=np.float64)
    y /= y.sum(axis=1, keepdims=True)
    return y.astype(x.dtype)


def log_probs(p: np.ndarray) -> np.ndarray:
    return np.log(p.astype(np.float64)).astype(p.dtype)


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bits (uint16, rounded to nearest even), as
    pipelines store bfloat16 where Arrow has no such type."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _half_safe(x: np.ndarray) -> np.ndarray:
    """Rows as float32 with no entry below float16's smallest subnormal (2**-24), renormalised:
    at large K many entries would round to 0 in float16, and a 0 in q under p > 0 makes the
    row's KL +inf (the exact slow path), which would time that path instead of the decode."""
    y = np.maximum(x.astype(np.float64), 2.0 ** -24)
    return (y / y.sum(axis=1, keepdims=True)).astype(np.float32)


def half_cases(p: np.ndarray, q: np.ndarray, threads: int) -> dict[str, tuple[Callable[[], object], int]]:
    """fastkl kl on the same rows as float32, float16 and bfloat16: {case: (call, bytes of p and q)}.

    The half sides are decoded row by row inside the kernel (no float32 copy),
    so they read half the bytes; the rows' values differ by the rounding only
    (all three cases use rows without entries that float16 would flush to 0).
    """
    from .. import _api

    p32, q32 = _half_safe(p), _half_safe(q)
    p16, q16 = p32.astype(np.float16), q32.astype(np.float16)
    pb, qb = bfloat16_bits(p32), bfloat16_bits(q32)
    tol = 2e-2  # the rounding of bfloat16 moves row sums by up to 2**-8
    return {
        "fastkl kl, float32 probs": (lambda: _api.kl(p32, q32, threads=threads, sum_tol=tol), p32.nbytes * 2),
        "fastkl kl, float16 probs": (lambda: _api.kl(p16, q16, threads=threads, sum_tol=tol), p16.nbytes * 2),
        "fastkl kl, bfloat16 probs (uint16)": (
            lambda: _api.kl(pb, qb, dtype="bfloat16", threads=threads, sum_tol=tol), pb.nbytes * 2),
    }


def list_column(x: np.ndarray) -> pa.Array:
    """A 2-D array as an Arrow list<float> column (zero copy of the values)."""
    n, k = x.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1)))


def write_parquet(path: str, rows: int = 200_000, k: int = 256, row_groups: int = 8, seed: int = 0) -> str:
    """A Parquet file with `id`, `p`, `q` (list<float32>, snappy, `row_groups` row groups).

    Reused if it exists with the same shape; written to a temporary name and
    renamed, so an interrupted run never leaves a half file.
    """
    if os.path.exists(path):
        try:
            md = pq.ParquetFile(path).metadata
            if md.num_rows == rows and md.num_row_groups == row_groups:
                return path
        except Exception:
            pass
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    schema = pa.schema([("id", pa.int64()), ("p", pa.list_(pa.float32())), ("q", pa.list_(pa.float32()))])
    per = -(-rows // row_groups)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with pq.ParquetWriter(tmp, schema, compression="snappy") as w:
            for i, start in enumerate(range(0, rows, per)):
                n = min(per, rows - start)
                p, q, _, _ = softmax_rows(n, k, np.float32, seed=seed * 1000 + i)
                t = pa.table({"id": np.arange(start, start + n), "p": list_column(p), "q": list_column(q)},
                             schema=schema)
                w.write_table(t, row_group_size=n)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# --------------------------------------------------------------------------
# The streaming limit


@njit(nogil=True, cache=True, error_model="numpy", fastmath={"nsz", "contract", "reassoc"})
def _stream_vec(offsets, p, q, out, lo, hi):  # pragma: no cover - compiled
    for r in range(lo, hi):
        a, b = offsets[r], offsets[r + 1]
        pr = p[a:b]
        qr = q[a:b]
        acc = 0.0
        for j in range(b - a):
            acc += np.float64(pr[j]) + np.float64(qr[j])
        out[r] = acc


@njit(nogil=True, cache=True, error_model="numpy")
def _stream_scalar(offsets, p, q, out, lo, hi):  # pragma: no cover - compiled
    for r in range(lo, hi):
        a, b = offsets[r], offsets[r + 1]
        pr = p[a:b]
        qr = q[a:b]
        acc = 0.0
        for j in range(b - a):
            acc += np.float64(pr[j]) + np.float64(qr[j])
        out[r] = acc


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="fastkl-bench")
    return _pools[threads]


def default_threads() -> int:
    from .._config import cores

    return cores()


def flat(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a C-contiguous 2-D array, as fastkl's adapter builds them."""
    n, k = x.shape
    return np.arange(n + 1, dtype=np.int64) * k, np.ascontiguousarray(x).reshape(-1)


def stream(p: np.ndarray, q: np.ndarray, threads: int | None = None, vectorised: bool = True) -> np.ndarray:
    """Sum each row of p and q into one float64: only reads the two buffers.

    Rows are split into 4 blocks per thread and run as `fastkl._engine` runs them.
    """
    fn = _stream_vec if vectorised else _stream_scalar
    offsets, pv = flat(p)
    _, qv = flat(q)
    n = p.shape[0]
    out = np.empty(n)
    threads = threads or default_threads()
    if threads == 1:
        fn(offsets, pv, qv, out, 0, n)
        return out
    cuts = np.linspace(0, n, threads * 4 + 1).astype(np.int64)
    _run_ranges(fn, (offsets, pv, qv, out), [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a], threads)
    return out


def warm_stream(dtype=np.float32) -> None:
    """Compile (or load from the JIT cache) both streaming kernels for `dtype`."""
    x = np.full((2, 4), 0.25, dtype=dtype)
    for v in (True, False):
        stream(x, x, threads=1, vectorised=v)


# --------------------------------------------------------------------------
# In-memory peers: per-row sum(p * log(p / q)) over 2-D arrays / list columns


def scipy_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    from scipy.special import rel_entr

    return rel_entr(p, q).sum(axis=1)


def numpy_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * np.log(p / q)).sum(axis=1)


def polars_frame(p: np.ndarray, q: np.ndarray):
    import polars as pl

    return pl.from_arrow(pa.table({"p": list_column(p), "q": list_column(q)}))


def polars_kl_expr():
    import polars as pl

    ratio = (pl.col("p") / pl.col("q")).list.eval(pl.element().log())
    return (pl.col("p") * ratio).list.sum().alias("kl")


def polars_kl(df) -> np.ndarray:
    return df.select(polars_kl_expr()).to_series().to_numpy()


DUCKDB_KL = "list_sum(list_transform(p, lambda x, i: x * ln(x / q[i])))"
DUCKDB_KL_ARROW = "list_sum(list_transform(p, (x, i) -> x * ln(x / q[i])))"  # DuckDB < 1.3


def duckdb_kl_expr(con) -> str:
    """The KL expression in the lambda syntax this DuckDB understands."""
    try:
        con.execute("SELECT list_transform([1], lambda x, i: x + i)").fetchall()
        return DUCKDB_KL
    except Exception:
        return DUCKDB_KL_ARROW


def duckdb_kl(con, table: pa.Table) -> np.ndarray:
    con.register("fastkl_bench_t", table)
    try:
        sql = f"SELECT {duckdb_kl_expr(con)} AS kl FROM fastkl_bench_t"
        return np.asarray(con.execute(sql).fetchnumpy()["kl"])
    finally:
        con.unregister("fastkl_bench_t")


# Logits at LLM vocabulary sizes: PyTorch on the CPU, what an LLM user would pick


def torch_kl_logits(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) per row the PyTorch way (tensors of either float type):
    `kl_div(log_softmax(q), log_softmax(p), log_target=True)` summed over the vocabulary."""
    import torch

    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return torch.nn.functional.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)


def exact_kl_logits(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """The reference: KL per row from the stored logits in NumPy's longdouble (64-bit mantissa
    on x86, 113 on AArch64; NumPy's pairwise sums)."""
    a, b = p_logits.astype(np.longdouble), q_logits.astype(np.longdouble)
    a = a - a.max(axis=1, keepdims=True)
    b = b - b.max(axis=1, keepdims=True)
    la = a - np.log(np.exp(a).sum(axis=1, keepdims=True))
    lb = b - np.log(np.exp(b).sum(axis=1, keepdims=True))
    return (np.exp(la) * (la - lb)).sum(axis=1).astype(np.float64)


def relative_errors(got, exact: np.ndarray) -> tuple[float, float]:
    """(median, max) over rows of |got - exact| / exact."""
    err = np.abs(np.asarray(got, dtype=np.float64) - exact) / exact
    return float(np.median(err)), float(err.max())


def logits_report(rows: int = 1_000, k: int = 32_000, threads: int | None = None, rounds: int = 5, log=None,
                  max_load: float | None = None) -> tuple[list[str], dict]:
    """fastkl kl on float32 logits against PyTorch (float32 and float64, the same threads) at an
    LLM vocabulary size, for a teacher/student gap (noise 0.5) and a quantisation-sized one (0.01):
    time and relative error against `exact_kl_logits`."""
    import torch

    from .. import _api

    threads = threads or default_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    lines = [f"logits: {rows:,} rows x {k:,} float32 (p and q: {2 * rows * k * 4 / 1e6:,.0f} MB), {threads} "
             f"thread{'s' if threads > 1 else ''}, torch {torch.__version__}, median of {rounds}"]
    info: dict = {}
    try:
        for gap in (0.5, 0.01):
            rng = np.random.default_rng(3)
            xp = rng.standard_normal((rows, k), dtype=np.float32) * np.float32(2.0)
            xq = xp + rng.standard_normal((rows, k), dtype=np.float32) * np.float32(gap)
            exact = exact_kl_logits(xp, xq)
            tp, tq = torch.from_numpy(xp), torch.from_numpy(xq)
            tp64, tq64 = tp.double(), tq.double()
            cases = {
                "fastkl kl, kind='logits'": lambda: _api.kl(xp, xq, kind="logits", threads=threads),
                "torch float32 kl_div(log_softmax)": lambda: torch_kl_logits(tp, tq),
                "torch float64 kl_div(log_softmax)": lambda: torch_kl_logits(tp64, tq64),
            }
            results = {n: fn() for n, fn in cases.items()}
            t = alternate(cases, rounds=rounds, log=log, max_load=max_load)
            base = "fastkl kl, kind='logits'"
            lines.append(f"  gap {gap} (KL median {np.median(exact):.3g}):")
            lines.append(f"    {'case':<36} {'median':>9} {'x fastkl':>9} {'rel. err. median':>17} {'max':>9}")
            for n in cases:
                med, worst = relative_errors(results[n], exact)
                x = ratio(t[n], t[base])
                lines.append(f"    {n:<36} {t[n].median:8.3f}s {x:9.2f} {med:17.1e} {worst:9.1e}")
                info[f"gap {gap}: {n}"] = {"median_s": t[n].median, "vs_fastkl": x, "rel_err_median": med,
                                           "rel_err_max": worst}
    finally:
        torch.set_num_threads(before)
    lines.append("  (x fastkl: time over fastkl's, median over rounds of the ratio within a round; errors against "
                 "the logits' KL in extended precision)")
    return lines, info


# --------------------------------------------------------------------------
# Jobs: the I/O floor, fastkl.run and the peers on one Parquet file


def io_floor(src: str, dest_file: str, result: np.ndarray, columns=("p", "q")) -> None:
    """Read the columns the job reads, write one float64 column as long as the result."""
    t = pq.read_table(src, columns=list(columns))
    if t.num_rows != len(result):
        raise RuntimeError(f"{src}: {t.num_rows} rows, expected {len(result)}")
    del t
    pq.write_table(pa.table({"kl": result}), dest_file)


def io_floor_streamed(src: str, dest_file: str, result: np.ndarray, threads: int | None = None,
                      columns=("p", "q")) -> None:
    """The tightest read we know: the row groups split over `threads` threads, each
    streaming its share the way a fastkl task reads (buffered, no pre-buffering,
    batches within row groups) and dropping it; then the result column is written.
    Only the kernel and the engine's own work separate a fastkl job from this.
    """
    from .._config import READ_BUFFER
    from ..jobs.run import _aligned_batch_rows

    threads = threads or default_threads()
    md = pq.ParquetFile(src).metadata
    groups = list(range(md.num_row_groups))
    rows = [md.row_group(i).num_rows for i in groups]
    width = sum(md.row_group(0).column(j).total_uncompressed_size for j in range(md.num_columns)) / max(rows[0], 1) if rows else 1
    batch = _aligned_batch_rows(max(1, int((32 << 20) // max(width, 1))), [type("U", (), {"rows": r})() for r in rows])

    def read(share: list[int]) -> int:
        n = 0
        if share:
            pf = pq.ParquetFile(src, buffer_size=READ_BUFFER, pre_buffer=False)
            for b in pf.iter_batches(batch_size=batch, row_groups=share, columns=list(columns), use_threads=False):
                n += b.num_rows
        return n

    shares = [list(a) for a in np.array_split(groups, min(threads, len(groups)) or 1)]
    n = sum(_pool(threads).map(read, shares)) if threads > 1 else read(groups)
    if n != len(result):
        raise RuntimeError(f"{src}: {n} rows, expected {len(result)}")
    pq.write_table(pa.table({"kl": result}), dest_file)


def fastkl_job(src: str, dest: str, **kw) -> None:
    from ..jobs.run import run

    run(src, dest, measures=("kl",), quiet=True, **kw)


def duckdb_job(con, src: str, dest_file: str) -> None:
    s = src.replace("'", "''")
    d = dest_file.replace("'", "''")
    con.execute(f"COPY (SELECT {duckdb_kl_expr(con)} AS kl FROM read_parquet('{s}')) TO '{d}' (FORMAT parquet)")


def polars_job(src: str, dest_file: str) -> None:
    import polars as pl

    pl.scan_parquet(src).select(polars_kl_expr()).sink_parquet(dest_file)


def read_result(path: str) -> np.ndarray:
    return pq.read_table(path, columns=["kl"]).column("kl").to_numpy()


# --------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    name: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # this process's CPU seconds per call
    others: list[float] = field(default_factory=list)  # share of the machine other processes used

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else math.nan

    @property
    def load(self) -> float:
        """Share of the machine's CPU other processes used while this case ran (NaN
        if unknown or if the case ran too briefly for the kernel's 10 ms ticks)."""
        total = sum(self.seconds)
        if len(self.others) != len(self.seconds) or total < 0.5:
            return math.nan
        return sum(o * s for o, s in zip(self.others, self.seconds)) / total

    def spread(self) -> str:
        if len(self.seconds) < 2:
            return ""
        return f"{min(self.seconds):.3f}-{max(self.seconds):.3f}"


def ratio(a: Timing, b: Timing) -> float:
    """a's time over b's, as the median over rounds of the ratio within each round.

    The cases of one round run back to back, so a load that other processes
    put on the machine for a few seconds weighs on both sides of a ratio;
    the median over rounds then drops the rounds where it did not.
    """
    pairs = [x / y for x, y in zip(a.seconds, b.seconds) if y > 0]
    return statistics.median(pairs) if pairs else math.nan


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        ticks = [int(x) for x in fields]
        busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # minus idle, iowait
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def others_load(window: float = 0.5) -> float | None:
    """Share of the machine's CPU that other processes use right now (over `window` s)."""
    b0, c0, t0 = _busy_seconds(), time.process_time(), time.perf_counter()
    time.sleep(window)
    b1, c1, t1 = _busy_seconds(), time.process_time(), time.perf_counter()
    if b0 is None or b1 is None:
        return None
    return max(0.0, (b1 - b0) - (c1 - c0)) / ((t1 - t0) * (os.cpu_count() or 1))


def wait_quiet(max_load: float, max_wait: float = 120.0) -> bool:
    """Wait until other processes use less than `max_load` of the machine; False on timeout."""
    deadline = time.monotonic() + max_wait
    while True:
        load = others_load()
        if load is None or load < max_load:
            return True
        if time.monotonic() > deadline:
            return False


def alternate(cases: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1,
              before: Callable[[str], None] | None = None, log: Callable[[str], None] | None = None,
              max_load: float | None = None, max_wait: float = 120.0) -> dict[str, Timing]:
    """Time every case `rounds` times, taking turns; the order rotates every round.

    `before(name)` runs untimed before each call (e.g. remove the previous
    output). A garbage collection runs before each call, outside the timing.
    Each call also records the share of the machine's CPU that other
    processes used meanwhile (Linux). With `max_load` (a shared machine), a
    round starts only once other processes use less than that share (waiting
    up to `max_wait` s), and a round during which they used more is run
    again (at most `rounds` extra times).
    """
    names = list(cases)
    out = {n: Timing(n) for n in names}
    ncpu = os.cpu_count() or 1
    for _ in range(warmup):
        for n in names:
            if before:
                before(n)
            cases[n]()
    r = redone = 0
    while r < rounds:
        if max_load is not None:
            wait_quiet(max_load, max_wait)
        order = names[r % len(names):] + names[: r % len(names)]
        got: dict[str, tuple[float, float, float | None]] = {}
        for n in order:
            if before:
                before(n)
            gc.collect()
            b0 = _busy_seconds()
            c0 = time.process_time()
            t0 = time.perf_counter()
            cases[n]()
            t1 = time.perf_counter()
            c1 = time.process_time()
            b1 = _busy_seconds()
            others = None
            if b0 is not None and b1 is not None and t1 > t0:
                others = max(0.0, (b1 - b0) - (c1 - c0)) / ((t1 - t0) * ncpu)
            got[n] = (t1 - t0, c1 - c0, others)
        total = sum(v[0] for v in got.values())
        load = sum(v[0] * v[2] for v in got.values() if v[2] is not None) / total if total > 0 else 0.0
        # (a round shorter than 0.5 s is not judged: the kernel counts CPU time in 10 ms ticks)
        if max_load is not None and total >= 0.5 and load > max_load and redone < rounds:
            redone += 1
            if log:
                log(f"  round {r + 1}/{rounds}: other processes used {load:.0%} of the machine, run again")
            continue
        for n, (sec, cpu, others) in got.items():
            out[n].seconds.append(sec)
            out[n].cpu.append(cpu)
            if others is not None:
                out[n].others.append(others)
        r += 1
        if log:
            log(f"  round {r}/{rounds}: " + ", ".join(f"{n} {out[n].seconds[-1]:.3f}s" for n in names))
    return out


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


# --------------------------------------------------------------------------
# Machine description


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        pass
    return f"{cpu}, {default_threads()} cores{mem}, {platform.system()} {platform.release()}"


_SIMD = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512fp16", "avx512bf16", "fma", "f16c", "neon", "sve", "sve2")


def compile_target() -> str:
    """What Numba compiles the kernels for: the LLVM CPU name (NUMBA_CPU_NAME if set, else the
    host's) and the vector features it has, which decide the kernels' vector width."""
    import llvmlite.binding as ll
    from numba import config

    name = config.CPU_NAME or ll.get_host_cpu_name()
    if config.CPU_FEATURES:
        feats = [f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")]
    else:
        feats = [f for f, on in ll.get_host_cpu_features().items() if on]
    simd = [f for f in _SIMD if f in feats]
    return f"LLVM target {name}{' (NUMBA_CPU_NAME)' if config.CPU_NAME else ''}, {' '.join(simd) or 'no SIMD extensions'}"


def versions() -> str:
    import numba

    from .. import __version__

    return f"fastkl {__version__}, numba {numba.__version__}, numpy {np.__version__}, pyarrow {pa.__version__}, Python {platform.python_version()}"


def peers_available() -> dict[str, bool]:
    """Which peers are installed (found, not imported: importing torch takes seconds)."""
    from importlib.util import find_spec

    return {mod: find_spec(mod) is not None for mod in ("scipy", "polars", "duckdb", "torch")}


# --------------------------------------------------------------------------
# Reports (`fastkl bench`)


@dataclass
class Row:
    case: str
    timing: Timing
    rows: int = 0
    nbytes: int = 0
    ref: str | None = None  # ratio against this case's median
    note: str = ""


def _fmt_table(title: str, rows: list[Row], by_name: dict[str, Row], ratio_label: str, inverse: bool) -> list[str]:
    lines = [title]
    head = f"  {'case':<44} {'median':>9} {'range':>13} {'GB/s':>7} {'Mrows/s':>8} {ratio_label:>9} {'load':>5}"
    lines.append(head)
    for r in rows:
        m = r.timing.median
        gbs = f"{r.nbytes / m / 1e9:7.2f}" if r.nbytes and m > 0 else " " * 7
        rps = f"{r.rows / m / 1e6:8.2f}" if r.rows and m > 0 else " " * 8
        rat = ""
        if r.ref and r.ref in by_name:
            x = ratio(r.timing, by_name[r.ref].timing)
            if x > 0:
                rat = f"{(1 / x if inverse else x):.2f}"
        load = f"{r.timing.load:5.0%}" if r.timing.load == r.timing.load else ""
        lines.append(f"  {r.case:<44} {m:8.3f}s {r.timing.spread():>13} {gbs} {rps} {rat:>9} {load:>5}"
                     + (f"  {r.note}" if r.note else ""))
    lines.append(f"  ({ratio_label}: median over rounds of the ratio within a round; load: share of the machine's "
                 "CPU used by other processes meanwhile)")
    return lines


def kernel_report(rows: int, k: int, dtype=np.float32, threads: int | None = None, rounds: int = 5,
                  peers: bool = False, log=None, max_load: float | None = None) -> tuple[list[str], dict]:
    """Kernel throughput against the streaming limit, in one process, alternating."""
    from .. import _api
    from .._engine import warmup

    threads = threads or default_threads()
    p, q, pl_, ql_ = softmax_rows(rows, k, dtype)
    lp, lq = log_probs(p), log_probs(q)
    nbytes = p.nbytes + q.nbytes
    warmup()
    warm_stream(dtype)
    several = ("kl", "reverse_kl", "js", "entropy")
    cases: dict[str, Callable] = {
        "streaming limit (vectorised sum)": lambda: stream(p, q, threads, True),
        "streaming, scalar sum (no reassoc)": lambda: stream(p, q, threads, False),
        "fastkl kl, probs": lambda: _api.kl(p, q, threads=threads),
        "fastkl kl, logprobs": lambda: _api.kl(lp, lq, kind="logprobs", threads=threads),
        "fastkl kl, logits": lambda: _api.kl(pl_, ql_, kind="logits", threads=threads),
        "fastkl " + "+".join(several) + ", probs": lambda: _api.divergences(p, q, measures=several, threads=threads),
    }
    info = {}
    if peers:
        avail = peers_available()
        if avail["scipy"]:
            cases["scipy rel_entr(p, q).sum(1)"] = lambda: scipy_kl(p, q)
        cases["numpy (p * log(p / q)).sum(1)"] = lambda: numpy_kl(p, q)
        if avail["polars"]:
            df = polars_frame(p, q)
            cases["polars list expression"] = lambda: polars_kl(df)
        if avail["duckdb"]:
            import duckdb

            con = duckdb.connect()
            tab = pa.table({"p": list_column(p), "q": list_column(q)})
            cases["duckdb list_transform SQL"] = lambda: duckdb_kl(con, tab)
        info["peers"] = [n for n, ok in avail.items() if ok]
    half = half_cases(p, q, threads)
    cases.update({n: fn for n, (fn, _) in half.items()})
    t = alternate(cases, rounds=rounds, log=log, max_load=max_load)
    ref = "streaming limit (vectorised sum)"
    out_rows = [Row(n, t[n], rows, half[n][1] if n in half else nbytes, ref) for n in cases]
    by = {r.case: r for r in out_rows}
    title = (f"kernel: {rows:,} rows x {k} {np.dtype(dtype).name} (p and q: {nbytes / 1e6:,.0f} MB), "
             f"{threads} thread{'s' if threads > 1 else ''}, median of {rounds}")
    lines = _fmt_table(title, out_rows, by, "vs limit", inverse=True)
    info.update({n: {"median_s": t[n].median, "seconds": t[n].seconds, "others": t[n].others} for n in cases})
    info["_meta"] = {"rows": rows, "k": k, "dtype": np.dtype(dtype).name, "threads": threads, "bytes": nbytes,
                     "kl_vs_limit": 1 / ratio(t["fastkl kl, probs"], t[ref]),
                     "float16_vs_float32": ratio(t["fastkl kl, float32 probs"], t["fastkl kl, float16 probs"]),
                     "bfloat16_vs_float32": ratio(t["fastkl kl, float32 probs"],
                                                  t["fastkl kl, bfloat16 probs (uint16)"])}
    return lines, info


def job_report(rows: int, k: int, row_groups: int = 8, rounds: int = 5, workdir: str | None = None,
               peers: bool = False, log=None, keep_data: bool = False,
               max_load: float | None = None) -> tuple[list[str], dict]:
    """A job's wall time against the I/O floor on one Parquet file, alternating."""
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="fastkl-bench-")
    try:
        src = os.path.join(workdir, f"kl-{rows}x{k}-rg{row_groups}.parquet")
        if log:
            log(f"  writing {src} ...")
        write_parquet(src, rows, k, row_groups)
        size = os.path.getsize(src)
        out = os.path.join(workdir, "out")
        os.makedirs(out, exist_ok=True)
        result = np.random.default_rng(1).random(rows)
        paths = {"floor": os.path.join(out, "floor.parquet"), "fastkl": os.path.join(out, "fastkl"),
                 "duckdb": os.path.join(out, "duckdb.parquet"), "polars": os.path.join(out, "polars.parquet")}
        paths["floor_streamed"] = os.path.join(out, "floor_streamed.parquet")
        cases: dict[str, Callable] = {
            "I/O floor (pyarrow read p, q + write 1 col)": lambda: io_floor(src, paths["floor"], result),
            "streamed read (as fastkl reads) + write": lambda: io_floor_streamed(src, paths["floor_streamed"], result),
            "fastkl run": lambda: fastkl_job(src, paths["fastkl"]),
        }
        key = {"I/O floor (pyarrow read p, q + write 1 col)": "floor",
               "streamed read (as fastkl reads) + write": "floor_streamed", "fastkl run": "fastkl"}
        if peers:
            avail = peers_available()
            if avail["duckdb"]:
                import duckdb

                con = duckdb.connect()
                cases["duckdb COPY (SELECT ...) TO"] = lambda: duckdb_job(con, src, paths["duckdb"])
                key["duckdb COPY (SELECT ...) TO"] = "duckdb"
            if avail["polars"]:
                cases["polars scan_parquet().sink_parquet()"] = lambda: polars_job(src, paths["polars"])
                key["polars scan_parquet().sink_parquet()"] = "polars"
        t = alternate(cases, rounds=rounds, before=lambda n: remove(paths[key[n]]), log=log, max_load=max_load)
        floor = "I/O floor (pyarrow read p, q + write 1 col)"
        out_rows = [Row(n, t[n], rows, size, floor) for n in cases]
        by = {r.case: r for r in out_rows}
        title = (f"job: {rows:,} rows x {k} float32, one Parquet file of {size / 1e6:,.0f} MB "
                 f"({row_groups} row groups, snappy), median of {rounds}")
        lines = _fmt_table(title, out_rows, by, "x floor", inverse=False)
        info = {key[n]: {"median_s": t[n].median, "seconds": t[n].seconds, "others": t[n].others} for n in cases}
        info["_meta"] = {"rows": rows, "k": k, "row_groups": row_groups, "file_bytes": size,
                         "fastkl_vs_floor": ratio(t["fastkl run"], t[floor]),
                         "fastkl_vs_streamed": ratio(t["fastkl run"], t["streamed read (as fastkl reads) + write"])}
        return lines, info
    finally:
        if own and not keep_data:
            shutil.rmtree(workdir, ignore_errors=True)


def bench(rows: int = 200_000, k: int = 256, dtype=np.float32, threads: int | None = None, rounds: int = 5,
          kernel: bool = True, job: bool = True, peers: bool = False, workdir: str | None = None,
          echo: Callable[[str], None] = print, log: Callable[[str], None] | None = None,
          max_load: float | None = None) -> dict:
    """`fastkl bench`: print the kernel and job reports, return their numbers."""
    threads = threads or default_threads()
    echo(f"fastkl bench, {time.strftime('%Y-%m-%d %H:%M')}")
    echo(f"machine: {machine()}")
    echo(f"kernels: {compile_target()}")
    echo(f"software: {versions()}")
    if peers:
        avail = peers_available()
        missing = [n for n, ok in avail.items() if not ok]
        hint = "; ".join(x for x in ("pip install 'fastkl[bench]'" if set(missing) - {"torch"} else "",
                                       "PyTorch: a CPU build" if "torch" in missing else "") if x)
        echo("peers: " + ", ".join(["numpy"] + [n for n, ok in avail.items() if ok])
             + (f" (not installed: {', '.join(missing)}; {hint})" if missing else ""))
    out: dict = {"machine": machine(), "kernels": compile_target(), "versions": versions(),
                 "date": time.strftime("%Y-%m-%d %H:%M")}
    if kernel:
        echo("")
        lines, info = kernel_report(rows, k, dtype, threads=threads, rounds=rounds, peers=peers, log=log,
                                    max_load=max_load)
        for line in lines:
            echo(line)
        lim = info["streaming limit (vectorised sum)"]["median_s"]
        kl = info["fastkl kl, probs"]["median_s"]
        gb = info["_meta"]["bytes"] / 1e9
        echo(f"=> fastkl kl: {gb / kl:.2f} GB/s, {info['_meta']['kl_vs_limit']:.0%} of the streaming limit "
             f"({gb / lim:.2f} GB/s) on this machine")
        out["kernel"] = info
    if peers and kernel and peers_available()["torch"]:
        echo("")
        lines, info = logits_report(threads=threads, rounds=rounds, log=log, max_load=max_load)
        for line in lines:
            echo(line)
        out["logits"] = info
    if job:
        echo("")
        lines, info = job_report(rows, k, rounds=rounds, workdir=workdir, peers=peers, log=log, max_load=max_load)
        for line in lines:
            echo(line)
        echo(f"=> fastkl run: {info['_meta']['fastkl_vs_floor']:.2f}x the time to read the input and write the output "
             f"(streamed read: {info['_meta']['fastkl_vs_streamed']:.2f}x)")
        out["job"] = info
    return out


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python that imports this very fastkl (not another install)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["fastkl"].__file__)))
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def startup(data_dir: str, warm_rounds: int = 5, cold_rounds: int = 2,
            max_load: float | None = None) -> tuple[list[float], list[float]]:
    """Wall times of `fastkl run` on a tiny file in a fresh process: warm (the JIT
    cache is filled first) and cold (NUMBA_CACHE_DIR pointing to an empty directory).
    With `max_load`, each run waits for other processes to use less of the machine."""
    import subprocess
    import sys

    tiny = write_parquet(os.path.join(data_dir, "tiny-100x16.parquet"), 100, 16, 1)
    dest = os.path.join(data_dir, f"tiny-out-{os.getpid()}")
    cmd = [sys.executable, "-m", "fastkl.cli", "run", tiny, dest, "--quiet"]

    def once(env=None) -> float:
        remove(dest)
        if max_load is not None:
            wait_quiet(max_load)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env or child_env(), capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"fastkl run failed: {r.stderr.strip()}")
        return elapsed

    try:
        once()  # fills the JIT cache if it is empty
        warm = [once() for _ in range(warm_rounds)]
        cold = []
        for _ in range(cold_rounds):
            cache = tempfile.mkdtemp(prefix="fastkl-numba-cache-")
            try:
                cold.append(once(child_env(NUMBA_CACHE_DIR=cache)))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        remove(dest)
    return warm, cold


class local_cluster:
    """A distributed.LocalCluster of `workers` one-thread worker processes on 127.0.0.1, and its Client.

        with local_cluster(2) as client:
            fastkl_job(src, dest, scheduler=client)
    """

    def __init__(self, workers: int = 2):
        self.workers = workers

    def __enter__(self):
        import logging

        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                    host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR)
        self.client = Client(self.cluster, set_as_default=False)
        self.client.wait_for_workers(self.workers, timeout=60)
        return self.client

    def __exit__(self, *exc):
        self.client.close()
        self.cluster.close()
        return False


_ON_CORES = """
import os, sys, time
os.sched_setaffinity(0, {int(c) for c in sys.argv[3].split(",")})
from fastkl.bench import throughput as B
src, dest = sys.argv[1:3]
B.fastkl_job(src, dest)  # warm: JIT cache, file in the page cache
B.remove(dest)
t0 = time.perf_counter()
B.fastkl_job(src, dest)
print(time.perf_counter() - t0)
B.remove(dest)
"""


def job_on_cores(src: str, dest: str, cores: int) -> float:
    """Wall time of one warm fastkl.run in a fresh process pinned to the first `cores` CPUs
    (Linux CPU affinity, which fastkl reads to size its threads)."""
    import subprocess
    import sys

    allowed = sorted(os.sched_getaffinity(0))[:cores]
    r = subprocess.run([sys.executable, "-c", _ON_CORES, src, dest, ",".join(map(str, allowed))],
                       capture_output=True, text=True, env=child_env())
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed")
    return float(r.stdout.split()[-1])
