"""The Numba kernel of sparse top-k rows (docs/guide/shapes.md; the bounds: docs/sparse-bounds.md).

One row is one token position: each side lists top-k token ids and values
(probs or log-probs), or is dense (ids implicitly 0..k-1, exact). Per row the
kernel writes the point estimate of every requested measure under a `tail`
policy and, with `want_bounds`, the provable lower/upper bounds of
docs/sparse-bounds.md §1-§7 (the same bounds as `tests/naive_sparse.py`,
found in O(k log k) instead of by nested bisections).

Why it is built this way:

* Serial `nogil` kernel with the dense kernels' compile options (`_jit`):
  the engine runs disjoint row blocks from Python threads.
* All scratch is allocated once per call, sized by the longest row of the
  block; rows never allocate.
* Union/intersection of the two id lists: an open-addressing hash table with
  a per-row stamp (never cleared), O(k) per row. Measured against the
  sort-merge variant (`sparse_rows_sortmerge`: (id, index) keys heapsorted,
  then one merge) with `benchmarks/sparse_kernel.py --merge` (kl, no
  bounds, one thread, Intel Xeon, shared 2-core machine): k = 32, hash
  738k positions/s against 422k; k = 128, 240k against 80k. Only B (ids
  only P lists) and C (only Q) need sorting, and only for the bounds (by
  value, descending): a check for "already sorted" (top-k lists usually
  are) and an in-place heapsort otherwise.
* Rounding (docs §1): unlisted mass below 1e-14 + u·(2·S + Σ p|log p|)
  (u the unit roundoff of the values' dtype, S the listed sum; the last
  term for log-probs) is the rounding of the listed sum, not mass: r = 0.
  The cap m (the smallest listed value) is widened by its own rounding,
  1 + 2u(1 + |log m|) (log-probs) or 1 + 2u (probs): the stored minimum
  may lie below the true one, which is what bounds the unlisted entries;
  without it a float32 row cut from a consistent pair could get an
  infinite reverse_kl lower bound. `tests/naive_sparse.py` takes both as
  `residue` and `cap_slack`.
* The f-divergences' lower bound is one completion for every measure (the
  aligned completion, docs §3): in the common case its common ratio ρ is the
  root of a piecewise-linear function found by one sweep over the sorted
  breakpoints; a pool side can only hit its cap when the caps were relaxed
  (lists that are not the true top k, docs §10), and then a nested
  bisection on the f-free signs (exact inner solve) takes over, as in the
  reference.
* Bad rows: a dense side must have k = V when V is given (length_mismatch),
  and its k is V otherwise; two dense sides must have the same k; a sparse
  side listing all V ids must sum to 1 (not_normalized). Without use_q, Q is
  P (entropy) and listed[1] is NaN.
* tail="uniform" without any V (the engine refuses it) is the limit V → ∞.
* Log-measure values and bounds are scaled by `inv_log_base`; tv and
  hellinger are not.
"""

from __future__ import annotations

import math

import numpy as np

from numba import types
from numba.extending import overload

from .dense import _jit, valid_bit
from .fastmath import exp_neg
from .half import BFLOAT16, bfloat16_to_float32, float16_to_float32

# Numba checks its on-disk cache against this file only: this digest of the kernel
# modules imported above ties the cache to them too (tests/test_layout.py).
INLINES_DIGEST = "4e169a1d3c254ee4"

# Kinds (fastkl._registry.KINDS order).
PROBS, LOGPROBS, LOGITS = 0, 1, 2

# Status codes (fastkl._registry.STATUSES order; tests check they agree).
OK = 0
LENGTH_MISMATCH, EMPTY, NULL_ELEMENT, NAN, NON_FINITE, NEGATIVE, NOT_NORMALIZED = 4, 5, 6, 7, 8, 9, 10
IDS_LENGTH_MISMATCH, ID_NOT_INTEGER, ID_OUT_OF_RANGE, DUPLICATE_ID = 11, 12, 13, 14

# Measure slots (fastkl._registry.MEASURES order). The accumulators keep
# hellinger squared; jeffreys is kl + reverse_kl at the end.
KL, REVERSE_KL, JEFFREYS, JS, ENTROPY, CROSS_ENTROPY, TV, HELLINGER, GJS, RENYI, BHATTACHARYYA = range(11)
N_MEASURES = 11
# `par`, the parameters of gjs and renyi every accumulation takes: whether each is asked,
# gjs's beta, renyi's alpha - 1 (fastkl.kernels.dense's names).
WANT_GJS, WANT_RENYI, BETA, ALPHA_M1 = range(4)

# Tails (fastkl._registry.TAILS order).
BUCKET, RENORMALIZE, UNIFORM = 0, 1, 2

INF = math.inf
NAN_ = math.nan
LN2 = math.log(2.0)
# Unit roundoff of the value dtypes: the listed sum's rounding (docs §1).
U32 = 2.0 ** -24
U64 = 2.0 ** -53

# ------------------------------------------------------------ per-entry terms


@_jit
def _log_ratio(a, b):
    """log(a/b) for a, b > 0, without cancelling when a ≈ b."""
    d = a - b
    if abs(d) < 0.5 * b:
        return math.log1p(d / b)
    return math.log(a) - math.log(b)


@_jit
def _add_phi(acc, p, q, want_kl, want_js, want_tvh, par):
    """acc[m] += φ_m(p, q) for the f-divergences (p, q >= 0; hellinger squared; kl and
    reverse_kl only, jeffreys is their sum; renyi's φ below). +inf where mass sits alone."""
    if par[WANT_GJS]:
        _add_gjs(acc, p, q, par[BETA])
    if par[WANT_RENYI]:
        _add_renyi(acc, p, q, par[ALPHA_M1])
    if want_kl:
        if p > 0.0 and q > 0.0:
            lr = _log_ratio(p, q)
            acc[KL] += p * lr
            acc[REVERSE_KL] -= q * lr
        elif p > 0.0:
            acc[KL] = INF
        elif q > 0.0:
            acc[REVERSE_KL] = INF
    if want_js:
        s = p + q
        t = 0.0
        if p > 0.0:
            t += p * _log_ratio(2.0 * p, s)
        if q > 0.0:
            t += q * _log_ratio(2.0 * q, s)
        acc[JS] += 0.5 * t
    if want_tvh:
        d = p - q
        acc[TV] += 0.5 * abs(d)
        rs = math.sqrt(p) + math.sqrt(q)
        if rs > 0.0:
            h = d / rs  # = sqrt p - sqrt q without cancelling
            acc[HELLINGER] += 0.5 * h * h


@_jit
def _add_gjs(acc, p, q, beta):
    """b p log(p/m) + (1-b) q log(q/m), m = b p + (1-b) q, 0 < b < 1: finite everywhere."""
    m = beta * p + (1.0 - beta) * q
    if p > 0.0:
        acc[GJS] += beta * p * _log_ratio(p, m)
    if q > 0.0:
        acc[GJS] += (1.0 - beta) * q * _log_ratio(q, m)


@_jit
def _add_renyi(acc, p, q, am1):
    """The convex φ of renyi: sign(a-1) (p^a q^(1-a) - p) = sign(a-1) p expm1((a-1) log(p/q))
    (convex and homogeneous for either side of a = 1, so every f-divergence bound applies;
    `_finish` turns the sum back into log1p(sign(a-1) sum) / (a - 1)). p alone: +inf for
    a > 1, p for a < 1; q alone: 0."""
    if p > 0.0 and q > 0.0:
        t = p * math.expm1(am1 * _log_ratio(p, q))
        acc[RENYI] += t if am1 > 0.0 else -t
    elif p > 0.0:
        if am1 > 0.0:
            acc[RENYI] = INF
        else:
            acc[RENYI] += p


@_jit
def _xlogx(x):
    return x * math.log(x) if x > 0.0 else 0.0


@_jit
def _neg_xlogy(x, y):
    """−x log y with 0 log anything = 0 and x > 0 = y giving +inf."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return INF
    return -x * math.log(y)


# ------------------------------------------------------------ loading a side


def _value(values, idx, decode):
    """values[idx] as a float: 16-bit sides (uint16 bits) decoded by `decode`."""


@overload(_value, inline="always")
def _value_typed(values, idx, decode):
    if isinstance(values, types.Array) and values.dtype == types.uint16:
        def impl(values, idx, decode):
            h = values[idx]
            return bfloat16_to_float32(h) if decode == BFLOAT16 else float16_to_float32(h)
        return impl
    return lambda values, idx, decode: values[idx]


def _unit_roundoff(values, decode):
    """The storage's unit roundoff: how far a stored value may be from the one it rounds."""


@overload(_unit_roundoff, inline="always")
def _unit_roundoff_typed(values, decode):
    if isinstance(values, types.Array) and values.dtype == types.uint16:
        return lambda values, decode: 2.0 ** -8 if decode == BFLOAT16 else 2.0 ** -11
    u = U32 if isinstance(values, types.Array) and values.dtype == types.float32 else U64
    return lambda values, decode: u


@_jit
def _load_side(i, offsets, id_offsets, ids, values, mask, mask_offset, dense, decode, kind, sum_tol, vocab,
               vals, idbuf):
    """Validate and decode row i of one side into vals/idbuf.

    Returns (code, k, listed sum, residue threshold, cap factor). The lowest code wins
    (the order of fastkl._registry.STATUSES): empty, element problems, the sum, then ids.
    The cap factor widens the cap m (the smallest listed value) by its own rounding: the
    stored minimum may sit up to that much below the true one (float32 log-probs:
    2u(1 + |log m|)), and the unlisted entries are only known to be <= the true one.
    """
    s = offsets[i]
    k = offsets[i + 1] - s
    if k == 0:
        return EMPTY, k, 0.0, 0.0, 1.0
    code = NOT_NORMALIZED + 1
    total = 0.0
    lsum = 0.0  # Σ p |log p| of log-probs: their decoding's rounding (docs §1)
    x_min = 0.0  # the smallest log-prob
    for j in range(k):
        idx = s + j
        if not valid_bit(mask, mask_offset, idx):
            code = min(code, NULL_ELEMENT)
            continue
        x = np.float64(_value(values, idx, decode))
        if x != x:
            code = min(code, NAN)
        elif kind == PROBS:
            if math.isinf(x):
                code = min(code, NON_FINITE)
            elif x < 0.0:
                code = min(code, NEGATIVE)
            else:
                vals[j] = x
                total += x
        elif x == INF:
            code = min(code, NON_FINITE)
        elif x > sum_tol:
            code = min(code, NEGATIVE)
        else:
            p = exp_neg(x)
            x_min = min(x_min, x)
            vals[j] = p
            total += p
            lsum -= p * x if (x < 0.0 and p > 0.0) else 0.0  # -inf decodes to 0: no 0 * -inf
    if code <= NOT_NORMALIZED:
        return code, k, total, 0.0, 1.0
    if dense:
        if abs(total - 1.0) > sum_tol:
            return NOT_NORMALIZED, k, total, 0.0, 1.0
    elif total > 1.0 + sum_tol or (vocab >= 0 and k >= vocab and total < 1.0 - sum_tol):
        # (a side listing all V ids has nowhere to keep unlisted mass: it must sum to 1)
        return NOT_NORMALIZED, k, total, 0.0, 1.0
    u = _unit_roundoff(values, decode)
    thresh = 1e-14 + u * (2.0 * total + lsum)
    cap_mul = 1.0 + 2.0 * u * (1.0 + (-x_min if x_min > -INF else 0.0))
    if dense:
        for j in range(k):
            idbuf[j] = j
        return OK, k, total, thresh, cap_mul
    ids_start = id_offsets[i]
    if id_offsets[i + 1] - ids_start != k:
        return IDS_LENGTH_MISMATCH, k, total, thresh, cap_mul
    for j in range(k):
        v = np.int64(ids[ids_start + j])
        if v < 0 or (vocab >= 0 and v >= vocab):
            return ID_OUT_OF_RANGE, k, total, thresh, cap_mul
        idbuf[j] = v
    return OK, k, total, thresh, cap_mul


# ------------------------------------------------------------ merging the id lists


@_jit
def _slot_of(key, bits):
    h = (np.uint64(key) * np.uint64(11400714819323198485)) >> np.uint64(64 - bits)
    return np.int64(h)


@_jit
def _merge(pid, pv, kp, qid, qv, kq, keys, stamp, hp, hq, gen, bits, pslot, qslot, aP, aQ, bP, cQ):
    """Split the two lists into A (both), B (only P), C (only Q) with an open-addressing
    table stamped per row. Returns (duplicate, nA, nB, nC)."""
    size_mask = keys.size - 1
    for j in range(kp):
        x = pid[j]
        s = _slot_of(x, bits)
        while stamp[s] == gen and keys[s] != x:
            s = (s + 1) & size_mask
        if stamp[s] == gen:
            return True, 0, 0, 0
        stamp[s] = gen
        keys[s] = x
        hp[s] = j
        hq[s] = -1
        pslot[j] = s
    for j in range(kq):
        x = qid[j]
        s = _slot_of(x, bits)
        while stamp[s] == gen and keys[s] != x:
            s = (s + 1) & size_mask
        if stamp[s] == gen:
            if hq[s] >= 0:
                return True, 0, 0, 0
            hq[s] = j
        else:
            stamp[s] = gen
            keys[s] = x
            hp[s] = -1
            hq[s] = j
        qslot[j] = s
    nA = nB = nC = 0
    for j in range(kp):
        t = hq[pslot[j]]
        if t >= 0:
            aP[nA] = pv[j]
            aQ[nA] = qv[t]
            nA += 1
        else:
            bP[nB] = pv[j]
            nB += 1
    for j in range(kq):
        if hp[qslot[j]] < 0:
            cQ[nC] = qv[j]
            nC += 1
    return False, nA, nB, nC


@_jit
def _merge_sorted(pid, pv, kp, qid, qv, kq, pkey, qkey, aP, aQ, bP, cQ):
    """The sort-merge alternative to `_merge` (kept for the measurement in the module docstring):
    each side's (id << 20 | index) keys sorted, then one merge. Needs ids < 2**43 and
    k < 2**20; returns (duplicate, nA, nB, nC, ok) with ok False when ids are too large."""
    for j in range(kp):
        if pid[j] >= (1 << 43):
            return False, 0, 0, 0, False
        pkey[j] = (pid[j] << 20) | j
    for j in range(kq):
        if qid[j] >= (1 << 43):
            return False, 0, 0, 0, False
        qkey[j] = (qid[j] << 20) | j
    _sort_desc(pkey, kp)
    _sort_desc(qkey, kq)
    low = (1 << 20) - 1
    for j in range(1, kp):
        if (pkey[j] >> 20) == (pkey[j - 1] >> 20):
            return True, 0, 0, 0, True
    for j in range(1, kq):
        if (qkey[j] >> 20) == (qkey[j - 1] >> 20):
            return True, 0, 0, 0, True
    nA = nB = nC = 0
    a = b = 0
    while a < kp or b < kq:
        ia = pkey[a] >> 20 if a < kp else -1
        ib = qkey[b] >> 20 if b < kq else -1
        if ia == ib:
            aP[nA] = pv[pkey[a] & low]
            aQ[nA] = qv[qkey[b] & low]
            nA += 1
            a += 1
            b += 1
        elif ia > ib:
            bP[nB] = pv[pkey[a] & low]
            nB += 1
            a += 1
        else:
            cQ[nC] = qv[qkey[b] & low]
            nC += 1
            b += 1
    return False, nA, nB, nC, True


@_jit
def _sort_desc(x, n):
    """Sort x[:n] descending in place: a pass if already sorted, else heapsort (O(n log n))."""
    done = True
    for i in range(1, n):
        if x[i] > x[i - 1]:
            done = False
            break
    if done:
        return
    for start in range(n // 2 - 1, -1, -1):
        _sift_min(x, start, n)
    for end in range(n - 1, 0, -1):
        t = x[0]
        x[0] = x[end]
        x[end] = t
        _sift_min(x, 0, end)


@_jit
def _sift_min(x, root, end):
    while True:
        child = 2 * root + 1
        if child >= end:
            return
        if child + 1 < end and x[child + 1] < x[child]:
            child += 1
        if x[child] < x[root]:
            t = x[child]
            x[child] = x[root]
            x[root] = t
            root = child
        else:
            return


# ------------------------------------------------------------ the aligned completion (docs §3)


@_jit
def _fill(w, n, cap, total):
    """Water-fill x_i = min(cap, c·w_i), Σx = total, w[:n] descending.

    Returns (j, free, W): the first j entries at the cap, the others share `free`
    in proportion to their weights, whose sum is W (so their ratio w/x is W/free).
    """
    if total <= 0.0:
        rest = 0.0
        for i in range(n):
            rest += w[i]
        return 0, 0.0, rest
    if total >= n * cap:
        return n, 0.0, 0.0
    rest = 0.0
    for i in range(n):
        rest += w[i]
    for j in range(n):
        free = total - j * cap
        if free * w[j] <= cap * rest or rest <= 0.0:
            return j, free, max(rest, 0.0)
        rest -= w[j]
    return n, 0.0, 0.0


@_jit
def _inner_tp(cQ, nC, SqC, r_P, m_P, s_Q, tp_lo, tp_hi):
    """P's unlisted mass in C for Q's pool mass s_Q: ρ_C = ρ_U, i.e. the root of the
    decreasing r_P − Σ_C min(m_P, ρ q_c) − ρ s_Q, clamped to [tp_lo, tp_hi]."""
    if s_Q <= 0.0:
        return tp_hi
    alpha = r_P
    beta = SqC + s_Q
    j = 0
    while True:
        nxt = m_P / cQ[j] if j < nC else INF
        if nxt == INF or alpha - beta * nxt <= 0.0:
            break
        alpha -= m_P
        beta -= cQ[j]
        j += 1
    t = r_P - alpha / beta * s_Q
    return min(max(t, tp_lo), tp_hi)


@_jit
def _ratio(a, b):
    """a/b with x/0 = +inf (x > 0) and 0/0 = NaN (an empty pool has no ratio)."""
    if b > 0.0:
        return a / b
    return INF if a > 0.0 else NAN_


@_jit
def _sweep_root(bP, nB, cQ, nC, SqC, r_P, r_Q, m_P, m_Q, rho_min):
    """The root on [rho_min, ∞) of the piecewise-linear, decreasing there
    g(ρ) = r_P − Σ_C min(m_P, ρ q_c) − ρ r_Q + Σ_B min(ρ m_Q, p_b) (docs §3),
    by one sweep over the merged breakpoints p_b/m_Q and m_P/q_c. INF if none."""
    alpha = r_P
    beta = SqC + r_Q - nB * m_Q
    i = nB - 1
    j = 0
    prev = 0.0
    while True:
        b_B = bP[i] / m_Q if i >= 0 else INF
        b_C = m_P / cQ[j] if j < nC else INF
        nxt = min(b_B, b_C)
        if nxt >= rho_min:
            lo = max(prev, rho_min)
            if nxt == INF:
                if beta > 0.0:
                    return max(alpha / beta, lo)
                return INF
            if alpha - beta * nxt <= 0.0:
                root = alpha / beta if beta > 0.0 else lo
                return min(max(root, lo), nxt)
        if nxt == INF:
            return INF
        if b_B <= b_C:
            alpha += bP[i]
            beta += m_Q
            i -= 1
        else:
            alpha -= m_P
            beta -= cQ[j]
            j += 1
        prev = nxt


@_jit
def _add_tail(acc, bP, nB, t_Q, cQ, nC, t_P, m_P, m_Q, s_P, s_Q, th_P, th_Q, fk, fj, ft, par):
    """acc += Σ_B φ + Σ_C φ + φ(pool) for the completion (t_P, t_Q): B water-filled with
    t_Q ∝ p_b, C with t_P ∝ q_c. Entries sharing a ratio count as one (φ is homogeneous).
    What is left over for entries of weight 0 (listed zeros) once the others are at the
    cap is mass only above the rounding threshold (th_P, th_Q): below it, it is the
    rounding of the listed sums (a row whose unlisted mass exactly fills the cap)."""
    jB, freeB, WB = _fill(bP, nB, m_Q, t_Q)
    for i in range(jB):
        _add_phi(acc, bP[i], m_Q, fk, fj, ft, par)
    if WB > 0.0 or freeB > th_Q:
        _add_phi(acc, WB, freeB, fk, fj, ft, par)
    jC, freeC, WC = _fill(cQ, nC, m_P, t_P)
    for i in range(jC):
        _add_phi(acc, m_P, cQ[i], fk, fj, ft, par)
    if WC > 0.0 or freeC > th_P:
        _add_phi(acc, freeC, WC, fk, fj, ft, par)
    _add_phi(acc, s_P, s_Q, fk, fj, ft, par)


@_jit
def _f_lower(lo, tmp, accA, bP, nB, SpB, cQ, nC, SqC, r_P, r_Q, m_P, m_Q, n_U, th_P, th_Q, fk, fj, ft, par):
    """lo[f] = the f-divergences at the aligned completion (the minimiser for every f)."""
    M_P = n_U * m_P if n_U > 0.0 else 0.0
    M_Q = n_U * m_Q if n_U > 0.0 else 0.0
    tq_hi = min(r_Q, nB * m_Q)
    tp_hi = min(r_P, nC * m_P)
    tq_lo = min(max(0.0, r_Q - M_Q), tq_hi)
    tp_lo = min(max(0.0, r_P - M_P), tp_hi)
    for m in range(N_MEASURES):
        lo[m] = accA[m]
    if r_Q <= 0.0 or r_P <= 0.0 or n_U <= 0.0:
        # a side with nothing unlisted, or no pool: the completion is fixed
        if n_U <= 0.0:
            t_P, t_Q = tp_hi, tq_hi
        elif r_Q <= 0.0:
            t_P, t_Q = tp_hi, 0.0  # pool ratio ∞: all of P's mass that fits goes to C
        else:
            t_P, t_Q = 0.0, tq_hi  # pool ratio 0: all of Q's mass that fits goes to B
        s_P = r_P - t_P
        s_Q = r_Q - t_Q
        _add_tail(lo, bP, nB, t_Q, cQ, nC, t_P, m_P, m_Q, s_P if s_P > th_P else 0.0,
                  s_Q if s_Q > th_Q else 0.0, th_P, th_Q, fk, fj, ft, par)
        return
    # ρ_min: below it Q's pool would be negative (B takes more than r_Q)
    rho_min = 0.0
    if r_Q < nB * m_Q:
        _, free, W = _fill(bP, nB, m_Q, r_Q)
        rho_min = W / free
    s_P_min = r_P
    for j in range(nC):
        s_P_min -= min(m_P, rho_min * cQ[j])
    if s_P_min <= 0.0:  # B and C hold both sides' unlisted mass: empty pool (ρ_C <= ρ_B)
        _add_tail(lo, bP, nB, r_Q, cQ, nC, r_P, m_P, m_Q, 0.0, 0.0, th_P, th_Q, fk, fj, ft, par)
        return
    rho = _sweep_root(bP, nB, cQ, nC, SqC, r_P, r_Q, m_P, m_Q, rho_min)
    if rho < INF and rho > 0.0:
        t_Q = 0.0
        for i in range(nB):
            t_Q += min(m_Q, bP[i] / rho)
        t_P = 0.0
        for j in range(nC):
            t_P += min(m_P, rho * cQ[j])
        s_P = r_P - t_P
        s_Q = r_Q - t_Q
        slack = 1e-12
        if s_P <= M_P * (1.0 + slack) + th_P and s_Q <= M_Q * (1.0 + slack) + th_Q:
            _add_tail(lo, bP, nB, t_Q, cQ, nC, t_P, m_P, m_Q, s_P if s_P > th_P else 0.0,
                      s_Q if s_Q > th_Q else 0.0, th_P, th_Q, fk, fj, ft, par)
            return
    _f_lower_bisect(lo, tmp, accA, bP, nB, cQ, nC, SqC, r_P, r_Q, m_P, m_Q, th_P, th_Q,
                    tp_lo, tp_hi, tq_lo, tq_hi, fk, fj, ft, par)


@_jit
def _f_lower_bisect(lo, tmp, accA, bP, nB, cQ, nC, SqC, r_P, r_Q, m_P, m_Q, th_P, th_Q,
                    tp_lo, tp_hi, tq_lo, tq_hi, fk, fj, ft, par):
    """A pool side at its cap (small V): bisection on t_Q by the sign of ρ_U − ρ_B, with
    the exact inner t_P; then the ends within 1e-9 are tried too (as the reference does)."""
    a = tq_lo
    b = tq_hi
    for _ in range(64):
        t = 0.5 * (a + b)
        if t <= a or t >= b:
            break
        t_P = _inner_tp(cQ, nC, SqC, r_P, m_P, r_Q - t, tp_lo, tp_hi)
        jB, free, W = _fill(bP, nB, m_Q, t)
        if t <= 0.0:
            rho_B = INF
        elif free > 0.0:
            rho_B = W / free
        else:
            rho_B = 0.0
        s_P = r_P - t_P
        s_Q = r_Q - t
        rho_U = _ratio(s_P if s_P > th_P else 0.0, s_Q if s_Q > th_Q else 0.0)
        if rho_U < rho_B:
            a = t
        else:
            b = t
    t_mid = 0.5 * (a + b)
    for m in range(N_MEASURES):
        lo[m] = INF
    for cq in range(3):
        t_Q = t_mid if cq == 0 else (tq_lo if cq == 1 else tq_hi)
        if cq > 0 and abs(t_Q - t_mid) > 1e-9:
            continue
        t_P0 = _inner_tp(cQ, nC, SqC, r_P, m_P, r_Q - t_Q, tp_lo, tp_hi)
        for cp in range(3):
            t_P = t_P0 if cp == 0 else (tp_lo if cp == 1 else tp_hi)
            if cp > 0 and abs(t_P - t_P0) > 1e-9:
                continue
            for m in range(N_MEASURES):
                tmp[m] = accA[m]
            s_P = r_P - t_P
            s_Q = r_Q - t_Q
            _add_tail(tmp, bP, nB, t_Q, cQ, nC, t_P, m_P, m_Q, s_P if s_P > th_P else 0.0,
                      s_Q if s_Q > th_Q else 0.0, th_P, th_Q, fk, fj, ft, par)
            for m in range(N_MEASURES):
                lo[m] = min(lo[m], tmp[m])


# ------------------------------------------------------------ upper bounds (docs §4-§6)


@_jit
def _kl_upper_small_vocab(klA, xB, nB, yC, nC, r_x, r_y, m_x, m_y, n_U, disjoint):
    """kl(X‖Y)'s upper bound when V may force Y's unlisted mass under X's (docs §4);
    `disjoint` is the disjoint-tails value, returned where the refinement does not apply."""
    may_alone = nB > 0 or (r_x > 0.0 and n_U >= 1.0)
    slots_y = nB + n_U
    if not may_alone and r_x > 0.0 and n_U == 0.0:
        # X's unlisted mass can only sit on C, where Y is known (e.g. Y dense): the exact
        # maximum of the convex Σ_C x log(x/y) is the vertex with the caps on the smallest y
        full, rem = _vertex_count(r_x, m_x)
        full = min(full, nC)
        total = klA
        for t in range(int(full)):
            total += m_x * _log_ratio(m_x, yC[nC - 1 - t]) if m_x > 0.0 else 0.0
        if rem > 0.0 and full < nC:
            total += rem * _log_ratio(rem, yC[nC - 1 - int(full)])
        return total
    if not may_alone:
        return disjoint
    if slots_y == INF:
        return INF
    floor = r_y - (slots_y - 1.0) * m_y
    if floor <= 1e-12 * max(r_y, 1e-300):
        return INF
    total = klA
    for i in range(nB):
        total += xB[i] * max(math.log(xB[i] / floor), 0.0) if xB[i] > 0.0 else 0.0
    floor_all = floor
    for j in range(nC):
        floor_all = min(floor_all, yC[j])
    if r_x > 0.0:
        total += r_x * max(math.log(m_x / floor_all), 0.0)
    return total


@_jit
def _entropy_bounds(entAB, r_P, m_P, slots_P):
    """(lower, upper) of H(P): fill to the cap / spread evenly (docs §5)."""
    if r_P <= 0.0:
        return entAB, entAB
    full = math.floor(r_P / m_P * (1.0 + 1e-12))
    if slots_P < INF:
        full = min(full, slots_P)
    rem = max(0.0, r_P - full * m_P)
    low = entAB - full * _xlogx(m_P) - _xlogx(rem)
    if slots_P == INF:
        return low, INF
    return low, entAB - r_P * math.log(r_P / slots_P)


@_jit
def _vertex_count(total, cap):
    """(slots at the cap, remainder) of cap, cap, ..., remainder."""
    if total <= 0.0:
        return 0.0, 0.0
    full = math.floor(total / cap * (1.0 + 1e-12))
    rem = total - full * cap
    return full, (rem if rem >= 1e-14 else 0.0)


@_jit
def _ce_lower(ceA, bP, nB, cQ, nC, r_P, r_Q, m_P, m_Q, gw, gn):
    """min −Σ p log q (docs §6): P fills C by descending q_c, then U at the cap; Q water-fills
    P's B and U entries (U kept as one weight with a multiplicity)."""
    total = ceA
    t_P = min(r_P, nC * m_P)
    full, rem = _vertex_count(t_P, m_P)
    full = min(full, nC)
    for j in range(int(full)):
        total += _neg_xlogy(m_P, cQ[j])
    if rem > 0.0 and full < nC:
        total += _neg_xlogy(rem, cQ[int(full)])
    s = r_P - t_P
    n_full, u_rem = _vertex_count(s if s >= 1e-14 else 0.0, m_P)
    # groups (weight, multiplicity), descending: B merged with (m_P × n_full), (u_rem × 1)
    extra_w = (m_P, u_rem)
    extra_n = (n_full, 1.0 if u_rem > 0.0 else 0.0)
    ng = 0
    e = 0
    count = 0.0
    for i in range(nB + 1):
        while e < 2 and (i == nB or extra_w[e] > bP[i]):
            if extra_n[e] > 0.0:
                gw[ng] = extra_w[e]
                gn[ng] = extra_n[e]
                count += extra_n[e]
                ng += 1
            e += 1
        if i < nB:
            gw[ng] = bP[i]
            gn[ng] = 1.0
            count += 1.0
            ng += 1
    T = min(r_Q, count * m_Q)
    return total + _ce_fill(gw, gn, ng, m_Q, T, count)


@_jit
def _ce_fill(gw, gn, ng, cap, total, count):
    """−Σ n_g w_g log q_g for q = min(cap, c·w), Σ n q = total (groups descending)."""
    if total <= 0.0:
        for g in range(ng):
            if gw[g] > 0.0:
                return INF
        return 0.0
    S = 0.0
    for g in range(ng):
        S += gn[g] * gw[g]
    out = 0.0
    if total >= count * cap:
        for g in range(ng):
            out += gn[g] * _neg_xlogy(gw[g], cap)
        return out
    capped = 0.0
    for g in range(ng):
        free = total - capped * cap
        if free * gw[g] <= cap * S or S <= 0.0:
            c = free / S if S > 0.0 else 0.0
            for h in range(g, ng):
                out += gn[h] * _neg_xlogy(gw[h], c * gw[h])
            return out
        out += gn[g] * _neg_xlogy(gw[g], cap)
        capped += gn[g]
        S -= gn[g] * gw[g]
    return out


# ------------------------------------------------------------ point estimates


@_jit
def _estimate(est, accA, tail, aP, aQ, nA, bP, nB, SpB, cQ, nC, SqC, S_P, S_Q, r_P, r_Q, n_U,
              slots_P, slots_Q, fk, fj, ft, par, fe, fc):
    for m in range(N_MEASURES):
        est[m] = accA[m]
    if tail == BUCKET:
        bp = SpB + r_P
        bq = SqC + r_Q
        _add_phi(est, bp, bq, fk, fj, ft, par)
        est[ENTROPY] -= _xlogx(bp)
        est[CROSS_ENTROPY] += _neg_xlogy(bp, bq)
    elif tail == RENORMALIZE:
        for m in range(N_MEASURES):
            est[m] = 0.0
        ip = 1.0 / S_P
        iq = 1.0 / S_Q
        for a in range(nA):
            p = aP[a] * ip
            q = aQ[a] * iq
            _add_phi(est, p, q, fk, fj, ft, par)
            est[ENTROPY] -= _xlogx(p)
            est[CROSS_ENTROPY] += _neg_xlogy(p, q)
        _add_phi(est, SpB * ip, 0.0, fk, fj, ft, par)
        _add_phi(est, 0.0, SqC * iq, fk, fj, ft, par)
        if fe:
            for b in range(nB):
                est[ENTROPY] -= _xlogx(bP[b] * ip)
        est[CROSS_ENTROPY] += _neg_xlogy(SpB * ip, 0.0)
    else:  # uniform: r spread over the side's unlisted ids (no V: the limit V → ∞)
        u_P = r_P / slots_P if slots_P > 0.0 and slots_P < INF else 0.0
        u_Q = r_Q / slots_Q if slots_Q > 0.0 and slots_Q < INF else 0.0
        for b in range(nB):
            _add_phi(est, bP[b], u_Q, fk, fj, ft, par)
            est[ENTROPY] -= _xlogx(bP[b])
            est[CROSS_ENTROPY] += _neg_xlogy(bP[b], u_Q)
        for c in range(nC):
            _add_phi(est, u_P, cQ[c], fk, fj, ft, par)
            est[ENTROPY] += _neg_xlogy(u_P, u_P)
            est[CROSS_ENTROPY] += _neg_xlogy(u_P, cQ[c])
        if n_U == 0.0:
            pass
        elif n_U < INF:
            _add_phi(est, n_U * u_P, n_U * u_Q, fk, fj, ft, par)
            est[ENTROPY] += n_U * _neg_xlogy(u_P, u_P)
            est[CROSS_ENTROPY] += n_U * _neg_xlogy(u_P, u_Q)
        else:
            _add_phi(est, r_P, r_Q, fk, fj, ft, par)
            est[ENTROPY] += INF if r_P > 0.0 else 0.0
            est[CROSS_ENTROPY] += INF if r_P > 0.0 else 0.0


# ------------------------------------------------------------ writing


@_jit
def _finish(m, x, inv_log_base, acc, par):
    """The measure m from its accumulator, clamped into its range."""
    if m == JEFFREYS:
        x = acc[KL] + acc[REVERSE_KL]
    if m == GJS:
        beta = par[BETA]
        top = -beta * math.log(beta) - (1.0 - beta) * math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0
        return min(max(x, 0.0), top) * inv_log_base
    if m == RENYI:
        am1 = par[ALPHA_M1]
        s1 = x if am1 > 0.0 else -x  # sum p^a q^(1-a) - 1
        return max(math.log1p(max(s1, -1.0)) / am1, 0.0) * inv_log_base
    if m == BHATTACHARYYA:
        return -math.log1p(-min(max(acc[HELLINGER], 0.0), 1.0)) * inv_log_base
    if m == TV:
        return min(max(x, 0.0), 1.0)
    if m == HELLINGER:
        return math.sqrt(min(max(x, 0.0), 1.0))
    if m == JS:
        return min(max(x, 0.0), LN2) * inv_log_base
    return max(x, 0.0) * inv_log_base


@_jit
def _write(dst, slots, i, acc, inv_log_base, par):
    for m in range(N_MEASURES):
        if slots[m] >= 0:
            dst[slots[m], i] = _finish(m, acc[m], inv_log_base, acc, par)


@_jit
def _write_nan(dst, slots, i):
    for m in range(N_MEASURES):
        if slots[m] >= 0:
            dst[slots[m], i] = NAN_


@_jit
def _max_len(offsets, start, stop):
    k = 0
    for i in range(start, stop):
        k = max(k, offsets[i + 1] - offsets[i])
    return k


# ------------------------------------------------------------ the kernel


def _make_kernel(hash_merge):
    """The row kernel, with the hash merge (the default) or the sort-merge (measured only)."""

    def sparse_rows(p_offsets, p_id_offsets, p_ids, p_values, p_mask, p_mask_offset, p_dense, p_decode,
                    q_offsets, q_id_offsets, q_ids, q_values, q_mask, q_mask_offset, q_dense, q_decode,
                    pre_status, use_q, p_kind, q_kind, vocab, tail, want_bounds, sum_tol, inv_log_base,
                    beta, am1, slots, out, lower, upper, listed, status, start, stop):
        """Estimates (and bounds) of the requested measures for sparse rows start..stop.

        `slots[m]`: the row of out/lower/upper receiving measure m, or -1. Rows not OK get
        NaN everywhere (listed too). Without use_q only P is read (Q is P: entropy).
        """
        fk = slots[KL] >= 0 or slots[REVERSE_KL] >= 0 or slots[JEFFREYS] >= 0 or (
            want_bounds and slots[CROSS_ENTROPY] >= 0)
        fj = slots[JS] >= 0
        ft = slots[TV] >= 0 or slots[HELLINGER] >= 0 or slots[BHATTACHARYYA] >= 0
        fe = slots[ENTROPY] >= 0 or slots[CROSS_ENTROPY] >= 0
        par = np.array([1.0 if (slots[GJS] >= 0 and 0.0 < beta < 1.0) else 0.0,
                        1.0 if slots[RENYI] >= 0 else 0.0, beta, am1])
        fc = slots[CROSS_ENTROPY] >= 0
        kmax = max(_max_len(p_offsets, start, stop), 1)
        if use_q:
            kmax = max(kmax, _max_len(q_offsets, start, stop))
        pv = np.empty(kmax)
        qv = np.empty(kmax)
        pid = np.empty(kmax, np.int64)
        qid = np.empty(kmax, np.int64)
        bits = 1
        while (1 << bits) < 4 * kmax:
            bits += 1
        keys = np.empty(1 << bits, np.int64)
        stamp = np.zeros(1 << bits, np.int64)
        hp = np.empty(1 << bits, np.int64)
        hq = np.empty(1 << bits, np.int64)
        pslot = np.empty(kmax, np.int64)
        qslot = np.empty(kmax, np.int64)
        aP = np.empty(kmax)
        aQ = np.empty(kmax)
        bP = np.empty(kmax)
        cQ = np.empty(kmax)
        gw = np.empty(kmax + 2)
        gn = np.empty(kmax + 2)
        accA = np.zeros(N_MEASURES)
        est = np.zeros(N_MEASURES)
        lo = np.zeros(N_MEASURES)
        hi = np.zeros(N_MEASURES)
        tmp = np.zeros(N_MEASURES)
        gen = 0
        for i in range(start, stop):
            code = np.int64(pre_status[i])
            kp = p_offsets[i + 1] - p_offsets[i]
            kq = q_offsets[i + 1] - q_offsets[i] if use_q else kp
            V = vocab
            if code == OK:
                if use_q and p_dense and q_dense and kp != kq:
                    code = LENGTH_MISMATCH
                elif vocab >= 0 and ((p_dense and kp != vocab) or (use_q and q_dense and kq != vocab)):
                    code = LENGTH_MISMATCH  # a dense side lists the whole vocabulary
                if V < 0:
                    V = kp if p_dense else (kq if (use_q and q_dense) else -1)
            S_P = S_Q = th_P = th_Q = 0.0
            cm_P = cm_Q = 1.0
            if code == OK:
                code, kp, S_P, th_P, cm_P = _load_side(i, p_offsets, p_id_offsets, p_ids, p_values, p_mask,
                                                       p_mask_offset, p_dense, p_decode, p_kind, sum_tol, V,
                                                       pv, pid)
                if use_q:
                    q_code, kq, S_Q, th_Q, cm_Q = _load_side(i, q_offsets, q_id_offsets, q_ids, q_values, q_mask,
                                                             q_mask_offset, q_dense, q_decode, q_kind, sum_tol, V,
                                                             qv, qid)
                    if q_code != OK and (code == OK or q_code < code):
                        code = q_code
                else:
                    S_Q, th_Q, cm_Q = S_P, th_P, cm_P
            nA = nB = nC = 0
            if code == OK:
                gen += 1
                ok = False
                if use_q and not hash_merge:
                    dup, nA, nB, nC, ok = _merge_sorted(pid, pv, kp, qid, qv, kq, pslot, qslot, aP, aQ, bP, cQ)
                if not ok:  # without use_q: P against nothing, for its duplicates only
                    dup, nA, nB, nC = _merge(pid, pv, kp, qid, qv, kq if use_q else 0, keys, stamp, hp, hq, gen,
                                             bits, pslot, qslot, aP, aQ, bP, cQ)
                if dup:
                    code = DUPLICATE_ID
                elif not use_q:  # Q is P: every id compared one by one
                    for a in range(kp):
                        aP[a] = pv[a]
                        aQ[a] = pv[a]
                    nA, nB, nC = kp, 0, 0
            status[i] = code
            if code != OK:
                _write_nan(out, slots, i)
                if want_bounds:
                    _write_nan(lower, slots, i)
                    _write_nan(upper, slots, i)
                listed[0, i] = NAN_
                listed[1, i] = NAN_
                continue
            _row(aP, aQ, nA, bP, nB, cQ, nC, S_P, S_Q, th_P, th_Q, cm_P, cm_Q, V, tail, want_bounds,
                 fk, fj, ft, par, fe, fc, accA, est, lo, hi, tmp, gw, gn)
            _write(out, slots, i, est, inv_log_base, par)
            if want_bounds:
                _write(lower, slots, i, lo, inv_log_base, par)
                _write(upper, slots, i, hi, inv_log_base, par)
            listed[0, i] = 1.0 if p_dense else min(S_P, 1.0)
            listed[1, i] = (1.0 if q_dense else min(S_Q, 1.0)) if use_q else NAN_

    sparse_rows.__qualname__ = sparse_rows.__name__ = "sparse_rows" if hash_merge else "sparse_rows_sortmerge"
    return _jit(sparse_rows)


sparse_rows = _make_kernel(True)
sparse_rows_sortmerge = _make_kernel(False)


@_jit
def _row(aP, aQ, nA, bP, nB, cQ, nC, S_P, S_Q, th_P, th_Q, cm_P, cm_Q, V, tail, want_bounds, fk, fj, ft, par, fe, fc,
         accA, est, lo, hi, tmp, gw, gn):
    """Estimate and bounds of one merged position (docs §1-§7)."""
    SpB = 0.0
    for b in range(nB):
        SpB += bP[b]
    SqC = 0.0
    for c in range(nC):
        SqC += cQ[c]
    m_P = INF
    for a in range(nA):
        m_P = min(m_P, aP[a])
    for b in range(nB):
        m_P = min(m_P, bP[b])
    m_Q = INF
    for a in range(nA):
        m_Q = min(m_Q, aQ[a])
    for c in range(nC):
        m_Q = min(m_Q, cQ[c])
    m_P *= cm_P
    m_Q *= cm_Q
    r_P = 1.0 - S_P
    r_P = r_P if r_P >= th_P else 0.0
    r_Q = 1.0 - S_Q
    r_Q = r_Q if r_Q >= th_Q else 0.0
    n_U = INF if V < 0 else np.float64(V - nA - nB - nC)
    slots_P = nC + n_U
    slots_Q = nB + n_U
    # rounding may leave more unlisted mass than the slots hold at the cap: relax minimally
    if slots_P == 0.0:
        r_P = 0.0
    elif r_P > slots_P * m_P:
        m_P = r_P / slots_P
    if slots_Q == 0.0:
        r_Q = 0.0
    elif r_Q > slots_Q * m_Q:
        m_Q = r_Q / slots_Q
    for m in range(N_MEASURES):
        accA[m] = 0.0
    for a in range(nA):
        _add_phi(accA, aP[a], aQ[a], fk, fj, ft, par)
        if fe:
            accA[ENTROPY] -= _xlogx(aP[a])
        if fc:
            accA[CROSS_ENTROPY] += _neg_xlogy(aP[a], aQ[a])
    _estimate(est, accA, tail, aP, aQ, nA, bP, nB, SpB, cQ, nC, SqC, S_P, S_Q, r_P, r_Q, n_U,
              slots_P, slots_Q, fk, fj, ft, par, fe, fc)
    if not want_bounds:
        return
    _sort_desc(bP, nB)
    _sort_desc(cQ, nC)
    if fk or fj or ft or par[WANT_GJS] or par[WANT_RENYI]:
        _f_lower(lo, tmp, accA, bP, nB, SpB, cQ, nC, SqC, r_P, r_Q, m_P, m_Q, n_U, th_P, th_Q, fk, fj, ft, par)
    for m in range(N_MEASURES):
        hi[m] = accA[m]
    _add_phi(hi, SpB + r_P, 0.0, fk, fj, ft, par)
    _add_phi(hi, 0.0, SqC + r_Q, fk, fj, ft, par)
    if fk and n_U < INF:
        hi[KL] = min(hi[KL], _kl_upper_small_vocab(accA[KL], bP, nB, cQ, nC, r_P, r_Q, m_P, m_Q, n_U, hi[KL]))
        hi[REVERSE_KL] = min(hi[REVERSE_KL], _kl_upper_small_vocab(accA[REVERSE_KL], cQ, nC, bP, nB, r_Q, r_P,
                                                                   m_Q, m_P, n_U, hi[REVERSE_KL]))
    if fe:
        entAB = accA[ENTROPY]
        for b in range(nB):
            entAB -= _xlogx(bP[b])
        lo[ENTROPY], hi[ENTROPY] = _entropy_bounds(entAB, r_P, m_P, slots_P)
        if fc:
            lo[CROSS_ENTROPY] = _ce_lower(accA[CROSS_ENTROPY], bP, nB, cQ, nC, r_P, r_Q, m_P, m_Q, gw, gn)
            hi[CROSS_ENTROPY] = hi[ENTROPY] + hi[KL]
