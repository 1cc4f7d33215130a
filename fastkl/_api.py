"""The in-memory Python API: one function per measure, plus `divergences`.

Every option is a keyword-only parameter with its type and default, so that
help(), IDEs and the API reference show it; their names and defaults are
those of `Options.from_kwargs` (tests/test_signatures.py holds them together)
and their one-line meanings come from `_options.PARAMETER_HELP`.

Arguments are named for their role: `p` is the distribution the expectation
is taken under (the data / teacher / reference in most ML uses), `q` the
approximating one. `kl(p, q)` is KL(P || Q) = sum p log(p / q).
"""

import math
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from ._engine import compute, compute_gaussian
from ._registry import DEFAULT_BETA, Dtype, Kind, Tail
from ._result import Result
from ._options import OnInvalid, Options, check_flag, check_measures, check_threads, documented

ArrayLike = Any  # 2-D numpy array, pyarrow (Chunked)Array of lists of floats, or list of lists

# Keywords that are columns beside p and q, not options.
_DATA_KEYWORDS = ("p_ids", "q_ids", "mask", "lengths", "target")


def _call(p: ArrayLike, q: ArrayLike | None, measures: tuple[str, ...], arguments: dict[str, Any]) -> Result:
    """Compute from a public function's arguments (its `locals()`): options, columns, threads."""
    data = {name: arguments[name] for name in _DATA_KEYWORDS if arguments.get(name) is not None}
    options = Options.from_call(arguments)
    res = compute(p, q, measures, options, threads=check_threads(arguments.get("threads")), **data)
    if options.on_invalid == "raise":
        err = res.error()
        if err is not None:
            raise err
    return res


@documented
def divergences(
    p: ArrayLike,
    q: ArrayLike | None = None,
    measures: Iterable[str] | str = ("kl",),
    *,
    kind: Kind = "probs",
    p_kind: Kind | None = None,
    q_kind: Kind | None = None,
    dtype: Dtype | None = None,
    p_dtype: Dtype | None = None,
    q_dtype: Dtype | None = None,
    temperature: float = 1.0,
    p_temperature: float | None = None,
    q_temperature: float | None = None,
    base: float = math.e,
    normalize: bool = False,
    smoothing: float = 0.0,
    sum_tol: float = 1e-3,
    on_invalid: OnInvalid = "raise",
    beta: float | None = None,
    alpha: float | None = None,
    p_ids: ArrayLike | None = None,
    q_ids: ArrayLike | None = None,
    vocab: int | None = None,
    tail: Tail = "bucket",
    bounds: bool = True,
    mask: ArrayLike | None = None,
    lengths: ArrayLike | None = None,
    per_token: bool = False,
    target: ArrayLike | None = None,
    status: bool = False,
    threads: int | None = None,
) -> pa.Table:
    """Several measures per row in one pass over the data, as a pyarrow.Table.

    One float64 column per measure, in the order asked, null where the row is
    null or invalid. Sequence rows add `m_mean` and `tokens`; top-k rows add
    `m_lower`, `m_upper` and the listed masses (see the user guide, Shapes).

    Examples:
        >>> t = fastkl.divergences([[0.7, 0.3], [0.5, 0.5]], [[0.6, 0.4], [1.0, 0.0]],
        ...                        measures=("kl", "js"), base=2, status=True)
        >>> t.column_names
        ['kl', 'js', 'status']
        >>> [round(v, 4) for v in t["kl"].to_pylist()], t["status"].to_pylist()
        ([0.0312, inf], ['ok', 'ok'])

    Args:
        measures: names of the measures (fastkl.MEASURES; with kind="sampled", k1, k2, k3, abs;
            top1_agree, nll_p, nll_q, delta_p to compare models).
    """
    res = _call(p, q, check_measures(measures), locals())
    return res.to_table(status=check_flag("status", status))


_RETURNS = "Returns a float64 NumPy array, one value per row, NaN where the row is null or invalid."


def _two_sided(name: str, doc: str):
    """The public function of a measure of P against Q (all but gjs, renyi and entropy)."""

    def fn(
        p: ArrayLike,
        q: ArrayLike,
        *,
        kind: Kind = "probs",
        p_kind: Kind | None = None,
        q_kind: Kind | None = None,
        dtype: Dtype | None = None,
        p_dtype: Dtype | None = None,
        q_dtype: Dtype | None = None,
        temperature: float = 1.0,
        p_temperature: float | None = None,
        q_temperature: float | None = None,
        base: float = math.e,
        normalize: bool = False,
        smoothing: float = 0.0,
        sum_tol: float = 1e-3,
        on_invalid: OnInvalid = "raise",
        p_ids: ArrayLike | None = None,
        q_ids: ArrayLike | None = None,
        vocab: int | None = None,
        tail: Tail = "bucket",
        mask: ArrayLike | None = None,
        lengths: ArrayLike | None = None,
        threads: int | None = None,
    ) -> np.ndarray:
        return _call(p, q, (name,), locals()).values[0]

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return documented(fn)


kl = _two_sided("kl", f"""Forward KL divergence KL(P || Q) = sum p_i log(p_i / q_i), per row; +inf where q_i = 0 < p_i.

    {_RETURNS}

    Examples:
        >>> fastkl.kl([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]], [[0.6, 0.3, 0.1], [0.9, 0.0, 0.1]]).round(4).tolist()
        [0.0268, inf]
    """)
reverse_kl = _two_sided("reverse_kl", f"""Reverse KL divergence KL(Q || P), per row (mode-seeking when Q is the student).

    {_RETURNS}

    Examples:
        >>> fastkl.reverse_kl([[0.7, 0.2, 0.1]], [[0.6, 0.3, 0.1]]).round(4).tolist()
        [0.0291]
    """)
jeffreys = _two_sided("jeffreys", f"""Jeffreys divergence KL(P || Q) + KL(Q || P), per row.

    {_RETURNS}

    Examples:
        >>> fastkl.jeffreys([[0.7, 0.2, 0.1]], [[0.6, 0.3, 0.1]]).round(4).tolist()
        [0.056]
    """)
js = _two_sided("js", f"""Jensen-Shannon divergence 1/2 KL(P || M) + 1/2 KL(Q || M), M = (P + Q) / 2, per row;
    in [0, log 2] (the divergence, not its square root as scipy's jensenshannon).

    {_RETURNS}

    Examples:
        >>> fastkl.js([[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]], base=2).tolist()
        [1.0, 0.0]
    """)
cross_entropy = _two_sided("cross_entropy", f"""Cross-entropy H(P, Q) = -sum p_i log q_i = H(P) + KL(P || Q), per row.

    {_RETURNS}

    Examples:
        >>> fastkl.cross_entropy([[0.5, 0.5]], [[0.25, 0.75]], base=2).round(4).tolist()
        [1.2075]
    """)
tv = _two_sided("tv", f"""Total variation distance 1/2 sum |p_i - q_i|, per row; in [0, 1].

    {_RETURNS}

    Examples:
        >>> fastkl.tv([[0.7, 0.2, 0.1]], [[0.6, 0.3, 0.1]]).round(4).tolist()
        [0.1]
    """)
hellinger = _two_sided("hellinger", f"""Hellinger distance sqrt(1/2 sum (sqrt p_i - sqrt q_i)^2), per row; in [0, 1].

    {_RETURNS}

    Examples:
        >>> fastkl.hellinger([[1.0, 0.0]], [[0.0, 1.0]]).tolist()
        [1.0]
    """)
bhattacharyya = _two_sided("bhattacharyya", f"""Bhattacharyya distance -log(1 - hellinger^2) (= -log sum sqrt(p_i q_i) on
    normalised rows), per row; +inf for disjoint supports.

    {_RETURNS}

    Examples:
        >>> fastkl.bhattacharyya([[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [0.0, 1.0]]).tolist()
        [0.0, inf]
    """)


@documented
def entropy(
    p: ArrayLike,
    *,
    kind: Kind = "probs",
    dtype: Dtype | None = None,
    temperature: float = 1.0,
    base: float = math.e,
    normalize: bool = False,
    smoothing: float = 0.0,
    sum_tol: float = 1e-3,
    on_invalid: OnInvalid = "raise",
    p_ids: ArrayLike | None = None,
    vocab: int | None = None,
    tail: Tail = "bucket",
    mask: ArrayLike | None = None,
    lengths: ArrayLike | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Shannon entropy H(P) = -sum p_i log p_i, per row (one side: no `q`).

    Returns a float64 NumPy array, one value per row, NaN where the row is null or invalid.

    Examples:
        >>> fastkl.entropy([[0.5, 0.5], [1.0, 0.0]], base=2).tolist()
        [1.0, 0.0]
    """
    return _call(p, None, ("entropy",), locals()).values[0]


@documented
def gjs(
    p: ArrayLike,
    q: ArrayLike,
    *,
    beta: float = DEFAULT_BETA,
    kind: Kind = "probs",
    p_kind: Kind | None = None,
    q_kind: Kind | None = None,
    dtype: Dtype | None = None,
    p_dtype: Dtype | None = None,
    q_dtype: Dtype | None = None,
    temperature: float = 1.0,
    p_temperature: float | None = None,
    q_temperature: float | None = None,
    base: float = math.e,
    normalize: bool = False,
    smoothing: float = 0.0,
    sum_tol: float = 1e-3,
    on_invalid: OnInvalid = "raise",
    p_ids: ArrayLike | None = None,
    q_ids: ArrayLike | None = None,
    vocab: int | None = None,
    tail: Tail = "bucket",
    mask: ArrayLike | None = None,
    lengths: ArrayLike | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Generalised Jensen-Shannon divergence (GKD's generalised JSD), per row:
    beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q.

    gjs at beta = 0.5 is js; it is 0 at beta = 0 and 1 (ask for kl or
    reverse_kl for the endpoint KLs) and at most the binary entropy of beta.
    Returns a float64 NumPy array, one value per row, NaN where the row is null or invalid.

    Examples:
        >>> p, q = [[0.7, 0.2, 0.1]], [[0.1, 0.2, 0.7]]
        >>> bool(fastkl.gjs(p, q, beta=0.5) == fastkl.js(p, q))
        True
        >>> fastkl.gjs(p, q, beta=0.1).round(4).tolist()
        [0.0989]
    """
    return _call(p, q, ("gjs",), locals()).values[0]


@documented
def renyi(
    p: ArrayLike,
    q: ArrayLike,
    *,
    alpha: float,
    kind: Kind = "probs",
    p_kind: Kind | None = None,
    q_kind: Kind | None = None,
    dtype: Dtype | None = None,
    p_dtype: Dtype | None = None,
    q_dtype: Dtype | None = None,
    temperature: float = 1.0,
    p_temperature: float | None = None,
    q_temperature: float | None = None,
    base: float = math.e,
    normalize: bool = False,
    smoothing: float = 0.0,
    sum_tol: float = 1e-3,
    on_invalid: OnInvalid = "raise",
    p_ids: ArrayLike | None = None,
    q_ids: ArrayLike | None = None,
    vocab: int | None = None,
    tail: Tail = "bucket",
    mask: ArrayLike | None = None,
    lengths: ArrayLike | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Renyi divergence of order `alpha`, per row: log(sum p^alpha q^(1 - alpha) / sum p) / (alpha - 1).

    Tends to kl as alpha -> 1 and is twice bhattacharyya at alpha = 0.5; +inf
    for alpha > 1 where q_i = 0 < p_i. `alpha` has no default (no order is
    the obvious one). Returns a float64 NumPy array, NaN where the row is null or invalid.

    Examples:
        >>> p, q = [[0.7, 0.2, 0.1]], [[0.6, 0.3, 0.1]]
        >>> fastkl.renyi(p, q, alpha=0.5).round(4).tolist(), (2 * fastkl.bhattacharyya(p, q)).round(4).tolist()
        ([0.014], [0.014])
    """
    return _call(p, q, ("renyi",), locals()).values[0]


@documented
def gaussian_kl(
    p_mean: ArrayLike,
    p_logvar: ArrayLike,
    q_mean: ArrayLike,
    q_logvar: ArrayLike,
    *,
    base: float = math.e,
    on_invalid: OnInvalid = "raise",
    threads: int | None = None,
) -> np.ndarray:
    """KL(N(p_mean, e^p_logvar) || N(q_mean, e^q_logvar)) per row, between diagonal Gaussians
    (VAE posteriors against their prior, variational inference).

    Computed as 1/2 sum_j [(e^d - 1 - d) + (mu_p - mu_q)^2 e^-b], d = a - b,
    so nothing cancels. Returns a float64 array, NaN where a row is null or,
    with on_invalid="null", invalid (NaN, inf, dimensions that differ).

    Examples:
        >>> fastkl.gaussian_kl([[1.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]).tolist()
        [0.5]

    Args:
        p_mean: P's per-dimension means, one list per row (or a 2-D array).
        p_logvar: P's per-dimension log-variances a (natural log), rows like `p_mean`.
        q_mean: Q's means, rows like `p_mean`.
        q_logvar: Q's log-variances b, rows like `p_mean`.
    """
    options = Options.from_kwargs(base=base, on_invalid=on_invalid)
    res = compute_gaussian({"p_mean": p_mean, "p_logvar": p_logvar, "q_mean": q_mean, "q_logvar": q_logvar},
                           options, threads=check_threads(threads))
    if options.on_invalid == "raise":
        err = res.error()
        if err is not None:
            raise err
    return res.values[0]
