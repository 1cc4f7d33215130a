"""RLHF estimators k1+k2+k3 from sampled-token log-probs against the streaming limit (issue 11 target: >= 0.5).

    python benchmarks/sampled.py [--sequences 10000] [--positions 1000] [--rounds 7] [--max-load 0.1]

The data is what a rollout table holds: per sequence, the policy's and the
reference's log-prob of each sampled token (float32 list columns, no mask).
The streaming limit is measured in this process over the same two buffers
(`fastkl.bench.throughput.stream`: a vectorised Numba sum of p and q per
sequence, split over the same threads), so the ratio compares fastkl with the
cost of reading its input once. Cases take turns every round and each ratio is
the median over rounds of the ratio within a round (a shared machine's load
weighs on both sides); on a shared machine, --max-load waits for other processes
to calm down before each round. Prints positions/s, the ratios, the share of the
machine other processes used meanwhile and the CPU: figures from different
machines do not compare.
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa

import fastkl
from fastkl.bench import throughput as B

MEASURES = ["k1", "k2", "k3"]


def rollouts(n: int, t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(policy, reference) log-probs, n x t float32: the reference a noisy copy of the policy."""
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, (n, t)).astype(np.float32)
    lq = np.minimum(lp + rng.normal(0.0, 0.3, (n, t)).astype(np.float32), 0.0).astype(np.float32)
    return lp, lq


def list_column(x: np.ndarray) -> pa.Array:
    """A list<float32> column over x's buffer (zero-copy)."""
    n, t = x.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * t), pa.array(x.reshape(-1)))


def cases(lp: np.ndarray, lq: np.ndarray, threads: int) -> dict[str, object]:
    p, q = list_column(lp), list_column(lq)
    flat_p, flat_q = lp.reshape(-1), lq.reshape(-1)
    return {
        "stream": lambda: B.stream(lp, lq, threads=threads),
        "sequence rows": lambda: fastkl.divergences(p, q, MEASURES, kind="sampled", threads=threads),
        "token rows": lambda: fastkl.divergences(flat_p, flat_q, MEASURES, kind="sampled", threads=threads),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=10_000)
    ap.add_argument("--positions", type=int, default=1_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--max-load", type=float, default=None,
                    help="start a round only when other processes use less than this share of the CPU")
    a = ap.parse_args()
    n, t = a.sequences, a.positions
    lp, lq = rollouts(n, t)
    B.warm_stream(np.float32)
    positions = n * t
    print(f"CPU: {B.machine()}")
    print(f"{n:,} sequences x {t:,} positions, float32 policy and reference log-probs, {'+'.join(MEASURES)}")
    rates: dict[int, dict[str, float]] = {}
    for threads in (1, 2):
        got = B.alternate(cases(lp, lq, threads), rounds=a.rounds, max_load=a.max_load)
        rates[threads] = {name: positions / tm.median for name, tm in got.items()}
        loads = [tm.load for tm in got.values() if tm.load == tm.load]
        busy = f" (other processes used {max(loads):.0%} of the machine)" if loads else ""
        print(f"{threads} thread{'s' if threads > 1 else ''}{busy}:")
        for name, tm in got.items():
            ratio = "" if name == "stream" else f"   {B.ratio(got['stream'], tm):.3f} of the streaming limit"
            print(f"  {name:<14} {positions / tm.median:>16,.0f} positions/s{ratio}")
    for name in ("stream", "sequence rows", "token rows"):
        print(f"2 threads / 1 thread, {name}: {rates[2][name] / rates[1][name]:.2f}x")
    print("issue 11 target: sequence rows >= 0.5 of the streaming limit")


if __name__ == "__main__":
    main()
