"""The in-memory API refuses Arrow list arrays whose offsets point outside
their values (a damaged IPC file read without validation), instead of reading
out of bounds."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import fastkl


def _corrupt_ipc_batch(tmp_path) -> pa.RecordBatch:
    rows = [[0.25, 0.75]] * 64
    table = pa.table({"p": pa.array(rows, type=pa.list_(pa.float64()))})
    path = tmp_path / "x.arrow"
    with pa.ipc.new_file(str(path), table.schema) as w:
        w.write_table(table)
    raw = bytearray(path.read_bytes())
    offsets = np.arange(65, dtype=np.int32) * 2
    at = bytes(raw).find(offsets.tobytes())
    assert at > 0
    bad = offsets.copy()
    bad[50] = 10**6  # beyond the 128 values
    raw[at : at + bad.nbytes] = bad.tobytes()
    path.write_bytes(bytes(raw))
    return pa.ipc.open_file(pa.memory_map(str(path))).get_batch(0)  # not validated


def test_offsets_beyond_the_values_are_refused(tmp_path):
    batch = _corrupt_ipc_batch(tmp_path)
    with pytest.raises(fastkl.DataError, match="corrupt list offsets"):
        fastkl.kl(batch["p"], batch["p"], on_invalid="null")


def test_valid_arrays_still_pass():
    arr = pa.array([[0.25, 0.75], [0.5, 0.5]], type=pa.list_(pa.float64())).slice(1)
    assert fastkl.kl(arr, arr).tolist() == [0.0]
