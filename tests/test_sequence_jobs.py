"""Sequence rows through `fastkl run`: masks and lengths, per-token lists, the
two-level summary, bad positions named with file, row and position."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import fastkl
import naive
from fastkl.cli import main

SEQ = pa.list_(pa.list_(pa.float32()))


def _table(rng, n=30, t=5, k=6, bad_at=None):
    P = naive.make_probs(rng, n * t, k).astype(np.float32).reshape(n, t, k)
    Q = naive.make_probs(rng, n * t, k).astype(np.float32).reshape(n, t, k)
    if bad_at is not None:
        P[bad_at] = np.nan
    lengths = rng.integers(0, t + 1, size=n)
    mask = rng.random((n, t)) < 0.7
    mask[2] = False  # a sequence that counts nothing
    return pa.table({
        "id": np.arange(n),
        "p": pa.array(P.tolist(), type=SEQ),
        "q": pa.array(Q.tolist(), type=SEQ),
        "mask": pa.array(mask.tolist(), type=pa.list_(pa.bool_())),
        "len": pa.array(lengths, type=pa.int32()),
    })


def _write(tmp_path, table, files=2):
    src = tmp_path / "src"
    src.mkdir()
    step = -(-table.num_rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * step, step), src / f"part-{i}.parquet", row_group_size=4)
    return src


def _read(dest):
    return pq.read_table(dest).sort_by("id")


@pytest.mark.parametrize("by", ["mask", "lengths"])
def test_job_equals_the_in_memory_api(tmp_path, rng, by):
    table = _table(rng)
    src = _write(tmp_path, table)
    cols = {"mask": table["mask"]} if by == "mask" else {"lengths": table["len"]}
    args = ["--mask", "mask"] if by == "mask" else ["--lengths", "len"]
    r = CliRunner().invoke(main, ["run", str(src), str(tmp_path / "out"), "-m", "kl", "-m", "entropy",
                                  "--per-token", "--keep", "id", "--status", "--summary-json",
                                  str(tmp_path / "s.json"), *args])
    assert r.exit_code == 0, r.output
    got = _read(tmp_path / "out")
    want = fastkl.divergences(table["p"], table["q"], ["kl", "entropy"], per_token=True, status=True, **cols)
    assert got.column_names == ["id"] + want.column_names
    for name in want.column_names:
        assert got[name].to_pylist() == want[name].to_pylist(), name
    summary = json.loads((tmp_path / "s.json").read_text())
    ok = np.array(want["status"].to_pylist()) == "ok"
    assert summary["rows"] == table.num_rows
    assert set(summary["measures"]) == {"kl", "kl_mean", "entropy", "entropy_mean"}
    assert summary["tokens"]["rows"] == int(np.array(want["tokens"].to_pylist())[ok].sum())
    kl_tokens = [v for row in want["kl_tokens"].to_pylist() if row for v in row if v is not None]
    assert summary["tokens"]["measures"]["kl"]["mean"] == pytest.approx(np.mean(kl_tokens), rel=1e-12)
    assert summary["measures"]["kl_mean"]["mean"] == pytest.approx(
        np.mean(np.array(want["kl_mean"].to_pylist(), dtype=float)[ok]), rel=1e-12)
    assert "with no counted position" in r.output and "counted positions of the valid sequences" in r.output


def test_a_bad_position_names_file_row_and_position(tmp_path, rng):
    table = _table(rng, bad_at=(17, 3))
    src = _write(tmp_path, table)
    r = CliRunner().invoke(main, ["run", str(src), str(tmp_path / "out")])
    assert r.exit_code != 0
    assert "invalid row (nan) at" in r.output and "part-1.parquet: row 2 (row group 0), position 3: p[0] is NaN" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_mask_column_of_another_type_is_refused(tmp_path, rng):
    table = _table(rng).set_column(3, "mask", pa.array([["a"]] * 30))
    src = _write(tmp_path, table, files=1)
    r = CliRunner().invoke(main, ["run", str(src), str(tmp_path / "out"), "--mask", "mask"])
    assert r.exit_code != 0
    assert "column 'mask' (mask)" in r.output and "list<bool> or list<int8>" in r.output, r.output


def test_mask_on_token_rows_is_refused(tmp_path, rng):
    P = naive.make_probs(rng, 4, 3)
    t = pa.table({"p": pa.array(P.tolist()), "q": pa.array(P.tolist()), "m": pa.array([[True]] * 4)})
    src = _write(tmp_path, t, files=1)
    r = CliRunner().invoke(main, ["run", str(src), str(tmp_path / "out"), "--mask", "m"])
    assert r.exit_code != 0 and "are for sequence rows" in r.output, r.output
    r = CliRunner().invoke(main, ["run", str(src), str(tmp_path / "out"), "--per-token"])
    assert r.exit_code != 0 and "per_token is for sequence rows" in r.output, r.output
