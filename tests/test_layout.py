"""The package's rooms keep their direction: data flows down, cli -> api/jobs -> engine -> adapters -> kernels.

Read from the source (ast), not by importing: a lazy import inside a function
counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "fastkl"

# room -> fastkl modules (and their submodules) it must never import; kernels are checked apart
FORBIDDEN = {
    "adapters": ("fastkl._engine", "fastkl._api", "fastkl.kernels", "fastkl.jobs", "fastkl.io", "fastkl.summary",
                 "fastkl.bench", "fastkl.cli"),
    "summary": ("fastkl._engine", "fastkl._api", "fastkl.jobs", "fastkl.io", "fastkl.bench", "fastkl.cli"),
    "io": ("fastkl._engine", "fastkl._api", "fastkl.kernels", "fastkl.adapters", "fastkl.jobs", "fastkl.summary",
           "fastkl.bench", "fastkl.cli"),
    "_engine": ("fastkl.jobs", "fastkl.io", "fastkl.summary", "fastkl.bench", "fastkl.cli", "fastkl._api"),
    "_api": ("fastkl.jobs", "fastkl.io", "fastkl.summary", "fastkl.bench", "fastkl.cli"),
    "jobs": ("fastkl.bench", "fastkl.cli"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved; `from X import m` counts X.m)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _room_files(room: str) -> list[Path]:
    return sorted((PKG / room).rglob("*.py")) if (PKG / room).is_dir() else [PKG / f"{room}.py"]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_import_only_downwards(room):
    bad = [f"{_module_name(f)} imports {m}" for f in _room_files(room) for m in sorted(_imports(f))
           if any(m == p or m.startswith(p + ".") for p in FORBIDDEN[room])]
    assert not bad, bad


def test_kernels_import_only_numpy_numba_and_themselves():
    allowed = ("numpy", "numba", "llvmlite", "math", "__future__", "fastkl.kernels")
    bad = [f"{_module_name(f)} imports {m}" for f in _room_files("kernels") for m in sorted(_imports(f))
           if not any(m == a or m.startswith(a + ".") for a in allowed)]
    assert not bad, bad


def test_subpackage_inits_import_nothing():
    """A name re-exported in a room's __init__ could shadow its module (fastkl.jobs.run is a module,
    fastkl.run a function): tests patch modules by path, so the inits stay empty."""
    for init in sorted(PKG.glob("*/__init__.py")):
        body = [n for n in ast.parse(init.read_text()).body if not isinstance(n, ast.Expr)]
        assert not body, f"{init.relative_to(PKG.parent)} does more than carry a docstring"


def test_every_room_is_installed():
    """pyproject's packages.find include = ["fastkl*"] picks up every subpackage; a room without
    an __init__.py would be left out of the wheel."""
    for d in sorted(p for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert (d / "__init__.py").is_file(), f"{d.relative_to(PKG.parent)} has no __init__.py"


def test_the_core_count_is_computed_once():
    """The kernel's pool, the job's workers and each task's threads are sized on one `fastkl._config.cores()`:
    a second computation (it once lived in both the engine and the job layer) could disagree with it.
    bench/ is exempt: it measures the machine itself (load over all CPUs, pinning a child to some)."""
    bad = [str(f.relative_to(PKG.parent)) for f in sorted(PKG.rglob("*.py"))
           if f.name != "_config.py" and "bench" not in f.relative_to(PKG).parts and ("sched_getaffinity" in f.read_text() or "cpu_count" in f.read_text())]
    assert not bad, bad


KERNEL_MODULES = sorted((PKG / "kernels").glob("*.py"))


@pytest.mark.parametrize("path", KERNEL_MODULES, ids=lambda p: p.name)
def test_a_kernel_module_carries_the_digest_of_what_it_inlines(path):
    """Numba checks its on-disk cache of a kernel against the kernel's own file only, and
    kernels inline the helpers of the kernel modules they import: each module that imports
    one keeps their digest, so that editing them changes it (and so its cache) too."""
    import hashlib
    import re

    text = path.read_text()
    imported = sorted(set(re.findall(r"^from \.(\w+) import", text, re.M)))
    if not imported:
        assert "INLINES_DIGEST = " not in text  # (nothing to tie)
        return
    digest = hashlib.sha256(b"".join((path.parent / f"{m}.py").read_bytes() for m in imported)).hexdigest()[:16]
    assert f'INLINES_DIGEST = "{digest}"' in text, (
        f"{path.name} inlines {', '.join(imported)}, which changed: set INLINES_DIGEST = {digest!r} there "
        f"(then in the modules that import {path.stem})")

