"""Throughput of the sparse top-k kernel (fastkl/kernels/sparse.py); a script, not a test.

    python benchmarks/sparse_kernel.py [--positions N] [--merge]

Rows: k = 32 on both sides, V = 32,000, float32 log-probs; teacher P Zipf-like
(exponent 1.0-1.3), student Q Zipf-like with another exponent, whose top-k
shares 28 of P's ids in a locally shuffled order and has 4 of its own. Printed:
positions/s of fastkl on 1,000,000 positions (1 thread, all threads) for kl
alone and all eight measures, with want_bounds = 0 and 1 (ratio; target <= 2x);
a NumPy baseline that scatters both sides into dense V-wide rows (unlisted mass
spread evenly: tail="uniform") and computes dense KL on 2,000 positions, and
the speed ratio (target >= 50x); the CPU. With --merge: hash merge against the
sort-merge variant at k = 32 and 128.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fastkl import _registry
from fastkl.kernels import sparse as sk

V = 32_000
LOGPROBS = _registry.KIND_CODE["logprobs"]
UNIFORM = _registry.TAILS.index("uniform")
BUCKET = _registry.TAILS.index("bucket")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def zipf_tops(k: int, n_exponents: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Top-k probabilities of Zipf-like distributions over V ids, one row per exponent."""
    s = np.linspace(1.0, 1.3, n_exponents)
    ranks = np.arange(1, V + 1, dtype=np.float64)
    tops = np.empty((n_exponents, k))
    for i, e in enumerate(s):
        w = ranks ** -e
        tops[i] = w[:k] / w.sum()
    return s, tops


def make_rows(n: int, k: int = 32, seed: int = 0):
    """(p_ids, p_logprobs, q_ids, q_logprobs) as (n, k) arrays."""
    rng = np.random.default_rng(seed)
    _, tops = zipf_tops(k)
    base = rng.integers(0, V, n)[:, None]
    stride = 997  # coprime with 32,000: base + j·stride mod V are distinct for j < V
    j = np.arange(k + 4)
    all_ids = ((base + j * stride) % V).astype(np.int32)
    p_ids = all_ids[:, :k]
    # the student keeps P's first k-4 ids in a locally shuffled order, and 4 ids of its own
    q_ids = np.concatenate([all_ids[:, :k - 4], all_ids[:, k:k + 4]], axis=1)
    perms = np.array([np.argsort(np.arange(k) + rng.normal(0, 2.0, k)) for _ in range(16)])
    q_ids = np.take_along_axis(q_ids, perms[rng.integers(0, 16, n)], axis=1)
    ti = rng.integers(0, len(tops), n)
    qi = (ti + rng.integers(1, 8, n)) % len(tops)
    p_vals = np.log(tops[ti]).astype(np.float32)
    q_vals = np.log(tops[qi]).astype(np.float32)
    return p_ids, p_vals, q_ids, q_vals


class Buffers:
    def __init__(self, p_ids, p_vals, q_ids, q_vals):
        n, k = p_ids.shape
        self.n = n
        self.offsets = np.arange(0, (n + 1) * k, k, dtype=np.int64)
        self.q_offsets = np.arange(0, (n + 1) * q_ids.shape[1], q_ids.shape[1], dtype=np.int64)
        self.p_ids = p_ids.ravel()
        self.p_vals = p_vals.ravel()
        self.q_ids = q_ids.ravel()
        self.q_vals = q_vals.ravel()
        self.mask = np.zeros(0, np.uint8)
        self.pre = np.zeros(n, np.uint8)

    def call(self, measures, want_bounds, tail, start, stop, out, lower, upper, listed, status, slots,
             kernel=sk.sparse_rows):
        kernel(self.offsets, self.offsets, self.p_ids, self.p_vals, self.mask, 0, False, 0,
               self.q_offsets, self.q_offsets, self.q_ids, self.q_vals, self.mask, 0, False, 0,
               self.pre, True, LOGPROBS, LOGPROBS, V, tail, want_bounds, 1e-4, 1.0, 0.5, 0.0,
               slots, out, lower, upper, listed, status, start, stop)


def run(buf: Buffers, measures, want_bounds: bool, threads: int, tail=BUCKET, kernel=sk.sparse_rows,
        block: int = 16_384) -> float:
    """Seconds for all positions, blocks spread over `threads` Python threads."""
    slots = np.full(sk.N_MEASURES, -1, np.int64)
    for j, m in enumerate(measures):
        slots[_registry.MEASURE_INDEX[m]] = j
    shape = (len(measures), buf.n)
    # outputs touched before the clock starts: page faults are the allocator's cost, not the kernel's
    out = np.zeros(shape)
    lower = np.zeros(shape)
    upper = np.zeros(shape)
    listed = np.zeros((2, buf.n))
    status = np.zeros(buf.n, np.uint8)
    blocks = [(s, min(s + block, buf.n)) for s in range(0, buf.n, block)]

    def work(b):
        buf.call(measures, want_bounds, tail, b[0], b[1], out, lower, upper, listed, status, slots, kernel)

    t0 = time.perf_counter()
    if threads == 1:
        for b in blocks:
            work(b)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, blocks))
    dt = time.perf_counter() - t0
    assert (status == 0).all(), np.bincount(status)
    return dt


def numpy_baseline(p_ids, p_vals, q_ids, q_vals) -> float:
    """Seconds for dense KL after scattering both sides into V-wide float64 rows."""
    t0 = time.perf_counter()
    n, k = p_ids.shape
    rows = np.arange(n)[:, None]
    P = np.empty((n, V))
    Q = np.empty((n, V))
    pv = np.exp(p_vals.astype(np.float64))
    qv = np.exp(q_vals.astype(np.float64))
    P[:] = ((1.0 - pv.sum(1)) / (V - k))[:, None]
    Q[:] = ((1.0 - qv.sum(1)) / (V - q_ids.shape[1]))[:, None]
    P[rows, p_ids] = pv
    Q[rows, q_ids] = qv
    kl = np.sum(P * (np.log(P) - np.log(Q)), axis=1)
    dt = time.perf_counter() - t0
    assert np.isfinite(kl).all()
    return dt


def best(fn, repeat: int = 3) -> float:
    return min(fn() for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=1_000_000)
    ap.add_argument("--merge", action="store_true", help="also time hash merge vs sort-merge")
    args = ap.parse_args()
    n = args.positions
    threads = os.cpu_count() or 1
    print(f"CPU: {cpu_name()}  ({threads} logical CPUs)")
    print(f"rows: {n:,} positions, k = 32 both sides, V = {V:,}, float32 log-probs")
    rows = make_rows(n)
    buf = Buffers(*rows)
    small = Buffers(*(a[:2000] for a in rows))
    for m in (("kl",), _registry.MEASURES[:8]):  # compile (cached on disk after the first run)
        run(small, m, False, 1)
        run(small, m, True, 1)
    run(small, ("kl",), False, 1, tail=UNIFORM)
    print(f"{'measures':<10} {'bounds':>6} {'1 thread pos/s':>16} {f'{threads} threads pos/s':>18}")
    rates = {}
    for name, measures in (("kl", ("kl",)), ("all 8", _registry.MEASURES[:8])):
        for wb in (False, True):
            t1 = best(lambda: run(buf, measures, wb, 1), 2)
            tn = best(lambda: run(buf, measures, wb, threads), 2)
            rates[name, wb] = (n / t1, n / tn)
            print(f"{name:<10} {int(wb):>6} {n / t1:>16,.0f} {n / tn:>18,.0f}")
    for name in ("kl", "all 8"):
        r = rates[name, False][0] / rates[name, True][0]
        print(f"bounds cost ({name}, 1 thread): {r:.2f}x the estimate alone (target <= 2x)")
    t_np = best(lambda: numpy_baseline(*(a[:2000] for a in rows)))
    np_rate = 2000 / t_np
    t_u = best(lambda: run(buf, ("kl",), False, 1, tail=UNIFORM), 1)
    print(f"NumPy dense baseline (scatter to V = {V:,}, kl, 2,000 positions): {np_rate:,.0f} pos/s")
    print(f"fastkl kl tail=uniform, 1 thread: {n / t_u:,.0f} pos/s = {n / t_u / np_rate:,.0f}x NumPy; "
          f"tail=bucket: {rates['kl', False][0] / np_rate:,.0f}x (1 thread), "
          f"{rates['kl', False][1] / np_rate:,.0f}x ({threads} threads)  (target >= 50x)")
    if args.merge:
        for k in (32, 128):
            mb = Buffers(*make_rows(min(n, 200_000), k, seed=1))
            for kern in (sk.sparse_rows, sk.sparse_rows_sortmerge):
                run(Buffers(*(a[:100] for a in make_rows(100, k))), ("kl",), False, 1, kernel=kern)
            th = best(lambda: run(mb, ("kl",), False, 1))
            ts = best(lambda: run(mb, ("kl",), False, 1, kernel=sk.sparse_rows_sortmerge))
            print(f"merge k = {k}: hash {mb.n / th:,.0f} pos/s, sort-merge {mb.n / ts:,.0f} pos/s "
                  f"(kl, no bounds, 1 thread)")


if __name__ == "__main__":
    main()
