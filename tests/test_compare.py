"""Model comparison (SPEC §11): top1_agree on dense and top-k rows, token and sequence rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkl
import naive


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.sampled_from(["probs", "logprobs", "logits"]),
       st.sampled_from([np.float64, np.float32, np.float16]), st.integers(0, 2**32 - 1), st.booleans())
def test_dense_rows_match_the_reference(n, k, kind, dtype, seed, ties):
    rng = np.random.default_rng(seed)
    P = naive.make_rows(rng, kind, n, k, dtype=np.float64)
    Q = naive.make_rows(rng, kind, n, k, dtype=np.float64)
    if ties:  # equal top values: the first one counts
        Q[:, -1] = Q.max(axis=1)
    P, Q = P.astype(dtype), Q.astype(dtype)
    table = fastkl.divergences(P, Q, ["kl", "top1_agree"], kind=kind, sum_tol=2e-2, on_invalid="null",
                               status=True)
    for i in range(n):
        got = table["top1_agree"][i].as_py()
        if table["status"][i].as_py() != "ok":
            assert got is None
            continue
        assert got == naive.top1_agree_reference(P[i].astype(np.float64), Q[i].astype(np.float64)), i


def test_top_k_rows_compare_token_ids():
    p, q = [[0.5, 0.3], [0.5, 0.3]], [[0.6, 0.2], [0.2, 0.6]]
    table = fastkl.divergences(p, q, ["top1_agree"], p_ids=[[7, 3], [7, 3]], q_ids=[[3, 7], [3, 7]])
    assert table["top1_agree"].to_pylist() == [0.0, 1.0]
    assert table["top1_agree_lower"].to_pylist() == table["top1_agree_upper"].to_pylist() == [0.0, 1.0]
    # a dense side against a top-k one: the dense side's token is its position
    dense = fastkl.divergences([[0.1, 0.2, 0.7]], [[0.6, 0.3]], ["top1_agree"], q_ids=[[2, 0]])
    assert dense["top1_agree"].to_pylist() == [1.0]


def test_sequences_count_and_average_agreement():
    P = np.array([[[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]])
    Q = np.array([[[0.9, 0.1], [0.8, 0.2], [0.2, 0.8]]])
    table = fastkl.divergences(P, Q, ["top1_agree"], mask=[[1, 1, 0]], per_token=True)
    assert table["top1_agree"].to_pylist() == [1.0]
    assert table["top1_agree_mean"].to_pylist() == [0.5]
    assert table["top1_agree_tokens"].to_pylist() == [[1.0, 0.0, None]]


def test_bad_rows_have_no_agreement():
    table = fastkl.divergences([[0.5, np.nan], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]], ["top1_agree"],
                               on_invalid="null", status=True)
    assert table["status"].to_pylist() == ["nan", "ok"]
    assert table["top1_agree"].to_pylist() == [None, 1.0]


def test_not_with_sampled_log_probs():
    with pytest.raises(fastkl.OptionError, match="cannot be asked together"):
        fastkl.divergences(np.array([-0.1]), np.array([-0.2]), ["k1", "top1_agree"], kind="sampled")


def test_a_job_reports_the_agreement_rate(tmp_path):
    import json

    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from fastkl.cli import main

    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(5), size=(20, 4))
    Q = rng.dirichlet(np.ones(5), size=(20, 4))
    t = pa.table({"p": pa.array(P.tolist()), "q": pa.array(Q.tolist())})
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(t, src / "a.parquet")
    r = CliRunner().invoke(main, ["run", str(src), str(tmp_path / "out"), "-m", "kl", "-m", "top1_agree",
                                  "--summary-json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s.json").read_text())
    agree = (P.argmax(axis=2) == Q.argmax(axis=2))
    assert s["tokens"]["measures"]["top1_agree"]["mean"] == pytest.approx(agree.mean())


def test_nll_and_delta_p_at_the_target_token():
    rng = np.random.default_rng(1)
    P = rng.dirichlet(np.ones(6), size=8)
    Q = rng.dirichlet(np.ones(6), size=8)
    target = rng.integers(0, 6, 8)
    for kind, enc in (("probs", lambda x: x), ("logprobs", np.log), ("logits", lambda x: 2.0 * np.log(x) + 5)):
        opts = dict(temperature=2.0) if kind == "logits" else {}
        t = fastkl.divergences(enc(P), enc(Q), ["nll_p", "nll_q", "delta_p"], kind=kind, target=target, **opts)
        rows = np.arange(8)
        np.testing.assert_allclose(t["nll_p"].to_numpy(), -np.log(P[rows, target]), rtol=1e-12)
        np.testing.assert_allclose(t["nll_q"].to_numpy(), -np.log(Q[rows, target]), rtol=1e-12)
        np.testing.assert_allclose(t["delta_p"].to_numpy(), Q[rows, target] - P[rows, target], rtol=1e-9,
                                   atol=1e-15)


def test_target_errors():
    p = np.array([[0.5, 0.5]])
    with pytest.raises(fastkl.InvalidRowError, match="target = 2 is not a position of the row"):
        fastkl.divergences(p, p, ["kl", "nll_p"], target=np.array([2]))
    t = fastkl.divergences(p, p, ["kl", "nll_p"], target=np.array([2]), on_invalid="null", status=True)
    assert t.to_pylist() == [{"kl": None, "nll_p": None, "status": "id_out_of_range"}]
    with pytest.raises(fastkl.OptionError, match="need the token that came next"):
        fastkl.divergences(p, p, ["nll_p"])
    with pytest.raises(fastkl.OptionError, match="target is read by"):
        fastkl.divergences(p, p, ["kl"], target=np.array([0]))
    with pytest.raises(fastkl.InvalidRowError, match=r"target = 7 is outside \[0, 5\)"):
        fastkl.divergences(p, p, ["nll_p"], target=np.array([7]), p_ids=[[0, 1]], q_ids=[[0, 1]], vocab=5)
    with pytest.raises(fastkl.InvalidRowError, match="target = -1 is outside"):
        fastkl.divergences(p, p, ["nll_p"], target=np.array([-1]), p_ids=[[0, 1]], q_ids=[[0, 1]])
    with pytest.raises(fastkl.InvalidRowError, match="p has 2 positions, target has 1"):
        fastkl.divergences(p[None].repeat(2, 1), p[None].repeat(2, 1), ["nll_p"], target=[[0]])


def test_status_code_of_the_kernel_agrees():
    from fastkl._registry import STATUS_CODE
    from fastkl.kernels import compare

    assert compare.ID_OUT_OF_RANGE == STATUS_CODE["id_out_of_range"]
    assert compare.TARGET_UNLISTED == STATUS_CODE["target_unlisted"]


def _cut(rng, full, k):
    """The top-k ids (shuffled, as stored) and values of each row of `full`."""
    ids = np.argsort(-full, axis=1, kind="stable")[:, :k]
    ids = np.array([rng.permutation(r) for r in ids])
    return ids, np.take_along_axis(full, ids, axis=1)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 5, 16]), st.sampled_from([16, 40]),
       st.sampled_from(["probs", "logprobs"]), st.booleans())
def test_top_k_rows_nll_exact_where_listed_bounded_where_not(seed, k, V, kind, dense_q):
    """Against the full distributions the rows were cut from: the listed target's nll and
    delta_p are exact; an unlisted one is null (status target_unlisted) and the full value
    lies within the bounds."""
    rng = np.random.default_rng(seed)
    P = naive.make_probs(rng, 30, V, spread=2.0)
    Q = naive.make_probs(rng, 30, V, spread=2.0)
    target = rng.integers(0, V, 30)
    p_ids, p_top = _cut(rng, P, k)
    q_ids, q_top = (None, Q) if dense_q else _cut(rng, Q, k)
    enc = (lambda x: x) if kind == "probs" else np.log
    t = fastkl.divergences(enc(p_top), enc(q_top), ["kl", "nll_p", "nll_q", "delta_p"], kind=kind, p_ids=p_ids,
                           q_ids=q_ids, vocab=V, target=target, status=True)
    rows = np.arange(30)
    p_t, q_t = P[rows, target], Q[rows, target]
    p_listed = (p_ids == target[:, None]).any(axis=1)
    q_listed = np.ones(30, bool) if dense_q else (q_ids == target[:, None]).any(axis=1)
    assert t["status"].to_pylist() == ["ok" if ok else "target_unlisted" for ok in p_listed & q_listed]
    col = {c: np.array([np.nan if v is None else v for v in t[c].to_pylist()]) for c in t.column_names}
    for m, exact, listed in (("nll_p", -np.log(p_t), p_listed), ("nll_q", -np.log(q_t), q_listed),
                             ("delta_p", q_t - p_t, p_listed & q_listed)):
        np.testing.assert_allclose(col[m][listed], exact[listed], rtol=1e-12, atol=1e-15)
        assert np.isnan(col[m][~listed]).all(), m
        slack = 1e-12 * (1 + np.abs(exact))
        assert np.all(col[f"{m}_lower"] <= exact + slack) and np.all(exact <= col[f"{m}_upper"] + slack), m
    assert np.isfinite(col["kl"]).all() or np.isinf(col["kl"]).any()  # the other measures are computed
    assert not np.isnan(col["kl"]).any()


def test_a_quantised_vs_base_job_reports_perplexities(tmp_path):
    import json

    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from fastkl.cli import main

    rng = np.random.default_rng(2)
    n, t, V = 10, 5, 7
    base = rng.normal(size=(n, t, V))
    quant = base + rng.normal(0, 0.1, size=(n, t, V))
    nxt = rng.integers(0, V, size=(n, t))
    table = pa.table({"base": pa.array(base.tolist()), "quant": pa.array(quant.tolist()),
                      "next": pa.array(nxt.tolist())})
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(table, src / "a.parquet")
    r = CliRunner().invoke(main, ["run", str(src), str(tmp_path / "out"), "--p", "base", "--q", "quant",
                                  "--kind", "logits", "--target", "next", "-m", "kl", "-m", "top1_agree",
                                  "-m", "nll_p", "-m", "nll_q", "-m", "delta_p",
                                  "--summary-json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    lp = base - np.log(np.exp(base).sum(axis=2, keepdims=True))
    nll = -np.take_along_axis(lp, nxt[..., None], 2)[..., 0]
    assert "perplexity" in r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["tokens"]["measures"]["nll_p"]["mean"] == pytest.approx(nll.mean(), rel=1e-12)
    assert f"p {np.exp(nll.mean()):.4g}" in r.output
