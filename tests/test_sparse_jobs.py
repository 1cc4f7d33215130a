"""Top-k token data through `fastkl run` (SPEC §10): ids columns, masks, bounds and
listed mass in the output, bad ids named with file, row and position."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import fastkl
from fastkl._demo import make_distill_shard
from fastkl.cli import main

FLAGS = ["--p", "target_logprobs", "--p-ids", "target_token_ids", "--q", "student_logprobs",
         "--q-ids", "student_token_ids", "--kind", "logprobs", "--vocab", "500"]


def _shards(tmp_path, rng, n=24, files=2):
    src = tmp_path / "src"
    src.mkdir()
    tables = []
    for i in range(files):
        t = make_distill_shard(rng, i * n, n, vocab=500, positions=6, k=5)
        pq.write_table(t, src / f"part-{i}.parquet", row_group_size=7)
        tables.append(t)
    return src, pa.concat_tables(tables)


def _invoke(*args):
    return CliRunner().invoke(main, ["run", *map(str, args)])


def test_job_equals_the_in_memory_api(tmp_path, rng):
    src, table = _shards(tmp_path, rng)
    r = _invoke(src, tmp_path / "out", *FLAGS, "--mask", "target_mask", "-m", "kl", "-m", "js",
                "--per-token", "--keep", "id", "--status")
    assert r.exit_code == 0, r.output
    got = pq.read_table(tmp_path / "out").sort_by("id")
    want = fastkl.divergences(table["target_logprobs"], table["student_logprobs"], ["kl", "js"],
                              p_ids=table["target_token_ids"], q_ids=table["student_token_ids"],
                              mask=table["target_mask"], kind="logprobs", vocab=500, per_token=True,
                              status=True)
    assert got.column_names == ["id"] + want.column_names
    for name in want.column_names:
        assert got[name].to_pylist() == want[name].to_pylist(), name
    assert "kl_lower" in r.output and "counted positions" in r.output


def test_tail_and_bounds_flags(tmp_path, rng):
    src, table = _shards(tmp_path, rng, files=1)
    r = _invoke(src, tmp_path / "out", *FLAGS, "--tail", "uniform", "--no-bounds")
    assert r.exit_code == 0, r.output
    got = pq.read_table(tmp_path / "out")
    assert got.column_names == ["kl", "kl_mean", "tokens", "listed_mass_p", "listed_mass_q"]
    want = fastkl.kl(table["target_logprobs"], table["student_logprobs"], p_ids=table["target_token_ids"],
                     q_ids=table["student_token_ids"], kind="logprobs", vocab=500, tail="uniform")
    np.testing.assert_array_equal(got["kl"].to_numpy(), want)


def test_a_bad_id_names_file_row_and_position(tmp_path, rng):
    src, table = _shards(tmp_path, rng, files=1)
    ids = table["target_token_ids"].to_pylist()
    ids[9][4][2] = ids[9][4][0]  # a repeated id at row 9, position 4
    bad = table.set_column(table.schema.get_field_index("target_token_ids"), "target_token_ids",
                           pa.array(ids, type=table.schema.field("target_token_ids").type))
    pq.write_table(bad, src / "part-0.parquet", row_group_size=7)
    r = _invoke(src, tmp_path / "out", *FLAGS)
    assert r.exit_code != 0
    assert "invalid row (duplicate_id)" in r.output and "part-0.parquet: row 9 (row group 1), position 4: target_token_ids" not in r.output and "part-0.parquet: row 9 (row group 1), position 4: p_ids[2]" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_ids_of_another_type_or_shape_are_refused_before_any_work(tmp_path, rng):
    src, table = _shards(tmp_path, rng, files=1)
    t = table.append_column("names", pa.array([["a"]] * table.num_rows))
    t = t.append_column("flat_ids", pa.array([[1, 2]] * table.num_rows))
    pq.write_table(t, src / "part-0.parquet")
    r = _invoke(src, tmp_path / "out", *FLAGS[:2], "--p-ids", "names", *FLAGS[4:])
    assert r.exit_code == 2 and "list of integer token ids" in r.output, r.output
    r = _invoke(src, tmp_path / "out", *FLAGS[:2], "--p-ids", "flat_ids", *FLAGS[4:])
    assert r.exit_code == 2 and "must all be sequence rows" in r.output, r.output


@pytest.mark.parametrize("extra, match", [
    (["--tail", "uniform"], "give vocab=V"),
    (["--kind", "logits"], "top-k logits cannot be decoded"),
])
def test_option_errors(tmp_path, rng, extra, match):
    src, _ = _shards(tmp_path, rng, files=1)
    flags = [f for f in FLAGS if f not in ("--vocab", "500")] if "uniform" in extra else FLAGS
    r = _invoke(src, tmp_path / "out", *flags, *extra)
    assert r.exit_code == 2 and match in r.output, r.output


def test_worker_processes_give_the_same_output(tmp_path, rng):
    """A real LocalCluster of worker processes (each imports fastkl and compiles for itself)."""
    src, _ = _shards(tmp_path, rng)
    args = [*FLAGS, "--mask", "target_mask", "--keep", "id", "-q"]
    assert _invoke(src, tmp_path / "threads", *args).exit_code == 0
    r = _invoke(src, tmp_path / "procs", *args, "--scheduler", "processes", "--workers", "2")
    assert r.exit_code == 0, r.output
    a, b = (pq.read_table(tmp_path / d).sort_by("id") for d in ("threads", "procs"))
    assert a.equals(b)
