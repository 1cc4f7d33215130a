"""What top-k rows can tell: the bounds fastkl reports against the true KL on a realistic sample.

    python benchmarks/sparse_bounds_width.py [--positions 1000] [--vocab 32000] [--k 20 64]

Full teacher/student distributions are drawn (Zipf-like teacher over V tokens in a random
order per position, student = teacher's logits plus noise, softmaxed), cut to each side's
top-k ids + log-probs, and scored by fastkl. Printed per k: the mean true KL (from the full
distributions), the mean of each tail's estimate, the mean bounds and their width, and how
often the truth lies inside (it must: always). Seconds to a minute on a laptop.
"""

from __future__ import annotations

import argparse

import numpy as np

import fastkl


def sample(rng: np.random.Generator, n: int, vocab: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """n full (teacher, student) pairs of log-probs over `vocab`, float64."""
    s = rng.uniform(1.0, 1.6, size=(n, 1))
    ranks = np.argsort(rng.random((n, vocab)), axis=1) + 1.0  # a random order of the tokens per position
    t_logits = -s * np.log(ranks)
    s_logits = t_logits + rng.normal(0.0, noise, size=(n, vocab))

    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    return log_softmax(t_logits), log_softmax(s_logits)


BOUNDED = ("js", "tv", "hellinger")  # measures whose upper bound is always finite


def full_measure(m: str, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The measure per row on full distributions (float64, NumPy)."""
    if m == "tv":
        return 0.5 * np.abs(p - q).sum(axis=1)
    if m == "hellinger":
        return np.sqrt(0.5 * ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(axis=1))
    mid = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(p / mid), 0.0) + np.where(q > 0, q * np.log(q / mid), 0.0)
    return 0.5 * t.sum(axis=1)


def top_k(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.argpartition(-logp, k - 1, axis=1)[:, :k]
    return ids.astype(np.int32), np.take_along_axis(logp, ids, axis=1).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=1000)
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--k", type=int, nargs="+", default=[20, 64])
    ap.add_argument("--noise", type=float, default=0.5, help="student = teacher logits + N(0, noise)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    lp, lq = sample(rng, a.positions, a.vocab, a.noise)
    p = np.exp(lp)
    truth = np.sum(p * (lp - lq), axis=1)
    print(f"{a.positions} positions, V={a.vocab:,}, Zipf-like teacher (s in [1.0, 1.6]), student = teacher "
          f"logits + N(0, {a.noise}); true KL(teacher || student) mean {truth.mean():.4f}")
    for k in a.k:
        pid, pv = top_k(lp, k)
        qid, qv = top_k(lq, k)
        est = {}
        for tail in ("bucket", "renormalize", "uniform"):
            t = fastkl.divergences(pv, qv, ["kl"], p_ids=pid, q_ids=qid, vocab=a.vocab, kind="logprobs",
                                   tail=tail)
            est[tail] = t["kl"].to_numpy()
        lo, hi = t["kl_lower"].to_numpy(), t["kl_upper"].to_numpy()
        finite = np.isfinite(hi)
        inside = np.mean((lo <= truth * (1 + 1e-6) + 1e-9) & (truth <= hi * (1 + 1e-6) + 1e-9))
        print(f"k={k}: teacher lists {t['listed_mass_p'].to_numpy().mean():.1%} of its mass, "
              f"student {t['listed_mass_q'].to_numpy().mean():.1%}")
        for tail, v in est.items():
            err = v - truth
            print(f"  tail={tail:<11}  mean {np.mean(v):.4f}   mean error {np.mean(err):+.4f}   "
                  f"mean |error| {np.mean(np.abs(err)):.4f}")
        print(f"  bounds: mean lower {lo.mean():.4f}, upper finite on {finite.mean():.1%} of positions"
              + (f" (mean upper there {hi[finite].mean():.4f}, mean width {np.mean(hi[finite] - lo[finite]):.4f},"
                 f" truth there {truth[finite].mean():.4f})" if finite.any() else "")
              + f"; truth inside on {inside:.1%}")
        print(f"  mean truth - lower {np.mean(truth - lo):.4f}")
        t = fastkl.divergences(pv, qv, BOUNDED, p_ids=pid, q_ids=qid, vocab=a.vocab, kind="logprobs")
        for m in BOUNDED:
            tm = full_measure(m, p, np.exp(lq))
            lo_m, hi_m, b = (t[c].to_numpy() for c in (f"{m}_lower", f"{m}_upper", m))
            print(f"  {m:<10} truth {tm.mean():.4f}   bucket {b.mean():.4f}   bounds [{lo_m.mean():.4f}, "
                  f"{hi_m.mean():.4f}]   mean width {np.mean(hi_m - lo_m):.4f}")


if __name__ == "__main__":
    main()
