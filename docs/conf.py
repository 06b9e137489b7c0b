"""Sphinx configuration of the sparse_tconv documentation.

Build (CI runs exactly this, warnings are errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

Everything here works offline: no intersphinx, no remote images.
"""

import os
import re
import sys

# The package is normally installed (editable); the path makes a plain
# checkout work too.
sys.path.insert(0, os.path.abspath(".."))

import sparse_tconv  # noqa: E402

project = "sparse_tconv"
author = "the sparse_tconv developers"
copyright = "the sparse_tconv developers"
release = sparse_tconv.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "matplotlib.sphinxext.plot_directive",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "conftest.py"]

# -- MyST -------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# -- API reference ------------------------------------------------------------
autosummary_generate = True
autodoc_typehints = "none"  # the numpydoc Parameters sections carry the types
autodoc_default_options = {"member-order": "bysource"}
# numpydoc would list the class members a second time next to autosummary's.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- Figures from the project's own code ----------------------------------------
plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]
plot_pre_code = "import numpy as np\nimport matplotlib.pyplot as plt\n"
plot_rcparams = {"figure.autolayout": True, "font.size": 10}

# -- HTML -----------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"sparse_tconv {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_show_sourcelink = False


# -- Keep the API page in step with the package ---------------------------------
# Public names whose reference entries are being written alongside their
# modules; remove each one from this set when api.md lists it.
_API_PENDING: set[str] = set()


def _check_api_page(app):
    """Warn (an error under -W) when api.md misses a name of ``__all__``."""
    with open(os.path.join(app.srcdir, "api.md"), encoding="utf-8") as f:
        listed = set(re.findall(r"^\s+(\w+)\s*$", f.read(), flags=re.MULTILINE))
    missing = [
        name for name in sparse_tconv.__all__ if name not in listed | _API_PENDING
    ]
    if missing:
        from sphinx.util import logging

        logging.getLogger(__name__).warning(
            "api.md does not list these public names of sparse_tconv.__all__: %s",
            ", ".join(missing),
        )


def setup(app):
    app.connect("builder-inited", _check_api_page)
