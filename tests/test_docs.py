"""The documentation builds, its code runs, and it keeps up with the package.

- `mkdocs build --strict` (warnings are errors: broken links and anchors,
  pages missing from the nav, API entries that do not resolve, docstrings
  griffe cannot read) into a temporary directory;
- every ```python block of every page runs, page by page in one namespace, in
  a temporary directory (a block preceded by `<!-- not run: why -->` is not);
- the names users look up are all there: every row status in the bad-rows
  page, every flag of `fastkl run` in the command-line reference;
- the README stays the quick start: its two set-up commands, links that
  resolve, and no citation of a document users do not have.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fastkl._registry import STATUSES
from fastkl.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```(?P<lang>python|bash)\n(?P<code>.*?)\n```", re.S)
# A recipe's shell commands run too, with `fastkl` the package of this tree.
_SHELL = 'set -euo pipefail\nfastkl() { "$PYTHON" -m fastkl.cli "$@"; }\n'


def code_blocks(text: str, langs: tuple[str, ...] = ("python",)) -> list[tuple[str, str]]:
    """The (language, code) blocks of a page that are meant to run."""
    return [(m["lang"], m["code"]) for m in _BLOCK.finditer("\n" + text)
            if m["lang"] in langs and not m["before"].startswith("<!-- not run")]


def python_blocks(text: str) -> list[str]:
    return [code for _, code in code_blocks(text)]


def test_the_docs_build_with_warnings_as_errors(tmp_path):
    pytest.importorskip("mkdocs", reason="pip install -e '.[test]' installs MkDocs")  # never silent: see below
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                          "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    for name in ("fastkl.kl", "fastkl.divergences", "fastkl.jobs.run.run", "fastkl.renyi"):
        assert f'id="{name}"' in api, name
    assert "on_invalid" in api and "sum_tol" in api


def test_mkdocs_is_installed_by_the_test_extra():
    """CI runs `pip install -e ".[test]" && pytest`: the build test must not be skipped there."""
    import mkdocs  # noqa: F401
    import mkdocstrings  # noqa: F401


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_the_code_of_each_page_runs(page, tmp_path, monkeypatch):
    """Python blocks of every page; in recipes, their shell blocks too, in page order."""
    langs = ("python", "bash") if page.parent.name == "recipes" else ("python",)
    blocks = code_blocks(page.read_text(), langs)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    for i, (lang, code) in enumerate(blocks):
        where = f"{page.relative_to(DOCS)}: {lang} block {i + 1}"
        if lang == "bash":
            out = subprocess.run(["bash", "-c", _SHELL + code], cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=600)
            assert out.returncode == 0, f"{where} fails:\n{code}\n{out.stdout}{out.stderr}"
            continue
        try:
            exec(compile(code, where, "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{where} fails:\n{code}") from e


def test_the_block_finder_skips_only_marked_blocks():
    text = ("intro\n```python\na = 1\n```\n<!-- not run: needs a cluster -->\n```python\nb = 2\n```\n"
            "```bash\nfastkl demo\n```\n```text\nout\n```\n")
    assert python_blocks(text) == ["a = 1"]
    assert code_blocks(text, ("python", "bash")) == [("python", "a = 1"), ("bash", "fastkl demo")]


def test_every_row_status_is_explained():
    text = (DOCS / "guide" / "bad-rows.md").read_text()
    missing = [s for s in STATUSES if f"`{s}`" not in text]
    assert missing == []


def test_every_flag_of_fastkl_run_is_in_the_cli_reference():
    help_text = CliRunner().invoke(main, ["run", "--help"], terminal_width=200).output
    flags = set(re.findall(r"(--[a-z][a-z0-9-]+)", help_text)) - {"--help"}
    text = (DOCS / "reference" / "cli.md").read_text()
    assert sorted(f for f in flags if f"`{f}" not in text) == []


def test_the_readme_is_the_quick_start():
    text = (ROOT / "README.md").read_text()
    assert 'pip install -e . && fastkl demo' in text
    assert 'pip install -e ".[test]" && pytest' in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    assert "docs/performance.md" in text


def test_no_user_facing_text_cites_the_internal_contract():
    """Users have the docs, not the developers' contract: the package, README and docs never cite it
    (a § in the package is a section of a page in docs/, named on the same line)."""
    cited = []
    for f in [ROOT / "README.md", *PAGES, *(ROOT / "fastkl").rglob("*.py")]:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            own = f.name == "sparse-bounds.md" or (f.suffix == ".py" and "docs" in line)
            if re.search(r"\bSPEC\b", line) or ("§" in line and not own):
                cited.append(f"{f.relative_to(ROOT)}:{n}")
    assert cited == []


def test_readme_code_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for code in python_blocks((ROOT / "README.md").read_text()):
        exec(compile(code, "README.md", "exec"), namespace)


def test_the_command_line_help_points_to_the_docs():
    runner = CliRunner()
    for args, page in ((["--help"], "docs/index.md"), (["run", "--help"], "docs/guide/jobs.md"),
                       (["bench", "--help"], "docs/performance.md")):
        text = runner.invoke(main, args, terminal_width=200).output
        assert page in text, args
        assert (ROOT / page).exists(), page
