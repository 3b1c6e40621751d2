"""Gene annotations (GO terms) as a second view of a perturbation, beside its text embedding."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._symbols import gene_table, resolve_gene_symbols

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence


@lru_cache(maxsize=1)
def _shipped_go() -> pd.Series:
    table = gene_table()
    return table["go"].fillna("").astype(str)


class GeneAnnotations:
    """Binary gene x term annotations, looked up through gene aliases.

    Parameters
    ----------
    terms
        Series indexed by gene symbol holding whitespace-separated term ids (the default is the
        package's GO annotations from Bioconductor org.Hs.eg.db 3.16: direct BP/MF/CC terms of
        every human gene).
    """

    def __init__(self, terms: pd.Series | None = None) -> None:
        self.terms = _shipped_go() if terms is None else terms
        self._index = pd.Index(self.terms.index.astype(str).str.upper())
        self._resolved: dict[str, list[str]] = {}

    def _terms_of(self, genes: Iterable[str]) -> dict[str, list[str]]:
        """Terms of each gene (through its aliases, resolved in one call for the new ones)."""
        new = sorted({g for g in genes if g not in self._resolved})
        unknown = [g for g in new if g not in self._index]
        mapping = resolve_gene_symbols(unknown, self._index, warn=False).mapping if unknown else {}
        for gene in new:
            symbol = gene if gene in self._index else mapping.get(gene)
            terms = [] if symbol is None else self.terms.iloc[self._index.get_loc(symbol)].split()
            self._resolved[gene] = terms
        return self._resolved

    def matrix(
        self,
        labels: Sequence[str] | np.ndarray,
        *,
        sep: str = "+",
        vocabulary: np.ndarray | None = None,
    ) -> tuple[sp.csr_matrix, np.ndarray]:
        """Binary ``(n, T)`` matrix of the terms of each label (a combination: union of its
        genes').

        Returns the matrix and the term vocabulary (``vocabulary`` when given: terms outside it
        are dropped, so queries are coded like the memory).
        """
        members = [
            [m.strip() for m in str(label).upper().split(sep) if m.strip()] for label in labels
        ]
        terms = self._terms_of(m for genes in members for m in genes)
        sets = [sorted({t for m in genes for t in terms[m]}) for genes in members]
        if vocabulary is None:
            vocabulary = np.array(sorted({t for s in sets for t in s}), dtype=str)
        position = {t: i for i, t in enumerate(vocabulary)}
        rows, cols = [], []
        for i, s in enumerate(sets):
            hit = [position[t] for t in s if t in position]
            rows.extend([i] * len(hit))
            cols.extend(hit)
        data = np.ones(len(rows), dtype=np.float32)
        return sp.csr_matrix(
            (data, (rows, cols)), shape=(len(members), len(vocabulary))
        ), np.asarray(vocabulary, dtype=str)


def jaccard(a: sp.csr_matrix, b: sp.csr_matrix) -> np.ndarray:
    """Jaccard similarity of the binary rows of ``a`` and ``b``, dense ``(len(a), len(b))``."""
    inter = np.asarray((a @ b.T).todense(), dtype=np.float64)
    size_a = np.asarray(a.sum(axis=1), dtype=np.float64)
    size_b = np.asarray(b.sum(axis=1), dtype=np.float64).T
    union = size_a + size_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0).astype(np.float32)
