"""Sphinx configuration of the ptrag_sc documentation (scverse style: myst-nb + book theme).

Build locally with ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors).
Notebooks are rendered from their committed outputs (``nb_execution_mode = "off"``); they are
executed by ``tests/test_tutorials.py`` instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from datetime import date
from importlib.metadata import version as _version
from pathlib import Path

# sphinx-autodoc-typehints 3.x calls an API that Sphinx 9 deprecates; not our concern here.
warnings.filterwarnings("ignore", message=".*set_application.*is deprecated")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # a checkout builds without installing the package

# -- Tutorials ---------------------------------------------------------------------------------
# The notebooks live in <repo>/tutorials (executed by the tests); Sphinx only reads files under
# docs/, so copy them to docs/tutorials (ignored by git) before the build, keeping timestamps so
# that unchanged notebooks are not re-read.
_TUTORIALS_SRC, _TUTORIALS_DST = ROOT / "tutorials", HERE / "tutorials"
_TUTORIALS_DST.mkdir(exist_ok=True)
for _stale in _TUTORIALS_DST.glob("*.ipynb"):
    if not (_TUTORIALS_SRC / _stale.name).exists():
        _stale.unlink()
for _nb in sorted(_TUTORIALS_SRC.glob("*.ipynb")):
    _target = _TUTORIALS_DST / _nb.name
    if not _target.exists() or _target.stat().st_mtime != _nb.stat().st_mtime:
        shutil.copy2(_nb, _target)

# -- Project information -----------------------------------------------------------------------
project = "ptrag_sc"
author = "ptrag_sc developers"
copyright = f"{date.today():%Y}, {author}"
try:
    release = _version("ptrag-sc")
except Exception:  # not installed: read it from the source tree
    release = "0.1.0"
version = release

# -- General configuration ---------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
    "sphinx_copybutton",
]
# Intersphinx needs the network; Read the Docs has it, offline builds do not (a failed inventory
# download is a warning, i.e. an error under -W). Set PTRAG_DOCS_INTERSPHINX=1 to force it on.
if os.environ.get("READTHEDOCS") or os.environ.get("PTRAG_DOCS_INTERSPHINX"):
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
        "matplotlib": ("https://matplotlib.org/stable/", None),
    }

templates_path = ["_templates"]
exclude_patterns = ["_build", "_scripts", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
# ".rst" first: autosummary writes its generated stubs with the first suffix.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
default_role = "literal"
nitpicky = False

# autodoc / autosummary / napoleon (numpydoc-style docstrings)
autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_default_options = {"inherited-members": False, "show-inheritance": False}
autoclass_content = "class"
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = False  # free-text Returns read as "Returns:", not "Return type:"
napoleon_use_param = True
napoleon_use_ivar = True  # "Attributes" sections as fields, not duplicate attribute entries
napoleon_custom_sections = [("Fields written", "params_style")]
typehints_defaults = "braces"
always_document_param_types = False
typehints_document_rtype = True

# MyST / myst-nb
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "amsmath", "html_image"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # render the committed outputs; tests/test_tutorials.py executes them
nb_output_stderr = "show"  # intended warnings are part of the tutorials
nb_merge_streams = True
suppress_warnings = [
    "myst.header",  # notebooks start at level-1 headings and use level 3 under level 1
    "mystnb.unknown_mime_type",  # widget / rich outputs that have a text fallback
]

# -- HTML output -------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "ptrag_sc"
html_static_path = ["_static"]
html_theme_options = {
    "repository_url": "https://github.com/ptrag-sc/ptrag_sc",
    "repository_branch": "main",
    "path_to_docs": "docs/",
    "use_repository_button": True,
    "use_issues_button": True,
    "use_download_button": True,
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_show_sourcelink = False
pygments_style = "default"
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

# -- Which members of PTRAG to document ---------------------------------------------------------
# PTRAG inherits many scvi-tools methods that do not apply to it (e.g. get_normalized_expression);
# document its own members plus the inherited ones users need.
_INHERITED_KEPT = {
    "save",
    "load",
    "history",
    "is_trained",
    "adata",
    "device",
    "to_device",
    "view_anndata_setup",
    "summary_string",
}


def _defining_module(obj) -> str:
    target = obj.fget if isinstance(obj, property) else obj
    target = getattr(target, "__func__", target)
    return getattr(target, "__module__", "") or ""


def _skip_member(app, what, name, obj, skip, options):
    # `what` is the parent's type for autodoc and the member's type for autosummary.
    if what not in ("class", "method", "attribute", "property", "classmethod", "staticmethod"):
        return None
    if name.endswith("_") and not name.startswith("_"):  # scvi-tools' saved attributes
        return True
    if _defining_module(obj).startswith("scvi") and name not in _INHERITED_KEPT:
        return True
    return None


def _is_header(lines: list[str], i: int) -> bool:
    return (
        i + 1 < len(lines)
        and lines[i].strip() != ""
        and set(lines[i + 1].strip()) == {"-"}
        and len(lines[i + 1].strip()) >= 3
    )


def _join_free_text_returns(app, what, name, obj, options, lines):
    """Keep a free-text *Returns* paragraph on one line before napoleon reads it.

    numpydoc reads every unindented line of *Returns* as a type, so a paragraph whose inline
    literal spans two lines would be cut in the middle of the literal. Consecutive unindented
    lines (not "name : type" lines, not followed by an indented description) are joined.
    """
    i = 0
    while i < len(lines):
        if lines[i].strip() in ("Returns", "Yields") and _is_header(lines, i):
            j = i + 2
            while j + 1 < len(lines) and not _is_header(lines, j):
                line, nxt = lines[j], lines[j + 1]
                joinable = (
                    line.strip()
                    and nxt.strip()
                    and not line[0].isspace()
                    and not nxt[0].isspace()
                    and " : " not in line
                    and not _is_header(lines, j + 1)
                )
                if joinable:
                    lines[j] = f"{line.rstrip()} {lines.pop(j + 1).strip()}"
                else:
                    j += 1
            i = j
        i += 1


def setup(app):
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("autodoc-process-docstring", _join_free_text_returns, priority=100)
