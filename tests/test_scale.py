"""Jobs over many small files: grouped tasks (one part for several files), the same output and
summary as one task per file, resume and change detection per file inside a group (issue 15)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fastkl
from fastkl.io.output import MANIFEST, staging_path
from test_jobs import interrupt_at_task


def _tiny_files(root, n, rows=5, k=4, seed=0):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        p = rng.random((rows, k)); p /= p.sum(1, keepdims=True)
        q = rng.random((rows, k)); q /= q.sum(1, keepdims=True)
        t = pa.table({"id": np.arange(i * rows, (i + 1) * rows),
                      "p": pa.array(list(p), pa.list_(pa.float64())), "q": pa.array(list(q), pa.list_(pa.float64()))})
        pq.write_table(t, os.path.join(root, f"f{i:04d}.parquet"))
    return str(root)


def _summary(s):
    d = s.to_dict()
    d.pop("timings", None)
    d.pop("dest", None)
    return d


def _table(dest):
    files = sorted(f for f in os.listdir(dest) if f.endswith(".parquet"))
    return pa.concat_tables(pq.read_table(os.path.join(dest, f)) for f in files)


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_grouped_tasks_give_the_same_output_and_summary(tmp_path, scheduler):
    src = _tiny_files(tmp_path / "src", 23)
    one = fastkl.run(src, tmp_path / "one", measures=("kl", "js"), keep="id", group_files=1, quiet=True)
    grouped = fastkl.run(src, tmp_path / "grp", measures=("kl", "js"), keep="id", group_files=8,
                         scheduler=scheduler, quiet=True)
    assert _table(tmp_path / "grp").equals(_table(tmp_path / "one"))
    assert _summary(grouped) == _summary(one)
    m = json.loads((tmp_path / "grp" / MANIFEST).read_text())
    assert [p["inputs"] for p in m["parts"]] == [[0, 7], [8, 15], [16, 22]]
    assert [p["rows"] for p in m["parts"]] == [40, 40, 35]
    assert len(json.loads((tmp_path / "one" / MANIFEST).read_text())["parts"]) == 23
    # a grouped part holds its files' rows in few row groups, not one per file
    assert pq.ParquetFile(tmp_path / "grp" / m["parts"][0]["file"]).metadata.num_row_groups == 1


def test_many_files_are_grouped_by_default(tmp_path):
    from fastkl._config import GROUP_MIN_TASKS

    src = _tiny_files(tmp_path / "src", GROUP_MIN_TASKS + 1, rows=2)
    fastkl.run(src, tmp_path / "out", keep="id", quiet=True)
    m = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert len(m["parts"]) < GROUP_MIN_TASKS
    assert sum(p["rows"] for p in m["parts"]) == 2 * (GROUP_MIN_TASKS + 1)


def test_a_big_file_keeps_its_tasks_and_its_tail_groups_with_small_files(tmp_path):
    src = _tiny_files(tmp_path / "src", 6, rows=4)
    t = pq.read_table(os.path.join(src, "f0001.parquet"))
    pq.write_table(pa.concat_tables([t] * 5), os.path.join(src, "f0001.parquet"), row_group_size=4)  # 20 rows
    fastkl.run(src, tmp_path / "out", keep="id", task_rows=8, group_files=4, quiet=True)
    m = json.loads((tmp_path / "out" / MANIFEST).read_text())
    # f0 (4) | f1 rows 0-7 | f1 rows 8-15 | f1 rows 16-19 + f2 (4) | f3 + f4 | f5
    assert [(p["input"], p["row_start"], p["rows"]) for p in m["parts"]] == [
        (0, 0, 4), (1, 0, 8), (1, 8, 8), (1, 16, 8), (3, 0, 8), (5, 0, 4)]
    assert _table(tmp_path / "out").column("id").to_pylist() == \
        pa.concat_tables(pq.read_table(os.path.join(src, f)) for f in sorted(os.listdir(src))).column("id").to_pylist()


def test_invalid_row_in_a_group_names_its_file_and_row(tmp_path):
    src = _tiny_files(tmp_path / "src", 10)
    path = os.path.join(src, "f0006.parquet")
    t = pq.read_table(path)
    p = t.column("p").to_pylist()
    p[3] = [0.5, 0.5, 0.5, 0.5]  # does not sum to 1
    pq.write_table(t.set_column(1, "p", pa.array(p, pa.list_(pa.float64()))), path)
    with pytest.raises(fastkl.InvalidRowError) as e:
        fastkl.run(src, tmp_path / "out", group_files=4, scheduler="sync", quiet=True)
    assert "f0006.parquet" in str(e.value) and "row 3" in str(e.value)


def test_resume_with_grouped_tasks_redoes_only_the_group_of_a_changed_file(tmp_path, monkeypatch):
    src = _tiny_files(tmp_path / "src", 20)
    clean = fastkl.run(src, tmp_path / "clean", keep="id", group_files=4, quiet=True)
    restore = interrupt_at_task(monkeypatch, 4)
    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        fastkl.run(src, dest, keep="id", group_files=4, scheduler="sync", quiet=True)
    assert staging_path(dest).is_dir() and not dest.exists()
    restore()
    # a file of the second group is rewritten (same rows): that group is redone, the others reused
    path = os.path.join(src, "f0005.parquet")
    pq.write_table(pq.read_table(path), path, compression="gzip")
    s = fastkl.run(src, dest, keep="id", group_files=4, scheduler="sync", resume=True, quiet=True)
    m = json.loads((dest / MANIFEST).read_text())
    assert [p["resumed"] for p in m["parts"]] == [True, False, True, False, False]
    assert _table(dest).equals(_table(tmp_path / "clean"))
    assert _summary(s) == _summary(clean)


def test_a_task_reads_only_its_row_groups_footer_entries(tmp_path):
    import dataclasses

    from fastkl.errors import DataError
    from fastkl.io.sources import scan
    from fastkl.jobs.run import _open_task

    src = _tiny_files(tmp_path / "src", 1, rows=40)
    path = os.path.join(src, "f0000.parquet")
    pq.write_table(pq.read_table(path), path, row_group_size=4)  # 10 row groups
    plan, _ = scan(path, p="p", q="q", keep=["id"], task_rows=12)
    assert [[u.index for u in t.units] for t in plan.tasks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    t = plan.tasks[1]
    handle, md = _open_task(t.file, t.units)
    handle.close()
    assert md.num_row_groups == 3
    whole = pq.ParquetFile(path).metadata
    assert [md.row_group(k).column(1).data_page_offset for k in range(3)] == \
        [whole.row_group(g).column(1).data_page_offset for g in (3, 4, 5)]
    # the task's entries must be the ones planned from: a different crc is a changed footer
    u = t.units[1]
    wrong = dataclasses.replace(u, meta=(u.meta[0], u.meta[1], u.meta[2] ^ 1))
    with pytest.raises(DataError, match="changed since the job started .footer differs"):
        _open_task(t.file, (t.units[0], wrong, t.units[2]))
    fastkl.run(path, tmp_path / "out", keep="id", task_rows=12, quiet=True)
    assert _table(tmp_path / "out").column("id").to_pylist() == list(range(40))


def test_dry_run_plans_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    src = _tiny_files(tmp_path / "src", 12)
    plan = fastkl.run(src, tmp_path / "out", group_files=5, dry_run=True)
    assert (plan.files, plan.rows, plan.tasks, plan.parts, plan.grouped_tasks) == (12, 60, 3, 3, 3)
    assert plan.file_bytes == sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    assert plan.estimated_s >= plan.plan_s > 0
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["src"]
    r = subprocess.run([sys.executable, "-m", "fastkl.cli", "run", src, str(tmp_path / "out"), "--dry-run"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "files          12" in r.stdout and "estimated" in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_a_large_manifest_keeps_inputs_and_parts_in_parquet_tables(tmp_path, monkeypatch):
    import fastkl.jobs.run as job
    from fastkl.io import manifest_tables as mt

    monkeypatch.setattr(job, "MANIFEST_INLINE", 5)
    src = _tiny_files(tmp_path / "src", 12)
    dest = tmp_path / "out"
    s = fastkl.run(src, dest, keep="id", group_files=1, quiet=True)
    m = json.loads((dest / MANIFEST).read_text())
    assert m["parts"] == {"table": mt.PARTS_TABLE, "count": 12} and m["inputs"]["count"] == 12
    parts = mt.read_parts(dest, m)
    assert parts.column("file").to_pylist() == sorted(f for f in os.listdir(dest) if f.startswith("part-"))
    assert parts.column("rows").to_pylist() == [5] * 12 and not any(parts.column("resumed").to_pylist())
    assert mt.read_inputs(dest, m).column("path").to_pylist() == sorted(
        os.path.join(src, f) for f in os.listdir(src))
    assert pq.read_table(dest).num_rows == 60  # a dataset reader skips the tables
    # the same job again with --resume: already done (its identity holds through plan_digest)
    again = fastkl.run(src, dest, keep="id", group_files=1, quiet=True, resume=True)
    assert _summary(again) == _summary(s)
    # an input changed: not the same job any more
    path = os.path.join(src, "f0003.parquet")
    pq.write_table(pq.read_table(path), path, compression="gzip")
    with pytest.raises(fastkl.FastKLError, match="already exists"):
        fastkl.run(src, dest, keep="id", group_files=1, quiet=True, resume=True)
    # and inline below the bound, read the same way
    monkeypatch.setattr(job, "MANIFEST_INLINE", 10_000)
    fastkl.run(src, tmp_path / "small", keep="id", group_files=1, quiet=True)
    small = json.loads((tmp_path / "small" / MANIFEST).read_text())
    assert isinstance(small["parts"], list)
    assert mt.read_parts(tmp_path / "small", small, ["file", "rows"]).equals(parts.select(["file", "rows"]))


def test_grouped_tasks_on_worker_processes(tmp_path):
    """The distributed path (a window of futures, results merged in task order) with grouped tasks."""
    src = _tiny_files(tmp_path / "src", 18)
    one = fastkl.run(src, tmp_path / "one", measures=("kl", "js"), keep="id", group_files=1, scheduler="sync",
                     quiet=True)
    grouped = fastkl.run(src, tmp_path / "grp", measures=("kl", "js"), keep="id", group_files=3,
                         scheduler="processes", workers=2, quiet=True)
    assert _table(tmp_path / "grp").equals(_table(tmp_path / "one"))
    assert _summary(grouped) == _summary(one)
    assert len(json.loads((tmp_path / "grp" / MANIFEST).read_text())["parts"]) == 6


def test_part_names_of_the_manifest_table_are_the_staging_names():
    """The parts table's names are built as one buffer: they must be exactly `Staging.part_name`'s."""
    from fastkl.io import manifest_tables as mt
    from fastkl.io.output import Staging

    for n in (1, 12, 1_000_001):
        staging = Staging(Path("/nowhere"), n)
        names = mt.part_names(n, staging.width)
        assert len(names) == n
        for i in {0, min(1, n - 1), n // 2, n - 1}:
            assert names[i].as_py() == staging.part_name(i)


def test_a_plan_of_columns_builds_the_tasks_of_its_rows(tmp_path):
    """Tasks built on demand from the plan's columns cover every row once, in order, grouped or cut."""
    from fastkl.io.sources import scan

    src = _tiny_files(tmp_path / "src", 7, rows=40)
    pq.write_table(pq.read_table(os.path.join(src, "f0003.parquet")), os.path.join(src, "f0003.parquet"),
                   row_group_size=4)
    for kw in (dict(task_rows=12), dict(task_rows=100, group_files=3)):
        plan, _ = scan(src, p="p", q="q", keep=["id"], **kw)
        seen = []
        for t in plan.tasks:
            for piece in t.pieces():
                assert piece.rows == sum(u.rows for u in piece.units)
                seen.append((piece.file.index, piece.row_start, piece.rows))
        assert sum(r for _, _, r in seen) == plan.rows == 280
        ends = {}
        for f, start, rows in seen:
            assert ends.get(f, 0) == start
            ends[f] = start + rows
        assert plan.tasks.grouped == (sum(1 for t in plan.tasks if t.group))


def test_a_plan_of_columns_keeps_each_objects_etag():
    """An S3 object's ETag (what its reads are pinned to) goes from planning through the plan's
    columns to its InputFile, its tasks' FileRef and fingerprints, and the manifest's inputs table;
    files without one (local, other stores) have no "etag" in either."""
    from fastkl.io import manifest_tables as mt
    from fastkl.io.filemeta import Identity
    from fastkl.io.plan_columns import Files
    from fastkl.io.sources import cut_tasks

    def files(etags):
        fs = Files()
        for i, e in enumerate(etags):
            fs.append(f"b/k{i}.parquet", f"s3://b/k{i}.parquet", "parquet", Identity(0, 0, 100, 5, 0, e), (),
                      None, "d", (), [(10, 80, 0)], None)
        return fs.freeze()

    fs = files(["e0", "", "e2"])
    assert [f.etag for f in fs] == ["e0", "", "e2"]
    tasks = cut_tasks(fs, None, None, group_files=1)
    assert [t.file.etag for t in tasks] == ["e0", "", "e2"]
    assert [t.fingerprint().get("etag") for t in tasks] == ["e0", None, "e2"]
    assert [t.file.identity().etag for t in tasks] == ["e0", "", "e2"]
    assert mt.inputs_table(fs).column("etag").to_pylist() == ["e0", "", "e2"]
    assert "etag" not in mt.inputs_table(files(["", ""])).column_names
    grouped = cut_tasks(fs, None, None, group_files=3)
    assert len(grouped) == 1 and [p.file.etag for p in grouped[0].pieces()] == ["e0", "", "e2"]
