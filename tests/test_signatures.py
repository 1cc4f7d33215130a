"""The public functions name every option in their signatures, the same way.

`Options.from_kwargs` is the one source of the options' names, types and
defaults; each public function repeats them as keyword-only parameters (so
that help() and IDEs show them), and this file keeps the copies equal: an
option added to Options and forgotten by a function fails here, as does a
parameter whose default or type drifts, or one without its line in help().
"""

from __future__ import annotations

import doctest
import inspect
import math

import pytest
from click.testing import CliRunner

import fastkl
from fastkl._options import OPTION_NAMES, Options
from fastkl._registry import DEFAULT_BETA
from fastkl.cli import main

FUNCTIONS = [name for name in fastkl.__all__ if inspect.isfunction(getattr(fastkl, name))]

# Options a function does not take, and why (everything else it must take).
_SINGLE_VALUE = {"bounds", "per_token"}  # extra columns: only tables (divergences, run) have room for them
_PARAMETERS = {"beta", "alpha"}  # each belongs to its own measure
_Q_SIDE = {"p_kind", "q_kind", "p_dtype", "q_dtype", "p_temperature", "q_temperature"}  # one side: `kind` is P's
NOT_TAKEN = {
    "divergences": set(),
    "run": set(),
    "entropy": _SINGLE_VALUE | _PARAMETERS | _Q_SIDE,
    "gjs": _SINGLE_VALUE | {"alpha"},
    "renyi": _SINGLE_VALUE | {"beta"},
    # closed form from means and log-variances: no encodings, no token data
    "gaussian_kl": set(OPTION_NAMES) - {"base", "on_invalid"},
}
# Where a function's own measure gives an option another default.
OWN_DEFAULT = {("gjs", "beta"): (float, DEFAULT_BETA), ("renyi", "alpha"): (float, inspect.Parameter.empty)}


def signature_problems(fn, name: str) -> list[str]:
    """What is wrong with `fn`'s options against Options.from_kwargs (empty: nothing)."""
    source = inspect.signature(Options.from_kwargs, eval_str=True).parameters
    params = inspect.signature(fn, eval_str=True).parameters
    problems = [f"{name} hides options in **{p.name}" for p in params.values() if p.kind is p.VAR_KEYWORD]
    not_taken = NOT_TAKEN.get(name, _SINGLE_VALUE | _PARAMETERS)
    for option in OPTION_NAMES:
        if option in not_taken:
            if option in params:
                problems.append(f"{name} takes {option}, listed here as not taken")
            continue
        if option not in params:
            problems.append(f"{name} lacks the option {option}")
            continue
        param, want = params[option], source[option]
        annotation, default = OWN_DEFAULT.get((name, option), (want.annotation, want.default))
        if param.kind is not param.KEYWORD_ONLY:
            problems.append(f"{name}: {option} is not keyword-only")
        if param.annotation != annotation:
            problems.append(f"{name}: {option} is typed {param.annotation}, Options says {annotation}")
        if param.default != default and not (isinstance(default, float) and math.isnan(default)):
            problems.append(f"{name}: {option} defaults to {param.default!r}, Options says {default!r}")
    doc = inspect.getdoc(fn) or ""
    args = doc.partition("\nArgs:\n")[2]
    for param in params.values():
        if f"\n    {param.name}: " not in "\n" + args:
            problems.append(f"{name}: help() gives no line for {param.name}")
    if ">>> " not in doc:
        problems.append(f"{name}: no example in the docstring")
    return problems


def test_the_public_functions_are_found():
    assert {"kl", "reverse_kl", "jeffreys", "js", "cross_entropy", "entropy", "tv", "hellinger", "gjs", "renyi",
            "bhattacharyya", "divergences", "gaussian_kl", "run"} <= set(FUNCTIONS)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_signature_names_every_option_as_options_does(name):
    assert signature_problems(getattr(fastkl, name), name) == []


def test_the_check_fails_on_a_missing_or_drifted_option():
    """The check above can fail: a copy of kl without `base`, one whose sum_tol
    default drifted, one taking **opts, one without help lines."""
    sig = inspect.signature(fastkl.kl, eval_str=True)

    def variant(params, doc=fastkl.kl.__doc__):
        def fn(*args, **kwargs):
            pass
        fn.__signature__ = sig.replace(parameters=params)
        fn.__doc__ = doc
        return fn

    without_base = [p for p in sig.parameters.values() if p.name != "base"]
    assert "kl lacks the option base" in signature_problems(variant(without_base), "kl")
    drifted = [p.replace(default=1e-2) if p.name == "sum_tol" else p for p in sig.parameters.values()]
    assert any("sum_tol defaults" in s for s in signature_problems(variant(drifted), "kl"))
    hidden = list(sig.parameters.values())[:2] + [inspect.Parameter("opts", inspect.Parameter.VAR_KEYWORD)]
    assert "kl hides options in **opts" in signature_problems(variant(hidden), "kl")
    assert "kl: help() gives no line for base" in signature_problems(variant(list(sig.parameters.values()),
                                                                             doc="KL.\n\n>>> 1\n"), "kl")


def test_help_shows_each_option_with_its_meaning():
    text = fastkl.kl.__doc__
    assert "    base: base of the logarithm" in text and "    on_invalid: " in text
    assert "kind: Literal['probs', 'logprobs', 'logits', 'sampled'] = 'probs'" in str(inspect.signature(fastkl.kl))


def test_renyi_needs_its_order_and_gjs_defaults_to_js():
    with pytest.raises(TypeError, match="alpha"):
        fastkl.renyi([[0.5, 0.5]], [[0.5, 0.5]])
    p, q = [[0.7, 0.3]], [[0.2, 0.8]]
    assert fastkl.gjs(p, q)[0] == pytest.approx(fastkl.js(p, q)[0], rel=1e-12)


def test_an_option_a_function_does_not_take_is_a_type_error():
    with pytest.raises(TypeError, match="per_token"):
        fastkl.kl([[0.5, 0.5]], [[0.5, 0.5]], per_token=True)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_docstring_examples_run(name):
    """The `>>>` examples of every public function (run as doctests, with `fastkl` imported)."""
    fn = getattr(fastkl, name)
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    tests = finder.find(fn, name, globs={"fastkl": fastkl})
    assert tests and tests[0].examples
    for t in tests:
        runner.run(t)
    assert runner.failures == 0, f"{runner.failures} failing example(s) in {name}: see the output above"


def test_every_option_is_a_cli_flag_of_run():
    """The CLI mirrors the options (bounds is --no-bounds: bounds are on by default)."""
    text = CliRunner().invoke(main, ["run", "--help"], terminal_width=200).output
    for option in OPTION_NAMES:
        flag = "--no-bounds" if option == "bounds" else "--" + option.replace("_", "-")
        assert flag in text, flag
