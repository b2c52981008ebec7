"""Sphinx configuration for the cpuattn documentation.

Build the site (warnings are errors) and run the examples in the pages as doctests::

    pip install ".[docs]"
    python -m sphinx -W -b html docs docs/_build/html
    python -m sphinx -W -b doctest docs docs/_build/doctest

Nothing is fetched at build time (no intersphinx, no remote assets).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_VERSION = re.search(
    r'__version__\s*=\s*"([^"]+)"', (ROOT / "python" / "cpuattn" / "_version.py").read_text()
).group(1)

try:
    import cpuattn
except ImportError:  # not installed: document the source tree (NumPy backend only)
    sys.path.insert(0, str(ROOT / "python"))
    import cpuattn

# One version for the package, its wheel and these pages: python/cpuattn/_version.py.
if cpuattn.__version__ != SOURCE_VERSION:
    raise RuntimeError(
        f"the installed cpuattn is {cpuattn.__version__}, this checkout is {SOURCE_VERSION}: "
        'reinstall it (pip install ".[docs]") before building the docs'
    )

project = "cpuattn"
author = "the cpuattn authors"
copyright = "the cpuattn authors"
version = release = cpuattn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "numpydoc",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"
default_role = "code"  # `x` is inline code, as in the docstrings' Markdown habit

# autodoc / autosummary: the API page lists each public name itself (no generated stub files).
autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings state types and shapes in words

# numpydoc: the docstrings are numpydoc-style. Class members are documented with :members:.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# Doctests (python -m sphinx -b doctest docs ...): every page's examples run with small
# random arrays; matplotlib draws off-screen.
doctest_global_setup = """
import matplotlib
matplotlib.use("Agg")
try:
    import torch
except ImportError:
    torch = None
"""
# cpuattn.torch needs torch to import: without it (a docs build with no torch installed) its
# page documents the module from stand-ins.
try:
    import torch  # noqa: F401
except ImportError:
    autodoc_mock_imports = ["torch"]
doctest_test_doctest_blocks = "default"

html_theme = "pydata_sphinx_theme"
html_title = f"cpuattn {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "navbar_align": "left",
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version", "theme-version"],
}
html_sidebars = {"index": [], "getting_started": [], "installation": []}
html_show_sourcelink = False
