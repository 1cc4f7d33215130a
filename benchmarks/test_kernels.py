"""Kernel throughput, one pytest-benchmark timing per case (see conftest.py).

Groups: fastkl kl against the streaming limit and the peers; encodings;
several measures; threads; data size. `extra_info` holds G elements/s and
GB/s (float32 p and q buffers) so the JSON output carries throughputs.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastkl
from fastkl.bench import throughput as B


def run(benchmark, fn, data, rounds, rows=None):
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    rows = rows or data["rows"]
    elements = rows * data["p"].shape[1]
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(
        rows=rows, elements=elements, G_elements_per_s=elements / med / 1e9, GB_per_s=2 * 4 * elements / med / 1e9
    )


KL_CASES = ["streaming limit (vectorised)", "streaming (scalar, no reassoc)", "fastkl.kl",
            "scipy rel_entr", "numpy expression", "polars list expression", "duckdb SQL"]


@pytest.mark.benchmark(group="kl: fastkl vs streaming limit vs peers")
@pytest.mark.parametrize("case", KL_CASES)
def test_kl(benchmark, request, data, rounds, threads, case):
    p, q = data["p"], data["q"]
    if case == "streaming limit (vectorised)":
        fn = lambda: B.stream(p, q, threads, vectorised=True)
    elif case == "streaming (scalar, no reassoc)":
        fn = lambda: B.stream(p, q, threads, vectorised=False)
    elif case == "fastkl.kl":
        fn = lambda: fastkl.kl(p, q, threads=threads)
    elif case == "scipy rel_entr":
        pytest.importorskip("scipy")
        fn = lambda: B.scipy_kl(p, q)
        rounds = min(rounds, 3)  # ~1 s a call
    elif case == "numpy expression":
        fn = lambda: B.numpy_kl(p, q)
    elif case == "polars list expression":
        df = request.getfixturevalue("polars_df")
        fn = lambda: B.polars_kl(df)
    else:
        fn = request.getfixturevalue("duckdb_kl")
        rounds = min(rounds, 3)
    run(benchmark, fn, data, rounds)


@pytest.mark.benchmark(group="kl: encodings")
@pytest.mark.parametrize("kind", ["probs", "logprobs", "logits"])
def test_encodings(benchmark, data, rounds, threads, kind):
    a, b = {"probs": ("p", "q"), "logprobs": ("lp", "lq"), "logits": ("xp", "xq")}[kind]
    x, y = data[a], data[b]
    run(benchmark, lambda: fastkl.kl(x, y, kind=kind, threads=threads), data, rounds)


@pytest.mark.benchmark(group="kl: float16 and bfloat16 vs float32 (same rows)")
@pytest.mark.parametrize("case", ["float32", "float16", "bfloat16"])
def test_half_precision(benchmark, data, rounds, threads, case):
    cases = B.half_cases(data["p"], data["q"], threads)
    name = next(n for n in cases if f" {case} " in n)
    fn, nbytes = cases[name]
    run(benchmark, fn, data, rounds)
    benchmark.extra_info["GB_per_s"] = nbytes / benchmark.stats.stats.median / 1e9  # bytes of this dtype


MEASURE_SETS = {
    "kl": ("kl",),
    "kl+reverse_kl+js+entropy": ("kl", "reverse_kl", "js", "entropy"),
    "all 8": fastkl.MEASURES,
}


@pytest.mark.benchmark(group="measures in one pass")
@pytest.mark.parametrize("name", list(MEASURE_SETS))
def test_measures(benchmark, data, rounds, threads, name):
    p, q = data["p"], data["q"]
    ms = MEASURE_SETS[name]
    run(benchmark, lambda: fastkl.divergences(p, q, measures=ms, threads=threads), data, rounds)


@pytest.mark.benchmark(group="threads")
@pytest.mark.parametrize("case", ["fastkl.kl", "streaming limit (vectorised)"])
@pytest.mark.parametrize("n", [1, "all"])
def test_threads(benchmark, data, rounds, threads, case, n):
    p, q = data["p"], data["q"]
    t = threads if n == "all" else n
    if case == "fastkl.kl":
        fn = lambda: fastkl.kl(p, q, threads=t)
    else:
        fn = lambda: B.stream(p, q, t, vectorised=True)
    run(benchmark, fn, data, rounds)


@pytest.mark.benchmark(group="data size (rows/s should stay flat)")
@pytest.mark.parametrize("scale", [0.25, 1, 2])
def test_size(benchmark, data, rounds, threads, scale):
    n = max(1, int(data["rows"] * scale))
    reps = -(-n // data["rows"])
    p = np.concatenate([data["p"]] * reps)[:n] if reps > 1 else data["p"][:n]
    q = np.concatenate([data["q"]] * reps)[:n] if reps > 1 else data["q"][:n]
    run(benchmark, lambda: fastkl.kl(p, q, threads=threads), data, rounds, rows=n)
