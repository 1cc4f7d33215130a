#!/usr/bin/env python
"""Scale benchmarks (issue 15): how a job's cost grows with files, row groups, tasks and parts.

    python scripts/bench_scale.py                          # every section, data under $TMPDIR/fastkl-scale
    python scripts/bench_scale.py --only files,rowgroups --rounds 3
    python scripts/bench_scale.py --only merge --sizes 10000,100000,1000000

Sections (--only, comma separated); each case runs in a fresh process (peak RSS
is that process's), after one warm-up job there (JIT cache loaded), and the
table gives the median of --rounds runs:

  files      N tiny Parquet files of 50 rows (8 float32 per side), `fastkl run
             ... --keep id`, default options (small files grouped into tasks)
  tasks      the same files with group_files=1: N tasks, one per file (the
             scheduling, per-task state and merge cost per task)
  cluster    the tasks section on a distributed.LocalCluster (2 worker
             processes of 1 thread, started in the child): the client, the
             scheduler and the workers' per-task cost together; then N no-op
             tasks on the same cluster give Dask's own cost per task there
  rowgroups  one Parquet file of N row groups (4 rows of 32 float32 per side),
             tasks of ~1 MiB (task_bytes=2**20)
  merge      no data: N synthetic files of one row group each cut into N tasks
             (`cut_tasks`), N task results (a realistic kl+js summary state)
             handed to the job's ordered merge in a shuffled order within the
             scheduler's window and their states logged (fastkl.io.state_log,
             in a temporary directory), the manifest's parts built and written:
             what the client does per task, and its peak RSS

"overhead ms/task" is (compute time x threads - the tasks' own time) / tasks:
the share of the threads' time no task used (scheduling, results, merge).

For every section the fit y = a + b * N**c (least squares over the sizes)
is printed: c is the growth exponent (1 = linear). The machine is named
(lscpu) and its load average printed: on a shared machine compare the
exponents and ratios, not absolute times. Generated data never goes to git.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

SIZES = {
    "files": [100, 300, 1000, 3000, 10000, 30000],
    "tasks": [100, 300, 1000, 3000, 10000],
    "cluster": [100, 300, 1000, 3000, 10000],
    "rowgroups": [1000, 3000, 10000, 30000, 100000],
    "merge": [10000, 100000, 1000000],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# data


def tiny_files(root: str, n: int, rows: int = 50, k: int = 8) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = os.path.join(root, f"tiny-{n}")
    if os.path.exists(os.path.join(d, "_done")):
        return d
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    rng = np.random.default_rng(0)
    for i in range(n):
        p = rng.random((rows, k), dtype=np.float32)
        p /= p.sum(1, keepdims=True)
        q = rng.random((rows, k), dtype=np.float32)
        q /= q.sum(1, keepdims=True)
        pq.write_table(pa.table({"id": np.arange(i * rows, (i + 1) * rows),
                                 "p": pa.FixedSizeListArray.from_arrays(p.ravel(), k),
                                 "q": pa.FixedSizeListArray.from_arrays(q.ravel(), k)}),
                       os.path.join(d, f"shard-{i:07d}.parquet"))
    open(os.path.join(d, "_done"), "w").close()  # skipped by fastkl (leading _)
    return d


def row_group_file(root: str, n: int, rows: int = 4, k: int = 32) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(root, f"rowgroups-{n}.parquet")
    if os.path.exists(path):
        return path
    rng = np.random.default_rng(0)
    m = n * rows
    p = rng.random((m, k), dtype=np.float32)
    p /= p.sum(1, keepdims=True)
    q = rng.random((m, k), dtype=np.float32)
    q /= q.sum(1, keepdims=True)
    t = pa.table({"id": np.arange(m), "p": pa.FixedSizeListArray.from_arrays(p.ravel(), k),
                  "q": pa.FixedSizeListArray.from_arrays(q.ravel(), k)})
    pq.write_table(t, path + ".tmp", row_group_size=rows)
    os.replace(path + ".tmp", path)
    return path


# --------------------------------------------------------------------------
# one case, in a child process


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case_job(kind: str, n: int, data: str) -> dict:
    import fastkl
    from fastkl import _config

    src = tiny_files(data, n) if kind in ("files", "tasks", "cluster") else row_group_file(data, n)
    opts = {"keep": "id", "quiet": True}
    threads = _config.cores()
    if kind in ("tasks", "cluster"):
        opts["group_files"] = 1
    if kind == "cluster":
        from distributed import Client, LocalCluster

        threads = 2
        cluster = LocalCluster(n_workers=threads, threads_per_worker=1, processes=True, dashboard_address=None)
        opts["scheduler"] = Client(cluster)
    if kind == "rowgroups":
        opts["task_bytes"] = 1 << 20
    out = tempfile.mkdtemp(prefix="fastkl-scale-out-")
    try:
        fastkl.run(tiny_files(data, 3), os.path.join(out, "warm"), **opts)  # JIT cache loaded
        base = _peak_mb()
        dest = os.path.join(out, "dest")
        t0 = time.perf_counter()
        s = fastkl.run(src, dest, **opts)
        wall = time.perf_counter() - t0
        with open(os.path.join(dest, "_fastkl.json")) as fh:
            m = json.load(fh)
        parts = m["parts"]
        tasks = len(parts) if isinstance(parts, list) else parts["count"]
        floor = _dask_floor_ms(opts["scheduler"], min(tasks, 10_000)) if kind == "cluster" else None
        # what the tasks' own time leaves of the threads' compute time: scheduling, results, merge
        overhead = s.timings["compute_s"] * threads - s.timings["task_s"]
        return {"wall_s": wall, "plan_s": s.timings["plan_s"], "compute_s": s.timings["compute_s"],
                "task_s": s.timings["task_s"], "overhead_ms": max(0.0, 1e3 * overhead / tasks),
                "tasks": tasks, "rss_mb": _peak_mb(), **({"dask_floor_ms": floor} if floor else {}),
                "rss_before_mb": base,
                "manifest_bytes": sum(os.path.getsize(os.path.join(dest, f)) for f in os.listdir(dest)
                                      if f.startswith("_fastkl"))}
    finally:
        if kind == "cluster":
            opts["scheduler"].close()
            cluster.close()
        shutil.rmtree(out, ignore_errors=True)


def _noop(i: int) -> dict:
    return {"index": i, "stats_text": "x" * 4000}  # about a task result's size


def _dask_floor_ms(client, n: int) -> float:
    """Wall ms per task of n no-op tasks on the same cluster, submitted and collected as a job
    does (a window of futures refilled from `as_completed`): what Dask itself costs per task here."""
    from distributed import as_completed

    t0 = time.perf_counter()
    todo = iter(range(n))
    ready = as_completed([client.submit(_noop, i, pure=False) for i, _ in zip(todo, range(256))],
                         with_results=True)
    for fut, _ in ready:
        fut.release()
        i = next(todo, None)
        if i is not None:
            ready.add(client.submit(_noop, i, pure=False))
    return 1e3 * (time.perf_counter() - t0) / n


def case_merge(n: int) -> dict:
    """Planning and merging only: n synthetic one-row-group files -> n tasks -> n results."""
    import pyarrow as pa

    from fastkl._engine import compute
    from fastkl._options import Options
    from fastkl.io.filemeta import Identity
    from fastkl.io.output import Staging
    from fastkl.io.plan_columns import Files
    from fastkl.io.sources import cut_tasks
    from fastkl.io.state_log import FinishedParts, LocalLogs
    from fastkl.jobs import run as job
    from fastkl.summary.stats import PartStats

    rng = np.random.default_rng(0)
    p = rng.random((1000, 16))
    p /= p.sum(1, keepdims=True)
    q = rng.random((1000, 16))
    q /= q.sum(1, keepdims=True)
    lists = pa.list_(pa.float64())
    state = PartStats.from_result(compute(pa.array(list(p), lists), pa.array(list(q), lists), ("kl", "js"),
                                          Options())).to_json()
    state_text = json.dumps(state, separators=(",", ":"))  # as a task sends it
    base = _peak_mb()
    t0 = time.perf_counter()
    files = Files()  # what `scan` builds from the footers, one file at a time
    for i in range(n):
        path = f"/data/shards/shard-{i:07d}.parquet"
        ident = Identity(2049, 10_000 + i, 60_000, 1_700_000_000_000_000_000 + i, 1_700_000_000_000_000_000 + i)
        files.append(path, path, "parquet", ident, (), None, f"{i:032x}", (), [(1000, 1 << 17, 0)], None)
    tasks = cut_tasks(files.freeze(), None, 1 << 17, group_files=1)
    t_plan = time.perf_counter()
    merge = job._OrderedMerge(np.zeros(n, bool), None)
    logs_dir = tempfile.mkdtemp(prefix="fastkl-scale-states-")
    finished = FinishedParts(LocalLogs(Path(logs_dir)), n, "job")  # the states, logged as in a job
    window = 16
    order = list(range(n))
    for a in range(0, n, window):  # results arrive shuffled within the scheduler's window
        chunk = order[a:a + window]
        random.Random(a).shuffle(chunk)
        for i in chunk:
            result = {"index": i, "rows": 1000, "stats": state, "stats_text": state_text, "seconds": 0.01,
                      "state": {"fingerprint": f"{i:032x}", "batch_rows": 131072, "rows": 1000,
                                "part_size": 20_000, "part_inode": 10_000 + i, "part_mtime_ns": 1_700_000_000_000_000_000 + i}}
            finished.add(i, result["state"], result["stats_text"])
            merge.add(result)
    finished.flush()
    log_bytes = sum(os.path.getsize(os.path.join(logs_dir, f)) for f in os.listdir(logs_dir))
    finished.close()
    shutil.rmtree(logs_dir, ignore_errors=True)
    merge.drain(n)
    t_merge = time.perf_counter()

    staging = Staging.__new__(Staging)
    staging.width = max(6, len(str(n - 1)))
    out = tempfile.mkdtemp(prefix="fastkl-scale-manifest-")
    try:  # the manifest as the job writes it: inline up to MANIFEST_INLINE parts, else Parquet tables
        from fastkl._config import MANIFEST_INLINE
        from fastkl.io import manifest_tables as mt

        head = {"summary": merge.merged.to_json()}
        if n > MANIFEST_INLINE:
            inputs, parts = mt.inputs_table(files), mt.parts_table(tasks, staging.width)
            head["plan_digest"] = mt.digest(inputs, parts)
            mt.write(Path(out), inputs, parts.append_column("resumed", pa.array(np.zeros(n, bool))))
            head["parts"] = {"table": mt.PARTS_TABLE, "count": n}
        else:
            class _Plan:
                pass

            plan = _Plan()
            plan.tasks = tasks
            head["parts"] = job._parts(plan, staging)
            head["inputs"] = [f.to_dict() for f in files]
        with open(os.path.join(out, "_fastkl.json"), "w") as fh:
            json.dump(head, fh)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    t_end = time.perf_counter()
    assert merge.merged.rows == 1000 * n
    return {"wall_s": t_end - t0, "plan_s": t_plan - t0, "merge_s": t_merge - t_plan,
            "manifest_s": t_end - t_merge, "tasks": len(tasks), "rss_mb": _peak_mb(), "rss_before_mb": base,
            "manifest_bytes": size, "state_log_bytes": log_bytes}


def child(section: str, n: int, data: str) -> None:
    if section == "make-tiny":
        tiny_files(data, n)
        return
    if section == "make-rowgroups":
        row_group_file(data, n)
        return
    r = case_merge(n) if section == "merge" else case_job(section, n, data)
    print(json.dumps(r))


# --------------------------------------------------------------------------
# parent: sizes, rounds, fits


def fit(ns: list[int], ys: list[float]) -> tuple[float, float, float] | None:
    """Least-squares y = a + b * N**c with a, b >= 0; None with fewer than 3 sizes."""
    if len(ns) < 3:
        return None
    from scipy.optimize import curve_fit

    x = np.asarray(ns, float)
    y = np.asarray(ys, float)
    best = None
    for c0 in (0.5, 1.0, 1.5, 2.0):
        try:
            popt, _ = curve_fit(lambda n, a, b, c: a + b * n ** c, x, y,
                                p0=(min(y) / 2, max(y) / max(x) ** c0, c0),
                                bounds=([0, 0, 0.1], [np.inf, np.inf, 3.0]), maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        err = float(np.sum((popt[0] + popt[1] * x ** popt[2] - y) ** 2))
        if best is None or err < best[0]:
            best = (err, tuple(float(v) for v in popt))
    return None if best is None else best[1]


def machine() -> str:
    cpu = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"


def run_section(section: str, sizes: list[int], rounds: int, data: str) -> list[dict]:
    rows = []
    for n in sizes:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        make = {"files": "make-tiny", "tasks": "make-tiny", "cluster": "make-tiny",
                "rowgroups": "make-rowgroups"}.get(section)
        if make:  # in a child: this process stays small (its peak would be inherited by the next)
            subprocess.run([sys.executable, __file__, "--child", make, "--n", str(n), "--data", data],
                           check=True, env=env)
        runs = []
        for _ in range(rounds):
            r = subprocess.run([sys.executable, __file__, "--child", section, "--n", str(n), "--data", data],
                               capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise SystemExit(f"{section} N={n} failed:\n{r.stderr}")
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        med["n"] = n
        med["load"] = os.getloadavg()[0]
        rows.append(med)
        log(f"  {section} N={n}: wall {med['wall_s']:.2f} s, tasks {med['tasks']:.0f}, peak RSS "
            f"{med['rss_mb']:.0f} MB, load {med['load']:.1f}")
    return rows


def report(section: str, rows: list[dict]) -> str:
    ns = [r["n"] for r in rows]
    lines = [f"### {section}", "",
             "| N | wall s | plan s | tasks | per N (ms) | overhead ms/task | peak RSS MB | manifest bytes | load |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        over = f"{r['overhead_ms']:.3f}" if "overhead_ms" in r else "-"
        if "dask_floor_ms" in r:  # Dask's own wall ms per no-op task on the same cluster
            over += f" (Dask no-op: {r['dask_floor_ms']:.2f} wall)"
        lines.append(f"| {r['n']:,} | {r['wall_s']:.2f} | {r['plan_s']:.2f} | {r['tasks']:,.0f} | "
                     f"{1e3 * r['wall_s'] / r['n']:.3f} | {over} | {r['rss_mb']:.0f} | "
                     f"{r['manifest_bytes']:,.0f} | {r['load']:.1f} |")
    lines.append("")
    for what, key in (("wall", "wall_s"), ("plan", "plan_s"), ("peak RSS", "rss_mb")):
        f = fit(ns, [r[key] for r in rows])
        if f is not None:
            a, b, c = f
            lines.append(f"- {what}: y = {a:.3g} + {b:.3g} * N^{c:.2f}  (exponent c = {c:.2f})")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="files,tasks,cluster,rowgroups,merge")
    ap.add_argument("--sizes", default=None, help="comma-separated N for the sections run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "fastkl-scale"))
    ap.add_argument("--json", default=None, help="also write the measurements here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.n, a.data)
        return
    os.makedirs(a.data, exist_ok=True)
    print(f"# fastkl scale benchmarks: {machine()}\n")
    results = {}
    for section in a.only.split(","):
        sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else SIZES[section]
        log(f"{section}: N = {sizes}")
        results[section] = run_section(section, sizes, a.rounds, a.data)
        print(report(section, results[section]), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"machine": machine(), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
