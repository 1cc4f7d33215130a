"""Slow, obviously-right references for sparse top-k rows (SPEC §10, docs/sparse-bounds.md).

One position = each side's listed ids and probabilities (decoded, not log-probs).
What is known about the full pair: the listed values; every unlisted entry of a
side lies in [0, that side's smallest listed value]; each side sums to 1; V
when given. Three functions per position:

- ``bucket``: the tail="bucket" point estimate (A compared one by one, the rest
  of each side pooled into one bucket);
- ``bounds``: (lower, upper) by the algorithm of docs/sparse-bounds.md;
- ``extreme_completions``: a brute-force oracle for tiny V (<= 8): numerical
  minimisation over the unlisted entries from many starts, and enumeration of
  the vertices of the feasible set for maxima.

Plain Python / NumPy / scipy; does not import fastkl (an independent oracle).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.optimize import minimize

F_DIVERGENCES = ("kl", "reverse_kl", "jeffreys", "js", "tv", "hellinger")
MEASURES = F_DIVERGENCES + ("entropy", "cross_entropy")
LOG2 = math.log(2.0)


# --------------------------------------------------------------------------
# Per-entry terms phi(p, q) of the f-divergences (hellinger: its square).


def _xlogy(x, y):
    """x*log(y) with 0*log(anything) = 0, elementwise."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = x * np.log(y)
    return np.where(x == 0, 0.0, out)


def _kl_term(p, q):
    """p log(p/q): 0 where p = 0, +inf where p > 0 = q."""
    p = np.asarray(p, dtype=float)
    q = np.asarray(q, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = p * (np.log(p) - np.log(q))
    return np.where(p == 0, 0.0, out)


def phi(measure: str, p, q) -> np.ndarray:
    """The term of an f-divergence at entries (p, q); for hellinger, ½(√p − √q)²."""
    p = np.maximum(np.asarray(p, dtype=float), 0.0)
    q = np.maximum(np.asarray(q, dtype=float), 0.0)
    if measure == "kl":
        return _kl_term(p, q)
    if measure == "reverse_kl":
        return _kl_term(q, p)
    if measure == "jeffreys":
        return _kl_term(p, q) + _kl_term(q, p)
    if measure == "js":
        m = 0.5 * (p + q)
        return 0.5 * (_kl_term(p, m) + _kl_term(q, m))
    if measure == "tv":
        return 0.5 * np.abs(p - q)
    if measure == "hellinger":
        return 0.5 * (np.sqrt(p) - np.sqrt(q)) ** 2
    raise ValueError(f"not an f-divergence term: {measure}")


def full_value(measure: str, p, q) -> float:
    """The measure on two full distributions (the truth the tests compare with)."""
    p = np.asarray(p, dtype=float)
    q = np.asarray(q, dtype=float)
    if measure == "entropy":
        return float(-_xlogy(p, p).sum())
    if measure == "cross_entropy":
        return float(full_value("entropy", p, q) + full_value("kl", p, q))
    total = float(phi(measure, p, q).sum())
    return math.sqrt(max(total, 0.0)) if measure == "hellinger" else total


def _finish(measure: str, total: float) -> float:
    """Turn a sum of terms into the measure (hellinger: square root), clipped at 0."""
    total = max(float(total), 0.0)
    return math.sqrt(total) if measure == "hellinger" else total


# --------------------------------------------------------------------------
# One position, split into A (both list), B (only P), C (only Q), U (neither).


@dataclass
class Split:
    """The known facts of one position, in the notation of docs/sparse-bounds.md."""

    pA: np.ndarray
    qA: np.ndarray
    pB: np.ndarray  # P's values at ids only P lists (Q unknown there)
    qC: np.ndarray  # Q's values at ids only Q lists (P unknown there)
    r_P: float  # P's unlisted mass
    r_Q: float
    m_P: float  # cap on each unlisted entry of P (its smallest listed value)
    m_Q: float
    n_U: float  # ids neither side lists (math.inf without V)
    res_P: float = 1e-14  # unlisted mass below it is rounding, not mass (P's, as the kernel's)
    res_Q: float = 1e-14

    @property
    def slots_P(self) -> float:
        """Entries where P's unlisted mass may sit: C and U."""
        return len(self.qC) + self.n_U

    @property
    def slots_Q(self) -> float:
        return len(self.pB) + self.n_U


def split(p_ids, p_vals, q_ids, q_vals, vocab: int | None = None, residue: float = 1e-14,
          cap_slack: tuple[float, float] = (1.0, 1.0)) -> Split:
    """Merge the two id lists; unlisted masses; caps (relaxed if rounding makes them infeasible).

    residue: unlisted mass below it is the rounding of the listed sum, not mass (0); a
    number, or a pair (P's, Q's) for inputs whose dtype rounds more (float32).
    cap_slack: factors (P's, Q's) widening the caps by the rounding of the stored minimum
    (a float32 minimum may lie below the true one, which bounds the unlisted entries).
    """
    res_P, res_Q = residue if isinstance(residue, tuple) else (residue, residue)
    p_map = dict(zip((int(i) for i in p_ids), (float(v) for v in p_vals)))
    q_map = dict(zip((int(i) for i in q_ids), (float(v) for v in q_vals)))
    both = sorted(set(p_map) & set(q_map))
    only_p = sorted(set(p_map) - set(q_map))
    only_q = sorted(set(q_map) - set(p_map))
    n_U = math.inf if vocab is None else vocab - len(both) - len(only_p) - len(only_q)
    # Unlisted mass below 1e-14 is the rounding of the listed values, not mass: 0.
    r_P = _residue(1.0 - math.fsum(p_map.values()), res_P)
    r_Q = _residue(1.0 - math.fsum(q_map.values()), res_Q)
    m_P = min(p_map.values()) * cap_slack[0]
    m_Q = min(q_map.values()) * cap_slack[1]
    s = Split(
        pA=np.array([p_map[i] for i in both]),
        qA=np.array([q_map[i] for i in both]),
        pB=np.array([p_map[i] for i in only_p]),
        qC=np.array([q_map[i] for i in only_q]),
        r_P=r_P, r_Q=r_Q, m_P=m_P, m_Q=m_Q, n_U=n_U, res_P=res_P, res_Q=res_Q,
    )
    # Rounding of listed values can leave a little more unlisted mass than the
    # slots can hold at the cap (or mass with no slot at all): relax minimally.
    if s.slots_P == 0:
        s.r_P = 0.0
    elif s.r_P > s.slots_P * s.m_P:
        s.m_P = s.r_P / s.slots_P
    if s.slots_Q == 0:
        s.r_Q = 0.0
    elif s.r_Q > s.slots_Q * s.m_Q:
        s.m_Q = s.r_Q / s.slots_Q
    return s


# --------------------------------------------------------------------------
# tail="bucket"


def bucket(measure: str, p_ids, p_vals, q_ids, q_vals, vocab: int | None = None,
           residue: float = 1e-14, cap_slack=(1.0, 1.0)) -> float:
    """A compared one by one, everything else of each side pooled into one bucket."""
    s = split(p_ids, p_vals, q_ids, q_vals, vocab, residue, cap_slack)
    # 1 − Σ_A p, computed as Σ_B p + r_P so that a fully listed side has an exactly empty bucket.
    p = np.append(s.pA, s.pB.sum() + s.r_P)
    q = np.append(s.qA, s.qC.sum() + s.r_Q)
    return full_value(measure, p, q)


def renormalize(measure: str, p_ids, p_vals, q_ids, q_vals, vocab: int | None = None,
                residue: float = 1e-14, cap_slack=(1.0, 1.0)) -> float:
    """tail="renormalize": each side's listed values divided by their sum, unlisted = 0,
    compared on the union of the ids (kl = +inf as soon as P lists an id Q does not)."""
    p_map = dict(zip((int(i) for i in p_ids), (float(v) for v in p_vals)))
    q_map = dict(zip((int(i) for i in q_ids), (float(v) for v in q_vals)))
    union = sorted(set(p_map) | set(q_map))
    sp, sq = math.fsum(p_map.values()), math.fsum(q_map.values())
    p = np.array([p_map.get(i, 0.0) / sp for i in union])
    q = np.array([q_map.get(i, 0.0) / sq for i in union])
    return full_value(measure, p, q)


def uniform(measure: str, p_ids, p_vals, q_ids, q_vals, vocab: int,
            residue: float = 1e-14, cap_slack=(1.0, 1.0)) -> float:
    """tail="uniform": each side's unlisted mass r spread evenly over its V − k unlisted ids.

    Built as full vectors over the V ids (V small in tests), after split's rounding rules.
    """
    s = split(p_ids, p_vals, q_ids, q_vals, vocab, residue, cap_slack)
    p = np.zeros(vocab)
    q = np.zeros(vocab)
    p_ids = np.asarray(p_ids, dtype=int)
    q_ids = np.asarray(q_ids, dtype=int)
    free_p = np.setdiff1d(np.arange(vocab), p_ids)
    free_q = np.setdiff1d(np.arange(vocab), q_ids)
    if len(free_p):
        p[free_p] = s.r_P / len(free_p)
    if len(free_q):
        q[free_q] = s.r_Q / len(free_q)
    p[p_ids] = p_vals
    q[q_ids] = q_vals
    return full_value(measure, p, q)


# --------------------------------------------------------------------------
# Lower bounds of the f-divergences: the aligned completion.


def water_fill(weights: np.ndarray, cap: float, total: float) -> np.ndarray:
    """x_i = min(cap, c·w_i) with Σx = total (0 <= total <= n·cap): the f-independent shape.

    Sorting and prefix sums: with the j largest weights capped, c = (total − j·cap)/Σ(rest).
    """
    n = len(weights)
    if n == 0 or total <= 0:
        return np.zeros(n)
    if total >= n * cap:
        return np.full(n, cap)
    order = np.argsort(-weights)
    w = weights[order]
    rest = np.concatenate([np.cumsum(w[::-1])[::-1], [0.0]])  # rest[j] = Σ_{i>=j} w_i
    x = np.empty(n)
    for j in range(n):  # j entries capped
        c = (total - j * cap) / rest[j]
        if c * w[j] <= cap * (1 + 1e-15) and (j == 0 or c * w[j - 1] >= cap * (1 - 1e-15)):
            x[:j] = cap
            x[j:] = np.minimum(cap, c * w[j:])
            break
    else:  # pragma: no cover - rounding: cap all but the smallest
        x[:] = cap
        x[-1] = total - (n - 1) * cap
    out = np.empty(n)
    out[order] = x
    return out


def _golden_min(fn, lo: float, hi: float, iters: int = 60) -> tuple[float, float]:
    """Minimum of a convex (possibly +inf-valued) fn on [lo, hi]; endpoints are candidates too."""
    best = min((fn(lo), lo), (fn(hi), hi))
    if hi - lo <= 0:
        return best
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = fn(d)
    return min(best, (fc, c), (fd, d))


def aligned_completion(s: Split) -> tuple[float, float]:
    """(t_P, t_Q) of the completion minimising every f-divergence at once (docs §3).

    t_Q = Q's unlisted mass given to B (water-filled ∝ p_B), t_P = P's to C (∝ q_C); the
    rest goes to U, spread evenly (one pooled entry). Found by minimising the squared
    Hellinger distance (finite everywhere) with nested golden sections: a convex problem.
    """
    (tp_lo, tp_hi), (tq_lo, tq_hi) = _t_ranges(s)

    def inner(t_Q: float) -> tuple[float, float]:
        return _golden_min(lambda t_P: _tail_terms("hellinger", s, t_P, t_Q), tp_lo, tp_hi)

    _, t_Q = _golden_min(lambda t: inner(t)[0], tq_lo, tq_hi)
    _, t_P = inner(t_Q)
    return t_P, t_Q


def _fill_ratio(weights: np.ndarray, cap: float, total: float) -> float:
    """The ratio x/w of the uncapped entries of water_fill(weights, cap, total) (c of x = min(cap, c·w)).

    0 for total 0; +inf when every entry is at the cap (nothing uncapped is left).
    """
    if total <= 0:
        return 0.0
    if len(weights) == 0 or total >= len(weights) * cap:
        return math.inf
    x = water_fill(weights, cap, total)
    free = x < cap
    if weights[free].sum() <= 0:  # rounding put every entry at the cap
        return math.inf
    return float(x[free].sum() / weights[free].sum())


def _ratio(a: float, b: float) -> float:
    """a/b with x/0 = +inf for x > 0 and 0/0 = nan (an empty pool has no ratio)."""
    if b > 0:
        return a / b
    return math.inf if a > 0 else math.nan


def aligned_completion_by_signs(s: Split, iters: int = 64) -> tuple[float, float]:
    """The kernel's algorithm of docs §3: nested bisections on f-free signs, no measure at all.

    ∂F/∂t_P has the sign of ρ_C − ρ_U, ∂F/∂t_Q that of ρ_U − ρ_B (ρ = p/q of the free
    entries: uncapped C, the pool, uncapped B). C entries get p = c'·q, so ρ_C = c'; B
    entries get q = c·p, so ρ_B = 1/c. An empty pool (0/0) counts as "stop": t moves down.
    """
    (tp_lo, tp_hi), (tq_lo, tq_hi) = _t_ranges(s)

    def inner(t_Q: float) -> float:
        a, b = tp_lo, tp_hi
        for _ in range(iters):
            t = 0.5 * (a + b)
            rho_C = _fill_ratio(s.qC, s.m_P, t)
            rho_U = _ratio(_residue(s.r_P - t, s.res_P), _residue(s.r_Q - t_Q, s.res_Q))
            if rho_C < rho_U:
                a = t  # more P mass into C lowers F
            else:
                b = t
        return 0.5 * (a + b)

    a, b = tq_lo, tq_hi
    for _ in range(iters):
        t = 0.5 * (a + b)
        t_P = inner(t)
        c = _fill_ratio(s.pB, s.m_Q, t)
        rho_B = 1.0 / c if c > 0 else math.inf
        rho_U = _ratio(_residue(s.r_P - t_P, s.res_P), _residue(s.r_Q - t, s.res_Q))
        if rho_U < rho_B:
            a = t  # more Q mass into B lowers F
        else:
            b = t
    t_Q = 0.5 * (a + b)
    return inner(t_Q), t_Q


def _tail_terms(measure: str, s: Split, t_P: float, t_Q: float) -> float:
    """Σ over B, C and the pooled U of phi, for the completion (t_P, t_Q)."""
    qB = water_fill(s.pB, s.m_Q, t_Q)
    pC = water_fill(s.qC, s.m_P, t_P)
    # A pool left with a rounding residue (r − t ~ 1e-17 when the caps add up to r, up to the
    # side's residue when rounded listed values make r exceed the caps' sum) is empty, as in the kernel.
    pool = phi(measure, _residue(s.r_P - t_P, s.res_P), _residue(s.r_Q - t_Q, s.res_Q))
    return float(phi(measure, s.pB, qB).sum() + phi(measure, pC, s.qC).sum() + pool)


@lru_cache(maxsize=256)
def _aligned_cached(key, method: str = "signs") -> tuple[float, float]:
    pB, qC, r_P, r_Q, m_P, m_Q, n_U, res_P, res_Q = key
    solve = aligned_completion_by_signs if method == "signs" else aligned_completion
    return solve(Split(np.zeros(0), np.zeros(0), np.array(pB), np.array(qC),
                                    r_P, r_Q, m_P, m_Q, n_U, res_P, res_Q))


def _residue(x: float, tol: float = 1e-14) -> float:
    return 0.0 if x < tol else x


def _f_lower(measure: str, s: Split, method: str = "signs") -> float:
    """The measure at the aligned completion (one per position, shared by all measures).

    The golden sections stop ~1e-13 short of an end of the range; where the aligned
    completion empties one side of the pool exactly (a kink: p > 0 = q there costs +inf in
    kl), the ends within 1e-9 are tried too. Every candidate is feasible, so the minimum
    over them is still a value of the measure on the feasible set.
    """
    key = (tuple(s.pB), tuple(s.qC), s.r_P, s.r_Q, s.m_P, s.m_Q, s.n_U, s.res_P, s.res_Q)
    t_P, t_Q = _aligned_cached(key, method)
    (tp_lo, tp_hi), (tq_lo, tq_hi) = _t_ranges(s)
    known = phi(measure, s.pA, s.qA).sum()
    best = math.inf
    # (within a side's residue of an end too: the bisection stops that far short of an end where
    # the pool left there is rounding, which the kernel drops)
    for tp in _near_ends(t_P, tp_lo, tp_hi, max(1e-9, 2.0 * s.res_P)):
        for tq in _near_ends(t_Q, tq_lo, tq_hi, max(1e-9, 2.0 * s.res_Q)):
            best = min(best, known + _tail_terms(measure, s, tp, tq))
    return _finish(measure, best)


def _near_ends(t: float, lo: float, hi: float, tol: float = 1e-9) -> list[float]:
    return [t] + [e for e in (lo, hi) if abs(t - e) <= tol]


def _t_ranges(s: Split) -> tuple[tuple[float, float], tuple[float, float]]:
    """Feasible ranges of t_P (P's unlisted mass in C) and t_Q (Q's in B)."""
    M_P = s.n_U * s.m_P if s.n_U else 0.0
    M_Q = s.n_U * s.m_Q if s.n_U else 0.0
    tq_lo, tq_hi = max(0.0, s.r_Q - M_Q), min(s.r_Q, len(s.pB) * s.m_Q)
    tp_lo, tp_hi = max(0.0, s.r_P - M_P), min(s.r_P, len(s.qC) * s.m_P)
    return (min(tp_lo, tp_hi), tp_hi), (min(tq_lo, tq_hi), tq_hi)


# --------------------------------------------------------------------------
# Upper bounds of the f-divergences: disjoint tails.


def _phi_p_alone(measure: str) -> float:
    """phi(1, 0): the cost per unit of P mass where Q is 0."""
    return {"kl": math.inf, "reverse_kl": 0.0, "jeffreys": math.inf, "js": 0.5 * LOG2,
            "tv": 0.5, "hellinger": 0.5}[measure]


def _phi_q_alone(measure: str) -> float:
    return {"kl": 0.0, "reverse_kl": math.inf, "jeffreys": math.inf, "js": 0.5 * LOG2,
            "tv": 0.5, "hellinger": 0.5}[measure]


def _swap(s: Split) -> Split:
    """The same position with P and Q exchanged (reverse_kl from kl)."""
    return Split(s.qA, s.pA, s.qC, s.pB, s.r_Q, s.r_P, s.m_Q, s.m_P, s.n_U, s.res_Q, s.res_P)


def _kl_upper_small_vocab(s: Split) -> float:
    """kl's upper bound when V is so small that Q cannot leave any P-positive slot at 0.

    +inf iff some completion has p > 0 = q: a B id, or a U id P gives mass to, left at
    q = 0 while Q's r_Q still fits in its other slots. Otherwise every unknown q is at
    least q_floor = r_Q − (slots_Q − 1)·m_Q > 0 (the rest at the cap), and each unknown term
    p log(p/q) <= p·log(m_P/q_floor) (p <= m_P): a valid, finite, not tight bound (docs §4).
    """
    p_may_sit_alone = len(s.pB) > 0 or (s.r_P > 0 and s.n_U >= 1)
    if not p_may_sit_alone and s.r_P > 0 and s.n_U == 0:
        return _kl_upper_on_known_q(s)
    if not p_may_sit_alone or math.isinf(s.slots_Q):
        return math.inf if p_may_sit_alone else _f_upper("kl", s, small_vocab=False)
    q_floor = s.r_Q - (s.slots_Q - 1) * s.m_Q
    if q_floor <= 1e-12 * max(s.r_Q, 1e-300):
        return math.inf
    total = float(phi("kl", s.pA, s.qA).sum())
    total += float(np.sum(s.pB * np.maximum(np.log(s.pB / q_floor), 0.0)))
    floor_all = min([q_floor] + list(s.qC))
    total += s.r_P * max(math.log(s.m_P / floor_all), 0.0)
    return total


def _kl_upper_on_known_q(s: Split) -> float:
    """kl's exact maximum when P's unlisted mass can only sit on C (B = ∅, no U id: e.g. Q dense).

    kl is then Σ_A + Σ_C p_c log(p_c/q_c) with q_c known, convex in p_C: the maximum is a vertex
    (⌊r_P/m_P⌋ entries at the cap, one remainder), and exchanging two entries shows the caps go to
    the smallest q_c and the remainder to the next one.
    """
    qC = np.sort(s.qC)
    p = _vertex_fill(len(qC), s.m_P, s.r_P)
    return float(phi("kl", s.pA, s.qA).sum() + phi("kl", p, qC).sum())


def _f_upper(measure: str, s: Split, small_vocab: bool = True) -> float:
    """Every unlisted mass where the other side is 0 (valid for any V; tight without V).

    With a V too small for that, kl's and reverse_kl's +inf is replaced by the finite
    bound of _kl_upper_small_vocab where +inf is impossible (jeffreys: their sum).
    """
    if small_vocab and measure in ("kl", "reverse_kl", "jeffreys") and math.isfinite(s.n_U):
        kl_hi = min(_f_upper("kl", s, False), _kl_upper_small_vocab(s))
        rkl_hi = min(_f_upper("reverse_kl", s, False), _kl_upper_small_vocab(_swap(s)))
        return {"kl": kl_hi, "reverse_kl": rkl_hi, "jeffreys": kl_hi + rkl_hi}[measure]
    mass_p_alone = s.pB.sum() + s.r_P
    mass_q_alone = s.qC.sum() + s.r_Q
    total = phi(measure, s.pA, s.qA).sum()
    for mass, unit in ((mass_p_alone, _phi_p_alone(measure)), (mass_q_alone, _phi_q_alone(measure))):
        if mass > 0:
            total += mass * unit
    return _finish(measure, total)


# --------------------------------------------------------------------------
# Entropy of P (concave in P's unlisted entries).


def _entropy_bounds(s: Split) -> tuple[float, float]:
    known = float(-_xlogy(np.concatenate([s.pA, s.pB]), np.concatenate([s.pA, s.pB])).sum())
    if s.r_P <= 0:
        return known, known
    full = math.floor(s.r_P / s.m_P * (1 + 1e-12))  # slots filled to the cap
    full = min(full, int(s.slots_P) if math.isfinite(s.slots_P) else full)
    rem = max(0.0, s.r_P - full * s.m_P)
    low = known - full * s.m_P * math.log(s.m_P) - float(_xlogy(rem, rem))
    if math.isinf(s.slots_P):
        return low, math.inf
    u = s.r_P / s.slots_P
    return low, known - s.r_P * math.log(u)


def _cross_entropy_lower(s: Split) -> float:
    """min of −Σ p log q: P's unlisted mass fills C by descending q_c, then U at the cap; Q water-fills.

    −p log q is linear in P, so P sits at a vertex; a C slot (q_c >= m_Q >= any q_u) always
    beats a U slot, and a larger q_c a smaller one. Given P, −Σ w log q over Q's slots is
    convex and decreasing in each q: all of Q's mass that fits goes ∝ w, capped at m_Q.
    """
    known = -float(_xlogy(s.pA, s.qA).sum())
    t_P = min(s.r_P, len(s.qC) * s.m_P)
    qC = np.sort(s.qC)[::-1]
    pC = _vertex_fill(len(qC), s.m_P, t_P)
    u_weights = _vertex_fill(None, s.m_P, _residue(s.r_P - t_P))
    weights = np.concatenate([s.pB, u_weights])
    total = min(s.r_Q, len(weights) * s.m_Q)
    q_w = water_fill(weights, s.m_Q, total)
    return known - float(_xlogy(pC, qC).sum()) - float(_xlogy(weights, q_w).sum())


def _vertex_fill(n: int | None, cap: float, total: float) -> np.ndarray:
    """cap, cap, ..., remainder, 0, ...: the first slots filled to the cap (n=None: as many as needed)."""
    full = math.floor(total / cap * (1 + 1e-12)) if total > 0 else 0
    if n is not None:
        full = min(full, n)
    rem = _residue(total - full * cap)
    x = [cap] * full + ([rem] if rem > 0 else [])
    if n is not None:
        x = (x + [0.0] * n)[:n]
    return np.array(x, dtype=float)


def bounds(measure: str, p_ids, p_vals, q_ids, q_vals, vocab: int | None = None,
           method: str = "signs", residue: float = 1e-14, cap_slack=(1.0, 1.0)) -> tuple[float, float]:
    """(lower, upper) over all full pairs consistent with the position (docs/sparse-bounds.md).

    method: how the aligned completion of the f-divergences' lower bound is found:
    "signs" (the docs' f-free bisections, default) or "golden" (minimising hellinger²).
    """
    s = split(p_ids, p_vals, q_ids, q_vals, vocab, residue, cap_slack)
    if measure in F_DIVERGENCES:
        return _f_lower(measure, s, method), _f_upper(measure, s)
    if measure == "entropy":
        return _entropy_bounds(s)
    if measure == "cross_entropy":
        h_lo, h_hi = _entropy_bounds(s)
        return _cross_entropy_lower(s), h_hi + _f_upper("kl", s)
    raise ValueError(f"unknown measure: {measure}")


# --------------------------------------------------------------------------
# Brute force over tiny vocabularies.


def _side_vertices(n: int, cap: float, total: float) -> list[np.ndarray]:
    """Vertices of {x in [0, cap]^n : Σx = total}: floor(total/cap) at cap, one remainder."""
    if n == 0:
        return [np.zeros(0)]
    full = min(n, math.floor(total / cap * (1 + 1e-12)))
    rem = _residue(total - full * cap)  # a 1e-17 remainder is rounding, not a slot with mass
    out = []
    for capped in itertools.combinations(range(n), full):
        others = [i for i in range(n) if i not in capped and rem > 0] or [None]
        for j in others:
            x = np.zeros(n)
            x[list(capped)] = cap
            if j is not None:
                x[j] += rem
            out.append(x)
    return out


def _completions_layout(p_ids, p_vals, q_ids, q_vals, vocab: int):
    """Full vectors with the listed entries in place and the slots of unlisted entries."""
    s = split(p_ids, p_vals, q_ids, q_vals, vocab)
    p = np.zeros(vocab)
    q = np.zeros(vocab)
    p[list(p_ids)] = p_vals
    q[list(q_ids)] = q_vals
    free_p = np.setdiff1d(np.arange(vocab), np.asarray(p_ids, dtype=int))
    free_q = np.setdiff1d(np.arange(vocab), np.asarray(q_ids, dtype=int))
    return s, p, q, free_p, free_q


def extreme_completions(measure: str, p_ids, p_vals, q_ids, q_vals, vocab: int,
                        starts: int = 12, seed: int = 0) -> tuple[float, float]:
    """(min, max) of the measure over the feasible set, by brute force (vocab <= 8).

    Maxima of convex objectives (f-divergences; cross-entropy, linear in P and convex in Q)
    lie at vertices of the product of the two sides' polytopes: all are enumerated. The
    convex minima (and entropy's maximum) are found by SLSQP from many random feasible
    starts plus all vertex pairs' best as a start.
    """
    assert vocab <= 8, "brute force is for tiny vocabularies"
    s, p0, q0, free_p, free_q = _completions_layout(p_ids, p_vals, q_ids, q_vals, vocab)
    nP, nQ = len(free_p), len(free_q)
    vP = _side_vertices(nP, s.m_P, s.r_P)
    vQ = _side_vertices(nQ, s.m_Q, s.r_Q)

    def full(x):
        p, q = p0.copy(), q0.copy()
        p[free_p] = x[:nP]
        q[free_q] = x[nP:]
        return p, q

    def value(x):
        return full_value(measure, *full(np.clip(x, 0, None)))

    vertex_vals = [(value(np.concatenate([a, b])), np.concatenate([a, b])) for a in vP for b in vQ]
    vmax = max(v for v, _ in vertex_vals)
    vmin_vertex, x_best = min(vertex_vals, key=lambda t: t[0])
    if measure == "entropy":  # concave in P: min at a vertex, max by optimisation
        neg_min = _optimise(lambda x: -value(x), s, nP, nQ, starts, seed, measure, x_best)
        return vmin_vertex, max(vmax, -neg_min)
    if measure == "cross_entropy":  # linear in P: min over P-vertices of a convex min over Q
        best = math.inf
        for a in vP:
            best = min(best, _optimise(lambda y, a=a: value(np.concatenate([a, y])),
                                       s, 0, nQ, starts // 3 + 1, seed, measure, None, fixed_p=a))
        return min(best, vmin_vertex), vmax
    squared = lambda x: _smooth_value(measure, full(np.clip(x, 0, None)))  # noqa: E731
    vmin = _optimise(squared, s, nP, nQ, starts, seed, measure, x_best)
    vmin = min(vmin, _optimise(squared, s, nP, nQ, 0, seed, measure,
                               _mirror_start(s, p0, q0, free_p, free_q)))
    vmin = min(vmin, min(_smooth_value(measure, full(x)) for _, x in vertex_vals))
    return _finish(measure, vmin), vmax


def _mirror_start(s: Split, p0, q0, free_p, free_q) -> np.ndarray:
    """A start where each side's unknowns copy the other side's listed values (scaled, capped)."""
    parts = []
    for other, free, cap, total in ((q0, free_p, s.m_P, s.r_P), (p0, free_q, s.m_Q, s.r_Q)):
        w = other[free] + 1e-3
        x = np.minimum(cap, w * total / w.sum()) if len(w) and total > 0 else np.zeros(len(w))
        for _ in range(50):  # pour what the caps cut off into the entries below the cap
            short = total - x.sum()
            room = cap - x
            if short <= 1e-15 or room.sum() <= 0:
                break
            x = x + short * room / room.sum()
        parts.append(x)
    return np.concatenate(parts)


def _smooth_value(measure: str, pq) -> float:
    """The sum of terms (hellinger: squared), with entries floored at 1e-300 so logs stay finite."""
    p, q = pq
    tiny = 1e-12  # SLSQP needs moderate gradients; the error (~1e-11) is far below the tests' 1e-6
    return float(phi(measure, np.maximum(p, tiny), np.maximum(q, tiny)).sum())


def _optimise(fn, s: Split, nP: int, nQ: int, starts: int, seed: int, measure: str,
              x_start, fixed_p=None) -> float:
    """min fn over the box-and-two-sums set by SLSQP from random feasible starts."""
    rng = np.random.default_rng(seed)
    n = nP + nQ
    if n == 0:
        return fn(np.zeros(0))
    cons = []
    if nP:
        cons.append({"type": "eq", "fun": lambda x: x[:nP].sum() - s.r_P})
    if nQ:
        cons.append({"type": "eq", "fun": lambda x: x[nP:].sum() - s.r_Q})
    box = [(0.0, s.m_P)] * nP + [(0.0, s.m_Q)] * nQ
    best = math.inf
    inits = [] if x_start is None or len(x_start) != n else [x_start]
    for _ in range(starts):
        x = np.concatenate([_random_point(rng, nP, s.m_P, s.r_P), _random_point(rng, nQ, s.m_Q, s.r_Q)])
        inits.append(x)
    for x in inits:
        best = min(best, fn(x))
        res = minimize(fn, x, method="SLSQP", bounds=box, constraints=cons,
                       options={"ftol": 1e-14, "maxiter": 500})
        if res.success or np.isfinite(res.fun):
            xr = np.clip(res.x, [b[0] for b in box], [b[1] for b in box])
            if _feasible(xr, nP, s):
                best = min(best, fn(xr))
    return best


def _feasible(x, nP, s: Split, tol: float = 1e-9) -> bool:
    ok_p = nP == 0 or abs(x[:nP].sum() - s.r_P) <= tol
    ok_q = len(x) == nP or abs(x[nP:].sum() - s.r_Q) <= tol
    return ok_p and ok_q


def _random_point(rng, n: int, cap: float, total: float) -> np.ndarray:
    """A random point of {x in [0, cap]^n : Σx = total} (Dirichlet, pushed inside the caps)."""
    if n == 0:
        return np.zeros(0)
    x = rng.dirichlet(np.full(n, rng.choice([0.2, 1.0, 5.0]))) * total
    for _ in range(100):
        over = x > cap
        if not over.any():
            break
        excess = (x[over] - cap).sum()
        x[over] = cap
        room = cap - x
        if room.sum() <= 0:
            break
        x = x + excess * room / room.sum()
    return np.minimum(x, cap)
