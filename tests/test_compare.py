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
