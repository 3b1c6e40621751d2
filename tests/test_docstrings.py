"""The Examples sections of the public API run (on the bundled data) and print what they say."""

from __future__ import annotations

import doctest
import importlib
import warnings

import pytest

MODULES = [
    "ptrag_sc.tl._evaluate",
    "ptrag_sc.tl._summarize",
    "ptrag_sc.tl._cell_eval",
    "ptrag_sc.tl._baselines",
    "ptrag_sc.tl._screen",
    "ptrag_sc.model._ptrag",
    "ptrag_sc.datasets._synthetic",
    "ptrag_sc.datasets._perturbench",
    "ptrag_sc.datasets._papalexi",
    "ptrag_sc.datasets._replogle",
    "ptrag_sc.pp._embeddings",
    "ptrag_sc.pp._gene_text",
    "ptrag_sc._symbols",
    "ptrag_sc.pp._split",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
