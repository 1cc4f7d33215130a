"""Sequence rows (SPEC §10): one distribution per position, masks and lengths,
per-sequence sums and means, per-token lists, bad positions named."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import fastkl
import naive
from naive import MEASURES

LIST_KINDS = ("list", "large_list", "fixed_size_list")
BAD = ("nan", "negative", "null_position", "null_element", "unnormalized")


def _position(rng, k, dtype, kind):
    p = naive.make_rows(rng, kind, 1, k, dtype=dtype, zero_frac=0.2 if kind == "probs" else 0.0)[0]
    return [float(v) for v in p]


def _spoil(row, how, kind):
    row = list(row)
    if how == "nan":
        row[0] = math.nan
    elif how == "negative":
        row[-1] = -0.5 if kind == "probs" else 0.5
    elif how == "null_element":
        row[0] = None
    elif how == "unnormalized":
        row = [v * 3 for v in row] if kind == "probs" else [v + 1.5 for v in row]
    return row


@st.composite
def sequence_cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    outer, inner = draw(st.sampled_from(LIST_KINDS)), draw(st.sampled_from(LIST_KINDS))
    n = draw(st.integers(1, 6))
    fixed_t = draw(st.integers(1, 5)) if outer == "fixed_size_list" else None
    k_fixed = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(["float64", "float32"]))
    kind = draw(st.sampled_from(["probs", "logprobs"]))
    masking = draw(st.sampled_from(["none", "bool", "int8", "lengths"]))
    P, Q, masks, lengths = [], [], [], []
    for _ in range(n):
        t = fixed_t if fixed_t is not None else draw(st.integers(0, 5))
        ks = [k_fixed if inner == "fixed_size_list" else draw(st.integers(1, 6)) for _ in range(t)]
        ps = [_position(rng, k, np.dtype(dtype), kind) for k in ks]
        qs = [_position(rng, k, np.dtype(dtype), kind) for k in ks]
        m = [int(draw(st.integers(0, 1))) for _ in range(t)]
        length = draw(st.integers(0, t))
        if t and draw(st.integers(0, 4)) == 0:  # a bad position, maybe not counted
            j = draw(st.integers(0, t - 1))
            how = draw(st.sampled_from(BAD))
            side = draw(st.sampled_from([ps, qs]))
            side[j] = None if how == "null_position" else _spoil(side[j], how, kind)
        if draw(st.integers(0, 9)) == 0:
            ps = None
        P.append(ps)
        Q.append(qs)
        masks.append(m)
        lengths.append(length)
    if masking in ("bool", "int8") and n and draw(st.booleans()):  # a null mask entry / a wrong-length mask
        i = draw(st.integers(0, n - 1))
        if masks[i] and draw(st.booleans()):
            masks[i][0] = None
        elif outer != "fixed_size_list":
            masks[i] = masks[i] + [1]
    pad = draw(st.sampled_from([0, 2]))
    return dict(P=P, Q=Q, masks=masks, lengths=lengths, masking=masking, outer=outer, inner=inner,
                dtype=dtype, kind=kind, pad=pad)


def _mask_column(c):
    if c["masking"] in ("none", "lengths"):
        return None
    t = pa.bool_() if c["masking"] == "bool" else pa.int8()
    vals = [[None if v is None else (bool(v) if c["masking"] == "bool" else v) for v in m] for m in c["masks"]]
    return pa.array(vals, type=pa.list_(t))


@settings(max_examples=60, deadline=None)
@given(sequence_cases())
def test_sequences_match_the_reference(c):
    note(c)
    p = naive.nested_array(c["P"], c["dtype"], c["outer"], c["inner"], pad=c["pad"])
    q = naive.nested_array(c["Q"], c["dtype"], c["outer"], c["inner"], pad=c["pad"])
    extra = {}
    if c["masking"] in ("bool", "int8"):
        extra["mask"] = _mask_column(c)
    elif c["masking"] == "lengths":
        extra["lengths"] = np.array(c["lengths"], dtype=np.int64)
    table = fastkl.divergences(p, q, MEASURES, **naive.params(MEASURES), kind=c["kind"], status=True, on_invalid="null",
                               per_token=True, **extra)
    rel = naive.rel_bound(np.dtype(c["dtype"]))
    statuses = table.column("status").to_pylist()
    for i in range(len(c["P"])):
        kw = {}
        if c["masking"] in ("bool", "int8"):
            kw["mask"] = c["masks"][i]
        elif c["masking"] == "lengths":
            kw["length"] = c["lengths"][i]
        ref = naive.sequence_reference(MEASURES, c["P"][i], c["Q"][i], kind=c["kind"], **kw)
        assert statuses[i] in ref.status, (i, statuses[i], ref.status)
        tokens = table.column("tokens")[i].as_py()
        if statuses[i] in ("ok", "no_tokens"):
            assert tokens == ref.tokens
        else:
            assert tokens is None
        for m in MEASURES:
            got, mean = table.column(m)[i].as_py(), table.column(f"{m}_mean")[i].as_py()
            per_token = table.column(f"{m}_tokens")[i].as_py()
            if statuses[i] != "ok":
                assert got is None and mean is None
                assert (per_token is None) == (statuses[i] != "no_tokens")
                continue
            ok, msg = ref.total(m, rel).check(got, 1.0)
            assert ok, (i, m, msg)
            if math.isfinite(got):
                assert mean == pytest.approx(got / tokens, rel=1e-15)
            assert len(per_token) == len(c["P"][i])
            for j, (g, r) in enumerate(zip(per_token, ref.refs[m])):
                assert (g is None) == (r is None), (i, j, m)
                if r is not None:
                    ok, msg = r.check(g, rel)
                    assert ok, (i, j, m, msg)


def test_sequence_sums_equal_token_rows(rng):
    """A 3-D array of sequences gives the sums of the same positions as token rows."""
    P = naive.make_probs(rng, 12, 7).reshape(3, 4, 7)
    Q = naive.make_probs(rng, 12, 7).reshape(3, 4, 7)
    table = fastkl.divergences(P, Q, MEASURES, **naive.params(MEASURES))
    flat = fastkl.divergences(P.reshape(12, 7), Q.reshape(12, 7), MEASURES, **naive.params(MEASURES))
    for m in MEASURES:
        per_position = np.array(flat.column(m).to_pylist()).reshape(3, 4)
        np.testing.assert_allclose(table.column(m).to_numpy(), per_position.sum(axis=1), rtol=1e-14)
        np.testing.assert_allclose(table.column(f"{m}_mean").to_numpy(), per_position.mean(axis=1), rtol=1e-14)
    assert table.column("tokens").to_pylist() == [4, 4, 4]
    assert "kl_tokens" not in table.column_names


def test_a_bad_position_is_named():
    p = [[[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.25, 0.25], [0.5, 0.5]]]
    q = [[[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]]
    with pytest.raises(fastkl.InvalidRowError) as e:
        fastkl.kl(p, q)
    err = e.value
    assert (err.reason, err.row, err.position) == ("not_normalized", 1, 1)
    assert "row 1, position 1: p sums to 0.5" in str(err)
    # the same position, not counted, is skipped without validation
    got = fastkl.kl(p, q, mask=[[1, 1], [1, 0, 1]])
    assert got.tolist() == [0.0, 0.0]


def test_sequence_level_reasons_say_why():
    p = [[[1.0], [1.0]], [[1.0]]]
    with pytest.raises(fastkl.InvalidRowError, match=r"row 0: p has 2 positions, q has 1"):
        fastkl.kl(p, [[[1.0]], [[1.0]]])
    with pytest.raises(fastkl.InvalidRowError, match=r"row 1: the mask has 2 entries, the sequence 1 positions"):
        fastkl.kl(p, p, mask=[[1, 1], [1, 0]])
    with pytest.raises(fastkl.InvalidRowError, match=r"row 0: lengths = 3, the sequence has 2 positions"):
        fastkl.kl(p, p, lengths=[3, 1])


def test_a_mask_counting_nothing_gives_null_not_an_error():
    p = [[[0.5, 0.5]], [[0.5, 0.5]]]
    table = fastkl.divergences(p, p, ["kl"], mask=[[0], [1]], status=True, per_token=True)
    assert table.column("status").to_pylist() == ["no_tokens", "ok"]
    assert table.column("kl").to_pylist() == [None, 0.0]
    assert table.column("tokens").to_pylist() == [0, 1]
    assert table.column("kl_tokens").to_pylist() == [[None], [0.0]]


def test_entropy_of_sequences_reads_p_only():
    p = np.array([[[0.5, 0.5], [1.0, 0.0]]])
    assert fastkl.entropy(p) == pytest.approx([math.log(2)])


def test_chunked_sequences_with_other_chunk_boundaries(rng):
    P = naive.make_probs(rng, 20, 3).reshape(5, 4, 3)
    Q = naive.make_probs(rng, 20, 3).reshape(5, 4, 3)
    p = naive.chunked(naive.nested_array(P.tolist()), [2])
    q = naive.chunked(naive.nested_array(Q.tolist()), [1, 3])
    mask = naive.chunked(pa.array([[1, 0, 1, 1]] * 5, type=pa.list_(pa.int8())), [4])
    got = fastkl.kl(p, q, mask=mask)
    flat = fastkl.kl(P.reshape(20, 3), Q.reshape(20, 3)).reshape(5, 4)
    np.testing.assert_allclose(got, flat[:, [0, 2, 3]].sum(axis=1), rtol=1e-14)


@pytest.mark.parametrize("call, match", [
    (lambda: fastkl.kl([[0.5, 0.5]], [[0.5, 0.5]], mask=[[1]]), "mask and lengths are for sequence rows"),
    (lambda: fastkl.divergences([[0.5, 0.5]], [[0.5, 0.5]], per_token=True), "per_token is for sequence rows"),
    (lambda: fastkl.kl([[[0.5, 0.5]]], [[0.5, 0.5]]), "p holds sequence rows"),
    (lambda: fastkl.kl([[[0.5, 0.5]]], [[[0.5, 0.5]]], mask=[[0.5]]), "mask: expected list<bool> or list<int8>"),
    (lambda: fastkl.kl([[[0.5, 0.5]]], [[[0.5, 0.5]]], lengths=[0.5]), "lengths: expected one whole number"),
])
def test_option_errors(call, match):
    with pytest.raises(fastkl.OptionError, match=match):
        call()


def test_no_sequences_still_give_the_sequence_columns():
    t = pa.list_(pa.list_(pa.float64()))
    table = fastkl.divergences(pa.array([], type=t), pa.array([], type=t), ["kl"], per_token=True, status=True)
    assert table.num_rows == 0
    assert table.column_names == ["kl", "kl_mean", "kl_tokens", "tokens", "status"]
