"""The evidence sources, one class each, registered by name in :data:`SOURCES`: a new source
is one class here (docs/contributing.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from ._annotations import jaccard

if TYPE_CHECKING:
    from ._memory import RetrievalMemory

#: Neighbours averaged by the neighbour sources.
N_NEIGHBOURS = 5
#: Ridge penalties tried (times the mean squared singular value of the centred features); the
#: one with the lowest leave-one-out error is used.
RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass
class Rows:
    """What the sources read about ``n`` rows (queries, or the memory's entries).

    ``context`` is each row's context response, its own entry left out; ``entry_specific`` the
    memory's ``(M, G)`` specific shifts; ``cosine`` and ``jaccard`` the ``(n, M)`` embedding and
    annotation similarity to every entry; ``allowed`` the entries that may be a row's
    neighbours (never its own perturbation); ``known`` whether the row's cell type has entries;
    ``other`` the entries of the row's perturbation in other cell types.
    """

    memory: RetrievalMemory
    perturbations: np.ndarray
    cell_types: np.ndarray
    embeddings: np.ndarray
    annotations: sp.csr_matrix | None
    context: np.ndarray
    entry_specific: np.ndarray
    cosine: np.ndarray
    jaccard: np.ndarray
    allowed: np.ndarray
    known: np.ndarray
    other: np.ndarray

    @classmethod
    def build(
        cls,
        memory: RetrievalMemory,
        perturbations: np.ndarray,
        cell_types: np.ndarray,
        embeddings: np.ndarray,
        annotations: sp.csr_matrix | None,
        context: np.ndarray,
        specific: np.ndarray | None = None,
    ) -> Rows:
        """Rows of queries, or of the memory's entries with their ``specific`` shifts. A cell
        type without entries takes its neighbours from every cell type."""
        same_ct = cell_types[:, None] == memory.cell_types.astype(str)[None, :]
        known = same_ct.any(axis=1)
        same_perturbation = perturbations[:, None] == memory.perturbations.astype(str)[None, :]
        cosine = unit_rows(np.asarray(embeddings, np.float32)) @ unit_rows(memory.embeddings).T
        terms = memory.annotation_terms
        if annotations is None or terms is None or not len(terms):
            annotations, similarity = None, np.zeros_like(cosine)
        else:
            similarity = jaccard(annotations, memory.annotation_matrix())
        return cls(
            memory=memory,
            perturbations=perturbations,
            cell_types=cell_types,
            embeddings=embeddings,
            annotations=annotations,
            context=context,
            entry_specific=memory.specific if specific is None else specific,
            cosine=cosine,
            jaccard=similarity,
            allowed=np.where(known[:, None], same_ct, True) & ~same_perturbation,
            known=known,
            other=same_perturbation & ~same_ct,
        )

    def annotation_depth(self) -> np.ndarray:
        """``(n,)`` log(1 + number of annotation terms) of each row."""
        if self.annotations is None:
            return np.zeros(len(self.perturbations))
        return np.log1p(np.asarray(self.annotations.sum(axis=1), dtype=np.float64).ravel())

    def zeros(self) -> np.ndarray:
        """``(n, G)`` zeros: the estimate of a source with nothing to say."""
        return np.zeros((len(self.perturbations), self.context.shape[1]), dtype=np.float32)


class EvidenceSource:
    """An estimate of a query's specific shift (its mean shift minus its cell type's context).

    Subclasses set :attr:`name` and :meth:`queries`; one that fits something overrides
    :meth:`entries` as well (what it returns is saved with the model under its name).
    """

    #: The name ``evidence=`` and the saved model know the source by.
    name: str = ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def entries(self, rows: Rows) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(M, G)`` estimates for the memory's entries, each with its own response left
        out, and what was fitted (arrays by name). A source that fits nothing estimates its
        entries as queries (``rows`` never lets an entry see its own response)."""
        return self.queries(rows, {}), {}

    def queries(self, rows: Rows, fitted: dict[str, np.ndarray]) -> np.ndarray:
        """``(n, G)`` estimates for new queries, from what :meth:`entries` fitted."""
        raise NotImplementedError


class LinearEmbedding(EvidenceSource):
    """Ridge map from the gene embedding (Ahlmann-Eltze, Huber and Anders 2025), with exact
    leave-one-out estimates (:func:`ridge_leave_one_out`)."""

    name = "linear_embedding"

    def entries(self, rows: Rows) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        loo, weights, center, alpha = ridge_leave_one_out(
            rows.embeddings, rows.entry_specific, rows.cell_types
        )
        fitted = {"weights": weights, "center": center, "alpha": alpha}
        return loo, _stored(fitted)

    def queries(self, rows: Rows, fitted: dict[str, np.ndarray]) -> np.ndarray:
        return (np.asarray(rows.embeddings, np.float64) - fitted["center"]) @ fitted["weights"]


class LinearAnnotation(EvidenceSource):
    """Ridge map from the gene's annotation terms (GO), through their top principal directions."""

    name = "linear_annotation"

    def entries(self, rows: Rows) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if rows.annotations is None:
            loo, projection = rows.zeros(), np.zeros((0, 0))
            weights, center, alpha = np.zeros((0, rows.context.shape[1])), np.zeros(0), np.nan
        else:
            projection = principal_directions(rows.annotations, n_components=256)
            loo, weights, center, alpha = ridge_leave_one_out(
                np.asarray(rows.annotations @ projection), rows.entry_specific, rows.cell_types
            )
        fitted = {"projection": projection, "weights": weights, "center": center, "alpha": alpha}
        return loo, _stored(fitted)

    def queries(self, rows: Rows, fitted: dict[str, np.ndarray]) -> np.ndarray:
        if rows.annotations is None:
            return rows.zeros()
        features = rows.annotations @ fitted["projection"] - fitted["center"]
        return features @ fitted["weights"]


class Neighbours(EvidenceSource):
    """Mean shift of the :data:`N_NEIGHBOURS` most similar perturbations of the cell type (by
    ``similarity``, a field of :class:`Rows`)."""

    def __init__(self, name: str, similarity: str) -> None:
        self.name, self.similarity = name, similarity

    def queries(self, rows: Rows, fitted: dict[str, np.ndarray]) -> np.ndarray:
        similarity, known = getattr(rows, self.similarity), rows.known[:, None]
        means, has = neighbour_means(similarity, rows.allowed & known, rows.memory.responses)
        estimate = np.where(has[:, None], means - rows.context, 0.0)
        if known.all():
            return estimate
        specific, has_specific = neighbour_means(
            similarity, rows.allowed & ~known, rows.entry_specific
        )
        return np.where(known, estimate, np.where(has_specific[:, None], specific, 0.0))


class OtherCellTypes(EvidenceSource):
    """The perturbation's mean specific shift in the other cell types where it was measured
    (``raw``: its mean shift there, as is, minus the query's context)."""

    def __init__(self, name: str, *, raw: bool) -> None:
        self.name, self.raw = name, raw

    def queries(self, rows: Rows, fitted: dict[str, np.ndarray]) -> np.ndarray:
        counts = rows.other.sum(axis=1)[:, None]
        has = counts > 0
        values = rows.memory.responses if self.raw else rows.entry_specific
        sums = rows.other.astype(np.float32) @ values.astype(np.float32)
        means = np.divide(sums, counts, out=rows.zeros(), where=has)
        return np.where(has, means - rows.context, 0.0) if self.raw else means


def _stored(fitted: dict) -> dict[str, np.ndarray]:
    """Fitted values as saved: float32 arrays, float64 scalars."""
    return {
        k: np.float64(v) if np.ndim(v) == 0 else np.asarray(v, np.float32)
        for k, v in fitted.items()
    }


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def neighbour_means(
    similarity: np.ndarray, allowed: np.ndarray, responses: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(n, G)`` mean of ``responses`` over the :data:`N_NEIGHBOURS` most similar allowed
    entries of each query (zero similarity is never a neighbour; zero without any), and whether
    it had any."""
    score = np.where(allowed & (similarity > 0), similarity, -np.inf)
    k = min(N_NEIGHBOURS, score.shape[1])
    top = np.argpartition(-score, k - 1, axis=1)[:, :k]
    valid = np.isfinite(np.take_along_axis(score, top, axis=1))
    counts = valid.sum(axis=1)
    sums = np.einsum("nk,nkg->ng", valid.astype(np.float64), responses[top])
    means = np.divide(sums, counts[:, None], out=np.zeros_like(sums), where=counts[:, None] > 0)
    return means.astype(np.float32), counts > 0


def ridge_leave_one_out(
    features: np.ndarray,
    targets: np.ndarray,
    groups: np.ndarray,
    grid: tuple[float, ...] = RIDGE_GRID,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Ridge map ``(x - x_bar) W`` to specific shifts: ``(leave-one-out predictions (M, G),
    W (D, G), x_bar (D,), penalty)``, the penalty of ``grid`` with the lowest leave-one-out error.

    Entry ``m`` is predicted by the map refitted without it *and* with the other specific shifts
    of its cell type (``groups``) recomputed without it (they move by ``y_m / (n_c - 1)``), so no
    part of ``y_m`` reaches its own prediction. With the thin SVD ``X - x_bar = U S V^T`` and
    ``H = 11^T / M + U diag(s^2 / (s^2 + a)) U^T`` that is ``(H y - h y_m) / (1 - h)`` plus
    ``(H 1_c - h) / (1 - h)`` times that move: one pass per penalty.
    """
    X = np.asarray(features, dtype=np.float64)
    Y = np.asarray(targets, dtype=np.float64)
    center = X.mean(axis=0)
    n = X.shape[0]
    if n < 3:
        return np.zeros_like(Y), np.zeros((X.shape[1], Y.shape[1])), center, float("nan")
    codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1]
    sizes = np.bincount(codes)
    U, s, Vt = np.linalg.svd(X - center, full_matrices=False)
    keep = s > s.max() * 1e-10 if s.size else s > 0
    U, s, Vt = U[:, keep], s[keep], Vt[keep]
    y_mean = Y.mean(axis=0)
    projected = U.T @ (Y - y_mean)
    group_sums = np.zeros((U.shape[1], sizes.size))
    np.add.at(group_sums.T, codes, U)  # U^T 1_c for every group c
    scale = float(np.mean(s**2)) if s.size else 1.0
    moved = Y / np.maximum(sizes[codes] - 1, 1)[:, None]
    best = None
    for factor in grid:
        alpha = factor * scale
        shrink = s**2 / (s**2 + alpha)
        fit = y_mean + (U * shrink) @ projected
        leverage = np.minimum(1.0 / n + (U**2) @ shrink, 1.0 - 1e-6)
        same_group = sizes[codes] / n + np.einsum("mr,r,rm->m", U, shrink, group_sums[:, codes])
        loo = (fit - leverage[:, None] * Y + ((same_group - leverage)[:, None] * moved)) / (
            1.0 - leverage[:, None]
        )
        error = float(np.square(loo - Y).sum())
        if best is None or error < best[0]:
            best = (error, alpha, loo, s / (s**2 + alpha))
    _, alpha, loo, gain = best
    weights = (Vt.T * gain) @ projected
    return loo, weights, center, alpha


def principal_directions(matrix: sp.csr_matrix, n_components: int) -> np.ndarray:
    """Top right singular vectors ``(T, r)`` of a (sparse) entries x terms matrix."""
    if min(matrix.shape) <= 2000:
        _, s, vt = np.linalg.svd(matrix.toarray().astype(np.float64), full_matrices=False)
    else:
        from sklearn.utils.extmath import randomized_svd

        _, s, vt = randomized_svd(matrix.astype(np.float64), n_components, random_state=0)
    keep = s > (s.max() * 1e-8 if s.size else 0)
    return vt[keep][:n_components].T.astype(np.float32)


#: The evidence sources by name, in stacking order (``ptrag_sc.data.EVIDENCE_SOURCES``).
SOURCES: dict[str, EvidenceSource] = {
    source.name: source
    for source in (
        LinearEmbedding(),
        LinearAnnotation(),
        Neighbours("neighbours_embedding", "cosine"),
        Neighbours("neighbours_annotation", "jaccard"),
        OtherCellTypes("other_cell_types", raw=False),
        OtherCellTypes("other_cell_types_raw", raw=True),
    )
}
