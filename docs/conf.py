"""Sphinx configuration of the sparse_tconv documentation.

Build (CI runs exactly this, warnings are errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

Everything here works offline, when building and when reading: no
intersphinx, no remote images, and the math renderer (MathJax, from the
``sphinx-mathjax-offline`` package of the ``docs`` extra) is copied into the
build's ``_static/mathjax`` instead of being loaded from a CDN.
``python tests/test_docs.py --expect-math HTML_DIR`` checks a build for that
(CI runs it).  No ``-j``: sphinx-mathjax-offline does not declare itself
parallel-safe, which -W would turn into an error.
"""

import inspect
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
    # MathJax 3's files, copied into _static/mathjax; sets mathjax_path to them.
    "sphinx-mathjax-offline",
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
    # Show the left "Section Navigation" only where a section has sub-pages
    # (the API reference); on one-level pages it would be an empty column
    # taking a quarter of the width from the text and the code.
    "sidebar_includehidden": False,
}
html_static_path = ["_static"]
html_css_files = ["layout.css"]
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


def _constructor_signature(app, what, name, obj, options, signature, return_annotation):
    """The ``__init__`` signature of a LinearOperator subclass.

    autodoc reads a class's signature from ``__new__`` before ``__init__``
    whenever ``__new__`` is user-defined, and scipy's ``LinearOperator``
    defines ``__new__(cls, *args, **kwargs)``: every operator page would show
    ``(*args, **kwargs)``.  ``inspect.signature`` resolves the class as
    Python does (the ``__init__`` of the subclass).
    """
    from scipy.sparse.linalg import LinearOperator

    if what != "class" or not (isinstance(obj, type) and issubclass(obj, LinearOperator)):
        return None
    if obj.__init__ is LinearOperator.__init__:
        return None
    from sphinx.util.inspect import stringify_signature

    sig = stringify_signature(
        inspect.signature(obj), show_annotation=False, show_return_annotation=False
    )
    return sig, return_annotation


def setup(app):
    app.connect("builder-inited", _check_api_page)
    app.connect("autodoc-process-signature", _constructor_signature)
