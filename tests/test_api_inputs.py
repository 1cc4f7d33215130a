"""In-memory API: inputs that used to be misread, and messages that spoke the wrong language.

Each test here failed before the fix it guards (issue 9, "API" and "Errors from the CLI").
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fastkl
from fastkl.errors import OptionError

P = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
Q = np.array([[0.6, 0.3, 0.1], [0.4, 0.4, 0.2], [0.3, 0.3, 0.4]])


@pytest.mark.parametrize(
    "values",
    [
        np.array([[1, 0], [0, 1]], dtype=np.int64),
        np.array([[16256, 16256]], dtype=np.uint16),  # bfloat16 bits of 1.0 viewed as integers
        np.array([[True, False]]),
        pa.array([[16256, 16128]], type=pa.list_(pa.uint16())),
        pa.array([[1, 0]], type=pa.list_(pa.int32())),
    ],
    ids=["int64", "uint16", "bool", "arrow-uint16", "arrow-int32"],
)
def test_integer_values_are_refused_not_taken_as_probabilities(values):
    with pytest.raises(OptionError, match="integer values are not probabilities"):
        fastkl.kl(values, values)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_threads_must_be_a_whole_number_from_one(threads):
    with pytest.raises(OptionError, match="threads must be a whole number >= 1"):
        fastkl.kl(P, Q, threads=threads)


def test_threads_one_and_none_work():
    assert np.array_equal(fastkl.kl(P, Q, threads=1), fastkl.kl(P, Q, threads=None))


@pytest.mark.parametrize("scalar", [np.array(0.5), np.float64(0.5), 0.5, 1])
def test_a_single_number_is_a_clear_error(scalar):
    with pytest.raises(OptionError, match="single number"):
        fastkl.kl(scalar, scalar)


@pytest.mark.parametrize("call", [
    lambda: fastkl.kl(P, Q, normalize="no"),
    lambda: fastkl.kl(P, Q, normalize=1),
    lambda: fastkl.divergences(P, Q, status="no"),
])
def test_yes_no_options_take_only_booleans(call):
    with pytest.raises(OptionError, match="must be True or False"):
        call()


def test_numpy_bool_is_a_boolean():
    assert np.array_equal(fastkl.kl(P, Q, normalize=np.True_), fastkl.kl(P, Q, normalize=True))


@pytest.mark.parametrize("kw, name", [({"temperature": 0.0}, "temperature"), ({"q_temperature": -1}, "q_temperature"),
                                      ({"kind": "logit"}, "kind"), ({"base": "two"}, "base")])
def test_option_errors_name_the_argument_the_caller_gave(kw, name):
    with pytest.raises(OptionError, match=rf"^(unknown )?{name}\b"):
        fastkl.kl(P, Q, **kw)


def test_masked_elements_are_null_elements_and_masked_rows_are_null():
    mask = np.zeros_like(P, dtype=bool)
    mask[1, 2] = True  # one element of row 1
    mask[2, :] = True  # all of row 2
    mp = np.ma.masked_array(P, mask=mask)
    t = fastkl.divergences(mp, Q, measures=("kl",), on_invalid="null", status=True)
    assert t["status"].to_pylist() == ["ok", "null_element", "null"]
    got = t["kl"].to_pylist()
    assert got[0] == pytest.approx(fastkl.kl(P[:1], Q[:1])[0], rel=1e-15)
    assert got[1] is None and got[2] is None
    with pytest.raises(fastkl.InvalidRowError, match=r"null_element.*row 1.*p\[2\] is null"):
        fastkl.kl(mp, Q)


def test_masked_array_without_masked_values_is_used_as_is():
    mp = np.ma.masked_array(P, mask=np.zeros_like(P, dtype=bool))
    assert np.array_equal(fastkl.kl(mp, Q), fastkl.kl(P, Q))


@pytest.mark.parametrize("table", [
    pa.table({"a": [0.5, 0.5], "b": [0.5, 0.5]}),
    pa.record_batch({"p": pa.array([[0.5, 0.5]] * 2), "x": [1, 2]}),
])
def test_a_table_asks_for_one_of_its_columns(table):
    with pytest.raises(OptionError, match=r"got a table \(columns .*\); pass the one column"):
        fastkl.kl(table, table)


@pytest.mark.parametrize("wrap", [pa.table, pa.record_batch, lambda d: pa.table(d).to_reader()])
def test_a_table_of_one_column_is_that_column(wrap):
    """Issue 14: a one-column table (a DuckDB relation, a one-column DataFrame) is unambiguous."""
    p, q = pa.array(P.tolist()), pa.array(Q.tolist())
    assert np.array_equal(fastkl.kl(wrap({"p": p}), wrap({"q": q})), fastkl.kl(P, Q))


def _top_k_logprobs():
    full = np.array([[0.4, 0.2, 0.1, 0.1, 0.1, 0.1]])
    return np.log(full[:, :3])  # the top 3 of 6: mass 0.7


def test_a_top_k_looking_row_is_named_so_and_normalize_is_not_suggested():
    lp = _top_k_logprobs()
    with pytest.raises(fastkl.InvalidRowError) as e:
        fastkl.kl(lp, lp, kind="logprobs")
    msg = str(e.value)
    assert "looks like a top-k row" in msg and "token id" in msg
    assert "use normalize=True" not in msg


def test_a_row_just_off_one_still_suggests_normalize():
    p = np.array([[0.5, 0.49]])
    with pytest.raises(fastkl.InvalidRowError, match=r"use normalize=True to renormalise"):
        fastkl.kl(p, p)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastkl.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_errors_speak_cli(tmp_path):
    src = tmp_path / "src.parquet"
    rows = pa.array([[0.5, 0.3], [0.5, 0.5]], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"p": rows, "q": rows}), src)
    r = _cli("run", str(src), str(tmp_path / "out"), "--quiet")
    assert r.returncode == 1
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "--sum-tol 0.001" in err and "--on-invalid null" in err and "--normalize" in err, err
    assert "normalize=True" not in err and "sum_tol=" not in err and "on_invalid=" not in err, err

    r = _cli("run", str(src), str(tmp_path / "out2"), "--quiet", "--temperature", "0", "--kind", "logits")
    assert r.returncode == 2
    assert "--temperature must be a finite number > 0" in r.stderr, r.stderr


def test_cli_words_leave_paths_and_prose_alone():
    from fastkl.cli import cli_words

    assert cli_words("data/base/normalize.parquet: row 3") == "data/base/normalize.parquet: row 3"
    assert cli_words("refusing to overwrite it") == "refusing to overwrite it"
    assert cli_words("column 'kind' (p) in my_sum_tol.parquet") == "column 'kind' (p) in my_sum_tol.parquet"
    assert cli_words("p_temperature must be > 0") == "--p-temperature must be > 0"
