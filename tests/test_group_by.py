"""group_by / --group-by: per-group summaries, mergeable and split-independent like the whole.

The reference for a group's summary is the whole summary of a job run on
that group's rows alone: they must be equal, bit for bit, however the
grouped job was split into tasks and scheduled (threads, sync, a real
distributed.LocalCluster) and when it was resumed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import fastkl
from fastkl.io.output import MANIFEST, staging_path
from test_jobs import interrupt_at_task

MEASURES = ("kl", "js", "entropy")
LANGS = ["en", "de", "fr", None]


def _table(rng, n: int, first: int, k: int = 6) -> pa.Table:
    p = rng.dirichlet(np.ones(k) * 0.7, n)
    q = rng.dirichlet(np.ones(k) * 0.7, n)
    q[rng.random(n) < 0.05, 0] = 0.0  # where p > 0: kl is +inf
    q /= q.sum(axis=1, keepdims=True)
    p_list = [list(r) for r in p]
    for i in np.flatnonzero(rng.random(n) < 0.04):
        p_list[i] = [-0.1] + p_list[i][1:]  # invalid (negative)
    for i in np.flatnonzero(rng.random(n) < 0.03):
        p_list[i] = None  # null row
    lang = [LANGS[i] for i in rng.integers(0, len(LANGS), n)]
    return pa.table({
        "id": pa.array(np.arange(first, first + n)),
        "p": pa.array(p_list, pa.list_(pa.float64())),
        "q": pa.array([list(r) for r in q], pa.list_(pa.float64())),
        "lang": pa.array(lang, pa.string()),
        "split": pa.array(rng.choice(["train", "test"], n).tolist()).dictionary_encode(),
        "ckpt": pa.array(rng.integers(0, 3, n) * 1000, pa.int32()),
        "flag": pa.array((rng.random(n) < 0.3).tolist(), pa.bool_()),
        "score": pa.array(rng.random(n)),
    })


def write_source(root, rng, files=3, rows=120) -> tuple[str, pa.Table]:
    os.makedirs(root)
    tables = []
    for i in range(files):
        t = _table(rng, rows + 17 * i, 1000 * i)
        pq.write_table(t, os.path.join(root, f"shard-{i}.parquet"), row_group_size=23)
        tables.append(t)
    return str(root), pa.concat_tables(tables)


def core(summary: fastkl.Summary) -> str:
    """A summary's statistics as JSON text (not where or how fast the job ran)."""
    d = summary.to_dict()
    for k in ("dest", "options", "timings", "files"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True)


def groups_json(summary: fastkl.Summary) -> str:
    return json.dumps(summary.to_dict()["groups"], sort_keys=True)


def _alone(tmp_path, table: pa.Table, column: str, value, name: str) -> fastkl.Summary:
    """The whole summary of a job on the rows of one group only."""
    col = table.column(column)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    mask = pc.is_null(col) if value is None else pc.fill_null(pc.equal(col, pa.scalar(value, col.type)), False)
    sub = table.filter(mask)
    src = tmp_path / f"alone-{name}"
    os.makedirs(src)
    pq.write_table(sub, src / "part.parquet", row_group_size=31)
    return fastkl.run(str(src), tmp_path / f"alone-out-{name}", measures=MEASURES, on_invalid="null", quiet=True)


@pytest.mark.parametrize("column", ["lang", "split", "ckpt", "flag"])
def test_each_group_is_the_job_on_its_rows_alone(tmp_path, rng, column):
    source, table = write_source(tmp_path / "src", rng)
    s = fastkl.run(source, tmp_path / "out", measures=MEASURES, on_invalid="null", group_by=column,
                   task_rows=29, quiet=True)
    assert s.group_by == column
    values = [k for k, _ in s.groups]
    want = table.column(column)
    if pa.types.is_dictionary(want.type):
        want = want.cast(want.type.value_type)
    distinct = set(want.to_pylist())
    assert set(values) == distinct and len(values) == len(distinct)
    assert values[-1] is None or None not in distinct  # null last
    assert sum(g.rows for _, g in s.groups) == s.rows == table.num_rows
    for i, (value, g) in enumerate(s.groups):
        alone = _alone(tmp_path, table, column, value, f"{column}-{i}")
        assert core(g) == core(alone), (column, value)
        assert s.group(value) is g
    # the whole is unchanged by grouping
    plain = fastkl.run(source, tmp_path / "plain", measures=MEASURES, on_invalid="null", quiet=True)
    whole = json.loads(core(s))
    whole.pop("group_by"), whole.pop("groups")
    assert json.dumps(whole, sort_keys=True) == core(plain)


@pytest.fixture(scope="module")
def cluster_client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0")
    client = Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


def test_groups_do_not_depend_on_the_split_or_scheduler(tmp_path, rng, cluster_client):
    source, table = write_source(tmp_path / "src", rng, files=4)
    runs = {
        "threads-small-tasks": dict(task_rows=7, workers=2),
        "threads-one-task-per-file": dict(),
        "sync": dict(scheduler="sync", task_rows=50),
        "cluster": dict(scheduler=cluster_client, task_rows=11),
    }
    got = {}
    for name, extra in runs.items():
        s = fastkl.run(source, tmp_path / name, measures=MEASURES, on_invalid="null", group_by="lang",
                       quiet=True, **extra)
        got[name] = core(s)
        manifest = json.loads((tmp_path / name / MANIFEST).read_text())
        assert json.dumps(manifest["summary"]["groups"], sort_keys=True) == groups_json(s)
        assert manifest["columns"]["group_by"] == "lang"
    first = got["threads-small-tasks"]
    assert json.loads(first)["groups"]
    for name, text in got.items():
        assert text == first, name


def test_resume_keeps_the_groups_exact(tmp_path, rng, monkeypatch):
    source, table = write_source(tmp_path / "src", rng)
    clean = fastkl.run(source, tmp_path / "clean", measures=MEASURES, on_invalid="null", group_by="lang",
                       task_rows=20, quiet=True)
    restore = interrupt_at_task(monkeypatch, 7)
    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        fastkl.run(source, dest, measures=MEASURES, on_invalid="null", group_by="lang", task_rows=20,
                   scheduler="sync", quiet=True)
    restore()
    s = fastkl.run(source, dest, measures=MEASURES, on_invalid="null", group_by="lang", task_rows=20,
                   scheduler="sync", resume=True, quiet=True)
    manifest = json.loads((dest / MANIFEST).read_text())
    assert sum(p["resumed"] for p in manifest["parts"]) == 6
    assert core(s) == core(clean)
    # another grouping column is another job: nothing of the first is reused for it
    s2 = fastkl.run(source, dest, measures=MEASURES, on_invalid="null", group_by="ckpt", task_rows=20,
                    overwrite=True, resume=True, quiet=True)
    assert [k for k, _ in s2.groups] == [0, 1000, 2000]
    assert not any(p["resumed"] for p in json.loads((dest / MANIFEST).read_text())["parts"])


def test_cap_is_the_jobs_and_resume_can_raise_it(tmp_path, rng):
    source, table = write_source(tmp_path / "src", rng)
    # one task per file: each task sees 4 languages
    with pytest.raises(fastkl.TooManyGroupsError, match=r"'lang' has more than 3 distinct values"):
        fastkl.run(source, tmp_path / "out", on_invalid="null", group_by="lang", max_groups=3, quiet=True)
    assert not (tmp_path / "out").exists()
    # one language per file: every task is within the cap, their merge is not
    src2 = tmp_path / "src2"
    os.makedirs(src2)
    for i, lang in enumerate(["en", "de", "fr"]):
        t = table.slice(40 * i, 40)
        t = t.set_column(t.schema.get_field_index("lang"), "lang", pa.array([lang] * 40))
        pq.write_table(t, src2 / f"s{i}.parquet")
    dest = tmp_path / "out2"
    with pytest.raises(fastkl.TooManyGroupsError, match="more than 2 distinct values"):
        fastkl.run(str(src2), dest, on_invalid="null", group_by="lang", max_groups=2, quiet=True,
                   scheduler="sync")
    assert not dest.exists() and staging_path(dest).is_dir()  # the finished parts are kept
    s = fastkl.run(str(src2), dest, on_invalid="null", group_by="lang", max_groups=3, quiet=True, resume=True)
    assert [k for k, _ in s.groups] == ["de", "en", "fr"]
    assert all(p["resumed"] for p in json.loads((dest / MANIFEST).read_text())["parts"])


def test_hive_partition_key_groups(tmp_path, rng):
    src = tmp_path / "src"
    tables = {}
    for split in ("train", "test"):
        os.makedirs(src / f"split={split}")
        t = _table(rng, 50, 0).drop_columns(["split"])
        pq.write_table(t, src / f"split={split}" / "part.parquet")
        tables[split] = t
    s = fastkl.run(str(src), tmp_path / "out", measures=MEASURES, on_invalid="null", group_by="split", quiet=True)
    assert [k for k, _ in s.groups] == ["test", "train"]
    for split, t in tables.items():
        alone = _alone(tmp_path, t.append_column("x", pa.array([1] * t.num_rows)), "x", 1, split)
        assert core(s.group(split)) == core(alone)


def test_sequence_rows_group_their_token_level(tmp_path, rng):
    def seqs(n):
        rows_p, rows_q = [], []
        for _ in range(n):
            m = int(rng.integers(1, 5))
            rows_p.append([list(r) for r in rng.dirichlet(np.ones(4), m)])
            rows_q.append([list(r) for r in rng.dirichlet(np.ones(4), m)])
        t = pa.table({"p": pa.array(rows_p, pa.list_(pa.list_(pa.float64()))),
                      "q": pa.array(rows_q, pa.list_(pa.list_(pa.float64()))),
                      "lang": pa.array([LANGS[i] for i in rng.integers(0, 3, n)])})
        return t

    src = tmp_path / "src"
    os.makedirs(src)
    tables = [seqs(40), seqs(45)]
    for i, t in enumerate(tables):
        pq.write_table(t, src / f"s{i}.parquet", row_group_size=13)
    s = fastkl.run(str(src), tmp_path / "out", measures=("kl",), group_by="lang", task_rows=10, quiet=True)
    table = pa.concat_tables(tables)
    for value, g in s.groups:
        assert g.tokens is not None and g.tokens.rows > 0
        sub = table.filter(pc.equal(table["lang"], value))
        os.makedirs(tmp_path / f"a-{value}")
        pq.write_table(sub, tmp_path / f"a-{value}" / "x.parquet")
        alone = fastkl.run(str(tmp_path / f"a-{value}"), tmp_path / f"ao-{value}", measures=("kl",), quiet=True)
        assert core(g) == core(alone)


def test_summary_json_and_printed_table(tmp_path, rng):
    source, _ = write_source(tmp_path / "src", rng, files=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "fastkl.cli", "run", source, str(tmp_path / "out"), "-m", "kl",
                          "--on-invalid", "null", "--group-by", "lang", "--summary-json",
                          str(tmp_path / "s.json")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "by lang (4 groups):" in out.stdout
    lines = out.stdout.splitlines()
    start = lines.index("by lang (4 groups):")
    assert [ln.split()[0] for ln in lines[start + 2:start + 6]] == ["de", "en", "fr", "(null)"]
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["group_by"] == "lang" and [g["value"] for g in d["groups"]] == ["de", "en", "fr", None]
    assert fastkl.Summary.from_dict(d).to_dict() == d


def test_cli_errors_are_one_line(tmp_path, rng):
    source, _ = write_source(tmp_path / "src", rng, files=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "fastkl.cli", "run", source, str(tmp_path / "out"),
                               "--on-invalid", "null", "-q", *args], capture_output=True, text=True, env=env)

    cap = run("--group-by", "id", "--max-groups", "50")
    assert cap.returncode == 2 and len(cap.stderr.strip().splitlines()) == 1
    assert "group_by" not in cap.stderr
    assert "--group-by column 'id' has more than 50 distinct values" in cap.stderr
    assert "--max-groups" in cap.stderr
    missing = run("--group-by", "language")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "unknown group-by column 'language'" in missing.stderr and "lang" in missing.stderr
    floats = run("--group-by", "score")
    assert floats.returncode == 2 and "expected a string, integer, boolean or dictionary" in floats.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(fastkl.OptionError, match="max_groups must be an integer >= 1"):
        fastkl.run(source, tmp_path / "out", group_by="lang", max_groups=0)
