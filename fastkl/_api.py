"""The in-memory Python API: one function per measure, plus `divergences`.

Arguments are named for their role: `p` is the distribution the expectation
is taken under (the data / teacher / reference in most ML uses), `q` the
approximating one. `kl(p, q)` is KL(P || Q) = sum p log(p / q).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from ._engine import compute, compute_gaussian
from ._result import Result
from ._options import Options, check_flag, check_measures, check_threads

ArrayLike = Any  # 2-D numpy array, pyarrow (Chunked)Array of lists of floats, or list of lists

# Keywords that are columns beside p and q, not options.
_DATA_KEYWORDS = ("p_ids", "q_ids", "mask", "lengths", "target")

_OPTIONS_DOC = """
    Options:
        kind: "probs" (default), "logprobs" (natural log) or "logits"; sets both sides.
        p_kind, q_kind: override `kind` for one side.
        dtype: element type of both sides, "float16", "bfloat16", "float32" or "float64"
            (default None: as stored). Arrow has no bfloat16: dtype="bfloat16" reads a
            list<uint16> (or a uint16 array) as bfloat16 bits. Half precision is decoded
            to float32 row by row (no float32 copy) and bounded like float32.
        p_dtype, q_dtype: override `dtype` for one side.
        temperature: logits are decoded as log_softmax(x / temperature).
        p_temperature, q_temperature: override `temperature` for one side.
        base: logarithm base of the log measures (e by default, 2 for bits).
        normalize: divide each row by its sum instead of requiring it to sum to 1.
        smoothing: eps; after decoding each side becomes (p + eps) / (1 + K eps).
        sum_tol: how far from 1 a row sum may be (default 1e-3).
        on_invalid: "raise" (default: fastkl.InvalidRowError) or "null" (NaN for that row).
        threads: threads to split the rows over (default: all cores).
        beta: gjs's weight of P in the mixture, in [0, 1] (default 0.5).
        alpha: renyi's order, > 0 and != 1 (no default).

    Sequence rows (one distribution per position: lists of lists, or 3-D arrays):
        Each measure is the sum over the counted positions (`divergences` adds
        `m_mean`, and `tokens`, the number of counted positions).
        mask: per sequence, a list of booleans or 0/1 integers: which positions count.
        lengths: per sequence, how many leading positions count.
        per_token: `divergences` adds `m_tokens`, the value at each position
            (null where not counted).
"""


def _run(
    p: ArrayLike,
    q: ArrayLike | None,
    measures: tuple[str, ...],
    threads: int | None,
    opts: dict[str, Any],
) -> Result:
    data = {name: opts.pop(name) for name in _DATA_KEYWORDS if name in opts}
    options = Options.from_kwargs(**opts)
    res = compute(p, q, measures, options, threads=check_threads(threads), **data)
    if options.on_invalid == "raise":
        err = res.error()
        if err is not None:
            raise err
    return res


def divergences(
    p: ArrayLike,
    q: ArrayLike | None = None,
    measures: Iterable[str] | str = ("kl",),
    *,
    status: bool = False,
    threads: int | None = None,
    **opts: Any,
) -> pa.Table:
    """Several measures per row in one pass over the data, as a pyarrow.Table.

    One float64 column per measure, in the order asked, null where the row is
    null or invalid; with `status=True` a string column `status` ("ok",
    "null" or the reason the row is invalid).
    """
    res = _run(p, q, check_measures(measures), threads, opts)
    return res.to_table(status=check_flag("status", status))


divergences.__doc__ += _OPTIONS_DOC


def _measure_function(name: str, doc: str, one_sided: bool = False):
    if one_sided:

        def fn(p: ArrayLike, *, threads: int | None = None, **opts: Any) -> np.ndarray:
            return _run(p, None, (name,), threads, opts).values[0]

    else:

        def fn(p: ArrayLike, q: ArrayLike, *, threads: int | None = None, **opts: Any) -> np.ndarray:
            return _run(p, q, (name,), threads, opts).values[0]

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc + "\n\n    Returns a float64 NumPy array, one value per row, NaN where the row is null or invalid.\n" + _OPTIONS_DOC
    return fn


kl = _measure_function(
    "kl", "Forward KL divergence KL(P || Q) = sum p_i log(p_i / q_i), per row; +inf where q_i = 0 < p_i."
)
reverse_kl = _measure_function("reverse_kl", "Reverse KL divergence KL(Q || P), per row.")
jeffreys = _measure_function("jeffreys", "Jeffreys divergence KL(P || Q) + KL(Q || P), per row.")
js = _measure_function(
    "js",
    "Jensen-Shannon divergence 1/2 KL(P || M) + 1/2 KL(Q || M), M = (P + Q) / 2, per row;"
    " in [0, log 2] (the divergence, not its square root).",
)
entropy = _measure_function("entropy", "Shannon entropy H(P) = -sum p_i log p_i, per row.", one_sided=True)
cross_entropy = _measure_function(
    "cross_entropy", "Cross-entropy H(P, Q) = -sum p_i log q_i = H(P) + KL(P || Q), per row."
)
tv = _measure_function("tv", "Total variation distance 1/2 sum |p_i - q_i|, per row; in [0, 1].")
hellinger = _measure_function(
    "hellinger", "Hellinger distance sqrt(1/2 sum (sqrt p_i - sqrt q_i)^2), per row; in [0, 1]."
)

gjs = _measure_function(
    "gjs",
    "Generalised Jensen-Shannon divergence (GKD's generalised JSD) beta KL(P || M) + (1 - beta) KL(Q || M),"
    " M = beta P + (1 - beta) Q, per row; `beta` in [0, 1] (default 0.5: js). 0 at beta = 0 and 1 (the"
    " endpoint KLs are kl and reverse_kl), at most the binary entropy of beta.",
)
renyi = _measure_function(
    "renyi",
    "Renyi divergence of order `alpha` (required; > 0, != 1): log(sum p^alpha q^(1 - alpha) / sum p) / (alpha - 1),"
    " per row; -> kl as alpha -> 1, 2 * bhattacharyya at alpha = 0.5; +inf for alpha > 1 where q_i = 0 < p_i.",
)
bhattacharyya = _measure_function(
    "bhattacharyya",
    "Bhattacharyya distance -log(1 - hellinger^2) (= -log sum sqrt(p_i q_i) on normalised rows), per row;"
    " +inf for disjoint supports.",
)


def gaussian_kl(
    p_mean: ArrayLike,
    p_logvar: ArrayLike,
    q_mean: ArrayLike,
    q_logvar: ArrayLike,
    *,
    base: float = math.e,
    on_invalid: str = "raise",
    threads: int | None = None,
) -> np.ndarray:
    """KL(N(p_mean, e^p_logvar) || N(q_mean, e^q_logvar)) per row, between diagonal Gaussians
    (VAE posteriors against their prior, variational inference).

    Each argument holds one list of per-dimension values per row (or a 2-D
    array). Computed as 1/2 sum_j [(e^d - 1 - d) + (mu_p - mu_q)^2 e^-b],
    d = a - b, so nothing cancels. Returns a float64 array, NaN where a row is
    null or, with on_invalid="null", invalid (NaN, inf, dimensions that differ).
    """
    options = Options.from_kwargs(base=base, on_invalid=on_invalid)
    res = compute_gaussian({"p_mean": p_mean, "p_logvar": p_logvar, "q_mean": q_mean, "q_logvar": q_logvar},
                           options, threads=check_threads(threads))
    if options.on_invalid == "raise":
        err = res.error()
        if err is not None:
            raise err
    return res.values[0]
