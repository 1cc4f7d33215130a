#!/usr/bin/env python
"""Run a command and report its wall time and the peak memory of its whole process tree.

    python scripts/peak_rss.py -- fastkl run /work/data/big /work/data/out --quiet

The tree (the command and every descendant: Dask worker processes, nannies,
...) is sampled every 20 ms with psutil; the peak is the largest sum of RSS
seen at one instant (shared pages count once per process, so this is an
upper bound) and, where the kernel provides it, of PSS (shared pages split
between the processes that map them: the honest total).
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def _tree(p: psutil.Process):
    try:
        return [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv)
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    peak_procs = 0
    while proc.poll() is None:
        rss = pss = 0
        procs = _tree(root)
        for p in procs:
            try:
                if peak_pss is not None:
                    m = p.memory_full_info()
                    pss += getattr(m, "pss", 0)
                else:
                    m = p.memory_info()
                rss += m.rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        peak_rss = max(peak_rss, rss)
        if peak_pss is not None:
            peak_pss = max(peak_pss, pss)
        peak_procs = max(peak_procs, len(procs))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    print(
        f"peak_rss: exit={proc.returncode} wall={wall:.2f}s peak_tree_rss={peak_rss / 2**20:.0f}MiB "
        f"peak_tree_pss={peak_pss / 2**20:.0f}MiB processes={peak_procs}",
        file=sys.stderr,
    )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
