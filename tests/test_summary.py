"""Tests of the job summary (fastkl/summary/stats.py, SPEC §7).

What is checked, precisely:

* Split invariance: a batch cut into random pieces, whose states are merged
  in a random order and tree shape, gives a PartStats equal to the unsplit
  one and a Summary equal to it with `==` AND with identical JSON text (so
  floats are equal bit for bit, sign of zero included).
* Exactness: mean == the exact rational mean (fractions.Fraction) rounded
  once to float64; std == the exact population std (ddof=0) rounded once,
  the reference being a 120-digit Decimal square root of the exact Fraction
  variance. Both are equalities, stronger than the 1-ulp bound asked for.
* Quantiles: for the sorted finite valid values xs (n of them) and q in
  (0.5, 0.9, 0.99), with r = floor(q * (n - 1)) (NumPy's method="lower"):
  |pq - xs[r]| <= ALPHA * |xs[r]| * (1 + 1e-9) + 2.3e-308 (the sketch's
  zero bucket), and ALPHA <= 0.5%, so the relative error is within 1%.
  Also: on the same values, the quantiles equal those of the ddsketch
  library's own sketch (values added one by one), clamped into [min, max].
* JSON and pickle round trips give equal objects; format_table shows each
  measure name and its counts.
"""

from __future__ import annotations

import decimal
import json
import math
import pickle
import random
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastkl.summary import stats
from fastkl._registry import FIRST_INVALID, STATUS_CODE, STATUSES
from fastkl.summary.stats import ALPHA, PartStats, Summary

MEASURES = ("kl", "js", "tv")

SPECIAL = [0.0, -0.0, math.inf, 1e-300, 5e-324, 2.2250738585072014e-308, 1e300,
           1.7976931348623157e308, 1.0, math.log(2), 1e-17, 3.5e-136, 2.0 ** 451,
           -1.5, -1e-200, -math.inf]


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def value_strategy():
    return st.one_of(
        st.sampled_from(SPECIAL),
        st.floats(0.0, 50.0),
        st.floats(allow_nan=False, allow_infinity=False),
        st.floats(1e-320, 1e-250),
    )


@st.composite
def batches(draw, max_rows=120):
    n = draw(st.integers(0, max_rows))
    m = len(MEASURES)
    flat = draw(st.lists(value_strategy(), min_size=n * m, max_size=n * m))
    values = np.array(flat, dtype=np.float64).reshape(m, n)
    codes = [0] * 6 + [c for c in range(1, len(STATUSES)) if STATUSES[c] != "target_unlisted"]
    status = np.array(draw(st.lists(st.sampled_from(codes), min_size=n, max_size=n)), dtype=np.uint8)
    values[:, status != 0] = np.nan
    return values, status


def split_and_merge(values, status, rnd: random.Random) -> PartStats:
    """Cut into random pieces, build the states, merge them in a random tree."""
    n = status.shape[0]
    cuts = sorted(rnd.sample(range(1, n), min(n - 1, rnd.randint(0, 8)))) if n > 1 else []
    bounds = [0] + cuts + [n]
    parts = [PartStats.from_batch(MEASURES, values[:, a:b], status[a:b])
             for a, b in zip(bounds[:-1], bounds[1:])]
    rnd.shuffle(parts)
    if rnd.random() < 0.3:
        return PartStats.merge_all(parts, MEASURES)
    while len(parts) > 1:
        i, j = sorted(rnd.sample(range(len(parts)), 2))
        b = parts.pop(j)
        a = parts.pop(i)
        parts.append(a.merge(b) if rnd.random() < 0.5 else b.merge(a))
    return parts[0]


def exact_mean_std(xs: list[float]) -> tuple[float, float]:
    fr = [Fraction(x) for x in xs]
    n = len(fr)
    mu = sum(fr, Fraction(0)) / n
    var = sum(((f - mu) ** 2 for f in fr), Fraction(0)) / n
    with decimal.localcontext() as ctx:
        # enough digits for the square root of a tie between two doubles (a dyadic
        # rational of ~1100 bits, e.g. (2**-1022 - 2**-1074) / 2) to come out exact:
        # 120 digits rounded such a tie to the wrong side (std off by one subnormal ulp)
        ctx.prec = 2400
        sd = (decimal.Decimal(var.numerator) / decimal.Decimal(var.denominator)).sqrt()
        std = float(sd)
    return float(mu), std


def finite_valid(values, status, i):
    x = values[i][status == 0]
    return x[np.isfinite(x)]


def check_against_reference(summary: Summary, values, status):
    for i, name in enumerate(MEASURES):
        m = summary.measures[name]
        x = finite_valid(values, status, i)
        ok = values[i][status == 0]
        assert m.rows == status.size
        assert m.valid == int(np.sum(status == 0))
        assert m.null == int(np.sum(status == 1))
        assert m.invalid == {r: int(np.sum(status == c)) for c, r in enumerate(STATUSES) if c >= FIRST_INVALID}
        assert m.inf == int(np.sum(ok == np.inf))
        assert m.neg_inf == int(np.sum(ok == -np.inf)) and m.nan == 0
        assert m.finite == x.size
        assert m.zeros == int(np.sum(x == 0))
        assert sum(c for _, _, c in m.histogram) == x.size
        if x.size == 0:
            assert m.mean is m.std is m.min is m.max is m.p50 is None
            continue
        mean, std = exact_mean_std(x.tolist())
        assert m.mean == mean
        assert m.std == std
        assert m.min == float(x.min()) and m.max == float(x.max())
        xs = np.sort(x)
        for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
            ref = xs[int(math.floor(q * (xs.size - 1)))]
            got = getattr(m, key)
            assert abs(got - ref) <= ALPHA * abs(ref) * (1 + 1e-9) + 2.3e-308, (key, got, ref)
            assert m.min <= got <= m.max


def test_std_rounds_a_tie_to_even_like_the_exact_reference():
    """sqrt of the variance of {2**-1022, 2**-1074} is (2**-1022 - 2**-1074) / 2, exactly halfway
    between two subnormals: ties go to the even one (the reference once rounded it the other way)."""
    xs = [2.0**-1022, 5e-324]
    tie_even = float.fromhex("0x0.8000000000000p-1022")
    assert exact_mean_std(xs)[1] == tie_even
    values = np.array([xs] * len(MEASURES))
    s = Summary.from_stats(PartStats.from_batch(MEASURES, values, np.zeros(2, dtype=np.uint8)))
    assert s.measures["kl"].std == tie_even


# ----------------------------------------------------------------------------
# split invariance and exactness
# ----------------------------------------------------------------------------

@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.integers(0, 2**32))
def test_split_merge_identical_and_exact(batch, seed):
    values, status = batch
    whole = PartStats.from_batch(MEASURES, values, status)
    merged = split_and_merge(values, status, random.Random(seed))
    assert merged == whole
    s_whole = Summary.from_stats(whole)
    s_merged = Summary.from_stats(merged)
    assert s_merged == s_whole
    assert json.dumps(s_merged.to_dict()) == json.dumps(s_whole.to_dict())
    check_against_reference(s_whole, values, status)


def test_split_invariance_larger_batch_and_flush_path(monkeypatch):
    rng = np.random.default_rng(7)
    n = 30_000
    values = np.abs(rng.standard_cauchy((len(MEASURES), n))) * 10.0 ** rng.integers(-20, 5, n)
    values[:, rng.random(n) < 0.2] = 0.0
    values[0, rng.random(n) < 0.01] = np.inf
    values[1, :len(SPECIAL)] = [x for x in SPECIAL]
    values[2] *= np.where(rng.random(n) < 0.3, -1.0, 1.0)
    others = [c for c in range(1, len(STATUSES)) if STATUSES[c] != "target_unlisted"]
    status = rng.choice([0] + others, n, p=[0.9] + [0.1 / len(others)] * len(others)).astype(np.uint8)
    values[:, status != 0] = np.nan
    whole = PartStats.from_batch(MEASURES, values, status)
    s_whole = Summary.from_stats(whole)
    check_against_reference(s_whole, values, status)
    # tiny chunks and flushes: exercises the flush of the float bin sums
    monkeypatch.setattr(stats, "_CHUNK", 97)
    monkeypatch.setattr(stats, "_FLUSH", 300)
    for seed in range(3):
        merged = split_and_merge(values, status, random.Random(seed))
        assert merged == whole
        assert json.dumps(Summary.from_stats(merged).to_dict()) == json.dumps(s_whole.to_dict())


def test_exact_sums_at_capacity():
    # every value with all 53 mantissa bits set and the same exponent: the
    # worst case for the per-exponent float bin sums
    x = np.nextafter(2.0, 0.0)
    n = 3_000_000
    values = np.full((1, n), x)
    ps = PartStats.from_batch(("kl",), values, np.zeros(n, np.uint8))
    assert ps._stats[0].s1 == int(Fraction(x) * n * 2**1074)
    assert ps._stats[0].s2 == int(Fraction(x) ** 2 * n * 2**2148)
    m = Summary.from_stats(ps).measures["kl"]
    assert m.mean == x and m.std == 0.0 and m.p50 == x and m.p99 == x


def test_quantiles_broad_distribution():
    rng = np.random.default_rng(11)
    n = 200_000
    values = np.exp(rng.normal(-3, 4, (1, n)))
    values[0, ::9] = 0.0
    status = np.zeros(n, np.uint8)
    s = Summary.from_stats(PartStats.from_batch(("kl",), values, status))
    m = s.measures["kl"]
    xs = np.sort(values[0])
    for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
        ref = xs[int(math.floor(q * (n - 1)))]
        assert ref == np.quantile(xs, q, method="lower")
        assert abs(getattr(m, key) - ref) <= 0.01 * ref
        assert abs(getattr(m, key) - ref) <= ALPHA * ref * (1 + 1e-9)


def test_negative_zero_and_non_ok_rows_ignored():
    values = np.array([[-0.0, 0.0, 1.0, 123.0, -7.0]])
    status = np.array([0, 0, 0, STATUS_CODE["empty"], 1], np.uint8)   # the last two are not ok: ignored
    m = Summary.from_stats(PartStats.from_batch(("kl",), values, status)).measures["kl"]
    assert (m.finite, m.zeros, m.valid, m.null, m.invalid["empty"]) == (3, 2, 3, 1, 1)
    assert m.max == 1.0 and math.copysign(1.0, m.min) == 1.0   # -0.0 normalised to 0.0
    assert m.mean == Fraction(1, 3).__float__()


# ----------------------------------------------------------------------------
# the sketch mapping
# ----------------------------------------------------------------------------

def test_vectorised_keys_equal_library_keys():
    mapping = stats._MAPPING
    rng = np.random.default_rng(5)
    edges = np.array([mapping.value(k) for k in range(-3000, 3000, 7)])
    x = np.concatenate([
        np.exp(rng.uniform(-700, 700, 20_000)), rng.exponential(1.0, 20_000),
        edges, np.nextafter(edges, 0), np.nextafter(edges, np.inf),
        [1.0, 2.0, 0.5, math.log(2), 1.7976931348623157e308, 2.3e-308],
    ])
    x = x[(x > mapping.min_possible) & (x <= mapping.max_possible)]
    assert stats._keys(x).tolist() == [mapping.key(v) for v in x.tolist()]


def test_vectorised_values_equal_library_values():
    mapping = stats._MAPPING
    assert stats._MULT == mapping._multiplier
    k_lo, k_hi = mapping.key(mapping.min_possible * 1.0001), mapping.key(mapping.max_possible)
    assert k_hi == stats._K_MAX
    keys = np.arange(k_lo, k_hi + 1)
    lib = [mapping.value(k) for k in keys.tolist()]
    assert stats._values(keys).tolist() == lib
    assert [mapping.key(v) for v in lib] == keys.tolist()       # key(value(k)) == k
    # the overflow bucket: everything above the top key's range
    top = np.array([np.nextafter(lib[-1] * mapping.gamma, np.inf), 1.7976931348623157e308])
    assert stats._keys(top).tolist() == [stats._K_TOP] * 2
    rep = stats._values(np.array([stats._K_TOP]))[0]
    assert np.all(np.abs(rep - top) <= ALPHA * top)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.floats(-1e6, 1e6), st.sampled_from([0.0, 1e-310, -3e-300, 1e300])),
                min_size=1, max_size=300))
def test_quantiles_equal_library_sketch(xs):
    from ddsketch.ddsketch import BaseDDSketch
    from ddsketch.mapping import LinearlyInterpolatedMapping
    from ddsketch.store import DenseStore

    lib = BaseDDSketch(LinearlyInterpolatedMapping(ALPHA), DenseStore(), DenseStore(), 0.0)
    for x in xs:
        lib.add(x)
    values = np.array([xs])
    m = Summary.from_stats(PartStats.from_batch(("kl",), values, np.zeros(len(xs), np.uint8)))
    m = m.measures["kl"]
    for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
        expect = min(max(float(lib.get_quantile_value(q)), min(xs)), max(xs)) + 0.0
        assert getattr(m, key) == expect


# ----------------------------------------------------------------------------
# serialisation, API edges, table
# ----------------------------------------------------------------------------

def _sample_stats(n=5000, seed=1):
    rng = np.random.default_rng(seed)
    values = rng.exponential(0.2, (len(MEASURES), n))
    values[:, ::11] = 0.0
    values[0, ::97] = np.inf
    status = np.zeros(n, np.uint8)
    status[::50] = 1
    status[::71] = STATUSES.index("not_normalized")
    values[:, status != 0] = np.nan
    return PartStats.from_batch(MEASURES, values, status), values, status


def test_json_and_pickle_round_trips():
    ps, _, _ = _sample_stats()
    d = json.loads(json.dumps(ps.to_json()))
    assert PartStats.from_json(d) == ps
    assert pickle.loads(pickle.dumps(ps)) == ps
    assert len(pickle.dumps(ps)) < 64_000
    s = Summary.from_stats(ps, dest="out/", options={"base": 2.0}, timings={"total": 1.5}, files=3)
    text = json.dumps(s.to_dict(), allow_nan=False)      # plain JSON: no inf/nan
    assert Summary.from_dict(json.loads(text)) == s
    assert pickle.loads(pickle.dumps(s)) == s
    # a state restored from JSON merges like the original
    ps2, _, _ = _sample_stats(seed=2)
    assert PartStats.from_json(d).merge(ps2) == ps.merge(ps2)


def test_empty_and_errors():
    e = PartStats.empty(MEASURES)
    assert e.rows == 0
    s = Summary.from_stats(e)
    assert s.rows == 0 and s.measures["kl"].mean is None and s.measures["kl"].histogram == []
    assert "kl" in s.format_table()
    assert PartStats.merge_all([], MEASURES) == e
    ps, _, _ = _sample_stats()
    assert ps.merge(e) == ps and e.merge(ps) == ps
    assert PartStats.merge_all([ps]) == ps
    with pytest.raises(ValueError):
        PartStats.merge_all([])
    with pytest.raises(ValueError):
        ps.merge(PartStats.empty(("kl",)))
    with pytest.raises(ValueError):
        PartStats.from_batch(MEASURES, np.zeros((2, 3)), np.zeros(3, np.uint8))
    with pytest.raises(ValueError):
        PartStats.from_batch(("kl",), np.zeros((1, 2)), np.array([0, 99], np.uint8))
    # all rows invalid
    st_all = np.full(4, STATUSES.index("nan"), np.uint8)
    s = Summary.from_stats(PartStats.from_batch(("kl",), np.full((1, 4), np.nan), st_all))
    assert s.measures["kl"].invalid["nan"] == 4 and s.measures["kl"].finite == 0


def test_histogram_shape():
    ps, values, status = _sample_stats(20_000)
    s = Summary.from_stats(ps)
    h = s.measures["js"].histogram
    assert len(h) == stats.HIST_BINS
    assert h[0][0] == s.measures["js"].min and h[-1][1] == s.measures["js"].max
    assert all(a[1] == b[0] for a, b in zip(h, h[1:]))
    # counts agree with an exact histogram up to values within ALPHA of an edge
    x = finite_valid(values, status, 1)
    exact = np.histogram(x, bins=[lo for lo, _, _ in h] + [h[-1][1]])[0]
    moved = sum(abs(int(a) - c) for a, (_, _, c) in zip(exact, h))
    near_edge = sum(int(np.sum(np.abs(x - hi) <= ALPHA * abs(x) + 1e-300)) for _, hi, _ in h)
    assert moved <= 2 * near_edge
    const = Summary.from_stats(PartStats.from_batch(("kl",), np.full((1, 5), 0.25),
                                                    np.zeros(5, np.uint8)))
    assert const.measures["kl"].histogram == [(0.25, 0.25, 5)]


def test_format_table():
    ps, _, _ = _sample_stats()
    s = Summary.from_stats(ps)
    for uni in (True, False):
        text = s.format_table(unicode=uni)
        if not uni:
            text.encode("ascii")
        lines = text.splitlines()
        for name, m in s.measures.items():
            line = next(l for l in lines if l.startswith(name + " "))
            for count in (m.valid, m.null, sum(m.invalid.values()), m.inf):
                assert str(count) in line.split()
            assert sum(1 for l in lines if l.strip().startswith(name + " ")) == 2  # row + histogram
        assert f"not_normalized {s.status_counts['not_normalized']}" in text
        assert str(s.rows) in lines[0]
    assert str(s) == s.format_table()


def test_target_unlisted_rows_count_as_valid_except_for_their_target_measures():
    """A top-k row whose target is not listed: its kl counts, its nll (NaN there) does not."""
    measures = ("kl", "nll_p")
    values = np.array([[0.5, 1.5, 2.5], [1.0, np.nan, 3.0]])
    status = np.array([0, STATUSES.index("target_unlisted"), 0], dtype=np.uint8)
    s = Summary.from_stats(PartStats.from_batch(measures, values, status))
    assert s.measures["kl"].valid == 3 and s.measures["kl"].mean == 1.5
    assert s.measures["nll_p"].valid == 2 and s.measures["nll_p"].mean == 2.0 and s.measures["nll_p"].nan == 0
    assert "1 whose target is not listed" in s.format_table(unicode=False)
