"""Slow, obviously-right references for fastkl (SPEC §2-§4).

Nothing here is fast or clever on purpose: every measure is the textbook sum
over the row, evaluated with mpmath at 50 significant digits over the DECODED
distribution (SPEC §3). ``mpmath.mpf(x)`` of a float is exact, so the result is
the exact value of the measure on the same input values, up to 1e-50
relative, which is what SPEC §2's error bound is stated against.

Sections:

- options and decoding (``Opts``, ``decode_row``);
- the exact references, one function per measure, in ``REFERENCES``
  (name -> ``fn(p_row, q_row, **opts) -> Ref``); ``reference_rows`` evaluates
  several measures over many rows with one decode per row;
- a scipy/numpy reference (``SCIPY_REFERENCES``) for cross-checks and for
  rows too long for mpmath (K = 100,000); it works on float64 decoded
  probabilities and is NOT exact;
- a naive bad-row oracle (``row_statuses``) following SPEC §4;
- seed-driven input builders and Arrow helpers shared by tests (and
  benchmarks);
- ``check_against_reference``: the comparison with the SPEC §2 error bound.

The module deliberately does not import fastkl: it is an independent oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import numpy as np

# --------------------------------------------------------------------------
# Names (kept independent of fastkl._registry on purpose; a test checks that
# both agree).

MEASURES = ("kl", "reverse_kl", "jeffreys", "js", "entropy", "cross_entropy", "tv", "hellinger", "gjs", "renyi",
            "bhattacharyya")
LOG_MEASURES = frozenset({"kl", "reverse_kl", "jeffreys", "js", "entropy", "cross_entropy", "gjs", "renyi",
                          "bhattacharyya"})
KINDS = ("probs", "logprobs", "logits")
REASONS = (
    "length_mismatch",
    "empty",
    "null_element",
    "nan",
    "non_finite",
    "negative",
    "not_normalized",
    "ids_length_mismatch",
    "id_not_integer",
    "id_out_of_range",
    "duplicate_id",
    "mask_length_mismatch",
)
ELEMENT_REASONS = ("null_element", "nan", "non_finite", "negative")

EPS64 = float(np.finfo(np.float64).eps)  # 2.22e-16

# renyi has no default order: the suite checks it at this one unless a test sets another.
TEST_ALPHA = 0.7


def params(measures: Iterable[str]) -> dict:
    """The parameters fastkl needs for these measures: alpha when renyi is among them."""
    return {"alpha": TEST_ALPHA} if "renyi" in tuple(measures) else {}

# SPEC §2: |got - exact| <= REL * sum_i |t_i|, by input dtype. float16 inputs
# are cast exactly to float32 and get the float32 bound.
REL_BOUND = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-6, np.dtype(np.float16): 1e-6}


def rel_bound(*dtypes) -> float:
    """The SPEC §2 relative bound for a call whose sides have these dtypes
    (the loosest one wins: a float32 side limits the accuracy of the row)."""
    return max(REL_BOUND[np.dtype(d)] for d in dtypes)


# Slack for rounding inside the decode (documented exception to the strict
# SPEC §2 bound). When the decode itself rounds -- logits (log_softmax),
# normalize=True, smoothing > 0, temperature != 1 -- the decoded natural
# log-probabilities a_i, b_i are float64 numbers rounded at least once, so they
# already differ from the exact decode by a few ulps of |a_i| (plus the ulps
# of the normalising constant c subtracted from them, and ~1 ulp of the
# probability itself). No kernel can do better than the exact measure of the
# rounded decode, so on top of REL * sum|t_i| we allow
#     DECODE_SLACK_ULPS * eps64 * sum_i (p_i + q_i) * (2 + |a_i| + |b_i| + |c_p| + |c_q|)
# (infinite log-probabilities of zero probabilities count as 0). The same
# slack applies when one side is `probs` and the other `logprobs`: comparing
# them needs log p_i (or exp b_i), rounded once, and when b_i ~ log p_i the
# term q_i (b_i - log p_i) is smaller than that rounding. For plain `probs` vs
# `probs` and `logprobs` vs `logprobs` inputs (no normalize, no smoothing)
# nothing is rounded before the measure and the strict bound applies.
DECODE_SLACK_ULPS = 8


# --------------------------------------------------------------------------
# mpmath context (a private one: the global mpmath.mp precision is untouched)


def _ctx():
    global _MP
    if _MP is None:
        from mpmath.ctx_mp import MPContext

        ctx = MPContext()
        ctx.dps = 50
        _MP = ctx
    return _MP


_MP = None


# --------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class Opts:
    """The decoding options of SPEC §3-§4, resolved per side (naive mirror)."""

    p_kind: str = "probs"
    q_kind: str = "probs"
    p_temperature: float = 1.0
    q_temperature: float = 1.0
    base: float = math.e
    normalize: bool = False
    smoothing: float = 0.0
    sum_tol: float = 1e-3
    beta: float = 0.5  # gjs
    alpha: float = 0.7  # renyi: TEST_ALPHA unless a test sets another

    @classmethod
    def from_kwargs(
        cls,
        kind: str = "probs",
        p_kind: str | None = None,
        q_kind: str | None = None,
        temperature: float = 1.0,
        p_temperature: float | None = None,
        q_temperature: float | None = None,
        base: float = math.e,
        normalize: bool = False,
        smoothing: float = 0.0,
        sum_tol: float = 1e-3,
        on_invalid: str | None = None,  # accepted and ignored: not a decoding option
        beta: float | None = None,
        alpha: float | None = None,
    ) -> "Opts":
        return cls(
            p_kind=p_kind or kind,
            q_kind=q_kind or kind,
            p_temperature=float(temperature if p_temperature is None else p_temperature),
            q_temperature=float(temperature if q_temperature is None else q_temperature),
            base=float(base),
            normalize=bool(normalize),
            smoothing=float(smoothing),
            sum_tol=float(sum_tol),
            beta=0.5 if beta is None else float(beta),
            alpha=TEST_ALPHA if alpha is None else float(alpha),
        )

    def side(self, side: str) -> tuple[str, float]:
        return (self.p_kind, self.p_temperature) if side == "p" else (self.q_kind, self.q_temperature)


def _opts(opts: Opts | None, kwargs: dict) -> Opts:
    if opts is not None:
        if kwargs:
            raise TypeError("pass either opts= or keyword options, not both")
        return opts
    return Opts.from_kwargs(**kwargs)


# --------------------------------------------------------------------------
# Exact decode (SPEC §3)


@dataclass
class Side:
    """One decoded side of a row, exactly (mpmath)."""

    probs: list  # p_i >= 0
    logs: list  # natural log p_i, -inf where p_i == 0
    shift: Any  # |normalising constant| subtracted in log space (for the slack)
    rounds: bool  # True if a float implementation must round during the decode
    kind: str = "probs"


def decode_row(
    x: Sequence[float],
    kind: str = "probs",
    temperature: float = 1.0,
    normalize: bool = False,
    smoothing: float = 0.0,
) -> Side:
    """Exact decode of one valid row: probs / logprobs / logits -> (p_i, log p_i)."""
    c = _ctx()
    vals = [c.mpf(float(v)) for v in x]
    k = len(vals)
    shift = c.mpf(0)
    rounds = False
    if kind == "probs":
        probs = vals
        if normalize:
            s = c.fsum(probs)
            probs = [v / s for v in probs]
            shift = abs(c.log(s))
            rounds = True
        logs = [c.log(v) if v > 0 else c.ninf for v in probs]
    elif kind == "logprobs":
        logs = vals
        if normalize:
            logs, lse = _log_softmax(logs, 1)
            shift = abs(lse)
            rounds = True
        probs = [c.exp(a) if a != c.ninf else c.mpf(0) for a in logs]
    elif kind == "logits":
        logs, lse = _log_softmax(vals, float(temperature))
        probs = [c.exp(a) if a != c.ninf else c.mpf(0) for a in logs]
        shift = abs(lse)
        rounds = True
    else:
        raise ValueError(f"unknown kind {kind!r}")
    if smoothing:
        eps = c.mpf(float(smoothing))
        den = 1 + k * eps
        probs = [(v + eps) / den for v in probs]
        logs = [c.log(v) for v in probs]
        rounds = True
    return Side(probs=probs, logs=logs, shift=shift, rounds=rounds, kind=kind)


def _log_softmax(vals, temperature):
    """log_softmax(x / T) in mpmath, shifting by the max first: (x_i - m) / T is
    exact enough at 50 digits even when |x| / T is astronomically large, where
    x_i / T - logsumexp(x / T) would cancel catastrophically.
    Returns (log-probabilities, the log-sum-exp of x / T)."""
    c = _ctx()
    t = c.mpf(temperature)
    m = max(v for v in vals if v != c.ninf)
    d = [(v - m) / t if v != c.ninf else c.ninf for v in vals]
    lse0 = c.log(c.fsum(c.exp(v) for v in d if v != c.ninf))  # in [0, log K]
    logs = [v - lse0 if v != c.ninf else c.ninf for v in d]
    return logs, m / t + lse0


def _decode_side(row, side: str, opts: Opts) -> Side:
    kind, temp = opts.side(side)
    return decode_row(row, kind, temp, opts.normalize, opts.smoothing)


# --------------------------------------------------------------------------
# Exact measures


@dataclass(frozen=True)
class Ref:
    """Exact value of one measure on one row, with what the error bound needs.

    value:   the exact value, clamped into the SPEC §2 range, in units of `base`
             (for hellinger: the distance itself);
    terms:   sum_i |t_i| in units of `base` (for hellinger: of the SQUARED
             distance, which is what gets compared);
    slack:   extra absolute allowance for rounding inside the decode;
    squared: compare got**2 with value**2 (hellinger);
    raw:     the exact value before clamping into range (rows whose sums are
             off by up to sum_tol can leave the range: e.g. KL < 0).
    """

    value: Any
    terms: Any
    slack: Any
    squared: bool = False
    raw: Any = None

    def __float__(self) -> float:
        return float(self.value)

    def error(self, got: float) -> tuple[float, float]:
        """(|got - exact|, allowed) for a relative bound of 1; see check()."""
        c = _ctx()
        g = c.mpf(float(got))
        if self.squared:
            return float(abs(g * g - self.value * self.value)), float(self.terms)
        return float(abs(g - self.value)), float(self.terms)

    def check(self, got: float, rel: float) -> tuple[bool, str]:
        """Is `got` within REL * sum|t_i| + slack of the exact value?"""
        got = float(got)
        exact = self.value
        c = _ctx()
        if c.isinf(exact):
            return (got == math.inf), f"got {got!r}, exact +inf"
        if not math.isfinite(got):
            return False, f"got {got!r}, exact {float(exact)!r}"
        g = c.mpf(got)
        # The result is a float64: rounding the exact value to it costs up to
        # half an ulp, which matters only where the bound itself is below the
        # float64 resolution (subnormal results, exact zeros).
        ulp = c.mpf(math.ulp(float(exact)))
        if self.squared:  # the compared quantity is the square, itself a float64
            err = abs(g * g - exact * exact)
            ulp = 2 * exact * ulp + ulp * ulp + c.mpf(math.ulp(float(exact * exact)))
        else:
            err = abs(g - exact)
        allowed = rel * self.terms + self.slack + ulp
        ok = err <= allowed
        return ok, (
            f"got {got!r}, exact {c.nstr(exact, 20)}, |err| {float(err):.3g} > allowed {float(allowed):.3g}"
            f" (= {rel:g} * sum|t| {float(self.terms):.3g} + slack {float(self.slack):.3g})"
        )


def _term_lists(name: str, P: Side, Q: Side | None) -> list:
    c = _ctx()
    inf = c.inf
    p, a = P.probs, P.logs
    if name == "entropy":
        return [(-pi * ai) if pi > 0 else 0 for pi, ai in zip(p, a)]
    q, b = Q.probs, Q.logs

    def kl_terms(p, a, q, b):
        return [0 if pi == 0 else (inf if qi == 0 else pi * (ai - bi)) for pi, ai, qi, bi in zip(p, a, q, b)]

    if name == "kl":
        return kl_terms(p, a, q, b)
    if name == "reverse_kl":
        return kl_terms(q, b, p, a)
    if name == "jeffreys":
        return kl_terms(p, a, q, b) + kl_terms(q, b, p, a)
    if name == "js":
        # log(p/m) = -log((1 + q/p)/2) = -log1p(expm1(b - a)/2): exactly 0 when
        # p == q (computing log(m) separately would leave a 1e-50 residue).
        out = []
        for pi, ai, qi, bi in zip(p, a, q, b):
            out.append(0 if pi == 0 else -pi * c.log1p(c.expm1(bi - ai) / 2) / 2)
            out.append(0 if qi == 0 else -qi * c.log1p(c.expm1(ai - bi) / 2) / 2)
        return out
    if name == "cross_entropy":
        return [0 if pi == 0 else (inf if qi == 0 else -pi * bi) for pi, qi, bi in zip(p, q, b)]
    if name == "tv":
        return [abs(pi - qi) / 2 for pi, qi in zip(p, q)]
    if name == "hellinger":  # terms of the SQUARED distance
        return [(c.sqrt(pi) - c.sqrt(qi)) ** 2 / 2 for pi, qi in zip(p, q)]
    raise KeyError(name)


def _gjs_terms(P: Side, Q: Side, beta: float) -> list:
    """beta p log(p/m) and (1-beta) q log(q/m), m = beta p + (1-beta) q; all 0 at beta = 0, 1."""
    c = _ctx()
    w = c.mpf(beta)
    if not 0 < w < 1:
        return [c.mpf(0)]
    out = []
    def log_over_m(x, a, y, b, u):  # log(x / m), m = u x + (1-u) y: 0 exactly when x = y
        return -c.log(u) if y == 0 else -c.log1p((1 - u) * c.expm1(b - a))

    for pi, ai, qi, bi in zip(P.probs, P.logs, Q.probs, Q.logs):
        out.append(w * pi * log_over_m(pi, ai, qi, bi, w) if pi > 0 else 0)
        out.append((1 - w) * qi * log_over_m(qi, bi, pi, ai, 1 - w) if qi > 0 else 0)
    return out


def _renyi(P: Side, Q: Side, alpha: float, base: float) -> "Ref":
    """Renyi's divergence of order alpha for rows that may sum to 1 only within sum_tol
    (Renyi 1961, incomplete distributions): log(sum p^a q^(1-a) / sum p) / (a - 1).
    The bound's terms: |p (e^((a-1) log(p/q)) - 1)| / (|a - 1| sum p), over the sum's ratio S / sum p
    (the log's condition number)."""
    c = _ctx()
    a = c.mpf(alpha)
    scale = 1 / c.log(c.mpf(base))
    p_sum = c.fsum(P.probs)
    both = [(pi, ai, bi) for pi, ai, qi, bi in zip(P.probs, P.logs, Q.probs, Q.logs) if pi > 0 and qi > 0]
    p_alone = [pi for pi, qi in zip(P.probs, Q.probs) if pi > 0 and qi == 0]
    if a > 1 and p_alone:
        return Ref(c.inf, c.inf, c.mpf(0), raw=c.inf)
    s = c.fsum(c.exp(a * ai + (1 - a) * bi) for _, ai, bi in both) / p_sum
    if s == 0:
        return Ref(c.inf, c.inf, c.mpf(0), raw=c.inf)
    # S / sum p - 1 term by term (expm1), so that S ~ sum p does not cancel at 50 digits
    excess = c.fsum([pi * c.expm1((a - 1) * (ai - bi)) for pi, ai, bi in both] + [-x for x in p_alone]) / p_sum
    raw = (c.log1p(excess) if abs(excess) < 0.5 else c.log(s)) / (a - 1)
    terms = c.fsum([abs(pi * c.expm1((a - 1) * (ai - bi))) for pi, ai, bi in both] + p_alone)
    terms = terms / (abs(a - 1) * p_sum) / s
    return Ref(max(raw, 0) * scale, terms * scale, _slack(P, Q) * scale / s, raw=raw * scale)


def _bhattacharyya(P: Side, Q: Side, base: float) -> "Ref":
    """-log BC of the normalised rows, BC = sum sqrt(p q) / sqrt(sum p sum q): -log sum sqrt(p q)
    for rows that sum to 1, and -log(1 - h^2) there (h the Hellinger distance). The bound's
    terms: hellinger's over BC (the log's condition number)."""
    c = _ctx()
    scale = 1 / c.log(c.mpf(base))
    t = _term_lists("hellinger", P, Q)
    with c.workdps(200):  # sums of 1 and 1e-42 lose a tiny -log BC at 50 digits
        bc = c.fsum(c.sqrt(pi * qi) for pi, qi in zip(P.probs, Q.probs)) / c.sqrt(c.fsum(P.probs) * c.fsum(Q.probs))
        raw = -c.log(bc) if bc > 0 else c.inf
    if bc == 0:
        return Ref(c.inf, c.inf, c.mpf(0), raw=c.inf)
    raw = +raw  # back to the working precision
    # plus K |sqrt sum p - sqrt sum q|: rows not exactly normalised carry (sqrt sum p -
    # sqrt sum q)^2 / 2 in hellinger's sum, which the kernel takes out with rounded float64 sums
    gap = abs(c.sqrt(c.fsum(P.probs)) - c.sqrt(c.fsum(Q.probs)))
    terms = (c.fsum(t) + len(P.probs) * gap) / bc
    return Ref(max(raw, 0) * scale, terms * scale, _slack(P, Q) * scale / bc, raw=raw * scale)


def _range(name: str, k: int, base: float, beta: float = 0.5):
    c = _ctx()
    scale = 1 / c.log(c.mpf(base))
    if name == "gjs":
        w = c.mpf(beta)
        return c.mpf(0), (-w * c.log(w) - (1 - w) * c.log(1 - w)) * scale if 0 < w < 1 else c.mpf(0)
    if name == "js":
        return c.mpf(0), c.log(2) * scale
    if name == "entropy":
        return c.mpf(0), c.log(k) * scale
    if name in ("tv", "hellinger"):
        return c.mpf(0), c.mpf(1)
    return c.mpf(0), c.inf


def _slack(P: Side, Q: Side | None):
    """DECODE_SLACK_ULPS * eps64 * sum_i (p_i+q_i)(2+|a_i|+|b_i|+|c_p|+|c_q|); 0 if nothing rounds."""
    c = _ctx()
    if not (P.rounds or (Q is not None and (Q.rounds or Q.kind != P.kind))):
        return c.mpf(0)

    def fin(v):
        return abs(v) if c.isfinite(v) else 0

    total = c.mpf(0)
    if Q is None:
        for pi, ai in zip(P.probs, P.logs):
            total += pi * (2 + fin(ai) + P.shift)
    else:
        for pi, ai, qi, bi in zip(P.probs, P.logs, Q.probs, Q.logs):
            total += (pi + qi) * (2 + fin(ai) + fin(bi) + P.shift + Q.shift)
    return DECODE_SLACK_ULPS * c.mpf(EPS64) * total


def measure_from_decoded(name: str, P: Side, Q: Side | None, base: float = math.e, opts: "Opts | None" = None) -> Ref:
    """Exact measure `name` of a decoded row (clamped into range, in base units);
    `opts` gives gjs's beta and renyi's alpha."""
    c = _ctx()
    o = opts or Opts()
    if name == "renyi":
        return _renyi(P, Q, o.alpha, base)
    if name == "bhattacharyya":
        return _bhattacharyya(P, Q, base)
    terms = _gjs_terms(P, Q, o.beta) if name == "gjs" else _term_lists(name, P, Q)
    if any(c.isinf(t) for t in terms):
        value = abs_sum = c.inf
    else:
        value = c.fsum(terms)
        abs_sum = c.fsum(abs(t) for t in terms)
    slack = _slack(P, Q)
    if name in LOG_MEASURES:
        scale = 1 / c.log(c.mpf(base))
        value, abs_sum, slack = value * scale, abs_sum * scale, slack * scale
    lo, hi = _range(name, len(P.probs), base, o.beta)
    raw = value
    if name == "hellinger":
        raw = c.sqrt(value)
        value = c.sqrt(min(max(value, 0), 1))  # clamp the square, then the distance
        return Ref(value, abs_sum, slack, squared=True, raw=raw)
    value = min(max(value, lo), hi)
    return Ref(value, abs_sum, slack, raw=raw)


def reference(name: str, p_row, q_row=None, *, opts: Opts | None = None, **kwargs) -> Ref:
    """Exact value of measure `name` on one valid row (p_row, q_row)."""
    o = _opts(opts, kwargs)
    P = _decode_side(p_row, "p", o)
    Q = None if name == "entropy" else _decode_side(q_row, "q", o)
    return measure_from_decoded(name, P, Q, o.base, o)


# One registry, name -> reference function(p_row, q_row, **opts) -> Ref.
REFERENCES: dict[str, Callable[..., Ref]] = {name: partial(reference, name) for name in MEASURES}


def reference_rows(
    p_rows: Iterable,
    q_rows: Iterable | None,
    measures: Sequence[str] = MEASURES,
    *,
    opts: Opts | None = None,
    **kwargs,
) -> dict[str, list[Ref | None]]:
    """Exact references for many rows; None where the row is null or invalid
    (according to `row_statuses`). One decode per row for all measures."""
    o = _opts(opts, kwargs)
    p_rows = list(p_rows)
    q_rows = [None] * len(p_rows) if q_rows is None else list(q_rows)
    one_sided = all(m == "entropy" for m in measures)
    out: dict[str, list] = {m: [] for m in measures}
    for pr, qr in zip(p_rows, q_rows):
        st = row_status(pr, None if one_sided else qr, opts=o, one_sided=one_sided)
        if st != frozenset({"ok"}):
            for m in measures:
                out[m].append(None)
            continue
        P = _decode_side(pr, "p", o)
        Q = None if one_sided else _decode_side(qr, "q", o)
        for m in measures:
            out[m].append(measure_from_decoded(m, P, Q if m != "entropy" else None, o.base, o))
    return out


# --------------------------------------------------------------------------
# scipy / numpy reference (float64, not exact; for cross-checks and large K)


def decode_numpy(x, kind="probs", temperature=1.0, normalize=False, smoothing=0.0):
    """Decode a 2-D array of rows in float64 with numpy/scipy -> (probs, logprobs)."""
    from scipy import special

    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "probs":
            p = x / x.sum(axis=1, keepdims=True) if normalize else x
            logp = np.log(p)
        elif kind == "logprobs":
            logp = x - special.logsumexp(x, axis=1, keepdims=True) if normalize else x
            p = np.exp(logp)
        elif kind == "logits":
            logp = special.log_softmax(x / temperature, axis=1)
            p = np.exp(logp)
        else:
            raise ValueError(kind)
        if smoothing:
            p = (p + smoothing) / (1 + x.shape[1] * smoothing)
            logp = np.log(p)
    return p, logp


def _fsum_rows(t):
    return np.array([math.fsum(r) for r in t], dtype=np.float64)


def _scipy_measure(name, P, Q=None, beta=None, alpha=None):
    """(values, sum|t_i|) per row from float64 probabilities, natural log, fsum."""
    from scipy import special

    if name == "kl":
        t = special.rel_entr(P, Q)
    elif name == "reverse_kl":
        t = special.rel_entr(Q, P)
    elif name == "jeffreys":
        t = np.concatenate([special.rel_entr(P, Q), special.rel_entr(Q, P)], axis=1)
    elif name == "js":
        M = (P + Q) / 2
        t = np.concatenate([special.rel_entr(P, M) / 2, special.rel_entr(Q, M) / 2], axis=1)
    elif name == "entropy":
        t = special.entr(P)
    elif name == "cross_entropy":
        t = -special.xlogy(P, Q)
    elif name == "tv":
        t = np.abs(P - Q) / 2
    elif name in ("hellinger", "bhattacharyya"):
        t = (np.sqrt(P) - np.sqrt(Q)) ** 2 / 2
    elif name == "gjs":
        w = 0.5 if beta is None else beta
        M = w * P + (1 - w) * Q
        t = np.concatenate([w * special.rel_entr(P, M), (1 - w) * special.rel_entr(Q, M)], axis=1)
    elif name == "renyi":
        a = TEST_ALPHA if alpha is None else alpha
        with np.errstate(divide="ignore", invalid="ignore"):
            both = (P > 0) & (Q > 0)
            x = np.where(both, (a - 1) * (np.log(np.where(both, P, 1)) - np.log(np.where(both, Q, 1))), 0.0)
            t = np.where(both, P * np.expm1(x), np.where(P > 0, -P, 0.0)) / ((a - 1) * P.sum(axis=1, keepdims=True))
        vals = np.log1p(np.maximum((a - 1) * _fsum_rows(t), -1.0)) / (a - 1)
        vals = np.where(((P > 0) & (Q == 0)).any(axis=1) & (a > 1), np.inf, np.maximum(vals, 0))
        return vals, _fsum_rows(np.abs(t)) / np.exp((a - 1) * vals)
    else:
        raise KeyError(name)
    vals = _fsum_rows(t)
    terms = _fsum_rows(np.abs(t))
    if name == "hellinger":
        vals = np.sqrt(np.clip(vals, 0, 1))
    if name == "bhattacharyya":
        bc = _fsum_rows(np.sqrt(P * Q)) / np.sqrt(P.sum(axis=1) * Q.sum(axis=1))
        with np.errstate(divide="ignore"):
            vals, terms = np.maximum(-np.log(bc), 0), terms / bc
    return vals, terms


SCIPY_REFERENCES: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    name: partial(_scipy_measure, name) for name in MEASURES
}


def scipy_reference(name, p, q=None, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(values, sum|t_i|) of measure `name` for 2-D inputs, decoded per the options."""
    o = Opts.from_kwargs(**kwargs)
    P, _ = decode_numpy(p, o.p_kind, o.p_temperature, o.normalize, o.smoothing)
    Q = None
    if name != "entropy":
        Q, _ = decode_numpy(q, o.q_kind, o.q_temperature, o.normalize, o.smoothing)
    vals, terms = SCIPY_REFERENCES[name](P, Q, beta=o.beta, alpha=o.alpha)
    if name in LOG_MEASURES:
        vals, terms = vals / math.log(o.base), terms / math.log(o.base)
    return vals, terms


# --------------------------------------------------------------------------
# Bad-row oracle (SPEC §4)


def _is_null(v) -> bool:
    return v is None


def _side_reasons(row, kind: str, o: Opts) -> set[str]:
    """Reasons present on one non-null, non-empty side."""
    reasons: set[str] = set()
    vals = []
    for v in row:
        if _is_null(v):
            reasons.add("null_element")
            continue
        v = float(v)
        vals.append(v)
        if math.isnan(v):
            reasons.add("nan")
        elif kind == "probs":
            if math.isinf(v):
                reasons.add("non_finite")
            elif v < 0:
                reasons.add("negative")
        elif kind == "logprobs":
            if v == math.inf:
                reasons.add("non_finite")
            elif v > o.sum_tol:
                reasons.add("negative")
        elif kind == "logits":
            if v == math.inf:
                reasons.add("non_finite")
    if kind == "logits" and not any(math.isfinite(v) for v in vals):
        reasons.add("non_finite")
    if reasons or kind == "logits":
        return reasons  # the sum is meaningless once an element is bad
    c = _ctx()  # exact sums (no overflow, no rounding)
    if kind == "probs":
        s = c.fsum(c.mpf(v) for v in vals)
    else:
        s = c.fsum(c.exp(c.mpf(v)) for v in vals)
    bad = (not s > 0) if o.normalize else abs(s - 1) > o.sum_tol
    if bad:
        reasons.add("not_normalized")
        if kind == "logprobs" and o.normalize:
            # all -inf: nothing to renormalise; SPEC leaves the label open
            reasons.add("non_finite")
    return reasons


def row_status(p_row, q_row=None, *, opts: Opts | None = None, one_sided: bool = False, **kwargs) -> frozenset:
    """The set of statuses SPEC §4 allows for this row.

    A single element set for rows with one problem (or none: {"ok"}), or a null
    list ({"null"}). Rows with several problems: the set of the reasons
    present (the exact choice between them is precedence detail).
    """
    o = _opts(opts, kwargs)
    if p_row is None or (not one_sided and q_row is None):
        return frozenset({"null"})
    p_row = list(p_row)
    q_row = None if one_sided else list(q_row)
    reasons: set[str] = set()
    if not one_sided and len(p_row) != len(q_row):
        reasons.add("length_mismatch")
        if len(p_row) == 0 or len(q_row) == 0:
            return frozenset({"length_mismatch", "empty"})
    elif len(p_row) == 0:
        return frozenset({"empty"})
    reasons |= _side_reasons(p_row, o.p_kind, o)
    if not one_sided:
        reasons |= _side_reasons(q_row, o.q_kind, o)
    return frozenset(reasons or {"ok"})


def row_statuses(p_rows, q_rows=None, *, one_sided: bool = False, **kwargs) -> list[frozenset]:
    o = Opts.from_kwargs(**kwargs)
    p_rows = list(p_rows)
    q_rows = [None] * len(p_rows) if q_rows is None else list(q_rows)
    return [row_status(p, q, opts=o, one_sided=one_sided) for p, q in zip(p_rows, q_rows)]


# --------------------------------------------------------------------------
# Input builders (numpy, seed driven)


def make_probs(rng, n, k, dtype=np.float64, *, zero_frac=0.0, spread=1.0, scale=False):
    """n x k probability rows, sum 1 up to the dtype's rounding.

    zero_frac: fraction of exact zeros (each row keeps >= 1 positive entry);
    spread: log-normal width of the weights (large -> tiny probabilities);
    scale: multiply each row by a random factor in [1e-3, 1e3] (for normalize=True).
    """
    w = np.exp(spread * rng.standard_normal((n, k)))
    if zero_frac > 0:
        w[rng.random((n, k)) < zero_frac] = 0.0
    for i in range(n):
        if not (w[i] > 0).any():
            w[i, rng.integers(k)] = 1.0
    p = w / w.sum(axis=1, keepdims=True)
    if scale:
        p = p * 10.0 ** rng.uniform(-3, 3, size=(n, 1))
    out = p.astype(dtype)
    for i in range(n):  # a float32 rounding to 0 of every entry is vanishingly rare; keep rows valid
        if not (out[i] > 0).any():
            out[i] = 0
            out[i, 0] = 1
    return out


def make_logprobs(rng, n, k, dtype=np.float64, *, zero_frac=0.0, spread=1.0, scale=False):
    """n x k natural-log probabilities (-inf for zero probability)."""
    p = make_probs(rng, n, k, np.float64, zero_frac=zero_frac, spread=spread)
    with np.errstate(divide="ignore"):
        lp = np.log(p)
    if scale:  # off by a factor in (e^-5, 1]: still <= 0, needs normalize=True
        lp = lp - rng.uniform(0, 5, size=(n, 1))
    return lp.astype(dtype)


def make_logits(rng, n, k, dtype=np.float64, *, zero_frac=0.0, spread=1.0, scale=False):
    """n x k logits, about N(0, 3*spread), zero_frac of them masked with -inf (>= 1 finite)."""
    x = 3.0 * spread * rng.standard_normal((n, k)) + rng.uniform(-10, 10, size=(n, 1))
    if zero_frac > 0:
        mask = rng.random((n, k)) < zero_frac
        for i in range(n):
            if mask[i].all():
                mask[i, rng.integers(k)] = False
        x[mask] = -np.inf
    return x.astype(dtype)


BUILDERS = {"probs": make_probs, "logprobs": make_logprobs, "logits": make_logits}


def make_rows(rng, kind, n, k, dtype=np.float64, **kw):
    return BUILDERS[kind](rng, n, k, dtype, **kw)


# --------------------------------------------------------------------------
# Arrow helpers


def list_array(rows, value_type="float64", list_type="list", *, pad=0):
    """A pyarrow list / large_list / fixed_size_list array from rows (None = null list,
    None element = null element). `pad` > 0 puts junk rows before and after and
    returns a slice, so that offsets and the slice offset are both non-trivial."""
    import pyarrow as pa

    vt = pa.type_for_alias(value_type) if isinstance(value_type, str) else value_type
    rows = [None if r is None else [None if v is None else float(v) for v in r] for r in rows]
    if list_type == "fixed_size_list":
        ks = {len(r) for r in rows if r is not None}
        if len(ks) > 1:
            raise ValueError("fixed_size_list needs rows of one length")
        k = ks.pop() if ks else 1
        junk = [[-7.0] * k for _ in range(pad)]
        typ = pa.list_(vt, k)
    else:
        junk = [[-7.0, 99.0, float("nan")][: 1 + j % 3] for j in range(pad)]
        typ = pa.large_list(vt) if list_type == "large_list" else pa.list_(vt)
    allrows = junk + rows + junk
    arr = pa.array(allrows, type=typ)
    if pad:
        arr = arr.slice(pad, len(rows))
    return arr


def chunked(arr, boundaries: Sequence[int]):
    """Split an Arrow array into a ChunkedArray at the given row boundaries."""
    import pyarrow as pa

    cuts = [0] + sorted(b for b in boundaries if 0 < b < len(arr)) + [len(arr)]
    return pa.chunked_array([arr.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])], type=arr.type)


# --------------------------------------------------------------------------
# Comparison


def column_values(table_or_array, name: str | None = None) -> list:
    """A result column (Table column name, or numpy array) as a list with None for null/NaN."""
    if name is not None:
        return table_or_array.column(name).to_pylist()
    return [None if math.isnan(v) else float(v) for v in np.asarray(table_or_array, dtype=np.float64)]


def check_against_reference(got: Sequence, refs: Sequence[Ref | None], rel: float, *, what: str = "") -> list[str]:
    """Compare values (None/NaN where null) with references; return the failures."""
    failures = []
    if len(got) != len(refs):
        return [f"{what}: {len(got)} values for {len(refs)} rows"]
    for i, (g, r) in enumerate(zip(got, refs)):
        if g is not None and isinstance(g, float) and math.isnan(g):
            g = None
        if r is None:
            if g is not None:
                failures.append(f"{what} row {i}: expected null, got {g!r}")
            continue
        if g is None:
            failures.append(f"{what} row {i}: got null, exact {float(r.value)!r}")
            continue
        ok, msg = r.check(g, rel)
        if not ok:
            failures.append(f"{what} row {i}: {msg}")
    return failures


# --------------------------------------------------------------------------
# Sequence rows (SPEC §10): one distribution per position, a mask or a length


ABSENT = object()  # "no mask given" (None is a null mask list)


@dataclass
class SequenceRef:
    """What one sequence row must give: its allowed statuses, the first bad
    position (when invalid), and the exact per-position references."""

    status: frozenset
    position: int | None
    refs: dict[str, list]  # measure -> per position Ref, None where not counted

    @property
    def tokens(self) -> int:
        first = next(iter(self.refs.values()), [])
        return sum(r is not None for r in first)

    def total(self, name: str, rel: float) -> Ref:
        """The exact sum over counted positions, with an allowance that adds up each
        position's (for hellinger |d - d'| <= sqrt(|d^2 - d'^2|)) and the float64 sum's rounding."""
        c = _ctx()
        refs = [r for r in self.refs[name] if r is not None]
        value = c.fsum(r.value for r in refs)
        if any(c.isinf(r.value) for r in refs):
            return Ref(c.inf, c.inf, c.mpf(0))
        allow = c.fsum((c.sqrt(rel * r.terms) if r.squared else rel * r.terms) + r.slack for r in refs)
        rounding = len(refs) * c.mpf(EPS64) * c.fsum(abs(r.value) for r in refs)
        return Ref(value, c.mpf(0), allow + rounding + c.mpf(4 * EPS64) * abs(value))


def sequence_reference(measures, p_seq, q_seq=None, *, mask=ABSENT, length=ABSENT, one_sided=False,
                       **kwargs) -> SequenceRef:
    """The reference of one sequence row (None = a null list; a None position = a null position)."""
    o = Opts.from_kwargs(**kwargs)
    none = SequenceRef(frozenset({"null"}), None, {m: [] for m in measures})
    if p_seq is None or (not one_sided and q_seq is None) or mask is None or length is None:
        return none
    T = len(p_seq)
    reasons = set()
    if not one_sided and len(q_seq) != T:
        reasons.add("length_mismatch")
    if mask is not ABSENT and len(mask) != T:
        reasons.add("mask_length_mismatch")
    if length is not ABSENT and not 0 <= length <= T:
        reasons.add("mask_length_mismatch")
    if reasons:  # one of them (the precedence is a detail)
        return SequenceRef(frozenset(reasons), None, {m: [] for m in measures})
    refs = {m: [] for m in measures}
    for j in range(T):
        counted = (mask[j] is None or mask[j] != 0) if mask is not ABSENT else (
            j < length if length is not ABSENT else True)
        if not counted:
            for m in measures:
                refs[m].append(None)
            continue
        pr, qr = p_seq[j], None if one_sided else q_seq[j]
        if (mask is not ABSENT and mask[j] is None) or pr is None or (not one_sided and qr is None):
            return SequenceRef(frozenset({"null_element"}), j, refs)
        st = row_status(pr, qr, opts=o, one_sided=one_sided)
        if st != frozenset({"ok"}):
            return SequenceRef(st, j, refs)
        P = _decode_side(pr, "p", o)
        Q = None if one_sided else _decode_side(qr, "q", o)
        for m in measures:
            refs[m].append(measure_from_decoded(m, P, Q if m != "entropy" else None, o.base, o))
    status = frozenset({"ok"}) if any(r is not None for r in next(iter(refs.values()))) else frozenset({"no_tokens"})
    return SequenceRef(status, None, refs)


def nested_array(seqs, value_type="float64", outer="list", inner="list", *, pad=0):
    """A list<list<value>> array (each level list / large_list / fixed_size_list) from
    sequences (None = null sequence, None position = null position, None value = null element);
    `pad` > 0 puts junk sequences around and returns a slice."""
    import pyarrow as pa

    vt = pa.type_for_alias(value_type) if isinstance(value_type, str) else value_type

    def level(kind, child, sizes):
        if kind == "fixed_size_list":
            (k,) = sizes or {1}
            return pa.list_(child, k)
        return pa.large_list(child) if kind == "large_list" else pa.list_(child)

    real = [s for s in seqs if s is not None]
    ks = {len(r) for s in real for r in s if r is not None}
    ts = {len(s) for s in real}
    if inner == "fixed_size_list" and len(ks) > 1 or outer == "fixed_size_list" and len(ts) > 1:
        raise ValueError("fixed_size_list needs one length")
    k = next(iter(ks), 1)
    t = next(iter(ts), 1)
    typ = level(outer, level(inner, vt, {k}), {t})
    junk = [[[0.25] * k] * t for _ in range(pad)]
    arr = pa.array(junk + list(seqs) + junk, type=typ)
    return arr.slice(pad, len(seqs)) if pad else arr


# --------------------------------------------------------------------------
# RLHF estimators from sampled-token log-probs (SPEC §11): p the policy's,
# q the reference's log-prob of each sampled token, r = q - p.

SAMPLED_MEASURES = ("k1", "k2", "k3", "abs")


def sampled_reference(name: str, p: float, q: float):
    """Exact value (mpmath, 50 digits) of one estimator at one position; None if the
    position is bad (NaN, +inf, a policy log-prob of -inf, a log-prob > 1e-3)."""
    c = _ctx()
    if any(math.isnan(x) or x == math.inf or x > 1e-3 for x in (p, q)) or p == -math.inf:
        return None
    if q == -math.inf:
        return c.inf
    r = c.mpf(q) - c.mpf(p)
    if name == "k1":
        return -r
    if name == "k2":
        return r * r / 2
    if name == "k3":
        if abs(r) < 1:  # the series: exp(r) - 1 - r at 50 digits would cancel to 0 for tiny r
            return c.fsum(r ** n / c.factorial(n) for n in range(2, 60))
        return c.exp(r) - 1 - r
    if name == "abs":
        return abs(r)
    raise KeyError(name)


def sampled_position_status(p, q) -> str:
    """The status of one counted position (None: a null element), in the order the kernels
    check: null, then the policy's log-prob, then the reference's (SPEC §11)."""
    if p is None or q is None:
        return "null_element"
    for x, policy in ((p, True), (q, False)):
        if math.isnan(x):
            return "nan"
        if x == math.inf or (policy and x == -math.inf):
            return "non_finite"
        if x > 1e-3:
            return "negative"
    return "ok"


def sampled_sequence_reference(p_seq, q_seq, counted) -> tuple[str, int | None, dict]:
    """(status, first bad position or None, {estimator: exact value per position, None where
    not counted}) of one sequence of sampled log-probs; `counted[j]`: position j counts (a
    sequence is invalid at its first bad counted position, `no_tokens` if none counts)."""
    if p_seq is None or q_seq is None:
        return "null", None, {m: [] for m in SAMPLED_MEASURES}
    if len(p_seq) != len(q_seq):
        return "length_mismatch", None, {m: [] for m in SAMPLED_MEASURES}
    refs = {m: [] for m in SAMPLED_MEASURES}
    for j, (a, b) in enumerate(zip(p_seq, q_seq)):
        if not counted[j]:
            for m in SAMPLED_MEASURES:
                refs[m].append(None)
            continue
        st = sampled_position_status(a, b)
        if st != "ok":
            return st, j, refs
        for m in SAMPLED_MEASURES:
            refs[m].append(sampled_reference(m, a, b))
    return ("ok" if any(counted) else "no_tokens"), None, refs


def gaussian_kl_reference(p_mean, p_logvar, q_mean, q_logvar):
    """Exact KL between diagonal Gaussians (mpmath, 50 digits).

    The textbook 1/2 sum [b - a + (e^a + (mu_p - mu_q)^2) / e^b - 1] cancels at any
    fixed precision when the terms are tiny, so it is evaluated as the identical
    1/2 sum [(e^d - 1 - d) + (mu_p - mu_q)^2 e^-b], d = a - b, with e^d - 1 - d
    by its series for |d| < 1 (tests check the two forms agree).
    """
    c = _ctx()
    terms = []
    for mp, a, mq, b in zip(p_mean, p_logvar, q_mean, q_logvar):
        a, b, dm = c.mpf(a), c.mpf(b), c.mpf(mp) - c.mpf(mq)
        d = a - b
        k3 = c.exp(d) - 1 - d if abs(d) >= 1 else c.fsum(d ** n / c.factorial(n) for n in range(2, 60))
        terms.append((k3 + dm * dm * c.exp(-b)) / 2)
    return c.fsum(terms)


def gaussian_kl_textbook(p_mean, p_logvar, q_mean, q_logvar):
    """The textbook form at 50 digits (for moderate values only: see gaussian_kl_reference)."""
    c = _ctx()
    return c.fsum((c.mpf(b) - c.mpf(a) + (c.exp(c.mpf(a)) + (c.mpf(mp) - c.mpf(mq)) ** 2) / c.exp(c.mpf(b)) - 1) / 2
                  for mp, a, mq, b in zip(p_mean, p_logvar, q_mean, q_logvar))


def top1_agree_reference(p_row, q_row, p_ids=None, q_ids=None) -> float:
    """1.0 when P's most likely token (first on a tie) is Q's, else 0.0 (on stored values:
    every decoding is increasing)."""
    a = max(range(len(p_row)), key=lambda j: (p_row[j], -j))
    b = max(range(len(q_row)), key=lambda j: (q_row[j], -j))
    ta = p_ids[a] if p_ids is not None else a
    tb = q_ids[b] if q_ids is not None else b
    return 1.0 if ta == tb else 0.0
