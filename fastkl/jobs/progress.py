"""Progress bar of a job on stderr: rows done, rows/s, MB/s and ETA.

MB/s counts the decoded bytes of the p and q columns read (uncompressed sizes
from the Parquet footers, IPC buffer sizes), the data the kernel chews.

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
        self.total_rows = total_rows
        self.total_bytes = total_bytes
        self.desc = desc
        self._lock = threading.Lock()
        self._rows: dict[int, int] = {}  # rows counted per task (resumed tasks before start())
        self._last = 0.0
        self.bar = None

    def start(self) -> None:
        """Show the bar: called once the workers are up, so that rates and ETA are the job's."""
        if not self.enabled or self.bar is not None:
            return
        from tqdm.auto import tqdm

        with self._lock:
            self.bar = tqdm(
                total=self.total_rows,
                initial=sum(self._rows.values()),
                desc=self.desc,
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
            if self.bar is None:
                return
            self.bar.update(after - before)
            now = time.monotonic()
            if now - self._last > 0.5:
                self._last = now
                # MB/s of decoded input columns, at the bar's own (smoothed) row rate
                fd = self.bar.format_dict
                rate = fd.get("rate") or (fd["n"] - fd.get("initial", 0)) / max(fd["elapsed"], 1e-9)
                per_row = self.total_bytes / self.total_rows if self.total_rows else 0.0
                self.bar.set_postfix_str(f"{rate * per_row / 1e6:,.0f} MB/s", refresh=False)

    def done(self, task: int, task_rows: int, task_bytes: int) -> None:
        self.add(task, task_rows, task_bytes, task_rows, task_bytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
