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


def _check(got, want, what, m=None, r=0.0):
    """The exact reference within a few ulps of its size plus the rounding of r = q - p."""
    if want is None:
        assert got is None or math.isnan(got), what
        return
    if math.isinf(want):
        assert got == float(want), (what, got)
        return
    w = float(want)
    allowed = 4e-16 * abs(w) + 1.2e-16 * abs(r) * (_slope(m, r) if m else 1.0) + 1e-300
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
    # the token mean over the dataset (GRPO's number) and the sequence mean of sums (PPO's)
    assert s["tokens"]["measures"]["k3"]["mean"] == pytest.approx(np.nanmean(k3), rel=1e-9)
    assert s["measures"]["k3"]["mean"] == pytest.approx(np.nanmean(np.nansum(k3, axis=1)), rel=1e-9)
