"""Input encodings (SPEC §3): probs / logprobs / logits per side, temperature,
normalize, smoothing, base, sum_tol; and the option errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import fastkl
import naive
from naive import MEASURES

DTYPES = (np.float64, np.float32)


def table_values(table, measures=MEASURES):
    return {m: np.array([np.nan if v is None else v for v in table.column(m).to_pylist()]) for m in measures}


def assert_reference(P, Q, opts, measures=MEASURES, rel=None):
    rel = rel if rel is not None else naive.rel_bound(np.asarray(P).dtype, np.asarray(Q).dtype)
    table = fastkl.divergences(P, Q, measures=measures, status=True, **{**naive.params(measures), **opts})
    assert set(table.column("status").to_pylist()) == {"ok"}
    refs = naive.reference_rows(P, Q, measures, **opts)
    failures = []
    for m in measures:
        failures += naive.check_against_reference(table.column(m).to_pylist(), refs[m], rel, what=m)
    assert not failures, "\n".join(failures[:20])
    return table


# --------------------------------------------------------------------------
# one encoding against another


@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_agree_with_probs(dtype, rng):
    """log of the probabilities, given as logprobs, measures the same distributions."""
    P = naive.make_probs(rng, 8, 30, zero_frac=0.2, spread=3.0)
    Q = naive.make_probs(rng, 8, 30, spread=3.0)
    with np.errstate(divide="ignore"):
        LP, LQ = np.log(P), np.log(Q)
    a = table_values(fastkl.divergences(P.astype(dtype), Q.astype(dtype), measures=MEASURES, **naive.params(MEASURES)))
    b = table_values(fastkl.divergences(LP.astype(dtype), LQ.astype(dtype), measures=MEASURES, **naive.params(MEASURES), kind="logprobs"))
    refs = naive.reference_rows(P, Q, MEASURES)
    for m in MEASURES:
        for i, r in enumerate(refs[m]):
            if math.isinf(r.value):
                assert a[m][i] == b[m][i] == math.inf, m
                continue
            # the two encodings of one distribution differ by the float rounding of log/exp
            tol = 10 * naive.rel_bound(dtype) * float(r.terms) + 1e3 * naive.EPS64 * (1 + abs(float(r.value)))
            if m == "hellinger":
                assert abs(a[m][i] ** 2 - b[m][i] ** 2) <= tol, (m, i, a[m][i], b[m][i])
            else:
                assert abs(a[m][i] - b[m][i]) <= tol, (m, i, a[m][i], b[m][i])


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_decode_as_log_softmax(dtype, rng):
    """logits rows measure the same as their softmax given as probabilities."""
    X = naive.make_logits(rng, 6, 25, dtype, zero_frac=0.2)
    Y = naive.make_logits(rng, 6, 25, dtype)
    t = assert_reference(X, Y, dict(kind="logits"))
    from scipy import special

    P = special.softmax(X.astype(np.float64), axis=1)
    Q = special.softmax(Y.astype(np.float64), axis=1)
    got = table_values(t)
    for m in MEASURES:
        vals, terms = naive.scipy_reference(m, P, Q)
        fin = np.isfinite(vals)
        assert np.array_equal(np.isinf(vals), np.isinf(got[m])), m
        np.testing.assert_allclose(got[m][fin], vals[fin], rtol=1e-9, atol=1e-12, err_msg=m)


@pytest.mark.parametrize("t", [0.5, 2.0, 4.0])
def test_temperature_equals_prescaled_logits(t, rng):
    """log_softmax(x / T): with T a power of two, x/T is exact, so logits x at
    temperature T give the same numbers as logits x/T at temperature 1."""
    X = naive.make_logits(rng, 5, 17, zero_frac=0.1)
    Y = naive.make_logits(rng, 5, 17)
    a = table_values(fastkl.divergences(X, Y, measures=MEASURES, **naive.params(MEASURES), kind="logits", temperature=t))
    b = table_values(fastkl.divergences(X / t, Y / t, measures=MEASURES, **naive.params(MEASURES), kind="logits"))
    for m in MEASURES:
        np.testing.assert_allclose(a[m], b[m], rtol=1e-13, atol=1e-15, err_msg=m)
    assert_reference(X, Y, dict(kind="logits", temperature=t))


def test_temperature_changes_the_result(rng):
    X = naive.make_logits(rng, 4, 10)
    Y = naive.make_logits(rng, 4, 10)
    base = fastkl.kl(X, Y, kind="logits")
    hot = fastkl.kl(X, Y, kind="logits", temperature=3.0)
    assert not np.allclose(base, hot)
    # high temperature flattens both sides: KL goes to 0
    flat = fastkl.kl(X, Y, kind="logits", temperature=1e6)
    assert (flat < 1e-9).all() and (flat < base).all()
    # low temperature: entropy goes to 0 (argmax one-hot)
    assert (fastkl.entropy(X, kind="logits", temperature=1e-4) < 1e-6).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_side_temperature_overrides(dtype, rng):
    X = naive.make_logits(rng, 5, 12, dtype)
    Y = naive.make_logits(rng, 5, 12, dtype)
    opts = dict(kind="logits", temperature=2.0, q_temperature=0.5)
    t = assert_reference(X, Y, opts)
    # the same as spelling both sides out
    same = fastkl.divergences(X, Y, measures=MEASURES, **naive.params(MEASURES), kind="logits", p_temperature=2.0, q_temperature=0.5)
    for m in MEASURES:
        np.testing.assert_array_equal(table_values(t)[m], table_values(same)[m])
    # and different from using 2.0 on both sides
    both = fastkl.kl(X, Y, kind="logits", temperature=2.0)
    assert not np.allclose(both, table_values(t)["kl"])
    assert_reference(X, Y, dict(kind="logits", p_temperature=0.7))


@pytest.mark.parametrize("p_kind", naive.KINDS)
@pytest.mark.parametrize("q_kind", naive.KINDS)
def test_mixed_kinds_per_side(p_kind, q_kind, rng):
    """p_kind / q_kind override `kind`; each side is decoded on its own."""
    P = naive.make_rows(rng, p_kind, 5, 11, np.float64, zero_frac=0.2)
    Q = naive.make_rows(rng, q_kind, 5, 11, np.float32, zero_frac=0.2)
    opts = dict(kind="probs", p_kind=p_kind, q_kind=q_kind)
    if p_kind == "logits":
        opts["p_temperature"] = 1.5
    assert_reference(P, Q, opts)
    # `kind` alone sets both sides; overriding one side to the same kind is a no-op
    if p_kind == q_kind:
        a = fastkl.kl(P, Q, kind=p_kind, p_temperature=opts.get("p_temperature", 1.0))
        b = fastkl.kl(P, Q, p_kind=p_kind, q_kind=q_kind, p_temperature=opts.get("p_temperature", 1.0))
        np.testing.assert_array_equal(a, b)


def test_logits_shift_invariance(rng):
    """log_softmax ignores a constant added to a row."""
    X = naive.make_logits(rng, 6, 20, zero_frac=0.2)
    Y = naive.make_logits(rng, 6, 20)
    a = table_values(fastkl.divergences(X, Y, measures=MEASURES, **naive.params(MEASURES), kind="logits"))
    b = table_values(fastkl.divergences(X + 100.0, Y - 37.0, measures=MEASURES, **naive.params(MEASURES), kind="logits"))
    for m in MEASURES:
        np.testing.assert_allclose(a[m], b[m], rtol=1e-11, atol=1e-12, err_msg=m)


def test_logits_large_values_are_stable():
    """A stable log-sum-exp: logits far beyond exp's range decode fine."""
    X = np.array([[1000.0, 999.0, 998.0], [-1000.0, -1001.0, -np.inf], [700.0, 0.0, -700.0]])
    Y = np.array([[0.0, -1.0, -2.0], [0.0, -1.0, -np.inf], [1.0, 0.0, -1.0]])
    t = assert_reference(X, Y, dict(kind="logits"))
    v = table_values(t)
    assert v["kl"][0] == pytest.approx(0.0, abs=1e-12)
    assert v["kl"][1] == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(v["kl"]).all()


def test_logits_masked_entries_are_zero_probability():
    X = np.array([[0.0, -np.inf, 0.0], [1.0, -np.inf, -np.inf]])
    Y = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -np.inf]])
    t = assert_reference(X, Y, dict(kind="logits"))
    v = table_values(t)
    assert v["kl"][0] == pytest.approx(math.log(1.5), rel=1e-14)  # [1/2, 0, 1/2] vs uniform 3
    assert v["reverse_kl"][0] == math.inf
    assert v["entropy"][1] == 0.0
    assert v["kl"][1] == pytest.approx(math.log(2), rel=1e-14)


# --------------------------------------------------------------------------
# normalize, smoothing, base


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_probs(dtype, rng):
    P = naive.make_probs(rng, 6, 15, dtype, zero_frac=0.2, scale=True)
    Q = naive.make_probs(rng, 6, 15, dtype, scale=True)
    t = assert_reference(P, Q, dict(normalize=True))
    # scaling a row by a power of two changes nothing at all (the division is exact)
    t2 = fastkl.divergences(P * 8, Q / 4, measures=MEASURES, **naive.params(MEASURES), normalize=True)
    for m in MEASURES:
        np.testing.assert_array_equal(table_values(t)[m], table_values(t2)[m], err_msg=m)
    # without normalize the same rows are invalid
    st = fastkl.divergences(P, Q, measures=("kl",), status=True, on_invalid="null").column("status").to_pylist()
    assert "not_normalized" in st


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_logprobs(dtype, rng):
    LP = naive.make_logprobs(rng, 6, 15, dtype, zero_frac=0.2, scale=True)
    LQ = naive.make_logprobs(rng, 6, 15, dtype, scale=True)
    assert_reference(LP, LQ, dict(kind="logprobs", normalize=True))
    with np.errstate(divide="ignore"):
        P = np.exp(LP.astype(np.float64))
        Q = np.exp(LQ.astype(np.float64))
    # the same distributions given as (unnormalised) probabilities
    a = fastkl.kl(LP, LQ, kind="logprobs", normalize=True)
    b = fastkl.kl(P, Q, normalize=True)
    np.testing.assert_allclose(a, b, rtol=1e-9 if dtype == np.float64 else 1e-5, atol=1e-12)


@pytest.mark.parametrize("eps", [1e-12, 1e-6, 0.01, 1.0])
@pytest.mark.parametrize("kind", naive.KINDS)
def test_smoothing(eps, kind, rng):
    """(p + eps) / (1 + K eps) after decoding: every measure finite, matches the reference."""
    P = naive.make_rows(rng, kind, 5, 9, zero_frac=0.4)
    Q = naive.make_rows(rng, kind, 5, 9, zero_frac=0.4)
    opts = dict(kind=kind, smoothing=eps)
    t = assert_reference(P, Q, opts)
    v = table_values(t)
    for m in MEASURES:
        assert np.isfinite(v[m]).all(), m
    plain = table_values(fastkl.divergences(P, Q, measures=MEASURES, **naive.params(MEASURES), kind=kind))
    assert np.isinf(plain["kl"]).any() or np.isinf(plain["reverse_kl"]).any()  # the data has zeros
    zero = table_values(fastkl.divergences(P, Q, measures=MEASURES, **naive.params(MEASURES), kind=kind, smoothing=0.0))
    for m in MEASURES:
        np.testing.assert_array_equal(plain[m], zero[m])


def test_smoothing_with_normalize(rng):
    P = naive.make_probs(rng, 5, 7, zero_frac=0.3, scale=True)
    Q = naive.make_probs(rng, 5, 7, zero_frac=0.3, scale=True)
    assert_reference(P, Q, dict(normalize=True, smoothing=1e-3))


@pytest.mark.parametrize("base", [2.0, 10.0])
@pytest.mark.parametrize("kind", naive.KINDS)
def test_base(base, kind, rng):
    P = naive.make_rows(rng, kind, 5, 13, np.float32, zero_frac=0.2)
    Q = naive.make_rows(rng, kind, 5, 13, np.float32)
    t = assert_reference(P, Q, dict(kind=kind, base=base))
    nat = table_values(fastkl.divergences(P, Q, measures=MEASURES, **naive.params(MEASURES), kind=kind))
    v = table_values(t)
    for m in MEASURES:
        if m in naive.LOG_MEASURES:
            np.testing.assert_allclose(v[m], nat[m] / math.log(base), rtol=1e-12, err_msg=m)
        else:
            np.testing.assert_array_equal(v[m], nat[m], err_msg=m)
    # bits: a fair coin has entropy 1 bit; KL of [1,0] from a fair coin is 1 bit
    assert fastkl.entropy([[0.5, 0.5]], base=2)[0] == pytest.approx(1.0, rel=1e-15)
    assert fastkl.kl([[1.0, 0.0]], [[0.5, 0.5]], base=2)[0] == pytest.approx(1.0, rel=1e-15)
    assert fastkl.js([[1.0, 0.0]], [[0.0, 1.0]], base=2)[0] == pytest.approx(1.0, rel=1e-15)


def test_sum_tol():
    p = [[0.5, 0.5 + 5e-4]]  # sum 1 + 5e-4
    q = [[0.5, 0.5]]
    assert np.isfinite(fastkl.kl(p, q)).all()  # within the default 1e-3
    assert fastkl.divergences(p, q, status=True, on_invalid="null", sum_tol=1e-4).column("status").to_pylist() == [
        "not_normalized"
    ]
    p2 = [[0.5, 0.5 + 2e-3]]
    assert fastkl.divergences(p2, q, status=True, on_invalid="null").column("status").to_pylist() == [
        "not_normalized"
    ]
    assert fastkl.divergences(p2, q, status=True, sum_tol=1e-2).column("status").to_pylist() == ["ok"]
    # the row is used as given (not renormalised) when within tolerance
    got = fastkl.kl(p2, q, sum_tol=1e-2)[0]
    assert got == pytest.approx(0.5 * math.log(1.0) + 0.502 * math.log(0.502 / 0.5), rel=1e-12)


@given(
    st.sampled_from(naive.KINDS),
    st.sampled_from(naive.KINDS),
    st.floats(0.05, 20.0),
    st.floats(0.05, 20.0),
    st.sampled_from([math.e, 2.0, 10.0, 3.7]),
    st.booleans(),
    st.sampled_from([0.0, 1e-8, 1e-3]),
    st.integers(0, 2**32 - 1),
)
def test_any_option_combination(p_kind, q_kind, tp, tq, base, normalize, smoothing, seed):
    """Every option combination decodes each side as SPEC §3 says."""
    rng = np.random.default_rng(seed)
    P = naive.make_rows(rng, p_kind, 3, 7, np.float64, zero_frac=0.3, scale=normalize)
    Q = naive.make_rows(rng, q_kind, 3, 7, np.float32, zero_frac=0.3, scale=normalize)
    opts = dict(p_kind=p_kind, q_kind=q_kind, base=base, normalize=normalize, smoothing=smoothing)
    if p_kind == "logits":
        opts["p_temperature"] = tp
    if q_kind == "logits":
        opts["q_temperature"] = tq
    note(repr(opts))
    assert_reference(P, Q, opts)


# --------------------------------------------------------------------------
# option errors


P2 = [[0.5, 0.5]]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(measures=("kl", "nope")),
        dict(measures=("KL",)),
        dict(measures=()),
        dict(kind="probabilities"),
        dict(p_kind="logit"),
        dict(q_kind="softmax"),
        dict(kind="logits", temperature=0.0),
        dict(kind="logits", temperature=-1.0),
        dict(kind="logits", temperature=float("nan")),
        dict(kind="logits", temperature=float("inf")),
        dict(kind="logits", p_temperature=0.0),
        dict(kind="logits", q_temperature=-2.0),
        dict(base=1.0),
        dict(base=0.0),
        dict(base=-2.0),
        dict(base=float("nan")),
        dict(smoothing=-1e-9),
        dict(smoothing=float("nan")),
        dict(sum_tol=-1.0),
        dict(on_invalid="ignore"),
    ],
)
def test_bad_options_raise_option_error(kwargs):
    with pytest.raises(fastkl.OptionError) as info:
        fastkl.divergences(P2, P2, **kwargs)
    assert isinstance(info.value, ValueError)
    assert str(info.value)


@pytest.mark.parametrize(
    "fn,kwargs",
    [
        (fastkl.kl, dict(kind="nope")),
        (fastkl.js, dict(temperature=0)),
        (fastkl.tv, dict(base=1)),
        (fastkl.hellinger, dict(q_kind="x")),
        (fastkl.cross_entropy, dict(on_invalid="skip")),
    ],
)
def test_measure_functions_check_options(fn, kwargs):
    with pytest.raises(fastkl.OptionError):
        fn(P2, P2, **kwargs)
    with pytest.raises(fastkl.OptionError):
        fastkl.entropy(P2, kind="nope")


def test_unknown_keyword_is_refused():
    with pytest.raises(TypeError):
        fastkl.kl(P2, P2, temprature=2.0)


# --------------------------------------------------------------------------
# extreme magnitudes


def test_normalize_logprobs_far_below_zero():
    """Unnormalised log-weights far below exp's range (importance weights,
    sums of per-token log-probs) are valid with normalize=True: the sum of
    their exponentials is > 0, and they decode like logits (a shift-invariant
    log-softmax). A plain exp-then-sum underflows to 0 here."""
    LP = np.array([[-1000.0, -1001.0, -np.inf], [-5000.0, -5000.0, -5002.0]])
    LQ = np.array([[-1.0, -2.0, -3.0], [-3.0, -1.0, -2.0]])
    opts = dict(kind="logprobs", normalize=True)
    assert naive.row_statuses(LP, LQ, **opts) == [{"ok"}, {"ok"}]
    t = fastkl.divergences(LP, LQ, measures=MEASURES, **naive.params(MEASURES), status=True, on_invalid="null", **opts)
    assert t.column("status").to_pylist() == ["ok", "ok"]
    assert_reference(LP, LQ, opts)
    # the same numbers as logits, up to the decode rounding
    as_logits = table_values(fastkl.divergences(LP, LQ, measures=MEASURES, **naive.params(MEASURES), kind="logits"))
    for m in MEASURES:
        np.testing.assert_allclose(table_values(t)[m], as_logits[m], rtol=1e-9, atol=1e-12, err_msg=m)


def test_normalize_huge_probabilities():
    """normalize=True on rows whose float64 sum overflows: the row must either
    be refused (a status other than ok) or measured right -- never a wrong
    value marked ok. Here P and Q are the same distribution [1/2, 1/2]."""
    P = np.array([[1.7e308, 1.7e308], [0.5, 0.5]])
    Q = np.array([[1.0, 1.0], [1.0, 1.0]])
    t = fastkl.divergences(P, Q, measures=MEASURES, **naive.params(MEASURES), status=True, on_invalid="null", normalize=True)
    st = t.column("status").to_pylist()
    assert st[1] == "ok"
    if st[0] == "ok":
        for m in MEASURES:
            assert t.column(m)[0].as_py() == pytest.approx(0.0, abs=1e-12), (m, t.column(m)[0])
    else:
        assert st[0] in naive.REASONS


def test_two_sided_measures_need_q():
    with pytest.raises(fastkl.OptionError):
        fastkl.divergences(P2, measures=("kl",))
    with pytest.raises(fastkl.OptionError):
        fastkl.divergences(P2, None, measures=("entropy", "js"))
    # entropy alone reads only P
    assert fastkl.divergences(P2, measures=("entropy",)).column("entropy").to_pylist() == [pytest.approx(math.log(2))]
