"""Jobs on object stores (SPEC §12): a real S3 API server on 127.0.0.1 (moto's server, tests/s3server.py).

Every request goes over HTTP through the clients fastkl uses against AWS
(pyarrow's S3 filesystem, boto3 for conditional writes), pointed at the
server by AWS_ENDPOINT_URL; nothing is mocked. Also memory:// (fsspec).
Covered: the happy path S3 -> S3 against the same job local -> local, an
existing DEST and --overwrite, two jobs racing (several trials), SIGKILL at
random moments then --resume or `fastkl clean`, PUTs failing transiently
(a proxy answering 503), a store ignoring conditional writes (refused at
start), and a LocalCluster whose workers share no directory with the client.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import fastkl
import s3server
from fastkl.io.store_output import CLAIM, MANIFEST, STAGING
from fastkl.io.stores import resolve
from test_faults import invoke
from test_jobs import read_dest, summary_stats, write_dataset

JOB = ("--keep", "id", "--measure", "kl", "--measure", "js", "-q")


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server for the whole session, and the environment pointing at it.
    (pip install 'fastkl[test]' installs moto[server]; without it these tests skip.)"""
    pytest.importorskip("moto.server")
    server, endpoint = s3server.start()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3server.environment(endpoint).items():
            mp.setenv(k, v)
        yield endpoint
    server.stop()


@pytest.fixture
def bucket(s3):
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3server.make_bucket(name)
    return name


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """A small hive-partitioned dataset on the local disk (3 files x 60 rows, row groups of 20)."""
    root = tmp_path_factory.mktemp("shards")
    _, table = write_dataset(str(root / "src"), "hive", np.random.default_rng(12), files=3, rows=60, group=20)
    return root / "src", table


def s3fs():
    return resolve("s3://x/y")[0].fs


def upload(local, bucket, prefix="shards"):
    pafs.copy_files(str(local), f"{bucket}/{prefix}", destination_filesystem=s3fs())
    return f"s3://{bucket}/{prefix}/"


def keys(bucket, prefix=""):
    sel = pafs.FileSelector(f"{bucket}/{prefix}".rstrip("/"), recursive=True, allow_not_found=True)
    return sorted(i.path[len(bucket) + 1:] for i in s3fs().get_file_info(sel) if i.type == pafs.FileType.File)


def visible(bucket, prefix):
    """What a dataset reader lists at DEST (names starting with _ or . skipped)."""
    return [k for k in keys(bucket, prefix) if not any(c.startswith(("_", ".")) for c in k.split("/")[1:])]


def read_store(bucket, prefix):
    names = sorted(k for k in visible(bucket, prefix) if k.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(f"{bucket}/{n}", filesystem=s3fs()) for n in names])


def pending_uploads(bucket):
    import boto3

    return boto3.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def local_reference(tmp_path, source, *args):
    dest = tmp_path / "local-out"
    code, err = invoke("run", source, dest, *JOB, *args)
    assert code == 0, err
    names = sorted(n for n in os.listdir(dest) if n.endswith(".parquet"))
    table = pa.concat_tables([pq.read_table(dest / n) for n in names])
    return table, json.loads((dest / "_fastkl.json").read_text()), names


def assert_clean(bucket, prefix, probes=True):
    """Nothing left besides the output: no staging, no claim, no probe, no pending upload.
    (probes=False: a job killed while probing leaves its probe for a minute, see drop_stale_probes.)"""
    left = [k for k in keys(bucket, prefix) if STAGING in k or CLAIM in k or (probes and "probe" in k)]
    assert not left, left
    assert not pending_uploads(bucket)


# --------------------------------------------------------------------------
# happy path


def test_s3_to_s3_equals_local_to_local(tmp_path, shards, bucket):
    local, table = shards
    src = upload(local, bucket)
    ref, ref_manifest, ref_names = local_reference(tmp_path, local, "--task-rows", "25")
    seen = []  # what a reader lists at DEST while the job runs, and whether the commit had started
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            # what a reader lists first, then whether the commit had started: its record exists from before
            # the first copy until the manifest does, so a part listed means one of them is listed after it
            shown = visible(bucket, "out")
            seen.append((shown, any(k.endswith(("_commit.json", MANIFEST)) for k in keys(bucket, "out"))))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        code, err = invoke("run", src, f"s3://{bucket}/out", *JOB, "--task-rows", "25")
    finally:
        stop.set()
        watcher.join()
    assert code == 0, err
    assert len(seen) > 3 and not [v for v, committing in seen if v and not committing], seen
    assert visible(bucket, "out") == [f"out/{n}" for n in ref_names]
    assert read_store(bucket, "out").equals(ref)
    m = json.loads(s3fs().open_input_stream(f"{bucket}/out/{MANIFEST}").read())
    assert m["summary"]["rows"] == table.num_rows == ref_manifest["summary"]["rows"]
    for k in ("kl", "js"):
        assert m["summary"]["measures"][k] == ref_manifest["summary"]["measures"][k]
    assert m["inputs"][0]["path"].startswith(f"s3://{bucket}/shards/")
    assert [p["rows"] for p in m["parts"]] == [p["rows"] for p in ref_manifest["parts"]]
    assert_clean(bucket, "out")
    # a reader of the store sees the dataset (pyarrow.dataset skips the manifest)
    assert pads.dataset(f"{bucket}/out", filesystem=s3fs(), format="parquet").count_rows() == table.num_rows


def test_a_large_manifest_on_a_store_keeps_its_parts_in_tables(tmp_path, shards, bucket, monkeypatch):
    """Above MANIFEST_INLINE parts a store DEST gets the Parquet tables too, copied beside its manifest;
    an --overwrite with an inline manifest removes them."""
    import fastkl.jobs.run as job
    from fastkl.io import manifest_tables as mt

    local, _ = shards
    src = upload(local, bucket)
    ref, ref_manifest, ref_names = local_reference(tmp_path, local, "--task-rows", "10")
    monkeypatch.setattr(job, "MANIFEST_INLINE", 3)
    dest = f"s3://{bucket}/out"
    fastkl.run(src, dest, keep=("id",), measures=("kl", "js"), task_rows=10, quiet=True)
    m = json.loads(s3fs().open_input_stream(f"{bucket}/out/{MANIFEST}").read())
    assert m["parts"] == {"table": mt.PARTS_TABLE, "count": len(ref_names)}
    parts = mt.read_parts(dest, m)
    assert parts.column("file").to_pylist() == ref_names == mt.part_files(m)
    assert parts.column("rows").to_pylist() == [p["rows"] for p in ref_manifest["parts"]]
    assert mt.read_inputs(dest, m).column("path").to_pylist() == [f["path"] for f in m_inputs(src)]
    # the ETags planned from (what every read was pinned to), as an inline manifest lists them
    etags = mt.read_inputs(dest, m, columns=["etag"]).column("etag").to_pylist()
    assert etags == [f["etag"] for f in m_inputs(src)] and all(etags)
    assert visible(bucket, "out") == [f"out/{n}" for n in ref_names] and read_store(bucket, "out").equals(ref)
    assert_clean(bucket, "out")
    monkeypatch.setattr(job, "MANIFEST_INLINE", 10_000)
    fastkl.run(src, dest, keep=("id",), measures=("kl", "js"), task_rows=10, quiet=True, overwrite=True)
    assert not [k for k in keys(bucket, "out") if "_fastkl_" in k and k.endswith(".parquet")]


def m_inputs(src):
    """The inputs a job of `src` lists (an inline manifest's form)."""
    from fastkl.io.sources import scan

    return [f.to_dict() for f in scan(src, p="p", q="q", keep=("id",))[0].files]


def test_globs_and_single_objects_read_the_same_files(tmp_path, shards, bucket):
    local, _ = shards
    src = upload(local, bucket)
    s1 = fastkl.run(src, f"s3://{bucket}/a", keep=("id",), quiet=True)
    s2 = fastkl.run(f"s3://{bucket}/shards/**/*.parquet", f"s3://{bucket}/b", keep=("id",), quiet=True)
    assert summary_stats(s1) == summary_stats(s2)
    one = [k for k in keys(bucket, "shards") if k.endswith(".parquet")][0]
    s3_ = fastkl.run(f"s3://{bucket}/{one}", f"s3://{bucket}/c", keep=("id",), quiet=True)
    assert s3_.rows == pq.read_metadata(f"{bucket}/{one}", filesystem=s3fs()).num_rows
    # an output is never read as input, a missing prefix is a usage error
    with pytest.raises(fastkl.OptionError, match="does not exist"):
        fastkl.run(f"s3://{bucket}/nothing/", f"s3://{bucket}/d", quiet=True)
    with pytest.raises(fastkl.OptionError, match="overlaps SOURCE"):
        fastkl.run(src, f"s3://{bucket}/shards/out", quiet=True)


def test_arrow_ipc_files_and_streams_on_a_store(tmp_path, bucket):
    """IPC files (footer, record batches split into tasks) and streams are read with range reads."""
    src_dir, table = write_dataset(str(tmp_path / "mixed"), "mixed", np.random.default_rng(5), files=4, rows=30)
    with pa.OSFile(str(tmp_path / "mixed" / "stream.arrow"), "wb") as sink:  # an IPC stream (no footer)
        with pa.ipc.new_stream(sink, table.schema) as w:
            for b in table.slice(0, 25).to_batches(max_chunksize=10):
                w.write_batch(b)
    src = upload(src_dir, bucket, "mixed")
    ref, _, _ = local_reference(tmp_path, src_dir, "--task-rows", "7")
    code, err = invoke("run", src, f"s3://{bucket}/out", *JOB, "--task-rows", "7")
    assert code == 0, err
    assert read_store(bucket, "out").equals(ref)
    m = json.loads(s3fs().open_input_stream(f"{bucket}/out/{MANIFEST}").read())
    assert {f["format"] for f in m["inputs"]} == {"parquet", "ipc", "ipc_stream"}


def test_memory_store(tmp_path, shards):
    local, table = shards
    fs = resolve("memory://x")[0].fs
    pafs.copy_files(str(local), "/mem-src", destination_filesystem=fs)
    ref, _, names = local_reference(tmp_path, local)
    code, err = invoke("run", "memory://mem-src/", "memory://mem-out", *JOB)
    assert code == 0, err
    got = pa.concat_tables([pq.read_table(f"/mem-out/{n}", filesystem=fs) for n in names])
    assert got.equals(ref)
    code, err = invoke("run", "memory://mem-src/", "memory://mem-out", *JOB)
    assert code == 2 and "already exists" in err
    left = [i.path for i in fs.get_file_info(pafs.FileSelector("/mem-out", recursive=True))]
    assert not [p for p in left if STAGING in p or CLAIM in p], left
    code, err = invoke("run", "memory://mem-src/", "memory://mem-2", *JOB, "--scheduler", "processes")
    assert code == 2 and "memory:// lives in this process only" in err, err


# --------------------------------------------------------------------------
# existing DEST, --overwrite


def test_existing_dest_needs_overwrite_and_overwrite_replaces_it(tmp_path, shards, bucket):
    local, _ = shards
    src = upload(local, bucket)
    dest = f"s3://{bucket}/out"
    assert invoke("run", src, dest, *JOB, "--task-rows", "10")[0] == 0
    before = visible(bucket, "out")
    code, err = invoke("run", src, dest, *JOB)
    assert code == 2 and "already exists" in err and "--overwrite" in err, err
    assert visible(bucket, "out") == before
    code, err = invoke("run", src, dest, *JOB, "--overwrite", "--base", "2")  # fewer, larger parts
    assert code == 0, err
    ref, _, names = local_reference(tmp_path, local, "--base", "2")
    assert visible(bucket, "out") == [f"out/{n}" for n in names] and len(names) < len(before)
    assert read_store(bucket, "out").equals(ref)
    assert_clean(bucket, "out")
    # a prefix holding other objects is never a fastkl output
    s3fs().open_output_stream(f"{bucket}/foreign/data.csv").close()
    code, err = invoke("run", src, f"s3://{bucket}/foreign", *JOB, "--overwrite")
    assert code == 2 and "not a fastkl output" in err, err


# --------------------------------------------------------------------------
# two jobs for one DEST


def test_two_racing_jobs_exactly_one_commits(shards, bucket):
    local, table = shards
    src = upload(local, bucket)
    outcomes = []
    for trial in range(6):
        dest = f"s3://{bucket}/race{trial}"
        results: dict[int, object] = {}
        gate = threading.Barrier(2)

        def job(i):
            gate.wait()
            try:
                results[i] = fastkl.run(src, dest, keep=("id",), quiet=True, task_rows=30)
            except fastkl.FastKLError as e:
                results[i] = e

        threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [r for r in results.values() if isinstance(r, fastkl.Summary)]
        lost = [r for r in results.values() if not isinstance(r, fastkl.Summary)]
        assert len(won) == 1 and len(lost) == 1, results
        assert isinstance(lost[0], fastkl.DestTakenError) or "already exists" in str(lost[0]), lost[0]
        if isinstance(lost[0], fastkl.DestTakenError):
            assert f"pid {os.getpid()}" in str(lost[0])  # names the winner
        outcomes.append(type(lost[0]).__name__)
        assert read_store(bucket, f"race{trial}").num_rows == table.num_rows
        assert_clean(bucket, f"race{trial}")
    print("race outcomes of the losers:", outcomes)


def test_the_loser_of_a_race_exits_1_naming_the_winner(shards, bucket):
    local, _ = shards
    src = upload(local, bucket)
    dest = f"s3://{bucket}/out"
    procs = [subprocess.Popen([sys.executable, "-m", "fastkl.cli", "run", src, dest, *JOB, "--task-rows", "5"],
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    res = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in res)
    # 1 if they met; 2 "already exists" if the loser took DEST only after the winner had committed (never 0:
    # an identical output committed meanwhile is not this job's, unless it was asked to --resume)
    assert codes in ([0, 1], [0, 2]), res
    err = next(e for c, e in res if c != 0)
    winner = next(p for p, (c, _) in zip(procs, res) if c == 0)
    assert (("taken by another fastkl job" in err and f"pid {winner.pid}" in err) if codes == [0, 1]
            else "already exists" in err), err


def test_a_store_without_conditional_writes_is_refused(shards, bucket, s3):
    local, _ = shards
    src = upload(local, bucket)
    proxy = s3server.FaultProxy(s3)
    proxy.strip_conditions = True
    try:
        opt = ("--storage-option", f"endpoint_url={proxy.url}")
        code, err = invoke("run", src, f"s3://{bucket}/out", *JOB, *opt)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and "does not support conditional writes" in err, err
        assert "--last-writer-wins" in err and not visible(bucket, "out")
        code, err = invoke("run", src, f"s3://{bucket}/out", *JOB, *opt, "--last-writer-wins")
        assert code == 0 and "last writer wins" in err, err
        assert read_store(bucket, "out").num_rows == shards[1].num_rows
    finally:
        proxy.close()


# --------------------------------------------------------------------------
# kills and resume


def _start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "fastkl.cli", "run", *args], stderr=subprocess.PIPE,
                            text=True, env=env)


def test_sigkill_at_random_moments_then_resume(tmp_path, shards, bucket):
    """A job killed at a random moment leaves nothing visible at DEST unless its commit had
    started; --resume (or `fastkl clean` then a run) gives the clean run's output, and nothing
    staged is left after."""
    local, _ = shards
    src = upload(local, bucket)
    ref, _, names = local_reference(tmp_path, local, "--task-rows", "5", "--workers", "1")
    args = ("--task-rows", "5", "--workers", "1", *JOB)
    t0 = time.perf_counter()
    assert _start([src, f"s3://{bucket}/timing", *args]).wait(timeout=120) == 0
    full = time.perf_counter() - t0
    rnd = random.Random(1234)
    env = dict(os.environ, FASTKL_CLAIM_STALE_S="2")
    seen = []
    for trial in range(3):
        prefix = f"kill{trial}"
        dest = f"s3://{bucket}/{prefix}"
        p = _start([src, dest, *args], env)
        time.sleep(rnd.uniform(0.5, 0.9 * full))
        p.send_signal(signal.SIGKILL)
        p.wait()
        staged = [k for k in keys(bucket, prefix) if STAGING in k]
        shown = visible(bucket, prefix)
        committing = any(k.endswith("_commit.json") for k in staged)
        done = f"{prefix}/{MANIFEST}" in keys(bucket, prefix)
        assert not shown or committing or done, (shown, staged)
        seen.append("committed" if done else "committing" if committing else f"{len(staged)} staged")
        if trial == 2 and not done:
            code, err = invoke("clean", dest)
            assert code == 0, err
            assert not [k for k in keys(bucket, prefix) if STAGING in k or CLAIM in k]
            assert not pending_uploads(bucket)
            code, err = invoke("run", src, dest, *args)
        else:
            code, err = invoke("run", src, dest, *args, "--resume")
        assert code == 0, err
        assert visible(bucket, prefix) == [f"{prefix}/{n}" for n in names]
        assert read_store(bucket, prefix).equals(ref)
        assert_clean(bucket, prefix, probes=False)
    print("state at the kills:", seen)


@pytest.mark.parametrize("finish", ["resume", "clean"])
def test_sigkill_during_the_commit_then_resume_or_clean(tmp_path, shards, bucket, finish):
    """Killed once the commit record exists (the copies under way): --resume, or `fastkl clean`,
    finishes the commit from the record, recomputing nothing."""
    local, _ = shards
    src = upload(local, bucket)
    ref, _, names = local_reference(tmp_path, local, "--task-rows", "5")
    dest = f"s3://{bucket}/out"
    p = _start([src, dest, "--task-rows", "5", "--workers", "1", *JOB])
    while p.poll() is None and not any(k.endswith("_commit.json") for k in keys(bucket, "out")):
        time.sleep(0.003)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert MANIFEST not in [k.rsplit("/", 1)[1] for k in keys(bucket, "out")]
    if finish == "clean":
        from click.testing import CliRunner
        from fastkl.cli import main

        r = CliRunner().invoke(main, ["clean", dest], catch_exceptions=False)
        assert r.exit_code == 0 and "finished the commit of job" in r.stdout, (r.stdout, r.stderr)
    else:
        s = fastkl.run(src, dest, keep=("id",), measures=("kl", "js"), task_rows=5, workers=1, resume=True,
                       quiet=True)
        assert s.rows == shards[1].num_rows
    m = json.loads(s3fs().open_input_stream(f"{bucket}/out/{MANIFEST}").read())
    assert all(part["resumed"] for part in m["parts"]) or finish == "clean"  # nothing recomputed
    assert visible(bucket, "out") == [f"out/{n}" for n in names]
    assert read_store(bucket, "out").equals(ref)
    assert_clean(bucket, "out")


def logged_states(bucket, prefix) -> set[int]:
    """The parts whose states a job logged under its staging prefix (batch objects states-*.log)."""
    import io

    from fastkl.io.state_log import decode

    found = set()
    for k in keys(bucket, prefix):
        if k.rsplit("/", 1)[1].startswith("states-"):
            data = s3fs().open_input_stream(f"{bucket}/{k}").read()
            found |= {rec["index"] for _, _, rec in decode(io.BytesIO(data))}
    return found


def test_resume_reuses_the_staged_parts(shards, bucket):
    local, _ = shards
    src = upload(local, bucket)
    dest = f"s3://{bucket}/out"
    env = dict(os.environ, FASTKL_CLAIM_STALE_S="2", FASTKL_STATE_FLUSH_S="0")  # a batch object per state
    p = _start([src, dest, "--task-rows", "5", "--workers", "1", *JOB], env)
    deadline = time.time() + 60
    while time.time() < deadline and len(logged_states(bucket, "out")) < 4:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    staged = len(logged_states(bucket, "out"))
    assert staged >= 4
    s = fastkl.run(src, dest, keep=("id",), measures=("kl", "js"), task_rows=5, workers=1, resume=True,
                   quiet=True)
    m = json.loads(s3fs().open_input_stream(f"{bucket}/out/{MANIFEST}").read())
    assert sum(p["resumed"] for p in m["parts"]) >= staged - 1  # (one may be mid-commit of its state)
    assert s.rows == shards[1].num_rows


def test_the_last_states_are_logged_beside_the_commit_and_it_waits_for_them(shards, bucket, s3):
    """The states still waiting when the tasks end go in one batch PUT beside the commit's first round
    trips (claim refresh, commit record, old manifest): a batch that cannot be written stops the job
    before any copy, DEST stays absent, and --resume then finishes the job."""
    local, _ = shards
    src = upload(local, bucket)
    proxy = s3server.FaultProxy(s3)
    proxy.fail(lambda method, path: method == "PUT" and "/states-" in path, 1000)
    try:
        with pytest.raises(OSError, match="cannot log finished parts' states"):
            fastkl.run(src, f"s3://{bucket}/out", keep=("id",), task_rows=30, quiet=True,
                       storage_options={"endpoint_url": proxy.url,
                                        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2)})
    finally:
        proxy.close()
    assert proxy.failed > 0
    assert MANIFEST not in [k.rsplit("/", 1)[1] for k in keys(bucket, "out")] and not visible(bucket, "out")
    assert not logged_states(bucket, "out")
    s = fastkl.run(src, f"s3://{bucket}/out", keep=("id",), task_rows=30, quiet=True, resume=True)
    assert s.rows == shards[1].num_rows
    assert_clean(bucket, "out")


# --------------------------------------------------------------------------
# transient failures


def test_transient_put_failures_are_retried(tmp_path, shards, bucket, s3):
    local, _ = shards
    src = upload(local, bucket)
    ref, _, names = local_reference(tmp_path, local, "--task-rows", "30")
    proxy = s3server.FaultProxy(s3)
    # part uploads fail: the first more often than the S3 client retries one request (the task runs again)
    tries = 2  # attempts of one request by the S3 client (fastkl's default: S3_RETRIES)
    n = tries * 2 + 1
    proxy.fail(lambda method, path: method == "PUT" and STAGING in path and ".parquet" in path, n)
    try:
        s = fastkl.run(f"s3://{bucket}/shards/", f"s3://{bucket}/out", keep=("id",), measures=("kl", "js"),
                       task_rows=30, quiet=True, storage_options={
                           "endpoint_url": proxy.url,
                           "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=tries)})
    finally:
        proxy.close()
    assert proxy.failed == n
    assert s.rows == shards[1].num_rows
    assert visible(bucket, "out") == [f"out/{n}" for n in names]
    assert read_store(bucket, "out").equals(ref)
    assert_clean(bucket, "out")


# --------------------------------------------------------------------------
# a cluster that shares nothing


def _chdir_to_own_tmp(dask_worker=None):
    import tempfile

    d = tempfile.mkdtemp(prefix="fastkl-worker-")
    os.chdir(d)
    return d


def _job_with_a_worker_killed(client, src, bucket, ref, names) -> bool:
    """A worker SIGKILLed while parts are being uploaded: its tasks are redone elsewhere, and
    DEST gets exactly one copy of each part (the attempt named by its state)."""
    pids = client.run(os.getpid)
    victim = sorted(pids.values())[0]
    killed = []

    def kill_when_parts_start():
        deadline = time.time() + 60
        while time.time() < deadline:
            if sum(k.endswith(".parquet") and "part-" in k for k in keys(bucket, "killed")) >= 2:  # staged uploads
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
                return
            time.sleep(0.02)

    t = threading.Thread(target=kill_when_parts_start)
    t.start()
    s = fastkl.run(src, f"s3://{bucket}/killed", keep=("id",), measures=("kl", "js"), task_rows=5,
                   scheduler=client, quiet=True)
    t.join()
    ref5 = read_store(bucket, "killed")
    assert s.rows == ref.num_rows and ref5.num_rows == ref.num_rows
    assert ref5.select(["id", "kl", "js"]).equals(ref.select(["id", "kl", "js"]))
    assert len(visible(bucket, "killed")) == len(plan_parts(src, 5))
    assert_clean(bucket, "killed")
    return bool(killed)


def plan_parts(src, task_rows):
    from fastkl.io.sources import scan

    return scan(src, p="p", q="q", keep=("id",), task_rows=task_rows)[0].tasks


def test_local_cluster_workers_share_no_directory(tmp_path, shards, bucket, monkeypatch):
    from distributed import Client, LocalCluster

    local, _ = shards
    src = upload(local, bucket)
    ref, _, names = local_reference(tmp_path, local, "--task-rows", "20")
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    monkeypatch.chdir(client_dir)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster, set_as_default=False) as client:
        dirs = client.run(_chdir_to_own_tmp)
        assert len(set(dirs.values())) == 2 and str(client_dir) not in dirs.values()
        s = fastkl.run(src, f"s3://{bucket}/out", keep=("id",), measures=("kl", "js"), task_rows=20,
                       scheduler=client, quiet=True)
        worker_files = client.run(lambda: sorted(os.listdir(".")))
        killed = _job_with_a_worker_killed(client, src, bucket, ref, names)
    assert killed
    assert s.rows == shards[1].num_rows
    assert read_store(bucket, "out").equals(ref)
    assert visible(bucket, "out") == [f"out/{n}" for n in names]
    assert all(files == [] for files in worker_files.values()), worker_files  # nothing written locally
    assert os.listdir(client_dir) == []
    assert_clean(bucket, "out")


# --------------------------------------------------------------------------
# changing input


def _plain(rng, rows, first_id, k=256, row_group=10) -> bytes:
    """A Parquet file whose size and footer do not depend on its values (uncompressed, plain, no
    statistics), > 64 KiB so that a task reads it in more GETs than the one of its tail."""
    t = pa.table({"id": pa.array(np.arange(first_id, first_id + rows, dtype=np.int64)),
                  "p": pa.array(list(rng.dirichlet(np.ones(k), rows)), pa.list_(pa.float64())),
                  "q": pa.array(list(rng.dirichlet(np.ones(k), rows)), pa.list_(pa.float64()))})
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink, row_group_size=row_group, compression="none", use_dictionary=False,
                   write_statistics=False)
    return sink.getvalue().to_pybytes()


def put(bucket, key, data) -> str:
    """One PUT (boto3): the object's ETag, without its quotes."""
    import boto3

    return boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)["ETag"].strip('"')


def plain_shards(bucket, files=3, rows=40, seed=0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [put(bucket, f"src/shard-{i}.parquet", _plain(rng, rows, 1000 * i)) for i in range(files)]


@pytest.mark.parametrize("moment", ["before its task", "between its footer and its data"])
def test_an_object_replaced_while_the_job_runs_fails_it_naming_it(bucket, monkeypatch, moment):
    """Every GET of a task is pinned to the planned ETag (If-Match): an object replaced by one of
    the same size, footer and second fails the job with one line naming it, and nothing is
    committed. (Without If-Match the data GETs would read the new bytes into the old plan.) Between
    footer and data: the replacement comes once shard-1's first task has planned its chunk reads; with
    the ranges located at planning its footer pieces and chunks came in the same GETs, so that task
    reads the planned version whole and the next task's GET of shard-1 fails."""
    import fastkl.jobs.run as job
    from test_faults import one_line

    etags = plain_shards(bucket)
    newer = _plain(np.random.default_rng(99), 40, 1000)
    assert len(newer) == len(_plain(np.random.default_rng(0), 40, 1000))
    replaced = []

    def replace():
        if not replaced:
            replaced.append(put(bucket, "src/shard-1.parquet", newer))

    if moment == "before its task":
        real_task = job.run_task

        def hook(task, *a, **k):
            if task.file.display.endswith("shard-1.parquet"):
                replace()
            return real_task(task, *a, **k)

        monkeypatch.setattr(job, "run_task", hook)
    else:
        real_ranges = job.chunk_ranges

        def hook(md, groups, cols):
            if md.num_rows and len(replaced) == 0 and hook.calls == 4:  # shard-1's first task (4 per file)
                replace()
            hook.calls += 1
            return real_ranges(md, groups, cols)

        hook.calls = 0
        monkeypatch.setattr(job, "chunk_ranges", hook)
    code, err = invoke("run", f"s3://{bucket}/src/", f"s3://{bucket}/out", "--keep", "id", "--task-rows", "10",
                       "--scheduler", "sync", "-q")
    line = one_line(err)
    assert code == 1 and replaced
    assert (f"s3://{bucket}/src/shard-1.parquet: changed since the job started "
            f"(ETag {etags[1]} -> {replaced[0]})") in line, line
    assert visible(bucket, "out") == [] and MANIFEST not in " ".join(keys(bucket, "out"))


def _local_copy(tmp_path, bucket, files=3):
    """The bucket's src/shard-i.parquet objects copied to a local directory (the reference run's)."""
    local = tmp_path / "src"
    local.mkdir()
    for i in range(files):
        (local / f"shard-{i}.parquet").write_bytes(s3fs().open_input_stream(f"{bucket}/src/shard-{i}.parquet").read())
    return local


def _count_gets(monkeypatch) -> list[str]:
    """Every GET of a pinned reader from now on, as "tail" (a suffix GET) or "range"."""
    from fastkl.io.store_reads import Pinned

    gets: list[str] = []
    real_get = Pinned._get

    def counted(self, start, end=None, suffix=0):
        gets.append("tail" if suffix else "range")
        return real_get(self, start, end, suffix)

    monkeypatch.setattr(Pinned, "_get", counted)
    return gets


def test_a_task_fetches_its_footer_pieces_and_chunks_at_once_without_its_tail(tmp_path, bucket, monkeypatch):
    """Planning locates the column chunks of each row group (from the footer it reads anyway), so a
    task opens its object without a request and fetches its footer pieces and chunks in the same
    GETs: the only suffix GETs are planning's, one per object. Same output as local; and a task whose
    planned ranges are wrong (here: beyond the object) still reads right, by a GET more."""
    plain_shards(bucket)  # 4 row groups of 10 rows each
    fastkl.run(_local_copy(tmp_path, bucket), tmp_path / "ref", keep=("id",), task_rows=20, quiet=True)
    ref = read_dest(tmp_path / "ref")
    gets = _count_gets(monkeypatch)
    fastkl.run(f"s3://{bucket}/src/", f"s3://{bucket}/out", keep=("id",), task_rows=20, quiet=True)
    assert read_store(bucket, "out").equals(ref)
    # 3 objects x 2 tasks: a task's footer pieces and its 2 row groups' chunks lie within 1 MiB: one GET
    assert gets.count("tail") == 3 and gets.count("range") == 6, gets

    gets.clear()
    from fastkl.io import plan_columns

    real = plan_columns.Files.unit

    def misplaced(self, i, g, offset=0, end=None):
        u = real(self, i, g, offset, end)
        return dataclasses.replace(u, chunks=tuple((1 << 40, (1 << 40) + 8) for _ in u.chunks)) if u.chunks else u

    monkeypatch.setattr(plan_columns.Files, "unit", misplaced)
    fastkl.run(f"s3://{bucket}/src/", f"s3://{bucket}/out", keep=("id",), task_rows=20, quiet=True, overwrite=True)
    assert read_store(bucket, "out").equals(ref)
    assert gets.count("tail") == 3 and gets.count("range") == 12, gets


def test_a_task_of_a_single_row_group_object_makes_no_tail_get(tmp_path, bucket, monkeypatch):
    """Most shards hold one row group: planning locates its footer and chunks too, so its task's
    only request is one range GET (before: a GET of the tail, then one of the chunks)."""
    rng = np.random.default_rng(0)
    for i in range(3):
        put(bucket, f"src/shard-{i}.parquet", _plain(rng, 40, 1000 * i, row_group=40))
    fastkl.run(_local_copy(tmp_path, bucket), tmp_path / "ref", keep=("id",), quiet=True)
    gets = _count_gets(monkeypatch)
    fastkl.run(f"s3://{bucket}/src/", f"s3://{bucket}/out", keep=("id",), quiet=True)
    assert read_store(bucket, "out").equals(read_dest(tmp_path / "ref"))
    assert gets.count("tail") == 3 and gets.count("range") == 3, gets  # planning's tails; a GET per task


def stop_store_clock(mp):
    """Stop the clock of the (in-process) moto server: objects written now get one Last-Modified,
    as two writes within one second do on S3 (its mtimes are to the second)."""
    import datetime

    mp.setattr("moto.s3.models.utcnow", lambda: datetime.datetime(2026, 1, 2, 3, 4, 5))


def test_resume_redoes_the_parts_of_an_object_replaced_since(tmp_path, bucket, monkeypatch):
    """--resume after a replacement that keeps size, footer and mtime: only the ETag tells. The
    replaced file's parts are redone, the others reused; the output is that of the new data."""
    from test_jobs import interrupt_at_task

    with monkeypatch.context() as frozen:
        stop_store_clock(frozen)
        etags = plain_shards(bucket)
        restore = interrupt_at_task(monkeypatch, 7)  # tasks 0-5 (shard-0, half of shard-1) staged
        src, dest = f"s3://{bucket}/src/", f"s3://{bucket}/out"
        opts = dict(keep=("id",), task_rows=10, scheduler="sync", quiet=True)
        with pytest.raises(KeyboardInterrupt):
            fastkl.run(src, dest, **opts)
        restore()
        newer = _plain(np.random.default_rng(99), 40, 0)
        assert put(bucket, "src/shard-0.parquet", newer) != etags[0]
    s = fastkl.run(src, dest, resume=True, **opts)
    m = json.loads(s3fs().open_input_stream(f"{bucket}/out/{MANIFEST}").read())
    assert [p["resumed"] for p in m["parts"]] == [False] * 4 + [True] * 2 + [False] * 6
    local = tmp_path / "src"
    local.mkdir()
    for i in range(3):
        (local / f"shard-{i}.parquet").write_bytes(s3fs().open_input_stream(f"{bucket}/src/shard-{i}.parquet").read())
    ref = fastkl.run(local, tmp_path / "ref", keep=("id",), task_rows=10, quiet=True)
    assert read_store(bucket, "out").equals(read_dest(tmp_path / "ref"))
    assert s.rows == ref.rows == 120
    assert_clean(bucket, "out")


def test_a_server_ignoring_if_match_still_shows_the_replacement(bucket, s3):
    """A server that drops If-Match (the proxy strips it) serves the new version: the ETag of its
    answer differs from the pinned one, and the read fails the same way."""
    from fastkl.io.store_reads import ObjectChanged, open_pinned

    etags = plain_shards(bucket, files=1)
    proxy = s3server.FaultProxy(s3)
    proxy.strip_conditions = True
    try:
        store, path = resolve(f"s3://{bucket}/src/shard-0.parquet", {"endpoint_url": proxy.url})
        f = open_pinned(store, path, etags[0])
        new = put(bucket, "src/shard-0.parquet", _plain(np.random.default_rng(5), 40, 0))
        with pytest.raises(ObjectChanged, match=f"ETag {etags[0]} -> {new}"):
            f.read_at(1000, 0)
    finally:
        proxy.close()


def test_large_tasks_stream_through_pinned_reads_and_large_parts_go_multipart(tmp_path, bucket, monkeypatch):
    """Tasks above the pre-fetch bound read through on-demand pinned GETs; a part above S3Upload.PART
    goes up as a multipart upload (S3's smallest part, 5 MiB, here): same output as local."""
    import fastkl.jobs.run as job
    from fastkl.io.store_conditional import S3Upload, conditional

    plain_shards(bucket)  # > 64 KiB each: a task reads more than the tail its open fetched
    local = tmp_path / "src"
    local.mkdir()
    for i in range(3):
        (local / f"shard-{i}.parquet").write_bytes(s3fs().open_input_stream(f"{bucket}/src/shard-{i}.parquet").read())
    fastkl.run(local, tmp_path / "ref", keep=("id",), task_rows=20, quiet=True)
    monkeypatch.setattr(job, "STORE_PREBUFFER_MAX", 0)
    fastkl.run(f"s3://{bucket}/src/", f"s3://{bucket}/out", keep=("id",), task_rows=20, quiet=True)
    assert read_store(bucket, "out").equals(read_dest(tmp_path / "ref"))
    monkeypatch.setattr(S3Upload, "PART", 5 << 20)
    data = np.random.default_rng(1).bytes(12 << 20)
    up = conditional(resolve(f"s3://{bucket}/x")[0]).open_upload(f"{bucket}/big/blob")
    for i in range(0, len(data), 1 << 20):
        up.write(data[i:i + (1 << 20)])
    assert keys(bucket, "big") == [] and len(pending_uploads(bucket)) == 1  # invisible until closed
    up.close()
    assert s3fs().open_input_stream(f"{bucket}/big/blob").read() == data and not pending_uploads(bucket)
    up = conditional(resolve(f"s3://{bucket}/x")[0]).open_upload(f"{bucket}/big/dropped")
    up.write(data)
    up.abort()
    assert keys(bucket, "big") == ["big/blob"] and not pending_uploads(bucket)


def test_an_object_rewritten_after_planning_is_refused(shards, bucket):
    """A task reads the planned version only: another version (even of the same size) is refused
    naming both ETags, a removed one too; the same bytes uploaded again the same way have the
    same ETag and are read (an ETag names bytes: S3's is their MD5, or that of its parts)."""
    from fastkl.io.sources import scan
    from fastkl.jobs.run import _open_planned

    local, table = shards
    src = upload(local, bucket)
    plan, _ = scan(src, p="p", q="q", keep=("id",))
    f = plan.tasks[0].file
    assert f.store is not None and f.display.startswith("s3://") and f.etag
    _open_planned(f).close()  # unchanged: fine
    original = s3fs().open_input_stream(f.path).read()
    first = pq.read_table(f.path, filesystem=s3fs())
    bucket_, key = f.path.split("/", 1)
    new = put(bucket_, key, pq_bytes(first.slice(0, first.num_rows - 1)))  # rewritten, smaller
    with pytest.raises(fastkl.DataError, match=rf"changed since the job started \(ETag {f.etag} -> {new}\)"):
        _open_planned(f)
    s3fs().delete_file(f.path)
    with pytest.raises(fastkl.DataError, match=r"changed since the job started \(removed\)"):
        _open_planned(f)
    with s3fs().open_output_stream(f.path) as out:  # the same bytes by the same client: the same ETag
        out.write(original)
    _open_planned(f).close()


def pq_bytes(table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_clean_a_local_dest_left_by_a_killed_job(tmp_path, shards):
    local, _ = shards
    dest = tmp_path / "out"
    p = _start([str(local), str(dest), "--task-rows", "3", "--workers", "1", *JOB])
    staging = tmp_path / "out.fastkl-staging"
    deadline = time.time() + 60
    while time.time() < deadline and not list(staging.glob("part-*.parquet")):
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    if dest.exists():
        pytest.skip("the job finished before the kill")
    assert staging.exists()
    code, err = invoke("clean", dest)
    assert code == 0, err
    assert not staging.exists() and not dest.exists()
    code, err = invoke("clean", dest)
    assert code == 0


# --------------------------------------------------------------------------
# resolving URLs and options (no server)


def test_storage_options_and_environment(monkeypatch):
    import pickle

    from fastkl.io.stores import is_store_url, parse_storage_options, s3_arguments

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    args = s3_arguments({})
    assert (args["endpoint_override"], args["scheme"], args["region"]) == ("127.0.0.1:9", "http", "eu-west-3")
    args = s3_arguments({"client_kwargs": {"endpoint_url": "https://minio:9000/"}, "key": "k", "secret": "s",
                         "region": "us-east-2"})
    assert (args["endpoint_override"], args["scheme"], args["access_key"], args["secret_key"], args["region"]) == (
        "minio:9000", "https", "k", "s", "us-east-2")
    store, path = resolve("s3://bucket/a/b/", {"client_kwargs": {"endpoint_url": "http://h:1"}})
    assert path == "bucket/a/b" and pickle.loads(pickle.dumps(store)) == store
    assert store.option_dict() == {"client_kwargs": {"endpoint_url": "http://h:1"}}
    assert parse_storage_options(["endpoint_url=http://h:1", "anonymous=true", "retries=3"]) == {
        "endpoint_url": "http://h:1", "anonymous": True, "retries": 3}
    with pytest.raises(fastkl.OptionError, match="KEY=VALUE"):
        parse_storage_options(["novalue"])
    assert [is_store_url(u) for u in ("s3://b/k", "file:///x", "/x", "memory://m")] == [True, False, False, True]
    from fastkl.io.store_output import store_dest

    with pytest.raises(fastkl.OptionError, match="whole bucket"):
        store_dest("s3://bucket/", None)


def test_clean_aborts_pending_uploads_and_refuses_a_live_job(shards, bucket):
    import boto3

    from click.testing import CliRunner
    from fastkl.cli import main

    c = boto3.client("s3")
    c.create_multipart_upload(Bucket=bucket, Key=f"out/{STAGING}/deadjob/part-000000.abc.parquet")
    s3fs().open_output_stream(f"{bucket}/out/{STAGING}/deadjob/part-000001.abc.parquet").close()
    r = CliRunner().invoke(main, ["clean", f"s3://{bucket}/out"], catch_exceptions=False)
    assert r.exit_code == 0 and "removed the staged parts of 1 job(s), aborted 1 pending upload(s)" in r.stdout, r.stdout
    assert not pending_uploads(bucket) and not keys(bucket, "out")
    # a live job's claim: clean refuses (exit 1) naming it
    from fastkl.io.store_output import StoreClaim, store_dest

    src = upload(shards[0], bucket)
    with StoreClaim.acquire(store_dest(f"s3://{bucket}/out", None), "x"):
        r = CliRunner().invoke(main, ["clean", f"s3://{bucket}/out"], catch_exceptions=False)
        assert r.exit_code == 1 and f"pid {os.getpid()}" in r.stderr, r.stderr
        for flags in ({"resume": True}, {"overwrite": True}):  # --resume and --overwrite obey the claim too
            with pytest.raises(fastkl.DestTakenError, match="taken by another fastkl job"):
                fastkl.run(src, f"s3://{bucket}/out", quiet=True, **flags)


def test_a_job_whose_claim_was_taken_does_not_commit(shards, bucket):
    """Someone replaced the claim while the job ran (an operator, a job that judged it stale):
    the job finds out at its commit (If-Match on its ETag fails) and commits nothing."""
    src = upload(shards[0], bucket)
    failed = []

    def job():
        try:
            fastkl.run(src, f"s3://{bucket}/out", quiet=True, task_rows=3, workers=1)
        except fastkl.FastKLError as e:
            failed.append(e)

    t = threading.Thread(target=job)
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and not any("part-" in k and k.endswith(".parquet") for k in keys(bucket, "out")):
        time.sleep(0.01)
    with s3fs().open_output_stream(f"{bucket}/out/{CLAIM}") as f:
        f.write(json.dumps({"pid": 1, "host": "elsewhere", "job_id": "intruder", "token": "x"}).encode())
    t.join()
    assert len(failed) == 1 and isinstance(failed[0], fastkl.DestTakenError), failed
    assert "intruder" in str(failed[0]) and "not committing" in str(failed[0])
    assert MANIFEST not in [k.rsplit("/", 1)[1] for k in keys(bucket, "out")] and not visible(bucket, "out")


def test_a_claim_names_its_job_and_its_release_leaves_a_claim_taken_over(bucket):
    """A new job's id is in the claim from its creation (no second PUT); the release is one delete
    If-Match the ETag the job last wrote, so a claim another job took over meanwhile stays, and the
    probe that ran before the claim leaves nothing."""
    from fastkl.io.store_conditional import conditional
    from fastkl.io.store_output import StoreClaim, store_dest

    d = store_dest(f"s3://{bucket}/out", None)
    cond = conditional(d.store)
    mine = StoreClaim.acquire(d, "x", job_id="j1")
    assert json.loads(cond.read(d.key(CLAIM)).data)["job_id"] == "j1"
    # another job takes it over (as if this one had looked dead) before this one's next refresh
    assert cond.replace(d.key(CLAIM), json.dumps({"job_id": "other"}).encode(), mine._etag) is not None
    mine.release()
    assert json.loads(cond.read(d.key(CLAIM)).data)["job_id"] == "other"
    cond.delete(d.key(CLAIM))
    with StoreClaim.acquire(d, "x", job_id="j2"):
        pass
    assert keys(bucket, "out") == []


def test_a_failed_store_job_says_where_its_parts_are_kept(tmp_path, bucket):
    from test_jobs import _with_bad_row

    src_dir, _ = write_dataset(str(tmp_path / "bad"), "parquet", np.random.default_rng(3), files=3, rows=30)
    p = pq.read_table(os.path.join(src_dir, "shard-01.parquet")).column("p").to_pylist()
    _with_bad_row(src_dir, row=max(i for i, r in enumerate(p) if r))  # late in shard-01: shard-00 finishes first
    src = upload(src_dir, bucket, "bad")
    code, err = invoke("run", src, f"s3://{bucket}/out", *JOB, "--task-rows", "9", "--workers", "1")
    assert code == 1 and "invalid row" in err, err
    assert f"finished parts kept in s3://{bucket}/out/_fastkl-staging/ for --resume" in err, err
    assert not visible(bucket, "out") and CLAIM not in " ".join(keys(bucket, "out"))
