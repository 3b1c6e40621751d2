"""What stage 1 ranks memory entries by: the gene-embedding cosine, or another prior (the
``similarity`` option; docs/screen.md describes the choices and the fallback to the cosine)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._perturbations import label_members

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._annotations import GeneAnnotations
    from ._memory import RetrievalMemory

Similarity = Literal["embedding", "go", "response"]
#: The named choices of ``similarity``; a DataFrame is the fourth.
SIMILARITIES: tuple[str, ...] = ("embedding", "go", "response")
#: Ranking offset that puts the entries a prior covers before those it does not (cosines are <= 1).
_COVERED = 2.0
#: Ranking offset that puts the query's own perturbation (in other cell types) first.
_SAME = 1e6
#: Weight of the embedding cosine as a tie-breaker (relative to the prior's range in a row).
_TIE = 1e-6


def _canonical(names: Iterable[object], what: str) -> pd.Index:
    index = pd.Index([str(v).strip().upper() for v in names])
    if index.has_duplicates:
        dup = index[index.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"The `similarity` table's {what} hold duplicated genes after upper-casing, e.g. "
            f"{dup}; keep one row / column per gene."
        )
    if (index == "").any():
        raise ValueError(f"The `similarity` table's {what} hold an empty gene name.")
    return index


def validate_similarity_table(table: pd.DataFrame) -> pd.DataFrame:
    """Check a user-supplied gene x gene similarity (query genes x candidate genes, finite
    numbers, larger = more similar) and return it with canonical (upper-case) gene names.

    Raises
    ------
    TypeError
        If ``table`` is not a DataFrame.
    ValueError
        If it is empty, a gene appears twice (after upper-casing), or a value is not a finite
        number.
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(
            "`similarity` must be 'embedding', 'go', 'response' or a pandas DataFrame (query "
            f"genes as the index, candidate genes as the columns), got {type(table).__name__}."
        )
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(
            f"The `similarity` table is empty (shape {table.shape}); give genes as its index and "
            "columns."
        )
    index = _canonical(table.index, "index (query genes)")
    columns = _canonical(table.columns, "columns (candidate genes)")
    non_numeric = [
        c
        for c in table.columns
        if not pd.api.types.is_numeric_dtype(table[c]) or pd.api.types.is_bool_dtype(table[c])
    ]
    if non_numeric:
        raise ValueError(
            f"The `similarity` table has non-numeric column(s) {list(map(str, non_numeric[:5]))}; "
            "values must be numbers."
        )
    values = table.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(
            f"The `similarity` table holds {int(bad.sum())} NaN or infinite value(s), e.g. at "
            f"({table.index[r]!r}, {table.columns[c]!r}); fill pairs the prior says nothing about "
            "with a number (e.g. 0) or leave the gene out (genes absent from the table fall back "
            "to the embedding)."
        )
    return pd.DataFrame(values, index=index, columns=columns)


def describe(similarity: str | pd.DataFrame) -> str:
    """A short name of a ``similarity`` option (for summaries)."""
    if isinstance(similarity, pd.DataFrame):
        return f"table {similarity.shape[0]}x{similarity.shape[1]}"
    return str(similarity)


class StageOneSimilarity:
    """A stage-1 prior other than the embedding cosine: subclasses implement :meth:`bind` and
    :meth:`values`; :meth:`scores` ranks by them, falling back to the cosine."""

    def bind(self, memory: RetrievalMemory) -> StageOneSimilarity:
        """A copy of this similarity with what ``memory`` needs precomputed."""
        raise NotImplementedError

    def values(self, perturbations: np.ndarray, cell_types: np.ndarray) -> np.ndarray:
        """``(n, M)`` float64 prior similarity of each query to each entry, NaN where undefined."""
        raise NotImplementedError

    def scores(
        self,
        perturbations: np.ndarray,
        cell_types: np.ndarray,
        cosine: np.ndarray,
        same_perturbation: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``(n, M)`` float32 similarity stage 1 reports and the float64 ranking it sorts
        by, from the queries' embedding ``cosine`` to each entry and whether the entry is the
        query's perturbation."""
        cosine = np.asarray(cosine, dtype=np.float64)
        prior = self.values(perturbations, cell_types)
        covered = np.isfinite(prior)
        row_covered = covered.any(axis=1, keepdims=True)
        low = np.nanmin(np.where(covered, prior, np.inf), axis=1, keepdims=True)
        high = np.nanmax(np.where(covered, prior, -np.inf), axis=1, keepdims=True)
        spread = np.where(row_covered, np.maximum(high - low, 1e-12), 1.0)
        low = np.where(row_covered, low, 0.0)
        ranked = _COVERED + (prior - low) / spread + _TIE * cosine
        ranking = np.where(covered, ranked, cosine)
        ranking = np.where(row_covered, ranking, cosine) + _SAME * same_perturbation
        similarity = np.where(row_covered, prior, cosine)
        return similarity.astype(np.float32), ranking


class AnnotationSimilarity(StageOneSimilarity):
    """Jaccard similarity of GO annotations (``similarity="go"``)."""

    def __init__(self, annotations: GeneAnnotations, *, sep: str = "+") -> None:
        self.annotations = annotations
        self.sep = sep
        self._entries: sp.csr_matrix | None = None
        self._terms: np.ndarray | None = None

    def bind(self, memory: RetrievalMemory) -> AnnotationSimilarity:
        bound = AnnotationSimilarity(self.annotations, sep=self.sep)
        labels, inverse = np.unique(memory.perturbations.astype(str), return_inverse=True)
        matrix, terms = self.annotations.matrix(labels, sep=self.sep)
        bound._entries = matrix[inverse.ravel()].tocsr()
        bound._terms = terms
        return bound

    def values(self, perturbations: np.ndarray, cell_types: np.ndarray) -> np.ndarray:
        labels = np.asarray(perturbations).astype(str)
        uniques, inverse = np.unique(labels, return_inverse=True)
        inter_matrix, _ = self.annotations.matrix(uniques, sep=self.sep, vocabulary=self._terms)
        own, _ = self.annotations.matrix(uniques, sep=self.sep)
        query_size = np.asarray(own.sum(axis=1), dtype=np.float64)
        entry_size = np.asarray(self._entries.sum(axis=1), dtype=np.float64).T
        inter = np.asarray((inter_matrix @ self._entries.T).todense(), dtype=np.float64)
        union = query_size + entry_size - inter
        out = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        defined = (query_size > 0) & (entry_size > 0)
        return np.where(defined, out, np.nan)[inverse.ravel()]


class ResponseSimilarity(StageOneSimilarity):
    """Measured-response similarity in other cell types (``similarity="response"``)."""

    def __init__(self) -> None:
        self._unit: np.ndarray | None = None

    def bind(self, memory: RetrievalMemory) -> ResponseSimilarity:
        if memory.kind != "response" or memory.responses is None:
            raise ValueError(
                "`similarity='response'` needs a response memory (`memory='response'`)."
            )
        bound = ResponseSimilarity()
        specific = memory.specific.astype(np.float64)
        bound._specific = specific
        bound._unit = specific / np.maximum(np.linalg.norm(specific, axis=1, keepdims=True), 1e-12)
        bound._pert = memory.perturbations.astype(str)
        bound._ct = memory.cell_types.astype(str)
        order = np.argsort(bound._pert, kind="stable")
        labels, starts = np.unique(bound._pert[order], return_index=True)
        bound._entries_of = dict(zip(labels, np.split(order, starts[1:]), strict=True))
        return bound

    def values(self, perturbations: np.ndarray, cell_types: np.ndarray) -> np.ndarray:
        perturbations = np.asarray(perturbations).astype(str)
        cell_types = np.asarray(cell_types).astype(str)
        # Each query's profile: the mean of its specific shifts in the memory's other cell types.
        keys = pd.MultiIndex.from_arrays([perturbations, cell_types])
        codes, uniques = pd.factorize(keys)
        q_pert = np.asarray(uniques.get_level_values(0)).astype(str)
        q_ct = np.asarray(uniques.get_level_values(1)).astype(str)
        rows, cols = [], []
        for i, (p, c) in enumerate(zip(q_pert, q_ct, strict=True)):  # one step per distinct query
            entries = self._entries_of.get(p)
            if entries is None:
                continue
            entries = entries[self._ct[entries] != c]
            rows.extend([i] * entries.size)
            cols.extend(entries.tolist())
        n_q, n_m = len(q_pert), len(self._pert)
        weights = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_q, n_m))
        counts = np.asarray(weights.sum(axis=1)).ravel()
        profile = np.asarray(weights @ self._specific) / np.maximum(counts, 1)[:, None]
        norm = np.linalg.norm(profile, axis=1, keepdims=True)
        has = (counts > 0) & (norm.ravel() > 1e-12)
        cos = (profile / np.maximum(norm, 1e-12)) @ self._unit.T
        out = np.where(has[:, None], cos, np.nan)
        return out[codes]


class TableSimilarity(StageOneSimilarity):
    """A user-supplied gene x gene similarity (``similarity=<DataFrame>``)."""

    def __init__(self, table: pd.DataFrame, *, sep: str = "+") -> None:
        self.table = validate_similarity_table(table)
        self.sep = sep
        self._rows = pd.Index(self.table.index)
        self._values = self.table.to_numpy(dtype=np.float64)
        self._entry_map: sp.csr_matrix | None = None
        self._entry_covered: np.ndarray | None = None

    def _combine(self, labels: np.ndarray, index: pd.Index) -> tuple[sp.csr_matrix, np.ndarray]:
        """``(n, len(index))`` averaging map of each label onto ``index`` (itself, else the mean
        of its genes when all are there), and whether it is covered."""
        rows, cols, vals = [], [], []
        covered = np.zeros(len(labels), dtype=bool)
        own = index.get_indexer(pd.Index([str(v).upper() for v in labels]))
        for i, label in enumerate(labels):
            if own[i] >= 0:
                rows.append(i)
                cols.append(own[i])
                vals.append(1.0)
                covered[i] = True
                continue
            members = label_members(label, self.sep)
            where = index.get_indexer(members) if members else np.array([-1])
            if members and np.all(where >= 0):
                rows.extend([i] * len(where))
                cols.extend(where.tolist())
                vals.extend([1.0 / len(where)] * len(where))
                covered[i] = True
        return sp.csr_matrix((vals, (rows, cols)), shape=(len(labels), len(index))), covered

    def bind(self, memory: RetrievalMemory) -> TableSimilarity:
        bound = TableSimilarity.__new__(TableSimilarity)
        bound.__dict__.update(self.__dict__)
        mapping, covered = self._combine(
            memory.perturbations.astype(str), pd.Index(self.table.columns)
        )
        bound._entry_map = mapping.T.tocsr()  # (n_columns, M)
        bound._entry_covered = covered
        return bound

    def values(self, perturbations: np.ndarray, cell_types: np.ndarray) -> np.ndarray:
        labels = np.asarray(perturbations).astype(str)
        uniques, inverse = np.unique(labels, return_inverse=True)
        query_map, covered = self._combine(uniques, self._rows)
        rows = np.asarray(query_map @ self._values)  # (u, n_columns)
        out = np.asarray((self._entry_map.T @ rows.T).T, dtype=np.float64)
        out = np.where(covered[:, None] & self._entry_covered[None, :], out, np.nan)
        return out[inverse.ravel()]


def make_similarity(
    option: str | pd.DataFrame, *, annotations: GeneAnnotations | None = None, sep: str = "+"
) -> StageOneSimilarity | None:
    """The stage-1 prior of a ``similarity`` option (``None`` for the embedding cosine).

    Parameters
    ----------
    option
        ``"embedding"``, ``"go"``, ``"response"`` or a gene x gene DataFrame.
    annotations
        GO annotations for ``"go"`` (default: the shipped ones).
    sep
        Separator of combination labels.
    """
    if isinstance(option, pd.DataFrame):
        return TableSimilarity(option, sep=sep)
    if option == "embedding":
        return None
    if option == "go":
        if annotations is None:
            from ._annotations import GeneAnnotations

            annotations = GeneAnnotations()
        return AnnotationSimilarity(annotations, sep=sep)
    if option == "response":
        return ResponseSimilarity()
    raise ValueError(
        f"`similarity` must be one of {list(SIMILARITIES)} or a pandas DataFrame (query genes x "
        f"candidate genes), got {option!r}."
    )
