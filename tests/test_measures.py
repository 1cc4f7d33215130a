"""Every measure against the exact (mpmath) reference, within SPEC §2's bound.

The bound: |got - exact| <= REL * sum_i |t_i| (REL = 1e-12 for float64
inputs, 1e-6 for float32), plus, only when the decode itself rounds (logits,
normalize, smoothing, temperature), the slack documented in naive.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import fastkl
import naive
from naive import MEASURES

DTYPES = (np.float64, np.float32)
BASES = (math.e, 2.0, 10.0)


# --------------------------------------------------------------------------
# helpers


def run_and_check(P, Q, measures, opts, rel, *, expect_status="ok"):
    """divergences(P, Q) against the exact reference for every row and measure."""
    table = fastkl.divergences(P, Q, measures=measures, **naive.params(measures), status=True, **opts)
    assert table.column_names == list(measures) + ["status"]
    for name in measures:
        assert table.schema.field(name).type == "double"
    status = table.column("status").to_pylist()
    if expect_status is not None:
        assert status == [expect_status] * len(P), status
    refs = naive.reference_rows(P, Q, measures, **opts)
    failures = []
    for name in measures:
        failures += naive.check_against_reference(table.column(name).to_pylist(), refs[name], rel, what=name)
    assert not failures, "\n".join(failures[:20])
    return table, refs


@st.composite
def sides(draw, kind, n, k, dtype, normalize):
    """Rows of one side, built from a hypothesis-drawn seed and shape parameters."""
    seed = draw(st.integers(0, 2**32 - 1))
    zero_frac = draw(st.sampled_from([0.0, 0.0, 0.2, 0.5, 0.9]))
    spread = draw(st.sampled_from([0.5, 1.0, 3.0, 10.0, 40.0]))
    rows = naive.make_rows(
        np.random.default_rng(seed), kind, n, k, dtype, zero_frac=zero_frac, spread=spread, scale=normalize
    )
    # Exact special values hypothesis likes: a one-hot row, a uniform row.
    special = draw(st.sampled_from([None, None, None, "onehot", "uniform"]))
    if special is not None and kind != "logits":
        i = draw(st.integers(0, n - 1))
        j = draw(st.integers(0, k - 1))
        row = np.zeros(k) if special == "onehot" else np.full(k, 1.0 / k)
        if special == "onehot":
            row[j] = 1.0
        if kind == "logprobs":
            with np.errstate(divide="ignore"):
                row = np.log(row)
        rows[i] = row.astype(dtype)
    return rows


@st.composite
def cases(draw, max_k=24, max_n=5, kinds=naive.KINDS, allow_decode=True, same_kind=False):
    n = draw(st.integers(1, max_n))
    k = draw(st.sampled_from([1, 2, 3, 5, 8, 13, max_k]))
    p_dtype = draw(st.sampled_from(DTYPES))
    q_dtype = draw(st.sampled_from([p_dtype, p_dtype, p_dtype, np.float32, np.float64]))
    p_kind = draw(st.sampled_from(kinds))
    q_kind = p_kind if same_kind else draw(st.sampled_from([p_kind, p_kind] + list(kinds)))
    normalize = draw(st.booleans()) if allow_decode else False
    smoothing = draw(st.sampled_from([0.0, 0.0, 0.0, 1e-9, 1e-4, 0.05])) if allow_decode else 0.0
    opts = dict(p_kind=p_kind, q_kind=q_kind, base=draw(st.sampled_from(BASES)))
    if normalize:
        opts["normalize"] = True
    if smoothing:
        opts["smoothing"] = smoothing
    for side, kind in (("p", p_kind), ("q", q_kind)):
        if kind == "logits":  # temperature only has a meaning for logits
            opts[f"{side}_temperature"] = draw(st.sampled_from([1.0, 1.0, 0.5, 0.7, 2.0, 10.0]))
    P = draw(sides(p_kind, n, k, p_dtype, normalize))
    Q = draw(sides(q_kind, n, k, q_dtype, normalize))
    measures = tuple(draw(st.permutations(MEASURES)))[: draw(st.integers(1, len(MEASURES)))]
    return P, Q, measures, opts


# --------------------------------------------------------------------------
# the oracle itself


def test_names_agree_with_fastkl():
    assert naive.MEASURES == fastkl.MEASURES
    assert naive.KINDS + ("sampled",) == fastkl.KINDS  # naive.KINDS: the encodings of distributions
    assert naive.SAMPLED_MEASURES == fastkl._registry.SAMPLED_MEASURES
    assert naive.REASONS == fastkl.REASONS
    assert set(naive.REFERENCES) == set(fastkl.MEASURES) == set(naive.SCIPY_REFERENCES)


@pytest.mark.parametrize("kind", naive.KINDS)
def test_naive_reference_agrees_with_scipy(kind, rng):
    """Self-check of the oracle: mpmath references vs scipy's own functions."""
    from scipy import stats
    from scipy.spatial import distance

    P = naive.make_rows(rng, kind, 4, 17, zero_frac=0.2, spread=2.0)
    Q = naive.make_rows(rng, kind, 4, 17, spread=2.0)
    opts = dict(kind=kind, base=2.0, temperature=1.7 if kind == "logits" else 1.0)
    refs = naive.reference_rows(P, Q, MEASURES, **opts)
    for name in MEASURES:
        vals, terms = naive.scipy_reference(name, P, Q, **opts)
        for i in range(len(P)):
            exact = float(refs[name][i].value)
            if math.isinf(exact) or math.isinf(vals[i]):
                assert exact == vals[i], (name, i)
                continue
            assert abs(exact - vals[i]) <= 1e-13 * terms[i] + 1e-300, (name, i, exact, vals[i])
    # scipy.stats.entropy and jensenshannon normalise their inputs: use normalised rows
    P64 = naive.make_probs(rng, 3, 30)
    Q64 = naive.make_probs(rng, 3, 30)
    for p, q in zip(P64, Q64):
        ps, qs = p / math.fsum(p), q / math.fsum(q)
        assert stats.entropy(ps) == pytest.approx(float(naive.REFERENCES["entropy"](ps).value), rel=1e-13)
        assert stats.entropy(ps, qs) == pytest.approx(float(naive.REFERENCES["kl"](ps, qs).value), rel=1e-12)
        assert distance.jensenshannon(ps, qs) ** 2 == pytest.approx(
            float(naive.REFERENCES["js"](ps, qs).value), rel=1e-12
        )


def test_naive_bound_rejects_a_wrong_answer():
    """The comparison is not vacuous: a value off by 1e-9 relative fails the float64 bound."""
    p, q = [0.25, 0.75], [0.5, 0.5]
    ref = naive.REFERENCES["kl"](p, q)
    exact = float(ref.value)
    assert ref.check(exact, 1e-12)[0]
    assert not ref.check(exact * (1 + 1e-9), 1e-12)[0]
    assert ref.check(exact * (1 + 1e-9), 1e-6)[0]


# --------------------------------------------------------------------------
# properties against the exact reference


@given(cases())
def test_all_measures_match_exact_reference(case):
    P, Q, measures, opts = case
    note(f"opts={opts} measures={measures}\nP={P!r}\nQ={Q!r}")
    run_and_check(P, Q, measures, opts, naive.rel_bound(P.dtype, Q.dtype))


@given(cases(allow_decode=False, kinds=("probs", "logprobs"), same_kind=True))
def test_plain_inputs_meet_the_strict_bound(case):
    """probs vs probs or logprobs vs logprobs, no normalize / smoothing: no decode
    slack at all (mixed dtypes included)."""
    P, Q, measures, opts = case
    note(f"opts={opts}\nP={P!r}\nQ={Q!r}")
    table, refs = run_and_check(P, Q, measures, opts, naive.rel_bound(P.dtype, Q.dtype))
    for name in measures:
        assert all(r.slack == 0 for r in refs[name])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ("probs", "logprobs"))
@pytest.mark.parametrize("delta", (1e-3, 1e-6, 1e-9))
def test_nearly_equal_rows(dtype, kind, delta, rng):
    """P and Q differing by a relative `delta` (RLHF policy vs reference): all
    measures are tiny, and the bound relative to their tiny terms still holds."""
    n, k = 6, 16
    P64 = naive.make_probs(rng, n, k, spread=2.0)
    Q64 = P64 * (1 + delta * rng.standard_normal((n, k)))
    Q64 /= Q64.sum(axis=1, keepdims=True)
    if kind == "logprobs":
        P64, Q64 = np.log(P64), np.log(Q64)
    P, Q = P64.astype(dtype), Q64.astype(dtype)
    opts = dict(kind=kind)
    run_and_check(P, Q, MEASURES, opts, naive.rel_bound(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", naive.KINDS)
def test_zeros_and_infinite_results(kind, dtype):
    """p_i > 0 = q_i: kl, jeffreys, cross_entropy are +inf (a correct answer, not
    an error); q_i > 0 = p_i: reverse_kl is +inf; js, tv, hellinger stay finite."""
    P = np.array([[0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0.5, 0], [0.25, 0.25, 0.5], [1, 0, 0]])
    Q = np.array([[0.5, 0, 0.5], [0, 0.25, 0.75], [0.25, 0.25, 0.5], [0.5, 0.5, 0], [0, 0, 1]])
    if kind != "probs":  # logits: -inf masks; logprobs: -inf is probability 0
        with np.errstate(divide="ignore"):
            P, Q = np.log(P), np.log(Q)
        if kind == "logits":
            P, Q = P + 3.0, Q - 1.5  # shifted logits decode to the same probabilities
    P, Q = P.astype(dtype), Q.astype(dtype)
    opts = dict(kind=kind)
    table, _ = run_and_check(P, Q, MEASURES, opts, naive.rel_bound(dtype))
    col = {m: np.array(table.column(m).to_pylist(), dtype=float) for m in MEASURES}
    inf = math.inf
    assert list(col["kl"] == inf) == [True, False, False, True, True]
    assert list(col["cross_entropy"] == inf) == [True, False, False, True, True]
    assert list(col["reverse_kl"] == inf) == [True, False, True, False, True]
    assert list(col["jeffreys"] == inf) == [True, False, True, True, True]
    for m in ("js", "tv", "hellinger", "entropy"):
        assert np.isfinite(col[m]).all(), m
    # disjoint supports: the maxima
    assert col["tv"][4] == 1.0 and col["hellinger"][4] == 1.0
    assert col["js"][4] == pytest.approx(math.log(2), rel=1e-15)
    # the zero term of P contributes nothing: row 1 is a 2-point problem
    assert col["kl"][1] == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), rel=1e-6)


@pytest.mark.parametrize("kind", naive.KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_category_rows(kind, dtype):
    """K = 1: the only distribution is [1]; every measure is 0."""
    x = {"probs": 1.0, "logprobs": 0.0, "logits": 7.25}[kind]
    P = np.full((3, 1), x, dtype=dtype)
    Q = np.full((3, 1), x if kind != "logits" else -3.5, dtype=dtype)
    table, _ = run_and_check(P, Q, MEASURES, dict(kind=kind), naive.rel_bound(dtype))
    for m in MEASURES:
        assert table.column(m).to_pylist() == [0.0] * 3, m


@pytest.mark.parametrize(
    "dtype,kind",
    [(np.float64, "probs"), (np.float32, "probs"), (np.float64, "logprobs"), (np.float32, "logits")],
)
def test_very_long_rows(dtype, kind, rng):
    """K = 100,000 (a vocabulary), against the scipy/fsum reference (mpmath is too slow)."""
    n, k = 2, 100_000
    P = naive.make_rows(rng, kind, n, k, dtype, zero_frac=0.1, spread=2.0)
    Q = naive.make_rows(rng, kind, n, k, dtype, spread=2.0)
    opts = dict(kind=kind)
    table = fastkl.divergences(P, Q, measures=MEASURES, **naive.params(MEASURES), status=True, **opts)
    assert table.column("status").to_pylist() == ["ok"] * n
    # scipy reference: float64 decode, fsum; its own error is a few ulps per term
    rel = naive.rel_bound(dtype) + (1e-10 if kind == "logits" else 1e-13)
    for name in MEASURES:
        vals, terms = naive.scipy_reference(name, P, Q, **opts)
        got = np.array(table.column(name).to_pylist())
        if name == "hellinger":
            got, vals = got**2, vals**2
        same_inf = (got == vals) & np.isinf(vals)
        err = np.abs(got - vals)
        assert np.all(same_inf | (err <= rel * terms)), (name, got, vals, err / terms)
    # a per-measure function over the same rows agrees with the table (within the bound:
    # entropy alone and the full table may take different loops, float32 sums chunked or not)
    np.testing.assert_allclose(fastkl.entropy(P, **opts), table.column("entropy").to_numpy(),
                               rtol=2 * naive.rel_bound(dtype))


@pytest.mark.parametrize("kind", ["probs", "logprobs"])
@pytest.mark.parametrize("name", MEASURES)
def test_each_measure_alone_on_rows_of_several_sum_chunks(name, kind, rng):
    """Rows longer than the kernels' sum chunk (SUM_BLOCK values), one measure at
    a time (each takes its own loop), against the scipy/fsum reference."""
    n, k = 3, 2500  # two full chunks and a partial one
    P = naive.make_rows(rng, kind, n, k, np.float32, zero_frac=0.05, spread=2.0)
    Q = naive.make_rows(rng, kind, n, k, np.float32, spread=2.0)
    fn = getattr(fastkl, name)
    got = fn(P, kind=kind) if name == "entropy" else fn(P, Q, kind=kind, **naive.params((name,)))
    vals, terms = naive.scipy_reference(name, P, Q, kind=kind)
    if name == "hellinger":
        got, vals = got**2, vals**2
    err = np.abs(got - vals)
    assert np.all(((got == vals) & np.isinf(vals)) | (err <= (naive.rel_bound(np.float32) + 1e-13) * terms)), (
        got, vals)


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "js", "tv", "hellinger", "gjs", "entropy", "cross_entropy"])
def test_float32_log_probabilities_below_the_float32_range_are_exact(name):
    """A float32 log-probability in (-inf, -87) has a subnormal exponential that float32
    cannot compute to 1e-7: such rows leave the float32 loops. Here P and Q differ only
    there, so the whole measure is e^-100-sized and any float32 shortcut is far off."""
    half = np.float32(math.log(0.5))
    P = np.array([[half, half, -100.0], [half, half, -90.0]], dtype=np.float32)
    Q = np.array([[half, half, -101.0], [half, half, -np.inf]], dtype=np.float32)
    from test_encodings import assert_reference

    assert_reference(P, Q, {"kind": "logprobs", **naive.params((name,))}, (name,), naive.rel_bound(np.float32))


# --------------------------------------------------------------------------
# identities and ranges


@given(cases(max_k=64, max_n=6))
def test_identities(case):
    """cross_entropy = entropy + kl; jeffreys = kl + reverse_kl (within the summed bounds)."""
    P, Q, _, opts = case
    table = fastkl.divergences(P, Q, measures=MEASURES, **naive.params(MEASURES), **opts)
    c = {m: np.array(table.column(m).to_pylist(), dtype=float) for m in MEASURES}
    rel = naive.rel_bound(P.dtype, Q.dtype)
    refs = naive.reference_rows(P, Q, ("kl", "reverse_kl", "entropy", "cross_entropy"), **opts)
    for i in range(len(P)):
        r = {m: refs[m][i] for m in refs}

        def tol(*names):
            # each side's own error, plus what clamping into range removed (rows
            # whose sums are off by up to sum_tol: the exact KL can be < 0).
            return sum(
                2 * (rel * float(r[m].terms) + float(r[m].slack)) + float(abs(r[m].raw - r[m].value))
                for m in names
            )

        if math.isinf(c["kl"][i]):
            assert c["cross_entropy"][i] == math.inf and c["jeffreys"][i] == math.inf
        else:
            assert abs(c["cross_entropy"][i] - (c["entropy"][i] + c["kl"][i])) <= tol(
                "cross_entropy", "entropy", "kl"
            ) + 4 * naive.EPS64 * abs(c["cross_entropy"][i])
        if math.isinf(c["reverse_kl"][i]):
            assert c["jeffreys"][i] == math.inf
        elif not math.isinf(c["kl"][i]):
            assert abs(c["jeffreys"][i] - (c["kl"][i] + c["reverse_kl"][i])) <= tol(
                "kl", "reverse_kl"
            ) + 4 * naive.EPS64 * abs(c["jeffreys"][i])


@given(cases(max_k=64, max_n=6))
def test_measures_of_a_distribution_with_itself(case):
    """kl(P, P) = 0 and all the other divergences/distances of P from itself are 0;
    exactly 0 for plain inputs, within the decode slack otherwise."""
    P, _, _, opts = case
    opts = dict(opts, q_kind=opts["p_kind"])
    if "p_temperature" in opts:
        opts["q_temperature"] = opts["p_temperature"]
    else:
        opts.pop("q_temperature", None)
    measures = ("kl", "reverse_kl", "jeffreys", "js", "tv", "hellinger", "cross_entropy", "entropy")
    table = fastkl.divergences(P, P.copy(), measures=measures, **opts)
    plain = opts["p_kind"] != "logits" and not opts.get("normalize") and not opts.get("smoothing")
    refs = naive.reference_rows(P, P, ("entropy",), **opts)
    for m in ("kl", "reverse_kl", "jeffreys", "js", "tv", "hellinger"):
        got = table.column(m).to_pylist()
        if plain:
            assert got == [0.0] * len(P), (m, got)
        else:
            for g, r in zip(got, refs["entropy"]):
                g = g * g if m == "hellinger" else g
                assert 0.0 <= g <= 4 * float(r.slack), (m, g, float(r.slack))
    ce, h = table.column("cross_entropy").to_pylist(), table.column("entropy").to_pylist()
    rel = naive.rel_bound(P.dtype)
    for a, b, r in zip(ce, h, refs["entropy"]):
        assert abs(a - b) <= 2 * rel * float(r.terms) + 4 * float(r.slack) + 4 * naive.EPS64 * abs(b)


@given(cases(max_k=64, max_n=6))
def test_ranges(case):
    P, Q, _, opts = case
    table = fastkl.divergences(P, Q, measures=MEASURES, **naive.params(MEASURES), **opts)
    scale = 1 / math.log(opts.get("base", math.e))
    k = P.shape[1]
    hi = {
        "js": math.log(2) * scale,
        "entropy": math.log(k) * scale,
        "tv": 1.0,
        "hellinger": 1.0,
    }
    for m in MEASURES:
        vals = np.array(table.column(m).to_pylist(), dtype=float)
        assert not np.isnan(vals).any(), m
        assert (vals >= 0).all(), (m, vals)
        if m in hi:
            assert (vals <= hi[m] * (1 + 4 * naive.EPS64)).all(), (m, vals, hi[m])


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_are_clamped_into_range(dtype):
    """Rows summing to 1 +- 0.9*sum_tol are valid and used as given; a measure
    whose exact value on them leaves its range is clamped (SPEC §2)."""
    t = 0.9e-3
    k = 4
    up, down = 1 + t, 1 - t
    P = np.array(
        [
            [up / 2, up / 2, 0, 0],  # disjoint from Q, both sums > 1: tv, js, hellinger at their max
            [up / k] * k,  # uniform with sum > 1: entropy would exceed log K
            [0.1 * down, 0.2 * down, 0.3 * down, 0.4 * down],  # Q = P * up/down: exact KL < 0
            [0.1 * up, 0.2 * up, 0.3 * up, 0.4 * up],  # reverse: exact reverse KL < 0, jeffreys tiny
        ]
    )
    Q = np.array(
        [
            [0, 0, up / 2, up / 2],
            [up / k] * k,
            [0.1 * up, 0.2 * up, 0.3 * up, 0.4 * up],
            [0.1 * down, 0.2 * down, 0.3 * down, 0.4 * down],
        ]
    )
    P, Q = P.astype(dtype), Q.astype(dtype)
    # the oracle agrees these rows exceed the range before clamping
    raw_tv = 0.5 * math.fsum(abs(float(a) - float(b)) for a, b in zip(P[0], Q[0]))
    assert raw_tv > 1
    table = fastkl.divergences(P, Q, measures=MEASURES, **naive.params(MEASURES), status=True)
    assert table.column("status").to_pylist() == ["ok"] * 4
    c = {m: table.column(m).to_pylist() for m in MEASURES}
    assert c["tv"][0] == 1.0
    assert c["hellinger"][0] == 1.0
    assert c["js"][0] <= math.log(2)
    assert c["js"][0] == pytest.approx(math.log(2), rel=1e-3)
    assert c["entropy"][1] <= math.log(k)
    assert c["entropy"][1] == pytest.approx(math.log(k), rel=1e-3)
    assert c["kl"][2] == 0.0
    assert c["reverse_kl"][2] > 0  # the other direction is positive and kept as is
    assert c["reverse_kl"][3] == 0.0 and c["kl"][3] > 0
    # jeffreys = sum (p - q) log(p / q) is >= 0 term by term and is never clamped:
    # it is NOT clamp(kl) + clamp(reverse_kl) (that would be off by ~sum_tol here)
    exact_j = (up - down) * math.log(up / down)
    for i in (2, 3):
        assert c["jeffreys"][i] == pytest.approx(exact_j, rel=1e-3), (i, c["jeffreys"][i], exact_j)
    refs = naive.reference_rows(P, Q, MEASURES)
    failures = []
    for m in MEASURES:
        failures += naive.check_against_reference(c[m], refs[m], naive.rel_bound(dtype), what=m)
    assert not failures, failures


@pytest.mark.parametrize("base", (2.0, 10.0, 1.5))
def test_base_rescales_log_measures_only(base, rng):
    P = naive.make_probs(rng, 5, 12, zero_frac=0.2)
    Q = naive.make_probs(rng, 5, 12)
    nat = fastkl.divergences(P, Q, measures=MEASURES, **naive.params(MEASURES))
    other = fastkl.divergences(P, Q, measures=MEASURES, **naive.params(MEASURES), base=base)
    for m in MEASURES:
        a = np.array(nat.column(m).to_pylist())
        b = np.array(other.column(m).to_pylist())
        if m in naive.LOG_MEASURES:
            fin = np.isfinite(a)
            np.testing.assert_allclose(b[fin], a[fin] / math.log(base), rtol=1e-12)
            assert np.array_equal(np.isinf(a), np.isinf(b))
        else:
            np.testing.assert_array_equal(a, b)


def test_per_measure_functions_match_divergences(rng):
    P = naive.make_probs(rng, 7, 9, zero_frac=0.3)
    Q = naive.make_probs(rng, 7, 9, zero_frac=0.3)
    P[2, :] = [0.5] * 9  # not normalised: invalid, NaN under on_invalid="null"
    table = fastkl.divergences(P, Q, measures=MEASURES, **naive.params(MEASURES), on_invalid="null", base=2)
    for m in MEASURES:
        fn = getattr(fastkl, m)
        got = fn(P, base=2, on_invalid="null") if m == "entropy" else fn(P, Q, base=2, on_invalid="null",
                                                                          **naive.params((m,)))
        assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (7,)
        expected = np.array([np.nan if v is None else v for v in table.column(m).to_pylist()])
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)  # NaN where NaN
        assert np.isnan(got[2])


def test_measures_in_one_call_equal_separate_calls(rng):
    """Asking several measures at once gives the values each gives alone."""
    P = naive.make_logits(rng, 6, 20, zero_frac=0.1)
    Q = naive.make_probs(rng, 6, 20, zero_frac=0.1)
    opts = dict(p_kind="logits", q_kind="probs", p_temperature=1.5, smoothing=1e-6)
    together = fastkl.divergences(P, Q, measures=MEASURES[::-1], **naive.params(MEASURES), **opts)
    assert together.column_names == list(MEASURES[::-1])
    refs = naive.reference_rows(P, Q, MEASURES, **opts)
    for m in MEASURES:
        alone = fastkl.divergences(P, Q, measures=(m,), **naive.params((m,)), **opts)
        assert alone.column_names == [m]
        a, b = alone.column(m).to_pylist(), together.column(m).to_pylist()
        for i, r in enumerate(refs[m]):
            tol = 2 * (1e-12 * float(r.terms) + float(r.slack))
            va, vb = (a[i] ** 2, b[i] ** 2) if m == "hellinger" else (a[i], b[i])
            assert abs(va - vb) <= tol, (m, i, a[i], b[i])


@pytest.mark.parametrize("measures", [("kl",), ("kl", "reverse_kl"), ("kl", "cross_entropy", "js")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_after_an_infinite_or_invalid_row_are_their_own(dtype, measures):
    """Rows alternate between the fast loops and the exact path (+inf, invalid):
    nothing of one row (an infinity flag, a status) may leak into the next."""
    p = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]], dtype)
    q = np.array([[1.0, 0.0], [0.4, 0.6], [0.0, 1.0], [-0.5, 1.5], [0.4, 0.6]], dtype)
    t = fastkl.divergences(p, q, measures=measures, **naive.params(measures), status=True, on_invalid="null", threads=1)
    kl = t["kl"].to_pylist()
    assert kl[0] == math.inf and kl[2] == math.inf and kl[3] is None
    assert kl[1] == kl[4] and 0 < kl[1] < 1
    assert t["status"].to_pylist() == ["ok", "ok", "ok", "negative", "ok"]


@settings(max_examples=150, deadline=None)
@given(cases(allow_decode=False, kinds=("probs",), same_kind=True, max_k=300))
def test_kl_reverse_kl_js_entropy_in_one_pass(case):
    """The four that float32 probs compute in one pass (fastkl.kernels.dense
    `_kl_rkl_js_ent32`, js's smaller side's log from the larger side's and the ratio's),
    with or without cross_entropy and gjs beside them, against the exact reference."""
    P, Q, _, opts = case
    for measures in (("kl", "reverse_kl", "js", "entropy"), ("js", "entropy", "reverse_kl", "cross_entropy", "gjs")):
        note(f"measures={measures}\nP={P!r}\nQ={Q!r}")
        run_and_check(P, Q, measures, opts, naive.rel_bound(P.dtype, Q.dtype))


@pytest.mark.parametrize("delta", (1e-2, 1e-4, 1e-6))
def test_kl_reverse_kl_js_entropy_in_one_pass_on_nearly_equal_rows(delta, rng):
    """Where js's log(2b/s) = log(2a/s) - |log(p/q)| cancels (p ~ q): the bound relative
    to the tiny terms still holds."""
    P64 = naive.make_probs(rng, 8, 300, spread=2.0)
    Q64 = P64 * (1 + delta * rng.standard_normal(P64.shape))
    Q64 /= Q64.sum(axis=1, keepdims=True)
    P, Q = P64.astype(np.float32), Q64.astype(np.float32)
    run_and_check(P, Q, ("kl", "reverse_kl", "js", "entropy"), {}, naive.rel_bound(np.float32))
