#!/usr/bin/env python
"""Generate a large sharded Parquet dataset of teacher/student distributions.

Used for the job layer's scale figures (not committed data). Each shard holds
`--rows-per-file` rows: an int64 `id`, and `p` / `q` as list<float32> of
length `--vocab` (softmaxes of heavy-tailed logits, a third of the teacher
rows top-k truncated, like `fastkl demo`). Random floats do not compress, so
the size on disk is about rows x vocab x 8 bytes.

    python scripts/make_dataset.py /work/data/big --gb 2.2
    python scripts/make_dataset.py /work/data/small --gb 0.22

Shards are generated in parallel processes and written atomically (tmp +
rename); an existing complete shard is kept, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    return x


def _col(x, vocab):
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), vocab).cast(pa.list_(pa.float32()))


def write_shard(args) -> tuple[str, int]:
    path, index, rows, vocab, row_group, seed = args
    if os.path.exists(path):
        return path, os.path.getsize(path)
    rng = np.random.default_rng([seed, index])
    tmp = path + ".tmp"
    with pq.ParquetWriter(tmp, pa.schema([("id", pa.int64()), ("p", pa.list_(pa.float32())),
                                          ("q", pa.list_(pa.float32()))]),
                          compression="snappy") as w:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            logits = rng.standard_t(df=3, size=(n, vocab)).astype(np.float32) * rng.uniform(
                1.0, 3.0, size=(n, 1)).astype(np.float32)
            p = _softmax(logits / np.float32(0.7))
            q = _softmax(logits + rng.normal(0.0, 0.6, size=(n, vocab)).astype(np.float32))
            sel = rng.random(n) < 0.33
            if sel.any():
                sub = p[sel]
                k = max(2, vocab // 8)
                cut = np.partition(sub, -k, axis=1)[:, -k][:, None]
                sub = np.where(sub >= cut, sub, 0.0)
                p[sel] = sub / sub.sum(axis=1, keepdims=True)
            ids = np.arange(index * rows + start, index * rows + start + n, dtype=np.int64)
            w.write_table(pa.table({"id": ids, "p": _col(p, vocab), "q": _col(q, vocab)}))
    os.replace(tmp, path)
    return path, os.path.getsize(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="directory to write the shards into")
    ap.add_argument("--gb", type=float, default=2.2, help="approximate size on disk (GB, 1e9 bytes)")
    ap.add_argument("--vocab", type=int, default=1024, help="support size K of each distribution")
    ap.add_argument("--rows-per-file", type=int, default=50_000)
    ap.add_argument("--row-group", type=int, default=10_000, help="rows per Parquet row group")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    bytes_per_row = a.vocab * 4 * 2 + 8
    total_rows = max(1, int(a.gb * 1e9 / bytes_per_row))
    files = max(1, -(-total_rows // a.rows_per_file))
    os.makedirs(a.out, exist_ok=True)
    jobs = []
    for i in range(files):
        rows = min(a.rows_per_file, total_rows - i * a.rows_per_file)
        jobs.append((os.path.join(a.out, f"shard-{i:05d}.parquet"), i, rows, a.vocab, a.row_group, a.seed))
    t0 = time.time()
    total = 0
    with ProcessPoolExecutor(max_workers=a.jobs) as ex:
        for path, size in ex.map(write_shard, jobs):
            total += size
            print(f"\r{path}  {total / 1e9:.2f} GB", end="", file=sys.stderr, flush=True)
    print(f"\n{files} files, {total_rows:,} rows, {total / 1e9:.2f} GB in {time.time() - t0:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
