"""pytest-benchmark suite: fastkl against the streaming limit, the I/O floor and its peers.

Run it explicitly (the test suite's `pytest` only collects tests/):

    pip install -e ".[bench]"
    pytest benchmarks/                         # everything, 200,000 rows x 256 float32
    pytest benchmarks/ -k targets              # only the ratio targets, with a table at the end
    pytest benchmarks/ --bench-rows 50000      # smaller data
    pytest benchmarks/ --benchmark-json out.json

Two kinds of tests:

* `test_kernels.py`, `test_jobs.py`: one pytest-benchmark timing per case,
  grouped so each group reads as a comparison (fastkl vs the streaming limit
  vs scipy / NumPy / Polars / DuckDB; encodings; measures; threads; sizes;
  jobs vs the I/O floor). Cases run one after the other.
* `test_targets.py`: the performance targets as ratios. The cases of each
  target run in turn in this one process (the order rotates every round),
  and the ratio of the medians is asserted; the table of all targets is
  printed at the end of the session. Machines with other work running give
  noisy times: use more --bench-rounds.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pyarrow as pa
import pytest

from fastkl.bench import throughput as B

TARGETS: list[tuple[str, float, str, str, bool]] = []  # (target, measured, fmt, goal, ok)


def pytest_addoption(parser):
    g = parser.getgroup("fastkl benchmarks")
    g.addoption("--bench-rows", type=int, default=200_000, help="rows of the data (default 200,000)")
    g.addoption("--bench-vocab", type=int, default=256, help="support size K (default 256)")
    g.addoption("--bench-rounds", type=int, default=7, help="timed rounds per case (default 7)")
    g.addoption("--bench-max-load", type=float, default=None,
                help="shared machine: a target's round starts only when other processes use less than this share "
                     "of the CPU, and is run again when they used more (e.g. 0.1)")
    g.addoption("--bench-data", default=None,
                help="directory for the job's Parquet files (default: /work/data/bench if /work/data exists, "
                     "else a temporary directory)")


@pytest.fixture(scope="session")
def rows(pytestconfig) -> int:
    return pytestconfig.getoption("--bench-rows")


@pytest.fixture(scope="session")
def vocab(pytestconfig) -> int:
    return pytestconfig.getoption("--bench-vocab")


@pytest.fixture(scope="session")
def rounds(pytestconfig) -> int:
    return pytestconfig.getoption("--bench-rounds")


@pytest.fixture(scope="session")
def max_load(pytestconfig):
    return pytestconfig.getoption("--bench-max-load")


@pytest.fixture(scope="session")
def threads() -> int:
    return B.default_threads()


@pytest.fixture(scope="session")
def data(rows, vocab):
    """float32 probabilities (no zeros), their log-probabilities and logits, rows x vocab."""
    from fastkl._engine import warmup

    p, q, p_logits, q_logits = B.softmax_rows(rows, vocab, np.float32)
    warmup()
    B.warm_stream(np.float32)
    return {
        "p": p, "q": q, "lp": B.log_probs(p), "lq": B.log_probs(q), "xp": p_logits, "xq": q_logits,
        "elements": p.size, "bytes": p.nbytes + q.nbytes, "rows": rows,
    }


@pytest.fixture(scope="session")
def polars_df(data):
    pytest.importorskip("polars")
    return B.polars_frame(data["p"], data["q"])


@pytest.fixture(scope="session")
def duckdb_kl(data):
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    table = pa.table({"p": B.list_column(data["p"]), "q": B.list_column(data["q"])})
    return lambda: B.duckdb_kl(con, table)


@pytest.fixture(scope="session")
def data_dir(pytestconfig, tmp_path_factory) -> str:
    d = pytestconfig.getoption("--bench-data")
    if d is None:
        d = "/work/data/bench" if os.path.isdir("/work/data") else str(tmp_path_factory.mktemp("data"))
    os.makedirs(d, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def job_file(data_dir, rows, vocab) -> str:
    """One Parquet file: id, p, q (list<float32>, snappy, 8 row groups); about 400 MB by default."""
    return B.write_parquet(os.path.join(data_dir, f"kl-{rows}x{vocab}-rg8.parquet"), rows, vocab, 8)


@pytest.fixture()
def out_dir():
    with tempfile.TemporaryDirectory(prefix="fastkl-bench-out-") as d:
        yield d


def record(target: str, measured: float, fmt: str, goal: str, ok: bool) -> None:
    TARGETS.append((target, measured, fmt, goal, ok))


def pytest_terminal_summary(terminalreporter):
    if not TARGETS:
        return
    w = max(len(t[0]) for t in TARGETS)
    tr = terminalreporter
    tr.section("fastkl performance targets (same process, cases alternating; ratio = median of per-round ratios)")
    tr.write_line(f"machine: {B.machine()}")
    tr.write_line(B.versions())
    tr.write_line(f"{'target':<{w}}  {'measured':>9}  {'goal':<10} result")
    for target, value, fmt, goal, ok in TARGETS:
        tr.write_line(f"{target:<{w}}  {fmt.format(value):>9}  {goal:<10} {'PASS' if ok else 'FAIL'}")


@pytest.fixture(scope="session")
def record_target():
    """record_target(target, measured, fmt, goal, ok): one line of the table printed at the end."""
    return record
