"""The documentation builds without warnings, its tutorials run, it reads well offline, and it
covers the public API.

The two Sphinx builds are the ones a contributor runs (``python -m sphinx -W -b html docs ...``
and ``-b doctest``). The HTML build is made once and then checked: it references no remote
script or stylesheet (math is typeset by a MathJax copied into the build), and, where Chromium
is installed, every page rendered in a headless browser shows no raw TeX, no code block wider
than its box and no broken image (see ``tests/browser_check.py``). The coverage test needs no
build: it reads the autodoc directives of ``docs/api/*.rst`` and checks that every public name
of ``autoflow`` and ``autoflow.testing`` (including ``autoflow.testing.strategies``) is
documented there and has a docstring.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser_check import check_site, find_browser, site_pages

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


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    """The HTML build, made once for the tests of this module."""
    out = tmp_path_factory.mktemp("docs") / "html"
    _sphinx("html", out)
    return out


def test_html_builds_without_warnings(html):
    assert (html / "index.html").is_file()
    assert (html / "api" / "index.html").is_file()


def test_api_signatures_say_something(html):
    """No class is shown with ``nn.Module``'s catch-all ``(*args, **kwargs)`` signature."""
    shown = [
        f"{page.name}: {name}"
        for page in sorted((html / "api").glob("*.html"))
        for name in re.findall(
            r'<dt class="sig sig-object py" id="([\w.]+)">(?:(?!</dt>).)*?'
            r'<span class="o"><span class="pre">\*</span></span><span class="n">'
            r'<span class="pre">args</span>',
            page.read_text(encoding="utf-8"), flags=re.DOTALL,
        )
    ]
    assert not shown, f"catch-all signatures: {shown}"


def test_code_highlighting_holds(html):
    """Pygments found nothing to mark as an error in the highlighted code, and no string token
    swallows what looks like a trailing comment (a stray quote, e.g. ``target'``)."""
    bad = []
    for page in sorted(html.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        bad += [f"{page.relative_to(html)}: error token {m}"
                for m in re.findall(r'<span class="err">([^<]*)</span>', text)]
        bad += [f"{page.relative_to(html)}: string {m}"
                for m in re.findall(r'<span class="s[12]?">([^<]*\s{2}#[^<]*)</span>', text)]
    assert not bad, "mis-highlighted code:\n" + "\n".join(bad)


#: Words of the project's own bookkeeping: which issue asked for what, which target was met.
#: They belong in ``benchmarks/results/``, which the pages link to.
BOOKKEEPING = re.compile(r"\bissue \d+|\bissue's\b|— (?:met|missed)\b", re.IGNORECASE)


def test_pages_speak_to_users(html):
    """The user pages show results, not the project's bookkeeping (targets met or missed, issue
    numbers)."""
    found = []
    for page in site_pages(html):
        text = re.sub(r"<[^>]+>", " ", (html / page).read_text(encoding="utf-8"))
        found += [f"{page}: ...{text[max(m.start() - 40, 0):m.end() + 20]!r}..."
                  for m in BOOKKEEPING.finditer(text)]
    assert not found, "bookkeeping on user pages:\n" + "\n".join(found)


def test_no_email_links(html):
    """The docs hold no e-mail address; ``AUPRO@0.3`` is a metric, not a ``mailto:`` link."""
    linked = [f"{page.relative_to(html)}" for page in sorted(html.rglob("*.html"))
              if "mailto:" in page.read_text(encoding="utf-8")]
    assert not linked, f"mailto: links in {linked}"


class _Assets(HTMLParser):
    """The scripts, stylesheets, images and frames a page loads."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "embed") and attrs.get("src"):
            self.urls.append(attrs["src"])
        if tag == "link" and {"stylesheet", "preload", "icon"} & set(
            (attrs.get("rel") or "").split()
        ):
            self.urls.append(attrs.get("href") or "")


REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)


def test_html_loads_nothing_remote(html):
    """A reader offline or behind a firewall sees the same pages: no script, stylesheet, image
    or font comes from another host (MathJax included), in the pages or in their CSS."""
    remote = []
    for page in sorted(html.rglob("*.html")):
        parser = _Assets()
        parser.feed(page.read_text(encoding="utf-8"))
        remote += [f"{page.relative_to(html)}: {url}" for url in parser.urls if REMOTE.match(url)]
    for sheet in sorted((html / "_static").glob("*.css")):
        for url in re.findall(r"(?:@import\s+|url\()\s*['\"]?([^'\")\s]+)", sheet.read_text()):
            if REMOTE.match(url):
                remote.append(f"{sheet.relative_to(html)}: {url}")
    assert not remote, "remote assets in the built HTML:\n" + "\n".join(remote)
    scripts = (html / "concepts" / "protocol.html").read_text(encoding="utf-8")
    assert "_static/mathjax/tex-chtml.js" in scripts, "MathJax is not the bundled copy"
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()


def test_pages_render_in_a_browser(html):
    """Every page, rendered by headless Chromium: math typeset (no raw TeX delimiters left in
    the visible text, no TeX errors), no code block wider than its box (a reader would see it
    cut off), no broken image. Skipped only where no Chromium is installed."""
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium on PATH (install Debian's chromium, or set $CHROMIUM)")
    pages = site_pages(html)
    assert len(pages) > 20
    results = check_site(html, pages, browser)
    assert sorted(results) == pages, "the browser did not report on every page"
    pending = _pending_code()
    problems = [
        f"{page}: {problem}" for page in pages for problem in results[page]
        if not (problem.startswith("code wider") and problem.split(": ", 1)[1][:100] in pending)
    ]
    assert not problems, "what a reader sees wrong:\n" + "\n".join(problems)


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



# -- code lines a reader can see whole and copy --------------------------------------------------

#: The longest code line the pages show: it fits the code blocks of the HTML pages (checked in a
#: browser above) and a terminal.
CODE_WIDTH = 88
_CODE_DIRECTIVE = re.compile(
    r"^(\s*)\.\. (code-block|code|sourcecode|testcode|testoutput|doctest|testsetup|"
    r"plot|highlight|parsed-literal)::"
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _code_blocks(lines: list[str]) -> list[tuple[int, list[str]]]:
    """``(index of the first line, lines)`` of each code block of reStructuredText ``lines``:
    code directives (their options skipped), ``::`` literal blocks and ``>>>`` doctest blocks
    (as in a docstring), each dedented as the page shows it."""
    blocks, i = [], 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith(">>>"):
            start, indent = i, _indent(lines[i])
            while i < len(lines) and lines[i].strip():
                i += 1
            blocks.append((start, [text[indent:] for text in lines[start:i]]))
            continue
        directive = _CODE_DIRECTIVE.match(lines[i])
        if not directive and not (stripped.endswith("::") and not stripped.startswith("..")):
            i += 1
            continue
        indent = _indent(lines[i])
        i += 1
        if directive:  # ":option: value" lines up to the first blank line
            while i < len(lines) and lines[i].lstrip().startswith(":") and (
                _indent(lines[i]) > indent
            ):
                i += 1
        start = i
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
            i += 1
        body = lines[start:i]
        if any(text.strip() for text in body):
            base = min(_indent(text) for text in body if text.strip())
            blocks.append((start, [text[base:] for text in body]))
    return blocks


def _docstrings(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of every docstring of a Python file."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            first = body[0] if body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                    isinstance(first.value.value, str):
                found.append((first.lineno, first.value.value))
    return found


#: Sections being rewritten by their own authors at the moment, exempt from the line-length
#: check from the first line containing the marker to the end of the page. Remove an entry once
#: its section keeps to 88 characters.
PENDING: dict[str, str] = {}


def _pending_code() -> str:
    """The code of the ``PENDING`` sections, whitespace collapsed as the browser check reports
    it (those sections' overflowing blocks are left to their authors too)."""
    text = []
    for page, marker in PENDING.items():
        lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
        start = next((k for k, line in enumerate(lines) if marker in line), len(lines))
        text += [" ".join(line.split()) for line in lines[start:]]
    return "\n".join(text)


def _long_code_lines(width: int = CODE_WIDTH) -> list[str]:
    long = []
    for page in sorted(DOCS.rglob("*.rst")):
        if "_build" in page.parts:
            continue
        lines = page.read_text(encoding="utf-8").splitlines()
        marker = PENDING.get(str(page.relative_to(ROOT)))
        if marker is not None:
            lines = lines[:next((k for k, line in enumerate(lines) if marker in line), None)]
        for start, block in _code_blocks(lines):
            long += [f"{page.relative_to(ROOT)}:{start + 1 + k}: {text}"
                     for k, text in enumerate(block) if len(text) > width]
    for source in sorted((ROOT / "autoflow").rglob("*.py")):
        for lineno, doc in _docstrings(source):
            for start, block in _code_blocks(doc.splitlines()):
                long += [f"{source.relative_to(ROOT)}:{lineno + start + k}: {text}"
                         for k, text in enumerate(block) if len(text) > width]
    return long


def test_code_lines_fit():
    """Code in the pages and in the docstrings of ``autoflow`` (which the API pages show) keeps
    to 88 characters a line, so a reader sees it whole without scrolling."""
    long = _long_code_lines()
    assert not long, f"code lines over {CODE_WIDTH} characters:\n" + "\n".join(long)


# -- docstring examples a reader can paste ------------------------------------------------------


def _library_modules() -> list[types.ModuleType]:
    import pkgutil

    names = ["autoflow"] + [
        info.name for info in pkgutil.walk_packages(autoflow.__path__, "autoflow.")
    ]
    return [importlib.import_module(name) for name in sorted(names)]


def test_docstring_examples_run_when_pasted():
    """Every ``>>>`` example of ``autoflow`` runs in a fresh interpreter namespace, as when a
    reader pastes it: it imports what it uses and names library objects as ``autoflow.X``
    (``pytest --doctest-modules`` runs the same examples with their module's globals, which
    would hide a missing import)."""
    import doctest

    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failed, seen = [], set()
    for module in _library_modules():
        for test in finder.find(module, module.__name__, globs={}):
            if not test.examples or test.name in seen:
                continue
            seen.add(test.name)
            test.globs = {"__name__": "__main__"}
            result = runner.run(test, out=lambda text: failed.append(text), clear_globs=True)
            if result.failed:
                failed.append(f"^^^ {test.name}")
    assert seen, "no docstring examples found"
    assert not failed, "".join(failed)
