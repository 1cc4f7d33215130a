"""The sparse top-k kernel (fastkl/kernels/sparse.py) against tests/naive_sparse.py.

Rows are cut from full distributions over small vocabularies (Zipf-like, flat,
random, ties at the k-th value; P = Q; disjoint top-k sets; k = 1 and k = V; k
differing per side; float32 and float64; probs and log-probs; dense against
sparse both ways). The kernel is called directly on hand-built flat buffers.
Checked: the estimate per tail equals the reference; the bounds equal
naive_sparse.bounds and contain the measure of the full pair; bad inputs get
their status code without disturbing other rows; pre_status passes through.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import naive_sparse as ns
from fastkl import _registry
from fastkl.kernels import sparse as sk
from test_naive_sparse import distribution, top_k

MEASURES = tuple(m for m in _registry.MEASURES if m not in ("gjs", "renyi", "bhattacharyya"))  # those of top-k rows
LOG_MEASURES = _registry.LOG_MEASURES
PROBS, LOGPROBS = _registry.KIND_CODE["probs"], _registry.KIND_CODE["logprobs"]
SC = _registry.STATUS_CODE
SUM_TOL = 1e-4


# ------------------------------------------------------------ building buffers


def _stored(vals: np.ndarray, dtype, kind: int) -> np.ndarray:
    """The values as the table stores them (probs or log-probs in dtype)."""
    vals = np.asarray(vals, dtype=np.float64)
    if kind == LOGPROBS:
        with np.errstate(divide="ignore"):
            vals = np.log(vals)
    return vals.astype(dtype)


def _seen(stored: np.ndarray, kind: int) -> np.ndarray:
    """The probabilities the kernel decodes from the stored values (float64)."""
    x = stored.astype(np.float64)
    return np.exp(x) if kind == LOGPROBS else x


def residue_tol(stored: np.ndarray, kind: int) -> float:
    """The kernel's threshold under which unlisted mass is rounding (docs §1): the dtype's
    unit roundoff times twice the listed sum (plus Σ p|log p| for log-probs), + 1e-14."""
    u = 2.0 ** -24 if stored.dtype == np.float32 else 2.0 ** -53
    p = _seen(stored, kind)
    lsum = float(np.sum(np.where(p > 0, -p * stored.astype(np.float64), 0.0))) if kind == LOGPROBS else 0.0
    return 1e-14 + u * (2.0 * float(p.sum()) + lsum)


def cap_slack(stored: np.ndarray, kind: int) -> float:
    """The kernel's widening of the cap by the stored minimum's rounding: 1 + 2u(1 + |log m|)
    for log-probs, 1 + 2u for probs."""
    u = 2.0 ** -24 if stored.dtype == np.float32 else 2.0 ** -53
    x = stored.astype(np.float64)
    x_min = float(min(x.min(), 0.0)) if kind == LOGPROBS else 0.0
    return 1.0 + 2.0 * u * (1.0 + (-x_min if np.isfinite(x_min) else 0.0))


def rounding(P: "Side", Q: "Side", r: int) -> dict:
    """The reference's rounding arguments matching the kernel's for row r."""
    return dict(residue=(residue_tol(P.stored[r], P.kind), residue_tol(Q.stored[r], Q.kind)),
                cap_slack=(cap_slack(P.stored[r], P.kind), cap_slack(Q.stored[r], Q.kind)))


class Side:
    """Flat buffers of one side: offsets, id offsets, ids, values, empty mask."""

    def __init__(self, rows, dtype=np.float64, kind=PROBS, id_dtype=np.int64, dense=False):
        self.rows = [(np.asarray(i), np.asarray(v, dtype=np.float64)) for i, v in rows]
        self.kind = kind
        self.dense = dense
        self.stored = [_stored(v, dtype, kind) for _, v in self.rows]
        lens = [len(v) for v in self.stored]
        self.offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        ids = [np.asarray(i, dtype=id_dtype) for i, _ in self.rows]
        self.id_offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64)
        self.ids = np.concatenate(ids) if ids else np.zeros(0, id_dtype)
        self.values = np.concatenate(self.stored) if self.stored else np.zeros(0, dtype)
        self.mask = np.zeros(0, np.uint8)

    def seen(self, r):
        ids = np.arange(len(self.stored[r])) if self.dense else self.rows[r][0]
        return ids, _seen(self.stored[r], self.kind)


def run(P: Side, Q: Side, vocab=None, tail="bucket", want_bounds=True, measures=MEASURES, pre_status=None,
        use_q=True, base=math.e, kernel=sk.sparse_rows):
    n = len(P.offsets) - 1
    slots = np.full(sk.N_MEASURES, -1, np.int64)
    for j, m in enumerate(measures):
        slots[_registry.MEASURE_INDEX[m]] = j
    shape = (len(measures), n)
    out, lower, upper = np.full(shape, -7.0), np.full(shape, -7.0), np.full(shape, -7.0)
    listed = np.full((2, n), -7.0)
    status = np.full(n, 255, np.uint8)
    pre = np.zeros(n, np.uint8) if pre_status is None else np.asarray(pre_status, np.uint8)
    if not use_q:
        Q = P
    kernel(P.offsets, P.id_offsets, P.ids, P.values, P.mask, 0, P.dense, 0,
                   Q.offsets, Q.id_offsets, Q.ids, Q.values, Q.mask, 0, Q.dense, 0,
                   pre, use_q, P.kind, Q.kind, -1 if vocab is None else vocab,
                   _registry.TAILS.index(tail), want_bounds, SUM_TOL, 1.0 / math.log(base), 0.5, 0.0,
                   slots, out, lower, upper, listed, status, 0, n)
    res = {m: (out[j], lower[j], upper[j]) for j, m in enumerate(measures)}
    return res, listed, status


# ------------------------------------------------------------ comparisons


def close(a: float, b: float, tol: float) -> bool:
    if math.isinf(a) or math.isinf(b) or math.isnan(a) or math.isnan(b):
        return a == b or (math.isnan(a) and math.isnan(b))
    return abs(a - b) <= tol * (1 + abs(b))


def le(a: float, b: float, tol: float) -> bool:
    """a <= b up to tol (infinities compare exactly)."""
    if math.isinf(a) or math.isinf(b):
        return a <= b
    return a <= b + tol * (1 + abs(b))


def clamp(m: str, x: float) -> float:
    """Into the measure's range, as the kernel writes it (rounding never leaves it)."""
    lo, hi = _registry.measure_range(m)
    return min(max(x, lo), hi)


def reference(m: str, tail: str, data, vocab, kw) -> float:
    if tail == "bucket":
        x = ns.bucket(m, *data, vocab=vocab, **kw)
    elif tail == "renormalize":
        x = ns.renormalize(m, *data, vocab=vocab, **kw)
    else:
        x = ns.uniform(m, *data, vocab=vocab, **kw)
    return clamp(m, x)


# ------------------------------------------------------------ strategies


@st.composite
def pair_rows(draw, max_V: int = 7, n_rows: int = 3):
    """Positions with their full pairs: [(p_full, q_full, p_ids, q_ids)] over one V."""
    V = draw(st.integers(1, max_V))
    rows = []
    for _ in range(n_rows):
        p = draw(distribution(V))
        relation = draw(st.sampled_from(["independent", "equal", "disjoint"]))
        if relation == "equal":
            q = p.copy()
        elif relation == "disjoint" and V >= 2:
            q = np.empty(V)
            q[np.argsort(p)] = np.sort(draw(distribution(V)))[::-1]
        else:
            q = draw(distribution(V))
        k_p = draw(st.sampled_from([1, V, draw(st.integers(1, V))]))
        k_q = draw(st.one_of(st.just(k_p), st.integers(1, V)))
        p_ids, q_ids = top_k(p, k_p), top_k(q, k_q)
        if draw(st.booleans()):  # top-k lists are often sorted by value; not always
            p_ids = p_ids[list(draw(st.permutations(range(k_p))))]
        rows.append((p, q, p_ids, q_ids))
    return V, rows


def _sides(V, rows, dtype, p_kind, q_kind, dense, id_dtype=np.int64):
    p_dense = dense == "p"
    q_dense = dense == "q"
    P = Side([(np.arange(V), p) if p_dense else (ids, p[ids]) for p, _, ids, _ in rows], dtype, p_kind,
             id_dtype, p_dense)
    Q = Side([(np.arange(V), q) if q_dense else (ids, q[ids]) for _, q, _, ids in rows], dtype, q_kind,
             id_dtype, q_dense)
    return P, Q


dtypes = st.sampled_from([np.float64, np.float32])
kinds = st.sampled_from([PROBS, LOGPROBS])


@settings(max_examples=max(10, settings.default.max_examples // 2))
@given(pair_rows(), dtypes, kinds, kinds, st.sampled_from(["none", "p", "q"]), st.booleans(),
       st.sampled_from(["bucket", "renormalize", "uniform"]))
def test_estimates_and_bounds_equal_the_reference(pr, dtype, p_kind, q_kind, dense, with_vocab, tail):
    V, rows = pr
    vocab = V if (with_vocab or tail == "uniform") else None
    P, Q = _sides(V, rows, dtype, p_kind, q_kind, dense)
    res, listed, status = run(P, Q, vocab=vocab, tail=tail)
    assert (status == 0).all(), status
    eff_vocab = vocab if vocab is not None else (V if dense != "none" else None)
    f32 = dtype == np.float32
    for r, (p, q, _, _) in enumerate(rows):
        p_ids, p_seen = P.seen(r)
        q_ids, q_seen = Q.seen(r)
        data = (p_ids, p_seen, q_ids, q_seen)
        kw = rounding(P, Q, r)
        assert close(listed[0, r], 1.0 if P.dense else min(p_seen.sum(), 1.0), 1e-12)
        assert close(listed[1, r], 1.0 if Q.dense else min(q_seen.sum(), 1.0), 1e-12)
        for m in MEASURES:
            est, lo, hi = (float(a[r]) for a in res[m])
            want = reference(m, tail, data, eff_vocab, kw)
            n_lo, n_hi = ns.bounds(m, *data, vocab=eff_vocab, **kw)
            truth = ns.full_value(m, p, q)
            note(f"row {r} {m}: est={est} ref={want}; lower={lo} ref={n_lo}; upper={hi} ref={n_hi}; true={truth}")
            assert close(est, want, 1e-9), (m, est, want)
            # float32 rows: kl and reverse_kl of near-equal rows are ~1e-7 of rounding, which the
            # reference clamps at 0 one by one before summing jeffreys' upper bound; the kernel sums first
            b_tol = 1e-6 if f32 else 1e-7
            assert close(lo, n_lo, b_tol), (m, lo, n_lo)
            assert close(hi, n_hi, b_tol), (m, hi, n_hi)
            t_tol = 1e-5 if f32 else 1e-9
            assert le(lo, truth, t_tol) and le(truth, hi, t_tol), (m, lo, truth, hi)
            if tail == "bucket":
                assert le(est, lo, t_tol), (m, est, lo)


@settings(max_examples=max(5, settings.default.max_examples // 6))
@given(pair_rows(max_V=40, n_rows=2), dtypes, st.booleans())
def test_bounds_contain_the_truth_on_larger_vocabularies(pr, dtype, with_vocab):
    """Larger V (more room for the pools): bucket <= lower <= true <= upper, and the reference agrees."""
    V, rows = pr
    vocab = V if with_vocab else None
    P, Q = _sides(V, rows, dtype, PROBS, LOGPROBS, "none")
    res, _, status = run(P, Q, vocab=vocab)
    assert (status == 0).all()
    for r, (p, q, _, _) in enumerate(rows):
        data = (*P.seen(r), *Q.seen(r))
        kw = rounding(P, Q, r)
        for m in MEASURES:
            est, lo, hi = (float(a[r]) for a in res[m])
            truth = ns.full_value(m, p, q)
            t_tol = 1e-5 if dtype == np.float32 else 1e-9
            # float32: the cap and the residue allow for rounding, so bucket <= lower holds to rounding only
            assert le(est, lo, t_tol) and le(lo, truth, t_tol) and le(truth, hi, t_tol), (m, est, lo, truth, hi)
            n_lo, n_hi = ns.bounds(m, *data, vocab=vocab, **kw)
            b_tol = 1e-6 if dtype == np.float32 else 1e-7
            assert close(lo, n_lo, b_tol) and close(hi, n_hi, b_tol), (m, lo, n_lo, hi, n_hi)


@settings(max_examples=max(10, settings.default.max_examples // 3))
@given(st.integers(2, 6), st.data(), dtypes)
def test_bounds_on_lists_that_are_not_top_k_equal_the_reference(V, data, dtype):
    """Random id subsets (not the top k): the caps are relaxed (docs §1), a pool side may sit at its
    cap, and the kernel takes its bisection path; it must still equal the reference."""
    rows = []
    for _ in range(3):
        p = data.draw(distribution(V))
        q = data.draw(distribution(V))
        k_p = data.draw(st.integers(1, V))
        k_q = data.draw(st.integers(1, V))
        p_ids = np.array(data.draw(st.permutations(range(V))))[:k_p]
        q_ids = np.array(data.draw(st.permutations(range(V))))[:k_q]
        rows.append((p, q, p_ids, q_ids))
    P, Q = _sides(V, rows, dtype, PROBS, PROBS, "none")
    res, _, status = run(P, Q, vocab=V)
    assert (status == 0).all()
    for r in range(len(rows)):
        d = (*P.seen(r), *Q.seen(r))
        kw = rounding(P, Q, r)
        for m in MEASURES:
            est, lo, hi = (float(a[r]) for a in res[m])
            n_lo, n_hi = ns.bounds(m, *d, vocab=V, **kw)
            note(f"row {r} {m}: lower={lo} ref={n_lo}; upper={hi} ref={n_hi}")
            assert close(lo, n_lo, 1e-7) and close(hi, n_hi, 1e-7), (m, lo, n_lo, hi, n_hi)
            assert close(est, clamp(m, ns.bucket(m, *d, vocab=V, **kw)), 1e-9), m


@st.composite
def with_zeros(draw, V: int) -> np.ndarray:
    """A distribution with exact zeros (listed zeros: log-probs of -inf)."""
    p = np.array(draw(st.lists(st.sampled_from([0.0, 0.0, 1.0, 2.0, 5.0]), min_size=V, max_size=V)))
    if p.sum() == 0:
        p[draw(st.integers(0, V - 1))] = 1.0
    return p / p.sum()


@settings(max_examples=max(10, settings.default.max_examples // 4))
@given(st.integers(2, 7), st.data(), kinds, st.booleans())
def test_listed_zeros_keep_bucket_le_lower_le_true_le_upper(V, data, kind, with_vocab):
    """Zeros among the listed values (a cap of 0, zero weights in the water-fills). Only the
    containment is checked: the reference's water_fill is not meant for zero weights."""
    rows = []
    for _ in range(3):
        p = data.draw(with_zeros(V))
        q = data.draw(st.one_of(st.just(p), with_zeros(V)))
        rows.append((p, q, top_k(p, data.draw(st.integers(1, V))), top_k(q, data.draw(st.integers(1, V)))))
    P, Q = _sides(V, rows, np.float64, kind, kind, "none")
    res, _, status = run(P, Q, vocab=V if with_vocab else None)
    assert (status == 0).all()
    for r, (p, q, _, _) in enumerate(rows):
        for m in MEASURES:
            est, lo, hi = (float(a[r]) for a in res[m])
            truth = ns.full_value(m, p, q)
            note(f"row {r} {m}: bucket={est} lower={lo} true={truth} upper={hi}")
            assert le(est, lo, 1e-9) and le(lo, truth, 1e-9) and le(truth, hi, 1e-9), m


@pytest.mark.parametrize("with_vocab", [False, True])
@pytest.mark.parametrize("kind", [PROBS, LOGPROBS])
def test_unlisted_mass_that_exactly_fills_the_cap_beside_a_listed_zero(kind, with_vocab):
    """P = Q = (0, 0, 1/6, 1/6, 1/3, 1/3), P lists its top 3, Q its top 5 (one listed 0): P's
    unlisted 1/6 fits exactly on the other 1/6, so kl's lower bound is 0. The rounding of
    P's listed sum (1 - 5/6 is 1/6 + 8e-17) once spilled onto the listed 0 and gave +inf."""
    p = np.array([0.0, 0.0, 1 / 6, 1 / 6, 1 / 3, 1 / 3])
    rows = [(p, p, np.array([4, 5, 2]), np.array([4, 5, 2, 3, 0]))]
    P, Q = _sides(6, rows, np.float64, kind, kind, "none")
    res, _, status = run(P, Q, vocab=6 if with_vocab else None)
    assert (status == 0).all()
    for m in MEASURES:
        est, lo, hi = (float(a[0]) for a in res[m])
        truth = ns.full_value(m, p, p)
        assert le(est, lo, 1e-9) and le(lo, truth, 1e-9) and le(truth, hi, 1e-9), (m, est, lo, truth, hi)


def test_entropy_alone_reads_only_p():
    """use_q=False: Q is P (all of P compared one by one), Q's buffers are not read."""
    p = np.array([0.5, 0.2, 0.1, 0.1, 0.1])
    ids = np.array([3, 0, 4])
    P = Side([(ids, p[[0, 1, 2]])])
    res, listed, status = run(P, P, vocab=5, measures=("entropy",), use_q=False)
    assert status[0] == 0 and math.isnan(listed[1, 0])
    est, lo, hi = (a[0] for a in res["entropy"])
    data = (ids, p[:3], ids, p[:3])
    assert close(est, ns.bucket("entropy", *data, vocab=5), 1e-12)
    n_lo, n_hi = ns.bounds("entropy", *data, vocab=5)
    assert close(lo, n_lo, 1e-12) and close(hi, n_hi, 1e-12)
    assert le(lo, ns.full_value("entropy", p, p), 1e-12) and le(ns.full_value("entropy", p, p), hi, 1e-12)


def test_base_scales_the_log_measures_only():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(20))
    q = rng.dirichlet(np.ones(20))
    P = Side([(top_k(p, 5), p[top_k(p, 5)])])
    Q = Side([(top_k(q, 6), q[top_k(q, 6)])])
    nat, _, _ = run(P, Q, vocab=20)
    bits, _, _ = run(P, Q, vocab=20, base=2.0)
    for m in MEASURES:
        for j in range(3):
            a, b = float(nat[m][j][0]), float(bits[m][j][0])
            want = a / math.log(2.0) if m in LOG_MEASURES else a
            assert close(b, want, 1e-12), (m, j, a, b)


def test_no_bounds_leaves_lower_and_upper_alone():
    p = np.array([0.6, 0.3, 0.1])
    P = Side([([0, 1], p[:2])])
    Q = Side([([1, 2], [0.5, 0.2])])
    res, _, _ = run(P, Q, vocab=3, want_bounds=False)
    for m in MEASURES:
        est, lo, hi = (a[0] for a in res[m])
        assert np.isfinite(est) or est == math.inf
        assert lo == -7.0 and hi == -7.0


# ------------------------------------------------------------ bad rows


GOOD_P = (np.array([2, 0, 5]), np.array([0.5, 0.25, 0.125]))
GOOD_Q = (np.array([0, 1]), np.array([0.6, 0.3]))


def _bad_cases():
    """(name, P rows-spec, Q rows-spec, vocab, expected status): each with one fault in row 1."""
    p_ids, p_vals = GOOD_P
    q_ids, q_vals = GOOD_Q
    cases = [
        ("ids_length_mismatch", (p_ids[:2], p_vals), None, 8),
        ("id_out_of_range", (np.array([2, 0, 8]), p_vals), None, 8),
        ("id_out_of_range", (np.array([2, -1, 5]), p_vals), None, None),
        ("duplicate_id", (np.array([2, 0, 2]), p_vals), None, 8),
        ("duplicate_id", None, (np.array([1, 1]), q_vals), 8),
        ("nan", (p_ids, np.array([0.5, np.nan, 0.1])), None, 8),
        ("non_finite", (p_ids, np.array([0.5, np.inf, 0.1])), None, 8),
        ("negative", (p_ids, np.array([0.5, -0.1, 0.1])), None, 8),
        ("not_normalized", (p_ids, np.array([0.5, 0.4, 0.2])), None, 8),
        ("empty", (np.zeros(0, int), np.zeros(0)), None, 8),
        ("empty", None, (np.zeros(0, int), np.zeros(0)), 8),
    ]
    return cases


def _three_rows(bad_p, bad_q):
    p_rows = [GOOD_P, bad_p if bad_p is not None else GOOD_P, GOOD_P]
    q_rows = [GOOD_Q, bad_q if bad_q is not None else GOOD_Q, GOOD_Q]
    return p_rows, q_rows


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_gets_its_status_and_leaves_other_rows(case, dtype):
    name, bad_p, bad_q, vocab = case
    p_rows, q_rows = _three_rows(bad_p, bad_q)
    P = Side(p_rows, dtype)
    if name == "ids_length_mismatch":  # the ids list of row 1 is shorter than its values
        P = Side(p_rows, dtype)
        P.rows[1] = (p_ids_short := P.rows[1][0], P.rows[1][1])
        ids = [np.asarray(r[0], np.int64) for r in p_rows]
        P.id_offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64)
        P.ids = np.concatenate(ids)
        P.offsets = np.array([0, 3, 6, 9], np.int64)
        P.values = np.concatenate([GOOD_P[1]] * 3).astype(dtype)
        assert len(p_ids_short) == 2
    Q = Side(q_rows, dtype)
    good, _, _ = run(Side([GOOD_P] * 3, dtype), Side([GOOD_Q] * 3, dtype), vocab=vocab)
    res, listed, status = run(P, Q, vocab=vocab)
    assert status[1] == SC[name], (status, name)
    assert status[0] == 0 and status[2] == 0
    for m in MEASURES:
        for j in range(3):
            assert math.isnan(res[m][j][1])
            for r in (0, 2):
                assert res[m][j][r] == good[m][j][r]
    assert np.isnan(listed[:, 1]).all() and np.isfinite(listed[:, [0, 2]]).all()


def test_logprob_faults():
    """Log-probs: > sum_tol is negative, +inf is non_finite, -inf is a zero probability (fine)."""
    p_ids, _ = GOOD_P
    rows = [(p_ids, np.array([-0.7, 0.5, -2.0])), (p_ids, np.array([-0.7, np.inf, -2.0])),
            (p_ids, np.array([-0.7, -np.inf, -2.0]))]
    P = Side(rows, kind=PROBS)
    P.kind = LOGPROBS
    P.values = np.concatenate([r[1] for r in rows])
    res, _, status = run(P, Side([GOOD_Q] * 3), vocab=8)
    assert list(status) == [SC["negative"], SC["non_finite"], 0]


def test_null_element_and_pre_status():
    P = Side([GOOD_P] * 4)
    Q = Side([GOOD_Q] * 4)
    # element 1 of row 2 (value index 7) is null in P
    bits = np.ones(12, bool)
    bits[7] = False
    P.mask = np.packbits(bits, bitorder="little")
    pre = [0, SC["null"], 0, SC["mask_length_mismatch"]]
    res, listed, status = run(P, Q, vocab=8, pre_status=pre)
    assert list(status) == [0, SC["null"], SC["null_element"], SC["mask_length_mismatch"]]
    for m in MEASURES:
        assert np.isfinite(res[m][0][0]) or res[m][0][0] == math.inf
        assert np.isnan(res[m][0][1:]).all()


def test_dense_side_must_list_the_vocabulary():
    """A dense side with vocab given must have k = vocab (else length_mismatch);
    without vocab its k is the vocabulary: the other side's ids must lie below it."""
    P = Side([(np.arange(3), [0.5, 0.3, 0.2])], dense=True)
    Q = Side([GOOD_Q])
    _, _, status = run(P, Q, vocab=4)
    assert status[0] == SC["length_mismatch"]
    _, _, status = run(P, Q, vocab=3)
    assert status[0] == 0
    Q = Side([(np.array([0, 3]), [0.6, 0.3])])
    _, _, status = run(P, Q, vocab=None)
    assert status[0] == SC["id_out_of_range"]
    _, _, status = run(Q, P, vocab=None)  # dense Q, sparse P
    assert status[0] == SC["id_out_of_range"]
    P2 = Side([(np.arange(2), [0.5, 0.5])], dense=True)
    _, _, status = run(P, P2)  # two dense sides of different lengths
    assert status[0] == SC["length_mismatch"]


def test_sparse_side_listing_the_whole_vocabulary_must_sum_to_one():
    P = Side([(np.array([2, 0, 1]), [0.5, 0.3, 0.1])])
    _, _, status = run(P, Side([GOOD_Q]), vocab=3)
    assert status[0] == SC["not_normalized"]
    _, _, status = run(P, Side([GOOD_Q]), vocab=4)  # one id left for the missing 0.1
    assert status[0] == 0


def test_dense_side_not_normalized():
    P = Side([(np.arange(3), [0.5, 0.3, 0.1])], dense=True)
    _, _, status = run(P, Side([GOOD_Q]), vocab=3)
    assert status[0] == SC["not_normalized"]


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64, np.uint32, np.uint16])
def test_id_dtypes_agree(id_dtype):
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(50))
    q = rng.dirichlet(np.ones(50))
    rows = [(p, q, top_k(p, 8), top_k(q, 10))]
    P, Q = _sides(50, rows, np.float32, PROBS, PROBS, "none", id_dtype)
    P0, Q0 = _sides(50, rows, np.float32, PROBS, PROBS, "none", np.int64)
    a, _, _ = run(P, Q, vocab=50)
    b, _, _ = run(P0, Q0, vocab=50)
    for m in MEASURES:
        for j in range(3):
            assert np.array_equal(a[m][j], b[m][j], equal_nan=True)


def test_sum_within_tolerance_is_clamped():
    """Listed mass slightly above 1 (within sum_tol): r = 0, finite kl upper when Q covers P."""
    P = Side([(np.array([0, 1]), [0.6, 0.40001])])
    Q = Side([(np.array([0, 1, 2]), [0.5, 0.3, 0.2])])
    res, listed, status = run(P, Q, vocab=3)
    assert status[0] == 0 and listed[0, 0] == 1.0
    assert math.isfinite(res["kl"][2][0])


def test_status_codes_match_the_registry():
    for name in ("length_mismatch", "empty", "null_element", "nan", "non_finite", "negative", "not_normalized",
                 "ids_length_mismatch", "id_not_integer", "id_out_of_range", "duplicate_id"):
        assert getattr(sk, name.upper()) == SC[name]
    assert [getattr(sk, m.upper()) for m in _registry.MEASURES] == list(range(sk.N_MEASURES))
    assert (sk.BUCKET, sk.RENORMALIZE, sk.UNIFORM) == tuple(range(3))
    assert _registry.TAILS == ("bucket", "renormalize", "uniform")


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "uniform"])
def test_sort_merge_variant_agrees_with_the_hash_merge(tail):
    """The sort-merge kernel (kept for the merge measurement) computes the same rows."""
    rng = np.random.default_rng(7)
    V = 300
    rows = []
    for _ in range(40):
        p = rng.dirichlet(np.full(V, 0.3))
        q = rng.dirichlet(np.full(V, 0.3)) if rng.random() < 0.7 else p
        rows.append((p, q, top_k(p, int(rng.integers(1, 40))), top_k(q, int(rng.integers(1, 40)))))
    P, Q = _sides(V, rows, np.float32, LOGPROBS, PROBS, "none")
    r = int(np.argmax(np.diff(Q.id_offsets) > 1))  # one duplicate id in a row of Q
    Q.ids[Q.id_offsets[r] + 1] = Q.ids[Q.id_offsets[r]]
    a, la, sa = run(P, Q, vocab=V, tail=tail)
    assert sa[r] == SC["duplicate_id"] and (sa == 0).sum() == len(sa) - 1
    b, lb, sb = run(P, Q, vocab=V, tail=tail, kernel=sk.sparse_rows_sortmerge)
    assert np.array_equal(sa, sb) and np.array_equal(la, lb, equal_nan=True)
    for m in MEASURES:
        for j in range(3):
            assert np.allclose(a[m][j], b[m][j], rtol=1e-12, atol=1e-15, equal_nan=True), m


def test_realistic_rows_equal_the_reference(rng):
    """V = 32,000, k = 32: teacher Zipf-like, student = teacher with log-noise (docs §8's sample)."""
    V = 32_000
    rows = []
    for _ in range(2):
        p = 1.0 / np.arange(1, V + 1) ** rng.uniform(1.0, 1.3)
        rng.shuffle(p)
        p /= p.sum()
        q = np.exp(np.log(p) + rng.normal(0, 0.5, V))
        q /= q.sum()
        rows.append((p, q, top_k(p, 32), top_k(q, 32)))
    for dtype, kind in ((np.float64, PROBS), (np.float32, LOGPROBS)):
        P, Q = _sides(V, rows, dtype, kind, kind, "none")
        res, _, status = run(P, Q, vocab=V)
        assert (status == 0).all()
        for r, (p, q, _, _) in enumerate(rows):
            d = (*P.seen(r), *Q.seen(r))
            kw = rounding(P, Q, r)
            for m in MEASURES:
                est, lo, hi = (float(a[r]) for a in res[m])
                n_lo, n_hi = ns.bounds(m, *d, vocab=V, **kw)
                truth = ns.full_value(m, p, q)
                assert close(est, clamp(m, ns.bucket(m, *d, vocab=V, **kw)), 1e-9), m
                assert close(lo, n_lo, 1e-9) and close(hi, n_hi, 1e-9), (m, lo, n_lo, hi, n_hi)
                assert le(est, lo, 1e-9) and le(lo, truth, 1e-6) and le(truth, hi, 1e-6), m


@settings(max_examples=max(5, settings.default.max_examples // 10))
@given(st.integers(2, 5), st.data())
def test_kl_upper_against_a_dense_side_is_the_brute_force_maximum(V, data):
    """P sparse against Q dense: P's unlisted mass can only sit where Q is known, so kl's upper bound is
    finite and exact (the caps on the smallest q); likewise reverse_kl with the sides swapped."""
    p = data.draw(distribution(V))
    q = data.draw(distribution(V))
    k = data.draw(st.integers(1, V))
    for dense in ("q", "p"):
        rows = [(p, q, top_k(p, k), top_k(q, k))]
        P, Q = _sides(V, rows, np.float64, PROBS, PROBS, dense)
        res, _, status = run(P, Q, vocab=V)
        assert status[0] == 0
        m = "kl" if dense == "q" else "reverse_kl"
        hi = float(res[m][2][0])
        _, e_hi = ns.extreme_completions(m, *P.seen(0), *Q.seen(0), vocab=V, starts=2)
        note(f"{m} dense={dense}: upper={hi} brute max={e_hi}")
        assert math.isfinite(hi) and close(hi, e_hi, 1e-6), (m, hi, e_hi)


def test_minus_inf_logprob_is_a_listed_zero():
    """A listed log-prob of -inf is p = 0 (a cap of 0, relaxed when mass is unlisted), not a NaN
    in the rounding threshold that would silently drop the unlisted mass."""
    P = Side([(np.array([0, 1]), [0.5, 0.0])], kind=LOGPROBS)
    Q = Side([(np.array([0, 2]), [0.4, 0.3])])
    res, listed, status = run(P, Q, vocab=5)
    assert status[0] == 0 and listed[0, 0] == 0.5
    d = (np.array([0, 1]), np.array([0.5, 0.0]), np.array([0, 2]), np.array([0.4, 0.3]))
    for m in ("entropy", "tv", "kl"):
        n_lo, n_hi = ns.bounds(m, *d, vocab=5)
        assert close(res[m][1][0], n_lo, 1e-9) and close(res[m][2][0], n_hi, 1e-9), m
    assert res["entropy"][1][0] > 1.0  # the unlisted 0.5 counts (without it: 0.5 log 2 = 0.35)
