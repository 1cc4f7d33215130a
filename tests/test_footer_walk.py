"""The footer check runs interpreted for a process's first footers and compiled
after (fastkl/io/footer_checks.py): both must reach the same verdict on any bytes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fastkl.io import footer_checks as F


def _footer_bytes(tmp_path) -> bytes:
    path = tmp_path / "f.parquet"
    vals = pa.array([[0.25, 0.75]] * 50, type=pa.list_(pa.float32()))
    table = pa.table({"id": pa.array(range(50), pa.int64()), "p": vals, "q": vals})
    pq.write_table(table, path, row_group_size=10, write_page_index=True)
    raw = path.read_bytes()
    n = int.from_bytes(raw[-8:-4], "little")
    return raw[-8 - n:-8]


def _both(buf: np.ndarray, shape: tuple[int, int]):
    results = []
    for walk in (F._interpreted(F._walk), F._walk):
        out = F._blank(np.empty((*shape, F._NF), dtype=np.int64))
        try:
            with np.errstate(all="ignore"):
                status = walk(buf, out)
        except Exception as e:  # the interpreted walk may raise where the compiled one wraps
            status, out = f"raised {type(e).__name__}", None
        results.append((status, out))
    return results


def test_interpreted_and_compiled_walks_agree_on_mutated_footers(tmp_path, rng):
    footer = _footer_bytes(tmp_path)
    shape = (5, 3)
    (s0, o0), (s1, o1) = _both(np.frombuffer(footer, dtype=np.uint8), shape)
    assert s0 == s1 == 0 and np.array_equal(o0, o1)
    assert (o1[:, :, F._F_PRESENT] >= 0).all()  # every column chunk was seen
    disagree = []
    for trial in range(300):
        buf = bytearray(footer)
        for _ in range(int(rng.integers(1, 6))):
            buf[int(rng.integers(0, len(buf)))] = int(rng.integers(0, 256))
        if trial % 3 == 0:
            buf = buf[: int(rng.integers(1, len(buf)))]
        (si, oi), (sc, oc) = _both(np.frombuffer(bytes(buf), dtype=np.uint8), shape)
        if isinstance(si, str):
            continue  # _walk_footer then asks the compiled walk
        if si != sc or (sc == 0 and not np.array_equal(oi, oc)):
            disagree.append(trial)
    assert not disagree, f"walks disagree on trials {disagree[:10]}"
