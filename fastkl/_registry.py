"""The names fastkl knows: measures, input kinds and row statuses.

Kept in one small module so that kernels, the Arrow adapter, the job layer,
the tests and the benchmarks all agree on the same codes.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

# Measures, in the order the kernel computes them and the output lists them.
MEASURES: tuple[str, ...] = (
    "kl",
    "reverse_kl",
    "jeffreys",
    "js",
    "entropy",
    "cross_entropy",
    "tv",
    "hellinger",
    "gjs",
    "renyi",
    "bhattacharyya",
)
MEASURE_INDEX = {name: i for i, name in enumerate(MEASURES)}

# Measures whose value is a sum of logs: `base` rescales them.
LOG_MEASURES = frozenset({"kl", "reverse_kl", "jeffreys", "js", "entropy", "cross_entropy", "gjs", "renyi",
                          "bhattacharyya"})

# Measures with a parameter of their own (the option that sets it).
MEASURE_PARAMETER = {"gjs": "beta", "renyi": "alpha"}
DEFAULT_BETA = 0.5  # GKD's (TRL's GKDTrainer) default: gjs(0.5) is js

# Measures that read only P (the `q` argument is not needed).
ONE_SIDED = frozenset({"entropy"})

# The option values below are Literal types first, so that signatures and IDEs
# offer them, and tuples second (for checks and codes), from the same names.
Kind = Literal["probs", "logprobs", "logits", "sampled"]
KINDS: tuple[str, ...] = get_args(Kind)

# RLHF estimators of KL(policy || reference) from the log-probabilities of the
# sampled tokens alone (kind="sampled": p the policy's, q the reference's).
SAMPLED_MEASURES: tuple[str, ...] = ("k1", "k2", "k3", "abs")
SAMPLED_INDEX = {name: i for i, name in enumerate(SAMPLED_MEASURES)}

# Model comparison, beside the measures of distributions: does the most likely
# token of P equal Q's (1.0 or 0.0; for sequence rows, summed and averaged).
COMPARISON_MEASURES: tuple[str, ...] = ("top1_agree", "nll_p", "nll_q", "delta_p")
TARGET_MEASURES = frozenset({"nll_p", "nll_q", "delta_p"})  # need the token that came next

# Element types a side may be declared as (`p_dtype`; None: as stored). Arrow
# has no bfloat16: a list<uint16> holding bfloat16 bits must be declared so.
Dtype = Literal["float16", "bfloat16", "float32", "float64"]
DTYPES: tuple[str, ...] = get_args(Dtype)
# How the kernel reads a side's values (`Side.decode`, the kernel's p_decode):
# as they are (float32/float64), or uint16 holding float16 / bfloat16 bits.
DECODES: tuple[str, ...] = ("as_is", "float16", "bfloat16")
DECODE_CODE = {name: i for i, name in enumerate(DECODES)}

# How a sparse (top-k) row's unlisted mass is treated by the point estimate.
Tail = Literal["bucket", "renormalize", "uniform"]
TAILS: tuple[str, ...] = get_args(Tail)
KIND_CODE = {name: i for i, name in enumerate(KINDS)}

# Row statuses. Code 0 is a valid row; 1 a null row (null list on either
# side: not an error); 2 a sequence row whose mask counts no position (null
# measures, not an error either); 3 a valid top-k row whose target (the token
# that came next) is not listed: its nll_p / nll_q / delta_p are null, their
# bounds say what is known, every other measure is computed; the rest are the
# invalid-row reasons, in the order the kernels check them (the dense ones,
# then those of sparse and sequence rows).
STATUSES: tuple[str, ...] = (
    "ok",
    "null",
    "no_tokens",
    "target_unlisted",
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
STATUS_CODE = {name: i for i, name in enumerate(STATUSES)}
OK, NULL, NO_TOKENS, TARGET_UNLISTED = 0, 1, 2, 3
FIRST_INVALID = 4  # status >= FIRST_INVALID: an invalid row
VALID = (OK, TARGET_UNLISTED)  # rows whose measures hold values (target ones aside)
REASONS: tuple[str, ...] = STATUSES[FIRST_INVALID:]


def valid_rows(status):
    """Which rows hold values (a NumPy bool array from their status codes)."""
    return (status == OK) | (status == TARGET_UNLISTED)


def binary_entropy(beta: float) -> float:
    """-b log b - (1-b) log(1-b): the largest gjs(beta), reached by disjoint P and Q."""
    return -sum(x * math.log(x) for x in (beta, 1.0 - beta) if x > 0.0)


def measure_range(name: str, k: int | None = None, base: float = math.e,
                  beta: float = DEFAULT_BETA) -> tuple[float, float]:
    """Closed range of a measure on valid rows, in units of `base`."""
    scale = 1.0 / math.log(base)
    if name in ("kl", "reverse_kl", "jeffreys", "cross_entropy", "renyi", "bhattacharyya"):
        return 0.0, math.inf
    if name == "gjs":
        return 0.0, binary_entropy(beta) * scale
    if name == "js":
        return 0.0, math.log(2.0) * scale
    if name == "entropy":
        return 0.0, (math.log(k) * scale) if k else math.inf
    if name in ("tv", "hellinger"):
        return 0.0, 1.0
    if name == "k1":
        return -math.inf, math.inf
    if name in ("k2", "k3", "abs"):
        return 0.0, math.inf
    if name == "top1_agree":
        return 0.0, 1.0
    if name in ("nll_p", "nll_q"):
        return 0.0, math.inf
    if name == "delta_p":
        return -1.0, 1.0
    raise KeyError(name)
