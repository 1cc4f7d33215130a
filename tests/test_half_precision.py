"""float16 and bfloat16 input (SPEC §10 element types), decoded inside the dense kernel.

The decoders are checked on all 65,536 bit patterns. Every measure on a
half-precision input must equal the same call on its float32-decoded values
(the kernel runs the float32 loops on the decoded row, so bit for bit, and
with the same statuses), and the exact reference (tests/naive.py) within the
float32 bound. Inputs: Arrow float16, Arrow uint16 declared float16 or
bfloat16, NumPy float16 / uint16, ml_dtypes.bfloat16 and torch tensors when
installed; with null elements, null rows and sliced arrays.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import fastkl
import naive
from fastkl._options import Options
from fastkl.adapters.arrow import aligned_sides
from fastkl.cli import main
from fastkl.errors import OptionError
from fastkl.kernels.half import BFLOAT16, FLOAT16, bfloat16_to_float32, decode_row, float16_to_float32

ALL_BITS = np.arange(1 << 16, dtype=np.uint16)


def f16_bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounded to nearest even (NaN not needed here)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def decoded(bits: np.ndarray, code: int) -> np.ndarray:
    """The float32 values of half bits, by NumPy (an independent decoder)."""
    if code == FLOAT16:
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- decoders


def test_float16_decoder_every_bit_pattern():
    got = decode_row(ALL_BITS, 0, ALL_BITS.size, FLOAT16, np.empty(ALL_BITS.size, np.float32))
    ref = ALL_BITS.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert nan.sum() == 2 * 1023  # both signs, every non-zero mantissa
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])  # -0, subnormals, inf
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(np.signbit(got[nan]), np.signbit(ref[nan]))
    # the payload is kept (the mantissa bits shifted into place), a signalling NaN made quiet
    quiet = np.uint32(1 << 22)
    payload = np.uint32(0x7FFFFF) & ~quiet
    np.testing.assert_array_equal(got.view(np.uint32)[nan] & payload,
                                  ((ALL_BITS[nan].astype(np.uint32) & 0x3FF) << 13) & payload)
    assert (got.view(np.uint32)[nan] & quiet).all()


def test_bfloat16_decoder_every_bit_pattern():
    got = decode_row(ALL_BITS, 0, ALL_BITS.size, BFLOAT16, np.empty(ALL_BITS.size, np.float32))
    ref = (ALL_BITS.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_decode_codes_agree_with_the_registry():
    from fastkl._registry import DECODE_CODE
    from fastkl.kernels import half

    assert (half.AS_IS, half.FLOAT16, half.BFLOAT16) == tuple(DECODE_CODE[n] for n in ("as_is", "float16", "bfloat16"))


def test_scalar_decoders_and_row_window():
    assert float16_to_float32(0x0001) == 2.0**-24  # smallest subnormal
    assert float16_to_float32(0x03FF) == 1023 * 2.0**-24  # largest subnormal
    assert float16_to_float32(0x7BFF) == 65504.0
    assert np.signbit(float16_to_float32(0x8000)) and float16_to_float32(0x8000) == 0.0
    assert float16_to_float32(0xFC00) == -np.inf
    assert bfloat16_to_float32(0x3F80) == 1.0 and bfloat16_to_float32(0xFF80) == -np.inf
    scratch = np.full(8, 7.0, np.float32)
    row = decode_row(f16_bits([9, 1, 0.5, 0.25, 9]), 1, 3, FLOAT16, scratch)
    np.testing.assert_array_equal(row, [1, 0.5, 0.25])
    assert scratch[3] == 7.0  # only k values written


# ---------------------------------------------------------------- inputs

K = 12
ROWS = 24


def rows_bits(rng, code: int, kind: str = "probs", n: int = ROWS, k: int = K) -> np.ndarray:
    """n x k half bits whose decoded rows are fit for `kind` (zeros included for probs)."""
    x = naive.make_rows(rng, kind, n, k, np.float32, zero_frac=0.15 if kind == "probs" else 0.0)
    return f16_bits(x) if code == FLOAT16 else bf16_bits(x)


def arrow_half(bits: np.ndarray, code: int, *, null_rows=(), null_elements=(), pad: int = 2,
               as_uint16: bool = False) -> tuple[pa.Array, pa.Array]:
    """(half array, the same rows as list<float32>): list arrays sliced out of padded
    ones, with null rows and null elements (flat positions of the unpadded rows)."""
    n, k = bits.shape
    junk = np.full((pad, k), f16_bits([-3.0])[0] if code == FLOAT16 else bf16_bits([-3.0])[0], np.uint16)
    allbits = np.concatenate([junk, bits, junk]).reshape(-1)
    elem_null = np.zeros(allbits.size, bool)
    for j in null_elements:
        elem_null[pad * k + j] = True
    row_null = np.zeros(n + 2 * pad, bool)
    for i in null_rows:
        row_null[pad + i] = True
    offsets = pa.array(np.arange(n + 2 * pad + 1, dtype=np.int32) * k)
    if code == FLOAT16 and not as_uint16:
        child = pa.array(allbits.view(np.float16), mask=elem_null)
    else:
        child = pa.array(allbits, type=pa.uint16(), mask=elem_null)
    ref_child = pa.array(decoded(allbits, code), mask=elem_null)
    mk = lambda c: pa.ListArray.from_arrays(offsets, c, mask=pa.array(row_null)).slice(pad, n)
    return mk(child), mk(ref_child)


def same_results(got: pa.Table, ref: pa.Table) -> None:
    assert got.column_names == ref.column_names
    for name in got.column_names:
        assert got.column(name).to_pylist() == ref.column(name).to_pylist(), name


@pytest.mark.parametrize("kind", ["probs", "logprobs", "logits"])
@pytest.mark.parametrize("code", [FLOAT16, BFLOAT16])
def test_arrow_half_equals_float32_decoded(rng, code, kind):
    p_bits, q_bits = rows_bits(rng, code, kind), rows_bits(rng, code, kind)
    q_bits[3, 1] = q_bits[3, 0]  # keep a row with q = 0 < p possible
    p, p_ref = arrow_half(p_bits, code, null_rows=(2,), null_elements=(5 * K + 3,))
    q, q_ref = arrow_half(q_bits, code, null_rows=(7,), as_uint16=True)
    opts = dict(kind=kind, sum_tol=2e-2, on_invalid="null", status=True)
    q_dtype = "float16" if code == FLOAT16 else "bfloat16"
    p_dtype = None if code == FLOAT16 else "bfloat16"
    for measures in (("kl",), fastkl.MEASURES):
        got = fastkl.divergences(p, q, measures=measures, **naive.params(measures), p_dtype=p_dtype, q_dtype=q_dtype, **opts)
        ref = fastkl.divergences(p_ref, q_ref, measures=measures, **naive.params(measures), **opts)
        same_results(got, ref)
    status = got.column("status").to_pylist()
    assert status[2] == status[7] == "null" and status[5] == "null_element"
    assert status.count("ok") >= ROWS - 4
    ent = fastkl.divergences(p, measures="entropy", p_dtype=p_dtype, **opts)
    same_results(ent, fastkl.divergences(p_ref, measures="entropy", **opts))


@pytest.mark.parametrize("code", [FLOAT16, BFLOAT16])
def test_half_against_exact_reference(rng, code):
    p_bits, q_bits = rows_bits(rng, code, n=10), rows_bits(rng, code, n=10)
    dtype = "float16" if code == FLOAT16 else "bfloat16"
    got = fastkl.divergences(p_bits, q_bits, measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), dtype=dtype, sum_tol=2e-2, on_invalid="null")
    p32, q32 = decoded(p_bits, code), decoded(q_bits, code)
    refs = naive.reference_rows(p32.tolist(), q32.tolist(), fastkl.MEASURES, sum_tol=2e-2)
    failures = []
    for m in fastkl.MEASURES:
        failures += naive.check_against_reference(naive.column_values(got, m), refs[m], naive.rel_bound(np.float32),
                                                  what=m)
    assert not failures, failures[:5]
    assert sum(r is not None for r in refs["kl"]) == 10


def test_numpy_float16_is_viewed_and_matches(rng):
    p = decoded(rows_bits(rng, FLOAT16), FLOAT16).astype(np.float16)
    q = decoded(rows_bits(rng, FLOAT16), FLOAT16).astype(np.float16)
    _, [(_, ps, qs)] = aligned_sides(p, q)
    assert ps.decode == FLOAT16 and ps.values.dtype == np.uint16 and np.shares_memory(ps.values, p)
    assert ps.row(3).dtype == np.float32
    np.testing.assert_array_equal(ps.row(3), p[3].astype(np.float32))  # what error messages show
    wide = ps.astype(np.float64)
    assert wide.decode == 0 and np.array_equal(wide.row(3), p[3].astype(np.float64))
    for measures in (("kl",), fastkl.MEASURES):
        same_results(fastkl.divergences(p, q, measures=measures, **naive.params(measures), sum_tol=2e-2, status=True, on_invalid="null"),
                     fastkl.divergences(p.astype(np.float32), q.astype(np.float32), measures=measures, sum_tol=2e-2,
                                        status=True, on_invalid="null", **naive.params(measures)))


def test_masked_and_chunked_float16(rng):
    p = decoded(rows_bits(rng, FLOAT16), FLOAT16).astype(np.float16)
    q = decoded(rows_bits(rng, FLOAT16), FLOAT16).astype(np.float16)
    masked = np.ma.masked_array(p, mask=np.zeros(p.shape, bool))
    masked[4, 0] = np.ma.masked
    masked[6] = np.ma.masked
    t = fastkl.divergences(masked, q, sum_tol=2e-2, status=True, on_invalid="null")
    status = t.column("status").to_pylist()
    assert status[4] == "null_element" and status[6] == "null"
    p_arr, p_ref = arrow_half(p.view(np.uint16), FLOAT16)
    q_arr, q_ref = arrow_half(q.view(np.uint16), FLOAT16, pad=0)
    p_chunks, q_chunks = naive.chunked(p_arr, [5, 11]), naive.chunked(q_arr, [8])
    same_results(fastkl.divergences(p_chunks, q_chunks, measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), sum_tol=2e-2),
                 fastkl.divergences(p_ref, q_ref, measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), sum_tol=2e-2))


def test_arrow_float16_child_is_not_copied(rng):
    p, _ = arrow_half(rows_bits(rng, FLOAT16), FLOAT16)
    _, [(_, ps, _)] = aligned_sides(p, None)
    child = np.frombuffer(p.values.buffers()[1], dtype=np.uint16)
    assert ps.decode == FLOAT16 and np.shares_memory(ps.values, child)


def test_long_rows_over_threads(rng):
    """Rows longer than a block, several blocks: a scratch row per kernel call."""
    p = naive.make_probs(rng, 40, 5000, np.float32).astype(np.float16)
    q = naive.make_probs(rng, 40, 5000, np.float32).astype(np.float16)
    got = fastkl.divergences(p, q, measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), threads=2, sum_tol=1e-2)
    ref = fastkl.divergences(p.astype(np.float32), q.astype(np.float32), measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), threads=1,
                             sum_tol=1e-2)
    same_results(got, ref)


def test_mixed_precision_pairs(rng):
    p16 = decoded(rows_bits(rng, FLOAT16), FLOAT16).astype(np.float16)
    q32 = naive.make_probs(rng, ROWS, K, np.float32)
    same_results(fastkl.divergences(p16, q32, measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), sum_tol=2e-2),
                 fastkl.divergences(p16.astype(np.float32), q32, measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), sum_tol=2e-2))
    pb = rows_bits(rng, BFLOAT16)
    q64 = naive.make_probs(rng, ROWS, K, np.float64)
    _, [(_, ps, qs)] = aligned_sides(pb, q64, "bfloat16")
    assert ps.values.dtype == np.float64 and ps.decode == 0  # a float64 side widens the other
    same_results(fastkl.divergences(pb, q64, measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), p_dtype="bfloat16", sum_tol=2e-2),
                 fastkl.divergences(decoded(pb, BFLOAT16).astype(np.float64), q64, measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES),
                                    sum_tol=2e-2))
    # float16 p against bfloat16 q: both stay 16-bit
    qb = rows_bits(rng, BFLOAT16)
    same_results(fastkl.divergences(p16, qb, measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), q_dtype="bfloat16", sum_tol=2e-2),
                 fastkl.divergences(p16.astype(np.float32), decoded(qb, BFLOAT16), measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES),
                                    sum_tol=2e-2))


# ---------------------------------------------------------------- bad rows


@pytest.mark.parametrize("code", [FLOAT16, BFLOAT16])
def test_special_bit_patterns_are_bad_rows(code):
    half = f16_bits if code == FLOAT16 else bf16_bits
    nan = 0x7E00 if code == FLOAT16 else 0x7FC0
    pinf = 0x7C00 if code == FLOAT16 else 0x7F80
    ninf = pinf | 0x8000
    good = half([0.5, 0.25, 0.25])
    p = np.stack([good] * 5)
    p[0, 1] = nan
    p[1, 1] = pinf
    p[2, 1] = ninf
    p[3, 1] = half([-0.25])[0]
    p[3, 2] = half([0.5])[0]
    p[4, 2] = 0x8000  # -0: a zero probability, not negative (sum 0.75: not normalised)
    dtype = "float16" if code == FLOAT16 else "bfloat16"
    t = fastkl.divergences(p, np.stack([good] * 5), measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), dtype=dtype, on_invalid="null",
                           status=True)
    assert t.column("status").to_pylist() == ["nan", "non_finite", "non_finite", "negative", "not_normalized"]
    with pytest.raises(fastkl.InvalidRowError, match=r"p\[1\] = -0\.25 is a negative probability"):
        fastkl.kl(p[3:4], np.stack([good]), dtype=dtype)
    with pytest.raises(fastkl.InvalidRowError, match=r"p\[1\] is -inf"):
        fastkl.kl(p[2:3], np.stack([good]), dtype=dtype)
    lp = np.stack([half(np.log([0.5, 0.25, 0.25]))] * 2)
    lp[1, 0] = pinf
    t = fastkl.divergences(lp, lp[:1].repeat(2, 0), dtype=dtype, kind="logprobs", on_invalid="null", status=True,
                           sum_tol=2e-2)
    assert t.column("status").to_pylist() == ["ok", "non_finite"]


# ---------------------------------------------------------------- declarations


def test_declared_types_must_match_the_column():
    p32 = pa.array([[0.5, 0.5]], type=pa.list_(pa.float32()))
    p16 = pa.array([np.array([0.5, 0.5], np.float16)], type=pa.list_(pa.float16()))
    u16 = pa.array([[0x3800, 0x3800]], type=pa.list_(pa.uint16()))
    with pytest.raises(OptionError, match=r"^p: declared p_dtype='bfloat16' but got list<float>; bfloat16 needs 16-bit"):
        fastkl.kl(p32, p32, p_dtype="bfloat16")
    with pytest.raises(OptionError, match=r"^q: declared q_dtype='float16' but got dtype float64"):
        fastkl.kl(np.full((1, 2), 0.5), np.full((1, 2), 0.5), q_dtype="float16")
    with pytest.raises(OptionError, match=r"^p: declared p_dtype='bfloat16' but got list<halffloat>"):
        fastkl.kl(p16, p16, dtype="bfloat16")
    with pytest.raises(OptionError, match=r"^p: declared p_dtype='float32' but got list<double>"):
        fastkl.kl(pa.array([[0.5, 0.5]]), p32, p_dtype="float32")
    with pytest.raises(OptionError, match=r"^p: got list<uint16>; integer values .*p_dtype='bfloat16'"):
        fastkl.kl(u16, p32)
    with pytest.raises(OptionError, match=r"unknown dtype 'float8'"):
        fastkl.kl(p32, p32, dtype="float8")
    assert fastkl.kl(u16, p16, p_dtype="float16")[0] == 0.0  # 0x3800 is float16 0.5
    assert fastkl.kl(u16, u16, dtype="float16")[0] == 0.0
    assert fastkl.kl(p32, p32, dtype="float32")[0] == 0.0


def test_options_dtype_sets_both_and_sides_override():
    o = Options.from_kwargs(dtype="bfloat16", q_dtype="float16")
    assert (o.p_dtype, o.q_dtype) == ("bfloat16", "float16")
    assert (Options().p_dtype, Options().q_dtype) == (None, None)
    with pytest.raises(OptionError, match="unknown q_dtype 'half'"):
        Options.from_kwargs(q_dtype="half")


# ---------------------------------------------------------------- other libraries


def test_ml_dtypes_bfloat16(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    p_bits, q_bits = rows_bits(rng, BFLOAT16), rows_bits(rng, BFLOAT16)
    p, q = p_bits.view(ml_dtypes.bfloat16), q_bits.view(ml_dtypes.bfloat16)
    _, [(_, ps, _)] = aligned_sides(p, q)
    assert ps.decode == BFLOAT16 and np.shares_memory(ps.values, p)
    same_results(fastkl.divergences(p, q, measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), sum_tol=2e-2, status=True, on_invalid="null"),
                 fastkl.divergences(p.astype(np.float32), q.astype(np.float32), measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES),
                                    sum_tol=2e-2, status=True, on_invalid="null"))
    with pytest.raises(OptionError, match=r"declared p_dtype='float16' but got dtype bfloat16"):
        fastkl.kl(p, q, dtype="float16")
    masked = np.ma.masked_array(p, mask=np.zeros(p.shape, bool))
    masked[1, 2] = np.ma.masked
    t = fastkl.divergences(masked, q, sum_tol=2e-2, status=True, on_invalid="null")
    assert t.column("status").to_pylist()[1] == "null_element"


def test_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    p32 = decoded(rows_bits(rng, BFLOAT16), BFLOAT16)
    q32 = decoded(rows_bits(rng, BFLOAT16), BFLOAT16)
    ref = fastkl.divergences(p32, q32, measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), sum_tol=2e-2)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        p, q = torch.from_numpy(p32).to(dtype), torch.from_numpy(q32).to(dtype)
        got = fastkl.divergences(p, q, measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), sum_tol=2e-2)
        exp = fastkl.divergences(p.float().numpy(), q.float().numpy(), measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), sum_tol=2e-2)
        same_results(got, exp if dtype != torch.float64 else fastkl.divergences(
            p.numpy(), q.numpy(), measures=fastkl.MEASURES, **naive.params(fastkl.MEASURES), sum_tol=2e-2))
        if dtype == torch.bfloat16:
            same_results(got, ref)  # bfloat16 of bfloat16-exact values: no rounding
    tb = torch.from_numpy(p32).bfloat16()
    _, [(_, ps, _)] = aligned_sides(tb, None)
    assert ps.decode == BFLOAT16 and np.shares_memory(ps.values, tb.view(torch.int16).numpy())  # no copy
    grad = torch.from_numpy(p32).requires_grad_(True)
    np.testing.assert_array_equal(fastkl.kl(grad, q32, sum_tol=2e-2), fastkl.kl(p32, q32, sum_tol=2e-2))
    with pytest.raises(OptionError, match=r"torch.bfloat16"):
        fastkl.kl(torch.from_numpy(p32).bfloat16(), q32, p_dtype="float16")
    with pytest.raises(OptionError, match=r"^p: a torch tensor on meta"):
        fastkl.kl(torch.empty((2, 3), device="meta"), q32)


# ---------------------------------------------------------------- jobs


def test_cli_job_over_parquet_bfloat16_and_float16(rng, tmp_path):
    n, k = 60, 16
    p32 = decoded(rows_bits(rng, BFLOAT16, n=n, k=k), BFLOAT16)
    q32 = decoded(rows_bits(rng, BFLOAT16, n=n, k=k), BFLOAT16)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
    as_list = lambda x: pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1)))
    src = tmp_path / "bf16.parquet"
    pq.write_table(pa.table({"id": np.arange(n), "p": as_list(bf16_bits(p32)), "q": as_list(bf16_bits(q32))}), src,
                   row_group_size=25)
    runner = CliRunner()
    r = runner.invoke(main, ["run", str(src), str(tmp_path / "out"), "--dtype", "bfloat16", "-m", "kl", "-m", "js",
                             "--keep", "id", "--sum-tol", "0.02", "--quiet"])
    assert r.exit_code == 0, r.output
    out = pq.read_table(tmp_path / "out")
    ref = fastkl.divergences(p32, q32, measures=("kl", "js"), sum_tol=0.02)
    assert out.column("id").to_pylist() == list(range(n))
    same_results(out.select(["kl", "js"]), ref)
    r = runner.invoke(main, ["run", str(src), str(tmp_path / "undeclared"), "--quiet"])
    assert r.exit_code == 2 and "list<uint16>" in r.output and "--p-dtype bfloat16" in r.output

    src16 = tmp_path / "f16.parquet"
    pq.write_table(pa.table({"p": as_list(p32.astype(np.float16)), "q": as_list(q32.astype(np.float16))}), src16)
    assert pq.read_schema(src16).field("p").type == pa.list_(pa.float16())
    r = runner.invoke(main, ["run", str(src16), str(tmp_path / "out16"), "--sum-tol", "0.02", "--quiet"])
    assert r.exit_code == 0, r.output
    ref16 = fastkl.kl(p32.astype(np.float16).astype(np.float32), q32.astype(np.float16).astype(np.float32),
                      sum_tol=0.02)
    np.testing.assert_array_equal(pq.read_table(tmp_path / "out16").column("kl").to_numpy(), ref16)
    r = runner.invoke(main, ["run", str(src16), str(tmp_path / "bad"), "--q-dtype", "bfloat16", "--quiet"])
    assert r.exit_code == 2 and "declared --q-dtype bfloat16 but got list<halffloat>" in r.output


def test_a_job_warns_once_about_dictionary_encoded_float16(tmp_path, rng):
    """pyarrow dictionary-encodes 16-bit values by default, which reads 3-6x slower: say so at the start."""
    import warnings

    p = rng.dirichlet(np.ones(8), 50).astype(np.float16)
    t = pa.table({"p": pa.array(list(p), pa.list_(pa.float16())), "q": pa.array(list(p[::-1]), pa.list_(pa.float16()))})
    for i in range(3):
        pq.write_table(t, tmp_path / f"dict-{i}.parquet")
    pq.write_table(t, tmp_path / "plain.parquet", use_dictionary=False)

    def warned(source, dest):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fastkl.run(source, tmp_path / dest, quiet=True, sum_tol=2e-2)
        return [str(x.message) for x in w if issubclass(x.category, fastkl.FastKLWarning)]

    got = warned([str(tmp_path / f"dict-{i}.parquet") for i in range(3)], "a")
    assert len(got) == 1 and "dict-0.parquet (and 2 more of the 3 files): columns p, q store float16" in got[0], got
    assert "use_dictionary=False" in got[0]
    assert warned(str(tmp_path / "plain.parquet"), "b") == []
    result = CliRunner().invoke(main, ["run", str(tmp_path / "dict-1.parquet"), str(tmp_path / "c"), "-q",
                                       "--sum-tol", "0.02"])
    assert result.exit_code == 0 and "warning:" in result.output and "column" in result.output, result.output
