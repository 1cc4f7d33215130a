"""What a SOURCE reads (SPEC §5): the same files whichever way it is given.

Globs obey the directory walk's rules (hidden and underscore names, earlier
fastkl outputs, staging, old and lock names), unreadable directories and files
are errors naming them, symlinked directories are followed once, FIFOs,
sockets and devices are refused unopened; columns are found by the schema's
structure (a dot in a name is only a character); and the one-line messages
of discovery name the file and say what is wrong.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from fastkl.cli import main as cli_main

import fastkl
import parquet_surgery as surgery
from fastkl.io.sources import discover, scan
from test_jobs import _rows, read_dest, write_dataset

HERE = Path(__file__).resolve().parent


def cli(*args, timeout=60, unprivileged=False, fault=()):
    """`fastkl` in a fresh process; (exit code, stderr). unprivileged: as a user that
    permissions apply to (root in a new user namespace, where it is no one special)."""
    if fault:
        cmd = [sys.executable, str(HERE / "faultinject.py"), *fault, "--", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "fastkl.cli", *map(str, args)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    pre = _drop_privileges if unprivileged and os.geteuid() == 0 else None
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=pre)
    if r.returncode == 126 and "user namespace" in r.stderr:
        pytest.skip("cannot drop root's privileges here (no user namespaces)")
    return r.returncode, r.stderr


def invoke(*args):
    """`fastkl` in this process (for what cannot hang it); (exit code, stderr)."""
    r = CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stderr


def _drop_privileges():
    CLONE_NEWUSER = 0x10000000
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWUSER) != 0:
        os.write(2, b"no user namespace\n")
        os._exit(126)


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastkl: error: ") and "Traceback" not in err, err
    return lines[0]


def shown(paths) -> list[str]:
    return [f.display for f in discover(paths)[0]]


def _table(n=20, first_id=0):
    return _rows(np.random.default_rng(first_id), n, first_id, nulls=False, zeros=False)


# --------------------------------------------------------------------------
# 4. a glob reads what the directory reads


@pytest.fixture
def messy_dir(tmp_path, rng):
    """A dataset directory holding what is not its data: an earlier output, Spark's leftovers, fastkl's own."""
    data = tmp_path / "data"
    write_dataset(str(data), "parquet", rng, files=2)  # + README.txt, _SUCCESS
    (data / "sub").mkdir()
    pq.write_table(_table(7, 500), data / "sub" / "more.parquet")
    fastkl.run(str(data / "*.parquet"), data / "scores-v1", keep=("id", "p", "q"))  # an earlier job, p kept
    for junk in ("_temporary/0/part-0.parquet", "sub/_temporary/part-1.parquet", ".hidden/x.parquet",
                 "other.fastkl-staging/part-000000.parquet", "other.fastkl-old/part-000000.parquet"):
        (data / junk).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_table(5, 900), data / junk)
    pq.write_table(_table(5, 900), data / "other.fastkl-lock")  # a lock file: named, not sniffed
    pq.write_table(_table(5, 900), data / ".hidden.parquet")
    pq.write_metadata(_table().schema, data / "_common_metadata")
    return data


def test_a_glob_reads_what_the_directory_reads(messy_dir):
    data = messy_dir
    want = shown(data)
    assert sorted(os.path.relpath(p, data) for p in want) == [
        "shard-00.parquet", "shard-01.parquet", "sub/more.parquet"]
    for pattern in ("*", "**", "**/*.parquet", "*/*.parquet", "*.parquet", "sub/*", "[s]*"):
        got = shown(str(data / pattern))
        assert {os.path.realpath(p) for p in got} <= {os.path.realpath(p) for p in want}, (pattern, got)
    assert sorted(map(os.path.realpath, shown(str(data / "*")))) == sorted(map(os.path.realpath, want))
    assert shown(str(data / "*/*.parquet")) == [str(data / "sub" / "more.parquet")]
    # a component that asks for `_` names gets them, fastkl's own names never
    assert shown(str(data / "_*" / "*" / "*.parquet")) == [str(data / "_temporary" / "0" / "part-0.parquet")]
    with pytest.raises(fastkl.OptionError, match="matches no file"):
        discover(str(data / "*.fastkl-*"))
    # the job: the rows of the directory, never an earlier output's rows again
    s = fastkl.run(str(data / "*"), data / "scores-v2", keep=("id",))
    assert s.rows == fastkl.run(data, data.parent / "from-dir").rows == 45 + 40 + 7


def test_a_glob_with_dest_inside_it_resumes(messy_dir, tmp_path):
    data = messy_dir
    dest = data / "scores-v2"
    job = ["--keep", "id", "--task-rows", "5", "--scheduler", "sync", "-q"]
    code, err = cli("run", data / "*", dest, *job, fault=["kill-before:write_batch:4"])
    assert code < 0 and (data / "scores-v2.fastkl-staging").is_dir(), err  # killed mid-job
    kw = dict(keep=("id",), task_rows=5, scheduler="sync")
    fastkl.run(str(data / "*"), dest, resume=True, **kw)
    fastkl.run(str(data / "*"), tmp_path / "clean", **kw)
    assert read_dest(dest).equals(read_dest(tmp_path / "clean"))


# --------------------------------------------------------------------------
# 5. unreadable is an error; symlinked directories are followed once


def test_an_unreadable_directory_or_file_is_an_error_naming_it(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    pq.write_table(_table(), data / "a.parquet")
    pq.write_table(_table(), data / "sub" / "b.parquet")
    try:
        (data / "sub").chmod(0)
        for source in (data, data / "*" / "*.parquet", data / "sub"):
            code, err = cli("run", source, tmp_path / "out", unprivileged=True)
            assert code == 1 and f"{data / 'sub'}: cannot read the directory (Permission denied)" in one_line(err), \
                (source, err)
        (data / "sub").chmod(0o755)
        shutil.copy(data / "a.parquet", data / "sub" / "shard-noext")  # a data file without an extension
        (data / "sub" / "shard-noext").chmod(0)
        for source in (data, data / "s*"):
            code, err = cli("run", source, tmp_path / "out", unprivileged=True)
            assert code == 1 and f"{data / 'sub' / 'shard-noext'}: cannot read it" in one_line(err), (source, err)
    finally:
        (data / "sub").chmod(0o755)
    assert not (tmp_path / "out").exists()


def test_symlinked_directories_are_followed_once(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data / "real").mkdir(parents=True)
    elsewhere.mkdir()
    pq.write_table(_table(10, 0), data / "real" / "a.parquet")
    pq.write_table(_table(20, 100), elsewhere / "b.parquet")
    (data / "linked").symlink_to(elsewhere, target_is_directory=True)
    (data / "real" / "loop").symlink_to("..", target_is_directory=True)  # a cycle
    (data / "twice").symlink_to("real", target_is_directory=True)  # the same files again
    assert shown(data) == [str(data / "linked" / "b.parquet"), str(data / "real" / "a.parquet")]
    assert fastkl.run(data, tmp_path / "out").rows == 30
    assert sorted(shown(str(data / "*"))) == sorted(shown(data))
    with pytest.raises(fastkl.OptionError, match="overlaps SOURCE"):  # DEST inside a linked directory
        fastkl.run(data, elsewhere / "out")


# --------------------------------------------------------------------------
# 10. FIFOs, sockets and devices are refused without being opened


def test_fifos_sockets_and_devices_are_refused_unopened(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(_table(), data / "a.parquet")
    os.mkfifo(data / "pipe")  # no extension: sniffing it used to block forever
    code, err = cli("run", data, tmp_path / "out", timeout=30)
    assert code == 1 and f"{data / 'pipe'}: a FIFO, not a regular file" in one_line(err), err
    code, err = cli("run", data / "pipe", tmp_path / "out", timeout=30)
    assert code == 1 and f"{data / 'pipe'}: a FIFO" in one_line(err), err
    os.remove(data / "pipe")
    os.mkfifo(data / "b.parquet")  # with an extension: its footer read used to block forever
    for source in (data, data / "*.parquet"):
        code, err = cli("run", source, tmp_path / "out", timeout=30)
        assert code == 1 and f"{data / 'b.parquet'}: a FIFO" in one_line(err), err
    os.remove(data / "b.parquet")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(data / "sock"))
        code, err = invoke("run", data, tmp_path / "out")  # opening a socket fails at once: in process
        assert code == 1 and f"{data / 'sock'}: a socket" in one_line(err), err
    finally:
        sock.close()
    code, err = invoke("run", "/dev/null", tmp_path / "out")
    assert code == 1 and "/dev/null: a character device" in one_line(err), err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------
# 11. a dot in a column name is a character, not a path


def test_dotted_column_names_keep_the_memory_bound_and_the_footer_checks(tmp_path):
    n, k = 400, 64
    dist = pa.FixedSizeListArray.from_arrays(pa.array(np.full(n * k, 1.0 / k)), k)
    t = pa.table({"dist.p": dist, "dist.q": dist, "id": pa.array(np.arange(n))})
    path = tmp_path / "dotted.parquet"
    pq.write_table(t, path, row_group_size=50)
    group_bytes = 50 * k * 8 * 2
    plan, _ = scan(str(path), p="dist.p", q="dist.q", keep=["id"], task_bytes=2 * group_bytes)
    assert len(plan.tasks) == 4 and all(task.nbytes >= 2 * 50 * k * 8 for task in plan.tasks)
    assert plan.batch_rows[0] <= 100
    s = fastkl.run(path, tmp_path / "out", p="dist.p", q="dist.q", task_bytes=2 * group_bytes)
    assert s.rows == n
    md, data = surgery.read_footer(str(path))
    surgery.column_meta(md, 1, 0).set(7, 10**12)  # total_compressed_size of dist.p in row group 1
    surgery.write_with_footer(str(path), data, md)
    code, err = invoke("run", path, tmp_path / "out2", "--p", "dist.p", "--q", "dist.q")
    assert code == 1 and "dotted.parquet: corrupt Parquet footer: row group 1" in one_line(err), err
    assert "outside the data" in err


# --------------------------------------------------------------------------
# messages


def test_the_same_directory_twice_is_read_once(tmp_path):
    pq.write_table(_table(), tmp_path / "a.parquet")
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(_table(), src / "a.parquet")
    assert fastkl.run([src, src], tmp_path / "out").rows == 20
    assert fastkl.run([src, str(src / "*")], tmp_path / "out2").rows == 20


def test_duplicate_column_names_name_the_file_and_the_column(tmp_path):
    t = _table()
    dup = pa.Table.from_arrays([t["p"], t["q"], t["id"], t["id"]], names=["p", "q", "id", "id"])
    pq.write_table(dup, tmp_path / "dup.parquet")
    code, err = invoke("run", tmp_path / "dup.parquet", tmp_path / "out", "--keep", "id")
    assert code == 1 and "dup.parquet: column 'id' appears 2 times" in one_line(err), err
    two_p = pa.Table.from_arrays([t["p"], t["p"], t["q"]], names=["p", "p", "q"])
    feather.write_feather(two_p, tmp_path / "dup.arrow")
    code, err = invoke("run", tmp_path / "dup.arrow", tmp_path / "out")
    assert code == 1 and "dup.arrow: column 'p' appears 2 times" in one_line(err), err
    assert fastkl.run(tmp_path / "dup.parquet", tmp_path / "out").rows == 20  # `id` not read: no matter


def test_a_parquet_summary_file_is_not_data(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    collector = []
    pq.write_table(_table(), src / "a.parquet", metadata_collector=collector)
    collector[0].set_file_path("a.parquet")
    pq.write_metadata(_table().schema, src / "_metadata", metadata_collector=collector)
    code, err = invoke("run", src / "_metadata", tmp_path / "out")
    assert code == 2 and "_metadata is a Parquet summary file" in one_line(err), err
    assert "corrupt" not in err
    assert fastkl.run(src, tmp_path / "out").rows == 20  # beside its data: skipped


def test_a_newline_in_a_file_name_keeps_messages_one_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bad = src / "bad\nname.parquet"
    bad.write_bytes(b"PAR1 not really")
    code, err = invoke("run", src, tmp_path / "out")
    assert code == 1 and repr(str(bad)) in one_line(err), err
    (src / "notes\nhere").write_bytes(b"text")
    code, err = invoke("run", src / "notes\nhere", tmp_path / "out")
    assert code == 1 and "not a Parquet or Arrow IPC file" in one_line(err), err


def test_empty_shards_typed_null_are_accepted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    empty_null = pa.table({"id": pa.array([], pa.null()), "p": pa.array([], pa.null()), "q": pa.array([], pa.null())})
    list_null = pa.list_(pa.null())
    empty_list = pa.table({"id": pa.array([], pa.null()), "p": pa.array([], list_null), "q": pa.array([], list_null)})
    pq.write_table(empty_null, src / "a-empty.parquet")  # first in order: the schema comes from typed files
    pq.write_table(_table(20), src / "b.parquet")
    feather.write_feather(empty_list, src / "c-empty.arrow")
    s = fastkl.run(src, tmp_path / "out", keep=("id",))
    out = read_dest(tmp_path / "out")
    assert s.rows == 20 and out.schema.field("id").type == pa.int64() and out.num_rows == 20
    only_empty = tmp_path / "only-empty"
    only_empty.mkdir()
    pq.write_table(empty_list, only_empty / "a.parquet")
    assert fastkl.run(only_empty, tmp_path / "out2").rows == 0
    assert pq.read_table(tmp_path / "out2").num_rows == 0
    with pytest.raises(fastkl.DataError, match="has type null"):  # rows typed null: refused as before
        pq.write_table(pa.table({"p": pa.array([None], pa.null()), "q": pa.array([None], pa.null())}),
                       src / "d.parquet")
        fastkl.run(src, tmp_path / "out3")
