"""Sum per-position results back into sequence rows (flat buffers only)."""

from __future__ import annotations

import numpy as np
from numba import njit

from .dense import LENGTH_MISMATCH as FIRST_INVALID, NO_TOKENS, OK, TARGET_UNLISTED  # the first invalid-row code

# Numba checks its on-disk cache against this file only: this digest of the kernel
# modules imported above ties the cache to them too (tests/test_layout.py).
INLINES_DIGEST = "2cebb893f4a75e57"


@njit(nogil=True, cache=True)
def sum_positions(offsets, seq_status, pos_status, pos_values, sums, tokens, status, first_bad):
    """For each sequence i (positions offsets[i]:offsets[i+1]): the sum of each row of
    `pos_values` over its counted positions, how many there are, and its status.

    A sequence is invalid at its first invalid position (`first_bad`, else -1),
    `no_tokens` when no position counts, `target_unlisted` when some counted
    position's target is not listed (its target measures are NaN there, so their
    sums are NaN); not-counted positions (status null) are skipped. Sums are
    float64, in position order.
    """
    rows = pos_values.shape[0]
    for i in range(len(seq_status)):
        code = np.int64(seq_status[i])
        lo, hi = offsets[i], offsets[i + 1]
        count = 0
        unlisted = False
        first_bad[i] = -1
        if code == OK:
            for j in range(lo, hi):
                c = pos_status[j]
                if c == OK or c == TARGET_UNLISTED:
                    count += 1
                    unlisted = unlisted or c == TARGET_UNLISTED
                elif c >= FIRST_INVALID:
                    code = c
                    first_bad[i] = j
                    break
            if code == OK and count == 0:
                code = NO_TOKENS
        status[i] = TARGET_UNLISTED if (code == OK and unlisted) else code
        tokens[i] = count if code == OK else 0
        for r in range(rows):
            if code != OK:
                sums[r, i] = np.nan
                continue
            total = 0.0
            for j in range(lo, hi):
                if pos_status[j] == OK or pos_status[j] == TARGET_UNLISTED:
                    total += pos_values[r, j]
            sums[r, i] = total
