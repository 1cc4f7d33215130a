"""gjs (beta), renyi (alpha) and bhattacharyya (SPEC §11): exact references over
their parameters and every encoding, the identities, the endpoints, extreme
log-ratios, the option checks, and a job."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, note, settings, strategies as st

import fastkl
import naive
from test_encodings import assert_reference
from test_measures import cases
from test_naive_sparse import position

NEW = ("gjs", "renyi", "bhattacharyya")
ALPHAS = (0.01, 0.3, 0.5, 0.9, 0.999, 1.001, 1.5, 2.0, 5.0, 30.0)
BETAS = (0.0, 1e-12, 0.01, 0.1, 0.5, 0.9, 0.999999, 1.0)


@settings(max_examples=120, deadline=None)
@given(cases(max_k=40, max_n=4), st.sampled_from(ALPHAS), st.sampled_from(BETAS))
def test_new_measures_match_the_exact_reference(case, alpha, beta):
    """Every encoding, dtype, zeros, one-hot and uniform rows, normalize / smoothing /
    temperature, beside any other measures: within SPEC §2's bound of the exact value."""
    P, Q, measures, opts = case
    measures = tuple(dict.fromkeys(measures + NEW))
    opts = dict(opts, alpha=alpha, beta=beta)
    note(f"opts={opts}\nP={P!r}\nQ={Q!r}")
    table = fastkl.divergences(P, Q, measures=measures, status=True, on_invalid="null", **opts)
    refs = naive.reference_rows(P, Q, measures, **opts)
    rel = naive.rel_bound(P.dtype, Q.dtype)
    failures = []
    for m in NEW:
        failures += naive.check_against_reference(table.column(m).to_pylist(), refs[m], rel, what=m)
    assert not failures, "\n".join(failures[:10])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["probs", "logprobs", "logits"])
@pytest.mark.parametrize("alpha", [0.2, 0.999999, 1.000001, 3.0])
def test_long_rows_of_several_sum_chunks(dtype, kind, alpha, rng):
    """K = 2,500 (the float32 loops' sums run in chunks) against the exact reference."""
    P = naive.make_rows(rng, kind, 2, 2500, dtype, zero_frac=0.05, spread=2.0)
    Q = naive.make_rows(rng, kind, 2, 2500, dtype, spread=2.0)
    assert_reference(P, Q, dict(kind=kind, alpha=alpha, beta=0.3), NEW, naive.rel_bound(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gjs_at_one_half_is_js(dtype, rng):
    P = naive.make_probs(rng, 20, 30, dtype, zero_frac=0.3, spread=3.0)
    Q = naive.make_probs(rng, 20, 30, dtype, zero_frac=0.3, spread=3.0)
    t = fastkl.divergences(P, Q, measures=("js", "gjs"), beta=0.5)
    refs = naive.reference_rows(P, Q, ("js",))["js"]
    tol = np.array([2 * naive.rel_bound(dtype) * float(r.terms) for r in refs]) + 1e-300
    assert np.all(np.abs(t["gjs"].to_numpy() - t["js"].to_numpy()) <= tol)
    assert not np.array_equal(t["gjs"].to_numpy(), fastkl.gjs(P, Q, beta=0.3))


@pytest.mark.parametrize("kind", ["probs", "logprobs", "logits"])
def test_gjs_is_continuous_at_its_endpoints(kind, rng):
    """beta -> 0 and 1: gjs -> 0 (TRL, ms-swift and verl-recipe each returned a KL
    or NaN there); exactly 0 at the endpoints, even with zeros on either side."""
    P = naive.make_rows(rng, kind, 10, 16, zero_frac=0.3, spread=3.0)
    Q = naive.make_rows(rng, kind, 10, 16, zero_frac=0.3, spread=3.0)
    at = {b: fastkl.gjs(P, Q, beta=b, kind=kind) for b in (0.0, 1e-12, 1e-6, 0.5, 1 - 1e-6, 1 - 1e-12, 1.0)}
    assert np.all(at[0.0] == 0.0) and np.all(at[1.0] == 0.0)
    assert np.all(np.isfinite(at[0.5])) and np.all(at[0.5] > 0)
    for b in (1e-12, 1 - 1e-12):
        assert np.all(at[b] <= 1e-10), (b, at[b])
    for b in (1e-6, 1 - 1e-6):
        assert np.all(at[b] <= 2e-5) and np.all(at[b] >= 0), (b, at[b])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_renyi_tends_to_kl_and_halves_to_bhattacharyya(dtype, rng):
    P = naive.make_probs(rng, 20, 50, dtype, spread=2.0)
    Q = naive.make_probs(rng, 20, 50, dtype, spread=2.0)
    kl = fastkl.kl(P, Q)
    for alpha in (1 - 1e-7, 1 + 1e-7):
        assert np.allclose(fastkl.renyi(P, Q, alpha=alpha), kl, rtol=1e-5, atol=0)
    low, high = fastkl.renyi(P, Q, alpha=0.9), fastkl.renyi(P, Q, alpha=1.1)
    assert np.all(low < kl) and np.all(kl < high)  # increasing in alpha
    half = fastkl.renyi(P, Q, alpha=0.5)
    bha = fastkl.bhattacharyya(P, Q)
    assert np.allclose(half, 2 * bha, rtol=4 * naive.rel_bound(dtype), atol=0)


@pytest.mark.parametrize("kind", ["probs", "logprobs"])
def test_bhattacharyya_is_minus_log_one_minus_hellinger_squared(kind, rng):
    P = naive.make_rows(rng, kind, 30, 20, zero_frac=0.2, spread=3.0)
    Q = naive.make_rows(rng, kind, 30, 20, zero_frac=0.2, spread=3.0)
    t = fastkl.divergences(P, Q, measures=("hellinger", "bhattacharyya"), kind=kind)
    h = t["hellinger"].to_numpy()
    assert np.allclose(t["bhattacharyya"].to_numpy(), -np.log1p(-(h * h)), rtol=1e-12, atol=1e-300)


def test_disjoint_and_one_sided_supports():
    P = np.array([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    Q = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 0.5, 0.0]])
    t = fastkl.divergences(P, Q, measures=("gjs", "bhattacharyya"), beta=0.25)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert t["gjs"][0].as_py() == pytest.approx(h, rel=1e-15)  # the largest gjs: the binary entropy of beta
    assert t["bhattacharyya"][0].as_py() == math.inf
    assert fastkl.renyi(P, Q, alpha=0.5)[0] == math.inf  # alpha < 1: S = 0
    assert fastkl.renyi(P, Q, alpha=2.0)[1] == math.inf  # alpha > 1: some q = 0 < p
    # alpha < 1 with q = 0 < p: finite, = log(sum over the common support) / (alpha - 1)
    assert fastkl.renyi(P, Q, alpha=0.5)[1] == pytest.approx(-math.log(0.5 * math.sqrt(0.5 / 0.5)) / 0.5)


@pytest.mark.parametrize("alpha", [0.5, 2.0, 10.0])
def test_extreme_log_ratios_are_defined(alpha):
    """Log-ratios up to |700| and -inf on the reference side: defined results
    (finite or +inf), never NaN, and exact (the sums overflow where alpha > 1)."""
    rows_a, rows_b = [], []
    for r in (1.0, 50.0, 300.0, 700.0):
        b = np.array([math.log(0.5), math.log(0.5) - r, -math.inf])
        b = b - np.log(np.exp(b).sum())
        rows_a.append(np.array([math.log(0.5), math.log(0.5), -math.inf]))
        rows_b.append(b)
        rows_a.append(b)
        rows_b.append(np.array([math.log(0.5), math.log(0.5), -math.inf]))
    A, B = np.array(rows_a), np.array(rows_b)
    opts = dict(kind="logprobs", alpha=alpha, beta=0.2)
    t = assert_reference(A, B, opts, NEW + ("kl", "reverse_kl"), 1e-12)
    for m in NEW:
        assert not any(v is None or math.isnan(v) for v in t[m].to_pylist()), m
    lp = np.log(np.array([[1.0 - 1e-300, 1e-300], [1e-300, 1.0 - 1e-300]]))
    assert_reference(lp, lp[::-1].copy(), opts, NEW, 1e-12)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_sides(dtype, rng):
    """16-bit rows give what their float32 decode gives."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    P = naive.make_probs(rng, 12, 64, spread=1.0).astype(np_dtype)
    Q = naive.make_probs(rng, 12, 64, spread=1.0).astype(np_dtype)
    opts = dict(alpha=0.5, beta=0.3, sum_tol=2e-2)
    got = fastkl.divergences(P, Q, measures=NEW, **opts)
    ref = fastkl.divergences(P.astype(np.float32), Q.astype(np.float32), measures=NEW, **opts)
    for m in NEW:
        np.testing.assert_array_equal(got[m].to_numpy(), ref[m].to_numpy())


def test_sequence_rows(rng):
    """Sequence rows: per-position values summed over the counted positions."""
    P = naive.make_probs(rng, 12, 9).reshape(3, 4, 9)
    Q = naive.make_probs(rng, 12, 9).reshape(3, 4, 9)
    seq = fastkl.divergences(P, Q, measures=NEW, alpha=2.0, beta=0.1)
    flat = fastkl.divergences(P.reshape(12, 9), Q.reshape(12, 9), measures=NEW, alpha=2.0, beta=0.1)
    for m in NEW:
        np.testing.assert_allclose(seq[m].to_numpy(), flat[m].to_numpy().reshape(3, 4).sum(axis=1), rtol=1e-13)


@pytest.mark.parametrize("kwargs, message", [
    (dict(measures=("renyi",)), "renyi needs its order"),
    (dict(measures=("renyi",), alpha=1.0), "alpha must be"),
    (dict(measures=("renyi",), alpha=0.0), "alpha must be"),
    (dict(measures=("renyi",), alpha=math.inf), "alpha must be"),
    (dict(measures=("renyi",), alpha=math.nan), "alpha must be"),
    (dict(measures=("renyi",), alpha=True), "alpha must be a number"),
    (dict(measures=("gjs",), beta=1.5), "beta must be"),
    (dict(measures=("gjs",), beta=-0.1), "beta must be"),
    (dict(measures=("js",), beta=0.3), "beta is the parameter of gjs"),
    (dict(measures=("kl",), alpha=2.0), "alpha is the parameter of renyi"),
])
def test_parameters_are_checked(kwargs, message):
    with pytest.raises(fastkl.OptionError, match=message):
        fastkl.divergences([[0.5, 0.5]], [[0.5, 0.5]], **kwargs)


def test_a_job_gives_what_memory_gives(tmp_path, rng):
    P = naive.make_probs(rng, 60, 12, np.float32, zero_frac=0.2)
    Q = naive.make_probs(rng, 60, 12, np.float32, zero_frac=0.2)
    pq.write_table(pa.table({"p": list(P), "q": list(Q)}), tmp_path / "in.parquet")
    fastkl.run(str(tmp_path / "in.parquet"), str(tmp_path / "out"), measures=NEW, alpha=3.0, beta=0.7,
               quiet=True, task_rows=17)
    out = pq.read_table(tmp_path / "out")
    mem = fastkl.divergences(P, Q, measures=NEW, alpha=3.0, beta=0.7)
    for m in NEW:
        np.testing.assert_array_equal(out[m].to_numpy(), mem[m].to_numpy())


# ---------------------------------------------------------------- top-k rows


def _bucket_pair(p, q, p_ids, q_ids):
    """The pair the bucket estimate measures: the ids both list, then one bucket holding
    the rest of each side (a tiny floor keeps the dense reference's rows valid)."""
    common = [i for i in p_ids if i in set(q_ids)]
    bp, bq = 1.0 - p[common].sum(), 1.0 - q[common].sum()
    return np.append(p[common], max(bp, 0.0)), np.append(q[common], max(bq, 0.0))


@settings(max_examples=80, deadline=None)
@given(st.lists(position(7), min_size=1, max_size=4), st.sampled_from(ALPHAS), st.sampled_from(BETAS[1:-1]),
       st.booleans())
def test_top_k_rows_bounds_contain_the_truth_and_bucket_is_the_bucketed_pair(rows, alpha, beta, with_vocab):
    """gjs, renyi and bhattacharyya of top-k rows: the bounds hold the value of the full
    distributions the rows were cut from, and the bucket estimate is the measure of the
    pair the bucket map makes (ids both list, one bucket for the rest)."""
    V = len(rows[0][0])
    rows = [r for r in rows if len(r[0]) == V]
    vocab = V if with_vocab else None
    p = [r[0][r[2]] for r in rows]
    q = [r[1][r[3]] for r in rows]
    opts = dict(alpha=alpha, beta=beta)
    t = fastkl.divergences(p, q, NEW, p_ids=[r[2] for r in rows], q_ids=[r[3] for r in rows], vocab=vocab,
                           status=True, **opts)
    assert t["status"].to_pylist() == ["ok"] * len(rows)
    full = fastkl.divergences([r[0] for r in rows], [r[1] for r in rows], NEW, **opts)
    for i, (pf, qf, pi, qi) in enumerate(rows):
        bp, bq = _bucket_pair(pf, qf, pi, qi)
        bucketed = fastkl.divergences([bp], [bq], NEW, sum_tol=1e-6, **opts)
        for m in NEW:
            truth, got = full[m][i].as_py(), t[m][i].as_py()
            lo, hi = t[f"{m}_lower"][i].as_py(), t[f"{m}_upper"][i].as_py()
            note(f"row {i} {m}: {got} in [{lo}, {hi}], truth {truth}, bucketed {bucketed[m][0].as_py()}")
            slack = 1e-9 * (1 + abs(truth)) if math.isfinite(truth) else 0.0
            assert lo <= truth + slack and (truth <= hi + slack or hi == math.inf), (i, m)
            want = bucketed[m][0].as_py()
            assert got == want or abs(got - want) <= 1e-9 * (1 + abs(want)), (i, m, got, want)


@pytest.mark.parametrize("kind", ["probs", "logprobs"])
def test_fully_listed_top_k_rows_are_exact(kind, rng):
    """Every id listed on both sides: estimate = lower = upper = the dense value."""
    P = naive.make_probs(rng, 6, 9, spread=2.0)
    Q = naive.make_probs(rng, 6, 9, spread=2.0)
    ids = np.array([rng.permutation(9) for _ in range(6)])
    enc = np.log if kind == "logprobs" else (lambda x: x)
    opts = dict(alpha=1.7, beta=0.2, kind=kind)
    t = fastkl.divergences(enc(np.take_along_axis(P, ids, 1)), enc(Q), NEW, p_ids=ids, vocab=9, **opts)
    dense = fastkl.divergences(enc(P), enc(Q), NEW, **opts)
    for m in NEW:
        for col in (m, f"{m}_lower", f"{m}_upper"):
            np.testing.assert_allclose(t[col].to_numpy(), dense[m].to_numpy(), rtol=1e-9, err_msg=col)


@settings(max_examples=120, deadline=None)
@given(cases(max_k=40, max_n=4), st.sampled_from(BETAS))
def test_gjs_without_renyi_matches_the_exact_reference(case, beta):
    """gjs beside the measures of SPEC §2 only (no renyi, no bhattacharyya: their own tests
    cover their float32 loops), weights by side."""
    P, Q, measures, opts = case
    measures = tuple(m for m in dict.fromkeys(measures + ("gjs",)) if m not in ("renyi", "bhattacharyya"))
    opts = dict(opts, beta=beta)
    note(f"opts={opts}\nP={P!r}\nQ={Q!r}")
    table = fastkl.divergences(P, Q, measures=measures, status=True, on_invalid="null", **opts)
    refs = naive.reference_rows(P, Q, ("gjs",), **opts)
    failures = naive.check_against_reference(table.column("gjs").to_pylist(), refs["gjs"],
                                             naive.rel_bound(P.dtype, Q.dtype), what="gjs")
    assert not failures, "\n".join(failures[:10])


@pytest.mark.parametrize("alpha", ALPHAS + (1.0 + 1e-7, 1.0 - 1e-7))
@pytest.mark.parametrize("zeros", [0.0, 0.3])
def test_renyi_of_float32_log_probabilities(alpha, zeros, rng):
    """renyi's float32 log-space loop (it shares kl's): close rows (near alpha = 1 too),
    far ones, zeros on either side, and rows it must hand to the float64 loops (alpha - 1
    times a log-ratio above 80; S far below sum p), against the exact reference."""
    P = naive.make_logprobs(rng, 16, 40, np.float32, zero_frac=zeros, spread=3.0)
    Q = naive.make_logprobs(rng, 16, 40, np.float32, zero_frac=zeros, spread=3.0)
    Q[:4] = P[:4] + rng.normal(0, 1e-3, P[:4].shape).astype(np.float32) * (P[:4] > -np.inf)
    Q[:4] -= np.log(np.exp(Q[:4].astype(np.float64)).sum(axis=1, keepdims=True)).astype(np.float32)
    Q[4, :] = np.float32(-60.0)  # a q far below p: (alpha - 1) log(p/q) > 80 for alpha >= 2.4
    Q[4, 0] = np.float32(0.0)
    for measures in (("renyi",), ("kl", "renyi"), ("reverse_kl", "js", "renyi", "bhattacharyya")):
        assert_reference(P, Q, dict(kind="logprobs", alpha=alpha), measures, naive.rel_bound(np.float32))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("zeros", [0.0, 0.3])
def test_gjs_and_bhattacharyya_of_float32_log_probabilities(beta, zeros, rng):
    """The float32 log-space loops of gjs and bhattacharyya, with close
    and far rows, zeros on either side and each side the larger, against the exact reference."""
    P = naive.make_logprobs(rng, 12, 40, np.float32, zero_frac=zeros, spread=3.0)
    Q = naive.make_logprobs(rng, 12, 40, np.float32, zero_frac=zeros, spread=3.0)
    Q[:4] = P[:4] + rng.normal(0, 1e-3, P[:4].shape).astype(np.float32) * (P[:4] > -np.inf)
    Q[:4] -= np.log(np.exp(Q[:4].astype(np.float64)).sum(axis=1, keepdims=True)).astype(np.float32)
    for measures in (("gjs",), ("kl", "js", "gjs"), ("bhattacharyya",), ("tv", "hellinger", "bhattacharyya", "gjs")):
        opts = dict(kind="logprobs", beta=beta) if "gjs" in measures else dict(kind="logprobs")
        assert_reference(P, Q, opts, measures, naive.rel_bound(np.float32))
