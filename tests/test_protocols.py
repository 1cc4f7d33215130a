"""Inputs by protocol, not by library (issue 14): the Arrow PyCapsule interface, DLPack, and a
pyarrow Dataset as SOURCE.

Small stand-in producers export exactly one protocol each (so nothing reaches fastkl through a
library special case); Polars and pandas are the real libraries (the `test` extra), DuckDB,
nanoarrow, Hugging Face `datasets` and torch are used when installed. Results are compared with
the same rows given as pyarrow arrays; zero-copy is checked by buffer address on the Side the
kernel reads.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import fastkl
from fastkl.adapters.arrow import aligned_sides
from fastkl.adapters.protocols import _dl_tensor
from fastkl.errors import OptionError
from test_stores import bucket, s3  # noqa: F401 (fixtures: moto's S3 server)

MEASURES = ("kl", "js", "tv")
FLOAT = pa.list_(pa.float32())


def _rows(seed: int, n: int = 7, k: int = 5) -> np.ndarray:
    x = np.random.default_rng(seed).random((n, k)).astype(np.float32) + np.float32(0.05)
    return x / x.sum(axis=1, keepdims=True)


P, Q = _rows(1), _rows(2)
# a null row (row 2 of p) and a null element (row 4 of q, position 1)
P_ARROW = pa.array([None if i == 2 else r for i, r in enumerate(P.tolist())], type=FLOAT)
Q_ARROW = pa.array([[None if (i, j) == (4, 1) else v for j, v in enumerate(r)] for i, r in enumerate(Q.tolist())],
                   type=FLOAT)


def reference(p=P_ARROW, q=Q_ARROW) -> pa.Table:
    return fastkl.divergences(p, q, MEASURES, status=True, on_invalid="null")


def got(p, q) -> pa.Table:
    return fastkl.divergences(p, q, MEASURES, status=True, on_invalid="null")


def same(a: pa.Table, b: pa.Table) -> None:
    assert a.equals(b), (a.to_pydict(), b.to_pydict())


def reads_in_place(x, child: pa.Array) -> None:
    """The Side the kernel reads holds the producer's child values buffer itself."""
    _, pieces = aligned_sides(x, None)
    values = child.buffers()[1]
    for _, side, _ in pieces:
        assert np.shares_memory(side.values, np.frombuffer(values, dtype=side.values.dtype))


# ------------------------------------------------------------------ stand-in producers


class ArrayOnly:
    """Exports `__arrow_c_array__` and nothing else."""

    def __init__(self, arr: pa.Array):
        self._arr = arr

    def __arrow_c_array__(self, requested_schema=None):
        return self._arr.__arrow_c_array__(requested_schema)


class StreamOnly:
    """Exports `__arrow_c_stream__` and nothing else (a chunked array or a table)."""

    def __init__(self, data):
        self._data = data

    def __arrow_c_stream__(self, requested_schema=None):
        return self._data.__arrow_c_stream__(requested_schema)


class DLPackOnly:
    """Exports `__dlpack__` / `__dlpack_device__` of a NumPy buffer; `bfloat16`: the capsule
    says bfloat16 (the buffer holds its bits as uint16), as torch's and JAX's do; `legacy`: a
    producer from before DLPack 1.0 (no keyword arguments, unversioned capsule)."""

    def __init__(self, buf: np.ndarray, bfloat16: bool = False, legacy: bool = False):
        self._buf, self._bfloat16, self._legacy = buf, bfloat16, legacy

    def __dlpack__(self, *args, **kwargs):
        if self._legacy and (args or kwargs):
            raise TypeError("__dlpack__() takes no arguments")
        capsule = self._buf.__dlpack__(**kwargs)
        if self._bfloat16:
            _dl_tensor(capsule).dtype.code = 4  # kDLBfloat
        return capsule

    def __dlpack_device__(self):
        return self._buf.__dlpack_device__()


class OnCuda:
    """A tensor in GPU memory: says so, and must not be exported."""

    def __dlpack__(self, *args, **kwargs):
        raise AssertionError("a GPU buffer was asked for")

    def __dlpack_device__(self):
        return (2, 0)


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (truncation: the values are then exactly representable)."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


# ------------------------------------------------------------------ Arrow PyCapsule interface


def test_array_only_producer_sliced_with_nulls_in_place():
    p, q = P_ARROW.slice(1, 5), Q_ARROW.slice(1, 5)
    same(got(ArrayOnly(p), ArrayOnly(q)), reference(p, q))
    reads_in_place(ArrayOnly(p), P_ARROW.values)


def test_stream_only_producer_chunked_differently_on_each_side():
    p = pa.chunked_array([P_ARROW.slice(0, 2), P_ARROW.slice(2, 4), P_ARROW.slice(6)])
    q = pa.chunked_array([Q_ARROW.slice(0, 5), Q_ARROW.slice(5)])
    same(got(StreamOnly(p), StreamOnly(q)), reference())
    reads_in_place(StreamOnly(p), P_ARROW.values)


def test_stream_of_a_one_column_table_is_that_column():
    same(got(StreamOnly(pa.table({"p": P_ARROW})), StreamOnly(pa.table({"q": Q_ARROW}))), reference())
    with pytest.raises(OptionError, match=r"got a table \(columns p, q\); pass the one column"):
        got(StreamOnly(pa.table({"p": P_ARROW, "q": Q_ARROW})), Q_ARROW)


def test_ids_mask_and_target_come_by_protocol_too():
    ids = pa.array([[4, 0, 2], [1, 3, 0]], type=pa.list_(pa.int32()))
    p = pa.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]], type=FLOAT)
    exp = fastkl.divergences(p, p, ("kl",), p_ids=ids, q_ids=ids)
    same(fastkl.divergences(ArrayOnly(p), StreamOnly(pa.chunked_array([p])), ("kl",), p_ids=ArrayOnly(ids),
                            q_ids=StreamOnly(pa.chunked_array([ids]))), exp)
    target = np.array([0, 2, 1, 4, 3, 0, 1])
    exp = fastkl.divergences(P, Q, ("nll_p", "delta_p"), target=target)
    same(fastkl.divergences(DLPackOnly(P), ArrayOnly(pa.array(Q.tolist(), FLOAT)), ("nll_p", "delta_p"),
                            target=DLPackOnly(target)), exp)
    seq = pa.array([[[0.5, 0.5], [0.9, 0.1]], [[0.2, 0.8]]], type=pa.list_(FLOAT))
    mask = pa.array([[True, False], [True]])
    exp = fastkl.divergences(seq, seq, ("kl",), mask=mask)
    same(fastkl.divergences(StreamOnly(pa.chunked_array([seq])), seq, ("kl",), mask=ArrayOnly(mask)), exp)


def test_polars_series_and_dataframe_column_in_place():
    pl = pytest.importorskip("polars")
    p, q = pl.from_arrow(P_ARROW), pl.from_arrow(Q_ARROW)
    same(got(p, q), reference())
    same(got(pl.DataFrame({"p": p}), pl.DataFrame({"q": q})), reference())  # one column: that column
    reads_in_place(p, p.to_arrow().values)
    fixed = pl.Series(P.tolist(), dtype=pl.Array(pl.Float32, P.shape[1]))
    same(got(fixed, Q), got(P, Q))
    same(got(p.slice(2, 4), q.slice(2, 4)), reference(P_ARROW.slice(2, 4), Q_ARROW.slice(2, 4)))


def test_pandas_arrow_backed_series_and_extension_array_in_place():
    pd = pytest.importorskip("pandas")
    p = pd.Series(pd.arrays.ArrowExtensionArray(P_ARROW))
    q = pd.Series(pd.arrays.ArrowExtensionArray(Q_ARROW))
    same(got(p, q), reference())
    same(got(p.array, q.array), reference())  # ArrowExtensionArray: said "got 1-D" before
    reads_in_place(p, P_ARROW.values)
    reads_in_place(p.array, P_ARROW.values)
    typed = pd.Series(P.tolist(), dtype=pd.ArrowDtype(FLOAT))
    same(got(typed, Q), got(P, Q))


def test_a_container_of_an_arrow_backed_array():
    """pandas < 3: a Series exports no PyCapsule; its `.array` (ArrowExtensionArray) exports `__arrow_array__`."""

    class Backing:
        def __init__(self, arr):
            self._arr = arr

        def __arrow_array__(self, type=None):
            return self._arr

    class OldSeries:
        def __init__(self, arr):
            self.array = Backing(arr)

        def __array__(self, dtype=None, copy=None):  # what NumPy sees: one object per row
            return np.array(self.array._arr.to_pylist() + [None], dtype=object)[:-1]

    same(got(OldSeries(P_ARROW), OldSeries(Q_ARROW)), reference())
    reads_in_place(OldSeries(P_ARROW), P_ARROW.values)


def test_duckdb_relation_of_one_column():
    duckdb = pytest.importorskip("duckdb", reason="duckdb is in the bench extra, not the test extra")
    con = duckdb.connect()
    t = pa.table({"p": P_ARROW, "q": Q_ARROW, "i": list(range(len(P)))})
    con.register("t", t)
    p = con.sql("select p from t order by i")
    q = con.sql("select q from t order by i")
    same(got(p, q), reference())
    with pytest.raises(OptionError, match=r"got a table \(columns p, q\)"):
        got(con.sql("select p, q from t"), q)


def test_nanoarrow_array():
    na = pytest.importorskip("nanoarrow", reason="nanoarrow is not a test dependency")
    same(got(na.Array(P_ARROW), na.Array(Q_ARROW)), reference())


def test_hugging_face_column_in_place():
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is heavy: not a test dependency")
    ds = datasets.Dataset(pa.table({"p": P_ARROW, "q": Q_ARROW}))
    same(got(ds["p"], ds["q"]), reference())
    reads_in_place(ds["p"], P_ARROW.values)
    picked = ds.select([4, 0, 1])  # an indices mapping: the rows are gathered (a copy)
    same(got(picked["p"], picked["q"]), reference(P_ARROW.take([4, 0, 1]), Q_ARROW.take([4, 0, 1])))


# ------------------------------------------------------------------ DLPack


@pytest.mark.parametrize("legacy", [False, True], ids=["dlpack-1.0", "legacy"])
def test_dlpack_float32_in_place(legacy):
    p, q = DLPackOnly(P, legacy=legacy), DLPackOnly(Q, legacy=legacy)
    same(got(p, q), got(P, Q))
    _, [(_, ps, _)] = aligned_sides(p, None)
    assert ps.decode == 0 and np.shares_memory(ps.values, P)


@pytest.mark.parametrize("legacy", [False, True], ids=["dlpack-1.0", "legacy"])
def test_dlpack_bfloat16_declares_itself_and_is_read_in_place(legacy):
    bits_p, bits_q = bfloat16_bits(P), bfloat16_bits(Q)
    p, q = DLPackOnly(bits_p, bfloat16=True, legacy=legacy), DLPackOnly(bits_q, bfloat16=True, legacy=legacy)
    exp = fastkl.divergences(bits_p, bits_q, MEASURES, dtype="bfloat16", sum_tol=2e-2)
    same(fastkl.divergences(p, q, MEASURES, sum_tol=2e-2), exp)
    same(fastkl.divergences(p, Q, MEASURES, sum_tol=2e-2),
         fastkl.divergences(bits_p, Q, MEASURES, p_dtype="bfloat16", sum_tol=2e-2))
    _, [(_, ps, _)] = aligned_sides(p, None)
    assert ps.decode == 2 and np.shares_memory(ps.values, bits_p)  # bfloat16 bits, no copy
    with pytest.raises(OptionError, match=r"declared p_dtype='float16' but got a bfloat16 tensor"):
        fastkl.kl(p, q, p_dtype="float16")


def test_dlpack_on_a_gpu_is_refused_in_one_line_naming_the_device():
    with pytest.raises(OptionError, match=r"^q: a \w+ tensor on cuda:0; fastkl reads CPU memory") as e:
        fastkl.kl(P, OnCuda())
    assert "\n" not in str(e.value)


def test_torch_tensors_by_dlpack():
    torch = pytest.importorskip("torch", reason="torch is not a test dependency (too big); checked by hand")
    pt, qt = torch.from_numpy(P), torch.from_numpy(Q)
    same(got(pt, qt), got(P, Q))
    same(got(pt.bfloat16(), qt.bfloat16()),
         fastkl.divergences(pt.bfloat16().float().numpy(), qt.bfloat16().float().numpy(), MEASURES, status=True,
                            on_invalid="null"))
    b = pt.bfloat16()
    _, [(_, ps, _)] = aligned_sides(b, None)
    assert ps.decode == 2 and ps.values.ctypes.data == b.data_ptr()  # the tensor's own memory
    same(got(pt.requires_grad_(True), qt), got(P, Q))


# ------------------------------------------------------------------ a pyarrow Dataset as SOURCE


def _write(root, parts=(("lang=en", "a"), ("lang=fr", "b"))) -> pa.Table:
    tables = []
    for i, (d, name) in enumerate(parts):
        (root / d).mkdir(parents=True)
        t = pa.table({"id": np.arange(3) + 10 * i, "p": P_ARROW.slice(3 * i, 3), "q": Q_ARROW.slice(3 * i, 3)})
        pq.write_table(t, root / d / f"{name}.parquet")
        tables.append(t)
    return pa.concat_tables(tables)


def _expected(table: pa.Table) -> dict:
    out = fastkl.divergences(table["p"], table["q"], ("kl",), on_invalid="null")
    return {"id": table["id"].to_pylist(), "kl": out["kl"].to_pylist()}


def test_dataset_as_source_local_and_subtree(tmp_path):
    table = _write(tmp_path / "src")
    ds = pads.dataset(tmp_path / "src", partitioning="hive")
    fastkl.run(ds, tmp_path / "out", keep=("id",), on_invalid="null", quiet=True)
    assert pq.read_table(tmp_path / "out").to_pydict() == _expected(table)
    # an earlier output inside the dataset's directory: pyarrow lists its parts, fastkl leaves them out
    fastkl.run(tmp_path / "src" / "lang=en", tmp_path / "src" / "scores", keep=("id",), on_invalid="null", quiet=True)
    sub = pads.dataset("src", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    assert any("scores" in f for f in sub.files)
    fastkl.run(sub, tmp_path / "out2", keep=("id",), on_invalid="null", quiet=True)
    assert pq.read_table(tmp_path / "out2").to_pydict() == _expected(table)


def test_dataset_on_an_fsspec_filesystem(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    _write(tmp_path / "src")
    mem = fsspec.filesystem("memory")
    for f in sorted((tmp_path / "src").rglob("*.parquet")):
        mem.put_file(str(f), f"/protocols-src/{f.parent.name}/{f.name}")
    ds = pads.dataset("/protocols-src", filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(mem)), format="parquet")
    fastkl.run(ds, tmp_path / "out", keep=("id",), on_invalid="null", quiet=True)
    table = pads.dataset(tmp_path / "src", format="parquet").to_table()
    assert pq.read_table(tmp_path / "out").to_pydict() == _expected(table)
    with pytest.raises(OptionError, match="brings its filesystem's options"):
        fastkl.run(ds, tmp_path / "out3", storage_options={"x": 1}, quiet=True)


def test_dataset_on_s3_brings_its_endpoint_and_keys(tmp_path, bucket, monkeypatch):
    """The S3 filesystem's own endpoint and keys reach the job: none is left in the environment."""
    table = _write(tmp_path / "src")
    host = os.environ["AWS_ENDPOINT_URL"].split("://", 1)[1]
    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", endpoint_override=host,
                           scheme="http")
    pafs.copy_files(str(tmp_path / "src"), f"{bucket}/src", destination_filesystem=fs)
    ds = pads.dataset(f"{bucket}/src", filesystem=fs, format="parquet")
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    fastkl.run(ds, tmp_path / "out", keep=("id",), on_invalid="null", quiet=True)
    assert pq.read_table(tmp_path / "out").to_pydict() == _expected(table)


def test_dataset_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(OptionError, match=r"^SOURCE: a pyarrow InMemoryDataset has no files"):
        fastkl.run(pads.dataset(pa.table({"p": P_ARROW})), tmp_path / "out", q=None, measures="entropy")
