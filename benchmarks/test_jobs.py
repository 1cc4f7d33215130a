"""Job wall time on one Parquet file (about 400 MB by default), one pytest-benchmark timing per case.

The I/O floor is pyarrow reading the p and q columns and writing one float64
column of as many rows; the streamed read reads the way a fastkl task does,
split over the cores. The peers do the same job with their own engines.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from fastkl.bench import throughput as B

CASES = ["I/O floor (read_table + write)", "streamed read + write", "fastkl.run", "fastkl.run (LocalCluster, 2 procs)",
         "duckdb COPY (SELECT ...) TO", "polars scan_parquet().sink_parquet()"]


@pytest.mark.benchmark(group="job: one Parquet file")
@pytest.mark.parametrize("case", CASES)
def test_job(benchmark, job_file, out_dir, rows, rounds, case):
    result = np.random.default_rng(1).random(rows)
    dest = os.path.join(out_dir, "out.parquet" if "fastkl" not in case else "out")
    if case.startswith("I/O floor"):
        fn = lambda: B.io_floor(job_file, dest, result)
    elif case.startswith("streamed"):
        fn = lambda: B.io_floor_streamed(job_file, dest, result)
    elif case == "fastkl.run":
        fn = lambda: B.fastkl_job(job_file, dest)
    elif case.startswith("fastkl.run (LocalCluster"):
        fn = lambda: B.fastkl_job(job_file, dest, scheduler="processes", workers=2)
        rounds = min(rounds, 3)
    elif case.startswith("duckdb"):
        duckdb = pytest.importorskip("duckdb")
        con = duckdb.connect()
        fn = lambda: B.duckdb_job(con, job_file, dest)
    else:
        pytest.importorskip("polars")
        fn = lambda: B.polars_job(job_file, dest)
    benchmark.pedantic(fn, setup=lambda: B.remove(dest), rounds=rounds, warmup_rounds=1, iterations=1)
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(rows=rows, file_MB=os.path.getsize(job_file) / 1e6,
                                MB_per_s=os.path.getsize(job_file) / med / 1e6, rows_per_s=rows / med)
