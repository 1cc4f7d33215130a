"""Model comparison per row: does P's most likely token equal Q's (flat buffers only).

The argmax of the stored values is the argmax of the distribution for every
encoding (probs, log-probs, logits at any temperature > 0: the decodings are
increasing), so no row is decoded; a tie goes to the first position. A side
with token ids names its token by id (the top-k list holds the true top-1).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .dense import OK
from .half import as_float32

_jit = njit(nogil=True, cache=True, error_model="numpy")


@_jit
def _top1(values, start, k, decode, id_offsets, ids, has_ids, row):
    best = 0
    top = as_float32(values[start], decode) if k else 0.0
    for j in range(1, k):
        x = as_float32(values[start + j], decode)
        if x > top:
            top = x
            best = j
    return np.int64(ids[id_offsets[row] + best]) if has_ids else np.int64(best)


@_jit
def top1_rows(p_offsets, p_values, p_decode, p_id_offsets, p_ids, p_has_ids,
              q_offsets, q_values, q_decode, q_id_offsets, q_ids, q_has_ids, status, out, start, stop):
    """out[i] = 1.0 where the top token of P is Q's, 0.0 where not, NaN where status[i] != OK."""
    for i in range(start, stop):
        if status[i] != OK:
            out[i] = np.nan
            continue
        ps, qs = p_offsets[i], q_offsets[i]
        a = _top1(p_values, ps, p_offsets[i + 1] - ps, p_decode, p_id_offsets, p_ids, p_has_ids, i)
        b = _top1(q_values, qs, q_offsets[i + 1] - qs, q_decode, q_id_offsets, q_ids, q_has_ids, i)
        out[i] = 1.0 if a == b else 0.0
