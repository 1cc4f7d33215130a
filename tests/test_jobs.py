"""End-to-end jobs through `fastkl.run` (SPEC §4-§7).

Small multi-file, multi-row-group datasets of every layout (Parquet files,
Arrow IPC files, a directory, hive partitions, a glob, several sources),
checked row by row against the scipy reference of tests/naive.py; identical
output for every scheduler; the commit/overwrite/resume rules.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

import fastkl
import naive
from fastkl.io.output import MANIFEST, staging_path

MEASURES = ("kl", "js", "entropy", "tv")
K = 12


# --------------------------------------------------------------------------
# data


def _rows(rng, n, first_id, *, nulls=True, zeros=True):
    p = naive.make_probs(rng, n, K, zero_frac=0.2)
    q = naive.make_probs(rng, n, K)
    if zeros:  # some rows with zeros on the q side where p > 0: kl = +inf
        for i in range(0, n, 7):
            j = int(np.argmax(p[i]))
            q[i, j] = 0.0
            q[i] /= q[i].sum()
    prow = [list(r) for r in p]
    qrow = [list(r) for r in q]
    if nulls:
        for i in range(3, n, 11):
            (prow if i % 2 else qrow)[i] = None
    return pa.table({
        "id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
        "p": pa.array(prow, pa.list_(pa.float64())),
        "q": pa.array(qrow, pa.large_list(pa.float64())),
    })


def write_dataset(root, layout, rng, *, files=3, rows=40, group=9):
    """Write a dataset of `layout`; return (SOURCE argument, the input table in job order)."""
    os.makedirs(root, exist_ok=True)
    tables = [_rows(rng, rows + 5 * i, 1000 * i) for i in range(files)]
    paths = []
    if layout in ("parquet", "glob", "several", "mixed", "hive"):
        for i, t in enumerate(tables):
            if layout == "hive":
                d = os.path.join(root, f"split={'ab'[i % 2]}", f"day={i}")
                os.makedirs(d, exist_ok=True)
                path = os.path.join(d, "data.parquet")
            elif layout == "mixed" and i % 2:
                path = os.path.join(root, f"shard-{i:02d}.arrow")
                feather.write_feather(t, path, chunksize=group, compression="uncompressed")
                paths.append(path)
                continue
            else:
                path = os.path.join(root, f"shard-{i:02d}.parquet")
            pq.write_table(t, path, row_group_size=group)
            paths.append(path)
    elif layout == "ipc":
        for i, t in enumerate(tables):
            path = os.path.join(root, f"shard-{i:02d}.feather")
            feather.write_feather(t, path, chunksize=group, compression="uncompressed")
            paths.append(path)
    elif layout == "one_big_group":
        t = pa.concat_tables(tables)
        path = os.path.join(root, "big.parquet")
        pq.write_table(t, path, row_group_size=t.num_rows)
        paths.append(path)
        tables = [t]
    else:
        raise ValueError(layout)
    # a stray file and a hidden one in the directory are ignored
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write("not data")
    with open(os.path.join(root, "_SUCCESS"), "w") as f:
        f.write("")
    if layout == "glob":
        source = os.path.join(root, "*.parquet")
    elif layout == "several":
        source = [paths[0], os.path.join(root, "shard-01.parquet"), paths[2]]
    elif layout == "one_big_group":
        source = paths[0]
    else:
        source = root
    if layout == "hive":  # discovery order: sorted paths (split=a/day=0, split=a/day=2, split=b/day=1)
        order = sorted(range(files), key=lambda i: (("ab"[i % 2]), i))
        tables = [tables[i] for i in order]
    return source, pa.concat_tables([t.cast(tables[0].schema) for t in tables])


def expected(table, measure, **opts):
    """Per-row scipy reference values (None for rows null on either side, SPEC §4)."""
    p = table.column("p").to_pylist()
    q = table.column("q").to_pylist() if "q" in table.column_names else [None] * len(p)
    out = []
    for a, b in zip(p, q):
        if a is None or (b is None and "q" in table.column_names):
            out.append(None)
            continue
        v, _ = naive.scipy_reference(measure, np.array([a]), None if b is None else np.array([b]), **opts)
        out.append(float(v[0]))
    return out


def check_rows(got, want, what=""):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"{what} row {i}: {g} for a null row"
        elif math.isinf(w):
            assert g == w, f"{what} row {i}: {g} != {w}"
        else:
            assert g is not None and abs(g - w) <= 1e-12 + 1e-9 * abs(w), f"{what} row {i}: {g} vs {w}"


def read_dest(dest):
    names = sorted(n for n in os.listdir(dest) if n.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(os.path.join(dest, n)) for n in names])


def summary_stats(summary):
    d = summary.to_dict()
    d.pop("timings"), d.pop("dest")
    return d


def _snapshot(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------
# every layout, row by row


@pytest.mark.parametrize("layout", ["parquet", "ipc", "mixed", "hive", "glob", "several", "one_big_group"])
def test_layouts_row_by_row(tmp_path, rng, layout):
    source, table = write_dataset(str(tmp_path / "src"), layout, rng)
    before = _snapshot(tmp_path / "src")
    dest = tmp_path / "out"
    summary = fastkl.run(source, dest, measures=MEASURES, keep=("id",), task_rows=17, status=True)
    assert _snapshot(tmp_path / "src") == before  # input never changed
    out = read_dest(dest)
    assert out.column_names == ["id", *MEASURES, "status"]
    assert out.column("id").to_pylist() == table.column("id").to_pylist()
    for m in MEASURES:
        check_rows(out.column(m).to_pylist(), expected(table, m), f"{layout}/{m}")
    n_null = sum(
        a is None or b is None for a, b in zip(table.column("p").to_pylist(), table.column("q").to_pylist())
    )
    assert out.column("status").to_pylist().count("null") == n_null
    assert summary.rows == table.num_rows
    assert summary.measures["kl"].inf > 0
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["rows"] == table.num_rows
    assert sum(p["rows"] for p in manifest["parts"]) == table.num_rows
    assert [p["file"] for p in manifest["parts"]] == sorted(p["file"] for p in manifest["parts"])
    assert manifest["summary"]["measures"]["kl"]["inf"] == summary.measures["kl"].inf
    assert {"path", "size", "mtime_ns", "rows"} <= set(manifest["inputs"][0])
    assert not staging_path(dest).exists()
    # reading DEST as a dataset in file-name order gives the input order
    assert ds.dataset(str(dest)).to_table().column("id").to_pylist() == table.column("id").to_pylist()


def test_one_huge_row_group_is_streamed_in_batches(tmp_path, rng):
    source, table = write_dataset(str(tmp_path / "src"), "one_big_group", rng)
    dest = tmp_path / "out"
    fastkl.run(source, dest, keep=("id",), task_rows=10)
    parts = sorted(n for n in os.listdir(dest) if n.endswith(".parquet"))
    assert len(parts) == 1  # one row group cannot be split into tasks ...
    md = pq.read_metadata(dest / parts[0])
    assert md.num_rows == table.num_rows
    assert md.num_row_groups == math.ceil(table.num_rows / 10)  # ... but is read 10 rows at a time


def test_ipc_batches_split_into_tasks(tmp_path, rng):
    source, table = write_dataset(str(tmp_path / "src"), "ipc", rng, files=1, rows=50, group=50)
    dest = tmp_path / "out"
    fastkl.run(source, dest, keep=("id",), task_rows=20)
    manifest = json.loads((dest / MANIFEST).read_text())
    assert [p["rows"] for p in manifest["parts"]] == [20, 20, 10]
    assert read_dest(dest).column("id").to_pylist() == table.column("id").to_pylist()


def test_hive_partition_columns_can_be_kept(tmp_path, rng):
    source, table = write_dataset(str(tmp_path / "src"), "hive", rng)
    dest = tmp_path / "out"
    fastkl.run(source, dest, keep=("split", "day", "id"))
    out = read_dest(dest)
    assert out.schema.field("day").type == pa.int32()
    assert out.schema.field("split").type == pa.string()
    ids = out.column("id").to_pylist()
    assert [d for d in out.column("day").to_pylist()] == [i // 1000 for i in ids]
    assert out.column("split").to_pylist() == ["ab"[(i // 1000) % 2] for i in ids]


def test_entropy_only_needs_no_q_column(tmp_path, rng):
    t = _rows(rng, 30, 0).drop_columns(["q"])
    pq.write_table(t, tmp_path / "x.parquet", row_group_size=7)
    s = fastkl.run(tmp_path / "x.parquet", tmp_path / "out", measures=("entropy",), q="nope")
    assert s.rows == 30
    check_rows(read_dest(tmp_path / "out").column("entropy").to_pylist(), expected(t, "entropy"))


def test_options_are_passed_to_the_kernel(tmp_path, rng):
    source, table = write_dataset(str(tmp_path / "src"), "parquet", rng)
    fastkl.run(source, tmp_path / "out", measures=("kl", "js"), base=2, smoothing=1e-3)
    out = read_dest(tmp_path / "out")
    for m in ("kl", "js"):
        check_rows(out.column(m).to_pylist(), expected(table, m, base=2, smoothing=1e-3), m)
    assert not any(math.isinf(v) for v in out.column("kl").to_pylist() if v is not None)


def test_empty_input_gives_a_readable_empty_dataset(tmp_path, rng):
    t = _rows(rng, 5, 0).slice(0, 0)
    pq.write_table(t, tmp_path / "e.parquet")
    s = fastkl.run(tmp_path / "e.parquet", tmp_path / "out", keep=("id",))
    assert s.rows == 0
    out = ds.dataset(str(tmp_path / "out")).to_table()
    assert out.num_rows == 0 and out.column_names == ["id", "kl"]


# --------------------------------------------------------------------------
# schedulers: identical output and summary


@pytest.fixture(scope="module")
def cluster_client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0")
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


def _bytes_of_parts(dest):
    return {n: (dest / n).read_bytes() for n in sorted(os.listdir(dest)) if n.endswith(".parquet")}


def test_same_output_for_every_scheduler(tmp_path, rng, cluster_client):
    source, table = write_dataset(str(tmp_path / "src"), "mixed", rng, files=4)
    kw = dict(measures=MEASURES, keep=("id",), task_rows=13, on_invalid="null", status=True)
    runs = {
        "threads": dict(scheduler="threads", workers=3),
        "threads1": dict(workers=1),
        "sync": dict(scheduler="sync"),
        "processes": dict(scheduler="processes", workers=2),
        "cluster": dict(scheduler=cluster_client),
        "address": dict(scheduler=cluster_client.scheduler.address),
    }
    results = {}
    for name, extra in runs.items():
        dest = tmp_path / f"out-{name}"
        s = fastkl.run(source, dest, **kw, **extra)
        results[name] = (_bytes_of_parts(dest), summary_stats(s))
    first_parts, first_summary = results["threads"]
    assert len(first_parts) > 4
    for name, (parts, summ) in results.items():
        assert parts == first_parts, name
        assert summ == first_summary, name
    check_rows(read_dest(tmp_path / "out-cluster").column("kl").to_pylist(), expected(table, "kl"))


def test_cluster_job_failure_leaves_no_dest(tmp_path, rng, cluster_client):
    source, table = write_dataset(str(tmp_path / "src"), "parquet", rng)
    bad = _rows(rng, 10, 5000)
    bad = bad.set_column(1, "p", pa.array([[0.5, 0.7]] + [[0.5, 0.5]] * 9, pa.list_(pa.float64())))
    bad = bad.set_column(2, "q", pa.array([[0.5, 0.5]] * 10, pa.large_list(pa.float64())))
    pq.write_table(bad, os.path.join(source, "shard-zz.parquet"))
    with pytest.raises(fastkl.InvalidRowError) as ei:
        fastkl.run(source, tmp_path / "out", scheduler=cluster_client)
    assert ei.value.file.endswith("shard-zz.parquet") and ei.value.row == 0
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------
# DEST rules


def test_dest_overlapping_source_is_refused(tmp_path, rng):
    source, _ = write_dataset(str(tmp_path / "src"), "parquet", rng)
    before = sorted(os.listdir(source))
    for dest in (source, os.path.join(source, "out"), str(tmp_path)):
        with pytest.raises(fastkl.OptionError, match="overlaps SOURCE"):
            fastkl.run(source, dest)
    with pytest.raises(fastkl.OptionError, match="overlaps SOURCE"):
        fastkl.run(os.path.join(source, "shard-00.parquet"), os.path.join(source, "shard-00.parquet"))
    assert sorted(os.listdir(source)) == before
    assert not staging_path(tmp_path / "src" / "out").exists()


def test_existing_dest_needs_overwrite(tmp_path, rng):
    source, table = write_dataset(str(tmp_path / "src"), "parquet", rng)
    dest = tmp_path / "out"
    fastkl.run(source, dest, measures=("kl",))
    with pytest.raises(fastkl.OptionError, match="already exists"):
        fastkl.run(source, dest, measures=("js",))
    assert read_dest(dest).column_names == ["kl"]
    fastkl.run(source, dest, measures=("js",), overwrite=True)
    assert read_dest(dest).column_names == ["js"]
    assert not (tmp_path / "out.fastkl-old").exists()
    # a directory that is not a fastkl output is never deleted
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(fastkl.OptionError, match="not a fastkl output"):
        fastkl.run(source, other, overwrite=True)
    assert (other / "precious.txt").exists()


def test_failed_overwrite_keeps_old_output(tmp_path, rng):
    source, table = write_dataset(str(tmp_path / "src"), "parquet", rng)
    dest = tmp_path / "out"
    fastkl.run(source, dest)
    old = _bytes_of_parts(dest)
    _with_bad_row(source)
    with pytest.raises(fastkl.InvalidRowError):
        fastkl.run(source, dest, overwrite=True)
    assert _bytes_of_parts(dest) == old
    assert not (tmp_path / "out.fastkl-old").exists()


def _with_bad_row(source, row=5):
    """Rewrite shard-01.parquet with a NaN in p at `row` (inside the file)."""
    path = os.path.join(source, "shard-01.parquet")
    t = pq.read_table(path)
    p = t.column("p").to_pylist()
    good = p[row]
    p[row] = [float("nan")] + p[row][1:]
    pq.write_table(t.set_column(1, "p", pa.array(p, pa.list_(pa.float64()))), path, row_group_size=9)
    return path, good


def test_invalid_row_fails_job_without_dest(tmp_path, rng):
    source, table = write_dataset(str(tmp_path / "src"), "parquet", rng)
    path, _ = _with_bad_row(source, row=12)
    dest = tmp_path / "out"
    with pytest.raises(fastkl.InvalidRowError) as ei:
        fastkl.run(source, dest, task_rows=9)
    e = ei.value
    assert e.reason == "nan" and e.row == 12 and e.file == path
    assert "row group 1" in str(e) and path in str(e)
    assert not dest.exists()
    # with on_invalid="null" the same job goes on and counts it
    s = fastkl.run(source, dest, on_invalid="null", status=True)
    assert s.status_counts["nan"] == 1
    assert read_dest(dest).column("status").to_pylist().count("nan") == 1


def test_failed_job_with_nothing_finished_leaves_nothing(tmp_path, rng):
    """No DEST, and no staging directory either when no part was finished (a
    job that finished some keeps them for --resume: the test below)."""
    source, _ = write_dataset(str(tmp_path / "src"), "parquet", rng, files=1)
    path = os.path.join(source, os.listdir(source)[0])
    t = pq.read_table(path)
    p = t.column("p").to_pylist()
    p[0] = [float("nan")] + p[0][1:]
    pq.write_table(t.set_column(t.schema.get_field_index("p"), "p", pa.array(p, t.schema.field("p").type)), path)
    dest = tmp_path / "out"
    with pytest.raises(fastkl.InvalidRowError):
        fastkl.run(source, dest, scheduler="sync")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_resume_after_failure_gives_clean_output(tmp_path, rng):
    source, table = write_dataset(str(tmp_path / "src"), "parquet", rng, files=4)
    clean = tmp_path / "clean"
    s_clean = fastkl.run(source, clean, measures=MEASURES, keep=("id",), task_rows=9)
    path, good = _with_bad_row(source, row=4)
    dest = tmp_path / "out"
    with pytest.raises(fastkl.InvalidRowError):  # sync: the tasks before the bad one are finished
        fastkl.run(source, dest, measures=MEASURES, keep=("id",), task_rows=9, scheduler="sync")
    staging = staging_path(dest)
    assert staging.is_dir() and not dest.exists()
    finished = {n: os.stat(staging / n).st_mtime_ns for n in os.listdir(staging) if n.endswith(".parquet")}
    assert finished
    # repair the input: its parts are redone, the others are reused
    t = pq.read_table(path)
    p = t.column("p").to_pylist()
    p[4] = good
    pq.write_table(t.set_column(1, "p", pa.array(p, pa.list_(pa.float64()))), path, row_group_size=9)
    s = fastkl.run(source, dest, measures=MEASURES, keep=("id",), task_rows=9, resume=True)
    assert _bytes_of_parts(dest) == _bytes_of_parts(clean)
    assert summary_stats(s) == summary_stats(s_clean)
    manifest = json.loads((dest / MANIFEST).read_text())
    resumed = [p["file"] for p in manifest["parts"] if p["resumed"]]
    assert resumed and set(resumed) <= set(finished)
    redone_from_changed = [p for p in manifest["parts"] if p["input"] == 1]
    assert not any(p["resumed"] for p in redone_from_changed)
    assert not staging.exists()


def interrupt_at_task(monkeypatch, n: int):
    """Make the n-th task of the next job raise KeyboardInterrupt (a Ctrl-C mid-job);
    returns a function that puts the real task back (for the --resume that follows)."""
    import fastkl.jobs.run as job

    real = job.run_task
    calls = []

    def flaky(task, *a, **k):
        calls.append(task.index)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(task, *a, **k)

    monkeypatch.setattr(job, "run_task", flaky)
    return lambda: monkeypatch.setattr(job, "run_task", real)


def test_resume_after_interrupt(tmp_path, rng, monkeypatch):
    source, table = write_dataset(str(tmp_path / "src"), "parquet", rng, files=3)
    clean = tmp_path / "clean"
    fastkl.run(source, clean, keep=("id",), task_rows=9)
    restore = interrupt_at_task(monkeypatch, 6)
    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        fastkl.run(source, dest, keep=("id",), task_rows=9, scheduler="sync")
    assert not dest.exists()
    restore()
    fastkl.run(source, dest, keep=("id",), task_rows=9, scheduler="sync", resume=True)
    assert _bytes_of_parts(dest) == _bytes_of_parts(clean)
    manifest = json.loads((dest / MANIFEST).read_text())
    assert sum(p["resumed"] for p in manifest["parts"]) == 5


def test_resume_with_other_options_redoes_everything(tmp_path, rng):
    source, table = write_dataset(str(tmp_path / "src"), "parquet", rng)
    path, good = _with_bad_row(source, row=4)
    dest = tmp_path / "out"
    with pytest.raises(fastkl.InvalidRowError):
        fastkl.run(source, dest, task_rows=9, workers=1)
    fastkl.run(source, dest, task_rows=9, resume=True, on_invalid="null")
    manifest = json.loads((dest / MANIFEST).read_text())
    assert not any(p["resumed"] for p in manifest["parts"])


# --------------------------------------------------------------------------
# refused input


def test_column_errors(tmp_path, rng):
    source, _ = write_dataset(str(tmp_path / "src"), "parquet", rng)
    with pytest.raises(fastkl.OptionError, match="'teacher'"):
        fastkl.run(source, tmp_path / "o1", p="teacher")
    with pytest.raises(fastkl.OptionError, match="'uid'"):
        fastkl.run(source, tmp_path / "o2", keep=("uid",))
    with pytest.raises(fastkl.OptionError, match="'id'.*list of floats"):
        fastkl.run(source, tmp_path / "o3", q="id")
    # a later file without the column: the files do not match
    pq.write_table(pa.table({"p": pa.array([[1.0]])}), os.path.join(source, "zz.parquet"))
    with pytest.raises(fastkl.DataError, match="zz.parquet.*'q'"):
        fastkl.run(source, tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_corrupt_file_is_refused(tmp_path, rng):
    source, _ = write_dataset(str(tmp_path / "src"), "parquet", rng)
    # a damaged page inside a row group: found by the task that reads it
    t = _rows(rng, 60, 9000, nulls=False)
    path = os.path.join(source, "shard-zz.parquet")
    pq.write_table(t, path, row_group_size=20, compression="zstd")
    offset = pq.read_metadata(path).row_group(1).column(0).data_page_offset
    with open(path, "r+b") as f:
        f.seek(offset + 40)
        f.write(b"\xff" * 64)
    with pytest.raises(fastkl.DataError, match="shard-zz.parquet: cannot read row group 1"):
        fastkl.run(source, tmp_path / "out", task_rows=20)
    assert not (tmp_path / "out").exists()
    # a truncated file: refused before any work
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(fastkl.DataError, match="shard-zz.parquet: not a readable Parquet file"):
        fastkl.run(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_options_refused_before_work(tmp_path, rng):
    source, _ = write_dataset(str(tmp_path / "src"), "parquet", rng)
    for kw in (dict(measures=("nope",)), dict(kind="probz"), dict(base=1), dict(scheduler="nope"),
               dict(workers=0), dict(task_rows=0)):
        with pytest.raises(fastkl.OptionError):
            fastkl.run(source, tmp_path / "out", **kw)
    with pytest.raises(fastkl.OptionError, match="does not exist"):
        fastkl.run(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(fastkl.OptionError, match="matches no file"):
        fastkl.run(str(tmp_path / "src" / "*.nothing"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_summary_json_and_manifest(tmp_path, rng):
    source, table = write_dataset(str(tmp_path / "src"), "parquet", rng)
    sj = tmp_path / "summary.json"
    s = fastkl.run(source, tmp_path / "out", measures=("kl", "js"), summary_json=sj)
    d = json.loads(sj.read_text())
    assert d["rows"] == table.num_rows and set(d["measures"]) == {"kl", "js"}
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["summary"] == d
    assert manifest["fastkl_version"] == fastkl.__version__
    assert manifest["options"]["on_invalid"] == "raise"
    assert isinstance(s, fastkl.Summary)


def test_outputs_inside_a_source_directory_are_not_input(tmp_path, rng):
    source, table = write_dataset(str(tmp_path / "data" / "src"), "parquet", rng)
    fastkl.run(source, tmp_path / "data" / "scores")  # an earlier job's output inside SOURCE below
    s = fastkl.run(tmp_path / "data", tmp_path / "again", keep=("id",))
    assert s.rows == table.num_rows
    assert read_dest(tmp_path / "again").column("id").to_pylist() == table.column("id").to_pylist()


@pytest.mark.parametrize("workers, files, expect", [(None, 3, (3, 1)), (None, 1, (1, 4)), (1, 3, (1, 4)),
                                                    (2, 3, (2, 2)), (8, 3, (3, 1))])
def test_threads_and_kernel_threads_share_the_cores(tmp_path, rng, monkeypatch, workers, files, expect):
    """n Dask threads x k kernel threads never exceeds the cores, and uses them all when it can."""
    import threading

    import fastkl.jobs.run as job
    from fastkl import _config

    source, _ = write_dataset(str(tmp_path / "src"), "parquet", rng, files=files, rows=20, group=100)
    monkeypatch.setattr(_config, "cores", lambda: 4)
    seen_k, seen_threads = set(), set()
    real = job.run_task

    def spy(task, batch_rows, spec, k, report=None, cancelled=None):
        seen_k.add(k)
        seen_threads.add(threading.get_ident())
        return real(task, batch_rows, spec, k, report, cancelled)

    monkeypatch.setattr(job, "run_task", spy)
    fastkl.run(source, tmp_path / "out", workers=workers)
    n, k = expect
    assert seen_k == {k}
    assert len(seen_threads) <= n
