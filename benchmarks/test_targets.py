"""The performance targets, as ratios of medians measured side by side (see conftest.py).

Each fixture times a set of cases in turn in this process, warm, with the
order rotating every round; each test asserts one ratio and adds a line to
the table printed at the end of the session. Run with `-k targets`.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastkl
from fastkl.bench import throughput as B

SEVERAL = ("kl", "reverse_kl", "js", "entropy")


@pytest.fixture(scope="module")
def kernel_times(data, rounds, threads, max_load):
    p, q = data["p"], data["q"]
    cases = {
        "stream_vec": lambda: B.stream(p, q, threads, True),
        "stream_scalar": lambda: B.stream(p, q, threads, False),
        "kl": lambda: fastkl.kl(p, q, threads=threads),
        "kl_1thread": lambda: fastkl.kl(p, q, threads=1),
        "logprobs": lambda: fastkl.kl(data["lp"], data["lq"], kind="logprobs", threads=threads),
        "logits": lambda: fastkl.kl(data["xp"], data["xq"], kind="logits", threads=threads),
        "several": lambda: fastkl.divergences(p, q, measures=SEVERAL, threads=threads),
        "numpy": lambda: B.numpy_kl(p, q),
    }
    avail = B.peers_available()
    if avail["scipy"]:
        cases["scipy"] = lambda: B.scipy_kl(p, q)
    if avail["polars"]:
        df = B.polars_frame(p, q)
        cases["polars"] = lambda: B.polars_kl(df)
    return B.alternate(cases, rounds=rounds, max_load=max_load)


@pytest.fixture(scope="module")
def half_times(data, rounds, threads, max_load):
    cases = B.half_cases(data["p"], data["q"], threads)
    return B.alternate({n: fn for n, (fn, _) in cases.items()}, rounds=rounds, max_load=max_load)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_throughput(half_times, record_target, half):
    """Half precision decoded in the kernel reads half the bytes: at least float32's rows/s."""
    t = half_times
    name = next(n for n in t if f" {half} " in n)
    r = B.ratio(t["fastkl kl, float32 probs"], t[name])
    record_target(f"kernel: kl rows/s, {half} / float32", r, "{:.2f}", ">= 1.0", r >= 1.0)
    assert r >= 1.0


def gels(data, seconds):
    return data["elements"] / seconds / 1e9


def test_kl_vs_streaming_limit(kernel_times, data, record_target):
    t = kernel_times
    k, lim, scalar = t["kl"].median, t["stream_vec"].median, t["stream_scalar"].median
    frac = 1 / B.ratio(t["kl"], t["stream_vec"])
    record_target(f"kernel: kl {gels(data, k):.2f} G el/s vs streaming limit {gels(data, lim):.2f} (vectorised)",
                  frac, "{:.0%}", ">= 60%", frac >= 0.6)
    record_target(f"kernel: kl vs scalar streaming loop {gels(data, scalar):.2f} G el/s (info)",
                  1 / B.ratio(t["kl"], t["stream_scalar"]), "{:.0%}", "-", True)
    assert frac >= 0.6, f"fastkl.kl runs at {frac:.0%} of the streaming limit"


@pytest.mark.parametrize("peer, goal", [("scipy", 10.0), ("numpy", 4.0), ("polars", 4.0)])
def test_kl_vs_peer(kernel_times, record_target, peer, goal):
    if peer not in kernel_times:
        pytest.skip(f"{peer} is not installed")
    r = B.ratio(kernel_times[peer], kernel_times["kl"])
    record_target(f"kernel: {peer} / fastkl.kl", r, "{:.1f}x", f">= {goal:g}x", r >= goal)
    assert r >= goal


@pytest.mark.parametrize("kind", ["logprobs", "logits"])
def test_encodings_throughput(kernel_times, record_target, kind):
    r = B.ratio(kernel_times["kl"], kernel_times[kind])
    record_target(f"kernel: {kind} throughput / probs", r, "{:.2f}", ">= 0.5", r >= 0.5)
    assert r >= 0.5


def test_several_measures_one_pass(kernel_times, record_target):
    r = B.ratio(kernel_times["several"], kernel_times["kl"])
    record_target(f"kernel: {'+'.join(SEVERAL)} / kl", r, "{:.2f}x", "< 1.5x", r < 1.5)
    assert r < 1.5


def test_threads_scale(kernel_times, threads, record_target):
    if threads < 2:
        pytest.skip("one core")
    r = B.ratio(kernel_times["kl_1thread"], kernel_times["kl"])
    record_target(f"kernel: speed-up 1 -> {threads} threads", r, "{:.2f}x", "> 1", r > 1.1)
    assert r > 1.1


def test_size_flat(data, rounds, threads, max_load, record_target):
    n = data["rows"]
    sizes = {"1/4": n // 4, "1": n, "2": 2 * n}
    arrays = {k: (np.concatenate([data["p"]] * 2)[:m], np.concatenate([data["q"]] * 2)[:m]) for k, m in sizes.items()}
    cases = {k: (lambda a=arrays[k]: fastkl.kl(a[0], a[1], threads=threads)) for k in sizes}
    t = B.alternate(cases, rounds=rounds, max_load=max_load)
    rates = [sizes[k] / t[k].median for k in sizes]
    r = max(rates) / min(rates)
    record_target("kernel: max/min rows/s over 1/4x..2x rows", r, "{:.2f}x", "<= 1.25x", r <= 1.25)
    assert r <= 1.25


# ------------------------------------------------------------------- jobs


@pytest.fixture(scope="module")
def job_times(job_file, rows, rounds, max_load, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("jobs"))
    result = np.random.default_rng(1).random(rows)
    paths = {n: os.path.join(out, n) for n in ("floor", "streamed", "fastkl", "duckdb", "polars")}
    cases = {
        "floor": lambda: B.io_floor(job_file, paths["floor"], result),
        "streamed": lambda: B.io_floor_streamed(job_file, paths["streamed"], result),
        "fastkl": lambda: B.fastkl_job(job_file, paths["fastkl"]),
    }
    avail = B.peers_available()
    if avail["duckdb"]:
        import duckdb

        con = duckdb.connect()
        cases["duckdb"] = lambda: B.duckdb_job(con, job_file, paths["duckdb"])
    if avail["polars"]:
        cases["polars"] = lambda: B.polars_job(job_file, paths["polars"])
    return B.alternate(cases, rounds=rounds, before=lambda n: B.remove(paths[n]), max_load=max_load)


def test_job_vs_io_floor(job_times, record_target):
    r = B.ratio(job_times["fastkl"], job_times["floor"])
    record_target("job: fastkl.run / I/O floor (read_table + write)", r, "{:.2f}x", "<= 1.15x", r <= 1.15)
    s = B.ratio(job_times["fastkl"], job_times["streamed"])
    record_target("job: fastkl.run / streamed read + write (info)", s, "{:.2f}x", "-", True)
    assert r <= 1.15


@pytest.mark.parametrize("peer, goal", [("duckdb", 2.5), ("polars", 3.0)])
def test_job_vs_peer(job_times, record_target, peer, goal):
    if peer not in job_times:
        pytest.skip(f"{peer} is not installed")
    r = B.ratio(job_times[peer], job_times["fastkl"])
    record_target(f"job: {peer} / fastkl.run", r, "{:.2f}x", f">= {goal:g}x", r >= goal)
    assert r >= goal


def test_job_local_cluster(job_file, rounds, max_load, tmp_path_factory, record_target):
    """On a running LocalCluster of 2 worker processes (the target), and with
    scheduler="processes", which starts and stops a cluster inside the job (info)."""
    out = str(tmp_path_factory.mktemp("cluster"))
    paths = {n: os.path.join(out, n) for n in ("threads", "cluster", "processes")}
    with B.local_cluster(2) as client:
        cases = {
            "threads": lambda: B.fastkl_job(job_file, paths["threads"]),
            "cluster": lambda: B.fastkl_job(job_file, paths["cluster"], scheduler=client),
            "processes": lambda: B.fastkl_job(job_file, paths["processes"], scheduler="processes", workers=2),
        }
        def before(name):  # the workers are other processes: wait for quiet instead of judging rounds
            B.remove(paths[name])
            if max_load is not None:
                B.wait_quiet(max_load)

        t = B.alternate(cases, rounds=max(3, rounds // 2), before=before)
    r = B.ratio(t["cluster"], t["threads"])
    s = B.ratio(t["processes"], t["threads"])
    record_target("job: LocalCluster(2 processes) / local default", r, "{:.2f}x", "<= 1.5x", r <= 1.5)
    record_target('job: scheduler="processes" (cluster start-up included) / default (info)', s, "{:.2f}x", "-", True)
    assert r <= 1.5


def test_startup(data_dir, max_load, record_target):
    warm, cold = B.startup(data_dir, warm_rounds=5, cold_rounds=2, max_load=max_load)
    w, c = float(np.median(warm)), float(np.median(cold))
    record_target("start-up: warm `fastkl run` on a tiny file", w, "{:.2f} s", "< 2 s", w < 2)
    record_target("start-up: cold (empty JIT cache)", c, "{:.2f} s", "< 10 s", c < 10)
    assert w < 2 and c < 10
