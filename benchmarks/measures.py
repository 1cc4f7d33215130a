"""Each measure alone, and kl+reverse_kl+js+entropy, over kl alone, for every encoding (issue 13's "no cliff").

    python benchmarks/measures.py [--rows 20000] [--k 256] [--rounds 5]

Float32 rows (softmax of noisy logits, their log-probabilities, the logits),
one thread, times as the calling thread's CPU time (best of --rounds), so that
other processes on a shared machine weigh little; each measure is a ratio
to kl on the same rows and encoding. Target: each ≤ 2x kl, the four ≤ 1.6x.
"""

from __future__ import annotations

import argparse
import time

import fastkl
from fastkl.bench import throughput as B

MEASURES = ("reverse_kl", "jeffreys", "js", "entropy", "cross_entropy", "tv", "hellinger", "gjs", "renyi",
            "bhattacharyya")
SEVERAL = ("kl", "reverse_kl", "js", "entropy")


def cpu_time(fn, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    p, q, xp, xq = B.softmax_rows(args.rows, args.k)
    encodings = {"probs": (p, q), "logprobs": (B.log_probs(p), B.log_probs(q)), "logits": (xp, xq)}
    print(f"machine: {B.machine()}")
    print(f"{args.rows:,} rows x {args.k} float32, one thread, CPU time, best of {args.rounds}; each over kl alone "
          "(renyi: alpha = 0.5; gjs: beta = 0.5)")
    for kind, (a, b) in encodings.items():
        def run(measures):
            extra = {"alpha": 0.5} if "renyi" in measures else {}
            return cpu_time(lambda: fastkl.divergences(a, b, measures=measures, kind=kind, threads=1, **extra),
                            args.rounds)
        base = run(("kl",))
        cells = [f"{m} {run((m,)) / base:.2f}" for m in MEASURES]
        print(f"{kind:9s} kl {base * 1e3:.1f} ms | " + ", ".join(cells) + f" | four {run(SEVERAL) / base:.2f}")


if __name__ == "__main__":
    main()
