#!/usr/bin/env python
"""Kill and race trials of S3 jobs on moto's server (issue 12); prints the outcomes.

    python scripts/store_trials.py --kills 20 --races 10

kills: `fastkl run s3://.../shards/ s3://.../kN` in a fresh process, SIGKILLed
after a random delay (0 .. the length of a whole run, so some land before
the claim, during the tasks, during the commit or after it). Then: what a
reader lists at DEST must be nothing unless the commit had started (its
record or the manifest exists); `fastkl run --resume` must exit 0 with the
clean run's output, byte for byte per part, and nothing staged, claimed or
pending afterwards.
races: two `fastkl run` processes started together for one DEST: exactly
one must exit 0, the other 1 naming the winner (or 2 "already exists" if it
started after the winner committed), and DEST must be the clean output.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# the fastkl of this tree, here and in the processes started from here (not an installed one)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
import s3server  # noqa: E402

JOB = ["--keep", "id", "--measure", "kl", "--measure", "js", "-q", "--task-rows", "5", "--workers", "1"]


def fastkl(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "fastkl.cli", "run", *args], stderr=subprocess.PIPE,
                            text=True, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--races", type=int, default=10)
    ap.add_argument("--commit-kills", type=int, default=10,
                    help="kills aimed at the commit: 0-40 ms after its record appears")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    server, endpoint = s3server.start_process()
    os.environ.update(s3server.environment(endpoint))
    import numpy as np
    import pyarrow.fs as pafs

    from fastkl.io.stores import resolve
    from test_jobs import write_dataset

    fs = resolve("s3://x/y")[0].fs
    work = tempfile.mkdtemp(prefix="fastkl-store-trials-")
    write_dataset(os.path.join(work, "src"), "hive", np.random.default_rng(1), files=3, rows=60, group=20)
    s3server.make_bucket("trials")
    pafs.copy_files(os.path.join(work, "src"), "trials/shards", destination_filesystem=fs)
    src = "s3://trials/shards/"

    def objects(prefix):
        sel = pafs.FileSelector(f"trials/{prefix}", recursive=True, allow_not_found=True)
        return sorted(i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File)

    def parts(prefix):
        return {p.rsplit("/", 1)[1]: fs.open_input_stream(p).read() for p in objects(prefix)
                if "/_" not in p[len(f"trials/{prefix}"):] and p.endswith(".parquet")}

    t0 = time.perf_counter()
    assert fastkl(src, "s3://trials/ref", *JOB).wait() == 0
    full = time.perf_counter() - t0
    ref = parts("ref")
    rnd = random.Random(a.seed)
    env = dict(os.environ, FASTKL_CLAIM_STALE_S="2")
    kills: collections.Counter = collections.Counter()
    bad = []
    for i in range(a.kills + a.commit_kills):
        prefix = f"k{i}"
        p = fastkl(src, f"s3://trials/{prefix}", *JOB, env=env)
        if i < a.kills:
            time.sleep(rnd.uniform(0, full))
        else:
            while p.poll() is None and not any(n.endswith("_commit.json") for n in objects(prefix)):
                time.sleep(0.005)
            time.sleep(rnd.uniform(0, 0.04))
        p.send_signal(signal.SIGKILL)
        p.wait()
        names = objects(prefix)
        committing = any(n.endswith(("_commit.json", "_fastkl.json")) for n in names)
        shown = [n for n in names if "/_" not in n[len(f"trials/{prefix}"):]]
        state = ("after the commit" if any(n.endswith("/_fastkl.json") for n in names) else
                 "during the commit" if committing else
                 "during the tasks" if any("_fastkl-staging" in n for n in names) else "before any part")
        kills[state] += 1
        if shown and state == "during the commit":
            kills["(of which with parts already copied)"] += 1
        if shown and not committing:
            bad.append((prefix, "visible before the commit", shown))
        r = fastkl(src, f"s3://trials/{prefix}", *JOB, "--resume")
        code, err = r.wait(), r.stderr.read()
        left = [n for n in objects(prefix) if "_fastkl-staging" in n or "_fastkl-claim" in n]
        if code != 0 or parts(prefix) != ref or left:
            bad.append((prefix, code, err.strip(), left))
    races: collections.Counter = collections.Counter()
    for i in range(a.races):
        dest = f"s3://trials/r{i}"
        ps = [fastkl(src, dest, *JOB) for _ in range(2)]
        res = sorted((p.wait(), p.stderr.read()) for p in ps)
        codes = tuple(c for c, _ in res)
        races[codes] += 1
        if codes not in ((0, 1), (0, 2)) or parts(f"r{i}") != ref:
            bad.append((dest, res))
        elif codes == (0, 1) and "taken by another fastkl job" not in res[1][1]:
            bad.append((dest, "loser did not name the winner", res[1][1]))
    print(f"CPU: {_cpu()}; a whole run takes {full:.2f} s")
    n = a.kills + a.commit_kills
    print(f"kill trials: {n} ({a.kills} at random, {a.commit_kills} aimed at the commit); state at the kill: "
          f"{dict(kills)}; then --resume: {n - sum(1 for b in bad if str(b[0]).startswith('k'))} identical and clean")
    print(f"race trials: {a.races}; exit codes (winner, loser): {dict(races)}")
    print("failures:", bad if bad else "none")
    server.kill()


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
