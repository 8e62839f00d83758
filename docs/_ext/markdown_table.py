"""``.. markdown-include:: path``: render a small markdown file (the benchmark results) in place.

Supports what ``benchmarks/results/*.md`` use: ``#`` headings (shown as rubrics), paragraphs,
``-``/``*`` bullet lists, fenced code blocks and pipe tables (rendered as real tables), with
inline ``code`` and ``**bold**``. The file is read at build time, so the page always shows the
numbers the benchmark last wrote; a missing file is a build error, not an empty section.

``:skip: Targets, Reading`` leaves out the parts of the file that are the project's own
bookkeeping rather than results: a heading starting with one of the words, up to the next
heading, or a ``Word ...:`` line with the bullet list after it. ``:link:`` adds a line linking
the whole file (copied into the built site, so the link works offline).
"""

from __future__ import annotations

import re
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def _inline(text: str) -> str:
    """Markdown inline markup to reStructuredText: `code` becomes ``code``."""
    return _CODE.sub(lambda m: f"``{m.group(1)}``", text)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _is_heading(line: str) -> bool:
    return line.lstrip().startswith("#")


def drop_sections(text: str, prefixes: list[str]) -> str:
    """``text`` without the headed sections and labelled lists whose title starts with one of
    ``prefixes`` (see the module docstring)."""
    out: list[str] = []
    skipping = None  # None, "heading" (until the next heading) or "list" (until a non-bullet)
    for line in text.splitlines():
        stripped = line.strip()
        title = stripped.lstrip("#").strip()
        starts = any(title.startswith(p) for p in prefixes) and (
            _is_heading(stripped) or (stripped.endswith(":") and not stripped.startswith("|"))
        )
        if starts:
            skipping = "heading" if _is_heading(stripped) else "list"
            continue
        if skipping == "heading" and _is_heading(stripped):
            skipping = None
        elif skipping == "list" and stripped and not re.match(r"[-*] ", stripped) and (
            not line.startswith((" ", "\t"))  # a continuation line of a bullet stays skipped
        ):
            skipping = None
        if skipping is None:
            out.append(line)
    return "\n".join(out)


def markdown_to_rst(text: str, *, skip_title: bool) -> list[str]:
    """Convert the supported markdown subset to reStructuredText lines."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    first_heading = True
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                block.append(lines[i])
                i += 1
            out += ["", ".. code-block:: text", ""] + [f"   {b}" for b in block] + [""]
            i += 1
            continue
        if stripped.startswith("#"):
            title = stripped.lstrip("#").strip()
            if not (skip_title and first_heading):
                out += ["", f".. rubric:: {_inline(title)}", ""]
            first_heading = False
            i += 1
            continue
        if stripped.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            body = [r for r in rows if not all(re.fullmatch(r":?-{3,}:?", c) for c in r)]
            out += ["", ".. list-table::", "   :header-rows: 1", ""]
            for row in body:
                for k, cell in enumerate(row):
                    out.append(f"   {'* -' if k == 0 else '  -'} {_inline(cell) or ' '}")
            out.append("")
            continue
        if re.match(r"[-*] ", stripped):
            out.append(f"* {_inline(stripped[2:])}")
            i += 1
            continue
        out.append(_inline(line))
        i += 1
    return out


class MarkdownInclude(SphinxDirective):
    """Parse a markdown file relative to the current document and insert it."""

    required_arguments = 1
    option_spec = {
        "skip-title": directives.flag,
        "skip": lambda arg: [word.strip() for word in arg.split(",") if word.strip()],
        "link": directives.unchanged,
    }

    def run(self) -> list[nodes.Node]:
        rel, path = self.env.relfn2path(self.arguments[0], self.env.docname)
        path = Path(path)
        if not path.is_file():
            raise self.error(f"markdown-include: file not found: {path}")
        self.env.note_dependency(rel)
        text = drop_sections(path.read_text(encoding="utf-8"), self.options.get("skip", []))
        rst = markdown_to_rst(text, skip_title="skip-title" in self.options)
        if "link" in self.options:
            label = self.options["link"] or "The whole results file"
            rst += ["", f"{label}: :download:`{path.name} <{self.arguments[0]}>`.", ""]
        container = nodes.container()
        self.state.nested_parse(StringList(rst, str(path)), self.content_offset, container)
        return container.children


def setup(app):
    app.add_directive("markdown-include", MarkdownInclude)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
