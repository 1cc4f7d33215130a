"""Input containers (SPEC §5): numpy 2-D, Arrow list / large_list /
fixed_size_list (sliced, chunked, null lists), float16/32/64, mixed dtypes,
lists of lists -- all give what the numpy path gives on the same data."""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import fastkl
import naive
from naive import MEASURES, chunked, list_array

LIST_TYPES = ("list", "large_list", "fixed_size_list")


def values(table, m):
    return [None if v is None else float(v) for v in table.column(m).to_pylist()]


def numpy_expected(P, Q, null_rows=(), **opts):
    """The numpy path on dense data, with the rows that are null in the Arrow
    version set to null (the numpy path cannot express null rows)."""
    t = fastkl.divergences(P, Q, measures=MEASURES, **naive.params(MEASURES), status=True, **opts)
    out = {m: values(t, m) for m in MEASURES}
    out["status"] = t.column("status").to_pylist()
    for i in null_rows:
        for m in MEASURES:
            out[m][i] = None
        out["status"][i] = "null"
    return out


def assert_same_as(table, expected):
    for m in MEASURES:
        assert values(table, m) == expected[m], m
    assert table.column("status").to_pylist() == expected["status"]


def rows_of(X, null_rows=()):
    return [None if i in null_rows else list(map(float, r)) for i, r in enumerate(X)]


# --------------------------------------------------------------------------
# Arrow layouts against numpy


@given(
    list_type=st.sampled_from(LIST_TYPES),
    q_list_type=st.sampled_from(LIST_TYPES),
    dtype=st.sampled_from(["float32", "float64"]),
    kind=st.sampled_from(naive.KINDS),
    n=st.integers(1, 12),
    k=st.integers(1, 9),
    p_pad=st.integers(0, 3),
    q_pad=st.integers(0, 3),
    p_cuts=st.lists(st.integers(0, 12), max_size=3),
    q_cuts=st.lists(st.integers(0, 12), max_size=3),
    null_frac=st.sampled_from([0.0, 0.2, 0.5]),
    seed=st.integers(0, 2**32 - 1),
)
def test_arrow_layouts_match_numpy(list_type, q_list_type, dtype, kind, n, k, p_pad, q_pad, p_cuts, q_cuts,
                                   null_frac, seed):
    """Sliced (offset != 0), chunked with different boundaries on each side,
    with null lists: identical to the numpy path on the same numbers."""
    rng = np.random.default_rng(seed)
    P = naive.make_rows(rng, kind, n, k, np.dtype(dtype), zero_frac=0.2)
    Q = naive.make_rows(rng, kind, n, k, np.dtype(dtype), zero_frac=0.2)
    p_null = {i for i in range(n) if rng.random() < null_frac}
    q_null = {i for i in range(n) if rng.random() < null_frac}
    pa_p = list_array(rows_of(P, p_null), dtype, list_type, pad=p_pad)
    pa_q = list_array(rows_of(Q, q_null), dtype, q_list_type, pad=q_pad)
    if p_cuts:
        pa_p = chunked(pa_p, p_cuts)
    if q_cuts:
        pa_q = chunked(pa_q, q_cuts)
    note(f"p={pa_p!r}\nq={pa_q!r}")
    expected = numpy_expected(P, Q, p_null | q_null, kind=kind)
    got = fastkl.divergences(pa_p, pa_q, measures=MEASURES, **naive.params(MEASURES), status=True, kind=kind)
    assert got.num_rows == n
    assert_same_as(got, expected)


@pytest.mark.parametrize("list_type", LIST_TYPES)
def test_sliced_arrays_use_the_slice(list_type, rng):
    """arr.slice(off, n): the values before the offset must not be read
    (ListArray.values ignores the slice offset)."""
    P = naive.make_probs(rng, 10, 4, zero_frac=0.2)
    Q = naive.make_probs(rng, 10, 4, zero_frac=0.2)
    ap, aq = list_array(rows_of(P), "float64", list_type), list_array(rows_of(Q), "float64", list_type)
    for off, length in [(0, 10), (1, 9), (3, 4), (7, 3), (9, 1), (5, 0)]:
        got = fastkl.divergences(ap.slice(off, length), aq.slice(off, length), measures=MEASURES, **naive.params(MEASURES), status=True)
        expected = numpy_expected(P[off : off + length], Q[off : off + length])
        assert got.num_rows == length
        assert_same_as(got, expected)
    # different offsets on the two sides
    got = fastkl.divergences(ap.slice(2, 5), list_array(rows_of(Q[2:7]), "float64", list_type), measures=MEASURES, **naive.params(MEASURES),
                             status=True)
    assert_same_as(got, numpy_expected(P[2:7], Q[2:7]))


def test_list_array_with_offsets_not_starting_at_zero(rng):
    """A ListArray whose first offset is > 0 and whose values buffer has junk
    before and after the rows (the offsets, not the values buffer, define the rows)."""
    n, k = 4, 5
    P = naive.make_probs(rng, n, k)
    Q = naive.make_probs(rng, n, k)

    def build(X, cls, off_type):
        junk_before, junk_after = [-5.0, np.nan, 7.0], [np.inf, -1.0]
        vals = pa.array(junk_before + [float(v) for v in X.ravel()] + junk_after)
        offsets = pa.array(3 + k * np.arange(n + 1), off_type)
        return cls.from_arrays(offsets, vals)

    ap = build(P, pa.ListArray, pa.int32())
    aq = build(Q, pa.LargeListArray, pa.int64())
    assert ap.offsets[0].as_py() == 3 and len(ap.values) == n * k + 5
    got = fastkl.divergences(ap, aq, measures=MEASURES, **naive.params(MEASURES), status=True)
    assert_same_as(got, numpy_expected(P, Q))
    got = fastkl.divergences(ap.slice(1, 2), aq.slice(1, 2), measures=MEASURES, **naive.params(MEASURES), status=True)
    assert_same_as(got, numpy_expected(P[1:3], Q[1:3]))


def test_sliced_fixed_size_list_with_nulls(rng):
    P = naive.make_probs(rng, 8, 5, np.float32)
    Q = naive.make_probs(rng, 8, 5, np.float32)
    nulls = {1, 4}
    ap = list_array(rows_of(P, nulls), "float32", "fixed_size_list", pad=2)
    aq = list_array(rows_of(Q), "float32", "fixed_size_list", pad=5)
    assert ap.offset == 2 and aq.offset == 5
    got = fastkl.divergences(ap.slice(1, 6), aq.slice(1, 6), measures=MEASURES, **naive.params(MEASURES), status=True)
    assert_same_as(got, numpy_expected(P[1:7], Q[1:7], {0, 3}))


def test_chunked_arrays_with_different_boundaries(rng):
    P = naive.make_logits(rng, 11, 6)
    Q = naive.make_logits(rng, 11, 6)
    ap = chunked(list_array(rows_of(P), "float64", "list"), [3, 4, 9])
    aq = chunked(list_array(rows_of(Q), "float64", "large_list"), [1, 6])
    assert ap.num_chunks == 4 and aq.num_chunks == 3
    got = fastkl.divergences(ap, aq, measures=MEASURES, **naive.params(MEASURES), status=True, kind="logits")
    assert_same_as(got, numpy_expected(P, Q, kind="logits"))
    # empty chunks, too
    ap2 = pa.chunked_array([ap.chunk(0).slice(0, 0)] + ap.chunks + [ap.chunk(0).slice(0, 0)])
    got = fastkl.divergences(ap2, aq, measures=MEASURES, **naive.params(MEASURES), status=True, kind="logits")
    assert_same_as(got, numpy_expected(P, Q, kind="logits"))


def test_arrow_against_numpy_side_by_side(rng):
    """One side numpy, the other Arrow."""
    P = naive.make_probs(rng, 6, 7, zero_frac=0.3)
    Q = naive.make_probs(rng, 6, 7, zero_frac=0.3)
    aq = list_array(rows_of(Q), "float64", "list", pad=1)
    got = fastkl.divergences(P, aq, measures=MEASURES, **naive.params(MEASURES), status=True)
    assert_same_as(got, numpy_expected(P, Q))


def test_entropy_of_one_arrow_side(rng):
    P = naive.make_probs(rng, 6, 7, zero_frac=0.3)
    nulls = {2}
    ap = list_array(rows_of(P, nulls), "float64", "large_list", pad=3)
    got = fastkl.divergences(ap, measures=("entropy",), status=True)
    exp = fastkl.entropy(P)
    exp[2] = np.nan
    np.testing.assert_array_equal(np.array([np.nan if v is None else v for v in values(got, "entropy")]), exp)
    assert got.column("status").to_pylist() == ["ok", "ok", "null", "ok", "ok", "ok"]
    np.testing.assert_array_equal(fastkl.entropy(ap), exp)


# --------------------------------------------------------------------------
# Python lists


def test_list_of_lists_with_null_rows(rng):
    P = naive.make_probs(rng, 5, 3)
    Q = naive.make_probs(rng, 5, 3)
    lp = rows_of(P, {1})
    lq = rows_of(Q, {3})
    got = fastkl.divergences(lp, lq, measures=MEASURES, **naive.params(MEASURES), status=True)
    assert_same_as(got, numpy_expected(P, Q, {1, 3}))
    kl = fastkl.kl(lp, lq)
    assert np.isnan(kl[[1, 3]]).all() and np.isfinite(kl[[0, 2, 4]]).all()


def test_ragged_list_of_lists():
    """Rows of different lengths are fine (each row is its own distribution);
    the two sides of a row must agree in length."""
    p = [[1.0], [0.5, 0.5], [0.25, 0.25, 0.5], [0.5, 0.5]]
    q = [[1.0], [0.25, 0.75], [0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]
    t = fastkl.divergences(p, q, measures=MEASURES, **naive.params(MEASURES), status=True, on_invalid="null")
    assert t.column("status").to_pylist() == ["ok", "ok", "ok", "length_mismatch"]
    refs = naive.reference_rows(p, q, MEASURES)
    for m in MEASURES:
        assert not naive.check_against_reference(values(t, m), refs[m], 1e-12, what=m)
    assert values(t, "kl")[3] is None


def test_list_with_null_element():
    t = fastkl.divergences([[0.5, None, 0.5]], [[0.5, 0.25, 0.25]], status=True, on_invalid="null")
    assert t.column("status").to_pylist()[0] in ("null_element", "nan")
    assert values(t, "kl") == [None]


# --------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("container", ["numpy", "list", "fixed_size_list"])
def test_float16(container, rng):
    """float16 is accepted by casting (exactly) to a wider float."""
    k = 6
    # dyadic probabilities: exact in float16, rows sum to exactly 1
    W = rng.integers(0, 9, size=(7, k)).astype(np.float64)
    W[:, 0] += 1
    P16 = np.zeros_like(W)
    for i, w in enumerate(W):
        w = np.floor(w / w.sum() * 64)
        w[0] += 64 - w.sum()
        P16[i] = w / 64
    Q16 = P16[::-1].copy()
    P16, Q16 = P16.astype(np.float16), Q16.astype(np.float16)
    assert (P16.astype(np.float64).sum(axis=1) == 1).all()
    if container == "numpy":
        ip, iq = P16, Q16
    else:
        ip = list_array(rows_of(P16), "float16", container, pad=2)
        iq = list_array(rows_of(Q16), "float16", container)
        assert ip.type.value_type == pa.float16()
    got = fastkl.divergences(ip, iq, measures=MEASURES, **naive.params(MEASURES), status=True)
    assert set(got.column("status").to_pylist()) == {"ok"}
    refs = naive.reference_rows(P16.astype(np.float64), Q16.astype(np.float64), MEASURES)
    for m in MEASURES:
        assert not naive.check_against_reference(values(got, m), refs[m], 1e-6, what=m), m
    # and the same numbers as the float32 path
    e32 = numpy_expected(P16.astype(np.float32), Q16.astype(np.float32))
    for m in MEASURES:
        np.testing.assert_allclose(
            np.array(values(got, m), dtype=float), np.array(e32[m], dtype=float), rtol=1e-6, err_msg=m
        )


@pytest.mark.parametrize(
    "p_dtype,q_dtype", [("float32", "float64"), ("float64", "float32"), ("float16", "float64")]
)
@pytest.mark.parametrize("container", ["numpy", "arrow"])
def test_mixed_dtypes(p_dtype, q_dtype, container, rng):
    """p and q of different float types: each side read at its own precision.
    Q is P plus a perturbation smaller than float32 resolution, so casting the
    float64 side down to float32 would make tv exactly 0 instead of tiny."""
    n, k = 5, 8
    narrow, wide = (p_dtype, q_dtype) if p_dtype != "float64" else (q_dtype, p_dtype)
    N = naive.make_probs(rng, n, k).astype(narrow)
    if narrow == "float16":
        N = np.full((n, k), 1 / 8, dtype=np.float16)
    # +d on one entry, -d on another: exact in float64, below float32 resolution,
    # and the row sums stay exactly equal (so no measure sits at a range edge)
    d = 2.0**-40
    W = N.astype(np.float64)
    W[:, 0] += d
    W[:, 1] -= d
    W = W.astype(wide)
    assert (W.astype(narrow) == N).all() and (W != N.astype(np.float64)).any()
    P, Q = (N, W) if p_dtype == narrow else (W, N)
    if container == "arrow":
        ip = list_array(rows_of(P), p_dtype, "list", pad=1)
        iq = list_array(rows_of(Q), q_dtype, "large_list")
    else:
        ip, iq = P, Q
    got = fastkl.divergences(ip, iq, measures=MEASURES, **naive.params(MEASURES), status=True)
    assert set(got.column("status").to_pylist()) == {"ok"}
    refs = naive.reference_rows(P.astype(np.float64), Q.astype(np.float64), MEASURES)
    for m in MEASURES:
        failures = naive.check_against_reference(values(got, m), refs[m], 1e-6, what=m)
        assert not failures, failures
    assert all(v > 0 for v in values(got, "tv"))
    # exactly what the all-float64 path gives on the same values
    e64 = numpy_expected(P.astype(np.float64), Q.astype(np.float64))
    for m in MEASURES:
        exp = np.array(e64[m], dtype=float)
        refs_m = refs[m]
        g = np.array(values(got, m), dtype=float)
        for i in range(n):
            tol = 2e-12 * float(refs_m[i].terms)
            if m == "hellinger":
                assert abs(g[i] ** 2 - exp[i] ** 2) <= tol, (m, i)
            else:
                assert abs(g[i] - exp[i]) <= tol, (m, i, g[i], exp[i])


# --------------------------------------------------------------------------
# numpy layouts and shapes


def test_non_contiguous_numpy(rng):
    P = naive.make_probs(rng, 6, 5)
    Q = naive.make_probs(rng, 6, 5)
    expected = numpy_expected(P, Q)
    F = np.asfortranarray(P)
    assert not F.flags.c_contiguous
    assert_same_as(fastkl.divergences(F, Q, measures=MEASURES, **naive.params(MEASURES), status=True), expected)
    # a strided view: every other column of a wider array
    wide = np.zeros((6, 10))
    wide[:, ::2] = P
    assert_same_as(fastkl.divergences(wide[:, ::2], Q, measures=MEASURES, **naive.params(MEASURES), status=True), expected)
    # a view of every other row
    tall = np.zeros((12, 5))
    tall[::2] = Q
    assert_same_as(fastkl.divergences(P, tall[::2], measures=MEASURES, **naive.params(MEASURES), status=True), expected)


def test_inputs_are_not_modified(rng):
    P = naive.make_logits(rng, 4, 6)
    Q = naive.make_logits(rng, 4, 6)
    P0, Q0 = P.copy(), Q.copy()
    ap = list_array(rows_of(P), "float64", "list")
    fastkl.divergences(P, Q, measures=MEASURES, **naive.params(MEASURES), kind="logits", temperature=2.0, smoothing=0.1)
    fastkl.divergences(ap, Q, measures=MEASURES, **naive.params(MEASURES), kind="logits", temperature=2.0, smoothing=0.1)
    np.testing.assert_array_equal(P, P0)
    np.testing.assert_array_equal(Q, Q0)
    assert ap.to_pylist() == rows_of(P0)


def test_zero_rows():
    P = np.zeros((0, 4))
    t = fastkl.divergences(P, P, measures=("kl", "js"), status=True)
    assert t.num_rows == 0 and t.column_names == ["kl", "js", "status"]
    assert fastkl.kl(P, P).shape == (0,)
    empty = pa.array([], type=pa.list_(pa.float64()))
    assert fastkl.divergences(empty, empty, measures=MEASURES, **naive.params(MEASURES)).num_rows == 0


def test_row_count_mismatch_is_refused():
    with pytest.raises((ValueError, fastkl.FastKLError)):
        fastkl.kl(np.full((3, 2), 0.5), np.full((2, 2), 0.5))
    with pytest.raises((ValueError, fastkl.FastKLError)):
        fastkl.kl([[0.5, 0.5]], pa.array([[0.5, 0.5], [1.0, 0.0]], type=pa.list_(pa.float64())))


def test_numpy_rows_of_different_width_are_length_mismatch():
    t = fastkl.divergences(np.full((3, 2), 0.5), np.full((3, 4), 0.25), status=True, on_invalid="null")
    assert t.column("status").to_pylist() == ["length_mismatch"] * 3
    with pytest.raises(fastkl.InvalidRowError) as info:
        fastkl.kl(np.full((3, 2), 0.5), np.full((3, 4), 0.25))
    assert (info.value.reason, info.value.row, info.value.count) == ("length_mismatch", 0, 3)


def test_result_types(rng):
    P = naive.make_probs(rng, 3, 4, np.float32)
    for m in MEASURES:
        fn = getattr(fastkl, m)
        out = fn(P) if m == "entropy" else fn(P, P, **naive.params((m,)))
        assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (3,), m
    t = fastkl.divergences(P, P, measures=("tv", "kl"), status=True)
    assert isinstance(t, pa.Table)
    assert t.schema.names == ["tv", "kl", "status"]
    assert t.schema.field("tv").type == pa.float64() and t.schema.field("status").type in (pa.string(), pa.large_string())
    assert set(t.column("status").to_pylist()) <= set(fastkl.STATUSES)
    assert "status" not in fastkl.divergences(P, P).column_names
    assert fastkl.divergences(P, P).column_names == ["kl"]
