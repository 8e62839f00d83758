"""Small autodoc adjustments for the autoflow API pages, and plain text for metric names.

Cross-references written against a name's defining module are resolved to the public name;
private base classes are shown as their public ancestor; signatures and shared docstring entries
are tidied (see each function).

Docstrings name objects as ``autoflow.volume_norm.VolumeNorm`` or, inside a module, just
``VolumeNorm``; the API pages document the public objects once, under ``autoflow.VolumeNorm``.
A reference that Sphinx cannot resolve and whose last component names exactly one documented
``autoflow`` object is pointed at that object.
"""

from __future__ import annotations

import re

from docutils import nodes
from sphinx.transforms import SphinxTransform


def _missing_reference(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    context = node.get("py:module") or ""
    if not (target.startswith("autoflow") or context.startswith("autoflow")):
        return None
    domain = env.get_domain("py")
    short = target.rsplit(".", 1)[-1]
    matches = sorted(
        name for name, obj in domain.objects.items()
        if name.startswith("autoflow.") and name.rsplit(".", 1)[-1] == short
        and not obj.aliased
    )
    # Members of a class share short names (forward, inverse): only resolve unique ones.
    if len(matches) != 1:
        return None
    node = node.deepcopy()
    node["reftarget"] = matches[0]
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], matches[0],
                               node, contnode)


def _public_bases(app, name, obj, options, bases):
    """Show a private base class (``_ChannelCoupling``) as its first public ancestor."""
    for i, base in enumerate(bases):
        if isinstance(base, type) and base.__name__.startswith("_"):
            bases[i] = next(c for c in base.__mro__ if not c.__name__.startswith("_"))


_ALIAS = re.compile(
    r"TypeAliasForwardRef\('(?:[\w.]+\.)?(\w+)'\)|\bautoflow\.base\.(State|Shape)\b"
)
# ``(*args: Any, **kwargs: Any)``, the annotation written ``Any`` or ``~typing.Any``.
_CATCH_ALL = re.compile(r"\(\*args(?:: [~\w.]*Any)?, \*\*kwargs(?:: [~\w.]*Any)?\)")
_SHARED_ENTRY = re.compile(r"^(\s+)(\w+(?:, \w+)+): (.*)$")


def _signature(app, what, name, obj, options, signature, return_annotation):
    """Tidy signatures.

    ``nn.Module``'s catch-all ``(*args, **kwargs)`` says nothing, so it becomes ``()``; the
    aliases ``State`` and ``Shape`` are shown by name (autodoc leaves a ``TypeAliasForwardRef``
    inside generic return types).
    """
    if what == "class" and signature and _CATCH_ALL.fullmatch(signature):
        signature = "()"

    def short(text):
        return None if text is None else _ALIAS.sub(lambda m: m.group(1) or m.group(2), text)

    return short(signature), short(return_annotation)


_SECTION = re.compile(r"^(\s*)(Args|Arguments|Attributes|Raises|Keyword Args|Parameters):\s*$")


def _split_shared_entries(app, what, name, obj, options, lines):
    """``a, b: text`` in an ``Args:``/``Attributes:``/``Raises:`` section documents two names;
    napoleon reads it as one name with a type, so give each name its own entry first."""
    expanded, section_indent = [], None
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if line.strip() and section_indent is not None and indent <= section_indent:
            section_indent = None  # the section ended
        header = _SECTION.match(line)
        match = _SHARED_ENTRY.match(line) if section_indent is not None else None
        if header:
            section_indent = len(header.group(1))
        if match:
            entry_indent, names, text = match.groups()
            expanded += [f"{entry_indent}{entry}: {text}" for entry in names.split(", ")]
        else:
            expanded.append(line)
    lines[:] = expanded


class MetricNamesAreNotEmails(SphinxTransform):
    """docutils links any ``name@host`` as an e-mail address, so ``AUPRO@0.3`` became a
    ``mailto:`` link; an address whose host has no letter is no address: show it as text."""

    default_priority = 500

    def apply(self, **kwargs) -> None:
        for ref in list(self.document.findall(nodes.reference)):
            uri = ref.get("refuri", "")
            if uri.startswith("mailto:") and not re.search(r"[a-zA-Z]", uri.rpartition("@")[2]):
                ref.replace_self(nodes.Text(ref.astext()))


def setup(app):
    app.add_transform(MetricNamesAreNotEmails)
    app.connect("missing-reference", _missing_reference)
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("autodoc-process-signature", _signature)
    # Before napoleon (default priority 500) turns the sections into fields.
    app.connect("autodoc-process-docstring", _split_shared_entries, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
