"""The job summary: small mergeable per-task state and the final table.

A job runs many tasks; each task turns its batch of results into a
`PartStats` (a few KB), the client merges them and `Summary.from_stats`
finalises the merged state. The summary is identical, bit for bit, however
the job was split into tasks and in whatever order the states are merged,
because every piece of `PartStats` merges exactly:

* counts (rows, statuses, +inf, ...) are integers; min/max are min/max
  (with -0.0 normalised to 0.0);
* the sum and the sum of squares of the finite valid values are kept EXACTLY,
  as Python integers in units of 2**-1074 (the quantum of every float64) and
  2**-2148 (the quantum of every square). Mean and (population) std are
  computed from them with exact rational arithmetic and rounded once
  (correctly rounded, round-half-even), so they do not depend on any
  summation order;
* quantiles and the histogram come from a DDSketch bucket count per key:
  bucket counts add up under a merge.

Quantile sketch. DDSketch with relative accuracy `ALPHA` = 0.5% and the
library's `LinearlyInterpolatedMapping`: a value's key is a function of its
float bits (frexp, which is exact) and one IEEE multiply-and-ceil, so keys
are computed vectorised with NumPy and are reproducible on every machine.
(The `LogarithmicMapping` needs `log`, whose last bit may differ between
libm/SIMD implementations; a value on a bucket edge could then land in
different buckets on different workers.) The vectorised key formula equals
the library's `mapping.key` exactly, `_values` equals `mapping.value`, and
the quantile query over the merged integer counts is DDSketch's own
(`get_quantile_value`: the bucket holding rank q*(n-1)), done with a numpy
cumsum instead of the library's per-bin Python loop (tests/test_summary.py
checks all three against the library). Keys above the mapping's
max_possible (values within 1% of the float64 maximum, where the library's
`value` overflows) share one top bucket whose value is within ALPHA of them.

Quantile semantics: pXX is the value of the finite valid values at 0-based
rank floor(q*(n-1)) (NumPy's method="lower"), up to a relative error of at
most ALPHA (plus a few ulps), clamped into [min, max]. Values with absolute
value below ~2.2e-308 count as 0 in the sketch.

Groups (`group_by`). A state may also hold one state per value of a
low-cardinality column (`PartStats.groups`, keyed by the value: str, int,
bool or None for null). Merging merges the groups key by key with the same
exact merge, so each group's summary is the summary of that group's rows
alone, however the job was split; the whole is the merge of the groups. A
state refuses (`TooManyGroupsError`) to hold more than its `max_groups`.

Log bins. The summary also keeps, per measure, the sketch's counts in
coarse log-spaced bins of `LOG_BIN_KEYS` consecutive sketch buckets each
(about 17 bins per factor 2; `log_bin_edges` gives their edges): a few
hundred integers that draw a log-x histogram of a heavy-tailed measure
(`fastkl report`) without reading the output again. Whole buckets per bin:
bins of a fixed width that cut through buckets would alternate between
holding 4 and 5 of them (a comb in the plot).

Throughput of `PartStats.from_batch`, NumPy only, one core: about 45-50 M
values/s on 8 measures x 1M rows with 1.5% non-ok rows (`_bench()` measures
it). A state is ~5-10 KB per measure for typical data (about 100 sketch keys
per factor 2 of value range that the data covers).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from ddsketch.mapping import LinearlyInterpolatedMapping

from .._registry import OK, REASONS, STATUSES, TARGET_MEASURES, TARGET_UNLISTED, valid_rows
from ..errors import TooManyGroupsError

__all__ = ["PartStats", "Summary", "MeasureSummary", "GroupBy", "ALPHA", "QUANTILES", "HIST_BINS",
           "LOG_BIN_KEYS", "DEFAULT_MAX_GROUPS"]

FORMAT_VERSION = 1
ALPHA = 0.005                       # relative accuracy of the quantile sketch
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))  # p999: llama.cpp's p99.9
HIST_BINS = 20
LOG_BIN_KEYS = 6                    # summary's log bins: 6 sketch buckets each (~17 per factor 2)
DEFAULT_MAX_GROUPS = 10_000         # group_by: more distinct values than this is refused
PRINTED_GROUPS = 50                 # groups shown in the printed table (all are in the JSON)

_MAPPING = LinearlyInterpolatedMapping(ALPHA)
# Same expression as ddsketch.mapping.KeyMapping: 1 / log1p(2a / (1 - a)).
_MULT = 1.0 / math.log1p(2 * ALPHA / (1 - ALPHA))
_MIN_POSSIBLE = _MAPPING.min_possible   # |x| <= this goes to the zero bucket
# Keys above key(max_possible) (|x| within 1% of the float64 maximum) would
# have a value() that overflows: such values share one top bucket.
_K_MAX = _MAPPING.key(_MAPPING.max_possible)
_K_TOP = _K_MAX + 1                 # overflow bucket: (upper edge of _K_MAX, float max]
_TOP_VALUE = sys.float_info.max * (2.0 / (1.0 + _MAPPING.gamma))  # within ALPHA of it
_SKETCH_ID = f"ddsketch-linear:{ALPHA!r}:{_MULT.hex()}"

_CHUNK = 1 << 15                    # values per vectorised step (fits in cache)
_FLUSH = 1 << 24                    # values per exact flush of the float bin sums
_HI_MASK = np.uint64(0xFFFF_FFFF_FC00_0000)   # keeps sign, exponent, top 26 mantissa bits
_U52 = np.uint64(52)
# Fast (vectorised) exact path for |x| in [2**-450, 2**450] (biased exponent
# 573..1473) or x == 0: there Dekker's product x*x = p + err is exact.
_E_LO_I = 1023 - 450
_E_SPAN_I = 900
_SPLIT = 134217729.0                # 2**27 + 1, Veltkamp split constant


# ----------------------------------------------------------------------------
# exact sums
# ----------------------------------------------------------------------------

def _bin_sums(x: np.ndarray, H: np.ndarray, L: np.ndarray,
              idx: np.ndarray | None = None) -> None:
    """Add finite float64 values `x` (|x| < 2**990) into per-exponent bins, exactly.

    Bin i collects the values whose top 12 bits (sign, biased exponent) are i.
    Each x is split into hi (x with its low 26 mantissa bits cleared: an
    integer < 2**27 times 2**26 ulps) and lo = x - hi (an integer < 2**26
    times the ulp). Float sums of up to 2**26 such values per bin are
    therefore exact; callers flush before that (see _FLUSH).
    """
    b = x.view(np.uint64)
    if idx is None:
        idx = (b >> _U52).astype(np.intp)
    hi = (b & _HI_MASK).view(np.float64)
    lo = x - hi
    H += np.bincount(idx, weights=hi, minlength=4096)
    L += np.bincount(idx, weights=lo, minlength=4096)


def _bins_to_int(H: np.ndarray, L: np.ndarray) -> int:
    """Exact sum of the bins, as an integer number of 2**-1074."""
    total = 0
    for arr in (H, L):
        for v in arr[np.flatnonzero(arr)].tolist():
            num, den = v.as_integer_ratio()     # den is a power of two <= 2**1074
            total += num << (1075 - den.bit_length())
    return total


def _slow_moments(vals: np.ndarray) -> tuple[int, int]:
    """Exact sum (units 2**-1074) and sum of squares (units 2**-2148), in Python."""
    s1 = s2 = 0
    for v in vals.tolist():
        num, den = v.as_integer_ratio()
        k = 1075 - den.bit_length()
        s1 += num << k
        s2 += (num * num) << (2 * k)
    return s1, s2


def _div_round(a: int, b: int) -> float:
    """a / b correctly rounded (b > 0); CPython's int true division is."""
    return a / b


def _sqrt_ratio(a: int, b: int) -> float:
    """sqrt(a / b) correctly rounded, for integers a >= 0, b > 0."""
    if a == 0:
        return 0.0
    # scale so that the integer square root has >= 60 significant bits
    k = max(0, (122 - (a.bit_length() - b.bit_length())) // 2 + 1)
    num = a << (2 * k)
    q, rem = divmod(num, b)
    r = math.isqrt(q)
    exact = rem == 0 and r * r == q
    # sqrt(a/b) * 2**k lies in [r, r+1); a sticky bit below the rounding
    # position makes the final int/int division round like the exact value.
    return (2 * r + (0 if exact else 1)) / (1 << (k + 1))


# ----------------------------------------------------------------------------
# sketch key counts
# ----------------------------------------------------------------------------

def _keys(x: np.ndarray) -> np.ndarray:
    """ddsketch LinearlyInterpolatedMapping.key, vectorised (x > min_possible)."""
    m, e = np.frexp(x)
    m *= 2.0
    m -= 1.0                  # significand, exact
    e -= 1                    # exponent - 1, exact
    m += e                    # one rounding, as in the library
    m *= _MULT
    np.ceil(m, out=m)
    k = m.astype(np.int64)
    return np.minimum(k, _K_TOP, out=k)


def _values(keys: np.ndarray) -> np.ndarray:
    """ddsketch LinearlyInterpolatedMapping.value, vectorised (same float ops)."""
    v = keys.astype(np.float64) / _MULT                      # _pow_gamma(key - offset)
    exponent = np.floor(v) + 1.0                             # _exp2_approx
    mantissa = ((v - exponent) + 2.0) / 2.0
    top = keys >= _K_TOP
    out = np.ldexp(mantissa, np.where(top, 0, exponent).astype(np.int32))
    out *= 2.0 / (1.0 + _MAPPING.gamma)
    out[top] = _TOP_VALUE
    return out


def log_bin_edges(b: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """The (lower, upper] edges of the log bins `b` of |x| (`MeasureSummary.log_bins` numbers them).

    Bin b holds the sketch keys LOG_BIN_KEYS*b .. LOG_BIN_KEYS*b + LOG_BIN_KEYS - 1; key k holds
    the x with ceil(L(x) * MULT) == k, L(x) = e + (m - 1) for x = m * 2**e, m in [1, 2).
    """
    b = np.asarray(b, np.int64)

    def edge(k: np.ndarray) -> np.ndarray:
        L = k / _MULT
        e = np.floor(L)
        with np.errstate(over="ignore"):
            return np.minimum(np.ldexp(1.0 + (L - e), e.astype(np.int32)), sys.float_info.max)

    return edge(b * LOG_BIN_KEYS - 1), edge(b * LOG_BIN_KEYS + LOG_BIN_KEYS - 1)


class _KeyCounts:
    """Dense int64 counts for a contiguous range of sketch keys."""

    __slots__ = ("offset", "counts")

    def __init__(self, offset: int = 0, counts: np.ndarray | None = None) -> None:
        self.offset = offset
        self.counts = np.zeros(0, np.int64) if counts is None else counts

    def add_dense(self, offset: int, counts: np.ndarray) -> None:
        if counts.size == 0:
            return
        if self.counts.size == 0:
            self.offset, self.counts = offset, counts.astype(np.int64, copy=True)
            return
        lo = min(self.offset, offset)
        hi = max(self.offset + self.counts.size, offset + counts.size)
        if lo != self.offset or hi != self.offset + self.counts.size:
            grown = np.zeros(hi - lo, np.int64)
            grown[self.offset - lo:self.offset - lo + self.counts.size] = self.counts
            self.offset, self.counts = lo, grown
        self.counts[offset - self.offset:offset - self.offset + counts.size] += counts

    def add_keys(self, keys: np.ndarray) -> None:
        if keys.size:
            k0 = int(keys.min())
            self.add_dense(k0, np.bincount(keys - k0))

    def items(self) -> tuple[list[int], list[int]]:
        nz = np.flatnonzero(self.counts)
        return (nz + self.offset).tolist(), self.counts[nz].tolist()

    def to_json(self) -> list:
        """[[first_key, [count, count, ...]], ...]: runs of keys, zeros kept
        inside a run when the gap is short (compact for dense histograms)."""
        nz = np.flatnonzero(self.counts)
        if nz.size == 0:
            return []
        breaks = np.flatnonzero(np.diff(nz) > 8)
        starts = np.concatenate([[0], breaks + 1])
        ends = np.concatenate([breaks, [nz.size - 1]])
        return [[int(nz[a]) + self.offset, self.counts[nz[a]:nz[b] + 1].tolist()]
                for a, b in zip(starts.tolist(), ends.tolist())]

    @classmethod
    def from_json(cls, runs: list) -> "_KeyCounts":
        out = cls()
        if runs:
            k0 = min(int(r[0]) for r in runs)
            k1 = max(int(r[0]) + len(r[1]) for r in runs)
            dense = np.zeros(k1 - k0, np.int64)
            for first, counts in runs:
                dense[int(first) - k0:int(first) - k0 + len(counts)] += np.asarray(counts, np.int64)
            out.offset, out.counts = k0, dense
        return out

    def copy(self) -> "_KeyCounts":
        return _KeyCounts(self.offset, self.counts.copy())


# ----------------------------------------------------------------------------
# per-measure state
# ----------------------------------------------------------------------------

class _MeasureStats:
    """Mergeable state of one measure over the valid (status ok) rows."""

    __slots__ = ("finite", "inf", "neg_inf", "nan", "zeros", "min", "max",
                 "s1", "s2", "zero_bucket", "pos", "neg")

    def __init__(self) -> None:
        self.finite = 0          # finite values (they feed all the statistics)
        self.inf = 0             # +inf values
        self.neg_inf = 0         # -inf values
        self.nan = 0             # NaN on a valid row (a kernel bug; counted, not used)
        self.zeros = 0           # values exactly 0
        self.min: float | None = None
        self.max: float | None = None
        self.s1 = 0              # exact sum, units of 2**-1074
        self.s2 = 0              # exact sum of squares, units of 2**-2148
        self.zero_bucket = 0     # sketch: |x| <= min_possible
        self.pos = _KeyCounts()  # sketch: keys of x > 0
        self.neg = _KeyCounts()  # sketch: keys of -x for x < 0

    # -- building -----------------------------------------------------------
    def add_values(self, v: np.ndarray, ok: np.ndarray | None = None) -> None:
        """Add the values v[ok] of the valid rows (float64; NaN/inf allowed).

        Works chunk by chunk so that every temporary stays small (cache, and
        no fresh pages from the OS for each large temporary).
        """
        H1 = np.zeros(4096)
        L1 = np.zeros(4096)
        H2 = np.zeros(4096)
        L2 = np.zeros(4096)
        pending = 0
        s1 = s2 = 0
        for start in range(0, v.shape[0], _CHUNK):
            c = v[start:start + _CHUNK]
            if ok is not None:
                c = c[ok[start:start + _CHUNK]]
            fin = np.isfinite(c)
            nfin = int(np.count_nonzero(fin))
            if nfin != c.size:
                n_nan = int(np.count_nonzero(np.isnan(c)))
                n_inf = int(np.count_nonzero(c == np.inf))
                self.nan += n_nan
                self.inf += n_inf
                self.neg_inf += c.size - nfin - n_inf - n_nan
                c = c[fin]
            if nfin == 0:
                continue
            c = np.ascontiguousarray(c, dtype=np.float64)
            self.finite += nfin
            lo, hi = float(c.min()) + 0.0, float(c.max()) + 0.0   # +0.0: -0.0 -> 0.0
            self.min = lo if self.min is None else min(self.min, lo)
            self.max = hi if self.max is None else max(self.max, hi)

            # counts and sketch keys
            self.zeros += int(np.count_nonzero(c == 0.0))
            pos = c if lo > _MIN_POSSIBLE else c[c > _MIN_POSSIBLE]
            n_neg = 0
            if lo < -_MIN_POSSIBLE:
                neg = c[c < -_MIN_POSSIBLE]
                n_neg = neg.size
                self.neg.add_keys(_keys(-neg))
            self.zero_bucket += c.size - pos.size - n_neg
            self.pos.add_keys(_keys(pos))

            # exact moments: rare extreme values in Python, the rest vectorised
            idx = (c.view(np.uint64) >> _U52).astype(np.intp)
            out = ((idx & 0x7FF) - _E_LO_I).view(np.uintp) > _E_SPAN_I   # outside [573, 1473]
            if out.any():
                slow = out & (c != 0.0)
                if slow.any():
                    a, b = _slow_moments(c[slow])
                    s1 += a
                    s2 += b
                    c = np.where(slow, 0.0, c)
                    idx = (c.view(np.uint64) >> _U52).astype(np.intp)
            _bin_sums(c, H1, L1, idx)
            # Dekker: x*x == p + err exactly; err = ((ch*ch - p) + 2*ch*cl) + cl*cl
            p = c * c
            t = _SPLIT * c
            ch = t - c
            np.subtract(t, ch, out=ch)        # ch = t - (t - c): top 26 bits of c
            cl = np.subtract(c, ch, out=t)    # cl = c - ch
            err = ch * ch
            err -= p
            ch *= 2.0
            ch *= cl                          # 2*ch*cl, exact
            err += ch
            cl *= cl
            err += cl
            _bin_sums(p, H2, L2)
            _bin_sums(err, H2, L2)
            pending += c.size
            if pending >= _FLUSH:
                s1 += _bins_to_int(H1, L1)
                s2 += _bins_to_int(H2, L2) << 1074
                for arr in (H1, L1, H2, L2):
                    arr[:] = 0.0
                pending = 0
        if pending:
            s1 += _bins_to_int(H1, L1)
            s2 += _bins_to_int(H2, L2) << 1074
        self.s1 += s1
        self.s2 += s2

    # -- merging ------------------------------------------------------------
    def merge_into(self, o: "_MeasureStats") -> None:
        for name in ("finite", "inf", "neg_inf", "nan", "zeros", "s1", "s2", "zero_bucket"):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        if o.min is not None:
            self.min = o.min if self.min is None else min(self.min, o.min)
            self.max = o.max if self.max is None else max(self.max, o.max)
        self.pos.add_dense(o.pos.offset, o.pos.counts)
        self.neg.add_dense(o.neg.offset, o.neg.counts)

    def copy(self) -> "_MeasureStats":
        out = _MeasureStats()
        for name in self.__slots__:
            setattr(out, name, getattr(self, name))
        out.pos, out.neg = self.pos.copy(), self.neg.copy()
        return out

    # -- serialisation --------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "finite": self.finite, "inf": self.inf, "neg_inf": self.neg_inf,
            "nan": self.nan, "zeros": self.zeros,
            "min": self.min, "max": self.max,
            # exact integers, hex strings (JSON readers differ on huge ints)
            "sum": hex(self.s1), "sumsq": hex(self.s2),
            "zero_bucket": self.zero_bucket,
            "pos": self.pos.to_json(), "neg": self.neg.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict) -> "_MeasureStats":
        out = cls()
        for name in ("finite", "inf", "neg_inf", "nan", "zeros", "zero_bucket"):
            setattr(out, name, int(d[name]))
        out.min = None if d["min"] is None else float(d["min"])
        out.max = None if d["max"] is None else float(d["max"])
        out.s1 = int(d["sum"], 16)
        out.s2 = int(d["sumsq"], 16)
        out.pos = _KeyCounts.from_json(d["pos"])
        out.neg = _KeyCounts.from_json(d["neg"])
        return out

    # -- finalisation -----------------------------------------------------------
    def mean(self) -> float | None:
        if self.finite == 0:
            return None
        return _div_round(self.s1, self.finite << 1074)

    def std(self) -> float | None:
        """Population standard deviation (ddof=0), correctly rounded."""
        n = self.finite
        if n == 0:
            return None
        # var = (n*S2 - S1**2) / n**2 with S1 = s1 * 2**-1074, S2 = s2 * 2**-2148
        return _sqrt_ratio(n * self.s2 - self.s1 * self.s1, (n * n) << 2148)

    def buckets(self) -> tuple[np.ndarray, np.ndarray]:
        """(representative values clamped into [min, max], counts), ascending."""
        nk, nc = self.neg.items()
        pk, pc = self.pos.items()
        reps = np.concatenate([-_values(np.asarray(nk[::-1], np.int64)),
                               [0.0] if self.zero_bucket else [],
                               _values(np.asarray(pk, np.int64))])
        counts = np.asarray(nc[::-1] + ([self.zero_bucket] if self.zero_bucket else []) + pc,
                            np.int64)
        np.clip(reps, self.min, self.max, out=reps)
        return reps + 0.0, counts

    def quantiles(self) -> dict[str, float | None]:
        """DDSketch's query: the bucket holding rank q*(n-1), as its value."""
        if self.finite == 0:
            return {name: None for name, _ in QUANTILES}
        reps, counts = self.buckets()
        cum = np.cumsum(counts)
        out = {}
        for name, q in QUANTILES:
            rank = q * (self.finite - 1)
            i = int(np.searchsorted(cum, rank, side="right"))   # first cum > rank
            out[name] = float(reps[i])
        return out

    def histogram(self, bins: int = HIST_BINS) -> list[tuple[float, float, int]]:
        """`bins` equal-width bins from min to max, counted from the sketch buckets.

        Each sketch bucket goes wholly to the bin holding its representative
        value, so a bin edge is blurred by at most the sketch's relative
        accuracy; the counts add up to `finite` exactly.
        """
        if self.finite == 0:
            return []
        lo, hi = self.min, self.max
        if lo == hi:
            return [(lo, hi, self.finite)]
        width = hi / bins - lo / bins          # no overflow for any finite lo, hi
        edges = [lo + i * width for i in range(bins)] + [hi]
        edges = [min(e, hi) for e in edges]
        reps, bc = self.buckets()
        idx = np.searchsorted(np.asarray(edges[1:-1]), reps, side="right")
        counts = np.zeros(bins, np.int64)
        np.add.at(counts, idx, bc)
        return [(edges[i], edges[i + 1], int(counts[i])) for i in range(bins)]

    def log_bins(self) -> dict | None:
        """Counts in log-spaced bins (see the module docstring), None without finite values.

        {"sketch": id, "keys_per_bin": 6, "zero": n, "pos": [[first, [counts...]], ...], "neg": [...]}:
        bin b of "pos" covers the x > 0 in `log_bin_edges(b)` ("neg": of -x for x < 0); "zero"
        counts the values the sketch holds as 0 (|x| below ~2.2e-308).
        """
        if self.finite == 0:
            return None
        out: dict = {"sketch": _SKETCH_ID, "keys_per_bin": LOG_BIN_KEYS, "zero": self.zero_bucket}
        for name, kc in (("pos", self.pos), ("neg", self.neg)):
            coarse = _KeyCounts()
            if kc.counts.size:
                k = np.arange(kc.offset, kc.offset + kc.counts.size, dtype=np.int64) // LOG_BIN_KEYS
                lo = int(k[0])
                coarse.add_dense(lo, np.bincount(k - lo, weights=kc.counts.astype(np.float64)).astype(np.int64))
            out[name] = coarse.to_json()
        return out


# ----------------------------------------------------------------------------
# PartStats
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupBy:
    """Per-group statistics: the grouping column (its name, for messages and the summary) and the cap."""

    column: str
    max_groups: int = DEFAULT_MAX_GROUPS

    def too_many(self, seen: int) -> TooManyGroupsError:
        return TooManyGroupsError(
            f"group_by column {self.column!r} has more than {self.max_groups:,} distinct values "
            f"({seen:,} met so far): group by a low-cardinality column, or raise max_groups")


GroupKey = Any  # str, int, bool or None (null is its own group)


def _group_order(key: GroupKey) -> tuple:
    """Groups in a stable, readable order: by value within a type, null last."""
    return (key is None, type(key).__name__, key if key is not None else 0)


class PartStats:
    """Mergeable statistics of part of a job (one task, or several merged).

    `merge` is exact, associative and commutative; `Summary.from_stats` of a
    merged state does not depend on how the rows were split or merged.
    Picklable (through `to_json`) and JSON-serialisable. With `group_by`, it
    also holds one such state per value of the grouping column (`groups`),
    merged key by key.
    """

    __slots__ = ("measures", "rows", "status_counts", "_stats", "_sketch_id", "tokens", "group_by", "groups")

    def __init__(self, measures: tuple[str, ...], group_by: GroupBy | None = None) -> None:
        measures = tuple(measures)
        if len(set(measures)) != len(measures) or not all(isinstance(m, str) for m in measures):
            raise ValueError(f"measures must be distinct names, got {measures!r}")
        self.measures: tuple[str, ...] = measures
        self.rows: int = 0
        self.status_counts: list[int] = [0] * len(STATUSES)
        self._stats = [_MeasureStats() for _ in measures]
        self._sketch_id = _SKETCH_ID
        # sequence rows: the same statistics over their counted positions (the second level)
        self.tokens: PartStats | None = None
        # group_by: one state (without groups of its own) per value of the grouping column
        self.group_by: GroupBy | None = group_by
        self.groups: dict[GroupKey, PartStats] | None = {} if group_by is not None else None

    @classmethod
    def empty(cls, measures: tuple[str, ...]) -> "PartStats":
        return cls(measures)

    @classmethod
    def from_batch(cls, measures: tuple[str, ...], values: np.ndarray,
                   status: np.ndarray) -> "PartStats":
        """State of one batch: `values` (n_measures, n) float64, NaN where the
        row is not ok; `status` (n,) uint8 codes of fastkl._registry.STATUSES.

        Only rows with status ok contribute values; their +inf / -inf / NaN
        are counted apart and the finite ones feed the statistics.
        """
        out = cls(measures)
        status = np.asarray(status)
        n = status.shape[0] if status.ndim == 1 else -1
        if n < 0:
            raise ValueError(f"status must be 1-D, got shape {status.shape}")
        values = np.asarray(values, dtype=np.float64)
        if values.ndim == 1 and len(out.measures) == 1:
            values = values[None, :]
        if values.shape != (len(out.measures), n):
            raise ValueError(f"values must have shape ({len(out.measures)}, {n}) "
                             f"for measures {out.measures}, got {values.shape}")
        out.rows = n
        if n == 0:
            return out
        lo, hi = int(status.min()), int(status.max())
        if lo < 0 or hi >= len(STATUSES):
            raise ValueError(f"status codes must be in 0..{len(STATUSES) - 1}, got {lo}..{hi}")
        counts = np.bincount(status.astype(np.intp, copy=False), minlength=len(STATUSES))
        out.status_counts = counts.tolist()
        n_ok = out.status_counts[OK] + out.status_counts[TARGET_UNLISTED]
        if n_ok == 0:
            return out
        ok = None if n_ok == n else valid_rows(status)
        strict = None if out.status_counts[OK] == n else status == OK
        for name, st, v in zip(out.measures, out._stats, values):
            st.add_values(v, strict if _needs_target(name) else ok)
        return out

    @staticmethod
    def _columns(layout: Any) -> tuple[str, ...]:
        """The result columns summarised: per measure m [, m_mean][, m_lower, m_upper]."""
        return tuple(name for m in layout.measures for name in (
            m, *((f"{m}_mean",) if layout.sequence else ()),
            *((f"{m}_lower", f"{m}_upper") if layout.bounds else ())))

    @classmethod
    def for_layout(cls, layout: Any, group_by: GroupBy | None = None) -> "PartStats":
        """The empty state of a job whose results have this `fastkl._result.Layout`."""
        out = cls(cls._columns(layout), group_by)
        if layout.sequence:
            out.tokens = cls(layout.measures)
        return out

    @classmethod
    def from_result(cls, res: Any, group_by: GroupBy | None = None, keys: list | None = None,
                    codes: np.ndarray | None = None) -> "PartStats":
        """State of one `compute` result: each measure's value (and for sequence rows its
        mean per position, for top-k rows its bounds) per row, and for sequence rows the
        token level over the counted positions of valid sequences.

        With `group_by`: row i belongs to the group `keys[codes[i]]`; the state holds
        each group's state and the whole (their merge).
        """
        layout = res.layout
        means = res.means() if layout.sequence else None
        rows = []
        for i in range(len(res.measures)):
            rows.append(res.values[i])
            if means is not None:
                rows.append(means[i])
            if layout.bounds:
                rows += [res.lower[i], res.upper[i]]
        columns, values, status = cls._columns(layout), np.stack(rows), np.asarray(res.status)
        counted = lens = None
        if layout.sequence:
            t = res.per_token
            lens = np.diff(t.offsets)
            counted = np.flatnonzero(np.repeat(valid_rows(status), lens) & valid_rows(t.status))

        def part(idx: np.ndarray | None, tok: np.ndarray | None) -> "PartStats":
            out = cls.from_batch(columns, values if idx is None else values[:, idx],
                                 status if idx is None else status[idx])
            if layout.sequence:
                t = res.per_token
                out.tokens = cls.from_batch(res.measures, t.values[:, tok], t.status[tok])
            return out

        if group_by is None:
            return part(None, counted)
        codes = np.asarray(codes, np.intp)
        if codes.shape != status.shape:
            raise ValueError(f"codes must have one entry per row ({status.shape[0]}), got shape {codes.shape}")
        n_keys = len(keys or ())
        if n_keys == 1 and status.size:  # one value in the whole batch (a hive partition key, a file of one split)
            out = cls.for_layout(layout, group_by)
            out._merge_in_place(part(None, counted), key=keys[0])
            return out
        order = np.argsort(codes, kind="stable")
        starts = np.searchsorted(codes[order], np.arange(n_keys + 1), side="left")
        if layout.sequence:
            t_codes = np.repeat(codes, lens)[counted]
            t_order = np.argsort(t_codes, kind="stable")
            t_starts = np.searchsorted(t_codes[t_order], np.arange(n_keys + 1), side="left")
        out = cls.for_layout(layout, group_by)
        for g, key in enumerate(keys or ()):
            if starts[g] == starts[g + 1]:
                continue  # a dictionary value no row of this batch has
            tok = counted[t_order[t_starts[g]:t_starts[g + 1]]] if layout.sequence else None
            out._merge_in_place(part(order[starts[g]:starts[g + 1]], tok), key=key)
        return out

    # -- merging ------------------------------------------------------------
    def _check(self, other: "PartStats") -> None:
        if not isinstance(other, PartStats):
            raise TypeError(f"cannot merge PartStats with {type(other).__name__}")
        if other.measures != self.measures:
            raise ValueError(f"cannot merge stats of measures {self.measures} "
                             f"and {other.measures}")
        if other._sketch_id != self._sketch_id:
            raise ValueError(f"cannot merge sketches {self._sketch_id} and {other._sketch_id}")
        if (self.group_by is not None and other.group_by is not None
                and self.group_by.column != other.group_by.column):
            raise ValueError(f"cannot merge stats grouped by {self.group_by.column!r} "
                             f"and by {other.group_by.column!r}")

    def _merge_in_place(self, other: "PartStats", key: Any = ...) -> None:
        """Add `other` into this state; with `key`, `other` is (part of) the group `key`.

        Groups merge key by key; the cap on their number is this state's
        (`self.group_by.max_groups`): an accumulator started with the job's
        own cap applies it to states made under another.
        """
        self._check(other)
        self.rows += other.rows
        self.status_counts = [a + b for a, b in zip(self.status_counts, other.status_counts)]
        for mine, theirs in zip(self._stats, other._stats):
            mine.merge_into(theirs)
        if other.tokens is not None:
            if self.tokens is None:
                self.tokens = PartStats(other.tokens.measures)
            self.tokens._merge_in_place(other.tokens)
        if key is not ...:
            self._merge_group(key, other)
        elif other.groups is not None:
            if self.group_by is None:  # an accumulator made without group_by takes the grouping on
                self.group_by, self.groups = other.group_by, {}
            for k, g in other.groups.items():
                self._merge_group(k, g)

    def _merge_group(self, key: Any, state: "PartStats") -> None:
        if self.groups is None or self.group_by is None:
            raise ValueError("this state has no group_by: it cannot hold groups")
        if not (key is None or isinstance(key, (str, int))):  # bool is an int
            raise TypeError(f"a group key is a str, int, bool or None, got {type(key).__name__}")
        mine = self.groups.get(key)
        if mine is None:
            if len(self.groups) >= self.group_by.max_groups:
                raise self.group_by.too_many(len(self.groups) + 1)
            mine = self.groups[key] = PartStats(self.measures)
        if state.groups:
            raise ValueError("a group's state cannot hold groups of its own")
        mine._merge_in_place(state)

    def copy(self) -> "PartStats":
        out = PartStats(self.measures, self.group_by)
        out.rows = self.rows
        out.status_counts = list(self.status_counts)
        out._stats = [s.copy() for s in self._stats]
        out._sketch_id = self._sketch_id
        out.tokens = None if self.tokens is None else self.tokens.copy()
        if self.groups is not None:
            out.groups = {k: g.copy() for k, g in self.groups.items()}
        return out

    def merge(self, other: "PartStats") -> "PartStats":
        """A new state holding both (neither input is changed)."""
        out = self.copy()
        out._merge_in_place(other)
        return out

    @classmethod
    def merge_all(cls, parts: Iterable["PartStats"],
                  measures: tuple[str, ...] | None = None) -> "PartStats":
        """Merge any number of states (`measures` is required if `parts` may be empty)."""
        out: PartStats | None = None if measures is None else cls(measures)
        for p in parts:
            if out is None:
                out = p.copy()
            else:
                out._merge_in_place(p)
        if out is None:
            raise ValueError("merge_all of no parts needs `measures`")
        return out

    # -- serialisation --------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": "fastkl.PartStats",
            "version": FORMAT_VERSION,
            "sketch": self._sketch_id,
            "measures": list(self.measures),
            "rows": self.rows,
            "status_counts": dict(zip(STATUSES, self.status_counts)),
            "stats": {m: s.to_json() for m, s in zip(self.measures, self._stats)},
            **({"tokens": self.tokens.to_json()} if self.tokens is not None else {}),
            **({"group_by": {"column": self.group_by.column, "max_groups": self.group_by.max_groups,
                             "groups": [[k, self.groups[k].to_json()]
                                        for k in sorted(self.groups, key=_group_order)]}}
               if self.group_by is not None else {}),
        }

    @classmethod
    def from_json(cls, d: dict) -> "PartStats":
        if d.get("format") != "fastkl.PartStats" or d.get("version") != FORMAT_VERSION:
            raise ValueError("not a fastkl.PartStats v%d record" % FORMAT_VERSION)
        out = cls(tuple(d["measures"]))
        out._sketch_id = d["sketch"]
        out.rows = int(d["rows"])
        sc = d["status_counts"]
        unknown = set(sc) - set(STATUSES)
        if unknown:
            raise ValueError(f"unknown statuses {sorted(unknown)}")
        out.status_counts = [int(sc.get(name, 0)) for name in STATUSES]
        out._stats = [_MeasureStats.from_json(d["stats"][m]) for m in out.measures]
        out.tokens = PartStats.from_json(d["tokens"]) if "tokens" in d else None
        if "group_by" in d:
            g = d["group_by"]
            out.group_by = GroupBy(str(g["column"]), int(g["max_groups"]))
            out.groups = {}
            for k, st in g["groups"]:
                out.groups[k] = PartStats.from_json(st)
        return out

    def __reduce__(self):
        return (PartStats.from_json, (self.to_json(),))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PartStats):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PartStats(measures={self.measures}, rows={self.rows})"


# ----------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------

@dataclass
class MeasureSummary:
    """Summary of one measure over a job.

    rows = valid + null + sum(invalid). The value statistics (mean, std, min,
    max, quantiles, histogram) are over the `finite` values of the valid
    rows; `inf` (+inf) and `neg_inf`, `nan` (NaN on a valid row: never
    expected) are counted apart. Statistics of an empty set are None.
    """

    rows: int
    valid: int
    null: int
    invalid: dict[str, int]
    finite: int
    inf: int
    neg_inf: int
    nan: int
    zeros: int
    mean: float | None
    std: float | None        # population std (ddof=0)
    min: float | None
    max: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    p999: float | None = None  # the 99.9th percentile (absent from summaries written before it)
    histogram: list[tuple[float, float, int]] = field(default_factory=list)
    # the sketch's counts in log bins (`_MeasureStats.log_bins`): a log-x histogram for `fastkl report`
    log_bins: dict | None = None

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["invalid"] = dict(self.invalid)
        d["histogram"] = [[lo, hi, c] for lo, hi, c in self.histogram]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MeasureSummary":
        kw = {k: d[k] if k not in ("p999", "log_bins") else d.get(k) for k in cls.__dataclass_fields__}
        kw["invalid"] = {str(k): int(v) for k, v in d["invalid"].items()}
        kw["histogram"] = [(float(lo), float(hi), int(c)) for lo, hi, c in d["histogram"]]
        for k in ("mean", "std", "min", "max", "p50", "p90", "p99", "p999"):
            kw[k] = None if kw[k] is None else float(kw[k])
        return cls(**kw)


_NOT_INVALID = ("ok", "null", "no_tokens", "target_unlisted")  # statuses that are not a bad row


def _needs_target(column: str) -> bool:
    """A value column of nll_p / nll_q / delta_p (or its mean): null where the target is not listed."""
    return column.removesuffix("_mean") in TARGET_MEASURES


@dataclass
class Summary:
    """The summary of a job, as printed by `fastkl run`.

    `to_dict()` is plain JSON: every float in it is finite (undefined
    statistics are None; +inf values are counted, never stored as a float).
    """

    rows: int
    measures: dict[str, MeasureSummary]
    status_counts: dict[str, int]
    dest: str | None = None
    options: dict | None = None
    timings: dict | None = None
    files: int | None = None
    tokens: "Summary | None" = None  # sequence rows: the same over their counted positions
    group_by: str | None = None       # the grouping column, if the job had one
    groups: "list[tuple[Any, Summary]] | None" = None  # (value, the summary of its rows), null last

    @classmethod
    def from_stats(cls, stats: PartStats, **extra: Any) -> "Summary":
        sc = dict(zip(STATUSES, stats.status_counts))
        null = sc["null"]
        invalid = {r: sc[r] for r in REASONS}
        measures = {}
        for name, st in zip(stats.measures, stats._stats):
            valid = sc["ok"] if _needs_target(name) else sc["ok"] + sc["target_unlisted"]
            measures[name] = MeasureSummary(
                rows=stats.rows, valid=valid, null=null, invalid=dict(invalid),
                finite=st.finite, inf=st.inf, neg_inf=st.neg_inf, nan=st.nan,
                zeros=st.zeros, mean=st.mean(), std=st.std(), min=st.min, max=st.max,
                **st.quantiles(), histogram=st.histogram(), log_bins=st.log_bins(),
            )
        tokens = cls.from_stats(stats.tokens) if stats.tokens is not None else None
        if stats.group_by is not None and "group_by" not in extra:
            extra["group_by"] = stats.group_by.column
            extra["groups"] = [(k, cls.from_stats(stats.groups[k]))
                               for k in sorted(stats.groups, key=_group_order)]
        return cls(rows=stats.rows, measures=measures, status_counts=sc, tokens=tokens, **extra)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "status_counts": dict(self.status_counts),
            "measures": {k: m.to_dict() for k, m in self.measures.items()},
            "dest": self.dest,
            "options": self.options,
            "timings": self.timings,
            "files": self.files,
            **({"tokens": self.tokens.to_dict()} if self.tokens is not None else {}),
            **({"group_by": self.group_by,
                "groups": [{"value": k, **g._core_dict()} for k, g in (self.groups or [])]}
               if self.group_by is not None else {}),
        }

    def _core_dict(self) -> dict:
        """A group's summary: its counts and measures (the job's dest, options, timings are the whole's)."""
        d = self.to_dict()
        for k in ("dest", "options", "timings", "files"):
            d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Summary":
        return cls(
            rows=int(d["rows"]),
            measures={k: MeasureSummary.from_dict(m) for k, m in d["measures"].items()},
            status_counts={str(k): int(v) for k, v in d["status_counts"].items()},
            dest=d.get("dest"), options=d.get("options"),
            timings=d.get("timings"), files=d.get("files"),
            tokens=cls.from_dict(d["tokens"]) if d.get("tokens") else None,
            group_by=d.get("group_by"),
            groups=[(g["value"], cls.from_dict(g)) for g in d["groups"]] if d.get("group_by") is not None else None,
        )

    def group(self, value: Any) -> "Summary":
        """The summary of the rows whose grouping column holds `value` (None: null)."""
        for k, g in self.groups or ():
            if k == value and type(k) is type(value):
                return g
        raise KeyError(value)

    # -- text -------------------------------------------------------------------
    def format_table(self, unicode: bool | None = None) -> str:
        """Human table: one line per measure, invalid rows per reason, histograms.

        `unicode=None` uses block characters for the histogram when stdout can
        encode them, ASCII otherwise.
        """
        if unicode is None:
            enc = getattr(sys.stdout, "encoding", None) or "ascii"
            try:
                "▁█".encode(enc)
                unicode = True
            except (LookupError, UnicodeEncodeError):
                unicode = False
        sc = self.status_counts
        n_invalid = sum(v for k, v in sc.items() if k not in _NOT_INVALID)
        n_valid = sc.get("ok", 0) + sc.get("target_unlisted", 0)
        head = f"{self.rows} rows: {n_valid} valid, {sc.get('null', 0)} null, {n_invalid} invalid"
        if sc.get("no_tokens"):
            head += f", {sc['no_tokens']} with no counted position"
        if sc.get("target_unlisted"):
            head += f", {sc['target_unlisted']} whose target is not listed (nll and delta_p null there)"
        if self.files is not None:
            head += f", {self.files} files"
        if self.dest:
            head += f" -> {self.dest}"
        lines = [head]
        lines += self._measure_lines(unicode)
        reasons = [(k, v) for k, v in sc.items() if k not in _NOT_INVALID and v]
        if reasons:
            lines.append("invalid rows: " + ", ".join(f"{k} {v}" for k, v in reasons))
        if self.tokens is not None:
            lines.append(f"over the {self.tokens.rows} counted positions of the valid sequences:")
            lines += self.tokens._measure_lines(unicode)
        ppl = self.perplexity()
        if ppl:
            shown = ", ".join(f"{k} {_fmt(v)}" for k, v in ppl.items())
            lines.append(f"perplexity (exp of the mean nll over the valid tokens): {shown}")
        if self.group_by is not None:
            lines += self._group_lines()
        return "\n".join(lines)

    def _group_lines(self, limit: int = PRINTED_GROUPS) -> list[str]:
        """One line per group and measure: counts, mean and quantiles (the first `limit` groups)."""
        groups = self.groups or []
        lines = [f"by {self.group_by} ({len(groups)} group{'s' if len(groups) != 1 else ''}):"]
        if not groups:
            return lines
        shown = [(group_label(k), g) for k, g in groups[:limit]]
        gw = min(24, max(len(self.group_by), *(len(k) for k, _ in shown)))
        mw = max(7, *(len(m) for m in self.measures))
        cols = ["rows", "valid", "invalid", "inf", "mean", "p50", "p90", "p99", "max"]
        widths = [10, 10, 8, 6, 10, 10, 10, 10, 10]
        lines.append(f"  {self.group_by[:gw]:<{gw}} {'measure':<{mw}}"
                     + "".join(f" {c:>{w}}" for c, w in zip(cols, widths)))
        for label, g in shown:
            label = label if len(label) <= gw else label[:gw - 1] + "~"
            for i, (name, m) in enumerate(g.measures.items()):
                cells = [str(m.rows), str(m.valid), str(sum(m.invalid.values())), str(m.inf)]
                cells += [_fmt(getattr(m, k)) for k in cols[4:]]
                lines.append(f"  {label if i == 0 else '':<{gw}} {name:<{mw}}"
                             + "".join(f" {c:>{w}}" for c, w in zip(cells, widths)))
        if len(groups) > limit:
            lines.append(f"  ... and {len(groups) - limit} more groups (all of them in --summary-json, "
                         "DEST/_fastkl.json and fastkl report)")
        return lines

    def perplexity(self) -> dict[str, float]:
        """exp(mean nll) of each side over the valid tokens (+inf if any nll is), and Q's over P's."""
        level = self.tokens if self.tokens is not None else self
        out: dict[str, float] = {}
        for side in ("p", "q"):
            m = level.measures.get(f"nll_{side}")
            if m is not None and m.valid:
                out[side] = math.inf if m.inf else math.exp(m.mean) if m.mean is not None else math.nan
        if len(out) == 2 and out["p"] > 0:
            out["q / p"] = out["q"] / out["p"] if math.isfinite(out["p"]) else math.nan
        return out

    def _measure_lines(self, unicode: bool) -> list[str]:
        """One line per measure, then their histograms."""
        lines: list[str] = []
        if self.measures:
            w = max(8, max(len(m) for m in self.measures))
            cols = ["valid", "null", "invalid", "inf", "mean", "std", "min",
                    "p50", "p90", "p99", "p99.9", "max"]
            widths = [10, 8, 8, 6] + [10] * 8
            lines.append(f"{'measure':<{w}}" + "".join(f" {c:>{cw}}" for c, cw in zip(cols, widths)))
            for name, m in self.measures.items():
                cells = [str(m.valid), str(m.null), str(sum(m.invalid.values())), str(m.inf)]
                cells += [_fmt(getattr(m, k.replace(".", ""))) for k in cols[4:]]
                lines.append(f"{name:<{w}}" + "".join(f" {c:>{cw}}" for c, cw in zip(cells, widths)))
                odd = [f"{k} {v}" for k, v in (("-inf", m.neg_inf), ("nan on valid rows", m.nan)) if v]
                if odd:
                    lines.append(f"{'':<{w}}   also: " + ", ".join(odd))
            if any(m.inf or m.neg_inf for m in self.measures.values()):
                lines.append("(mean, std, min, quantiles and max are over the finite values; "
                             "inf counts the +inf values)")
        if any(m.histogram for m in self.measures.values()):
            lines.append(f"histograms ({HIST_BINS} equal bins from min to max):")
            w = max(len(m) for m in self.measures)
            for name, m in self.measures.items():
                if m.histogram:
                    bar = _sparkline([c for _, _, c in m.histogram], unicode)
                    lines.append(f"  {name:<{w}} {_fmt(m.min):>10} |{bar}| {_fmt(m.max)}")
        return lines

    def __str__(self) -> str:
        return self.format_table()


def group_label(value: Any) -> str:
    """A group's value as tables show it: null as (null), strings as they are (escaped if unprintable)."""
    if value is None:
        return "(null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return text if text.isprintable() and text.strip() == text and text else repr(text)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    return f"{v:.4g}"


def _sparkline(counts: list[int], unicode: bool) -> str:
    chars = " ▁▂▃▄▅▆▇█" if unicode else " .:-=+*#@"
    top = max(counts) if counts else 0
    if top == 0:
        return " " * len(counts)
    levels = len(chars) - 1
    # any non-empty bin shows at least the lowest mark, so outliers stay visible
    return "".join(chars[0] if c == 0 else chars[max(1, round(c / top * levels))]
                   for c in counts)


def _bench(n: int = 1_000_000, measures: int = 8, seed: int = 0) -> float:
    """Throughput of PartStats.from_batch in values per second (one core)."""
    import time

    rng = np.random.default_rng(seed)
    values = np.exp(rng.normal(-4.0, 3.0, (measures, n)))
    values[:, rng.random(n) < 0.05] = 0.0
    values[0, rng.random(n) < 0.001] = np.inf
    status = np.zeros(n, np.uint8)
    status[rng.random(n) < 0.01] = 1
    status[rng.random(n) < 0.005] = len(STATUSES) - 1
    values[:, status != 0] = np.nan
    names = tuple(f"m{i}" for i in range(measures))
    PartStats.from_batch(names, values, status)   # warm up
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        PartStats.from_batch(names, values, status)
        best = min(best, time.perf_counter() - t)
    return values.size / best
