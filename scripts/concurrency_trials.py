#!/usr/bin/env python
"""Trials of what outside testers did to fastkl jobs at once: racing jobs and input changing under a job.

    python scripts/concurrency_trials.py                 # every kind, ~2-4 min on 2 cores
    python scripts/concurrency_trials.py --only race --trials 20

Kinds (tests/test_exclusive.py and tests/test_input_changes.py run a few of each in the suite):

race       two `fastkl run` for one DEST started together (nats vs --base 2; plain, both --overwrite,
           both --resume): exactly one exits 0, the other exits 1 with one line; the committed DEST is
           byte-identical to a clean run of the winner's options; no temporary file anywhere.
replace    a shard atomically replaced (same layout, new values) while the job is stopped with SIGSTOP
           after its first part: the job fails naming the file, or its output equals a clean run on
           one version of each file (never a mix).
touched    a job killed, a shard rewritten with its size and mtime restored (os.utime, like
           `touch -r`), then --resume: the output equals a clean run on the new data.

Data is generated under --workdir (default: a temporary directory), never in git.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_trials import ENV, PY, Clean, _one_line, _table, make_dataset, part_bytes  # noqa: E402

RUN = [PY, "-m", "fastkl.cli", "run"]
ARGS = ["--task-rows", "40", "--quiet", "--workers", "2"]


def _start(source: Path, dest: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*RUN, str(source), str(dest), *ARGS, *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp")]


def race(work: Path, trials: int) -> list[dict]:
    src = make_dataset(work / "race-src", files=3, rows=2000, k=64, group=40, seed=1)
    clean = {b: Clean(src, work / f"race-clean-{b}", [*ARGS, "--base", b]) for b in ("e", "2")}
    rows = []
    for mode in ("plain", "overwrite", "resume"):
        outcomes: dict[str, int] = {}
        for t in range(trials):
            dest = work / f"race-{mode}-{t}"
            extra = {"plain": [], "overwrite": ["--overwrite"], "resume": ["--resume"]}[mode]
            if mode == "overwrite":
                shutil.copytree(work / "race-clean-e", dest)
            a, b = _start(src, dest, "--base", "e", *extra), _start(src, dest, "--base", "2", *extra)
            ra, rb = a.wait(300), b.wait(300)
            ea, eb = a.stderr.read(), b.stderr.read()
            problems = []
            if sorted((ra, rb)) != [0, 1]:
                problems.append(f"exit codes {ra}, {rb}")
            loser = eb if ra == 0 else ea
            if sorted((ra, rb)) == [0, 1] and (_one_line(loser) is None or "another" not in loser):
                problems.append(f"the loser does not say in one line that another job has DEST: {loser[-300:]!r}")
            winner = "e" if ra == 0 else "2"
            if dest.exists() and part_bytes(dest) != clean[winner].parts:
                problems.append("DEST differs from a clean run of the winner's options")
            if _temporaries(work):
                problems.append(f"temporaries left: {_temporaries(work)[:3]}")
            key = "ok" if not problems else "PROBLEM: " + "; ".join(problems)
            outcomes[key] = outcomes.get(key, 0) + 1
            shutil.rmtree(dest, ignore_errors=True)
        rows.append({"kind": f"race {mode}", "trials": trials, "outcome": outcomes})
    return rows


def _rewrite(path: Path, seed: int) -> None:
    """Same rows, same row groups, other values: written aside, then renamed over the shard."""
    t = pq.read_table(path)
    rng = np.random.default_rng(seed)
    k = len(t["p"][0])
    p = rng.random((t.num_rows, k))
    p /= p.sum(1, keepdims=True)
    new = t.set_column(t.schema.get_field_index("p"), "p",
                       pa.FixedSizeListArray.from_arrays(pa.array(p.ravel()), k).cast(t.schema.field("p").type))
    md = pq.read_metadata(path)
    tmp = path.with_name("._" + path.name)
    # plain, uncompressed, no statistics: a rewrite has exactly the size of the last one
    pq.write_table(new, tmp, row_group_size=md.row_group(0).num_rows, compression="none", use_dictionary=False,
                   write_statistics=False)
    os.replace(tmp, path)


def _staged_parts(dest: Path) -> int:
    return sum(1 for p in dest.parent.rglob("part-*.parquet") if str(p).startswith(str(dest) + "."))


def replace(work: Path, trials: int) -> list[dict]:
    outcomes: dict[str, int] = {}
    for t in range(trials):
        src = make_dataset(work / f"replace-src-{t}", files=3, rows=400, k=64, group=40, seed=t)
        old = Clean(src, work / f"replace-old-{t}", ARGS)
        dest = work / f"replace-{t}"
        job = _start(src, dest)
        t0 = time.monotonic()
        while _staged_parts(dest) == 0 and job.poll() is None and time.monotonic() - t0 < 60:
            time.sleep(0.002)
        job.send_signal(signal.SIGSTOP)
        victim = src / "shard-000.parquet"  # its first part is done: the rest would mix
        _rewrite(victim, 1000 + t)
        job.send_signal(signal.SIGCONT)
        code, err = job.wait(300), job.stderr.read()
        new = Clean(src, work / f"replace-new-{t}", ARGS)
        if code == 1 and _one_line(err) and "shard-000" in err:
            key = "refused, naming the file"
        elif code == 0 and part_bytes(dest) in (old.parts, new.parts):
            key = "one version (the file was read before or after the change)"
        else:
            key = f"PROBLEM: exit {code}, {err.strip()[-200:]!r}"
        outcomes[key] = outcomes.get(key, 0) + 1
    return [{"kind": "replace while stopped", "trials": trials, "outcome": outcomes}]


def touched(work: Path, trials: int) -> list[dict]:
    outcomes: dict[str, int] = {}
    for t in range(trials):
        src = make_dataset(work / f"touched-src-{t}", files=3, rows=400, k=64, group=40, seed=t)
        dest = work / f"touched-{t}"
        victim = src / "shard-000.parquet"
        _rewrite(victim, 3000 + t)  # in the fixed-size layout, so the next rewrite keeps its size
        job = _start(src, dest)
        t0 = time.monotonic()
        while _staged_parts(dest) < 3 and job.poll() is None and time.monotonic() - t0 < 60:
            time.sleep(0.002)
        job.kill()
        job.wait()
        st = os.stat(victim)
        _rewrite(victim, 2000 + t)
        assert os.stat(victim).st_size == st.st_size
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        r = subprocess.run([*RUN, str(src), str(dest), *ARGS, "--resume"], capture_output=True, text=True, env=ENV)
        new = Clean(src, work / f"touched-new-{t}", ARGS)
        if r.returncode == 0 and part_bytes(dest) == new.parts:
            key = "resume redid the rewritten file"
        else:
            key = f"PROBLEM: exit {r.returncode}, same as new data: {r.returncode == 0 and part_bytes(dest) == new.parts}"
        outcomes[key] = outcomes.get(key, 0) + 1
    return [{"kind": "rewritten, mtime restored, resume", "trials": trials, "outcome": outcomes}]


KINDS = {"race": race, "replace": replace, "touched": touched}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(KINDS), action="append")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args(argv)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="fastkl-concurrency-"))
    rows = []
    try:
        for name in a.only or list(KINDS):
            rows += KINDS[name](work / name, a.trials)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        r["outcome"] = ", ".join(f"{k}: {n}" for k, n in r["outcome"].items())
    print(_table(rows, ["kind", "trials", "outcome"]))
    return 0 if all("PROBLEM" not in r["outcome"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
