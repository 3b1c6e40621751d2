"""Array-level metrics of :func:`ptrag_sc.tl.evaluate`, on plain numpy arrays (definitions in
its docstring; correlations are NaN when a side is constant, distances Euclidean)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.stats import rankdata

_REL_TOL = 1e-10


def _centred_norm(x: np.ndarray) -> tuple[np.ndarray, float, bool]:
    centred = x - x.mean()
    norm = float(np.sqrt(np.dot(centred, centred)))
    scale = float(np.sqrt(np.dot(x, x)))
    constant = (not np.isfinite(norm)) or norm <= _REL_TOL * max(scale, 1e-300)
    return centred, norm, constant


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two vectors; NaN if either is constant or shorter than 2."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"pearson: shapes differ, {x.shape} vs {y.shape}.")
    if x.size < 2:
        return float("nan")
    xc, xn, x_const = _centred_norm(x)
    yc, yn, y_const = _centred_norm(y)
    if x_const or y_const:
        return float("nan")
    return float(np.clip(np.dot(xc, yc) / (xn * yn), -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation: Pearson of average ranks (ties get their mean rank)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.size < 2 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return float("nan")
    return pearson(rankdata(x), rankdata(y))


def top_n_genes(shift: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest ``|shift|`` (ties broken by gene order), largest first."""
    shift = np.asarray(shift, dtype=np.float64)
    n = int(min(n, shift.shape[0]))
    return np.argsort(-np.abs(shift), kind="stable")[:n]


def de_overlap(pred_shift: np.ndarray, real_shift: np.ndarray, n: int) -> float:
    """Fraction of the observed top-``n`` genes (by ``|shift|``) among the predicted top-``n``."""
    real_top = top_n_genes(real_shift, n)
    pred_top = top_n_genes(pred_shift, n)
    if real_top.size == 0:
        return float("nan")
    return float(np.isin(real_top, pred_top).mean())


def de_direction(pred_shift: np.ndarray, real_shift: np.ndarray, n: int) -> float:
    """Fraction of the observed top-``n`` genes where ``sign(pred shift) == sign(real shift)``."""
    real_top = top_n_genes(real_shift, n)
    if real_top.size == 0:
        return float("nan")
    pred = np.sign(np.asarray(pred_shift, dtype=np.float64)[real_top])
    real = np.sign(np.asarray(real_shift, dtype=np.float64)[real_top])
    return float((pred == real).mean())


def discrimination_l1(
    pred_shift: np.ndarray,
    real_shifts: np.ndarray,
    true_index: int,
    gene_mask: np.ndarray | None = None,
) -> float:
    """Fraction of the other rows of ``real_shifts`` strictly closer (L1) to ``pred_shift`` than
    row ``true_index``, over ``gene_mask``; NaN with fewer than two rows."""
    real_shifts = np.asarray(real_shifts, dtype=np.float64)
    n_cand = real_shifts.shape[0]
    if n_cand < 2:
        return float("nan")
    pred_shift = np.asarray(pred_shift, dtype=np.float64)
    if gene_mask is not None:
        real_shifts = real_shifts[:, gene_mask]
        pred_shift = pred_shift[gene_mask]
    dist = np.abs(real_shifts - pred_shift[None, :]).sum(axis=1)
    others = np.delete(dist, true_index)
    return float(np.mean(others < dist[true_index]))


def mean_cosine_to_others(shifts: np.ndarray) -> np.ndarray:
    """Per row of ``shifts``: the mean cosine similarity to the other rows (near 1 when every
    perturbation gets the same shift). Rows without a direction (zero or non-finite norm) are
    NaN and left out of the others' means; all NaN with fewer than two rows."""
    shifts = np.asarray(shifts, dtype=np.float64)
    n = shifts.shape[0]
    out = np.full(n, np.nan)
    norms = np.linalg.norm(shifts, axis=1)
    finite = np.isfinite(norms)
    scale = max(float(norms[finite].max(initial=0.0)), 1e-300)
    has_direction = finite & (norms > _REL_TOL * scale)
    if n < 2 or has_direction.sum() < 2:
        return out
    unit = shifts[has_direction] / norms[has_direction, None]
    cosines = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(cosines, 0.0)
    out[has_direction] = cosines.sum(axis=1) / (unit.shape[0] - 1)
    return out


def split_half_pearson(
    cells: np.ndarray, control_mean: np.ndarray, rng: np.random.Generator
) -> float:
    """Pearson between the shifts (vs ``control_mean``) of two disjoint random halves of
    ``floor(n / 2)`` cells (permuted with ``rng``); NaN with fewer than 4 cells."""
    n = cells.shape[0]
    if n < 4:
        return float("nan")
    perm = rng.permutation(n)
    half = n // 2
    first = cells[perm[:half]].mean(axis=0) - control_mean
    second = cells[perm[half : 2 * half]].mean(axis=0) - control_mean
    return pearson(first, second)


def pairwise_sq_dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[len(x), len(y)]``."""
    from scipy.spatial.distance import cdist

    return cdist(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), "sqeuclidean")


def _sq_dist_blocks(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...] | None:
    """Squared distances within ``x``, within ``y`` and between them; None if one is empty."""
    if len(x) == 0 or len(y) == 0:
        return None
    dxx = pairwise_sq_dist(x, x)
    dyy = pairwise_sq_dist(y, y)
    np.fill_diagonal(dxx, 0.0)
    np.fill_diagonal(dyy, 0.0)
    return dxx, dyy, pairwise_sq_dist(x, y)


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Biased (V-statistic) MMD² with the kernel ``exp(-|a - b|² / (2 sigma²))``, ``sigma`` the
    ``bandwidth`` or the median non-zero pairwise distance of the pooled sample."""
    blocks = _sq_dist_blocks(x, y)
    return float("nan") if blocks is None else _mmd_from_blocks(*blocks, bandwidth=bandwidth)


def _mmd_from_blocks(
    dxx: np.ndarray, dyy: np.ndarray, dxy: np.ndarray, bandwidth: float | None = None
) -> float:
    if bandwidth is None:
        n, m = dxx.shape[0], dyy.shape[0]
        pooled = np.concatenate(
            [dxx[np.triu_indices(n, 1)], dyy[np.triu_indices(m, 1)], dxy.ravel()]
        )
        pooled = np.sqrt(pooled[pooled > 0])
        if pooled.size == 0:
            return 0.0
        bandwidth = float(np.median(pooled))
    gamma = 1.0 / (2.0 * bandwidth**2)
    value = (
        np.exp(-gamma * dxx).mean()
        + np.exp(-gamma * dyy).mean()
        - 2.0 * np.exp(-gamma * dxy).mean()
    )
    return float(max(value, 0.0))


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (V-statistics): twice geomloss'
    ``SamplesLoss("energy")``, cell-eval's ``edistance``."""
    blocks = _sq_dist_blocks(x, y)
    return float("nan") if blocks is None else _energy_from_blocks(*blocks)


def _energy_from_blocks(dxx: np.ndarray, dyy: np.ndarray, dxy: np.ndarray) -> float:
    value = 2.0 * np.sqrt(dxy).mean() - np.sqrt(dxx).mean() - np.sqrt(dyy).mean()
    return float(max(value, 0.0))


def distribution_metrics(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """``w1``, ``w2`` (exact), ``mmd`` and ``energy`` of two samples, sharing one distance pass."""
    blocks = _sq_dist_blocks(x, y)
    if blocks is None:
        return dict.fromkeys(("w1", "w2", "mmd", "energy"), float("nan"))
    dxx, dyy, dxy = blocks
    w1, w2 = _ot_from_cost(dxy, "exact", 0.0)
    return {
        "w1": w1,
        "w2": w2,
        "mmd": _mmd_from_blocks(dxx, dyy, dxy),
        "energy": _energy_from_blocks(dxx, dyy, dxy),
    }


def wasserstein(
    x: np.ndarray,
    y: np.ndarray,
    *,
    method: Literal["exact", "sinkhorn"] = "exact",
    sinkhorn_reg: float = 0.05,
) -> tuple[float, float]:
    """``(W1, W2)`` between the uniform-weight samples ``x`` and ``y``: exact (``ot.emd2``) or
    the entropic plan's cost (``ot.sinkhorn2`` on the cost over its maximum, an upper bound)."""
    if len(x) == 0 or len(y) == 0:
        return float("nan"), float("nan")
    if method not in ("exact", "sinkhorn"):
        raise ValueError(f"`method={method!r}` must be 'exact' or 'sinkhorn'.")
    return _ot_from_cost(pairwise_sq_dist(x, y), method, sinkhorn_reg)


def _ot_from_cost(cost2: np.ndarray, method: str, sinkhorn_reg: float) -> tuple[float, float]:
    import ot

    n, m = cost2.shape
    a = np.full(n, 1.0 / n)
    b = np.full(m, 1.0 / m)
    out = []
    for cost in (np.sqrt(cost2), cost2):
        cost = np.ascontiguousarray(cost, dtype=np.float64)
        scale = float(cost.max())
        if scale <= 0:
            out.append(0.0)
            continue
        if method == "exact":
            value = float(ot.emd2(a, b, cost, numItermax=10_000_000))
        else:
            value = float(ot.sinkhorn2(a, b, cost / scale, sinkhorn_reg)) * scale
        out.append(max(value, 0.0))
    return out[0], float(np.sqrt(out[1]))


def fit_pca(cells: np.ndarray, n_pcs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [G], components [k, G])`` of ``cells``, ``k = min(n_pcs, n_cells - 1, n_genes)``
    or the rank: exact (eigen-decomposition of the smaller Gram matrix) up to 2000 cells or
    genes, else scikit-learn's randomized SVD seeded with ``seed``."""
    cells = np.asarray(cells, dtype=np.float64)
    mean = cells.mean(axis=0)
    centred = cells - mean
    n, g = centred.shape
    k = max(1, min(int(n_pcs), n - 1, g))
    if min(n, g) > 2000:
        from sklearn.utils.extmath import randomized_svd

        _, _, components = randomized_svd(
            centred, n_components=k, n_oversamples=20, n_iter=7, random_state=seed
        )
        return mean, components
    evals, evecs = np.linalg.eigh(centred.T @ centred if g <= n else centred @ centred.T)
    order = np.argsort(evals)[::-1][:k]
    order = order[evals[order] > 1e-12 * max(float(evals.max()), 1e-300)]
    if g <= n:
        components = evecs[:, order].T
    else:
        components = (evecs[:, order] / np.sqrt(evals[order])).T @ centred
    if components.shape[0] == 0:  # all cells identical: no direction of variance
        components = np.zeros((1, g))
    return mean, components
