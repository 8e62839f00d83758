"""Sphinx configuration of the autoflow documentation.

Build with ``python -m sphinx -W -b html docs docs/_build/html``; run the tutorials' code with
``python -m sphinx -W -b doctest docs docs/_build/doctest``. Nothing is fetched at build time
(no intersphinx).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# The package and the examples are imported from the working tree, installed or not.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))
# Keep torch to the cores the build is given; tutorials train tiny models in seconds.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import autoflow  # noqa: E402

project = "autoflow"
author = "the autoflow authors"
copyright = "the autoflow authors"
release = version = autoflow.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "matplotlib.sphinxext.plot_directive",
    "markdown_table",
    "autoflow_refs",
]

exclude_patterns = ["_build", "_ext"]
templates_path: list[str] = []
root_doc = "index"
language = "en"

# -- HTML ----------------------------------------------------------------------------------------
html_theme = "alabaster"
html_static_path = ["_static"]
html_title = f"autoflow {release}"
html_theme_options = {
    "description": "Invertible networks for PyTorch",
    "fixed_sidebar": True,
    # Wide enough for 88-character code lines (see _static/custom.css).
    "page_width": "1180px",
    "body_max_width": "none",
    "sidebar_width": "240px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}
html_show_sourcelink = False

# -- autodoc and napoleon (Google style) ---------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
autodoc_typehints = "signature"
# Show the library's aliases by name instead of their expansion (Tensor | tuple[Tensor, ...]).
autodoc_type_aliases = {"State": "autoflow.base.State", "Shape": "autoflow.base.Shape"}
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# ``Attributes:`` as fields: dataclass fields are also documented as members, and two
# ``.. attribute::`` entries for one name would be a duplicate description.
napoleon_use_ivar = True

# -- doctest -------------------------------------------------------------------------------------
# Only explicit ``.. testcode::`` / ``.. doctest::`` blocks run here. The ``>>>`` examples in
# docstrings run under ``pytest --doctest-modules`` with their module's globals.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import torch
torch.manual_seed(0)
torch.set_num_threads(2)
"""

# -- plots (matplotlib's plot directive: the code runs when the HTML is built) ------------------
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]

# -- math ----------------------------------------------------------------------------------------
# MathJax ships with the build (the ``sphinx-mathjax-offline`` package copies MathJax 3 into
# ``_static/mathjax`` and points ``mathjax_path`` there): pages render math with no network.
