"""Sparse top-k rows through the public API (SPEC §10): token ids, the three
tails, bounds against the full distributions the rows were cut from, listed
mass, sequence rows of top-k positions, dense-vs-sparse pairs, bad ids."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import fastkl
import naive_sparse as ns
from test_naive_sparse import position
from test_sparse_kernel import cap_slack, residue_tol

PROBS, LOGPROBS = 0, 1  # the kind codes of test_sparse_kernel's helpers

MEASURES = ns.MEASURES


def _tol(dtype) -> float:
    return 2e-5 if dtype == "float32" else 1e-9


def _close(got, want, tol) -> bool:
    if want is None or got is None:
        return got is None and want is None
    if math.isinf(want) or math.isinf(got):
        return got == want
    return abs(got - want) <= tol * (1 + abs(want))


def _lists(rows, value_type):
    return pa.array([list(map(float, r)) for r in rows], type=pa.list_(value_type))


@st.composite
def sparse_rows(draw, max_rows: int = 5, max_V: int = 7):
    n = draw(st.integers(1, max_rows))
    rows = [draw(position(max_V)) for _ in range(n)]
    shuffle = draw(st.booleans())
    out = []
    for p, q, p_ids, q_ids in rows:
        if shuffle:  # ids unsorted within a position
            p_ids, q_ids = p_ids[::-1].copy(), q_ids[::-1].copy()
        out.append((p, q, p_ids, q_ids))
    return out


def _columns(rows, dtype, kind):
    vt = pa.float32() if dtype == "float32" else pa.float64()

    def values(full, ids):
        v = full[ids].astype(dtype)
        with np.errstate(divide="ignore"):
            return np.log(v) if kind == "logprobs" else v

    p = _lists([values(p, pi) for p, _, pi, _ in rows], vt)
    q = _lists([values(q, qi) for _, q, _, qi in rows], vt)
    p_ids = pa.array([list(map(int, pi)) for _, _, pi, _ in rows], type=pa.list_(pa.int32()))
    q_ids = pa.array([list(map(int, qi)) for _, _, _, qi in rows], type=pa.list_(pa.int64()))
    return p, q, p_ids, q_ids


def _stored(full, ids, dtype, kind):
    """(values as the row stores them, the probabilities the kernel decodes from them)."""
    v = full[ids].astype(dtype)
    if kind == "logprobs":
        with np.errstate(divide="ignore"):
            v = np.log(v)
        return v, np.exp(v.astype(np.float64))
    return v, v.astype(np.float64)


def _rounding(p_stored, q_stored, kind):
    """The reference's rounding arguments matching the kernel's (docs/sparse-bounds.md §1)."""
    code = LOGPROBS if kind == "logprobs" else PROBS
    return dict(residue=(residue_tol(p_stored, code), residue_tol(q_stored, code)),
                cap_slack=(cap_slack(p_stored, code), cap_slack(q_stored, code)))


@settings(max_examples=60, deadline=None)
@given(sparse_rows(), st.sampled_from(["float64", "float32"]), st.sampled_from(["probs", "logprobs"]),
       st.booleans())
def test_bucket_and_bounds_match_the_references_and_contain_the_truth(rows, dtype, kind, with_vocab):
    vocab = max(len(r[0]) for r in rows) if with_vocab else None
    if with_vocab and len({len(r[0]) for r in rows}) > 1:
        vocab = None  # one vocabulary per call
    p, q, p_ids, q_ids = _columns(rows, dtype, kind)
    table = fastkl.divergences(p, q, MEASURES, p_ids=p_ids, q_ids=q_ids, vocab=vocab, kind=kind,
                               status=True)
    assert table.column("status").to_pylist() == ["ok"] * len(rows)
    tol = _tol(dtype)
    for i, (pf, qf, pi, qi) in enumerate(rows):
        (ps, pseen), (qs, qseen) = _stored(pf, pi, dtype, kind), _stored(qf, qi, dtype, kind)
        args = (pi, pseen, qi, qseen)
        rounding = _rounding(ps, qs, kind)
        assert _close(table.column("listed_mass_p")[i].as_py(), float(np.sum(pseen)), tol)
        assert _close(table.column("listed_mass_q")[i].as_py(), float(np.sum(qseen)), tol)
        for m in MEASURES:
            got = table.column(m)[i].as_py()
            lo, hi = table.column(f"{m}_lower")[i].as_py(), table.column(f"{m}_upper")[i].as_py()
            b = ns.bucket(m, *args, vocab=vocab, **rounding)
            ref_lo, ref_hi = ns.bounds(m, *args, vocab=vocab, **rounding)
            truth = ns.full_value(m, pf, qf)
            note(f"row {i} {m}: got {got} [{lo}, {hi}], bucket {b} [{ref_lo}, {ref_hi}], truth {truth}")
            assert _close(got, b, tol), (i, m)
            assert _close(lo, ref_lo, tol) and _close(hi, ref_hi, tol), (i, m)
            if dtype == "float64" and kind == "probs":  # the stored values are the full ones
                assert lo <= truth + 1e-9 * (1 + abs(truth)) and truth <= hi + 1e-9 * (1 + abs(truth)), (i, m)


@settings(max_examples=40, deadline=None)
@given(sparse_rows(max_V=6), st.sampled_from(["renormalize", "uniform"]))
def test_the_other_tails_match_their_references(rows, tail):
    V = len(rows[0][0])
    rows = [r for r in rows if len(r[0]) == V]
    p, q, p_ids, q_ids = _columns(rows, "float64", "probs")
    table = fastkl.divergences(p, q, MEASURES, p_ids=p_ids, q_ids=q_ids, vocab=V, tail=tail)
    ref = getattr(ns, tail)
    for i, (pf, qf, pi, qi) in enumerate(rows):
        for m in MEASURES:
            want = ref(m, pi, pf[pi], qi, qf[qi], vocab=V)
            assert _close(table.column(m)[i].as_py(), want, 1e-9), (i, m, tail)
            # the bounds do not depend on the tail
            lo, hi = ns.bounds(m, pi, pf[pi], qi, qf[qi], vocab=V)
            assert _close(table.column(f"{m}_lower")[i].as_py(), lo, 1e-9)


def test_positional_kl_of_top_k_lists_is_refused_and_ids_give_the_right_answer():
    """The trap of the issue: two top-k lists of different ids compared by position."""
    rng = np.random.default_rng(1)
    V, k = 50, 5
    p_full = rng.dirichlet(np.full(V, 0.3))
    q_full = rng.dirichlet(np.full(V, 0.3))
    p_ids, q_ids = np.argsort(-p_full)[:k], np.argsort(-q_full)[:k]
    p, q = p_full[p_ids][None, :], q_full[q_ids][None, :]
    with pytest.raises(fastkl.InvalidRowError, match="looks like a top-k row.*p_ids"):
        fastkl.kl(p, q)
    got = fastkl.divergences(p, q, ["kl"], p_ids=p_ids[None, :], q_ids=q_ids[None, :], vocab=V)
    truth = ns.full_value("kl", p_full, q_full)
    assert got["kl_lower"][0].as_py() <= truth <= got["kl_upper"][0].as_py()
    assert got["kl"][0].as_py() == pytest.approx(ns.bucket("kl", p_ids, p[0], q_ids, q[0], vocab=V))


@pytest.mark.parametrize("dense_side", ["p", "q"])
def test_a_dense_side_is_exact(dense_side):
    rng = np.random.default_rng(2)
    V = 12
    pf, qf = rng.dirichlet(np.ones(V), size=2)
    k = 4
    if dense_side == "p":
        ids = np.argsort(-qf)[:k]
        kw = dict(q_ids=ids[None, :])
        p, q = pf[None, :], qf[ids][None, :]
        args = (np.arange(V), pf, ids, qf[ids])
    else:
        ids = np.argsort(-pf)[:k]
        kw = dict(p_ids=ids[None, :])
        p, q = pf[ids][None, :], qf[None, :]
        args = (ids, pf[ids], np.arange(V), qf)
    table = fastkl.divergences(p, q, MEASURES, **kw)
    for m in MEASURES:
        lo, hi = ns.bounds(m, *args, vocab=V)
        assert _close(table[f"{m}_lower"][0].as_py(), lo, 1e-9), m
        assert _close(table[f"{m}_upper"][0].as_py(), hi, 1e-9), m
        assert _close(table[m][0].as_py(), ns.bucket(m, *args, vocab=V), 1e-9), m
    assert table["listed_mass_" + dense_side][0].as_py() == pytest.approx(1.0)


def test_sequences_of_top_k_positions_with_a_mask(rng):
    V, k, n, t = 30, 4, 3, 5
    P = rng.dirichlet(np.ones(V), size=(n, t))
    Q = rng.dirichlet(np.ones(V), size=(n, t))
    pid, qid = np.argsort(-P, axis=2)[..., :k], np.argsort(-Q, axis=2)[..., :k]
    pv, qv = np.take_along_axis(P, pid, 2), np.take_along_axis(Q, qid, 2)
    mask = rng.random((n, t)) < 0.7
    mask[:, 0] = True
    table = fastkl.divergences(pv, qv, ["kl", "js"], p_ids=pid, q_ids=qid, vocab=V, mask=mask,
                               per_token=True)
    for i in range(n):
        for m in ("kl", "js"):
            per = [ns.bucket(m, pid[i, j], pv[i, j], qid[i, j], qv[i, j], vocab=V) for j in range(t)]
            lows = [ns.bounds(m, pid[i, j], pv[i, j], qid[i, j], qv[i, j], vocab=V)[0] for j in range(t)]
            want = sum(v for v, c in zip(per, mask[i]) if c)
            assert table[m][i].as_py() == pytest.approx(want, rel=1e-12)
            assert table[f"{m}_mean"][i].as_py() == pytest.approx(want / mask[i].sum(), rel=1e-12)
            assert table[f"{m}_lower"][i].as_py() == pytest.approx(
                sum(v for v, c in zip(lows, mask[i]) if c), rel=1e-9, abs=1e-12)
            toks = table[f"{m}_tokens"][i].as_py()
            assert [v is None for v in toks] == [not c for c in mask[i]]
        listed = np.mean([pv[i, j].sum() for j in range(t) if mask[i, j]])
        assert table["listed_mass_p"][i].as_py() == pytest.approx(listed, rel=1e-12)
        assert table["tokens"][i].as_py() == int(mask[i].sum())


def test_bounds_can_be_left_out():
    p, ids = [[0.6, 0.3]], [[3, 1]]
    table = fastkl.divergences(p, p, ["kl"], p_ids=ids, q_ids=ids, bounds=False)
    assert table.column_names == ["kl", "listed_mass_p", "listed_mass_q"]
    assert table["kl"][0].as_py() == 0.0


@pytest.mark.parametrize("p_ids, reason, detail", [
    ([[1, 2.5]], "id_not_integer", "p_ids[1] is not a whole number"),
    ([[1, 12]], "id_out_of_range", "p_ids[1] = 12 is not in [0, 10)"),
    ([[-1, 2]], "id_out_of_range", "p_ids[0] = -1 is not in [0, 10)"),
    ([[4, 4]], "duplicate_id", "p_ids[1] = 4 repeats p_ids[0]"),
    ([[4, 5, 6]], "ids_length_mismatch", "p has 2 values, p_ids 3 ids"),
    ([[4, None]], "null_element", ""),
])
def test_bad_ids_name_the_row_and_the_id(p_ids, reason, detail):
    p = [[0.5, 0.3], [0.5, 0.3]]
    ids = p_ids + [[1, 2]]
    with pytest.raises(fastkl.InvalidRowError) as e:
        fastkl.kl(p, p, p_ids=ids, q_ids=[[1, 2], [1, 2]], vocab=10)
    assert (e.value.reason, e.value.row) == (reason, 0)
    assert detail in str(e.value)
    table = fastkl.divergences(p, p, ["kl"], p_ids=ids, q_ids=[[1, 2], [1, 2]], vocab=10,
                               on_invalid="null", status=True)
    assert table["status"].to_pylist() == [reason, "ok"]


def test_a_bad_position_of_a_sparse_sequence_is_named():
    p = [[[0.5, 0.3], [0.5, 0.3]]]
    with pytest.raises(fastkl.InvalidRowError, match=r"row 0, position 1: p_ids\[1\] = 3 repeats p_ids\[0\]"):
        fastkl.kl(p, p, p_ids=[[[1, 2], [3, 3]]], q_ids=[[[1, 2], [3, 4]]])


def test_listed_mass_above_one_is_not_normalized():
    with pytest.raises(fastkl.InvalidRowError, match="p lists a mass of 1.2"):
        fastkl.kl([[0.7, 0.5]], [[0.5, 0.3]], p_ids=[[1, 2]], q_ids=[[1, 2]])


@pytest.mark.parametrize("kw, match", [
    (dict(tail="uniform"), "tail='uniform' spreads the unlisted mass"),
    (dict(kind="logits"), "top-k logits cannot be decoded"),
    (dict(normalize=True), "normalize and smoothing do not apply to top-k rows"),
    (dict(tail="nope"), "unknown tail"),
    (dict(vocab=0), "vocab must be a whole number"),
])
def test_option_errors(kw, match):
    with pytest.raises(fastkl.OptionError, match=match):
        fastkl.kl([[0.5, 0.3]], [[0.5, 0.3]], p_ids=[[1, 2]], q_ids=[[1, 2]], **kw)


def test_ids_without_values_of_the_same_shape_are_refused():
    with pytest.raises(fastkl.OptionError, match="p_ids"):
        fastkl.kl([[[0.5, 0.3]]], [[[0.5, 0.3]]], p_ids=[[1, 2]], q_ids=[[[1, 2]]])


def test_half_precision_values_with_ids():
    p = np.array([[0.5, 0.25, 0.125]], dtype=np.float16)
    ids = np.array([[7, 3, 1]])
    a = fastkl.divergences(p, p[:, ::-1].copy(), ["kl"], p_ids=ids, q_ids=ids[:, ::-1].copy(), vocab=10)
    b = fastkl.divergences(p.astype(np.float32), p[:, ::-1].astype(np.float32), ["kl"], p_ids=ids,
                           q_ids=ids[:, ::-1].copy(), vocab=10)
    assert a.to_pylist() == b.to_pylist()


def test_bfloat16_log_probs_with_ids_in_sequences():
    """bfloat16 bits declared on a list<list<uint16>> column, decoded in the sparse kernel."""
    lp = np.log(np.array([[[0.5, 0.25, 0.125], [0.5, 0.25, 0.0625]]], dtype=np.float32))
    bits = (lp.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bfloat16
    decoded = (bits.astype(np.uint32) << 16).view(np.float32)
    ids = np.array([[[7, 3, 1], [2, 3, 4]]])
    col = pa.array(bits.tolist(), type=pa.list_(pa.list_(pa.uint16())))
    a = fastkl.divergences(col, col, ["kl", "js"], p_ids=ids, q_ids=ids[..., ::-1].copy(), vocab=10,
                           kind="logprobs", dtype="bfloat16")
    b = fastkl.divergences(decoded, decoded, ["kl", "js"], p_ids=ids, q_ids=ids[..., ::-1].copy(), vocab=10,
                           kind="logprobs")
    for m in ("kl", "js"):
        assert a[m].to_pylist() == pytest.approx(b[m].to_pylist(), rel=1e-12)
    assert a["listed_mass_p"][0].as_py() == pytest.approx(b["listed_mass_p"][0].as_py(), rel=1e-12)
    with pytest.raises(fastkl.OptionError, match="bfloat16"):
        fastkl.kl(decoded, decoded, p_ids=ids, q_ids=ids, kind="logprobs", dtype="bfloat16")


def test_entropy_alone_reads_no_q_and_says_so():
    table = fastkl.divergences([[0.5, 0.3]], None, ["entropy"], p_ids=[[1, 2]], vocab=5)
    assert table["listed_mass_p"][0].as_py() == pytest.approx(0.8)
    assert table["listed_mass_q"][0].as_py() is None  # null, not NaN
    lo, hi = table["entropy_lower"][0].as_py(), table["entropy_upper"][0].as_py()
    assert lo == pytest.approx(table["entropy"][0].as_py()) and lo < hi
