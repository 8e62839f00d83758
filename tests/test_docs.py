"""The documentation builds without warnings, its tutorials run, and it covers the public API.

The two Sphinx builds are the ones a contributor runs (``python -m sphinx -W -b html docs ...``
and ``-b doctest``); the coverage test needs no build: it reads the autodoc directives of
``docs/api/*.rst`` and checks that every public name of ``autoflow`` and ``autoflow.testing``
(including ``autoflow.testing.strategies``) is documented there and has a docstring.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import autoflow
import autoflow.testing
import autoflow.testing.strategies

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"
DIRECTIVE = re.compile(
    r"^\.\. auto(class|function|exception|data|module|method|attribute|decorator)::\s*(\S+)",
    re.MULTILINE,
)
PUBLIC_MODULES = (autoflow, autoflow.testing, autoflow.testing.strategies)

pytest.importorskip("sphinx")


def _sphinx(builder: str, out: Path) -> None:
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder,
               str(DOCS), str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        report = out / "output.txt"  # the doctest builder's per-document results
        details = report.read_text() if report.is_file() else ""
        pytest.fail(
            f"{' '.join(command[1:])} failed with status {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}\n{details}",
            pytrace=False,
        )


def test_html_builds_without_warnings(tmp_path):
    _sphinx("html", tmp_path / "html")
    assert (tmp_path / "html" / "index.html").is_file()
    assert (tmp_path / "html" / "api" / "index.html").is_file()


def test_tutorials_run(tmp_path):
    """Every ``testcode``/``doctest`` block of the docs runs and prints what the page shows."""
    _sphinx("doctest", tmp_path / "doctest")
    summary = (tmp_path / "doctest" / "output.txt").read_text()
    assert "0 failures in tests" in summary


# -- coverage of the public API ------------------------------------------------------------------


def _resolve(kind: str, target: str) -> object:
    """The object an autodoc directive documents, found the way autodoc finds it: a module by
    import, anything else as attributes of the longest importable module prefix (so
    ``autoflow.glow`` is the function the package exports, not the submodule of that name)."""
    if kind == "module":
        return importlib.import_module(target)
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"cannot import {target}")


def _documented() -> dict[int, tuple[str, str]]:
    """``id(object) -> (directive target, page)`` for every autodoc directive of the API pages."""
    found = {}
    for page in sorted(API.glob("*.rst")):
        for kind, target in DIRECTIVE.findall(page.read_text()):
            found[id(_resolve(kind, target))] = (target, page.name)
    return found


def _public_names() -> list[tuple[str, object]]:
    names = []
    for module in PUBLIC_MODULES:
        for name in module.__all__:
            names.append((f"{module.__name__}.{name}", getattr(module, name)))
    return names


def _data_docstring(target: str) -> str:
    """The ``#:`` comment documenting a module-level name, as autodoc reads it."""
    from sphinx.pycode import ModuleAnalyzer

    module, _, name = target.rpartition(".")
    return "\n".join(ModuleAnalyzer.for_module(module).find_attr_docs().get(("", name), []))


def _docstring(obj: object, target: str) -> str:
    if isinstance(obj, type):
        return obj.__dict__.get("__doc__") or ""  # not a base class's docstring
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.ModuleType)) or (
        callable(obj) and hasattr(obj, "__wrapped__")
    ):
        return inspect.getdoc(obj) or ""
    return _data_docstring(target)  # a type alias or constant: its ``#:`` comment


def test_public_api_is_documented_with_docstrings():
    documented = _documented()
    missing = [name for name, obj in _public_names() if id(obj) not in documented]
    assert not missing, (
        f"public names missing from docs/api/*.rst: {missing}; add an autodoc directive "
        "(autoclass/autofunction/autodata) for each"
    )
    undocumented = [
        name for name, obj in _public_names()
        if not _docstring(obj, documented[id(obj)][0]).strip()
    ]
    assert not undocumented, f"public names without a docstring: {undocumented}"

