"""RLHF KL estimators from sampled-token log-probs (SPEC §11, kind="sampled"):
k1, k2, k3, abs per token and per sequence, against exact references."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import fastkl
import naive

MEASURES = naive.SAMPLED_MEASURES

logprob = st.one_of(
    st.floats(-30.0, 0.0),
    st.floats(-700.0, 0.0),
    st.sampled_from([0.0, -1e-12, -0.69314718, -700.0, -math.inf, 1e-4, 0.5, math.nan, math.inf]),
)


def _slope(m, r):
    """|d estimator / d r|: how the rounding of r = q - p (one float64 subtraction) propagates."""
    if m == "k2":
        return abs(r)
    if m == "k3":
        return abs(math.expm1(r)) if r < 700 else math.inf
    return 1.0


def _check(got, want, what, m=None, r=0.0, rel=0.0):
    """The exact reference within a few ulps of its size plus the rounding of r = q - p
    (or within `rel` of its size: the bound of 32- and 16-bit input, see `_rel`)."""
    if want is None:
        assert got is None or math.isnan(got), what
        return
    if math.isinf(want):
        assert got == float(want), (what, got)
        return
    w = float(want)
    allowed = max(4e-16 * abs(w) + 1.2e-16 * abs(r) * (_slope(m, r) if m else 1.0), rel * abs(w)) + 1e-300
    assert abs(got - w) <= allowed, (what, got, w)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(logprob, logprob), min_size=1, max_size=12), st.sampled_from(["float64", "float32"]),
       st.booleans())
def test_token_rows_match_the_exact_reference(pairs, dtype, arrow):
    p = np.array([a for a, _ in pairs], dtype=dtype)
    q = np.array([b for _, b in pairs], dtype=dtype)
    pp, qq = (pa.array(p), pa.array(q)) if arrow else (p, q)
    table = fastkl.divergences(pp, qq, MEASURES, kind="sampled", on_invalid="null", status=True)
    status = table["status"].to_pylist()
    for i in range(len(pairs)):
        pi, qi = float(p[i]), float(q[i])  # the stored values
        note(f"row {i}: p={pi!r} q={qi!r} status={status[i]}")
        for m in MEASURES:
            want = naive.sampled_reference(m, pi, qi)
            assert (status[i] == "ok") == (want is not None), (i, status[i])
            _check(table[m][i].as_py(), want, (i, m), m, qi - pi)
            if m == "k3" and want is not None:
                assert table[m][i].as_py() >= 0.0  # k3 is never negative


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.floats(-20.0, 0.0), st.floats(-20.0, 0.0)), max_size=6), min_size=1,
                max_size=5),
       st.sampled_from(["none", "mask", "lengths"]), st.sampled_from(["list", "large_list"]), st.data())
def test_sequences_sum_and_mean_over_counted_positions(seqs, masking, list_type, data):
    vt = pa.large_list(pa.float64()) if list_type == "large_list" else pa.list_(pa.float64())
    p = pa.array([[a for a, _ in s] for s in seqs], type=vt)
    q = pa.array([[b for _, b in s] for s in seqs], type=vt)
    counted = [[True] * len(s) for s in seqs]
    kw = {}
    if masking == "mask":
        counted = [data.draw(st.lists(st.booleans(), min_size=len(s), max_size=len(s))) for s in seqs]
        kw["mask"] = pa.array(counted, type=pa.list_(pa.bool_()))
    elif masking == "lengths":
        lengths = [data.draw(st.integers(0, len(s))) for s in seqs]
        counted = [[j < n for j in range(len(s))] for s, n in zip(seqs, lengths)]
        kw["lengths"] = np.array(lengths)
    table = fastkl.divergences(p, q, MEASURES, kind="sampled", per_token=True, status=True, **kw)
    for i, s in enumerate(seqs):
        n = sum(counted[i])
        assert table["tokens"][i].as_py() == n
        assert table["status"][i].as_py() == ("ok" if n else "no_tokens")
        for m in MEASURES:
            refs = [naive.sampled_reference(m, a, b) if c else None for (a, b), c in zip(s, counted[i])]
            toks = table[f"{m}_tokens"][i].as_py()
            for g, r, (a, b) in zip(toks, refs, s):
                _check(g, r, (i, m), m, b - a)
            if n:
                total = math.fsum(float(r) for r in refs if r is not None)
                assert table[m][i].as_py() == pytest.approx(total, rel=1e-13, abs=1e-13)
                assert table[f"{m}_mean"][i].as_py() == pytest.approx(total / n, rel=1e-13, abs=1e-13)


def test_k1_and_k3_average_to_the_kl_of_the_distributions():
    """Unbiased: the mean of k1 (and k3) over tokens sampled from the policy -> KL(policy || reference)."""
    rng = np.random.default_rng(0)
    V, n = 20, 400_000
    policy = rng.dirichlet(np.ones(V))
    reference = rng.dirichlet(np.ones(V))
    tokens = rng.choice(V, size=n, p=policy)
    lp, lq = np.log(policy[tokens]), np.log(reference[tokens])
    kl = float(np.sum(policy * np.log(policy / reference)))
    table = fastkl.divergences(lp, lq, ["k1", "k3"], kind="sampled")
    for m in ("k1", "k3"):
        x = table[m].to_numpy()
        sigma = x.std() / math.sqrt(n)
        assert abs(x.mean() - kl) < 5 * sigma, (m, x.mean(), kl, sigma)  # fixed seed: deterministic


def test_extreme_log_ratios_are_defined():
    p = np.array([-710.0, 0.0, -1e-300, -5.0, -700.0])
    q = np.array([0.0, -700.0, 0.0, -np.inf, 0.0])
    t = fastkl.divergences(p, q, MEASURES, kind="sampled")
    k3 = t["k3"].to_pylist()
    assert k3[0] == math.inf  # e^710 overflows: +inf, never NaN, never a clamp
    assert k3[1] == pytest.approx(699.0, rel=1e-15)
    assert k3[4] == pytest.approx(math.exp(700.0), rel=1e-12)  # verl would have clamped this at 10
    assert t["k1"].to_pylist() == [-710.0, 700.0, -1e-300, math.inf, -700.0]
    assert all(math.isinf(v) for v in (t[m][3].as_py() for m in MEASURES))


def test_a_bad_position_is_named_and_nothing_else_is_lost():
    p = pa.array([[-0.1, -0.2], [-0.3, float("nan")]])
    q = pa.array([[-0.1, -0.2], [-0.3, -0.4]])
    with pytest.raises(fastkl.InvalidRowError, match=r"row 1, position 1: p = nan cannot be the log-prob of a token the policy sampled"):
        fastkl.divergences(p, q, ["k1"], kind="sampled")
    t = fastkl.divergences(p, q, ["k1"], kind="sampled", on_invalid="null", status=True)
    assert t["status"].to_pylist() == ["ok", "nan"]


@pytest.mark.parametrize("call, match", [
    (lambda: fastkl.divergences([[-0.1]], [[-0.2]], ["k1", "kl"], kind="sampled"), "cannot be asked together"),
    (lambda: fastkl.divergences(np.array([-0.1]), np.array([-0.2]), ["k1"]), "need kind='sampled'"),
    (lambda: fastkl.divergences(np.array([[0.5, 0.5]]), np.array([[0.5, 0.5]]), ["kl"], kind="sampled"),
     "ask for the estimators"),
    (lambda: fastkl.divergences(np.array([-0.1]), None, ["k1"], kind="sampled"), "q is required"),
    (lambda: fastkl.divergences(np.array([[-0.1]]), np.array([[-0.2]]), ["k1"], kind="sampled",
                                p_ids=[[1]], q_ids=[[1]]), "no token ids"),
])
def test_option_errors(call, match):
    with pytest.raises(fastkl.OptionError, match=match):
        call()


def test_a_rollout_table_through_a_job(tmp_path):
    """Per sequence the policy's and the reference's log-prob of each sampled token, a response mask."""
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from fastkl.cli import main

    rng = np.random.default_rng(3)
    n, t = 30, 12
    lp = -rng.exponential(1.0, (n, t)).astype(np.float32)
    lq = (lp + rng.normal(0, 0.3, (n, t))).clip(max=0).astype(np.float32)
    mask = (rng.random((n, t)) < 0.8).astype(np.int8)
    table = pa.table({"id": np.arange(n), "logp": pa.array(lp.tolist(), type=pa.list_(pa.float32())),
                      "ref_logp": pa.array(lq.tolist(), type=pa.list_(pa.float32())),
                      "response_mask": pa.array(mask.tolist(), type=pa.list_(pa.int8()))})
    src = tmp_path / "rollouts"
    src.mkdir()
    pq.write_table(table, src / "part-0.parquet", row_group_size=8)
    r = CliRunner().invoke(main, ["run", str(src), str(tmp_path / "out"), "--p", "logp", "--q", "ref_logp",
                                  "--kind", "sampled", "--mask", "response_mask", "--keep", "id",
                                  "--summary-json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    got = pq.read_table(tmp_path / "out").sort_by("id")
    want = fastkl.divergences(table["logp"], table["ref_logp"], ["k1", "k3"], kind="sampled",
                              mask=table["response_mask"])
    assert got.column_names == ["id"] + want.column_names
    for c in want.column_names:
        assert got[c].to_pylist() == want[c].to_pylist(), c
    import json
    s = json.loads((tmp_path / "s.json").read_text())
    k3 = np.where(mask == 1, [[float(naive.sampled_reference("k3", a, b)) for a, b in zip(ra, rb)]
                              for ra, rb in zip(lp.astype(float), lq.astype(float))], np.nan)
    # the token mean over the dataset (GRPO's number) and the sequence mean of sums (PPO's), within
    # the float32 bound (the input is float32: k3 is evaluated in float32, see `_rel`)
    assert s["tokens"]["measures"]["k3"]["mean"] == pytest.approx(np.nanmean(k3), rel=_rel(lp))
    assert s["measures"]["k3"]["mean"] == pytest.approx(np.nanmean(np.nansum(k3, axis=1)), rel=_rel(lp))


# ---------------------------------------------------------------- the fused sequence kernel
# kernels.sampled.sampled_sequences sums each sequence in one pass and writes per-position
# values only for m_tokens (or when the summary reads them): compared with the exact
# reference, for every shape the sampled kind accepts.

from fastkl._engine import compute  # noqa: E402
from fastkl._options import Options  # noqa: E402
from fastkl.summary.stats import PartStats  # noqa: E402

_SPECIAL = [math.nan, math.inf, -math.inf, 0.5, 1e-4, 0.0, -1e-300, -700.0, None]


def _sum_check(got, refs, what, rel=1e-13):
    """A sequence's sum against math.fsum of the exact terms: within `rel` (default 1e-13) of
    the sum of their sizes (the error bound allows 1e-12 for float64 input, 1e-6 for float32),
    +inf exactly."""
    terms = [float(r) for r in refs if r is not None]
    if any(math.isinf(t) for t in terms):
        assert got == math.inf, (what, got)
        return
    want = math.fsum(terms)
    assert abs(got - want) <= rel * math.fsum(abs(t) for t in terms) + 1e-300, (what, got, want)


def _rel(side):
    """The bound a sequence's estimators are held to: 32- and 16-bit input is held to the float32
    bound (1e-6 of its terms; the kernel forms r = q - p, k3 and their sums' terms in float32
    there), float64 input to ~exact (0: `_check`'s ulps, 1e-13 for sums)."""
    t = side.dtype if isinstance(side, np.ndarray) else side.type.value_type
    narrow = np.dtype(t.to_pandas_dtype() if isinstance(t, pa.DataType) else t).itemsize <= 4
    return 1e-6 if narrow else 0.0


@st.composite
def _sampled_sequences(draw):
    """(p, q, counted, kwargs for the call, list-of-lists of stored p, of stored q)."""
    layout = draw(st.sampled_from(["list", "large_list", "numpy"]))
    dtype = draw(st.sampled_from(["float64", "float32", "float16"] + (["bfloat16"] if layout == "numpy" else [])))
    n = draw(st.integers(1, 6))
    t_fixed = draw(st.integers(0, 9))
    seqs = []
    for _ in range(n):
        t = t_fixed if layout == "numpy" else draw(st.integers(0, 9))
        good = st.tuples(st.floats(-20.0, 0.0), st.floats(-20.0, 0.0))
        pos = draw(st.lists(good, min_size=t, max_size=t))
        pos = [list(x) for x in pos]
        if t and draw(st.booleans()):  # one special value somewhere (bad or extreme)
            j, side = draw(st.integers(0, t - 1)), draw(st.integers(0, 1))
            special = draw(st.sampled_from(_SPECIAL if layout != "numpy" else _SPECIAL[:-1]))
            pos[j][side] = special
        seqs.append(pos)
    null_seq = layout != "numpy" and n > 1 and draw(st.booleans())
    if null_seq:
        seqs[draw(st.integers(0, n - 1))] = None
    masking = draw(st.sampled_from(["none", "mask", "lengths"]))
    counted = [[True] * (len(s) if s is not None else 0) for s in seqs]
    kw = {}
    if masking == "mask":
        counted = [draw(st.lists(st.booleans(), min_size=len(c), max_size=len(c))) for c in counted]
        kw["mask"] = (np.array(counted, dtype=np.int8).reshape(n, t_fixed) if layout == "numpy"
                      else pa.array(counted, type=pa.list_(pa.bool_())).cast(
                          pa.list_(draw(st.sampled_from([pa.bool_(), pa.int8()])))))
    elif masking == "lengths":
        lengths = [draw(st.integers(0, len(c))) for c in counted]
        counted = [[j < k for j in range(len(c))] for c, k in zip(counted, lengths)]
        kw["lengths"] = np.array(lengths)
    pad = draw(st.integers(0, 2)) if layout != "numpy" else 0
    sides = []
    for side in (0, 1):
        rows = [None if s is None else [x[side] for x in s] for s in seqs]
        sides.append(_sampled_column(rows, layout, dtype, pad, t_fixed))
    return sides[0], sides[1], counted, kw, *(_stored(x) for x in sides)


def _sampled_column(rows, layout, dtype, pad, t):
    """The rows as a sequence column: a 2-D array, or a (sliced, when pad) list array with
    null elements and null sequences where rows say None."""
    if layout == "numpy":
        if dtype == "bfloat16":
            import ml_dtypes
            return np.array(rows, dtype=np.float64).reshape(len(rows), t).astype(ml_dtypes.bfloat16)
        return np.array(rows, dtype=np.float64).reshape(len(rows), t).astype(dtype)
    rows = [[-1.0, -2.0]] * pad + rows + [[-3.0]] * pad
    flat = [x for r in rows if r is not None for x in r]
    values = np.array([0.0 if x is None else x for x in flat], dtype=np.float64).astype(dtype)
    child = pa.array(values, mask=np.array([x is None for x in flat], dtype=bool))
    offsets = np.concatenate([[0], np.cumsum([len(r) if r is not None else 0 for r in rows])])
    cls, off_type = (pa.LargeListArray, pa.int64()) if layout == "large_list" else (pa.ListArray, pa.int32())
    arr = cls.from_arrays(pa.array(offsets, type=off_type), child,
                          mask=pa.array([r is None for r in rows]))
    return arr.slice(pad, len(rows) - 2 * pad) if pad else arr


def _stored(x):
    """The values as stored (what the kernel reads), as Python floats (None: null)."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float64).tolist()
    return [None if r is None else [None if v is None else float(v) for v in r] for r in x.to_pylist()]


def _run(p, q, kw, per_token, threads=None):
    options = Options.from_kwargs(kind="sampled", on_invalid="null", per_token=per_token)
    return compute(p, q, MEASURES, options, threads=threads, **kw)


@settings(max_examples=120, deadline=None)
@given(_sampled_sequences())
def test_fused_sequences_match_the_exact_reference(case):
    p, q, counted, kw, p_rows, q_rows = case
    res = _run(p, q, kw, per_token=False)
    res_t = _run(p, q, kw, per_token=True)
    # per_token changes what is written, never the sums
    assert np.array_equal(res.values, res_t.values, equal_nan=True)
    assert np.array_equal(res.status, res_t.status) and np.array_equal(res.tokens, res_t.tokens)
    table = res_t.to_table(status=True)
    for i, (ps, qs) in enumerate(zip(p_rows, q_rows)):
        status, bad_at, refs = naive.sampled_sequence_reference(ps, qs, counted[i])
        note(f"sequence {i}: p={ps} q={qs} counted={counted[i]} -> {status} at {bad_at}")
        assert table["status"][i].as_py() == status, i
        if status in ("ok", "no_tokens"):
            assert table["tokens"][i].as_py() == sum(counted[i])
        if bad_at is not None:  # named as the token path names it: the first bad counted position
            position, detail = res.describe(i, status)
            assert position == bad_at and detail, (i, position, detail)
        if status != "ok":
            assert all(table[m][i].as_py() is None for m in MEASURES)
            continue
        n = sum(counted[i])
        for m in MEASURES:
            _sum_check(table[m][i].as_py(), refs[m], (i, m), _rel(p) or 1e-13)
            assert table[f"{m}_mean"][i].as_py() == table[m][i].as_py() / n
            for j, (g, r) in enumerate(zip(table[f"{m}_tokens"][i].as_py(), refs[m])):
                _check(g, r, (i, j, m), m, (qs[j] - ps[j]) if r is not None else 0.0, _rel(p))


def _long_sequences(rng, n, max_len, bad_rate=0.0):
    """float32 rollout-like sequences of up to max_len positions (several kernel chunks),
    with a few bad values placed anywhere when bad_rate > 0."""
    lengths = rng.integers(0, max_len + 1, n)
    lp = [-rng.exponential(1.0, k).astype(np.float32) for k in lengths]
    lq = [np.minimum(a + rng.normal(0, 0.5, a.size).astype(np.float32), 0).astype(np.float32) for a in lp]
    for a in lp:
        if a.size and rng.random() < bad_rate:
            a[rng.integers(a.size)] = rng.choice([np.nan, np.inf, 0.5])
    col = lambda xs: pa.array([x.tolist() for x in xs], type=pa.list_(pa.float32()))  # noqa: E731
    return col(lp), col(lq), lengths


def test_long_sequences_over_several_chunks_and_threads():
    """Sequences longer than the kernel's chunk, bad positions beyond the first chunk, a mask:
    the exact reference, and the same bytes for any number of threads and pieces."""
    rng = np.random.default_rng(7)
    p, q, lengths = _long_sequences(rng, 300, 1400, bad_rate=0.3)
    mask = pa.array([(rng.random(k) < 0.9).tolist() for k in lengths], type=pa.list_(pa.bool_()))
    one = _run(p, q, {"mask": mask}, per_token=False, threads=1)
    for threads in (2, 3):
        other = _run(p, q, {"mask": mask}, per_token=False, threads=threads)
        assert np.array_equal(one.values, other.values, equal_nan=True) and np.array_equal(one.status, other.status)
    cut = [0, 7, 150, 300]
    chunked = _run(pa.chunked_array([p.slice(a, b - a) for a, b in zip(cut[:-1], cut[1:])]), q, {"mask": mask},
                   per_token=False, threads=2)
    assert np.array_equal(one.values, chunked.values, equal_nan=True)
    table = one.to_table(status=True)
    statuses = table["status"].to_pylist()
    assert {"ok", "nan", "non_finite", "negative"} <= set(statuses)  # the data exercises all of them
    ps, qs, ms = p.to_pylist(), q.to_pylist(), mask.to_pylist()
    checked = 0
    for i in rng.permutation(len(ps))[:40]:
        if lengths[i] <= 512:
            continue  # the short ones are the hypothesis test's
        status, bad_at, refs = naive.sampled_sequence_reference(ps[i], qs[i], ms[i])
        assert statuses[i] == status, i
        if bad_at is not None:
            assert one.describe(i, status)[0] == bad_at
        elif status == "ok":
            for m in ("k1", "k3"):
                _sum_check(table[m][i].as_py(), refs[m], (i, m), _rel(p) or 1e-13)
        checked += 1
    assert checked >= 10



@pytest.mark.parametrize("length", [100, 37])
def test_each_special_value_in_unmasked_float32_sequences(length):
    """Every position counts (the float32 pass tests its chunk on the bits): each special
    value, on each side, in the vectorised body and in the tail of a sequence, gets the
    reference's status, bad position and sums."""
    rng = np.random.default_rng(11)
    specials = [v for v in _SPECIAL if v is not None] + [-1e-30, -5.0, -2.0 ** -61]
    rows_p, rows_q, where = [], [], []
    for side in (0, 1):
        for v in specials:
            for j in (length // 2, length - 1):
                lp = -rng.exponential(1.0, length).astype(np.float32)
                lq = np.minimum(lp + rng.normal(0, 0.3, length).astype(np.float32), 0).astype(np.float32)
                (lp, lq)[side][j] = v
                if v in (-5.0, -2.0 ** -61):  # r = +-5 (beyond the float32 pass), |r| < 2^-60 (its square subnormal)
                    (lp, lq)[1 - side][j] = 0.0
                rows_p.append(lp)
                rows_q.append(lq)
                where.append((side, v, j))
    tiny = -float(np.float32(1.2345678 * 2.0 ** -70))  # its square: a float32 subnormal of 9 bits
    for j in (length // 2, length - 1):  # r = 0 but one tiny r: its k3 is the whole sum
        lp = -rng.exponential(1.0, length).astype(np.float32)
        lq = lp.copy()
        lp[j], lq[j] = 0.0, tiny
        rows_p.append(lp)
        rows_q.append(lq)
        where.append(("tiny r", tiny, j))
    p, q = np.array(rows_p), np.array(rows_q)
    table = _run(pa.array(list(p), type=pa.list_(pa.float32())), pa.array(list(q), type=pa.list_(pa.float32())),
                 {}, per_token=False).to_table(status=True)
    res = _run(pa.array(list(p), type=pa.list_(pa.float32())), pa.array(list(q), type=pa.list_(pa.float32())),
               {}, per_token=False)
    for i, what in enumerate(where):
        ps, qs = p[i].astype(np.float64).tolist(), q[i].astype(np.float64).tolist()
        status, bad_at, refs = naive.sampled_sequence_reference(ps, qs, [True] * length)
        assert table["status"][i].as_py() == status, what
        if bad_at is not None:
            assert res.describe(i, status)[0] == bad_at, what
        if status == "ok":
            for m in MEASURES:
                _sum_check(table[m][i].as_py(), refs[m], (what, m), 1e-6)


def test_the_summary_token_level_is_the_one_per_token_values_give():
    """The fused path writes no per-position values; the summary's token level computes them
    when it reads them, and gets the statistics (token mean, quantiles...) of m_tokens."""
    rng = np.random.default_rng(11)
    p, q, lengths = _long_sequences(rng, 60, 700, bad_rate=0.1)
    mask = pa.array([(rng.random(k) < 0.8).tolist() for k in lengths], type=pa.list_(pa.bool_()))
    lazy = _run(p, q, {"mask": mask}, per_token=False)
    eager = _run(p, q, {"mask": mask}, per_token=True)
    assert not lazy.per_token.filled and eager.per_token.filled
    s_lazy, s_eager = PartStats.from_result(lazy), PartStats.from_result(eager)
    assert s_lazy.to_json() == s_eager.to_json()
    assert np.array_equal(lazy.values, eager.values, equal_nan=True)  # reading them changed nothing
    # the token mean over the dataset: every counted position of every valid sequence
    ps, qs, ms = p.to_pylist(), q.to_pylist(), mask.to_pylist()
    status = lazy.to_table(status=True)["status"].to_pylist()
    terms = [naive.sampled_reference("k3", a, b) for i in range(len(ps)) if status[i] == "ok"
             for a, b, c in zip(ps[i], qs[i], ms[i]) if c]
    want = math.fsum(float(t) for t in terms) / len(terms)
    from fastkl.summary.stats import Summary
    got = Summary.from_stats(s_lazy).tokens.measures["k3"].mean
    assert got == pytest.approx(want, rel=_rel(p) or 1e-14)


@pytest.mark.parametrize("r", [0.0, 1e-300, -1e-300, 2.0 ** -30, 0.3465, 0.3466, 0.49999999999999994, 0.5,
                               -0.49999999999999994, -0.5, 0.5198603854199589, 1.0397, 1.0398, -1.0397, -1.0398,
                               1.25, -1.25, 41.49, 41.5, 41.51, 41.59, 42.0, -41.5, -41.51, -41.59, -42.0, 100.0,
                               -100.0, 700.0, 709.0, 709.09, 709.1, 709.78, 709.7827, 709.79, 710.0, 1000.0, 1e300,
                               -700.0, -707.9, -708.0, -708.1, -709.0, -745.0, -1080.0, -1e300, -math.inf])
def test_k3_at_the_seams_of_its_branch_free_form(r):
    """k3 where the vectorised form switches (|r| = 1/2, the rounding points of r / ln2,
    |r| = 41.5, the overflow of e^r, the clamps of the reduction) against the exact value."""
    p, q = (0.0, r) if r <= 0 else (-r, 0.0)
    assert q - p == r
    for shape in ("token", "sequence"):
        if shape == "token":
            got = fastkl.divergences(np.array([p]), np.array([q]), ["k3"], kind="sampled")["k3"][0].as_py()
        else:
            got = fastkl.divergences(pa.array([[p]]), pa.array([[q]]), ["k3"], kind="sampled")["k3"][0].as_py()
        want = naive.sampled_reference("k3", p, q)
        if want > 1.7976931348623157e308:
            assert got == math.inf, (shape, got)
        else:
            _check(got, want, (shape, r), "k3", r)
        assert got >= 0.0


_SEAMS32 = [0.0, 1e-30, -1e-30, 2.0 ** -64, 2.0 ** -61, 2.0 ** -60, -(2.0 ** -60), 2.0 ** -30, 1e-8, 0.3465, 0.3466, 0.49999997, 0.5,
            -0.49999997, -0.5, 0.5198604, 1.0397, 1.0398, -1.0397, -1.0398, 1.25, -1.25, 2.0794, 2.0795, 3.4657,
            3.4658, 3.9999998, 4.0, 4.0000005, -3.9999998, -4.0, -4.0000005, 10.0, -10.0, 88.0, 100.0, -100.0]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_k3_of_narrow_sequences_at_the_seams_of_its_float32_form(dtype):
    """32- and 16-bit sequences take k3 in float32 (|r| in [2^-60, 4] or 0) and float64 elsewhere
    (a chunk with any r outside): each position against the exact value within the float32
    bound, alone and mixed into one chunk with the others."""
    pairs = []
    for r in _SEAMS32:
        p, q = (np.float32(0.0), np.float32(r)) if r <= 0 else (np.float32(-r), np.float32(0.0))
        if dtype == "float16":
            p, q = np.float16(p), np.float16(q)
        pairs.append((float(p), float(q)))
    col = lambda xs: pa.array(xs, type=pa.list_(pa.float32() if dtype == "float32" else pa.float16()))  # noqa: E731
    alone = fastkl.divergences(col([[a] for a, _ in pairs]), col([[b] for _, b in pairs]), ["k3"], kind="sampled")
    mixed = fastkl.divergences(col([[a for a, _ in pairs]]), col([[b for _, b in pairs]]), ["k3"], kind="sampled",
                               per_token=True)
    for j, (a, b) in enumerate(pairs):
        want = naive.sampled_reference("k3", a, b)
        for got in (alone["k3"][j].as_py(), mixed["k3_tokens"][0][j].as_py()):
            _check(got, want, (a, b), "k3", b - a, 1e-6)
            assert got >= 0.0
    _sum_check(mixed["k3"][0].as_py(), [naive.sampled_reference("k3", a, b) for a, b in pairs], "sum", 1e-6)


def test_k3_in_float32_is_within_its_stated_error_over_its_range():
    """kernels.sampled.k3_32 against the float64 k3 (exact to ~1e-16) over float32 r in its range,
    dense around its seams: within 2.5e-7 (stated 2.0e-7; with the rounding of r to float32,
    4 2^-24 at most, that leaves the 1e-6 of the float32 bound a margin)."""
    from numba import njit

    from fastkl.kernels.sampled import k3_32, k3_vec

    @njit(error_model="numpy", fastmath={"nsz", "contract"})
    def both(r, got, want):
        for j in range(r.size):
            got[j] = k3_32(r[j])
            want[j] = k3_vec(np.float64(r[j]))

    rng = np.random.default_rng(2)
    seams = [s * x for x in [0.5, 4.0] + [(k + 0.5) * math.log(2.0) for k in range(6)] for s in (1, -1)]
    tiny_to_4 = np.exp2(rng.uniform(-60, 2, 200_000)) * rng.choice([-1, 1], 200_000)
    r = np.concatenate([rng.uniform(-4, 4, 400_000), tiny_to_4] + [x + rng.uniform(-1e-5, 1e-5, 20_000) for x in seams])
    r = r.astype(np.float32)
    r = np.concatenate([r[(np.abs(r) <= 4) & (np.abs(r) >= 2.0 ** -60)], np.float32([4.0, -4.0, 2.0 ** -60])])
    got, want = np.empty(r.size), np.empty(r.size)
    both(r, got, want)
    zero = np.empty(1)
    both(np.float32([0.0]), zero, np.empty(1))
    assert zero[0] == 0.0 and np.all(got >= 0.0)
    rel = np.abs(got - want) / want
    assert rel.max() <= 2.5e-7, (rel.max(), r[np.argmax(rel)])


def test_float32_chunks_with_r_outside_the_float32_pass_are_taken_in_float64():
    """float32 sequences are taken a chunk (kernels.sampled.CHUNK positions) at a time in float32
    unless a chunk holds an r that the float32 pass does not take (|r| > 4, 0 < |r| < 2^-60, q =
    -inf) or a bad position: such positions on both sides of chunk boundaries, each chunk's sums
    and every position against the exact value within the float32 bound."""
    from fastkl.kernels.sampled import CHUNK

    rng = np.random.default_rng(3)
    n = 3 * CHUNK + 40

    def seq(**special):
        p = -rng.exponential(1.0, n).astype(np.float32)
        q = np.minimum(p + rng.normal(0, 0.3, n).astype(np.float32), 0).astype(np.float32)
        for j, (a, b) in special.items():
            p[int(j[1:])], q[int(j[1:])] = a, b
        return p.tolist(), q.tolist()

    tiny = float(np.float32(1.2345678e-21))  # r = -tiny: k3 ~ 7.6e-43, subnormal in float32 (a few bits)
    # r rounded to float32 moves k3 = e^r - 1 - r by |r| 2^-24 of it: at r ~ 80, 3e-6 > the bound
    far = (np.float32(-80.53), np.float32(-0.3))
    seqs = [
        seq(),  # every chunk in float32
        seq(**{f"j{CHUNK - 1}": far, f"j{CHUNK}": (0.0, -tiny)}),  # the last and first of two chunks
        seq(**{f"j{2 * CHUNK + 5}": (np.float32(-1.0), -math.inf)}),  # q = -inf: +inf
        seq(**{f"j{CHUNK + 3}": (np.float32(-1.0), np.float32(-5.5))}),  # |r| just over 4
        seq(**{f"j{CHUNK - 1}": (0.0, -tiny)}),
        seq(**{f"j{2 * CHUNK}": (math.nan, -1.0), f"j{3}": far}),  # bad after an outside chunk
        seq(**{f"j{CHUNK}": (-math.inf, np.float32(-1.0))}),  # p = -inf: bad (its r is +inf)
    ]
    # sum_tol (1e-3) in float32 is above it: a log-prob of float32(1e-3) is bad, the float32 below it is not
    seqs.append(([float(np.float32(1e-3)), -1.0], [-1.0, -1.0]))
    seqs.append(([float(np.nextafter(np.float32(1e-3), np.float32(0))), -1.0], [-1.0, -1.0]))
    # a short sequence holding only tiny r: its k3 sum is all subnormal float32
    seqs.append(([0.0] * 5, [-tiny, -3 * tiny, 0.0, -tiny, -7 * tiny]))
    counted = [[True] * len(a) for a, _ in seqs]
    mask = [list(c) for c in counted]
    mask[3][CHUNK + 3] = False  # not counted: the chunk is taken in float32 after all
    counted[3] = mask[3]
    col = lambda xs: pa.array(xs, type=pa.list_(pa.float32()))  # noqa: E731
    p, q = col([a for a, _ in seqs]), col([b for _, b in seqs])
    kw = {"mask": pa.array(mask, type=pa.list_(pa.bool_()))}
    res = _run(p, q, kw, per_token=False)
    res_t = _run(p, q, kw, per_token=True)
    assert np.array_equal(res.values, res_t.values, equal_nan=True)
    table = res_t.to_table(status=True)
    ps, qs = p.to_pylist(), q.to_pylist()  # the stored values
    for i in range(len(seqs)):
        status, bad_at, refs = naive.sampled_sequence_reference(ps[i], qs[i], counted[i])
        assert table["status"][i].as_py() == status, i
        if status != "ok":
            assert res.describe(i, status)[0] == bad_at
            continue
        assert table["tokens"][i].as_py() == sum(counted[i])
        for m in MEASURES:
            _sum_check(table[m][i].as_py(), refs[m], (i, m), 1e-6)
            for j, (g, r) in enumerate(zip(table[f"{m}_tokens"][i].as_py(), refs[m])):
                _check(g, r, (i, j, m), m, (qs[i][j] - ps[i][j]) if r is not None else 0.0, 1e-6)
    assert table["k3"][2].as_py() == math.inf and table["k1"][2].as_py() == math.inf
    # without k3 the float32 pass skips it: the other sums are the same, to the bit
    opts = Options.from_kwargs(kind="sampled", on_invalid="null")
    for few in (["k1", "k2"], ["abs"]):
        alone = compute(p, q, few, opts, **kw)
        for m in few:
            i = list(MEASURES).index(m)
            assert np.array_equal(alone.values[few.index(m)], res.values[i], equal_nan=True), m


def test_half_precision_sampled_columns_read_as_their_float32_values():
    """float16 (Arrow and NumPy) and bfloat16 (NumPy ml_dtypes) log-probs give what their
    float32 values give, for token and sequence rows (Arrow float16 once raised NameError)."""
    import ml_dtypes

    rng = np.random.default_rng(5)
    lp = -rng.exponential(1.0, (4, 6))
    lq = np.minimum(lp + rng.normal(0, 0.3, (4, 6)), 0)

    def run(p, q):
        return fastkl.divergences(p, q, MEASURES, kind="sampled")

    for half in (np.float16, ml_dtypes.bfloat16):
        hp, hq = lp.astype(half), lq.astype(half)
        wp, wq = hp.astype(np.float32), hq.astype(np.float32)
        assert run(hp, hq).equals(run(wp, wq))  # sequence rows (2-D)
        assert run(hp.reshape(-1), hq.reshape(-1)).equals(run(wp.reshape(-1), wq.reshape(-1)))  # token rows
    hp, hq = lp.astype(np.float16), lq.astype(np.float16)
    wp, wq = hp.astype(np.float32), hq.astype(np.float32)
    lists = lambda x: pa.array(x.tolist(), type=pa.list_(pa.float16()))  # noqa: E731
    assert run(lists(hp), lists(hq)).equals(run(wp, wq))
    assert run(pa.array(hp.reshape(-1)), pa.array(hq.reshape(-1))).equals(run(wp.reshape(-1), wq.reshape(-1)))
