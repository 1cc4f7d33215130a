"""Jobs under faults and hostile input (SPEC §4, §6): the fast half of the proof.

scripts/fault_trials.py runs the long trials (dozens of random SIGKILLs,
hundreds of fuzzed files, hostile sizes with their peak memory); these tests
run a few of each kind in the README's test command:

1. kills: SIGKILL at random moments and at every step of the commit; DEST is
   absent or complete, and --resume finishes without redoing a finished part;
2. worker deaths on a LocalCluster of two processes: once (same output) and
   every time (bounded tries, an error naming file and row group, no DEST);
3. exceptions while writing (a full disk): nothing partial in DEST or staging;
4. corrupt and mismatched files: exit 1 and one line naming the file;
5. hostile sizes: lying footers and a decompression bomb, in bounded memory;
6. bad rows of every SPEC §4 reason through a whole job (hypothesis);
7. security defaults: no unpickling, 127.0.0.1 only, no DEST into SOURCE
   through links or `..`, no write through a planted symlink.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from fastkl.cli import main as cli_main
from hypothesis import given, settings
from hypothesis import strategies as st

import fastkl
import faultinject
import naive
import parquet_surgery as surgery
from fastkl.io.output import MANIFEST, staging_path
from fastkl.io.state_log import encode, read_local
from test_bad_rows import mess_up
from test_jobs import _bytes_of_parts, _rows, read_dest, summary_stats, write_dataset

HERE = Path(__file__).resolve().parent
MEASURES = ("kl", "js", "tv")
JOB = ["--measure", "kl", "--measure", "js", "--measure", "tv", "--keep", "id", "--task-rows", "9", "-q"]
JOB_KW = dict(measures=MEASURES, keep=("id",), task_rows=9)


# --------------------------------------------------------------------------
# helpers


def cli(*args, env=None, timeout=60, fault=()):
    """`fastkl` in a fresh process (optionally under tests/faultinject.py); (code, stderr)."""
    if fault:
        cmd = [sys.executable, str(HERE / "faultinject.py"), *fault, "--", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "fastkl.cli", *map(str, args)]
    e = dict(os.environ, **(env or {}))
    e.setdefault("FASTKL_STATE_FLUSH_S", "0")  # every finished part's state logged at once: kills land on a known part
    e["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), e.get("PYTHONPATH", "")])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)
    return r.returncode, r.stderr


def invoke(*args):
    r = CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stderr


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fastkl: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def manifest_summary(dest) -> dict:
    d = json.loads((Path(dest) / MANIFEST).read_text())["summary"]
    d.pop("timings"), d.pop("dest")
    return d


def listing(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def finished_parts(staging: Path) -> dict[str, tuple[int, int]]:
    """Parts that a logged state vouches for (what --resume must not redo): name -> (inode, mtime)."""
    out = {}
    if not staging.is_dir() or not (staging / "_state").is_dir():
        return out
    for state in read_local(staging / "_state").values():
        part = staging / state["part"] if "part" in state else staging / f"part-{state['index']:06d}.parquet"
        if part.is_file():
            s = part.stat()
            out[part.name] = (s.st_ino, s.st_mtime_ns)
    return out


def check_dest_absent_or_clean(dest: Path, clean: Path) -> bool:
    """DEST is absent, or complete and identical to the clean run; True if complete."""
    if not os.path.lexists(dest):
        return False
    assert _bytes_of_parts(dest) == _bytes_of_parts(clean)
    assert manifest_summary(dest) == manifest_summary(clean)
    assert listing(dest) == listing(clean)
    return True


def resume_and_check(source, dest: Path, clean: Path, before: dict, **kw):
    """--resume (in this process): identical to the clean run, finished parts untouched."""
    s = fastkl.run(source, dest, resume=True, **JOB_KW, **kw)
    assert _bytes_of_parts(dest) == _bytes_of_parts(clean)
    assert listing(dest) == listing(clean)
    assert summary_stats(s) == manifest_summary(clean)
    manifest = json.loads((dest / MANIFEST).read_text())
    for name, (ino, mtime) in before.items():
        st_ = (dest / name).stat()
        assert (st_.st_ino, st_.st_mtime_ns) == (ino, mtime), f"{name} was redone"
        assert next(p for p in manifest["parts"] if p["file"] == name)["resumed"], name
    assert not os.path.lexists(staging_path(dest))


@pytest.fixture
def dataset(tmp_path, rng):
    source, table = write_dataset(str(tmp_path / "src"), "parquet", rng, files=3)
    clean = tmp_path / "clean"
    fastkl.run(source, clean, **JOB_KW)
    return source, table, clean


# --------------------------------------------------------------------------
# 1. kills


def test_sigkill_at_random_moments_then_resume(tmp_path, dataset):
    source, _, clean = dataset
    t0 = time.perf_counter()
    assert cli("run", source, tmp_path / "timed", *JOB)[0] == 0
    took = time.perf_counter() - t0
    rnd = random.Random(7)
    for trial in range(3):
        dest = tmp_path / f"out{trial}"
        proc = subprocess.Popen([sys.executable, "-m", "fastkl.cli", "run", source, str(dest), *JOB],
                                stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(0.3, 1.0) * took)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        complete = check_dest_absent_or_clean(dest, clean)
        before = {} if complete else finished_parts(staging_path(dest))
        resume_and_check(source, dest, clean, before)


# (fault, what the kill interrupts); sync scheduler: 16 tasks, each one os.replace
# for its part, its state then logged (one fsync each, FASTKL_STATE_FLUSH_S=0); os.replace #1
# is the job's own mark, #18 the manifest.
COMMIT_STEPS = [
    ("kill-after:mkdir:2", "creating the staging directory"),
    ("kill-before:replace:1", "before the staging directory is marked"),
    ("kill-after:replace:2", "a part renamed into place, its state not yet written"),
    ("kill-after:replace:6", "four parts and their states finished"),
    ("kill-before:fsync:3", "a state written to the log, not yet synced"),
    ("kill-before:write_batch:12", "in the middle of writing a part"),
    ("kill-after:replace:18", "the manifest written into staging"),
    ("kill-after:rmtree:1", "the state removed, the rename not done"),
    ("kill-after:rename:1", "right after the commit's rename"),
]


@pytest.mark.parametrize("fault, moment", COMMIT_STEPS, ids=[m for _, m in COMMIT_STEPS])
def test_sigkill_at_each_step_then_resume(tmp_path, dataset, fault, moment):
    source, _, clean = dataset
    dest = tmp_path / "out"
    code, err = cli("run", source, dest, *JOB, "--scheduler", "sync", fault=[fault])
    assert code == -signal.SIGKILL, (code, err)  # the fault fired at that moment
    complete = check_dest_absent_or_clean(dest, clean)
    assert complete == (moment == "right after the commit's rename")
    before = {} if complete else finished_parts(staging_path(dest))
    if moment == "four parts and their states finished":
        assert len(before) == 4
    resume_and_check(source, dest, clean, before, scheduler="sync")


def _log_of(staging: Path) -> Path:
    (log,) = sorted((staging / "_state").glob("states-*.log"))
    return log


def test_a_torn_or_damaged_state_record_is_never_trusted(tmp_path, dataset):
    """The state log after a kill: a record torn at its end, or damaged in its middle, is dropped
    with everything after it in that log; those parts are redone, the output is the clean one."""
    source, _, clean = dataset
    dest = tmp_path / "out"
    code, _ = cli("run", source, dest, *JOB, "--scheduler", "sync", fault=["kill-after:replace:6"])
    assert code == -signal.SIGKILL
    staging = staging_path(dest)
    log = _log_of(staging)
    states = read_local(staging / "_state")
    assert sorted(states) == [0, 1, 2, 3]
    forged = encode(dict(states[3], index=4))  # a state for part 4 (renamed in place, not logged) ...
    with open(log, "ab") as f:
        f.write(forged[:-7])  # ... torn by a kill in the middle of its write
    assert sorted(read_local(staging / "_state")) == [0, 1, 2, 3]
    lines = log.read_bytes().splitlines(keepends=True)
    damaged = bytearray(lines[2])
    damaged[20] ^= 1  # a flipped bit in record 2: it and what follows in its log are not trusted
    log.write_bytes(b"".join(lines[:2]) + bytes(damaged) + b"".join(lines[3:]))
    assert sorted(read_local(staging / "_state")) == [0, 1]
    resume_and_check(source, dest, clean, finished_parts(staging))
    parts = json.loads((dest / MANIFEST).read_text())["parts"]
    assert [p["resumed"] for p in parts[:6]] == [True, True, False, False, False, False]


def test_states_waiting_for_their_batch_are_redone_after_a_kill(tmp_path, dataset):
    """By default states are logged in batches (about one a second): a kill loses those still
    waiting; --resume redoes their parts (finished, renamed in place, but not vouched for)."""
    source, _, clean = dataset
    dest = tmp_path / "out"
    code, _ = cli("run", source, dest, *JOB, "--scheduler", "sync", fault=["kill-after:replace:6"],
                  env={"FASTKL_STATE_FLUSH_S": "600"})
    assert code == -signal.SIGKILL
    staging = staging_path(dest)
    assert len(list(staging.glob("part-*.parquet"))) == 5 and finished_parts(staging) == {}
    resume_and_check(source, dest, clean, {})
    assert not any(p["resumed"] for p in json.loads((dest / MANIFEST).read_text())["parts"])


def test_sigkill_between_the_renames_of_an_overwrite(tmp_path, dataset):
    source, _, clean = dataset
    dest = tmp_path / "out"
    fastkl.run(source, dest, measures=("entropy",))  # an older output to replace
    code, _ = cli("run", source, dest, *JOB, "--overwrite", fault=["kill-after:rename:1"])
    assert code == -signal.SIGKILL
    assert not dest.exists()  # the old output moved aside, the new one not yet in place
    resume_and_check(source, dest, clean, finished_parts(staging_path(dest)), overwrite=True)
    assert not (tmp_path / "out.fastkl-old").exists()


def test_resume_of_a_complete_dest_is_done_and_another_job_is_refused(tmp_path, dataset):
    source, _, clean = dataset
    s = fastkl.run(source, clean, resume=True, **JOB_KW)  # the same job: nothing to do
    assert summary_stats(s) == manifest_summary(clean)
    with pytest.raises(fastkl.OptionError, match="already exists"):
        fastkl.run(source, clean, resume=True, measures=("kl",))


# --------------------------------------------------------------------------
# 2. worker deaths on a LocalCluster of two processes


@pytest.fixture(scope="module")
def cluster():
    import cloudpickle
    from distributed import Client, LocalCluster

    cloudpickle.register_pickle_by_value(faultinject)  # the plugin travels to the workers
    lc = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", silence_logs=50)
    client = Client(lc, set_as_default=False)
    yield client
    client.close()
    lc.close()
    cloudpickle.unregister_pickle_by_value(faultinject)


# the nanny restarts a killed worker in seconds, but on a loaded 2-core machine a worker that died 8
# times in a row (a batch, then its task alone) took over 60 s to be back
WORKERS_BACK_S = 180


def _with_killer(client, plugin):
    client.register_plugin(plugin)
    return plugin


def test_worker_killed_mid_job_same_output(tmp_path, dataset, cluster):
    source, _, clean = dataset
    pids = set(cluster.run(os.getpid).values())
    plugin = _with_killer(cluster, faultinject.KillTask("shard-01.parquet", 5, str(tmp_path)))
    try:
        s = fastkl.run(source, tmp_path / "out", scheduler=cluster, **JOB_KW)
    finally:
        cluster.unregister_worker_plugin(plugin.name)
    assert (tmp_path / "killed-5").exists()  # a worker did die running task 5
    assert _bytes_of_parts(tmp_path / "out") == _bytes_of_parts(clean)
    assert summary_stats(s) == manifest_summary(clean)
    cluster.wait_for_workers(2, timeout=WORKERS_BACK_S)
    assert set(cluster.run(os.getpid).values()) != pids  # the nanny replaced the dead one


def test_task_that_always_kills_its_worker_fails_the_job(tmp_path, dataset, cluster):
    source, _, _ = dataset
    plugin = _with_killer(cluster, faultinject.KillTask("shard-02.parquet", 11, str(tmp_path), always=True))
    t0 = time.perf_counter()
    try:
        with pytest.raises(fastkl.DataError) as info:
            fastkl.run(source, tmp_path / "out", scheduler=cluster, **JOB_KW)
    finally:
        cluster.unregister_worker_plugin(plugin.name)
    took = time.perf_counter() - t0
    msg = str(info.value)
    assert "shard-02.parquet" in msg and "row group" in msg and "died 4 times" in msg, msg
    assert took < 60
    assert not (tmp_path / "out").exists()
    cluster.wait_for_workers(2, timeout=WORKERS_BACK_S)


# tiny tasks (a row group of one row each: 135 of them) run in batches of several per Dask task
TINY_KW = dict(JOB_KW, task_rows=1)


@pytest.fixture
def tiny_tasks(tmp_path, rng):
    source, _ = write_dataset(str(tmp_path / "src"), "parquet", rng, files=3, group=1)
    clean = tmp_path / "clean"
    fastkl.run(source, clean, **TINY_KW)
    return source, clean


def test_tiny_tasks_run_in_batches_with_the_same_output(tmp_path, tiny_tasks, cluster):
    source, clean = tiny_tasks
    plugin = _with_killer(cluster, faultinject.KillTask("shard-01.parquet", 60, str(tmp_path)))
    try:
        from distributed import get_task_stream
        with get_task_stream(cluster) as ts:
            s = fastkl.run(source, tmp_path / "out", scheduler=cluster, **TINY_KW)
        seen = {str(t["key"]) for t in ts.data}
    finally:
        cluster.unregister_worker_plugin(plugin.name)
    assert (tmp_path / "killed-60").exists()  # a worker died running a batch that holds task 60
    batches = [k for k in seen if k.startswith("fastkl-parts-")]
    assert len(batches) >= 8 and len(batches) < len(read_dest(clean)) // 4, sorted(seen)[:5]
    assert _bytes_of_parts(tmp_path / "out") == _bytes_of_parts(clean)
    assert summary_stats(s) == manifest_summary(clean)
    cluster.wait_for_workers(2, timeout=WORKERS_BACK_S)


def test_tiny_task_that_always_kills_its_worker_is_named(tmp_path, tiny_tasks, cluster):
    """Its batch is split after Dask gives up on it; the task is then named alone."""
    source, _ = tiny_tasks
    plugin = _with_killer(cluster, faultinject.KillTask("shard-02.parquet", 100, str(tmp_path), always=True))
    try:
        with pytest.raises(fastkl.DataError) as info:
            fastkl.run(source, tmp_path / "out", scheduler=cluster, **TINY_KW)
    finally:
        cluster.unregister_worker_plugin(plugin.name)
    msg = str(info.value)
    # task 100 is shard-02's row group 15 (shard-00 holds tasks 0-39, shard-01 40-84), alone
    assert "shard-02.parquet: row group 15: " in msg and "died 4 times" in msg and " ... " not in msg, msg
    assert not (tmp_path / "out").exists()
    cluster.wait_for_workers(2, timeout=WORKERS_BACK_S)


def test_task_batches_keep_order_and_size():
    from types import SimpleNamespace

    from fastkl._config import BATCH_BYTES, BATCH_TASKS
    from fastkl.jobs.run import _task_batches

    sizes = [100] * 300 + [BATCH_BYTES] + [BATCH_BYTES // 3] * 7 + [10] * 5
    todo = [SimpleNamespace(index=i, nbytes=b) for i, b in enumerate(sizes)]
    batches = _task_batches(todo, threads=2)
    assert [t.index for b in batches for t in b] == list(range(len(todo)))
    assert all(len(b) <= BATCH_TASKS and (len(b) == 1 or sum(t.nbytes for t in b) <= BATCH_BYTES)
               for b in batches)
    assert [len(b) for b in batches[:19]] == [BATCH_TASKS] * 18 + [300 - 18 * BATCH_TASKS]
    assert [t.nbytes for t in batches[19]] == [BATCH_BYTES]  # a big task alone
    assert [len(b) for b in batches[20:]] == [3, 3, 1 + 5]
    few = [SimpleNamespace(index=i, nbytes=100) for i in range(40)]
    assert [len(b) for b in _task_batches(few, threads=2)] == [2] * 20  # 8 batches or more per thread
    assert [len(b) for b in _task_batches(few[:15], threads=2)] == [1] * 15


def test_no_worker_left_fails_in_bounded_time(tmp_path, dataset, monkeypatch):
    """A worker without a nanny dies and nothing restarts it: the job fails, it does not wait forever."""
    import cloudpickle
    from distributed import Client, LocalCluster

    import fastkl.jobs.run as job

    source, _, _ = dataset
    monkeypatch.setattr(job, "NO_WORKER_TIMEOUT", 3.0)
    registered = faultinject.__name__ in cloudpickle.list_registry_pickle_by_value()  # by the cluster fixture
    if not registered:
        cloudpickle.register_pickle_by_value(faultinject)
    lc = LocalCluster(n_workers=0, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                      silence_logs=50)
    client = Client(lc, set_as_default=False)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", lc.scheduler_address,
                               "--no-nanny", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        client.wait_for_workers(1, timeout=60)
        client.register_plugin(faultinject.KillTask("shard-01.parquet", 6, str(tmp_path)))
        t0 = time.perf_counter()
        with pytest.raises(fastkl.DataError, match="no Dask worker left.*shard-01.parquet row group") as info:
            fastkl.run(source, tmp_path / "out", scheduler=client, **JOB_KW)
        assert time.perf_counter() - t0 < 30, info.value
        assert worker.wait(timeout=10) == -signal.SIGKILL
        assert not (tmp_path / "out").exists()
    finally:
        worker.kill()
        client.close()
        lc.close()
        if not registered:
            cloudpickle.unregister_pickle_by_value(faultinject)


# --------------------------------------------------------------------------
# 3. exceptions while writing


@pytest.mark.parametrize("op, nth", [("write_batch", 5), ("replace", 7), ("fsync", 4), ("replace", 18), ("rename", 1)])
def test_disk_full_leaves_nothing_partial(tmp_path, dataset, monkeypatch, op, nth):
    """ENOSPC at a part's write, a part's rename, a state's log write, the manifest, the commit."""
    source, _, clean = dataset
    dest = tmp_path / "out"
    code, err = cli("run", source, dest, *JOB, "--scheduler", "sync", fault=[f"fail:{op}:{nth}:{errno.ENOSPC}"])
    assert code == 1, err
    assert "No space left on device" in one_line(err)
    assert not os.path.lexists(dest)
    staging = staging_path(dest)
    assert not [p for p in staging.rglob(".*")]  # no temporaries (parts, states, manifest)
    resume_and_check(source, dest, clean, finished_parts(staging))


def test_real_write_failure_file_size_limit(tmp_path, dataset):
    """A write that the kernel refuses (RLIMIT_FSIZE: EFBIG), not a simulated one."""
    import resource

    source, _, clean = dataset
    dest = tmp_path / "out"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    r = subprocess.run([sys.executable, "-m", "fastkl.cli", "run", source, str(dest), *JOB],
                       capture_output=True, text=True, preexec_fn=limit, env=env, timeout=60)
    assert r.returncode == 1 and "File too large" in one_line(r.stderr), r.stderr
    assert not os.path.lexists(dest)
    staging = staging_path(dest)  # gone if no part was finished, else kept for --resume
    assert not (staging.is_dir() and [n for n in os.listdir(staging) if n.startswith(".")])
    resume_and_check(source, dest, clean, finished_parts(staging))


# --------------------------------------------------------------------------
# 4. corrupt and mismatched input


def _good(path, rng, rows=30, **kw):
    pq.write_table(_rows(rng, rows, 0, nulls=False), path, row_group_size=10, **kw)


def _flip(path, offset, n=8):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(n)
        f.seek(offset)
        f.write(bytes(x ^ 0xFF for x in b))


def _corrupt_cases(d: Path, rng):
    """(file, expected text in the message): each one file among good ones."""
    cases = []

    def new(name):
        p = d / name
        _good(p, rng)
        return p

    p = new("truncated.parquet")
    os.truncate(p, p.stat().st_size // 2)
    cases.append((p, "not a readable Parquet file"))
    p = new("nofooter.parquet")
    os.truncate(p, p.stat().st_size - 8)
    cases.append((p, "not a readable Parquet file"))
    p = new("footerflip.parquet")  # the start of the footer's Thrift structure
    _flip(p, p.stat().st_size - 8 - pq.read_metadata(p).serialized_size, 4)
    cases.append((p, "not a readable Parquet file"))
    p = d / "pageflip.parquet"
    _good(p, rng, write_page_checksum=True, compression="none")
    _flip(p, pq.read_metadata(p).row_group(1).column(1).data_page_offset + 30)
    cases.append((p, "row group 1"))
    p = d / "empty.parquet"
    p.write_bytes(b"")
    cases.append((p, "not a readable Parquet file"))
    p = d / "empty.arrow"
    p.write_bytes(b"")
    cases.append((p, "not a readable Arrow IPC file"))
    p = d / "strings.parquet"
    pq.write_table(pa.table({"id": [1], "p": [["a", "b"]], "q": [[0.5, 0.5]]}), p)
    cases.append((p, "'p' (p) has type list<element: string>"))
    p = d / "ints.parquet"
    pq.write_table(pa.table({"id": [1], "p": [3], "q": [[0.5, 0.5]]}), p)
    cases.append((p, "'p' (p) has type int64"))
    p = d / "noq.parquet"
    pq.write_table(pa.table({"id": [1], "p": [[0.5, 0.5]]}), p)
    cases.append((p, "no column 'q'"))
    p = d / "otherlength.parquet"
    pq.write_table(pa.table({"id": pa.array([1], pa.int64()),
                             "p": pa.array([[0.5, 0.5]], pa.list_(pa.float64(), 2)),
                             "q": pa.array([[0.25] * 4], pa.list_(pa.float64(), 4))}), p)
    cases.append((p, "length_mismatch"))
    p = d / "keeptype.parquet"
    pq.write_table(pa.table({"id": ["x"], "p": [[0.5, 0.5]], "q": [[0.5, 0.5]]}), p)
    cases.append((p, "column 'id' has type string"))
    t = _rows(rng, 30, 0, nulls=False)
    p = d / "offsets.arrow"
    feather.write_feather(t, p, compression="uncompressed")
    raw = bytearray(p.read_bytes())
    at = raw.find(np.arange(0, 4 * naive_k(t), naive_k(t), dtype=np.int32).tobytes())
    raw[at + 4 * 10 : at + 4 * 11] = np.int32(10**8).tobytes()
    p.write_bytes(bytes(raw))
    cases.append((p, "record batch 0"))
    p = d / "truncated.arrow"
    feather.write_feather(t, p, compression="uncompressed")
    os.truncate(p, p.stat().st_size // 2)
    cases.append((p, "not a readable Arrow IPC file"))
    return cases


def naive_k(t):
    return len(t.column("p")[0].as_py())


def test_corrupt_and_mismatched_files_exit_1_naming_the_file(tmp_path, rng):
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = _corrupt_cases(bad, rng)
    for path, needle in cases:
        src = tmp_path / f"src-{path.name}"
        src.mkdir()
        _good(src / "a-good.parquet", rng)
        os.replace(path, src / f"b-{path.name}")
        dest = tmp_path / f"out-{path.name}"
        code, err = invoke("run", src, dest, "--keep", "id")
        line = one_line(err)
        assert code == 1, (path.name, line)
        assert f"b-{path.name}" in line and needle in line, (path.name, line)
        assert not os.path.lexists(dest), path.name


def test_mini_fuzz_in_a_subprocess(tmp_path, rng):
    """30 randomly mutated files through the script's fuzz harness: no crash, hang or traceback."""
    sys.path.insert(0, str(HERE.parent / "scripts"))
    try:
        import fault_trials
    finally:
        sys.path.pop(0)
    out = fault_trials.fuzz(tmp_path, n_files=30, seed=11, quiet=True)
    assert out["total"] == 30
    bad = {k: v for k, v in out["kinds"].items() if k not in fault_trials.FUZZ_OK}
    assert not bad, (bad, out["examples"])


# --------------------------------------------------------------------------
# 5. hostile sizes


def _lying(tmp_path, rng, name, edit):
    p = tmp_path / name
    _good(p, rng, rows=40, compression="zstd")
    md, data = surgery.read_footer(str(p))
    data = edit(md, data) or data
    surgery.write_with_footer(str(p), data, md)
    return p


def test_lying_footers_and_pages_are_refused_cheaply(tmp_path, rng):
    def rows(md, data):
        surgery.set_field(md, [4, 1, 3], 10**15)
        surgery.set_field(md, [3], surgery.get_field(md, [3]) - 10 + 10**15)

    def negative(md, data):
        surgery.set_field(md, [4, 1, 3], -5)

    def outside(md, data):
        surgery.column_meta(md, 1, 1).set(7, 10**12)  # total_compressed_size

    def page(md, data):
        h = surgery.pages(data, md, 1, 1)[-1][1]
        h.set(2, 2**31 - 1)  # uncompressed_page_size
        return surgery.replace_page_header(data, md, 1, 1, len(surgery.pages(data, md, 1, 1)) - 1, h)

    def values(md, data):
        pg = surgery.pages(data, md, 1, 1)
        h = pg[-1][1]
        (h.get(5) or h.get(8)).set(1, 2**31 - 1)  # num_values of the data page
        return surgery.replace_page_header(data, md, 1, 1, len(pg) - 1, h)

    def histogram(md, data):  # pyarrow itself aborts (SIGABRT) reading this column chunk's metadata
        ss = surgery.column_meta(md, 1, 1).get(16)
        ss.get(3)[2].append(7)  # definition_level_histogram one entry too long

    def usize(md, data):  # their sums overflowed the plan's 64-bit columns (an OverflowError escaped)
        for c in range(3):
            surgery.column_meta(md, 0, c).set(6, 2**62)  # total_uncompressed_size

    expect = {"rows": "values for 1000000000000000 rows", "negative": "declares -5 rows", "outside": "outside the data",
              "page": "row group 1", "values": "row group 1", "histogram": "definition level histogram",
              "usize": "declares 4611686018427387904 bytes"}
    for name, edit in [("rows", rows), ("negative", negative), ("outside", outside), ("page", page),
                       ("values", values), ("histogram", histogram), ("usize", usize)]:
        p = _lying(tmp_path, rng, f"{name}.parquet", edit)
        code, err = invoke("run", p, tmp_path / f"out-{name}")
        assert code == 1 and p.name in one_line(err) and expect[name] in err, (name, err)
        assert not (tmp_path / f"out-{name}").exists()


def test_decompression_bomb_fails_within_the_memory_limit(tmp_path):
    """One row of 5*10^7 equal floats: a file of a few KB that decodes to 800 MB."""
    n = 50_000_000
    row = pa.ListArray.from_arrays(pa.array([0, n], pa.int32()), pa.array(np.full(n, 2e-8)))
    src = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"p": row, "q": row}), src, compression="zstd")
    del row
    assert src.stat().st_size < 100_000
    sys.path.insert(0, str(HERE.parent / "scripts"))
    try:
        from fault_trials import guarded
    finally:
        sys.path.pop(0)
    res = guarded([sys.executable, "-m", "fastkl.cli", "run", str(src), str(tmp_path / "out"), "-q"],
                  rss_limit=3 << 30, env={"FASTKL_MEMORY_LIMIT": "2G"}, timeout=120)
    assert not res["killed"], res
    assert res["code"] == 1 and "out of memory reading row group 0" in res["stderr"], res
    assert "bomb.parquet" in one_line(res["stderr"])
    # the cap bounds the data segment; RSS adds only the mapped code of the libraries
    assert res["peak_rss"] < (2 << 30) + (320 << 20), res
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------
# 6. bad rows of every reason through a whole job


@st.composite
def messy_rows(draw):
    n = draw(st.integers(1, 30))
    k = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    P = [list(map(float, r)) for r in naive.make_probs(rng, n, k)]
    Q = [list(map(float, r)) for r in naive.make_probs(rng, n, k)]
    mess_up(draw, rng, P, Q, "probs", "probs",
            hows=("nan", "posinf", "neginf", "negative", "scale", "null_element", "truncate", "zero"))
    group = draw(st.integers(1, n))
    task_rows = draw(st.integers(1, n))
    return P, Q, group, task_rows


@settings(max_examples=25, deadline=None)
@given(messy_rows())
def test_bad_rows_through_a_job(tmp_path_factory, batch):
    P, Q, group, task_rows = batch
    d = tmp_path_factory.mktemp("rows")
    n = len(P)
    table = pa.table({"id": pa.array(range(n), pa.int64()), "p": pa.array(P, pa.list_(pa.float64())),
                      "q": pa.array(Q, pa.list_(pa.float64()))})
    pq.write_table(table, d / "rows.parquet", row_group_size=group)
    measures = ("kl", "reverse_kl", "js", "entropy", "cross_entropy", "tv", "hellinger")
    s = fastkl.run(d / "rows.parquet", d / "out", measures=measures, keep=("id",), on_invalid="null",
                   status=True, task_rows=task_rows, scheduler="sync")
    out = read_dest(d / "out")
    assert out.num_rows == n == s.rows
    assert out.column("id").to_pylist() == list(range(n))
    status = out.column("status").to_pylist()
    allowed = naive.row_statuses(P, Q)
    for i, (got, ok) in enumerate(zip(status, allowed)):
        assert got in ok, (i, got, ok, P[i], Q[i])
    refs = naive.reference_rows(P, Q, measures)
    for m in measures:
        vals = out.column(m).to_pylist()
        assert [v is None for v in vals] == [x != "ok" for x in status], m
        assert not naive.check_against_reference(vals, refs[m], 1e-12, what=m)
    counts = collections.Counter(status)
    assert {k: v for k, v in s.status_counts.items() if v} == dict(counts)
    for m in measures:
        ms = s.measures[m]
        assert (ms.valid, ms.null) == (counts["ok"], counts["null"])
        assert {r: c for r, c in ms.invalid.items() if c} == {r: c for r, c in counts.items() if r not in ("ok", "null")}
    # the default, on_invalid="raise": the first invalid row of the file, no DEST
    bad = [i for i, x in enumerate(status) if x not in ("ok", "null")]
    if bad:
        with pytest.raises(fastkl.InvalidRowError) as info:
            fastkl.run(d / "rows.parquet", d / "out2", measures=measures, task_rows=task_rows, scheduler="sync")
        assert (info.value.row, info.value.reason) == (bad[0], status[bad[0]])
        assert info.value.file.endswith("rows.parquet")
        assert not (d / "out2").exists()


# --------------------------------------------------------------------------
# 7. security defaults


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_nothing_from_a_data_file_is_unpickled(tmp_path, rng):
    import pickle

    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Boom(str(marker)))
    t = _rows(rng, 20, 0, nulls=False)
    evil = {b"ARROW:extension:name": b"arrow.py_extension_type", b"ARROW:extension:metadata": payload}
    schema = pa.schema([t.schema.field("id").with_metadata(evil), t.schema.field("p").with_metadata(evil),
                        t.schema.field("q")], metadata={b"pandas": payload, b"fastkl": payload})
    t = pa.Table.from_arrays(t.columns, schema=schema)
    src = tmp_path / "src"
    (src / "k=__import__('os').system('touch PWNED')").mkdir(parents=True)
    pq.write_table(t, src / "k=__import__('os').system('touch PWNED')" / "a.parquet")
    feather.write_feather(t, src / "k=__import__('os').system('touch PWNED')" / "b.arrow")
    s = fastkl.run(src, tmp_path / "out", keep=("id", "k"))
    assert s.rows == 40 and not marker.exists() and not (Path.cwd() / "PWNED").exists()
    assert set(read_dest(tmp_path / "out").column("k").to_pylist()) == {"__import__('os').system('touch PWNED')"}
    # and the package's own code has no way to do it
    import re

    danger = re.compile(r"pickle\.loads?\(|(?<![\w.])(eval|exec)\(|yaml\.load|marshal\.loads?\(|shelve|PyExtensionType")
    for f in (HERE.parent / "fastkl").glob("*.py"):
        assert not danger.search(f.read_text()), (f.name, danger.search(f.read_text()))


def test_local_cluster_listens_on_localhost_only(tmp_path, dataset, monkeypatch):
    import psutil

    import fastkl.jobs.run as job

    source, _, clean = dataset
    seen = []
    real = job._local_cluster

    def spy(n, *rest):
        cluster, client = real(n, *rest)
        me = psutil.Process()
        for proc in [me] + me.children(recursive=True):
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    seen.append((proc.pid, c.laddr.ip, c.laddr.port))
        addrs = [cluster.scheduler_address] + list(client.scheduler_info()["workers"])
        seen.append(("addresses", tuple(addrs), cluster.dashboard_link))
        return cluster, client

    monkeypatch.setattr(job, "_local_cluster", spy)
    fastkl.run(source, tmp_path / "out", scheduler="processes", workers=2, **JOB_KW)
    assert _bytes_of_parts(tmp_path / "out") == _bytes_of_parts(clean)
    listens = [s for s in seen if s[0] != "addresses"]
    assert len(listens) >= 3  # scheduler, dashboard, two workers (and their nannies)
    assert all(ip == "127.0.0.1" for _, ip, _ in listens), listens
    (_, addrs, dash), = [s for s in seen if s[0] == "addresses"]
    assert all(a.startswith("tcp://127.0.0.1:") for a in addrs) and "127.0.0.1" in dash


def test_dest_into_source_through_links_or_dotdot_is_refused(tmp_path, rng):
    source, _ = write_dataset(str(tmp_path / "src"), "parquet", rng, files=2)
    src = Path(source)
    (src / "sub").mkdir()
    (tmp_path / "to_src").symlink_to(src)
    (tmp_path / "to_sub").symlink_to(src / "sub")
    (tmp_path / "elsewhere").mkdir()
    before = listing(tmp_path)
    dests = [
        tmp_path / "to_src" / "out",  # a link to SOURCE as DEST's parent
        tmp_path / "to_src",  # DEST is a link to SOURCE
        f"{tmp_path}/to_sub/../out",  # physically src/out: `..` after a link
        f"{tmp_path}/elsewhere/../src/out",
        f"{tmp_path}/src/sub/..",
    ]
    for dest in dests:
        with pytest.raises(fastkl.OptionError, match="overlaps SOURCE|must name a directory"):
            fastkl.run(source, dest)
        code, err = invoke("run", source, dest)
        assert code == 2 and ("overlaps SOURCE" in err or "must name" in err), (dest, err)
    with pytest.raises(fastkl.OptionError, match="overlaps SOURCE"):  # SOURCE given through the link
        fastkl.run(tmp_path / "to_src", src / "out")
    assert listing(tmp_path) == before


def test_writing_never_follows_a_planted_symlink(tmp_path, dataset):
    source, _, clean = dataset
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.parquet"
    victim.write_bytes(b"precious")
    (outside / "keep.txt").write_text("keep")
    before = listing(outside)

    # 1. an earlier, killed job's staging directory with links planted in it
    dest = tmp_path / "out"
    code, _ = cli("run", source, dest, *JOB, "--scheduler", "sync", fault=["kill-after:replace:6"])
    assert code == -signal.SIGKILL
    staging = staging_path(dest)
    os.remove(staging / "part-000002.parquet")
    (staging / "part-000002.parquet").symlink_to(victim)  # a finished part replaced by a link ...
    state = read_local(staging / "_state")[2]
    state["part_size"] = victim.stat().st_size  # ... that a forged state, logged last, vouches for
    (staging / "_state" / "states-000009.log").write_bytes(encode(state))
    (staging / "part-000007.parquet").symlink_to(victim)  # a part not yet written
    (staging / "evil").symlink_to(outside, target_is_directory=True)
    (staging / ".part-000008.parquet.x.tmp").symlink_to(victim)
    fastkl.run(source, dest, resume=True, **JOB_KW)
    assert _bytes_of_parts(dest) == _bytes_of_parts(clean) and listing(dest) == listing(clean)
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert victim.read_bytes() == b"precious" and listing(outside) == before

    # 2. DEST itself a link to another directory, replaced with --overwrite
    (tmp_path / "linked").symlink_to(clean, target_is_directory=True)
    clean_before = _bytes_of_parts(clean)
    fastkl.run(source, tmp_path / "linked", overwrite=True, measures=("entropy",))
    assert not (tmp_path / "linked").is_symlink() and _bytes_of_parts(clean) == clean_before

    # 3. an old DEST holding links to outside, replaced with --overwrite: links go, targets stay
    (dest / "link-to-victim").symlink_to(victim)
    (dest / "link-to-outside").symlink_to(outside, target_is_directory=True)
    fastkl.run(source, dest, overwrite=True, **JOB_KW)
    assert victim.read_bytes() == b"precious" and listing(outside) == before

    # 4. a staging directory or state directory that is a link is refused, nothing followed
    dest2 = tmp_path / "out2"
    staging_path(dest2).symlink_to(outside, target_is_directory=True)
    with pytest.raises(fastkl.OptionError, match="not a fastkl staging directory"):
        fastkl.run(source, dest2, resume=True, **JOB_KW)
    os.remove(staging_path(dest2))
    staging_path(dest2).mkdir()
    (staging_path(dest2) / "_state").symlink_to(outside, target_is_directory=True)
    with pytest.raises(fastkl.OptionError, match="not a fastkl staging directory"):
        fastkl.run(source, dest2, **JOB_KW)
    assert listing(outside) == before
