"""What gjs, renyi and bhattacharyya add to kl, against what js adds (issue 11 target:
kl + gjs and kl + renyi cost no more than kl + js), on dense rows of each encoding.

    python benchmarks/generalised.py [--rows 100000] [--k 256] [--threads 1]

Prints the time of each measure set (best of 5, in one process) and its ratio to
kl alone and to kl + js, with the CPU named: figures from different machines do
not compare.
"""

from __future__ import annotations

import argparse

import numpy as np

import fastkl
from sequences import best, cpu_name

SETS = (("kl",), ("kl", "js"), ("kl", "gjs"), ("kl", "renyi"), ("kl", "bhattacharyya"), ("kl", "hellinger"),
        ("js",), ("gjs",), ("renyi",), ("bhattacharyya",))


def rows(kind: str, n: int, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    p = rng.dirichlet(np.ones(k), size=n)
    q = 0.7 * p + 0.3 * rng.dirichlet(np.ones(k), size=n)  # a student near its teacher
    if kind == "probs":
        return p.astype(np.float32), q.astype(np.float32)
    lp, lq = np.log(p).astype(np.float32), np.log(q).astype(np.float32)
    return (lp, lq) if kind == "logprobs" else (lp + 3.0, lq - 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kinds", default="probs,logprobs,logits")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"CPU: {cpu_name()}; {args.rows} x {args.k} float32 rows; threads {args.threads or 'all'}")
    for kind in args.kinds.split(","):
        p, q = rows(kind, args.rows, args.k, rng)
        times = {}
        for ms in SETS:
            params = {**({"alpha": 0.5} if "renyi" in ms else {}), **({"beta": 0.3} if "gjs" in ms else {})}
            times[ms] = best(lambda: fastkl.divergences(p, q, measures=ms, kind=kind, threads=args.threads,
                                                        **params))
        base, with_js = times[("kl",)], times[("kl", "js")]
        print(f"\n{kind}:")
        for ms, t in times.items():
            print(f"  {'+'.join(ms):20s} {t * 1e3:8.1f} ms  {t / base:5.2f}x kl  {t / with_js:5.2f}x kl+js")


if __name__ == "__main__":
    main()
