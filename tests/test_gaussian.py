"""KL between diagonal Gaussians (SPEC §11): fastkl.gaussian_kl and its job flags."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkl
import naive

value = st.floats(-30.0, 30.0)
logvar = st.one_of(st.floats(-20.0, 20.0), st.floats(-1e-9, 1e-9))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.tuples(value, logvar, value, logvar), min_size=1, max_size=8), min_size=1,
                max_size=5), st.booleans())
def test_matches_the_exact_reference(rows, arrow):
    cols = [[[d[c] for d in r] for r in rows] for c in range(4)]
    args = [pa.array(c) for c in cols] if arrow else [c for c in cols]
    got = fastkl.gaussian_kl(*args)
    for i, r in enumerate(rows):
        want = naive.gaussian_kl_reference(*zip(*r))
        # each term is computed to a few ulps of its own size (all terms are >= 0: no cancellation)
        assert abs(got[i] - float(want)) <= 1e-14 * float(want) + 1e-300, (i, got[i], float(want))
        assert got[i] >= 0.0


def test_the_reference_agrees_with_the_textbook_form():
    rng = np.random.default_rng(5)
    for _ in range(20):
        mp, a, mq, b = rng.normal(scale=2.0, size=(4, 6))
        assert abs(naive.gaussian_kl_reference(mp, a, mq, b) - naive.gaussian_kl_textbook(mp, a, mq, b)) < 1e-40


def test_identical_gaussians_are_zero_and_base_rescales():
    m = np.random.default_rng(0).normal(size=(3, 4))
    lv = np.random.default_rng(1).normal(size=(3, 4))
    assert fastkl.gaussian_kl(m, lv, m, lv).tolist() == [0.0, 0.0, 0.0]
    a = fastkl.gaussian_kl(m, lv, 0 * m, 0 * lv)
    np.testing.assert_allclose(fastkl.gaussian_kl(m, lv, 0 * m, 0 * lv, base=2), a / math.log(2), rtol=1e-15)


def test_bad_rows():
    m = [[0.0, 1.0], [0.0]]
    with pytest.raises(fastkl.InvalidRowError, match="row 1: the four columns have different numbers"):
        fastkl.gaussian_kl(m, [[0.0, 0.0], [0.0, 1.0]], m, m)
    got = fastkl.gaussian_kl([[0.0], [math.nan], None], [[0.0]] * 3, [[1.0]] * 3, [[0.0]] * 3,
                             on_invalid="null")
    assert got[0] == 0.5 and math.isnan(got[1]) and math.isnan(got[2])


def test_a_job_over_vae_posteriors(tmp_path):
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from fastkl.cli import main

    rng = np.random.default_rng(0)
    n, d = 40, 16
    cols = {name: rng.normal(size=(n, d)) for name in ("mu", "logvar", "mu0", "logvar0")}
    table = pa.table({"id": np.arange(n), **{k: pa.array(v.tolist()) for k, v in cols.items()}})
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(table, src / "part.parquet", row_group_size=9)
    r = CliRunner().invoke(main, ["run", str(src), str(tmp_path / "out"), "--p-mean", "mu", "--p-logvar",
                                  "logvar", "--q-mean", "mu0", "--q-logvar", "logvar0", "--keep", "id"])
    assert r.exit_code == 0, r.output
    got = pq.read_table(tmp_path / "out").sort_by("id")
    assert got.column_names == ["id", "gaussian_kl"]
    np.testing.assert_array_equal(got["gaussian_kl"].to_numpy(),
                                  fastkl.gaussian_kl(cols["mu"], cols["logvar"], cols["mu0"], cols["logvar0"]))
    assert "gaussian_kl" in r.output
    r = CliRunner().invoke(main, ["run", str(src), str(tmp_path / "out2"), "--p-mean", "mu"])
    assert r.exit_code == 2 and "need all four columns" in r.output, r.output


def test_rows_without_dimensions_are_empty_rows():
    got = fastkl.gaussian_kl([[]], [[]], [[]], [[]], on_invalid="null")
    assert np.isnan(got).all()
    with pytest.raises(fastkl.InvalidRowError, match=r"invalid row \(empty\)"):
        fastkl.gaussian_kl([[]], [[]], [[]], [[]])
