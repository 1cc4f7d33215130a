"""The vectorisable log/exp of fastkl.kernels.fastmath, over the whole float range,
and the kernel's fast paths on rows at the edges of the float range."""

from __future__ import annotations

import mpmath
import numpy as np
import pyarrow as pa
import pytest
from numba import njit

import fastkl
from fastkl.kernels.fastmath import exp32, exp_neg, exp_nonpositive, log_pos, log_ratio, log_ratio32

from naive import MEASURES, check_against_reference, params, reference_rows, rel_bound

FLAGS = {"nsz", "contract", "reassoc"}  # the kernel's flags: helpers must survive them


def _elementwise(f):
    """A loop applying the helper f to each element, compiled with the kernel's flags."""

    @njit(error_model="numpy", fastmath=FLAGS)
    def apply(x, out):
        for i in range(x.size):
            out[i] = f(x[i])

    return apply


_vec_log = _elementwise(log_pos)
_vec_exp = _elementwise(exp_neg)
_vec_exp_nonpositive = _elementwise(exp_nonpositive)
_vec_exp32 = _elementwise(exp32)


@njit(error_model="numpy", fastmath=FLAGS)
def _vec_log_ratio(a, b, out):
    for i in range(a.size):
        out[i] = log_ratio(a[i], 1.0 / b[i], a[i] - b[i])


@njit(error_model="numpy", fastmath=FLAGS)
def _vec_log_ratio32(a, b, out):
    for i in range(a.size):
        out[i] = log_ratio32(a[i], np.float32(1.0) / b[i], a[i] - b[i])


def _mp_exp(x):
    with mpmath.workdps(40):
        return mpmath.exp(mpmath.mpf(float(x)))


def test_exp_nonpositive_over_its_domain(rng):
    """logits' exp: x <= 0, within 1e-15 + 4e-17 |x| relative (one-part ln2: the error
    grows with |x| as SPEC §2's decode slack does); below 2**-1022, within 2**-1022."""
    x = np.concatenate([-rng.exponential(30.0, 3000), rng.uniform(-1, 0, 1000), [0.0, -708.3, -708.4, -745.2, -1e300,
                                                                                 -np.inf]])
    out = np.empty_like(x)
    _vec_exp_nonpositive(x, out)
    exact = np.array([float(_mp_exp(v)) for v in x])
    normal = exact >= 2.2250738585072014e-308
    assert (np.abs(out[normal] - exact[normal]) <= (1e-15 + 4e-17 * np.abs(x[normal])) * exact[normal]).all()
    assert (np.abs(out[~normal] - exact[~normal]) <= 2.2250738585072014e-308).all()
    assert out[-1] == 0.0 and out[-2] == 0.0


def test_exp32_over_its_domain(rng):
    """float32 logprobs' exp: 1e-7 relative in [-87, 88]; 0 at -88 and below; NaN stays NaN."""
    x = np.concatenate([rng.uniform(-87.0, 88.0, 4000), rng.uniform(-1, 1, 1000)]).astype(np.float32)
    out = np.empty_like(x)
    _vec_exp32(x, out)
    exact = np.array([float(_mp_exp(v)) for v in x])
    assert (np.abs(out - exact) <= 1e-7 * exact).all()
    edges = np.array([-np.inf, -1e30, -88.0, np.nan, np.inf], dtype=np.float32)
    got = np.empty_like(edges)
    _vec_exp32(edges, got)
    assert list(got[:3]) == [0.0, 0.0, 0.0] and np.isnan(got[3]) and got[4] > 1e38


def _whole_range(rng, n):
    """Positive float64s spread over every binade, subnormals included."""
    mant = rng.random(n) + 0.5
    exps = rng.integers(-1074, 1024, n)
    x = np.ldexp(mant, exps)
    x = x[np.isfinite(x) & (x > 0)]
    return np.concatenate([x, [5e-324, 1e-310, 2.2250738585072014e-308, 1.0, 1.7976931348623157e308]])


def _ulps(got, exact):
    return np.abs(got - exact) / np.spacing(np.abs(exact))


def test_log_whole_range_within_2_ulps(rng):
    x = _whole_range(rng, 200_000)
    out = np.empty_like(x)
    _vec_log(x, out)
    assert _ulps(out, np.log(x)).max() <= 2.0


def test_log_special_values():
    x = np.array([0.0, np.inf, 1.0])
    out = np.empty_like(x)
    _vec_log(x, out)
    assert out[0] == -np.inf and out[1] == np.inf and out[2] == 0.0


def test_exp_whole_range_within_2_ulps(rng):
    x = np.concatenate([rng.uniform(-760, 709.7, 200_000), [-745.13, -745.2, -708.4, -1e-300, 0.0, 1e-3]])
    out = np.empty_like(x)
    _vec_exp(x, out)
    exact = np.exp(x)
    assert np.array_equal(out == 0, exact == 0)  # underflows to 0 exactly where libm does
    nz = exact > 0
    assert _ulps(out[nz], exact[nz]).max() <= 2.0


def test_exp_of_minus_inf_is_zero():
    out = np.empty(2)
    _vec_exp(np.array([-np.inf, -1e308]), out)
    assert out[0] == 0.0 and out[1] == 0.0


def _mp_log_ratio(a, b):
    with mpmath.workdps(40):
        return float(mpmath.log(mpmath.mpf(float(a)) / mpmath.mpf(float(b))))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_log_ratio_relative_accuracy_near_and_far_from_one(rng, dtype):
    n = 3000
    a = rng.random(n) * 10.0 ** rng.integers(-30, 1, n)
    # ratios from 1 - 1e-15 to 1e6 and back: the near-1 case is the hard one
    b = a * (1 + rng.normal(size=n) * 10.0 ** rng.integers(-15, 3, n))
    a, b = a.astype(dtype), np.abs(b).astype(dtype)
    keep = (a > 0) & (b > 0)
    a, b = a[keep], b[keep]
    out = np.empty(a.size, dtype=dtype)
    (_vec_log_ratio32 if dtype == np.float32 else _vec_log_ratio)(a, b, out)
    exact = np.array([_mp_log_ratio(x, y) for x, y in zip(a, b)])
    zero = exact == 0
    assert np.all(out[zero] == 0)
    rel = np.abs(out[~zero] - exact[~zero]) / np.abs(exact[~zero])
    # float64: a few ulps; float32: well inside SPEC §2's 1e-6 for float32 input
    assert rel.max() <= (4e-16 if dtype == np.float64 else 5e-7)


EXTREME32 = np.array(
    [1e-45, 1.4e-45, 1e-40, 1.1754944e-38, 1e-30, 1e-8, 0.5, 1.0, 3e38], dtype=np.float64
).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_rows_at_the_edges_of_the_float_range(rng, dtype):
    """Rows mixing subnormals, tiny and near-1 probabilities: the fast paths
    (float32 log, ratio range checks) must hand such rows to the exact path."""
    rows_p, rows_q = [], []
    tiny = [5e-324, 1e-310, 2.2250738585072014e-308] if dtype == np.float64 else list(EXTREME32[:4])
    for _ in range(40):
        k = int(rng.integers(3, 9))
        p = rng.random(k)
        q = rng.random(k)
        for side in (p, q):
            j = rng.integers(0, k)
            side[j] = rng.choice(tiny)
        p = (p / p.sum()).astype(dtype)
        q = (q / q.sum()).astype(dtype)
        rows_p.append(p)
        rows_q.append(q)
    typ = pa.list_(pa.float32() if dtype == np.float32 else pa.float64())
    pa_p = pa.array([list(r) for r in rows_p], type=typ)
    pa_q = pa.array([list(r) for r in rows_q], type=typ)
    measures = MEASURES
    table = fastkl.divergences(pa_p, pa_q, measures=measures, **params(measures))
    refs = reference_rows([list(map(float, r)) for r in rows_p], [list(map(float, r)) for r in rows_q], measures)
    failures = []
    for m in measures:
        got = table[m].to_pylist()
        failures += check_against_reference(got, refs[m], rel_bound(dtype), what=m)
    assert not failures, "\n".join(failures[:10])


def test_float32_fast_path_matches_float64_path_within_bound(rng):
    """The float32 log (16 lanes) against the float64 path on the same values."""
    p = rng.dirichlet(np.ones(256), 500).astype(np.float32)
    q = rng.dirichlet(np.ones(256), 500).astype(np.float32)
    q[:, :3] = p[:, :3]  # exact equalities and near-equal entries
    q[:, 3:6] = p[:, 3:6] * np.float32(1 + 2**-20)
    opts = dict(measures=("kl", "reverse_kl"), sum_tol=0.1)  # the edits above move row sums a little
    got32 = fastkl.divergences(p, q, **opts).to_pydict()
    got64 = fastkl.divergences(p.astype(np.float64), q.astype(np.float64), **opts).to_pydict()
    for m in ("kl", "reverse_kl"):
        a, b = np.array(got32[m]), np.array(got64[m])
        # both within bound of the same exact value: differ by at most ~1e-6 relative
        assert np.all(np.abs(a - b) <= 1e-6 * np.abs(b)), m


@pytest.mark.parametrize("measures", [("kl",), ("reverse_kl", "entropy"), ("kl", "jeffreys", "entropy", "cross_entropy")])
def test_float32_logprobs_rows_at_the_edges_of_exp(rng, measures):
    """float32 log-probabilities take float32 exp (fastkl.kernels.fastmath.exp32): rows with
    -inf (zero probabilities, on one side or both), values whose exp is subnormal or
    underflows, and ordinary values must all match the exact reference."""
    edges = [-np.inf, -200.0, -103.5, -88.0, -87.5, -87.0, -86.9, -50.0, -1e-7]
    rows_a, rows_b = [], []
    for _ in range(60):
        k = int(rng.integers(3, 40))
        logits_a = rng.normal(size=k) * 3
        logits_b = logits_a + rng.normal(size=k)
        a = logits_a - np.log(np.exp(logits_a).sum())
        b = logits_b - np.log(np.exp(logits_b).sum())
        if rng.random() < 0.5:  # P = Q but at the edits: their terms are the whole measure
            b = a.copy()
        for side in (a, b):  # edit the smallest entries: the exp-sums stay near 1
            for j in np.argsort(side)[: int(rng.integers(0, 3))]:
                side[j] = rng.choice(edges)
        rows_a.append(a.astype(np.float32))
        rows_b.append(b.astype(np.float32))
    typ = pa.list_(pa.float32())
    pa_a = pa.array([list(map(float, r)) for r in rows_a], type=typ)
    pa_b = pa.array([list(map(float, r)) for r in rows_b], type=typ)
    opts = dict(kind="logprobs", sum_tol=0.05)  # the edits above move exp-sums a little
    table = fastkl.divergences(pa_a, pa_b, measures=measures, status=True, on_invalid="null", **opts)
    refs = reference_rows([list(map(float, r)) for r in rows_a], [list(map(float, r)) for r in rows_b],
                          measures, **opts)
    failures = []
    for m in measures:
        failures += check_against_reference(table[m].to_pylist(), refs[m], rel_bound(np.float32), what=m)
    assert not failures, "\n".join(failures[:10])
    assert table["status"].to_pylist().count("ok") > 30  # most rows are valid: the fast loops ran

