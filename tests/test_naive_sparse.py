"""The sparse references (tests/naive_sparse.py) against the full distributions rows are cut from.

Rows are cut from full pairs over a small vocabulary (Zipf-like, flat, random; ties at the
k-th value; P = Q; disjoint top-k sets; k = 1 and k = V; k differing per side). Checked:
bucket <= lower <= true <= upper for every measure (SPEC §10), and for tiny V the bounds
equal the brute-force extremes where docs/sparse-bounds.md claims tightness.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, note, settings
from hypothesis import strategies as st

import naive_sparse as ns

TOL = 1e-9


def close_or_above(a: float, b: float, tol: float = TOL) -> bool:
    """a >= b up to a tiny float tolerance (infinities compare exactly)."""
    if math.isinf(a) or math.isinf(b):
        return a >= b
    return a >= b - tol * (1 + abs(b))


def close(a: float, b: float, tol: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tol * (1 + abs(b))


@st.composite
def distribution(draw, V: int) -> np.ndarray:
    kind = draw(st.sampled_from(["zipf", "flat", "random", "ties"]))
    if kind == "zipf":
        s = draw(st.floats(0.5, 2.0))
        p = 1.0 / np.arange(1, V + 1) ** s
    elif kind == "flat":
        p = np.ones(V)
    elif kind == "random":
        p = np.array(draw(st.lists(st.floats(1e-3, 1.0), min_size=V, max_size=V)))
    else:  # few distinct values: ties at the k-th value are likely
        p = np.array(draw(st.lists(st.sampled_from([1.0, 2.0, 4.0]), min_size=V, max_size=V)))
    perm = draw(st.permutations(range(V)))
    p = p[list(perm)]
    return p / p.sum()


@st.composite
def position(draw, max_V: int = 7):
    """(p_full, q_full, p_ids, q_ids): a full pair and each side's top-k ids."""
    V = draw(st.integers(1, max_V))
    p = draw(distribution(V))
    relation = draw(st.sampled_from(["independent", "equal", "disjoint"]))
    if relation == "equal":
        q = p.copy()
    elif relation == "disjoint" and V >= 2:
        q = draw(distribution(V))
        # Q ranks ids in the reverse of P's order: the top-k sets are disjoint when k_P + k_Q <= V.
        q = _reverse_rank(p, q)
    else:
        q = draw(distribution(V))
    k_p = draw(st.integers(1, V))
    k_q = draw(st.one_of(st.just(k_p), st.integers(1, V)))
    return p, q, top_k(p, k_p), top_k(q, k_q)


def _reverse_rank(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """q's values rearranged so that its largest sit where p is smallest."""
    out = np.empty_like(q)
    out[np.argsort(p)] = np.sort(q)[::-1]
    return out


def top_k(p: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest values (ties broken by id, as a stable sort would)."""
    return np.argsort(-p, kind="stable")[:k]


def row(p, q, p_ids, q_ids):
    return p_ids, p[p_ids], q_ids, q[q_ids]


@given(position(), st.booleans())
def test_bucket_le_lower_le_true_le_upper(pos, with_vocab):
    p, q, p_ids, q_ids = pos
    vocab = len(p) if with_vocab else None
    for m in ns.MEASURES:
        truth = ns.full_value(m, p, q)
        lo, hi = ns.bounds(m, *row(p, q, p_ids, q_ids), vocab=vocab)
        b = ns.bucket(m, *row(p, q, p_ids, q_ids), vocab=vocab)
        note(f"{m}: bucket={b} lower={lo} true={truth} upper={hi}")
        assert close_or_above(truth, lo), m
        assert close_or_above(hi, truth), m
        assert close_or_above(lo, b), m
        assert close_or_above(truth, b), m


def _disjoint_room(s: ns.Split) -> bool:
    """The docs' condition for the disjoint-tails upper bound to be attained with V given."""
    need = (math.ceil(s.r_P / s.m_P - 1e-9) if s.r_P > 0 else 0) + (
        math.ceil(s.r_Q / s.m_Q - 1e-9) if s.r_Q > 0 else 0)
    return s.n_U >= need


# A fifth of the profile's examples (20 by default, 200 under "thorough"): the oracle is slow.
@settings(max_examples=max(3, settings.default.max_examples // 5))
@given(position(max_V=5))
def test_bounds_equal_brute_force_extremes_where_tight(pos):
    p, q, p_ids, q_ids = pos
    V = len(p)
    data = row(p, q, p_ids, q_ids)
    s = ns.split(*data, vocab=V)
    for m in ns.MEASURES:
        lo, hi = ns.bounds(m, *data, vocab=V)
        e_lo, e_hi = ns.extreme_completions(m, *data, vocab=V, starts=4)
        note(f"{m}: lower={lo} brute min={e_lo}; upper={hi} brute max={e_hi}")
        # The brute force only ever finds feasible values: the bounds must contain them.
        assert close_or_above(e_lo, lo, 1e-7) and close_or_above(hi, e_hi, 1e-7), m
        assert close(lo, e_lo, 1e-6), m
        if m == "entropy" or _disjoint_room(s):
            assert close(hi, e_hi, 1e-6), m


def _slots(mass: float, cap: float) -> int:
    return math.ceil(mass / cap - 1e-9) if mass > 0 else 0


@settings(max_examples=max(3, settings.default.max_examples // 5))
@given(position(max_V=5))
def test_bounds_without_vocab_equal_brute_force_with_enough_room(pos):
    """Without V the bounds are the extremes over a vocabulary large enough for them (docs §3, §4).

    The brute force runs at V' = |A∪B∪C| + the slots the no-V extremes use (when V' <= 8):
    the aligned completion's pool spread evenly, and disjoint tails.
    """
    p, q, p_ids, q_ids = pos
    # the listed ids renamed 0..listed-1, so that the brute force's vocabulary V' (which may be
    # smaller than the position's own V) holds them
    new_id = {int(i): j for j, i in enumerate(sorted(set(map(int, p_ids)) | set(map(int, q_ids))))}
    p_ids2 = np.array([new_id[int(i)] for i in p_ids])
    q_ids2 = np.array([new_id[int(i)] for i in q_ids])
    data = (p_ids2, p[p_ids], q_ids2, q[q_ids])
    s = ns.split(*data, vocab=None)
    t_P, t_Q = ns.aligned_completion_by_signs(s)
    listed = len(s.pA) + len(s.pB) + len(s.qC)
    room = max(_slots(s.r_P - t_P, s.m_P), _slots(s.r_Q - t_Q, s.m_Q),
               _slots(s.r_P, s.m_P) + _slots(s.r_Q, s.m_Q))
    big_V = listed + room
    if big_V > 8:
        return
    for m in ns.MEASURES:
        lo, hi = ns.bounds(m, *data, vocab=None)
        e_lo, e_hi = ns.extreme_completions(m, *data, vocab=big_V, starts=3)
        note(f"{m} at V'={big_V}: lower={lo} brute min={e_lo}; upper={hi} brute max={e_hi}")
        assert close(lo, e_lo, 1e-6), m
        if m != "entropy":  # without V entropy's upper bound is +inf when r_P > 0
            assert close(hi, e_hi, 1e-6), m


@settings(max_examples=max(3, settings.default.max_examples // 10))
@given(position(), st.booleans())
def test_sign_bisection_finds_the_minimiser_of_hellinger(pos, with_vocab):
    """The docs' f-free algorithm and a plain minimisation of hellinger² give the same lower bounds."""
    p, q, p_ids, q_ids = pos
    vocab = len(p) if with_vocab else None
    for m in ns.F_DIVERGENCES:
        by_signs, _ = ns.bounds(m, *row(p, q, p_ids, q_ids), vocab=vocab, method="signs")
        by_golden, _ = ns.bounds(m, *row(p, q, p_ids, q_ids), vocab=vocab, method="golden")
        assert close(by_signs, by_golden, 1e-8), (m, by_signs, by_golden)


def test_kl_upper_is_infinite_exactly_when_q_may_vanish_under_p():
    """P fully listed inside Q's ids: finite; one P-only id (no V): +inf."""
    lo, hi = ns.bounds("kl", [0, 1], [0.6, 0.4], [0, 1, 2], [0.5, 0.3, 0.2])
    assert math.isfinite(hi) and lo <= hi
    _, hi = ns.bounds("kl", [0, 3], [0.6, 0.4], [0, 1, 2], [0.5, 0.3, 0.2])
    assert hi == math.inf


def test_kl_upper_is_finite_when_the_vocabulary_forces_q_under_p():
    """V = 3, Q's unlisted mass has exactly one slot (P's only-listed id): no +inf."""
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.4, 0.3, 0.3])
    for m in ("kl", "reverse_kl", "jeffreys", "cross_entropy"):
        lo, hi = ns.bounds(m, [0, 1], p[[0, 1]], [0, 2], q[[0, 2]], vocab=3)
        assert math.isfinite(hi), m
        assert close_or_above(ns.full_value(m, p, q), lo) and close_or_above(hi, ns.full_value(m, p, q)), m
    _, hi = ns.bounds("kl", [0, 1], p[[0, 1]], [0, 2], q[[0, 2]], vocab=None)
    assert hi == math.inf


def test_full_listing_is_exact():
    """k = V on both sides: lower = upper = bucket = truth."""
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.2, 0.6])
    ids = np.arange(3)
    for m in ns.MEASURES:
        lo, hi = ns.bounds(m, ids, p, ids, q, vocab=3)
        truth = ns.full_value(m, p, q)
        assert close(lo, truth, 1e-12) and close(hi, truth, 1e-12), m
        assert close(ns.bucket(m, ids, p, ids, q, vocab=3), truth, 1e-12), m
