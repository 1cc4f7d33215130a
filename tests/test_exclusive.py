"""DEST is exclusive and only fastkl's (SPEC §5-§6, issue 9 items 1, 6, 7, 8).

1. Two real `fastkl run` processes for one DEST, started together: exactly one
   commits, the other exits 1 naming the first; the committed parts all match
   the manifest's options (recomputed); no temporary anywhere; a job held
   mid-run with SIGSTOP keeps DEST against plain, --resume and --overwrite
   jobs; a SIGKILLed job's lock blocks nobody; --resume never adopts another
   job's parts, and a part that another process renamed into the staging
   directory is never committed.
2. --overwrite replaces only a fastkl output; a forgotten DEST is named.
3. --summary-json never lands on an input, in DEST or beside it.
4. URLs: never local paths (stores: tests/test_stores.py), file:// names a local path.
5. --overwrite whose old output cannot be removed: committed, one warning line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastkl
from fastkl.io.output import MANIFEST, lock_path, staging_path
from test_faults import cli, finished_parts, invoke, one_line
from test_jobs import read_dest, write_dataset

HERE = Path(__file__).resolve().parent
JOB = ["--keep", "id", "--task-rows", "6", "-q"]  # 2 shards of 40 and 45 rows, row groups of 9: 10 parts


def _env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), e.get("PYTHONPATH", "")])
    e.setdefault("FASTKL_STATE_FLUSH_S", "0")  # each finished part's state logged at once
    return e


def start(*args, stop_after_parts: int | None = None) -> subprocess.Popen:
    """`fastkl ...` in a new process; with stop_after_parts=n it SIGSTOPs itself once n parts are finished."""
    if stop_after_parts is None:
        cmd = [sys.executable, "-m", "fastkl.cli", *map(str, args)]
    else:
        cmd = [sys.executable, "-c", _STOPPER, str(stop_after_parts), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


# Stops the job right after its n-th finished part (part in place, its state logged, the
# lock held): a job caught mid-run, deterministically, for the others to meet.
_STOPPER = """
import os, signal, sys
import fastkl.io.state_log as log
real, n, count = log.FinishedParts.add, int(sys.argv[1]), [0]
def add(self, *a, **k):
    real(self, *a, **k)
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGSTOP)
log.FinishedParts.add = add
from fastkl.cli import main
main(sys.argv[2:], prog_name="fastkl")
"""


def wait_stopped(proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.02)
    raise AssertionError("the job did not stop")


def kill_after_parts(n: int, *args) -> None:
    """Run `fastkl *args`, SIGKILL it once n parts are finished (it holds the lock then)."""
    job = start(*args, stop_after_parts=n)
    wait_stopped(job)
    job.kill()
    job.wait()


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.fixture
def data(tmp_path, rng):
    source, table = write_dataset(str(tmp_path / "src"), "parquet", rng, files=2)
    return source, table


def check_against_manifest(dest: Path, table) -> dict:
    """Every row of DEST holds what its manifest's options give for that input row (recomputed)."""
    manifest = json.loads((dest / MANIFEST).read_text())
    base = manifest["options"]["base"]
    out = read_dest(dest)
    assert out.column("id").to_pylist() == table.column("id").to_pylist()
    want = fastkl.kl(table.column("p"), table.column("q"), base=base)
    got = out.column("kl").to_numpy(zero_copy_only=False)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok], want[ok]), f"rows computed with other options than base {base}"
    return manifest


def no_temporaries(root: Path) -> None:
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def taken_line(err: str, holder: subprocess.Popen, dest) -> str:
    line = one_line(err)
    assert f"DEST {str(dest)!r} is taken by another fastkl job (pid {holder.pid} on host " \
           f"{socket.gethostname()}, started " in line, line
    return line


# --------------------------------------------------------------------------
# 1. exclusive DEST


def test_two_jobs_at_once_never_mix(tmp_path, data):
    source, table = data
    taken = 0
    for trial in range(5):
        dest = tmp_path / f"out{trial}"
        jobs = {"base2": start("run", source, dest, *JOB, "--base", "2"), "nats": start("run", source, dest, *JOB)}
        done = {name: finish(proc) for name, proc in jobs.items()}
        winners = [name for name, (code, _) in done.items() if code == 0]
        assert len(winners) == 1, done
        (loser,) = set(done) - set(winners)
        code, err = done[loser]
        if code == 1:  # they met: the loser names the winner
            taken_line(err, jobs[winners[0]], dest)
            taken += 1
        else:  # the loser came after the winner's commit
            assert code == 2 and "already exists" in one_line(err), done
        manifest = check_against_manifest(dest, table)
        assert manifest["options"]["base"] == (2.0 if winners == ["base2"] else np.e)
        assert len(manifest["parts"]) == 10
        assert not os.path.lexists(staging_path(dest)) and not os.path.lexists(lock_path(dest))
    no_temporaries(tmp_path)
    print(f"{taken} of 5 trials met at the lock")


@pytest.mark.parametrize("flags", [(), ("--resume",), ("--overwrite",)], ids=["plain", "resume", "overwrite"])
def test_a_running_job_keeps_dest(tmp_path, data, flags):
    source, table = data
    dest = tmp_path / "out"
    holder = start("run", source, dest, *JOB, "--base", "2", "--scheduler", "sync", stop_after_parts=4)
    try:
        wait_stopped(holder)
        before = finished_parts(staging_path(dest))
        assert len(before) == 4
        code, err = finish(start("run", source, dest, *JOB, *flags))
        assert code == 1, err
        taken_line(err, holder, dest)
        assert "--resume" not in err  # the staging place is the other job's
        assert finished_parts(staging_path(dest)) == before  # its staging directory untouched
    finally:
        holder.send_signal(signal.SIGCONT)
    code, err = finish(holder)
    assert code == 0, err
    assert check_against_manifest(dest, table)["options"]["base"] == 2.0
    no_temporaries(tmp_path)
    assert not os.path.lexists(lock_path(dest))


def test_stale_lock_of_a_killed_job_blocks_nobody(tmp_path, data):
    source, table = data
    dest = tmp_path / "out"
    kill_after_parts(4, "run", source, dest, *JOB, "--base", "2", "--scheduler", "sync")
    assert lock_path(dest).exists()  # left behind, unlocked
    before = finished_parts(staging_path(dest))
    code, err = invoke("run", source, dest, *JOB, "--base", "2", "--resume")
    assert code == 0, err
    manifest = check_against_manifest(dest, table)
    assert sorted(p["file"] for p in manifest["parts"] if p["resumed"]) == sorted(before)
    for name, (ino, mtime) in before.items():
        s = (dest / name).stat()
        assert (s.st_ino, s.st_mtime_ns) == (ino, mtime), f"{name} was redone"
    assert not os.path.lexists(lock_path(dest))
    # a killed job's lock does not block a new job either
    dest2 = tmp_path / "out2"
    kill_after_parts(2, "run", source, dest2, *JOB, "--scheduler", "sync")
    code, err = invoke("run", source, dest2, *JOB, "--overwrite")
    assert code == 0, err
    check_against_manifest(dest2, table)
    no_temporaries(tmp_path)


def test_a_killed_jobs_lock_does_not_block_a_glob_beside_it(tmp_path, data):
    """`fastkl run 'data/*' data/out`: the glob matches the lock file a killed job left; it is no input."""
    source, table = data
    dest = Path(source) / "out"
    kill_after_parts(2, "run", str(Path(source) / "*.parquet"), dest, *JOB, "--scheduler", "sync")
    assert lock_path(dest).exists()
    os.rename(staging_path(dest), tmp_path / "moved-away")  # (a glob matching staging is another item)
    code, err = invoke("run", str(Path(source) / "*"), dest, *JOB)
    assert code == 0, err
    check_against_manifest(dest, table)


def test_resume_never_adopts_another_jobs_parts(tmp_path, data):
    """A killed base-2 job's parts are not reused by a nats job's --resume, whatever their size."""
    source, table = data
    dest = tmp_path / "out"
    kill_after_parts(5, "run", source, dest, *JOB, "--base", "2", "--scheduler", "sync")
    assert len(finished_parts(staging_path(dest))) == 5
    code, err = invoke("run", source, dest, *JOB, "--resume")
    assert code == 0, err
    manifest = check_against_manifest(dest, table)
    assert manifest["options"]["base"] == np.e
    assert not any(p["resumed"] for p in manifest["parts"])


def test_a_part_renamed_in_by_another_process_is_never_committed(tmp_path, data):
    """The size of a part does not vouch for it: a part of another job (same size, other
    values) renamed over one of this job's finished parts stops the commit, and --resume redoes it."""
    source, table = data
    other = tmp_path / "other"
    assert invoke("run", source, other, *JOB)[0] == 0  # the same parts in nats
    dest = tmp_path / "out"
    job = start("run", source, dest, *JOB, "--base", "2", "--scheduler", "sync", stop_after_parts=3)
    try:
        wait_stopped(job)
        staging = staging_path(dest)
        assert (other / "part-000001.parquet").stat().st_size == (staging / "part-000001.parquet").stat().st_size
        tmp = staging / "intruder"
        tmp.write_bytes((other / "part-000001.parquet").read_bytes())
        os.replace(tmp, staging / "part-000001.parquet")
    finally:
        job.send_signal(signal.SIGCONT)
    code, err = finish(job)
    assert code == 1, err
    assert "part-000001.parquet" in one_line(err) and "not the part this job wrote" in err
    assert not os.path.lexists(dest)
    code, err = invoke("run", source, dest, *JOB, "--base", "2", "--resume")
    assert code == 0, err
    manifest = check_against_manifest(dest, table)
    resumed = {p["file"] for p in manifest["parts"] if p["resumed"]}
    assert resumed == {p["file"] for p in manifest["parts"]} - {"part-000001.parquet"}  # part 1 was redone
    no_temporaries(tmp_path)


def test_lock_file_removed_while_running_stops_the_commit(tmp_path, data):
    source, _ = data
    dest = tmp_path / "out"
    job = start("run", source, dest, *JOB, "--scheduler", "sync", stop_after_parts=2)
    try:
        wait_stopped(job)
        os.remove(lock_path(dest))
    finally:
        job.send_signal(signal.SIGCONT)
    code, err = finish(job)
    assert code == 1 and "was removed or replaced while this job ran" in one_line(err), err
    assert not os.path.lexists(dest)


def test_a_planted_lock_that_is_not_a_file_is_refused(tmp_path, data):
    source, _ = data
    dest = tmp_path / "out"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    lock_path(dest).symlink_to(victim)
    with pytest.raises(fastkl.OptionError, match="not a fastkl lock file"):
        fastkl.run(source, dest)
    assert victim.read_text() == "precious" and not os.path.lexists(dest)


# --------------------------------------------------------------------------
# 2. --overwrite replaces only a fastkl output; a forgotten DEST


def test_overwrite_never_replaces_a_file(tmp_path, data):
    source, _ = data
    a, b = Path(source) / "shard-00.parquet", Path(source) / "shard-01.parquet"
    kept = b.read_bytes()
    for flags in ((), ("--overwrite",), ("--resume",)):
        code, err = invoke("run", a, b, *flags)
        line = one_line(err)
        assert code == 2 and "is not a fastkl output (a file)" in line and "--overwrite" not in line, err
        assert b.read_bytes() == kept
    link = tmp_path / "link"
    link.symlink_to(b)
    code, err = invoke("run", a, link, "--overwrite")
    assert code == 2 and "not a fastkl output" in one_line(err)
    assert link.is_symlink() and b.read_bytes() == kept


def test_missing_dest_is_named(tmp_path, data):
    source, _ = data
    code, err = invoke("run", Path(source) / "shard-00.parquet")
    assert code == 2 and "DEST is missing" in one_line(err), err
    code, err = invoke("run")
    assert code == 2 and "DEST are missing" in one_line(err), err


# --------------------------------------------------------------------------
# 3. --summary-json


def test_summary_json_never_lands_on_input_or_dest(tmp_path, data):
    source, _ = data
    src = Path(source)
    dest = tmp_path / "out"
    shard = src / "shard-00.parquet"
    kept = shard.read_bytes()
    cases = [
        (source, shard, "input"),  # an input file, inside the SOURCE directory
        (shard, shard, "input"),  # the SOURCE file itself
        (str(src / "*.parquet"), shard, "input"),  # an input file matched by a glob
        (source, src / "summary.json", "inside SOURCE"),
        (source, dest, "inside DEST"),
        (source, dest / "summary.json", "inside DEST"),
        (source, staging_path(dest) / "summary.json", "inside DEST"),
        (source, lock_path(dest), "inside DEST"),
        (source, tmp_path / "no" / "such" / "dir.json", "does not exist"),
    ]
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(src))
    for s, path, needle in cases:
        code, err = invoke("run", s, dest, "-q", "--summary-json", path)
        assert code == 2 and needle in one_line(err), (s, path, err)
        assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(src))) == before, (s, path)
    assert shard.read_bytes() == kept
    # an existing DEST with --overwrite: still refused before any work, the old output intact
    assert invoke("run", source, dest, "-q")[0] == 0
    old = sorted(os.listdir(dest))
    code, err = invoke("run", source, dest, "-q", "--overwrite", "--summary-json", dest / "summary.json")
    assert code == 2 and "inside DEST" in one_line(err)
    assert sorted(os.listdir(dest)) == old
    code, err = invoke("run", source, dest, "-q", "--overwrite", "--summary-json", tmp_path / "summary.json")
    assert code == 0, err
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == 85


# --------------------------------------------------------------------------
# 4. URLs


def test_urls_never_become_local_paths(tmp_path, data, monkeypatch):
    """Store URLs go to the store layer (tests/test_stores.py); an unknown protocol is a usage
    error, and nothing is ever written locally as ./s3:/bucket/out."""
    source, _ = data
    monkeypatch.chdir(tmp_path)  # where `s3://bucket/out` used to be written, as ./s3:/bucket/out
    before = sorted(os.listdir(tmp_path))
    url = "nosuchproto://bucket/out"
    code, err = invoke("run", source, url)
    assert code == 2 and "unknown storage protocol nosuchproto://" in one_line(err), err
    code, err = invoke("run", url, "out")
    assert code == 2 and "unknown storage protocol nosuchproto://" in one_line(err), err
    for side in ("s3://bucket/summary.json", "memory://x/summary.json"):
        with pytest.raises(fastkl.OptionError, match="not supported yet"):
            fastkl.run(source, "out", summary_json=side)
    assert sorted(os.listdir(tmp_path)) == before


def test_file_urls_name_local_paths(tmp_path, data):
    source, table = data
    dest = tmp_path / "my out"
    code, err = invoke("run", f"file://{source}", "file://" + str(dest).replace(" ", "%20"), *JOB)
    assert code == 0, err
    assert read_dest(dest).column("id").to_pylist() == table.column("id").to_pylist()
    assert not (Path.cwd() / "file:").exists()
    code, err = invoke("run", source, "file://elsewhere/out")
    assert code == 2 and "file:///path" in one_line(err)


# --------------------------------------------------------------------------
# 5. an overwrite whose old output cannot be removed


def test_overwrite_that_cannot_remove_the_old_output(tmp_path, data):
    source, table = data
    dest = tmp_path / "out"
    assert invoke("run", source, dest, *JOB, "--base", "2")[0] == 0
    # rmtree #1 drops the state directory, #2 the old output: it fails (EACCES)
    code, err = cli("run", source, dest, *JOB, "--overwrite", fault=["fail:rmtree:2:13"])
    assert code == 0, err
    line = [ln for ln in err.splitlines() if ln.strip()]
    assert len(line) == 1 and line[0].startswith("fastkl: warning: "), err
    assert "is complete" in line[0] and "out.fastkl-old" in line[0] and "Permission denied" in line[0]
    assert check_against_manifest(dest, table)["options"]["base"] == np.e  # the new output
    assert (tmp_path / "out.fastkl-old" / MANIFEST).exists()
    # the next overwrite removes what was left
    assert invoke("run", source, dest, *JOB, "--overwrite", "--base", "2")[0] == 0
    assert not os.path.lexists(tmp_path / "out.fastkl-old")
    assert check_against_manifest(dest, table)["options"]["base"] == 2.0
