"""How a Parquet file is written against how fast a job reads it: the same rows in each layout.

    python benchmarks/layouts.py [--rows 100000] [--k 256] [--rounds 5] [--dir DIR] [--max-load 0.1]

One table of p and q (softmax rows, float32, K values each) is written in
several layouts: Arrow's default (nullable `list<float>`, snappy), the list
and its values declared non-nullable, `fixed_size_list`, other codecs,
BYTE_STREAM_SPLIT, float16 values and bfloat16 bits (with and without
Parquet's dictionary encoding, which pyarrow applies by default and which
succeeds on 16-bit values: at most 65,536 of them), small row groups. For each: the file's
size, `pyarrow.parquet.read_table` of p and q (what any reader pays to
decode it) and a `fastkl.run` job computing kl over it, each as a ratio to
the default layout measured in the same round. The figures are in
docs/guide/writing-tables.md; they depend on the machine (CPU named in the
output) and on the data (random floats barely compress; real log-probs do
better).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import fastkl
from fastkl.bench import throughput as B


def softmax_rows(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    x = rng.normal(0.0, 2.0, (n, k))
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def column(x: np.ndarray, layout: str) -> pa.Array:
    """x (n x k) as a list column of the layout's type, over x's buffer."""
    n, k = x.shape
    flat = x.reshape(-1)
    if layout == "float16":
        flat = flat.astype(np.float16)
    elif layout == "bfloat16_bits":
        flat = B.bfloat16_bits(flat)  # bfloat16 as pipelines store it: its bits in a uint16 list
    values = pa.array(flat)
    if layout == "fixed_size_list":
        return pa.FixedSizeListArray.from_arrays(values, k)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
    return pa.ListArray.from_arrays(offsets, values)


def table(p: np.ndarray, q: np.ndarray, layout: str) -> pa.Table:
    cols = {"p": column(p, layout), "q": column(q, layout)}
    t = pa.table(cols)
    if layout in ("not_null", "float16", "bfloat16_bits"):
        item = pa.field("item", t.schema.field("p").type.value_type, nullable=False)
        typ = pa.list_(item)
        t = t.cast(pa.schema([pa.field("p", typ, nullable=False), pa.field("q", typ, nullable=False)]))
    return t


# layout name -> (table layout, pq.write_table keyword arguments, what it is)
LAYOUTS = {
    "default": ("default", {}, "list<float>, nullable, snappy (pyarrow's defaults)"),
    "not_null": ("not_null", {}, "list and values declared non-nullable, snappy"),
    "fixed_size_list": ("fixed_size_list", {}, "fixed_size_list<float, K>, snappy"),
    "uncompressed": ("default", {"compression": "none"}, "list<float>, no compression"),
    "zstd": ("default", {"compression": "zstd"}, "list<float>, zstd"),
    "lz4": ("default", {"compression": "lz4"}, "list<float>, lz4"),
    "not_null_zstd": ("not_null", {"compression": "zstd"}, "non-nullable, zstd"),
    "byte_stream_split_zstd": ("default", {"compression": "zstd", "use_dictionary": False,
                                           "use_byte_stream_split": True},
                               "list<float>, BYTE_STREAM_SPLIT + zstd"),
    "no_dictionary": ("default", {"use_dictionary": False}, "list<float>, snappy, no dictionary attempt"),
    "float16": ("float16", {}, "list<halffloat>, non-nullable, snappy (half the bytes; dictionary-encoded)"),
    "float16_plain": ("float16", {"use_dictionary": False}, "list<halffloat>, non-nullable, snappy, no dictionary"),
    "bfloat16_bits": ("bfloat16_bits", {}, "list<uint16> of bfloat16 bits, non-nullable, snappy (dictionary)"),
    "bfloat16_bits_plain": ("bfloat16_bits", {"use_dictionary": False},
                            "list<uint16> of bfloat16 bits, non-nullable, snappy, no dictionary"),
    "small_row_groups": ("default", {"row_group_size": 2_000}, "list<float>, snappy, 2,000-row groups"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temporary dir)")
    ap.add_argument("--max-load", type=float, default=None)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(dir=a.dir, prefix="fastkl-layouts-"))
    try:
        rng = np.random.default_rng(0)
        p, q = softmax_rows(rng, a.rows, a.k), softmax_rows(rng, a.rows, a.k)
        files = {}
        for name, (layout, kwargs, _) in LAYOUTS.items():
            files[name] = root / f"{name}.parquet"
            pq.write_table(table(p, q, layout), files[name], **kwargs)
        out = root / "out"

        def job(path: Path):
            def run():
                shutil.rmtree(out, ignore_errors=True)
                half = "float16" in path.name
                fastkl.run(str(path), str(out), measures=["kl"], quiet=True, sum_tol=2e-2 if half else 1e-3,
                           dtype="bfloat16" if path.name.startswith("bfloat16") else None)
            return run

        cases = {}
        for name, path in files.items():
            cases[f"read {name}"] = (lambda path=path: pq.read_table(path, columns=["p", "q"]))
            cases[f"job {name}"] = job(path)
        got = B.alternate(cases, rounds=a.rounds, max_load=a.max_load)
        print(f"CPU: {B.machine()}")
        print(f"{a.rows:,} rows x {a.k} float32 p and q ({p.nbytes * 2 / 1e6:.0f} MB in memory); "
              f"medians of {a.rounds} rounds; ratios to the default layout within each round")
        print(f"{'layout':<24} {'MB':>6} {'read s':>7} {'read/def':>8} {'job s':>7} {'job/def':>8}  what")
        for name, (_, _, what) in LAYOUTS.items():
            r, j = got[f"read {name}"], got[f"job {name}"]
            print(f"{name:<24} {files[name].stat().st_size / 1e6:>6.0f} {r.median:>7.3f} "
                  f"{B.ratio(r, got['read default']):>8.2f} {j.median:>7.3f} {B.ratio(j, got['job default']):>8.2f}"
                  f"  {what}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
