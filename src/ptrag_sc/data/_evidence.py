"""Evidence for a perturbation's mean shift, from the memory, with the query's own entry left out.

Each source estimates the *specific* shift of a query (q, c): its mean shift minus the context
response of cell type c. The sources are combined by stacked regression (Breiman 1996): their
non-negative weights minimise the squared error of the leave-one-out estimates over the memory's
entries, so the combination is fitted on exactly the situation of a held-out perturbation.
"""

from __future__ import annotations

import itertools

import numpy as np

#: The stacked sources, in order.
SOURCES = (
    "linear_embedding",  # ridge map from the gene embedding (Ahlmann-Eltze et al. 2025)
    "linear_annotation",  # ridge map from the gene's GO annotations
    "neighbours_embedding",  # mean response of the nearest entries by embedding cosine
    "neighbours_annotation",  # mean response of the nearest entries by annotation Jaccard
    "other_cell_types",  # the same perturbation's specific shift in other cell types
    "other_cell_types_raw",  # its mean shift in other cell types, as is
)
#: Neighbours averaged by the neighbour sources.
N_NEIGHBOURS = 5
#: Queries per chunk when computing similarities to all entries.
CHUNK = 1024


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def neighbour_means(
    similarity: np.ndarray,
    allowed: np.ndarray,
    responses: np.ndarray,
    k: int = N_NEIGHBOURS,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``responses`` over the ``k`` most similar allowed entries of each query.

    Entries with zero similarity are never neighbours. Returns ``(means (n, G), has_neighbours
    (n,))``; rows without neighbours are zero.
    """
    score = np.where(allowed & (similarity > 0), similarity, -np.inf)
    k = min(k, score.shape[1])
    if k == 0:
        return np.zeros((score.shape[0], responses.shape[1]), np.float32), np.zeros(score.shape[0], bool)
    top = np.argpartition(-score, k - 1, axis=1)[:, :k]
    valid = np.isfinite(np.take_along_axis(score, top, axis=1))
    counts = valid.sum(axis=1)
    sums = np.einsum("nk,nkg->ng", valid.astype(np.float64), responses[top])
    means = np.divide(sums, counts[:, None], out=np.zeros_like(sums), where=counts[:, None] > 0)
    return means.astype(np.float32), counts > 0


def fit_stack(sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Non-negative least-squares weights of ``S`` sources for ``targets``.

    ``sources`` is ``(S, M, G)``, ``targets`` ``(M, G)``. Each entry counts with weight
    ``1 / sqrt(|y|^2 + median |y|^2)``: a perturbation with a huge response does not decide the
    weights alone. Exact for small ``S``: every subset of sources is solved by least squares
    and the best feasible solution is kept.
    """
    n_sources = sources.shape[0]
    norms = np.sum(np.square(targets, dtype=np.float64), axis=1)
    weight = 1.0 / np.sqrt(norms + np.median(norms) + 1e-12)
    gram = np.einsum("smg,tmg,m->st", sources, sources, weight**2, dtype=np.float64)
    cross = np.einsum("smg,mg,m->s", sources, targets, weight**2, dtype=np.float64)
    best, best_value = np.zeros(n_sources), 0.0
    for size in range(1, n_sources + 1):
        for subset in itertools.combinations(range(n_sources), size):
            idx = list(subset)
            a = gram[np.ix_(idx, idx)] + 1e-9 * np.eye(size)
            try:
                w = np.linalg.solve(a, cross[idx])
            except np.linalg.LinAlgError:
                continue
            if np.any(w < 0):
                continue
            value = -(2 * cross[idx] @ w - w @ a @ w)  # objective minus the constant |y|^2
            if value < best_value:
                best_value = value
                best = np.zeros(n_sources)
                best[idx] = w
    return best.astype(np.float32)
