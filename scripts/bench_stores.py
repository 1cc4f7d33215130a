#!/usr/bin/env python
"""A job S3 -> S3 on moto's server over loopback against the same job local -> local (issue 12).

    python scripts/bench_stores.py                 # 4 files x 20,000 rows x 128 float32 per side (~80 MB)
    python scripts/bench_stores.py --rows 10000 --rounds 3

moto's server runs in a process of its own. Both jobs run in this process, warm (each runs once before timing), taking
turns, the same data (written locally, then copied to the bucket). Reported:
median wall time of each, their ratio, and where the store's time goes:
the job's own phases (plan = listing + footers, compute = tasks reading,
computing and uploading their parts, commit = claim, server-side copies,
manifest) and, as the floor the issue asks about, the time to move the
same bytes through the same client alone (read every input object whole,
write the output's bytes once; measured once a round, median).

Round trips one after another, per phase: the S3 job again through a proxy
that delays every request by --delay seconds (requests in flight at once are
delayed at once), tasks one at a time (scheduler "sync"), against the same
job through the proxy undelayed; a phase's extra time over the delay is how
many of its round trips wait for one another (tasks: per task).

    python scripts/bench_stores.py --tree /work/main   # another checkout's fastkl, this bench and test server
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

HERE = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# the fastkl of this tree (or of --tree), here and in the processes started from here (not an installed one)
ROOT = os.path.abspath(sys.argv[sys.argv.index("--tree") + 1]) if "--tree" in sys.argv[:-1] else HERE
sys.path[:0] = [ROOT, os.path.join(HERE, "tests")]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
import s3server  # noqa: E402


def make_data(root: str, files: int, rows: int, k: int) -> int:
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    total = 0
    for i in range(files):
        p = rng.dirichlet(np.ones(k), rows).astype(np.float32)
        q = rng.dirichlet(np.ones(k), rows).astype(np.float32)
        t = pa.table({"id": np.arange(i * rows, (i + 1) * rows),
                      "p": pa.FixedSizeListArray.from_arrays(pa.array(p.ravel()), k),
                      "q": pa.FixedSizeListArray.from_arrays(pa.array(q.ravel()), k)})
        path = os.path.join(root, f"shard-{i:03d}.parquet")
        pq.write_table(t, path, row_group_size=rows // 4)
        total += os.path.getsize(path)
    return total


def floor(fs: pafs.FileSystem, bucket: str, out_bytes: int) -> tuple[float, float]:
    """Seconds to read every input object whole, and to write out_bytes once, through pyarrow's S3 client."""
    t0 = time.perf_counter()
    for info in fs.get_file_info(pafs.FileSelector(f"{bucket}/shards")):
        with fs.open_input_file(info.path) as f:
            f.read()
    t1 = time.perf_counter()
    with fs.open_output_stream(f"{bucket}/floor/blob") as f:
        f.write(b"\0" * out_bytes)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delay", type=float, default=0.2, help="seconds added to each request to count round trips "
                    "one after another (0: not counted)")
    ap.add_argument("--tree", default=HERE, help="the checkout whose fastkl is measured (default: this one)")
    a = ap.parse_args()

    server, endpoint = s3server.start_process()  # its own process: the server's Python does not share our GIL
    os.environ.update(s3server.environment(endpoint))
    import fastkl
    from fastkl.io.stores import resolve

    work = tempfile.mkdtemp(prefix="fastkl-bench-stores-")
    try:
        src = os.path.join(work, "shards")
        nbytes = make_data(src, a.files, a.rows, a.k)
        s3server.make_bucket("bench")
        fs = resolve("s3://bench/x")[0].fs
        pafs.copy_files(src, "bench/shards", destination_filesystem=fs)
        opts = dict(keep=("id",), measures=("kl", "js"), quiet=True, overwrite=True)

        def local():
            return fastkl.run(src, os.path.join(work, "out"), **opts)

        def store():
            return fastkl.run("s3://bench/shards/", "s3://bench/out", **opts)

        times: dict[str, list[float]] = {"local": [], "s3": []}
        phases: dict[str, list[dict]] = {"local": [], "s3": []}
        local(), store()  # warm: JIT, clients, connections
        out_bytes = sum(os.path.getsize(os.path.join(work, "out", n)) for n in os.listdir(os.path.join(work, "out"))
                        if n.endswith(".parquet"))
        floors = []  # the transfer floor, once a round beside the jobs (one measurement swings 2x on a loaded machine)
        for r in range(a.rounds):
            for name, fn in ((("local", local), ("s3", store)) if r % 2 == 0 else (("s3", store), ("local", local))):
                t0 = time.perf_counter()
                s = fn()
                times[name].append(time.perf_counter() - t0)
                phases[name].append(s.timings)
            floors.append(floor(fs, "bench", out_bytes))
        rd, wr = (statistics.median(f[i] for f in floors) for i in (0, 1))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"data: {a.files} files x {a.rows} rows x {a.k} float32 per side, {nbytes / 1e6:.1f} MB in, "
              f"{out_bytes / 1e6:.2f} MB out; {a.rounds} rounds, medians")
        print(f"CPU: {_cpu()}, {os.cpu_count()} logical cores")
        for name in ("local", "s3"):
            ph = {k: statistics.median(p[k] for p in phases[name]) for k in ("plan_s", "compute_s", "total_s")}
            print(f"  {name:5s}: {med[name]:6.3f} s  (plan {ph['plan_s']:.3f}, tasks {ph['compute_s']:.3f}, "
                  f"commit + rest {med[name] - ph['plan_s'] - ph['compute_s']:.3f})")
        print(f"  ratio s3/local: {med['s3'] / med['local']:.2f}")
        print(f"  transfer floor on this server: read {nbytes / 1e6:.1f} MB in {rd:.3f} s "
              f"({nbytes / 1e6 / rd:.0f} MB/s), write {out_bytes / 1e6:.2f} MB in {wr:.3f} s")
        proxy = s3server.FaultProxy(endpoint)  # counts the requests of one more run (not timed)
        marks = _mark_phases(proxy)
        fastkl.run("s3://bench/shards/", "s3://bench/out", storage_options={"endpoint_url": proxy.url}, **opts)
        proxy.close()
        calls = ", ".join(f"{m} {n}" for m, n in sorted(proxy.by_method.items()))
        print(f"  requests of one S3 job: {proxy.seen} ({calls})")
        for phase, counts in _per_phase(proxy.log, marks).items():
            print(f"    {phase:6s} {sum(counts.values()):4d}: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
        extra = med["s3"] - med["local"]
        print(f"  the store adds {extra:.3f} s; the bytes' transfer alone takes {rd + wr:.3f} s "
              f"(extra / transfer = {extra / (rd + wr):.2f})")
        if a.delay > 0:
            _round_trips(fastkl, endpoint, opts, a.delay)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.kill()


def _round_trips(fastkl, endpoint: str, opts: dict, delay: float, runs: int = 2) -> None:
    """Round trips one after another per phase: (phase time delayed - undelayed) / delay, medians."""
    proxy = s3server.FaultProxy(endpoint)
    src = "s3://bench/shards/"
    tasks = fastkl.run(src, "s3://bench/out", dry_run=True, **opts).tasks
    times: dict[float, list[tuple[float, float, float]]] = {0.0: [], delay: []}
    try:
        for r in range(runs):
            for d in ((0.0, delay) if r % 2 == 0 else (delay, 0.0)):
                proxy.delay_s = d
                t0 = time.perf_counter()
                s = fastkl.run(src, "s3://bench/out", scheduler="sync", storage_options={"endpoint_url": proxy.url},
                               **opts)
                wall = time.perf_counter() - t0
                tm = s.timings
                times[d].append((tm["plan_s"], tm["compute_s"], wall - tm["plan_s"] - tm["compute_s"]))
    finally:
        proxy.close()
    med = {d: [statistics.median(t[i] for t in v) for i in range(3)] for d, v in times.items()}
    turns = [(med[delay][i] - med[0.0][i]) / delay for i in range(3)]
    print(f"  round trips one after another ({delay * 1000:.0f} ms per request, tasks one at a time, "
          f"{runs} runs each, medians): before the tasks {turns[0]:.1f}, per task {turns[1] / max(1, tasks):.1f} "
          f"({tasks} tasks), commit {turns[2]:.1f}")


def _mark_phases(proxy) -> list[int]:
    """Where the job's tasks start and end in the proxy's log (fastkl.jobs.run._run_tasks wrapped)."""
    import fastkl.jobs.run as job

    marks: list[int] = []
    real = job._run_tasks

    def wrapped(*a, **k):
        marks.append(len(proxy.log))
        try:
            return real(*a, **k)
        finally:
            marks.append(len(proxy.log))

    job._run_tasks = wrapped
    return marks


def _kind(method: str, path: str) -> str:
    """What a request does, from its method and path (S3's REST API)."""
    key, _, query = path.partition("?")
    if "list-type" in query or "uploads" == query.split("&")[0] and method == "GET":
        return "list"
    if "uploadId" in query or query.startswith("uploads"):
        return "multipart"
    where = ("source" if "/shards/" in key else "claim" if "_fastkl-claim" in key else "probe" if "probe" in key
             else "staging" if "_fastkl-staging" in key else "manifest" if key.endswith("_fastkl.json") else "dest")
    return f"{method} {where}"


def _per_phase(log: list[tuple[str, str]], marks: list[int]) -> dict[str, dict[str, int]]:
    a, b = (marks + [len(log), len(log)])[:2]
    out: dict[str, dict[str, int]] = {}
    for phase, part in (("plan", log[:a]), ("tasks", log[a:b]), ("commit", log[b:])):
        counts: dict[str, int] = {}
        for method, path in part:
            k = _kind(method, path)
            counts[k] = counts.get(k, 0) + 1
        out[phase] = counts
    return out


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
