"""Validated per-call options, shared by the API and the job layer."""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Literal, Mapping, TypeVar, get_args

import numpy as np

from ._registry import (COMPARISON_MEASURES, DEFAULT_BETA, DTYPES, KINDS, MEASURE_PARAMETER, MEASURES, ONE_SIDED,
                        SAMPLED_MEASURES, TAILS, TARGET_MEASURES, Dtype, Kind, Tail)
from .errors import OptionError

OnInvalid = Literal["raise", "null"]
ON_INVALID: tuple[str, ...] = get_args(OnInvalid)


@dataclass(frozen=True)
class Options:
    """Decoding and bad-row options, checked once and then passed around as is."""

    p_kind: str = "probs"
    q_kind: str = "probs"
    p_temperature: float = 1.0
    q_temperature: float = 1.0
    base: float = math.e
    normalize: bool = False
    smoothing: float = 0.0
    sum_tol: float = 1e-3
    on_invalid: str = "raise"
    # token data: sparse rows and sequence rows
    vocab: int | None = None
    tail: str = "bucket"
    bounds: bool = True
    per_token: bool = False
    # declared element types (None: as stored)
    p_dtype: str | None = None
    q_dtype: str | None = None
    # parameters of gjs and renyi (None: not given)
    beta: float | None = None
    alpha: float | None = None

    @classmethod
    def from_kwargs(
        cls,
        *,
        kind: Kind = "probs",
        p_kind: Kind | None = None,
        q_kind: Kind | None = None,
        temperature: float = 1.0,
        p_temperature: float | None = None,
        q_temperature: float | None = None,
        base: float = math.e,
        normalize: bool = False,
        smoothing: float = 0.0,
        sum_tol: float = 1e-3,
        on_invalid: OnInvalid = "raise",
        vocab: int | None = None,
        tail: Tail = "bucket",
        bounds: bool = True,
        per_token: bool = False,
        dtype: Dtype | None = None,
        p_dtype: Dtype | None = None,
        q_dtype: Dtype | None = None,
        beta: float | None = None,
        alpha: float | None = None,
    ) -> "Options":
        """The options as the public functions take them (their one source: the
        signatures of `kl`, `divergences`, `run`, ... are checked against this one)."""
        # named as the caller named them (`temperature`, not the `p_temperature` it sets)
        for arg, value in (("kind", kind), ("p_kind", p_kind), ("q_kind", q_kind)):
            if value is not None and value not in KINDS:
                raise OptionError(f"unknown {arg} {value!r}; expected one of {', '.join(KINDS)}")
        for arg, value in (("dtype", dtype), ("p_dtype", p_dtype), ("q_dtype", q_dtype)):
            _check_dtype(arg, value)
        for arg, value in (("temperature", temperature), ("p_temperature", p_temperature),
                           ("q_temperature", q_temperature)):
            if value is not None:
                _check_temperature(arg, value)
        opts = cls(
            p_kind=p_kind if p_kind is not None else kind,
            q_kind=q_kind if q_kind is not None else kind,
            p_temperature=float(p_temperature if p_temperature is not None else temperature),
            q_temperature=float(q_temperature if q_temperature is not None else temperature),
            base=_number("base", base),
            normalize=check_flag("normalize", normalize),
            smoothing=_number("smoothing", smoothing),
            sum_tol=_number("sum_tol", sum_tol),
            on_invalid=on_invalid,
            vocab=_vocab(vocab),
            tail=tail,
            bounds=check_flag("bounds", bounds),
            per_token=check_flag("per_token", per_token),
            p_dtype=p_dtype if p_dtype is not None else dtype,
            q_dtype=q_dtype if q_dtype is not None else dtype,
            beta=None if beta is None else _number("beta", beta),
            alpha=None if alpha is None else _number("alpha", alpha),
        )
        opts.check()
        return opts

    @classmethod
    def from_call(cls, arguments: Mapping[str, Any]) -> "Options":
        """The options among a public function's arguments (its `locals()`), checked."""
        return cls.from_kwargs(**{name: arguments[name] for name in OPTION_NAMES if name in arguments})

    def check(self) -> None:
        for side in ("p", "q"):
            kind = getattr(self, f"{side}_kind")
            if kind not in KINDS:
                raise OptionError(f"unknown {side}_kind {kind!r}; expected one of {', '.join(KINDS)}")
            t = getattr(self, f"{side}_temperature")
            if not (t > 0 and math.isfinite(t)):
                raise OptionError(f"{side}_temperature must be a finite number > 0, got {t!r}")
        if not (self.base > 0 and self.base != 1 and math.isfinite(self.base)):
            raise OptionError(f"base must be a finite positive number other than 1, got {self.base!r}")
        if not (self.smoothing >= 0 and math.isfinite(self.smoothing)):
            raise OptionError(f"smoothing must be a finite number >= 0, got {self.smoothing!r}")
        if not (self.sum_tol >= 0 and math.isfinite(self.sum_tol)):
            raise OptionError(f"sum_tol must be a finite number >= 0, got {self.sum_tol!r}")
        if self.on_invalid not in ON_INVALID:
            raise OptionError(f"on_invalid must be 'raise' or 'null', got {self.on_invalid!r}")
        _check_dtype("p_dtype", self.p_dtype)
        _check_dtype("q_dtype", self.q_dtype)
        if self.tail not in TAILS:
            raise OptionError(f"unknown tail {self.tail!r}; expected one of {', '.join(TAILS)}")
        if self.beta is not None and not 0.0 <= self.beta <= 1.0:
            raise OptionError(f"beta must be a number in [0, 1] (gjs weights KL(P||M) by beta), got {self.beta!r}")
        if self.alpha is not None and not (0.0 < self.alpha < math.inf and self.alpha != 1.0):
            raise OptionError(f"alpha must be a finite number > 0 other than 1 (renyi at alpha = 1 is kl), "
                              f"got {self.alpha!r}")

    @property
    def gjs_beta(self) -> float:
        """The beta gjs uses: as given, else the default (gjs(0.5) = js)."""
        return DEFAULT_BETA if self.beta is None else self.beta

    def check_sparse(self, dense_side: bool) -> None:
        """What sparse (top-k) rows cannot do: refused before any work, with the way out."""
        for side in ("p", "q"):
            if getattr(self, f"{side}_kind") == "logits":
                raise OptionError(
                    f"{side}_kind='logits' with token ids: top-k logits cannot be decoded without the whole "
                    "row's log-sum-exp; store log-probs (log_softmax over the full vocabulary) or probabilities")
        if self.normalize or self.smoothing:
            raise OptionError("normalize and smoothing do not apply to top-k rows (their unlisted mass is "
                              "unknown); tail='renormalize' renormalises the listed values if that is meant")
        if self.tail == "uniform" and self.vocab is None and not dense_side:
            raise OptionError("tail='uniform' spreads the unlisted mass over the vocabulary: give vocab=V "
                              "(--vocab V), the vocabulary size")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


OPTION_NAMES: tuple[str, ...] = tuple(inspect.signature(Options.from_kwargs).parameters)

# One line per parameter of the public functions, shown by help() and the API
# reference (`documented` writes them into each docstring): the options of
# Options.from_kwargs, and the arguments several functions share.
PARAMETER_HELP: dict[str, str] = {
    "p": "P, the distribution the expectation is taken under (teacher, reference, data): "
         "one row per distribution, as a 2-D array, an Arrow list array or a list of lists.",
    "q": "Q, the approximating distribution (student, policy, model), rows like `p`.",
    "kind": 'encoding of both sides: "probs", "logprobs" (natural log), "logits" (decoded by '
            'log-softmax) or "sampled" (one log-prob per sampled token, for k1..k3, abs).',
    "p_kind": "encoding of P only (overrides `kind`).",
    "q_kind": "encoding of Q only (overrides `kind`).",
    "temperature": "logits are decoded as log_softmax(x / temperature).",
    "p_temperature": "temperature of P only (overrides `temperature`).",
    "q_temperature": "temperature of Q only (overrides `temperature`).",
    "base": "base of the logarithm of the log measures (e: nats, 2: bits); tv and hellinger do not change.",
    "normalize": "divide each row by its sum instead of requiring it to sum to 1.",
    "smoothing": "eps: after decoding each side becomes (p + eps) / (1 + K eps), so every measure is finite.",
    "sum_tol": "how far from 1 a row's sum may be before the row is invalid (not_normalized).",
    "on_invalid": '"raise": an invalid row raises fastkl.InvalidRowError; "null": its values are NaN/null.',
    "vocab": "top-k rows: the vocabulary size V (ids must lie in [0, V)); tightens the bounds.",
    "tail": 'top-k rows: what the point estimate takes the unlisted mass to be: "bucket" (pooled, never '
            'above the truth for f-divergences), "renormalize" or "uniform" (needs vocab).',
    "bounds": "top-k rows: add the m_lower / m_upper columns that contain the true value.",
    "per_token": "sequence rows: add m_tokens, each counted position's value (null where not counted).",
    "dtype": 'element type of both sides: "float16", "bfloat16", "float32", "float64" (None: as stored; '
             '"bfloat16" reads uint16 bits).',
    "p_dtype": "element type of P only (overrides `dtype`).",
    "q_dtype": "element type of Q only (overrides `dtype`).",
    "beta": "gjs: the weight of P in the mixture M = beta P + (1 - beta) Q, in [0, 1] (None: 0.5, which is js).",
    "alpha": "renyi: its order, > 0 and != 1 (required by renyi).",
    "p_ids": "top-k rows: P's token ids, the same shape as `p` (P lists only these entries).",
    "q_ids": "top-k rows: Q's token ids, the same shape as `q`.",
    "mask": "sequence rows: per sequence, which positions count (booleans or 0/1).",
    "lengths": "sequence rows: per sequence, how many leading positions count.",
    "target": "the token that came next (an id per row, or a list per sequence): for nll_p, nll_q, delta_p.",
    "threads": "threads to split the rows over (None: all cores).",
    "status": 'add a string column "status": "ok", "null" or the reason the row is invalid.',
}

_F = TypeVar("_F", bound=Callable[..., Any])


def documented(fn: _F) -> _F:
    """Append "name: meaning" for each parameter of `fn` its docstring leaves out.

    The docstring ends with its `Args:` section (or gets one), so help() and the
    API reference show every option with a line of its own. A parameter with a
    line neither here nor in the docstring gets none (tests/test_signatures.py
    names it), so adding a parameter never breaks the import.
    """
    head, _, args = inspect.cleandoc(fn.__doc__ or "").partition("\nArgs:\n")
    described = {line.split(":")[0].strip() for line in args.splitlines()
                 if line.startswith("    ") and not line.startswith("     ")}
    lines = [f"    {name}: {PARAMETER_HELP[name]}" for name in inspect.signature(fn).parameters
             if name not in described and name in PARAMETER_HELP]
    doc = head + "\n\nArgs:\n" + (args.rstrip() + "\n" if args.strip() else "")
    fn.__doc__ = doc + "\n".join(lines) + "\n"
    return fn


def check_flag(name: str, value: Any) -> bool:
    """A yes/no option: only a real boolean (bool("no") would be True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise OptionError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_dtype(name: str, value: Any) -> None:
    if value is not None and value not in DTYPES:
        raise OptionError(f"unknown {name} {value!r}; expected one of {', '.join(DTYPES)} (or None: as stored)")


def _vocab(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise OptionError(f"vocab must be a whole number >= 1 (the vocabulary size), got {value!r}")
    return int(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise OptionError(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_temperature(name: str, value: Any) -> None:
    t = _number(name, value)
    if not (t > 0 and math.isfinite(t)):
        raise OptionError(f"{name} must be a finite number > 0, got {value!r}")


def check_threads(threads: Any) -> int | None:
    """`threads=`: None (all cores) or a whole number >= 1."""
    if threads is None:
        return None
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise OptionError(f"threads must be a whole number >= 1 (or None for all cores), got {threads!r}")
    return int(threads)


def check_measures(measures: Iterable[str] | str) -> tuple[str, ...]:
    """Normalise a measure list: known names, no duplicates, kernel order kept as given;
    measures of distributions and estimators from sampled tokens are not mixed."""
    if isinstance(measures, str):
        measures = (measures,)
    out: list[str] = []
    for m in measures:
        if m not in MEASURES and m not in SAMPLED_MEASURES and m not in COMPARISON_MEASURES:
            raise OptionError(f"unknown measure {m!r}; expected some of {', '.join(MEASURES + COMPARISON_MEASURES)} "
                              f"(or, with kind='sampled', of {', '.join(SAMPLED_MEASURES)})")
        if m not in out:
            out.append(m)
    if not out:
        raise OptionError("no measure requested")
    if is_sampled(tuple(out)) and any(m not in SAMPLED_MEASURES for m in out):
        raise OptionError(f"{', '.join(m for m in out if m in SAMPLED_MEASURES)} estimate KL from the "
                          "sampled tokens' log-probs (kind='sampled'); they cannot be asked together with "
                          "measures of whole distributions")
    return tuple(out)


def is_sampled(measures: tuple[str, ...]) -> bool:
    """Estimators from sampled-token log-probs (k1, k2, k3, abs)."""
    return any(m in SAMPLED_MEASURES for m in measures)


def check_kind_for(measures: tuple[str, ...], options: "Options") -> None:
    """kind='sampled' goes with the estimators k1..abs, and only with them."""
    sampled = is_sampled(measures)
    kinds = {options.p_kind, options.q_kind}
    if sampled and kinds != {"sampled"}:
        raise OptionError(f"{', '.join(measures)} need kind='sampled' (p and q: the log-probability of "
                          "each sampled token under the policy and under the reference)")
    if not sampled and "sampled" in kinds:
        raise OptionError("kind='sampled' holds one log-prob per token, not distributions: ask for the "
                          f"estimators {', '.join(SAMPLED_MEASURES)}")


def needs_q(measures: tuple[str, ...]) -> bool:
    return any(m not in ONE_SIDED for m in measures)


def check_target(measures: tuple[str, ...], options: "Options", has_target: bool, sparse: bool) -> None:
    """nll_p, nll_q and delta_p need the token that came next; what they cannot do yet is refused."""
    wanted = [m for m in measures if m in TARGET_MEASURES]
    if wanted and not has_target:
        raise OptionError(f"{', '.join(wanted)} need the token that came next at each row: target= "
                          "(--target COL), an integer per row or a list per sequence")
    if has_target and not wanted:
        raise OptionError("target is read by nll_p, nll_q and delta_p only: ask for one of them")
    if wanted and (options.normalize or options.smoothing):
        raise OptionError(f"{', '.join(wanted)} read the stored distributions: normalize and smoothing "
                          "are not applied to them; leave them out")


def check_parameters(measures: tuple[str, ...], options: "Options") -> None:
    """renyi needs alpha; alpha and beta set for a measure that is not asked are refused
    (beta=0.3 beside js alone would be silently ignored)."""
    if "renyi" in measures and options.alpha is None:
        raise OptionError("renyi needs its order: alpha=A (--alpha A), a number > 0 other than 1 "
                          "(0.5: twice bhattacharyya; -> kl as alpha -> 1)")
    for measure, name in MEASURE_PARAMETER.items():
        if getattr(options, name) is not None and measure not in measures:
            raise OptionError(f"{name} is the parameter of {measure}: ask for {measure} or leave {name} out")


def check_request(measures: tuple[str, ...], options: "Options", *, p_ids: bool, q_ids: bool, has_q: bool,
                  has_target: bool) -> bool:
    """Measures, kinds and the token-data columns given agree (the API and jobs alike);
    returns whether the rows are sparse (a side has token ids)."""
    check_kind_for(measures, options)
    check_parameters(measures, options)
    q_ids = q_ids and has_q
    sparse = p_ids or q_ids
    if sparse and options.p_kind == "sampled":
        raise OptionError("kind='sampled' holds one log-prob per token: it has no token ids "
                          "(p_ids / q_ids, --p-ids / --q-ids)")
    if sparse:
        options.check_sparse(dense_side=not p_ids or (has_q and not q_ids))
    check_target(measures, options, has_target, sparse)
    return sparse
