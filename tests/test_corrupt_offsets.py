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


# A record batch whose length was damaged (fuzzing zeroed it): planning counted its rows from it,
# so a job dropped the batch's rows and exited 0. Its columns' field nodes tell the truth.

def _first_batch_length_at(path, stream: bool) -> int:
    """The file offset of the first record batch's `length` (an int64 in its flatbuffer header)."""
    from fastkl.io import filemeta as fm

    with pa.OSFile(str(path)) as f:
        size = f.size()
        if stream:
            offset = next(pos for pos, m in fm.stream_messages(f, size) if m.kind == fm.RECORD_BATCH)
        else:
            offset = fm.ipc_file_blocks(fm.ipc_file_footer(f, size))[0][0]
        n, skip = fm._prefix(fm.read_at(f, offset, 8))
        flat = fm.read_at(f, offset + skip, n)
    rb = fm._root(flat).table(2)
    return offset + skip + rb.pos + rb._slot(0)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_batch_length_damaged_to_zero_fails_the_job(tmp_path, stream, compression):
    rows = np.random.default_rng(0).dirichlet(np.ones(4), 30)
    table = pa.table({"id": np.arange(30), "p": list(rows), "q": list(rows[::-1])})
    path = tmp_path / ("x.arrows" if stream else "x.arrow")
    opts = pa.ipc.IpcWriteOptions(compression=compression)
    new = pa.ipc.new_stream if stream else pa.ipc.new_file
    with new(str(path), table.schema, options=opts) as w:
        for b in table.to_batches(max_chunksize=10):
            w.write_batch(b)
    clean = fastkl.run(str(path), tmp_path / "clean", keep="id", quiet=True)
    assert clean.rows == 30
    raw = bytearray(path.read_bytes())
    at = _first_batch_length_at(path, stream)
    assert int.from_bytes(raw[at:at + 8], "little") == 10
    raw[at:at + 8] = bytes(8)
    path.write_bytes(bytes(raw))
    with pytest.raises(fastkl.DataError, match="record batch of 0 rows holds 10 values"):
        fastkl.run(str(path), tmp_path / "out", keep="id", quiet=True)
    assert not (tmp_path / "out").exists()


def test_an_empty_batch_is_still_read(tmp_path):
    rows = [[0.25, 0.75]] * 3
    table = pa.table({"p": rows, "q": rows})
    path = tmp_path / "x.arrow"
    with pa.ipc.new_file(str(path), table.schema) as w:
        w.write_table(table.slice(0, 0))
        w.write_table(table)
    assert fastkl.run(str(path), tmp_path / "out", quiet=True).rows == 3


def test_a_field_node_of_an_impossible_length_fails_the_job(tmp_path):
    """2**62 values in a column's node: the plan's byte counts overflowed (an OverflowError escaped)."""
    from fastkl.io import filemeta as fm

    rows = np.random.default_rng(0).dirichlet(np.ones(4), 10)
    table = pa.table({"p": list(rows), "q": list(rows)})
    path = tmp_path / "x.arrow"
    with pa.ipc.new_file(str(path), table.schema) as w:
        w.write_table(table)
    with pa.OSFile(str(path)) as f:
        offset = fm.ipc_file_blocks(fm.ipc_file_footer(f, f.size()))[0][0]
        n, skip = fm._prefix(fm.read_at(f, offset, 8))
        flat = fm.read_at(f, offset + skip, n)
    values_node = fm._root(flat).table(2).structs(1, 16)[1]  # p's values: 40 of them
    at = offset + skip + values_node
    raw = bytearray(path.read_bytes())
    assert int.from_bytes(raw[at:at + 8], "little") == 40
    raw[at:at + 8] = (2**62).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(fastkl.DataError, match="x.arrow: .*field node declares 4611686018427387904 values"):
        fastkl.run(str(path), tmp_path / "out", quiet=True)
