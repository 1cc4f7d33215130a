"""Bad rows (SPEC §4): every reason, under on_invalid="null" (status column,
null values, the other rows untouched) and "raise" (InvalidRowError with the
reason, the first invalid row and the count); null lists are never errors."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import fastkl
import naive
from naive import MEASURES, chunked, list_array

INF, NAN = math.inf, math.nan
L = math.log

VALID = {
    "probs": ([0.2, 0.3, 0.5], [0.3, 0.3, 0.4]),
    "logprobs": ([L(0.2), L(0.3), L(0.5)], [L(0.3), L(0.3), L(0.4)]),
    "logits": ([1.0, 0.0, -1.0], [0.5, 2.0, -3.0]),
}

# (kind, p row, q row, reason, extra options); rows of 3 unless the case is about lengths.
SINGLE_PROBLEM = [
    # probs
    ("probs", [NAN, 0.5, 0.5], None, "nan", {}),
    ("probs", None, [0.5, NAN, 0.5], "nan", {}),
    ("probs", [INF, 0.0, 0.0], None, "non_finite", {}),
    ("probs", None, [0.5, 0.5, -INF], "non_finite", {}),
    ("probs", [-0.1, 0.6, 0.5], None, "negative", {}),
    ("probs", None, [0.5, 0.6, -0.1], "negative", {}),
    ("probs", [0.2, 0.3, 0.6], None, "not_normalized", {}),
    ("probs", None, [0.1, 0.1, 0.1], "not_normalized", {}),
    ("probs", [0.0, 0.0, 0.0], None, "not_normalized", {"normalize": True}),
    ("probs", [-1.0, 2.0, 2.0], None, "negative", {"normalize": True}),
    ("probs", [0.5, None, 0.5], None, "null_element", {}),
    ("probs", None, [None, 0.5, 0.5], "null_element", {}),
    ("probs", [0.5, 0.5], None, "length_mismatch", {}),
    ("probs", None, [0.25, 0.25, 0.25, 0.25], "length_mismatch", {}),
    ("probs", [], [], "empty", {}),
    # logprobs
    ("logprobs", [NAN, L(0.5), L(0.5)], None, "nan", {}),
    ("logprobs", None, [L(0.5), L(0.5), INF], "non_finite", {}),
    ("logprobs", [0.5, -INF, -INF], None, "negative", {}),  # a positive log-prob beyond sum_tol
    ("logprobs", None, [L(0.2), L(0.3), L(0.6)], "not_normalized", {}),
    ("logprobs", [-INF, -INF, -INF], None, "not_normalized", {}),  # sum of probabilities 0
    ("logprobs", [L(0.5), None, L(0.5)], None, "null_element", {}),
    ("logprobs", [], [], "empty", {}),
    # logits
    ("logits", [NAN, 0.0, 1.0], None, "nan", {}),
    ("logits", None, [1.0, INF, 0.0], "non_finite", {}),
    ("logits", [-INF, -INF, -INF], None, "non_finite", {}),  # no finite logit
    ("logits", None, [0.0, None, 1.0], "null_element", {}),
    ("logits", [1.0, 2.0], None, "length_mismatch", {}),
    ("logits", [], [], "empty", {}),
]

# Rows that look odd but are valid.
VALID_EDGES = [
    ("probs", [-0.0, 0.5, 0.5], None, {}),  # negative zero is a zero
    ("probs", [0.2, 0.3, 0.5 + 9e-4], None, {}),  # within sum_tol
    ("probs", [2.0, 3.0, 5.0], None, {"normalize": True}),
    ("logprobs", [5e-4, -INF, -INF], None, {}),  # log(1.0005): positive but within sum_tol
    ("logprobs", [L(0.5), -INF, L(0.5)], None, {}),  # -inf is probability 0
    ("logprobs", [-3.0, -3.0, -3.0], None, {"normalize": True}),
    ("logits", [-INF, 0.0, -INF], None, {}),  # masked entries, one finite
    ("logits", [-1e5, 0.0, 1e5], None, {}),
]


def _case_id(case):
    kind, p, q, reason = case[:4]
    side = "p" if p is not None else "q"
    return f"{kind}-{reason}-{side}"


def _rows(kind, n, rng, k=3):
    P = naive.make_rows(rng, kind, n, k, zero_frac=0.0)
    Q = naive.make_rows(rng, kind, n, k, zero_frac=0.0)
    return [list(map(float, r)) for r in P], [list(map(float, r)) for r in Q]


def _insert(kind, p_bad, q_bad, pos, n, rng):
    """n valid rows with the bad row at `pos`."""
    P, Q = _rows(kind, n, rng)
    vp, vq = VALID[kind]
    P[pos] = list(p_bad) if p_bad is not None else list(vp)
    Q[pos] = list(q_bad) if q_bad is not None else list(vq)
    return P, Q


def _containers(P, Q):
    """numpy when every row has one length and no null element; Arrow always."""
    out = {}
    if len({len(r) for r in P + Q}) == 1 and all(v is not None for r in P + Q for v in r) and P[0]:
        out["numpy"] = (np.array(P, dtype=np.float64), np.array(Q, dtype=np.float64))
    out["arrow"] = (list_array(P, "float64", "list", pad=2), list_array(Q, "float64", "large_list"))
    out["pylist"] = (P, Q)
    return out


def col(table, m):
    return table.column(m).to_pylist()


# --------------------------------------------------------------------------
# every reason, alone in a row


@pytest.mark.parametrize("case", SINGLE_PROBLEM, ids=_case_id)
@pytest.mark.parametrize("pos", [0, 3, 5])
def test_single_problem_row(case, pos, rng):
    kind, p_bad, q_bad, reason, extra = case
    n = 6
    P, Q = _insert(kind, p_bad, q_bad, pos, n, rng)
    assert naive.row_status(P[pos], Q[pos], kind=kind, **extra) == {reason}  # the oracle agrees
    opts = dict(kind=kind, **extra)
    good = [i for i in range(n) if i != pos]
    # the valid rows alone, for comparison
    clean = fastkl.divergences([P[i] for i in good], [Q[i] for i in good], measures=MEASURES, **naive.params(MEASURES), **opts)
    for name, (ip, iq) in _containers(P, Q).items():
        t = fastkl.divergences(ip, iq, measures=MEASURES, **naive.params(MEASURES), status=True, on_invalid="null", **opts)
        expected_status = ["ok"] * n
        expected_status[pos] = reason
        assert col(t, "status") == expected_status, name
        for m in MEASURES:
            vals = col(t, m)
            assert vals[pos] is None, (name, m)
            assert [vals[i] for i in good] == col(clean, m), (name, m)
        # per-measure functions: NaN at the bad row
        kl = fastkl.kl(ip, iq, on_invalid="null", **opts)
        assert np.isnan(kl[pos]) and np.isfinite(kl[good]).all()

        with pytest.raises(fastkl.InvalidRowError) as info:
            fastkl.divergences(ip, iq, measures=("kl",), **opts)  # on_invalid="raise" is the default
        err = info.value
        assert (err.reason, err.row, err.count) == (reason, pos, 1), name
        assert isinstance(err, ValueError)
        assert reason in str(err) and f"row {pos}" in str(err)
        with pytest.raises(fastkl.InvalidRowError):
            fastkl.kl(ip, iq, on_invalid="raise", **opts)


@pytest.mark.parametrize("case", VALID_EDGES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_valid_edge_rows(case):
    kind, p, q, extra = case
    q = q or VALID[kind][1]
    assert naive.row_status(p, q, kind=kind, **extra) == {"ok"}
    t = fastkl.divergences([p], [q], measures=MEASURES, **naive.params(MEASURES), status=True, kind=kind, **extra)
    assert col(t, "status") == ["ok"]
    refs = naive.reference_rows([p], [q], MEASURES, kind=kind, **extra)
    for m in MEASURES:
        assert not naive.check_against_reference(col(t, m), refs[m], 1e-12, what=m), m


@pytest.mark.parametrize("kind", naive.KINDS)
def test_entropy_checks_only_p(kind, rng):
    P, _ = _rows(kind, 4, rng)
    P[2] = [NAN, 0.0, 0.0]
    t = fastkl.divergences(P, measures=("entropy",), status=True, on_invalid="null", kind=kind)
    assert col(t, "status") == ["ok", "ok", "nan", "ok"]
    with pytest.raises(fastkl.InvalidRowError) as info:
        fastkl.entropy(P, kind=kind)
    assert (info.value.reason, info.value.row, info.value.count) == ("nan", 2, 1)
    h = fastkl.entropy(P, kind=kind, on_invalid="null")
    assert np.isnan(h[2]) and np.isfinite(h[[0, 1, 3]]).all()


# --------------------------------------------------------------------------
# several bad rows, null rows


def test_first_invalid_row_and_count(rng):
    n = 10
    P, Q = _rows("probs", n, rng)
    P[3] = [0.5, 0.5, 0.5]  # not_normalized
    Q[5] = [NAN, 0.5, 0.5]  # nan
    P[8] = [-0.5, 1.0, 0.5]  # negative
    P[1] = None  # null: not an error, not counted
    Q[6] = None
    for ip, iq in [
        (P, Q),
        (list_array(P, "float32", "list", pad=1), chunked(list_array(Q, "float64", "list"), [4, 7])),
    ]:
        t = fastkl.divergences(ip, iq, measures=("kl", "tv"), status=True, on_invalid="null")
        st = col(t, "status")
        assert st == ["ok", "null", "ok", "not_normalized", "ok", "nan", "null", "ok", "negative", "ok"]
        assert [v is None for v in col(t, "tv")] == [s != "ok" for s in st]
        with pytest.raises(fastkl.InvalidRowError) as info:
            fastkl.divergences(ip, iq, measures=("kl", "tv"))
        assert (info.value.reason, info.value.row, info.value.count) == ("not_normalized", 3, 3)
        assert "row 3" in str(info.value) and "not_normalized" in str(info.value)


def test_null_rows_are_not_errors(rng):
    P, Q = _rows("probs", 5, rng)
    P[0] = None
    Q[2] = None
    P[4] = None
    Q[4] = [NAN, NAN, NAN]  # null on one side wins over invalid on the other
    Q[3] = None
    P[3] = [0.9, 0.9, 0.9]
    for ip, iq in [(P, Q), (list_array(P, "float64", "fixed_size_list"), list_array(Q, "float32", "list"))]:
        t = fastkl.divergences(ip, iq, measures=MEASURES, **naive.params(MEASURES), status=True)  # on_invalid="raise": no error
        assert col(t, "status") == ["null", "ok", "null", "null", "null"]
        for m in MEASURES:
            vals = col(t, m)
            assert [v is None for v in vals] == [True, False, True, True, True], m
        for m in MEASURES:
            fn = getattr(fastkl, m)
            out = fn(ip, on_invalid="null") if m == "entropy" else fn(ip, iq, **naive.params((m,)))
            assert np.isnan(out[0]) and np.isfinite(out[1]), m
        with pytest.raises(fastkl.InvalidRowError) as info:  # entropy reads only P: row 3 is invalid
            fastkl.entropy(ip)
        assert (info.value.reason, info.value.row) == ("not_normalized", 3)


def test_all_rows_invalid(rng):
    P = np.full((4, 3), 0.5)
    t = fastkl.divergences(P, P, measures=MEASURES, **naive.params(MEASURES), status=True, on_invalid="null")
    assert col(t, "status") == ["not_normalized"] * 4
    assert all(v is None for m in MEASURES for v in col(t, m))
    with pytest.raises(fastkl.InvalidRowError) as info:
        fastkl.js(P, P)
    assert (info.value.reason, info.value.row, info.value.count) == ("not_normalized", 0, 4)
    assert "4" in str(info.value)


def test_sum_tol_applies_to_the_reason():
    p = [[0.2, 0.3, 0.5 + 5e-4]]
    q = [[0.3, 0.3, 0.4]]
    assert col(fastkl.divergences(p, q, status=True), "status") == ["ok"]
    with pytest.raises(fastkl.InvalidRowError) as info:
        fastkl.divergences(p, q, sum_tol=1e-4)
    assert info.value.reason == "not_normalized"
    lp = [[1e-3 / 2, -INF, -INF]]  # positive log-prob: fine with the default tolerance...
    lq = [[0.0, -INF, -INF]]
    assert col(fastkl.divergences(lp, lq, status=True, kind="logprobs"), "status") == ["ok"]
    t = fastkl.divergences(lp, lq, status=True, kind="logprobs", sum_tol=1e-4, on_invalid="null")
    assert col(t, "status")[0] in ("negative", "not_normalized")  # ...both are beyond 1e-4 now


def test_invalid_row_error_pickles():
    try:
        fastkl.kl([[0.5, 0.5], [NAN, 1.0]], [[0.5, 0.5], [0.5, 0.5]])
    except fastkl.InvalidRowError as e:
        err = e
    else:
        raise AssertionError("no error")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.row, back.count) == (err.reason, err.row, err.count) == ("nan", 1, 1)
    assert str(back) == str(err)


# --------------------------------------------------------------------------
# random mixtures against the naive oracle

CORRUPTIONS = ("nan", "posinf", "neginf", "negative", "scale", "null_element", "truncate", "all_neginf", "zero")


def _corrupt(row, how, kind, rng):
    row = list(row)
    if not row:
        return row
    j = int(rng.integers(len(row)))
    if how == "nan":
        row[j] = NAN
    elif how == "posinf":
        row[j] = INF
    elif how == "neginf":
        row[j] = -INF
    elif how == "negative":
        row[j] = -0.25 if kind == "probs" else 0.5
    elif how == "scale":
        f = (lambda v: v * 1.5) if kind == "probs" else (lambda v: v + L(1.5))
        row = [None if v is None else f(v) for v in row]
    elif how == "null_element":
        row[j] = None
    elif how == "truncate":
        row = row[:-1]
    elif how == "all_neginf":
        row = [-INF] * len(row)
    elif how == "zero":
        row[j] = 0.0
    return row


def mess_up(draw, rng, P, Q, kind_p, kind_q, hows=CORRUPTIONS):
    """Draw, per row pair, in place: keep it, corrupt one or two sides (a way from
    `hows` each), make either side null, or make both empty."""
    for i in range(len(P)):
        what = draw(st.sampled_from(["ok", "ok", "corrupt", "corrupt", "corrupt2", "null_p", "null_q", "empty"]))
        if what == "null_p":
            P[i] = None
        elif what == "null_q":
            Q[i] = None
        elif what == "empty":
            P[i], Q[i] = [], []
        elif what.startswith("corrupt"):
            for _ in range(2 if what == "corrupt2" else 1):
                side = draw(st.sampled_from("pq"))
                how = draw(st.sampled_from(hows))
                if side == "p":
                    P[i] = _corrupt(P[i], how, kind_p, rng)
                else:
                    Q[i] = _corrupt(Q[i], how, kind_q, rng)


@st.composite
def messy_batches(draw):
    kind_p = draw(st.sampled_from(naive.KINDS))
    kind_q = draw(st.sampled_from([kind_p, *naive.KINDS]))
    n = draw(st.integers(1, 12))
    k = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    P = [list(map(float, r)) for r in naive.make_rows(rng, kind_p, n, k)]
    Q = [list(map(float, r)) for r in naive.make_rows(rng, kind_q, n, k)]
    mess_up(draw, rng, P, Q, kind_p, kind_q)
    opts = dict(p_kind=kind_p, q_kind=kind_q, normalize=draw(st.booleans()))
    layout = draw(st.sampled_from(["pylist", "list", "large_list"]))
    pad = draw(st.integers(0, 2))
    cuts = draw(st.lists(st.integers(0, n), max_size=2))
    return P, Q, opts, layout, pad, cuts


@given(messy_batches())
def test_random_bad_rows_against_oracle(batch):
    P, Q, opts, layout, pad, cuts = batch
    note(f"P={P}\nQ={Q}\nopts={opts}")
    if layout == "pylist":
        ip, iq = P, Q
    else:
        ip = list_array(P, "float64", layout, pad=pad)
        iq = list_array(Q, "float32" if pad % 2 else "float64", layout)
        if cuts:
            iq = chunked(iq, cuts)
        Q = iq.to_pylist()  # the float32 side holds rounded values
    allowed = naive.row_statuses(P, Q, **opts)
    t = fastkl.divergences(ip, iq, measures=MEASURES, **naive.params(MEASURES), status=True, on_invalid="null", **opts)
    status = col(t, "status")
    for i, (s, a) in enumerate(zip(status, allowed)):
        assert s in a, (i, s, a, P[i], Q[i])
    for m in MEASURES:
        assert [v is None for v in col(t, m)] == [s != "ok" for s in status], m
    # valid rows against the exact reference (jeffreys on rows whose sums differ
    # slightly is the subject of test_measures.py::test_results_are_clamped_into_range)
    checked = tuple(m for m in MEASURES if m != "jeffreys")
    refs = naive.reference_rows(P, Q, checked, **opts)
    rel = 1e-6 if layout != "pylist" and pad % 2 else 1e-12
    for m in checked:
        failures = naive.check_against_reference(col(t, m), refs[m], rel, what=m)
        assert not failures, failures
    # raise mode: the first invalid row, how many
    bad = [i for i, s in enumerate(status) if s not in ("ok", "null")]
    if bad:
        with pytest.raises(fastkl.InvalidRowError) as info:
            fastkl.divergences(ip, iq, measures=("kl",), **opts)
        assert (info.value.reason, info.value.row, info.value.count) == (status[bad[0]], bad[0], len(bad))
    else:
        t2 = fastkl.divergences(ip, iq, measures=("kl",), **opts)  # no error, same values
        for a, b, r in zip(col(t2, "kl"), col(t, "kl"), refs["kl"]):
            assert (a is None) == (b is None) == (r is None)
            if r is not None and math.isfinite(float(r.value)):
                assert abs(a - b) <= 2 * (rel * float(r.terms) + float(r.slack)), (a, b)
            elif r is not None:
                assert a == b == math.inf


@pytest.mark.parametrize("k", [3, 256, 4099])
@pytest.mark.parametrize("sum_tol", [0.0, 1e-6, 1e-3])
def test_float32_rows_at_the_sum_tolerance_get_the_exact_verdict(rng, k, sum_tol):
    """float32 rows are checked with a float32 sum first (fastkl.kernels.dense._probs32_terms):
    rows whose exact sum lies just inside or just outside sum_tol must get the
    verdict of the exact sum of their values, as float64 rows do."""
    rows = []
    for target in (1 - 2 * sum_tol, 1 - sum_tol, 1.0, 1 + sum_tol, 1 + 2 * sum_tol):
        for nudge in (-3e-7, -1e-8, 0.0, 1e-8, 3e-7):
            p = (rng.dirichlet(np.ones(k)) * (target + nudge)).astype(np.float32)
            # then move the largest entry so that the exact float32 sum lands nearer still
            j = int(np.argmax(p))
            p[j] = np.float32(p[j] + (target + nudge - math.fsum(map(float, p))))
            rows.append(p)
    p = np.array(rows, dtype=np.float32)
    q = np.full_like(p, np.float32(1 / k))
    q[:, 0] += np.float32(1 - math.fsum(map(float, q[0])))  # q's exact sum: as near 1 as float32 allows
    exact = [abs(math.fsum(map(float, r)) - 1) <= sum_tol for r in p]
    q_ok = abs(math.fsum(map(float, q[0])) - 1) <= sum_tol
    got = col(fastkl.divergences(p, q, measures=("kl", "entropy"), status=True, on_invalid="null",
                                 sum_tol=sum_tol), "status")
    want = ["ok" if (e and q_ok) else "not_normalized" for e in exact]
    assert got == want
    assert any(w != "ok" for w in want) and (sum_tol == 0 or any(w == "ok" for w in want))


# What kl alone's fast loops (float32, float16, bfloat16 rows; fastkl.kernels.dense
# `_kl32` / `_kl16`) must send to the exact checks: a bad value where the other
# side is 0 leaves the ratio p/q nothing to flag, so each is found another way.
ZERO_PARTNER = [
    (0.0, -1 / 256, "negative"),
    (-1 / 256, 0.0, "negative"),
    (0.0, NAN, "nan"),
    (NAN, 0.0, "nan"),
    (0.0, INF, "non_finite"),
    (0.0, -INF, "non_finite"),
    (1 / 256, 0.0, "ok"),  # kl = +inf, a correct answer
    (0.0, 0.0, "ok"),
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("case", ZERO_PARTNER, ids=lambda c: f"p={c[0]}-q={c[1]}")
@pytest.mark.parametrize("k", [4, 256])
def test_kl_alone_sees_a_bad_value_beside_a_zero(dtype, case, k):
    """Rows of powers of two (exact in every type), the value at position k - 2
    (inside the vectorised part of a row of 256) set, the row's sum kept at 1."""
    p_val, q_val, reason = case
    P = np.full((2, k), 1 / k)
    Q = P.copy()
    j = k - 2
    for row, val in ((P[1], p_val), (Q[1], q_val)):
        row[0] += row[j] - (val if math.isfinite(val) else 0.0)
        row[j] = val
    assert naive.row_status(P[1], Q[1]) == {reason}
    if dtype == "bfloat16":
        bits = lambda x: (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # exact here
        p, q, opts = bits(P), bits(Q), {"dtype": "bfloat16"}
    else:
        p, q, opts = P.astype(dtype), Q.astype(dtype), {}
    kl = fastkl.divergences(p, q, measures=("kl",), status=True, on_invalid="null", **opts)
    assert col(kl, "status") == ["ok", reason]
    if reason != "ok":
        assert col(kl, "kl")[1] is None
    else:
        ref, got = float(naive.reference("kl", P[1], Q[1]).value), col(kl, "kl")[1]
        assert got == ref if math.isinf(ref) else abs(got - ref) <= 1e-6 * abs(ref)
