"""Progress bar of a job on stderr: rows done, rows/s, MB/s and ETA (SPEC §6).

Shown only when stderr is a terminal and the job is not quiet. Updates may
come from any thread (threaded tasks report each batch; distributed tasks
report through Dask events handled on the client's event-loop thread), so
`add` takes a lock. Per-task counts are clamped to the task's size so that a
retried task (a worker died) never pushes the bar past 100%.
"""

from __future__ import annotations

import sys
import threading
import time


class Progress:
    def __init__(self, total_rows: int, total_bytes: int, *, enabled: bool, desc: str = "fastkl"):
        self.enabled = enabled
        self.total_bytes = total_bytes
        self._lock = threading.Lock()
        self._rows: dict[int, int] = {}
        self._bytes = 0
        self._t0 = time.monotonic()
        self._last = 0.0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_rows,
                desc=desc,
                unit=" rows",
                unit_scale=True,
                file=sys.stderr,
                dynamic_ncols=True,
                smoothing=0.1,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} rows "
                "[{elapsed}<{remaining}, {rate_fmt}{postfix}]",
            )

    @staticmethod
    def wanted(quiet: bool) -> bool:
        try:
            return not quiet and sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False

    def add(self, task: int, rows: int, nbytes: int, task_rows: int, task_bytes: int) -> None:
        """Count `rows`/`nbytes` more for `task`, never beyond its size."""
        if not self.enabled:
            return
        with self._lock:
            before = self._rows.get(task, 0)
            after = min(task_rows, before + rows)
            self._rows[task] = after
            if task_rows:
                self._bytes += int(task_bytes * (after - before) / task_rows)
            self.bar.update(after - before)
            now = time.monotonic()
            if now - self._last > 0.5 or after == task_rows:
                self._last = now
                mbps = self._bytes / 1e6 / max(now - self._t0, 1e-9)
                self.bar.set_postfix_str(f"{mbps:,.0f} MB/s", refresh=False)

    def done(self, task: int, task_rows: int, task_bytes: int) -> None:
        self.add(task, task_rows, task_bytes, task_rows, task_bytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
