#!/usr/bin/env python
"""Job targets: fastkl.run against the Parquet I/O floor, DuckDB and Polars; start-up; scaling.

    python scripts/bench_jobs.py                      # everything, data under /work/data/bench or $TMPDIR
    python scripts/bench_jobs.py --only floor --rounds 9
    python scripts/bench_jobs.py --data /tmp/bench --json results.json

Every comparison is timed in this one process, warm (each case runs once
before timing), the cases taking turns with the order rotating every round;
the table reports medians and the ratio of medians against each target. The
data (a 400 MB Parquet file of 200,000 rows x 256 float32 per side, snappy,
8 row groups, plus smaller and larger variants for the size sweep) is written
once and reused; it never goes into git.

Sections (--only, comma separated):
  floor    fastkl.run vs the I/O floor (pyarrow read_table of p, q + write one
           float64 column), DuckDB COPY (SELECT list_sum(list_transform(...))),
           Polars scan_parquet().select().sink_parquet(); for information also
           a streamed read (row groups split over the cores, read the way a
           fastkl task reads them) + write: what is left is kernel + engine
  scaling  fastkl.run with 1 vs 2 workers; the local default vs a LocalCluster
           of two worker processes (scheduler="processes")
  size     rows/s on files of 1/4, 1 and 4 times the base size
  startup  `fastkl run` on a tiny file in a fresh process: warm (JIT cache
           filled) and cold (NUMBA_CACHE_DIR pointing to an empty directory)
  memory   peak RSS of the process tree for `fastkl run` and for the floor,
           each in a fresh process
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastkl.bench import throughput as B  # noqa: E402

SECTIONS = ("floor", "scaling", "size", "startup", "memory")
MAX_LOAD: float | None = None  # --max-load


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, what: str, value: float, fmt: str, target: str, ok: bool | None) -> None:
        self.rows.append((what, fmt.format(value), target, "" if ok is None else ("PASS" if ok else "FAIL")))

    def render(self) -> str:
        w = max(len(r[0]) for r in self.rows) if self.rows else 10
        out = [f"{'target':<{w}}  {'measured':>10}  {'goal':<12} result"]
        out += [f"{a:<{w}}  {b:>10}  {c:<12} {d}" for a, b, c, d in self.rows]
        return "\n".join(out)


def timed_table(t: dict[str, B.Timing]) -> str:
    lines = []
    for n, x in t.items():
        load = f"  load {x.load:4.0%}" if x.load == x.load else ""
        lines.append(f"  {n:<12} median {x.median:7.3f} s  cpu {x.cpu_median:6.2f} s{load}  "
                     f"[{', '.join(f'{s:.2f}' for s in x.seconds)}]")
    return "\n".join(lines)


def section_floor(src: str, out: str, rows: int, rounds: int, table: Table, results: dict) -> None:
    import duckdb

    result = np.random.default_rng(1).random(rows)
    con = duckdb.connect()
    paths = {"floor": f"{out}/floor.parquet", "streamed": f"{out}/streamed.parquet", "fastkl": f"{out}/fastkl",
             "duckdb": f"{out}/duckdb.parquet", "polars": f"{out}/polars.parquet"}
    cases = {
        "floor": lambda: B.io_floor(src, paths["floor"], result),
        "streamed": lambda: B.io_floor_streamed(src, paths["streamed"], result),
        "fastkl": lambda: B.fastkl_job(src, paths["fastkl"]),
        "duckdb": lambda: B.duckdb_job(con, src, paths["duckdb"]),
        "polars": lambda: B.polars_job(src, paths["polars"]),
    }
    log("floor: fastkl.run vs I/O floor vs DuckDB vs Polars")
    t = B.alternate(cases, rounds=rounds, before=lambda n: B.remove(paths[n]), log=log, max_load=MAX_LOAD)
    # the three engines computed the same numbers
    ref = B.read_result(paths["fastkl"])
    for n in ("duckdb", "polars"):
        cases[n]()
        d = float(np.max(np.abs(B.read_result(paths[n]) - ref) / np.maximum(np.abs(ref), 1e-3)))
        results[f"{n}_max_rel_diff"] = d
        log(f"  {n} vs fastkl: max relative difference {d:.1e}")
    print(timed_table(t))
    r = B.ratio(t["fastkl"], t["floor"])
    table.add("job: fastkl.run / I/O floor", r, "{:.2f}x", "<= 1.15x", r <= 1.15)
    r = B.ratio(t["fastkl"], t["streamed"])
    table.add("job: fastkl.run / streamed read (info)", r, "{:.2f}x", "(kernel+engine)", None)
    r = B.ratio(t["duckdb"], t["fastkl"])
    table.add("job: DuckDB / fastkl.run", r, "{:.2f}x", ">= 2.5x", r >= 2.5)
    r = B.ratio(t["polars"], t["fastkl"])
    table.add("job: Polars / fastkl.run", r, "{:.2f}x", ">= 3x", r >= 3.0)
    results["floor"] = {n: x.seconds for n, x in t.items()}


def section_scaling(src: str, out: str, rounds: int, table: Table, results: dict) -> None:
    paths = {n: f"{out}/scale-{n}" for n in ("w1", "w2", "cluster", "proc")}
    # Cores, not workers: workers=1 still gives its one task every core.
    # Each run is a fresh process pinned to 1 or to all cores, warm.
    n = B.default_threads()
    log(f"scaling: fastkl.run pinned to 1 core vs {n} cores (fresh processes, alternating)")
    t = {"1 core": B.Timing("1 core"), f"{n} cores": B.Timing(f"{n} cores")}
    for r in range(max(3, rounds)):
        if MAX_LOAD is not None:
            B.wait_quiet(MAX_LOAD)
        for c in ((1, n) if r % 2 == 0 else (n, 1)):
            t["1 core" if c == 1 else f"{n} cores"].seconds.append(B.job_on_cores(src, paths["w1"], c))
        log(f"  round {r + 1}: " + ", ".join(f"{k} {v.seconds[-1]:.3f}s" for k, v in t.items()))
    print(timed_table(t))
    s = B.ratio(t["1 core"], t[f"{n} cores"])
    table.add(f"scaling: job speed-up 1 -> {n} cores", s, "{:.2f}x", "> 1 (grows)", s > 1.05)
    # On a running LocalCluster of two worker processes (the target), and with
    # scheduler="processes", where fastkl starts and stops a cluster inside
    # the job (start-up included: for information).
    log("scaling: a LocalCluster of 2 worker processes vs the default")
    with B.local_cluster(2) as client:
        cases = {
            "w2": lambda: B.fastkl_job(src, paths["w2"]),
            "cluster": lambda: B.fastkl_job(src, paths["cluster"], scheduler=client),
            "proc": lambda: B.fastkl_job(src, paths["proc"], scheduler="processes", workers=2),
        }
        # the cluster's worker processes count as "other processes": wait for
        # a quiet machine before each call instead of judging the rounds
        def before(name):
            B.remove(paths[name])
            if MAX_LOAD is not None:
                B.wait_quiet(MAX_LOAD)

        t2 = B.alternate(cases, rounds=max(3, rounds // 2), before=before, log=log)
    print(timed_table(t2))
    r = B.ratio(t2["cluster"], t2["w2"])
    table.add("scaling: LocalCluster(2 procs) / default", r, "{:.2f}x", "<= 1.5x", r <= 1.5)
    r = B.ratio(t2["proc"], t2["w2"])
    table.add('scaling: scheduler="processes" incl. start-up (info)', r, "{:.2f}x", "-", None)
    results["scaling"] = {"cores": {n: x.seconds for n, x in t.items()},
                          "processes": {n: x.seconds for n, x in t2.items()}}


def section_size(data: str, out: str, rows: int, k: int, rounds: int, table: Table, results: dict) -> None:
    sizes = {"1/4": rows // 4, "1": rows, "4": rows * 4}
    srcs = {}
    for name, n in sizes.items():
        log(f"size: writing {n:,}-row file ...")
        srcs[name] = B.write_parquet(f"{data}/kl-{n}x{k}-rg{8 * n // rows}.parquet", n, k, max(1, 8 * n // rows))
    paths = {n: f"{out}/size-{n.replace('/', '_')}" for n in sizes}
    cases = {n: (lambda n=n: B.fastkl_job(srcs[n], paths[n])) for n in sizes}
    t = B.alternate(cases, rounds=rounds, before=lambda n: B.remove(paths[n]), log=log, max_load=MAX_LOAD)
    print(timed_table(t))
    rates = {n: sizes[n] / t[n].median for n in sizes}
    for n in sizes:
        print(f"  size x{n:<4} {sizes[n]:>9,} rows  {rates[n] / 1e6:6.3f} M rows/s")
    spread = max(rates.values()) / min(rates.values())
    table.add("size: max/min rows/s over 1/4x..4x data", spread, "{:.2f}x", "<= 1.25x", spread <= 1.25)
    results["size"] = {n: {"rows": sizes[n], "seconds": t[n].seconds} for n in sizes}


def section_startup(data: str, out: str, rounds: int, table: Table, results: dict) -> None:
    log("startup: `fastkl run` on a tiny file in a fresh process, warm and cold JIT cache")
    warm, cold = B.startup(data, warm_rounds=max(3, rounds), cold_rounds=max(2, rounds // 2), max_load=MAX_LOAD)
    w, c = float(np.median(warm)), float(np.median(cold))
    print(f"  start-up warm: median {w:.2f} s {[round(x, 2) for x in warm]}")
    print(f"  start-up cold: median {c:.2f} s {[round(x, 2) for x in cold]}")
    table.add("start-up: warm `fastkl run` tiny file", w, "{:.2f} s", "< 2 s", w < 2.0)
    table.add("start-up: cold (empty JIT cache)", c, "{:.2f} s", "< 10 s", c < 10.0)
    results["startup"] = {"warm": warm, "cold": cold}


_PEAK = textwrap.dedent("""
    import sys, threading, time, psutil
    import numpy as np
    what, src, dest = sys.argv[1:4]
    me = psutil.Process()
    base = me.memory_info().rss
    peak = [0]
    stop = False
    def sample():
        while not stop:
            try:
                procs = [me] + me.children(recursive=True)
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.005)
    from fastkl.bench import throughput as B
    import fastkl.jobs.run, pyarrow.parquet as pq
    base = me.memory_info().rss
    th = threading.Thread(target=sample, daemon=True); th.start()
    if what == "floor":
        rows = pq.ParquetFile(src).metadata.num_rows
        B.io_floor(src, dest, np.zeros(rows))
    else:
        B.fastkl_job(src, dest)
    stop = True; th.join()
    print(base, peak[0])
""")


def section_memory(src: str, big: str | None, out: str, table: Table, results: dict) -> None:
    """Peak RSS of the process tree above its start, each case in a fresh process."""
    log("memory: peak RSS, each case in a fresh process")
    res = {}
    cases = [("floor", src), ("fastkl", src)] + ([("fastkl", big)] if big else [])
    for what, path in cases:
        dest = f"{out}/mem-{what}" + (".parquet" if what == "floor" else "")
        B.remove(dest)
        r = subprocess.run([sys.executable, "-c", _PEAK, what, path, dest], capture_output=True, text=True,
                           env=B.child_env())
        B.remove(dest)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        base, peak = map(int, r.stdout.split())
        size = os.path.getsize(path) / 1e6
        res[f"{what} {size:,.0f} MB file"] = (peak - base) / 1e6
        print(f"  peak RSS above start, {what} on a {size:,.0f} MB file: {(peak - base) / 1e6:,.0f} MB")
    for name, mb in res.items():
        table.add(f"memory: {name}, peak RSS (MB)", mb, "{:,.0f}", "bounded" if "fastkl" in name else "(reference)", None)
    results["memory_mb"] = res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = "/work/data/bench" if os.path.isdir("/work/data") else os.path.join(tempfile.gettempdir(), "fastkl-bench")
    ap.add_argument("--data", default=default_data, help="where the input files are written (reused)")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--json", default=None, help="write the raw timings here")
    ap.add_argument("--max-load", type=float, default=None,
                    help="on a shared machine: start a round only when other processes use less than this share "
                         "of the CPU (e.g. 0.1), and run a round again when they used more")
    a = ap.parse_args(argv)
    global MAX_LOAD
    MAX_LOAD = a.max_load
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    for s in only:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    os.makedirs(a.data, exist_ok=True)
    out = tempfile.mkdtemp(prefix="fastkl-bench-out-", dir=a.data)
    src = B.write_parquet(f"{a.data}/kl-{a.rows}x{a.vocab}-rg8.parquet", a.rows, a.vocab, 8)
    print(f"# fastkl job benchmarks, {dt.date.today().isoformat()}")
    print(f"# machine: {B.machine()}")
    print(f"# {B.versions()}")
    print(f"# data: {src} ({os.path.getsize(src) / 1e6:,.0f} MB, {a.rows:,} rows x {a.vocab} float32, 8 row groups)")
    from fastkl._engine import warmup

    warmup()
    table, results = Table(), {}
    try:
        if "floor" in only:
            section_floor(src, out, a.rows, a.rounds, table, results)
        if "scaling" in only:
            section_scaling(src, out, a.rounds, table, results)
        if "size" in only:
            section_size(a.data, out, a.rows, a.vocab, a.rounds, table, results)
        if "startup" in only:
            section_startup(a.data, out, a.rounds, table, results)
        if "memory" in only:
            big = f"{a.data}/kl-{a.rows * 4}x{a.vocab}-rg32.parquet"
            section_memory(src, big if os.path.exists(big) else None, out, table, results)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print()
    print(table.render())
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": B.machine(),
                       "versions": B.versions(), "table": table.rows, "raw": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
