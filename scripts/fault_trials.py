#!/usr/bin/env python
"""Long fault-injection trials of fastkl jobs; prints a table of outcomes per kind.

    python scripts/fault_trials.py                      # everything (~10 min on 2 cores)
    python scripts/fault_trials.py --only fuzz --fuzz 400
    python scripts/fault_trials.py --kills 40 --workdir /tmp/fastkl-faults

Kinds (tests/test_faults.py runs a few of each in the test suite):

kills      `fastkl run` SIGKILLed at random moments (threads and processes
           schedulers): DEST must be absent or complete and identical to a
           clean run; `--resume` must finish it, identical (parts and
           summary), without rewriting any part whose logged state vouched
           for it (states batched as by default: about a second per batch).
steps      a SIGKILL just before / after every file-system step of a job
           (each os.replace, os.rename, rmtree of the commit protocol, each
           fsync of the state log, one state per batch), then --resume, same
           checks.
disk       a full disk (ENOSPC injected at each write step; a real EFBIG from
           RLIMIT_FSIZE at several sizes): exit 1 with one line, nothing
           partial in DEST, no temporaries left, --resume identical.
workers    a LocalCluster of two worker processes, one SIGKILLed at a random
           moment of the job: same output; a task that kills its worker every
           time: the job fails, naming file and row group, in bounded time.
fuzz       mutated Parquet and Arrow IPC files (bit flips, truncations,
           zeroed and inserted bytes, lying footers and page headers, bad IPC
           offsets) through the CLI: exit 0 or 1 only, one line naming the
           file, no crash, no hang; a run that succeeds is compared with the
           unmutated file's output.
hostile    hostile sizes, each in a subprocess watched by an RSS watchdog
           (kills the process tree above --rss-limit, default 4 GiB): peak RSS
           of the whole process tree, exit status and message.

Data is generated under --workdir (default: a temporary directory), never in git.
"""

from __future__ import annotations

import argparse
import collections
import copy
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path[:0] = [str(ROOT), str(TESTS)]  # the fastkl of this tree (not an installed one), and the tests' helpers
import parquet_surgery as surgery  # noqa: E402

PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]))


# --------------------------------------------------------------------------
# processes


def _tree(p):
    import psutil

    try:
        return [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def guarded(cmd, *, rss_limit: int = 4 << 30, env: dict | None = None, timeout: float = 600, cwd=None,
            preexec_fn=None) -> dict:
    """Run cmd; sample the RSS of its process tree every 10 ms; kill the tree above rss_limit or after timeout.

    Returns code, stderr, peak_rss (bytes, sum over the tree), killed (watchdog), timed_out, seconds.
    """
    import psutil

    e = dict(ENV, **(env or {}))
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=e, cwd=cwd, preexec_fn=preexec_fn)
        root = psutil.Process(proc.pid)
        peak, killed, timed_out = 0, False, False
        while proc.poll() is None:
            procs = _tree(root)
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
            over = rss > rss_limit
            late = time.perf_counter() - t0 > timeout
            if over or late:
                killed, timed_out = killed or over, timed_out or late
                for p in procs:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
            time.sleep(0.01)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    return {"code": proc.returncode, "stderr": stderr, "peak_rss": peak, "killed": killed,
            "timed_out": timed_out, "seconds": time.perf_counter() - t0}


def _one_line(stderr: str) -> str | None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if len(lines) == 1 and lines[0].startswith("fastkl: error: ") and "Traceback" not in stderr:
        return lines[0]
    return None


# --------------------------------------------------------------------------
# data


def make_dataset(root: Path, *, files: int, rows: int, k: int, group: int, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(files):
        p = rng.random((rows, k)) ** 3
        p /= p.sum(1, keepdims=True)
        q = rng.random((rows, k))
        q /= q.sum(1, keepdims=True)
        q[::97, 0] = 0.0  # some +inf KL
        q /= q.sum(1, keepdims=True)
        t = pa.table({
            "id": pa.array(np.arange(i * rows, (i + 1) * rows, dtype=np.int64)),
            "p": pa.FixedSizeListArray.from_arrays(pa.array(p.ravel()), k).cast(pa.list_(pa.float64())),
            "q": pa.FixedSizeListArray.from_arrays(pa.array(q.ravel().astype(np.float32)), k).cast(
                pa.large_list(pa.float32())),
        })
        pq.write_table(t, root / f"shard-{i:03d}.parquet", row_group_size=group)
    return root


def part_bytes(dest: Path) -> dict:
    return {n: (dest / n).read_bytes() for n in sorted(os.listdir(dest)) if n.endswith(".parquet")}


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def summary_of(dest: Path) -> dict:
    d = json.loads((dest / "_fastkl.json").read_text())["summary"]
    d.pop("timings", None), d.pop("dest", None)
    return d


def vouched(staging: Path) -> dict:
    """Finished parts (their states logged, fastkl.io.state_log): name -> (inode, mtime_ns)."""
    from fastkl.io.state_log import read_local

    out = {}
    st = staging / "_state"
    if staging.is_dir() and st.is_dir():
        for state in read_local(st).values():
            part = staging / f"part-{state['index']:06d}.parquet"
            if part.is_file():
                s = part.stat()
                out[part.name] = (s.st_ino, s.st_mtime_ns)
    return out


def staging_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".fastkl-staging")


class Clean:
    """The clean run of a job, to compare everything else with."""

    def __init__(self, source: Path, dest: Path, args: list[str]):
        self.source, self.args = source, args
        shutil.rmtree(dest, ignore_errors=True)
        r = guarded([PY, "-m", "fastkl.cli", "run", str(source), str(dest), *args])
        assert r["code"] == 0, r["stderr"]
        self.seconds = r["seconds"]
        self.parts = part_bytes(dest)
        self.summary = summary_of(dest)
        self.listing = listing(dest)

    def same(self, dest: Path) -> list[str]:
        problems = []
        if part_bytes(dest) != self.parts:
            problems.append("part files differ")
        if summary_of(dest) != self.summary:
            problems.append("summary differs")
        if listing(dest) != self.listing:
            problems.append(f"files differ: {sorted(set(listing(dest)) ^ set(self.listing))}")
        return problems


def check_after_fault(clean: Clean, dest: Path, scheduler_args: list[str], extra: list[str] = ()) -> tuple[str, list]:
    """State after a fault + resume: (state label, problems)."""
    problems = []
    if os.path.lexists(dest):
        problems += clean.same(dest)
        state = "complete"
        before = {}
    else:
        before = vouched(staging_of(dest))
        state = f"absent, {len(before)} parts finished" if os.path.lexists(staging_of(dest)) else "absent, no staging"
        if os.path.lexists(staging_of(dest)):
            tmps = [n for n in os.listdir(staging_of(dest)) if n.endswith(".tmp")]
            state += f", {len(tmps)} tmp" if tmps else ""
    r = guarded([PY, "-m", "fastkl.cli", "run", str(clean.source), str(dest), *clean.args, *scheduler_args,
                 "--resume", *extra], timeout=300)
    if r["code"] != 0:
        problems.append(f"resume failed: {r['stderr'].strip()[-300:]}")
        return state, problems
    problems += clean.same(dest)
    m = json.loads((dest / "_fastkl.json").read_text())
    resumed = {p["file"] for p in m["parts"] if p.get("resumed")}
    for name, (ino, mtime) in before.items():
        s = (dest / name).stat()
        if (s.st_ino, s.st_mtime_ns) != (ino, mtime):
            problems.append(f"{name} was redone")
        if name not in resumed:
            problems.append(f"{name} not marked resumed")
    if os.path.lexists(staging_of(dest)):
        problems.append("staging left after resume")
    return state, problems


# --------------------------------------------------------------------------
# kills


def kills(work: Path, n: int, seed: int) -> dict:
    import psutil

    src = make_dataset(work / "kill-src", files=6, rows=50000, k=64, group=5000)
    args = ["--measure", "kl", "--measure", "js", "--measure", "entropy", "--keep", "id", "--status", "-q"]
    clean = Clean(src, work / "kill-clean", args)
    # the run times the kills are drawn from: warm runs (the first one also filled caches)
    t_threads = Clean(src, work / "kill-timed", args).seconds
    t_procs = Clean(src, work / "kill-timed", args + ["--scheduler", "processes", "--workers", "2"]).seconds
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        sched = ["--scheduler", "processes", "--workers", "2"] if i % 3 == 2 else []
        dest = work / f"kill-{i}"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.rmtree(staging_of(dest), ignore_errors=True)
        t_run = t_procs if sched else t_threads
        delay = rnd.uniform(0.2, 1.0) * t_run  # mostly after the imports, while parts are written
        proc = subprocess.Popen([PY, "-m", "fastkl.cli", "run", str(src), str(dest), *args, *sched],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        time.sleep(delay)
        tree = _tree(psutil.Process(proc.pid))
        finished_first = proc.poll() is not None
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            finished_first = True
        proc.wait()
        t0 = time.time()
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree[1:]):
            if time.time() - t0 > 30:
                break
            time.sleep(0.05)
        orphans_s = time.time() - t0
        state, problems = check_after_fault(clean, dest, sched)
        if finished_first:
            state = "complete (finished before the kill)"
        rows.append({"trial": i, "scheduler": "processes" if sched else "threads", "delay_s": round(delay, 2),
                     "state": state, "orphans_gone_s": round(orphans_s, 2), "problems": problems})
        shutil.rmtree(dest, ignore_errors=True)
    return {"clean_seconds": clean.seconds, "run_seconds": {"threads": t_threads, "processes": t_procs},
            "trials": rows}


def steps(work: Path) -> dict:
    """A kill before and after each file-system step, sync scheduler (deterministic order)."""
    src = make_dataset(work / "steps-src", files=2, rows=600, k=16, group=100)
    args = ["--keep", "id", "--task-rows", "200", "-q", "--scheduler", "sync"]
    clean = Clean(src, work / "steps-clean", args)
    n_tasks = len(clean.parts)
    faults = []
    # os.replace: the job's mark, each part, the manifest; fsync: the state log's directory, then
    # each state (FASTKL_STATE_FLUSH_S=0: one batch per finished part, so every log write is a step)
    for op, count in (("replace", n_tasks + 2), ("fsync", n_tasks + 1), ("rename", 1), ("rmtree", 1),
                      ("write_batch", 2)):
        for i in range(1, count + 1):
            faults += [f"kill-before:{op}:{i}", f"kill-after:{op}:{i}"]
    rows = []
    for j, fault in enumerate(faults):
        dest = work / f"step-{j}"
        r = guarded([PY, str(TESTS / "faultinject.py"), fault, "--", "run", str(src), str(dest), *args],
                    env={"FASTKL_STATE_FLUSH_S": "0"})
        fired = r["code"] == -signal.SIGKILL
        state, problems = check_after_fault(clean, dest, [])
        rows.append({"fault": fault, "fired": fired, "state": state, "problems": problems})
        shutil.rmtree(dest, ignore_errors=True)
    # an overwrite killed between its two renames
    dest = work / "step-overwrite"
    guarded([PY, "-m", "fastkl.cli", "run", str(src), str(dest), "-q", "--measure", "tv"])
    r = guarded([PY, str(TESTS / "faultinject.py"), "kill-after:rename:1", "--", "run", str(src), str(dest),
                 *args, "--overwrite"])
    state, problems = check_after_fault(clean, dest, [], ["--overwrite"])
    rows.append({"fault": "overwrite: kill-after:rename:1", "fired": r["code"] == -signal.SIGKILL,
                 "state": state, "problems": problems})
    return {"tasks": n_tasks, "trials": rows}


def disk(work: Path) -> dict:
    src = make_dataset(work / "disk-src", files=2, rows=600, k=16, group=100)
    args = ["--keep", "id", "--task-rows", "200", "-q", "--scheduler", "sync"]
    clean = Clean(src, work / "disk-clean", args)
    n_tasks = len(clean.parts)
    rows = []

    def one(label, cmd, preexec=None, env=None):
        dest = Path(cmd[cmd.index("run") + 2])
        r = guarded(cmd, preexec_fn=preexec, env=env)
        line = _one_line(r["stderr"])
        problems = []
        if r["code"] != 1 or line is None:
            problems.append(f"exit {r['code']}: {r['stderr'].strip()[-300:]}")
        if os.path.lexists(dest):
            problems.append("DEST exists after the failure")
        st = staging_of(dest)
        if st.is_dir():
            tmps = [str(p) for p in st.rglob("*") if p.name.startswith(".")]
            if tmps:
                problems.append(f"temporaries left: {tmps}")
        state, more = check_after_fault(clean, dest, [])
        rows.append({"fault": label, "message": (line or "")[:110], "state": state, "problems": problems + more})
        shutil.rmtree(dest, ignore_errors=True)

    for op, count in (("write_batch", n_tasks), ("replace", n_tasks + 2), ("fsync", n_tasks + 1), ("rename", 1)):
        for i in range(1, count + 1):
            dest = work / f"disk-{op}-{i}"
            one(f"ENOSPC at {op} #{i}", [PY, str(TESTS / "faultinject.py"), f"fail:{op}:{i}:{errno.ENOSPC}", "--",
                                       "run", str(src), str(dest), *args], env={"FASTKL_STATE_FLUSH_S": "0"})

    def fsize(limit):
        def f():
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return f

    sizes = sorted(len(b) for b in clean.parts.values())
    for limit in (600, sizes[0] - 1, sizes[len(sizes) // 2] + 1, sizes[-1] - 1):
        dest = work / f"disk-fsize-{limit}"
        one(f"RLIMIT_FSIZE={limit} (EFBIG)", [PY, "-m", "fastkl.cli", "run", str(src), str(dest), *args],
            fsize(limit))
    return {"trials": rows}


# --------------------------------------------------------------------------
# workers


def workers(work: Path, n: int, seed: int) -> dict:
    import cloudpickle
    import psutil
    from distributed import Client, LocalCluster

    import fastkl
    import faultinject

    src = make_dataset(work / "workers-src", files=6, rows=20000, k=64, group=2000)
    kw = dict(measures=("kl", "js"), keep=("id",), task_rows=4000)
    clean_dest = work / "workers-clean"
    s_clean = fastkl.run(src, clean_dest, **kw)
    want = part_bytes(clean_dest)
    cloudpickle.register_pickle_by_value(faultinject)
    lc = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", silence_logs=50)
    client = Client(lc, set_as_default=False)
    rnd = random.Random(seed)
    rows = []
    try:
        t0 = time.perf_counter()
        fastkl.run(src, work / "workers-timed", scheduler=client, **kw)
        took = time.perf_counter() - t0
        def worker_pids():
            for _ in range(120):  # until the scheduler has noticed a death and the nanny replaced it
                try:
                    client.wait_for_workers(2, timeout=120)
                    pids = list(client.run(os.getpid).values())
                    if len(pids) == 2:
                        return pids
                except Exception:  # noqa: BLE001 - a worker that just died
                    pass
                time.sleep(0.5)
            raise RuntimeError("the cluster did not recover two workers")

        for i in range(n):
            pids = worker_pids()
            victim = rnd.choice(pids)
            delay = rnd.uniform(0.1, 0.8) * took
            killer = threading.Timer(delay, lambda: os.kill(victim, signal.SIGKILL))
            dest = work / f"workers-{i}"
            killer.start()
            t0 = time.perf_counter()
            problems = []
            try:
                s = fastkl.run(src, dest, scheduler=client, **kw)
                if part_bytes(dest) != want:
                    problems.append("parts differ")
                d1, d2 = s.to_dict(), s_clean.to_dict()
                for d in (d1, d2):
                    d.pop("timings"), d.pop("dest")
                if d1 != d2:
                    problems.append("summary differs")
            except Exception as e:  # noqa: BLE001
                problems.append(f"{type(e).__name__}: {e}")
            finally:
                killer.join()
            died = not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
            rows.append({"trial": i, "kill_at_s": round(delay, 2), "worker_died": died,
                         "seconds": round(time.perf_counter() - t0, 2), "problems": problems})
            shutil.rmtree(dest, ignore_errors=True)
        # a task that kills its worker on every attempt
        worker_pids()
        plugin = faultinject.KillTask("shard-003.parquet", 16, str(work), always=True)
        client.register_plugin(plugin)
        t0 = time.perf_counter()
        try:
            fastkl.run(src, work / "workers-always", scheduler=client, **kw)
            outcome, msg = "completed (wrong)", ""
        except fastkl.DataError as e:
            outcome, msg = "DataError", str(e)
        except Exception as e:  # noqa: BLE001
            outcome, msg = type(e).__name__, str(e)
        finally:
            client.unregister_worker_plugin(plugin.name)
        always = {"outcome": outcome, "message": msg, "seconds": round(time.perf_counter() - t0, 1),
                  "dest_exists": (work / "workers-always").exists()}
    finally:
        client.close()
        lc.close()
        cloudpickle.unregister_pickle_by_value(faultinject)
    return {"clean_seconds": took, "trials": rows, "always": always}


# --------------------------------------------------------------------------
# fuzz

FUZZ_OK = {"refused: unreadable or corrupt file", "refused: read error", "refused: invalid rows",
           "refused: schema mismatch", "refused: other (one line, names the file)",
           "ran: identical output", "ran: other values (no checksum to catch it)"}


def _bases(d: Path, rng) -> list[Path]:
    """Small good files of every flavour the mutations start from."""
    d.mkdir(parents=True, exist_ok=True)
    n, k = 60, 8
    p = rng.random((n, k))
    p /= p.sum(1, keepdims=True)
    q = rng.random((n, k))
    q /= q.sum(1, keepdims=True)

    def lists(x, t):
        return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), k).cast(t)

    t64 = pa.table({"id": pa.array(np.arange(n)), "p": lists(p, pa.list_(pa.float64())),
                    "q": lists(q, pa.large_list(pa.float64()))})
    t32 = pa.table({"id": pa.array(np.arange(n)), "p": lists(p.astype(np.float32), pa.list_(pa.float32())),
                    "q": lists(q.astype(np.float32), pa.list_(pa.float32()))})
    out = []
    for name, t, kw in [
        ("plain.parquet", t64, dict(compression="none", use_dictionary=False)),
        ("snappy.parquet", t64, dict(compression="snappy")),
        ("zstd32.parquet", t32, dict(compression="zstd")),
        ("crc.parquet", t64, dict(compression="none", write_page_checksum=True)),
        ("v2.parquet", t32, dict(compression="snappy", data_page_version="2.0", write_page_checksum=True)),
    ]:
        pq.write_table(t, d / name, row_group_size=20, **kw)
        out.append(d / name)
    for name, comp in (("plain.arrow", "uncompressed"), ("lz4.arrow", "lz4"), ("zstd.arrow", "zstd")):
        feather.write_feather(t64, d / name, compression=comp, chunksize=25)
        out.append(d / name)
    return out


def _mutate(raw: bytes, path: Path, rnd: random.Random) -> tuple[bytes, str]:
    b = bytearray(raw)
    kinds = ["flip", "flip", "truncate", "zero", "insert", "word", "word"]
    if path.suffix == ".parquet":
        kinds += ["footer", "footer", "page"]
    kind = rnd.choice(kinds)
    if kind == "flip":
        for _ in range(rnd.randint(1, 8)):
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
    elif kind == "truncate":
        b = b[: rnd.randrange(len(b))]
    elif kind == "zero":
        i = rnd.randrange(len(b))
        m = min(rnd.randint(1, 64), len(b) - i)
        b[i : i + m] = bytes(m)
    elif kind == "insert":
        i = rnd.randrange(len(b))
        b[i:i] = os.urandom(rnd.randint(1, 16))
    elif kind == "word":  # an aligned 4- or 8-byte word set to an extreme: offsets, lengths, sizes
        w = rnd.choice([4, 8])
        i = rnd.randrange(0, len(b) - w, w)
        v = rnd.choice([0, 1, -1, 2**31 - 1, -(2**31), 2**62, 10**9, len(b)])
        b[i : i + w] = (v % (1 << (8 * w))).to_bytes(w, "little")
    else:  # footer / page: a structured lie in a Thrift integer field
        try:
            md, data = surgery.read_footer(str(path))
            ints = []

            def walk(s, where):
                for f in s:
                    if f[1] in (surgery.I16, surgery.I32, surgery.I64):
                        ints.append((s, f))
                    elif f[1] == surgery.STRUCT:
                        walk(f[2], where)
                    elif f[1] == surgery.LIST and f[2][1] == surgery.STRUCT:
                        for x in f[2][2]:
                            walk(x, where)

            extremes = [0, -1, 1, 2**31 - 1, -(2**31), 2**40, 10**15]
            if kind == "page":
                rg = rnd.randrange(len(surgery.get_field(md, [4])[2]))
                col = rnd.randrange(3)
                pages = surgery.pages(data, md, rg, col)
                j = rnd.randrange(len(pages))
                h = copy.deepcopy(pages[j][1])
                walk(h, "page")
                s, f = rnd.choice(ints)
                f[2] = rnd.choice(extremes) if f[1] != surgery.I16 else rnd.choice([0, -1, 2**15 - 1])
                if f[1] == surgery.I32:
                    f[2] = max(-(2**31), min(2**31 - 1, f[2]))
                data = surgery.replace_page_header(data, md, rg, col, j, h)
                kind = "page header"
            else:
                walk(md, "footer")
                s, f = rnd.choice(ints)
                f[2] = rnd.choice(extremes)
                if f[1] == surgery.I32:
                    f[2] = max(-(2**31), min(2**31 - 1, f[2]))
                if f[1] == surgery.I16:
                    f[2] = max(-(2**15), min(2**15 - 1, f[2]))
            enc = surgery.write_struct(md)
            b = bytearray(data + enc + len(enc).to_bytes(4, "little") + b"PAR1")
        except Exception as e:  # noqa: BLE001 - fall back to a flip
            i = rnd.randrange(len(b))
            b[i] ^= 0xFF
            kind = f"flip (surgery failed: {type(e).__name__})"
    return bytes(b), kind


def _fuzz_child(list_file: str) -> None:
    """Run the CLI in this process on each (source, dest) of list_file; report JSON lines on stdout."""
    import contextlib

    from fastkl.cli import main

    cases = json.loads(Path(list_file).read_text())
    real_stdout = sys.stdout
    for case in cases:
        print(json.dumps({"start": case["name"]}), file=real_stdout, flush=True)
        err = io.StringIO()
        code = None
        fd_err = tempfile.TemporaryFile()
        saved = os.dup(2)
        os.dup2(fd_err.fileno(), 2)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    main(["run", case["source"], case["dest"], "--keep", "id", "-q"], prog_name="fastkl")
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException as e:  # noqa: BLE001 - anything escaping the CLI is a finding
                    code = f"escaped {type(e).__name__}: {e}"
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        fd_err.seek(0)
        native = fd_err.read().decode(errors="replace")
        print(json.dumps({"done": case["name"], "code": code, "stderr": err.getvalue() + native}),
              file=real_stdout, flush=True)


def fuzz(work: Path, n_files: int = 240, seed: int = 0, quiet: bool = False, timeout: float = 60) -> dict:
    """Mutate, run each mutant through the CLI (in a child process that is restarted after a crash)."""
    work = Path(work)
    rng = np.random.default_rng(seed)
    rnd = random.Random(seed)
    bases = _bases(work / "fuzz-bases", rng)
    cases = []
    for b in bases:  # the clean output of every base file
        cases.append({"name": f"clean-{b.name}", "source": str(b), "dest": str(work / f"fuzz-clean-{b.name}"),
                      "base": b.name, "kind": "clean"})
    mdir = work / "fuzz-mutants"
    mdir.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        b = bases[i % len(bases)]
        data, kind = _mutate(b.read_bytes(), b, rnd)
        m = mdir / f"m{i:04d}-{b.name}"
        m.write_bytes(data)
        cases.append({"name": m.name, "source": str(m), "dest": str(work / f"fuzz-out-{i:04d}"), "base": b.name,
                      "kind": kind})
    results: dict[str, dict] = {}
    todo = list(cases)
    while todo:
        lf = work / "fuzz-list.json"
        lf.write_text(json.dumps(todo))
        child = subprocess.Popen([PY, __file__, "_fuzz_child", str(lf)], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, env=ENV, text=True)
        current, started = None, time.time()
        lines: "collections.deque[str]" = collections.deque()

        def pump():
            for line in child.stdout:
                lines.append(line)

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        while True:
            while lines:
                msg = json.loads(lines.popleft())
                if "start" in msg:
                    current, started = msg["start"], time.time()
                else:
                    results[msg["done"]] = msg
                    current = None
            if child.poll() is not None:
                th.join(timeout=5)
                while lines:
                    msg = json.loads(lines.popleft())
                    if "done" in msg:
                        results[msg["done"]] = msg
                        current = None
                    elif "start" in msg:
                        current = msg["start"]
                if current is not None and current not in results:
                    results[current] = {"done": current, "code": f"crash (signal {-child.returncode})",
                                        "stderr": ""}
                break
            if current is not None and time.time() - started > timeout:
                child.kill()
                child.wait()
                results[current] = {"done": current, "code": "hang", "stderr": ""}
                break
            time.sleep(0.01)
        todo = [c for c in todo if c["name"] not in results]

    clean = {}
    for c in cases:
        if c["kind"] == "clean":
            r = results[c["name"]]
            assert r["code"] == 0, r
            clean[c["base"]] = Path(c["dest"])
    kinds: collections.Counter = collections.Counter()
    by_mutation: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    examples: dict[str, list] = collections.defaultdict(list)
    for c in cases:
        if c["kind"] == "clean":
            continue
        r = results[c["name"]]
        code, stderr = r["code"], r["stderr"]
        dest = Path(c["dest"])
        line = _one_line(stderr)
        if code == 0:
            if not dest.is_dir() or not (dest / "_fastkl.json").exists():
                outcome = "BAD: exit 0 without a complete DEST"
            else:
                got = _read_parts(dest)
                want = _read_parts(clean[c["base"]])
                if got.num_rows != want.num_rows:
                    outcome = "BAD: exit 0 with another number of rows"
                elif got.equals(want):
                    outcome = "ran: identical output"
                elif "crc" in c["base"] or "v2" in c["base"]:
                    outcome = "BAD: other values although the file has page checksums"
                else:
                    outcome = "ran: other values (no checksum to catch it)"
        elif code == 1 and line is not None and Path(c["source"]).name in line:
            if os.path.lexists(dest):
                outcome = "BAD: DEST written despite the error"
            elif "invalid row" in line:
                outcome = "refused: invalid rows"
            elif "cannot read" in line or "out of memory" in line or "read " in line and "rows from" in line:
                outcome = "refused: read error"
            elif "not a readable" in line or "corrupt Parquet footer" in line:
                outcome = "refused: unreadable or corrupt file"
            elif "type" in line or "no column" in line or "unknown" in line:
                outcome = "refused: schema mismatch"
            else:
                outcome = "refused: other (one line, names the file)"
        elif code == 2 and line is not None:
            outcome = "refused: schema mismatch" if "column" in line else "BAD: exit 2 (usage) for a data problem"
        elif isinstance(code, str) and code.startswith("crash"):
            outcome = "BAD: crash"
        elif code == "hang":
            outcome = "BAD: hang"
        elif code == 1:
            outcome = "BAD: error not one line naming the file"
        else:
            outcome = f"BAD: exit {code}"
        kinds[outcome] += 1
        by_mutation[c["kind"].split(" (")[0]][outcome] += 1
        if len(examples[outcome]) < 3:
            examples[outcome].append({"file": c["name"], "mutation": c["kind"], "code": code,
                                      "stderr": stderr.strip()[-300:]})
    if not quiet:
        print(f"fuzz: {n_files} mutated files", file=sys.stderr)
    return {"total": n_files, "kinds": dict(kinds), "by_mutation": {k: dict(v) for k, v in by_mutation.items()},
            "examples": dict(examples)}


def _read_parts(dest: Path) -> pa.Table:
    names = sorted(n for n in os.listdir(dest) if n.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(dest / n) for n in names])


# --------------------------------------------------------------------------
# hostile sizes


def hostile(work: Path, rss_limit: int) -> dict:
    d = work / "hostile"
    d.mkdir(parents=True, exist_ok=True)
    cases = []

    def big_row(name, n, compression="zstd"):
        path = d / name
        if not path.exists():
            v = pa.array(np.full(n, 1.0 / n))
            row = pa.ListArray.from_arrays(pa.array([0, n], pa.int32()), v)
            small = pa.array([[0.5, 0.5]] * 3, pa.list_(pa.float64()))
            col = pa.concat_arrays([small, row])
            pq.write_table(pa.table({"id": np.arange(4), "p": col, "q": col}), path, compression=compression)
            del v, row, col
        return path

    row1e8 = big_row("row-1e8.parquet", 100_000_000)
    # legitimate if huge: decoding 1.6 GB takes ~4 GB (the reader's buffers), more than the 4 GiB watchdog
    cases.append(("a row of 10^8 elements (p and q, 1.6 GB decoded), default cap", row1e8, {"watchdog": 6 << 30}))
    cases.append(("the same, FASTKL_MEMORY_LIMIT=2G", row1e8, {"FASTKL_MEMORY_LIMIT": "2G"}))
    bomb = big_row("bomb-2.5e8.parquet", 250_000_000)
    cases.append(("compressible bomb: a row of 2.5*10^8 equal floats (4 GB decoded)", bomb,
                  {"FASTKL_MEMORY_LIMIT": "3G"}))

    rng = np.random.default_rng(0)
    k, n = 16, 1000
    p = rng.random((n, k))
    p /= p.sum(1, keepdims=True)
    col = pa.FixedSizeListArray.from_arrays(pa.array(p.ravel()), k).cast(pa.list_(pa.float64()))
    base = d / "base.parquet"
    pq.write_table(pa.table({"id": np.arange(n), "p": col, "q": col}), base, row_group_size=250,
                   compression="zstd")

    def lie(name, edit):
        md, data = surgery.read_footer(str(base))
        data = edit(md, data) or data
        surgery.write_with_footer(str(d / name), data, md)
        return d / name

    def rows(md, data):
        surgery.set_field(md, [4, 1, 3], 10**15)
        surgery.set_field(md, [3], 10**15 + 750)

    def values(md, data):
        surgery.column_meta(md, 1, 1).set(5, 10**15)

    def usize(md, data):
        for g in range(4):
            for c in range(3):
                surgery.column_meta(md, g, c).set(6, 2**62)

    def page_size(md, data):
        pg = surgery.pages(data, md, 1, 1)
        h = pg[-1][1]
        h.set(2, 2**31 - 1)
        return surgery.replace_page_header(data, md, 1, 1, len(pg) - 1, h)

    def page_values(md, data):
        pg = surgery.pages(data, md, 1, 1)
        h = pg[-1][1]
        h.get(5).set(1, 2**31 - 1)
        return surgery.replace_page_header(data, md, 1, 1, len(pg) - 1, h)

    cases.append(("footer: a row group declaring 10^15 rows", lie("rows.parquet", rows), {}))
    cases.append(("footer: a column chunk declaring 10^15 values", lie("values.parquet", values), {}))
    cases.append(("footer: uncompressed sizes of 2^62 bytes", lie("usize.parquet", usize), {}))
    cases.append(("page header: 2^31-1 bytes uncompressed", lie("page-size.parquet", page_size), {}))
    cases.append(("page header: 2^31-1 values", lie("page-values.parquet", page_values), {}))

    many = d / "many-row-groups.parquet"
    if not many.exists():
        pq.write_table(pa.table({"id": np.arange(200_000), "p": pa.array([[1.0]] * 200_000),
                                 "q": pa.array([[1.0]] * 200_000)}), many, row_group_size=2)
    cases.append(("100,000 row groups of 2 rows", many, {}))

    ipc_bomb = d / "bomb.arrow"
    if not ipc_bomb.exists():
        m = 100_000_000
        v = pa.array(np.zeros(m))
        row = pa.ListArray.from_arrays(pa.array([0, m], pa.int32()), v)
        feather.write_feather(pa.table({"id": [0], "p": row, "q": row}), ipc_bomb, compression="zstd")
        del v, row
    cases.append(("Arrow IPC zstd bomb: 10^8 zeros per side (1.6 GB decoded)", ipc_bomb,
                  {"FASTKL_MEMORY_LIMIT": "2G"}))

    rows_out = []
    for label, path, env in cases:
        env = dict(env)
        watchdog = env.pop("watchdog", rss_limit)
        dest = work / f"hostile-out-{path.stem}"
        shutil.rmtree(dest, ignore_errors=True)
        for sched in ([], ["--scheduler", "processes", "--workers", "2"]):
            shutil.rmtree(dest, ignore_errors=True)
            r = guarded([PY, "-m", "fastkl.cli", "run", str(path), str(dest), "-q", *sched], rss_limit=watchdog,
                        env=env, timeout=300)
            line = _one_line(r["stderr"])
            rows_out.append({
                "case": label, "file_bytes": path.stat().st_size, "scheduler": "processes" if sched else "threads",
                "env": " ".join(f"{k}={v}" for k, v in env.items()), "code": r["code"],
                "peak_rss_mib": round(r["peak_rss"] / 2**20), "watchdog_mib": watchdog >> 20,
                "watchdog_killed": r["killed"],
                "timed_out": r["timed_out"], "seconds": round(r["seconds"], 1),
                "message": (line or r["stderr"].strip()[-200:])[:160],
            })
            shutil.rmtree(dest, ignore_errors=True)
            if path == many:
                break  # the processes run adds nothing here
    return {"rss_limit_mib": rss_limit >> 20, "cases": rows_out}


# --------------------------------------------------------------------------


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols] if rows else [len(c) for c in cols]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    out.append("  ".join("-" * w for w in widths))
    for r in rows:
        out.append("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="where to generate data (default: a temporary directory)")
    ap.add_argument("--only", action="append", choices=["kills", "steps", "disk", "workers", "fuzz", "hostile"])
    ap.add_argument("--kills", type=int, default=24, help="random SIGKILL trials (>= 20)")
    ap.add_argument("--workers", type=int, default=6, help="random worker-kill trials")
    ap.add_argument("--fuzz", type=int, default=240, help="mutated files (>= 200)")
    ap.add_argument("--rss-limit", type=float, default=4.0, help="watchdog limit for hostile sizes, GiB")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write all results to this file")
    a = ap.parse_args(argv)
    kinds = a.only or ["steps", "disk", "kills", "workers", "fuzz", "hostile"]
    tmp = None
    if a.workdir is None:
        tmp = tempfile.mkdtemp(prefix="fastkl-faults-")
        work = Path(tmp)
    else:
        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    bad = 0
    t_all = time.perf_counter()
    try:
        for kind in kinds:
            t0 = time.perf_counter()
            print(f"== {kind}", flush=True)
            if kind == "kills":
                r = kills(work, a.kills, a.seed)
                print(_table(r["trials"], ["trial", "scheduler", "delay_s", "state", "orphans_gone_s", "problems"]))
                states = collections.Counter(t["state"].split(",")[0] + ("" if "no staging" not in t["state"] else
                                                                         ", no staging") for t in r["trials"])
                print(f"kills: {len(r['trials'])} trials; DEST after the kill: {dict(states)}; "
                      f"with problems: {sum(bool(t['problems']) for t in r['trials'])}")
                bad += sum(bool(t["problems"]) for t in r["trials"])
            elif kind == "steps":
                r = steps(work)
                print(_table(r["trials"], ["fault", "fired", "state", "problems"]))
                print(f"steps: {len(r['trials'])} kill points ({r['tasks']} tasks); fired: "
                      f"{sum(t['fired'] for t in r['trials'])}; with problems: "
                      f"{sum(bool(t['problems']) for t in r['trials'])}")
                bad += sum(bool(t["problems"]) for t in r["trials"])
            elif kind == "disk":
                r = disk(work)
                print(_table(r["trials"], ["fault", "state", "message", "problems"]))
                print(f"disk: {len(r['trials'])} write failures; with problems: "
                      f"{sum(bool(t['problems']) for t in r['trials'])}")
                bad += sum(bool(t["problems"]) for t in r["trials"])
            elif kind == "workers":
                r = workers(work, a.workers, a.seed)
                print(_table(r["trials"], ["trial", "kill_at_s", "worker_died", "seconds", "problems"]))
                al = r["always"]
                print(f"always-killing task: {al['outcome']} after {al['seconds']} s, DEST exists: "
                      f"{al['dest_exists']}: {al['message']}")
                bad += sum(bool(t["problems"]) for t in r["trials"])
                bad += al["outcome"] != "DataError" or al["dest_exists"]
            elif kind == "fuzz":
                r = fuzz(work, a.fuzz, a.seed)
                print(_table([{"outcome": k, "files": v} for k, v in sorted(r["kinds"].items())],
                             ["outcome", "files"]))
                print("by mutation:")
                for m, c in sorted(r["by_mutation"].items()):
                    print(f"  {m:12s} {dict(c)}")
                for k, ex in r["examples"].items():
                    print(f"  e.g. {k}: {ex[0]['file']} ({ex[0]['mutation']}): {ex[0]['stderr'][:200]}")
                nbad = sum(v for k, v in r["kinds"].items() if k not in FUZZ_OK)
                print(f"fuzz: {r['total']} mutated files; not acceptable: {nbad}")
                bad += nbad
            elif kind == "hostile":
                r = hostile(work, int(a.rss_limit * 2**30))
                print(_table(r["cases"], ["case", "file_bytes", "scheduler", "env", "code", "peak_rss_mib",
                                          "watchdog_mib", "watchdog_killed", "seconds", "message"]))
                # exit 2: a usage error, e.g. a memory cap that leaves no room for a worker process
                nbad = sum(c["watchdog_killed"] or c["timed_out"] or c["code"] not in (0, 1, 2)
                           or (c["code"] == 2 and "FASTKL_MEMORY_LIMIT" not in c["message"]) for c in r["cases"])
                print(f"hostile: {len(r['cases'])} runs; peak RSS max {max(c['peak_rss_mib'] for c in r['cases'])} "
                      f"MiB (watchdog at {r['rss_limit_mib']} MiB); watchdog kills / hangs / crashes: {nbad}")
                bad += nbad
            r["seconds"] = round(time.perf_counter() - t0, 1)
            results[kind] = r
            print(f"   ({r['seconds']} s)\n", flush=True)
    finally:
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1, default=str))
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"total: {bad} problem(s) in {time.perf_counter() - t_all:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_fuzz_child":
        _fuzz_child(sys.argv[2])
    else:
        sys.exit(main())
