"""KL divergence between diagonal Gaussians given per-dimension means and log-variances.

KL(N(mu_p, e^a) || N(mu_q, e^b)) = 1/2 sum_j [ (e^d - 1 - d) + (mu_p - mu_q)^2 e^-b ], d = a - b,
which is the textbook 1/2 sum [ b - a + (e^a + (mu_p - mu_q)^2) / e^b - 1 ] regrouped so that
nothing cancels: e^d - 1 - d is the k3 term (series near 0), and every term is >= 0.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .dense import EMPTY, LENGTH_MISMATCH, NAN, NON_FINITE, NULL_ELEMENT, OK, valid_bit
from .sampled import k3_term

# Numba checks its on-disk cache against this file only: this digest of the kernel
# modules imported above ties the cache to them too (tests/test_layout.py).
INLINES_DIGEST = "3c223a595272aa64"

_jit = njit(nogil=True, cache=True, error_model="numpy")


@_jit
def _code(x, mask, mask_offset, idx):
    if not valid_bit(mask, mask_offset, idx):
        return NULL_ELEMENT
    if x != x:
        return NAN
    if math.isinf(x):
        return NON_FINITE
    return OK


@_jit
def gaussian_rows(pm_offsets, pm, pm_mask, pm_mo, pa_offsets, pa, pa_mask, pa_mo,
                  qm_offsets, qm, qm_mask, qm_mo, qa_offsets, qa, qa_mask, qa_mo,
                  pre_status, inv_log_base, out, status, start, stop):
    """KL per row (means pm, qm and log-variances pa, qa: flat buffers with offsets) for rows start..stop."""
    for i in range(start, stop):
        code = np.int64(pre_status[i])
        s0, s1, s2, s3 = pm_offsets[i], pa_offsets[i], qm_offsets[i], qa_offsets[i]
        k = pm_offsets[i + 1] - s0
        if code == OK and (pa_offsets[i + 1] - s1 != k or qm_offsets[i + 1] - s2 != k
                           or qa_offsets[i + 1] - s3 != k):
            code = LENGTH_MISMATCH
        if code == OK and k == 0:
            code = EMPTY
        total = 0.0
        if code == OK:
            for j in range(k):
                a = np.float64(pa[s1 + j])
                b = np.float64(qa[s3 + j])
                mp = np.float64(pm[s0 + j])
                mq = np.float64(qm[s2 + j])
                c = max(_code(mp, pm_mask, pm_mo, s0 + j), _code(a, pa_mask, pa_mo, s1 + j),
                        _code(mq, qm_mask, qm_mo, s2 + j), _code(b, qa_mask, qa_mo, s3 + j))
                if c != OK:  # (OK is 0: the largest code is a bad one)
                    code = c
                    break
                dm = mp - mq
                total += 0.5 * (k3_term(a - b) + dm * dm * math.exp(-b))
        status[i] = code
        out[i] = total * inv_log_base if code == OK else np.nan
