"""Dense sequence rows against the same positions as flat token rows (issue 10 target: >= 0.9).

    python benchmarks/sequences.py [--sequences 4000] [--positions 32] [--k 256]

Prints positions/s of each layout (best of 5 runs, all threads) and their ratio,
with the CPU named: figures from different machines do not compare.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import pyarrow as pa

import fastkl


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best(fn, repeat: int = 5) -> float:
    fn()  # compile / warm the caches
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=4000)
    ap.add_argument("--positions", type=int, default=32)
    ap.add_argument("--k", type=int, default=256)
    a = ap.parse_args()
    n, t, k = a.sequences, a.positions, a.k
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(k), size=n * t).astype(np.float32)
    Q = rng.dirichlet(np.ones(k), size=n * t).astype(np.float32)
    flat_p = pa.FixedSizeListArray.from_arrays(pa.array(P.reshape(-1)), k)
    flat_q = pa.FixedSizeListArray.from_arrays(pa.array(Q.reshape(-1)), k)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * t)
    seq_p = pa.ListArray.from_arrays(offsets, flat_p)
    seq_q = pa.ListArray.from_arrays(offsets, flat_q)
    mask = pa.ListArray.from_arrays(offsets, pa.array(rng.random(n * t) < 0.9))
    positions = n * t
    cases = {
        "token rows": lambda: fastkl.kl(flat_p, flat_q),
        "sequence rows": lambda: fastkl.kl(seq_p, seq_q),
        "sequence rows + mask": lambda: fastkl.kl(seq_p, seq_q, mask=mask),
    }
    print(f"CPU: {cpu_name()}; {n} sequences x {t} positions x K={k} float32, kl, all threads")
    rates = {}
    for name, fn in cases.items():
        rates[name] = positions / best(fn)
        print(f"  {name:<22} {rates[name]:>14,.0f} positions/s")
    for name in ("sequence rows", "sequence rows + mask"):
        print(f"  ratio {name} / token rows: {rates[name] / rates['token rows']:.2f}")


if __name__ == "__main__":
    main()
