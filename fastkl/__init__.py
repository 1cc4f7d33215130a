"""fastkl: row-wise divergences between probability distributions, fast.

    import fastkl
    fastkl.kl(p, q)                                     # KL(P || Q) per row, numpy float64
    fastkl.divergences(p, q, measures=("kl", "js"))     # pyarrow.Table
    fastkl.run("shards/", "scores/", measures=("kl",))  # a whole dataset

The user guide and the API reference are in docs/ (mkdocs serve).
"""

from __future__ import annotations

from ._config import prefer_wide_vectors

prefer_wide_vectors()  # before anything compiles: see its docstring

from ._api import (  # noqa: E402
    bhattacharyya,
    cross_entropy,
    divergences,
    entropy,
    gaussian_kl,
    gjs,
    hellinger,
    jeffreys,
    js,
    kl,
    renyi,
    reverse_kl,
    tv,
)
from ._registry import KINDS, MEASURES, REASONS, STATUSES  # noqa: E402
from .errors import (  # noqa: E402
    DataError, DestTakenError, FastKLError, FastKLWarning, InvalidRowError, OptionError, TooManyGroupsError,
)

__version__ = "0.1.0"

__all__ = [
    "kl", "reverse_kl", "jeffreys", "js", "entropy", "cross_entropy", "tv", "hellinger", "gjs", "renyi", "bhattacharyya",
    "gaussian_kl",
    "divergences", "run", "Summary",
    "InvalidRowError", "OptionError", "DataError", "DestTakenError", "FastKLError", "FastKLWarning",
    "TooManyGroupsError",
    "MEASURES", "KINDS", "STATUSES", "REASONS",
]


def __getattr__(name: str):
    # The job layer pulls in dask; keep `import fastkl` light for in-memory use.
    if name == "run":
        from .jobs.run import run

        return run
    if name == "Summary":
        from .summary.stats import Summary

        return Summary
    raise AttributeError(f"module 'fastkl' has no attribute {name!r}")
