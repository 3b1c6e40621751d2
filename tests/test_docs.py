"""Build the Sphinx documentation with warnings as errors (skipped without Sphinx).

The notebooks are rendered from their committed outputs (``nb_execution_mode = "off"`` in
docs/conf.py), so this takes seconds; ``tests/test_tutorials.py`` executes them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")
pytest.importorskip("sphinx_book_theme")
pytest.importorskip("sphinx_autodoc_typehints")
pytest.importorskip("sphinx_copybutton")

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_docs_build_without_warnings(tmp_path):
    # A fresh copy: the build writes docs/tutorials and docs/generated, which must not race
    # with a developer's own build or leave files in the checkout.
    src = tmp_path / "repo"
    shutil.copytree(
        DOCS, src / "docs", ignore=shutil.ignore_patterns("_build", "generated", "tutorials")
    )
    shutil.copytree(DOCS.parent / "tutorials", src / "tutorials")
    shutil.copy(DOCS.parent / "CHANGELOG.md", src / "CHANGELOG.md")
    out = tmp_path / "html"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-b",
            "html",
            "-q",
            str(src / "docs"),
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    for page in (
        "index",
        "installation",
        "faq",
        "concepts",
        "api",
        "tutorials",
        "benchmark",
        "errors_and_guarantees",
        "changelog",
        "contributing",
    ):
        assert (out / f"{page}.html").exists(), page
    for nb in (DOCS.parent / "tutorials").glob("*.ipynb"):
        html = (out / "tutorials" / f"{nb.stem}.html").read_text(encoding="utf-8")
        assert "<img" in html, f"{nb.name}: no rendered figure"
    api = (out / "api.html").read_text(encoding="utf-8")
    import ptrag_sc

    for module in ("pl", "pp", "tl", "datasets"):
        for name in getattr(ptrag_sc, module).__all__:
            if name.isupper():  # constants are documented with autodata
                continue
            assert f"ptrag_sc.{module}.{name}" in api, f"{module}.{name} missing from api.md"
    assert (out / "generated" / "ptrag_sc.PTRAG.html").exists()
    changelog = (out / "changelog.html").read_text(encoding="utf-8")
    assert "Self-exclusion is per set" in changelog
