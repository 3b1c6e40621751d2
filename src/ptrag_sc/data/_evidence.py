"""Evidence for a perturbation's mean shift, fitted on the memory with each entry left out.

Each *source* estimates the specific shift of a query (q, c): its mean shift minus the context
response of cell type c (the mean shift of c's other perturbations). The sources are combined
in three steps, each fitted on the memory's entries in exactly the situation of a held-out
perturbation, that is with the entry's own response left out:

1. **Stack.** Non-negative least-squares weights of the sources (stacked regression, Breiman
   1996): a source that does not help on the training perturbations gets weight 0.
2. **Trust.** The cell type's *trust* ``t(c)``: the least-squares scale of the stack on the
   cell type's other entries, clipped at 0 and pulled towards the scale over all entries by a
   prior of :data:`TRUST_PRIOR` entries. A cell type where the sources predicted nothing gets
   its context response.
3. **Gate.** A per-query reliability ``r(q) = 2 sigmoid(b . [1, z(q)])`` in (0, 2) scales
   the trusted stack, where ``z`` describes what the query looks like (:data:`GATE_FEATURES`:
   how similar its nearest measured neighbours are, whether the sources agree, whether its
   own gene is measured...). ``b = 0`` (``r = 1``) is the plain stack; ``b`` is penalised
   towards it. Where the evidence predicted perturbations like this one badly, ``r`` is near
   0 and the query gets its context response: a neighbour's strong response is not lent to a
   perturbation it does not fit.
4. **Combinations.** ``A+B`` in cell type c is the additive model: the sum of its members'
   shifts, each measured in c where it was and otherwise the context response of c (the
   typical shift of a perturbation there), which is the standard bar for combinations and
   needs no measured combination.
5. **Own gene.** Where the perturbed gene is itself measured, its shift is the training
   perturbations' median relative change of their own gene in that cell type (a knock-down or
   knock-out lowers its target, an activation raises it), not what neighbours say.

The **confidence** of a query is the Pearson correlation its predicted mean shift is expected to
reach with the measured one, a ridge regression of the entries' leave-one-out correlations on
the same features.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import numpy as np
from scipy.optimize import minimize

#: The stacked sources, in order.
SOURCES = (
    "linear_embedding",  # ridge map from the gene embedding (Ahlmann-Eltze et al. 2025)
    "linear_annotation",  # ridge map from the gene's GO annotations
    "neighbours_embedding",  # mean response of the nearest entries by embedding cosine
    "neighbours_annotation",  # mean response of the nearest entries by annotation Jaccard
    "other_cell_types",  # the same perturbation's specific shift in other cell types
    "other_cell_types_raw",  # its mean shift in other cell types, as is
)
#: What the gate and the confidence read about a query.
GATE_FEATURES = (
    "neighbour_cosine",  # embedding cosine to the closest other perturbation of its cell type
    "neighbour_jaccard",  # annotation Jaccard to the closest one
    "ridge_agreement",  # cosine between the embedding and the annotation ridge estimates
    "evidence_size",  # norm of the stacked estimate over the cell type's typical specific shift
    "annotation_depth",  # log(1 + number of annotation terms)
    "measured_elsewhere",  # the perturbation has entries in other cell types
    "cell_type_trust",  # how far the stack is to be trusted in the query's cell type
    "own_gene_measured",  # the perturbed gene is among the measured genes
    "members_measured",  # fraction of a combination's members measured in the cell type
)
#: Neighbours averaged by the neighbour sources.
N_NEIGHBOURS = 5
#: Queries per chunk when computing similarities to all entries.
CHUNK = 1024
#: Ridge penalties tried (times the mean squared singular value of the centred features); the
#: one with the lowest leave-one-out error is used.
RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
#: Prior strength, in entries, pulling a cell type's trust towards the trust over all entries.
TRUST_PRIOR = 5.0
#: Penalty on the gate's coefficients (per entry), pulling the gate towards the plain stack.
GATE_PENALTY = 1.0
#: Ridge penalty of the confidence regression.
CONFIDENCE_PENALTY = 1.0
#: A gene's control mean below this (log1p units) is too low to measure its relative change.
MIN_OWN_GENE_MEAN = 0.05


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (0 where either is zero)."""
    return np.einsum("ng,ng->n", unit_rows(a), unit_rows(b))


def row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b``."""
    return row_cosines(a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True))


def entry_weights(targets: np.ndarray) -> np.ndarray:
    """``1 / sqrt(|y|^2 + median |y|^2)``: a perturbation with a huge response does not decide alone."""
    norms = np.sum(np.square(targets, dtype=np.float64), axis=1)
    return 1.0 / np.sqrt(norms + np.median(norms) + 1e-12)


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


def closest(similarity: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Largest allowed similarity of each query (0 when nothing is allowed)."""
    return np.where(allowed, similarity, -np.inf).max(axis=1, initial=-np.inf).clip(min=0.0)


def ridge_leave_one_out(
    features: np.ndarray,
    targets: np.ndarray,
    groups: np.ndarray,
    grid: tuple[float, ...] = RIDGE_GRID,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Ridge map from features to specific shifts, with exact leave-one-out predictions.

    The map is ``(x - x_bar) W``: ridge regression with an unpenalised intercept on the
    centred features. ``targets`` are specific shifts, each entry's shift minus the mean of its
    ``groups`` (its cell type). The leave-one-out prediction of entry ``m`` is that of the map
    refitted on the other entries *and* with their specific shifts recomputed without ``m``
    (removing ``m`` moves its cell type's context, which shifts the other targets of that cell
    type by ``y_m / (n_c - 1)``), so no part of ``y_m`` reaches its own prediction. Through the
    thin SVD ``X - x_bar = U S V^T`` each penalty ``a`` of ``grid`` (times the mean squared
    singular value) costs one pass: with ``H = 11^T / M + U diag(s^2 / (s^2 + a)) U^T``, the
    refitted prediction is ``(H y - h y_m) / (1 - h)`` plus ``(H 1_c - h) / (1 - h)`` times that
    shift. The penalty with the lowest leave-one-out squared error is kept.

    Returns
    -------
    ``(leave-one-out predictions (M, G), weights (D, G), centre (D,), penalty)``.
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
        loo = (fit - leverage[:, None] * Y + ((same_group - leverage)[:, None] * moved)) / (1.0 - leverage[:, None])
        error = float(np.square(loo - Y).sum())
        if best is None or error < best[0]:
            best = (error, alpha, loo, s / (s**2 + alpha))
    _, alpha, loo, gain = best
    weights = (Vt.T * gain) @ projected
    return loo, weights, center, alpha


def fit_stack(sources: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Non-negative least-squares weights of ``S`` sources for ``targets``.

    ``sources`` is ``(S, M, G)``, ``targets`` ``(M, G)``; each entry counts with ``weights``
    (default :func:`entry_weights`). Exact for small ``S``: every subset of sources is solved by
    least squares and the best feasible solution is kept.
    """
    n_sources = sources.shape[0]
    weight = entry_weights(targets) if weights is None else weights
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


def gate_features(
    sources: np.ndarray,
    stacked: np.ndarray,
    *,
    neighbour_cosine: np.ndarray,
    neighbour_jaccard: np.ndarray,
    annotation_depth: np.ndarray,
    typical_size: np.ndarray,
    cell_type_trust: np.ndarray,
    own_gene_measured: np.ndarray,
    members_measured: np.ndarray,
) -> np.ndarray:
    """``(n, F)`` values of :data:`GATE_FEATURES` for ``n`` queries (``sources``: ``(S, n, G)``)."""
    return np.column_stack(
        [
            neighbour_cosine,
            neighbour_jaccard,
            row_cosines(sources[0], sources[1]),
            np.linalg.norm(stacked, axis=1) / np.maximum(typical_size, 1e-12),
            annotation_depth,
            np.abs(sources[4]).sum(axis=1) > 0,
            cell_type_trust,
            own_gene_measured,
            members_measured,
        ]
    ).astype(np.float64)


@dataclass
class EvidenceModel:
    """The fitted combination of the evidence sources (see the module's docstring).

    Attributes
    ----------
    sources
        Names of the sources, aligned with ``stack_weights``.
    stack_weights
        Non-negative weight of each source.
    feature_center, feature_scale
        Standardisation of :data:`GATE_FEATURES`.
    gate_coef
        ``(1 + F,)`` coefficients (intercept first) of the gate's logit.
    confidence_coef
        ``(1 + F,)`` coefficients of the confidence.
    cell_types, typical_size, cell_type_trust, own_gene_ratio
        Per cell type with entries: the root mean square of its entries' specific shifts, the
        trust in the stack there and the median relative change of the perturbed gene (NaN
        where no entry's gene is measured).
    trust_all, own_gene_ratio_all
        The same over all entries, for cell types without entries.
    """

    sources: np.ndarray
    stack_weights: np.ndarray
    feature_center: np.ndarray
    feature_scale: np.ndarray
    gate_coef: np.ndarray
    confidence_coef: np.ndarray
    cell_types: np.ndarray
    typical_size: np.ndarray
    cell_type_trust: np.ndarray
    own_gene_ratio: np.ndarray
    trust_all: float
    own_gene_ratio_all: float

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict) -> EvidenceModel:
        return cls(**{f.name: state[f.name] for f in fields(cls)})

    def per_cell_type(self, cell_types: np.ndarray, values: np.ndarray, fallback: float) -> np.ndarray:
        """``values`` (one per fitted cell type) looked up for ``cell_types``; ``fallback`` elsewhere."""
        import pandas as pd

        row = pd.Index(self.cell_types.astype(str)).get_indexer(np.asarray(cell_types).astype(str))
        return np.where(row >= 0, np.asarray(values, np.float64)[np.maximum(row, 0)], fallback)

    def standardise(self, features: np.ndarray) -> np.ndarray:
        z = (features - self.feature_center) / self.feature_scale
        return np.column_stack([np.ones(len(z)), z])

    def gate(self, features: np.ndarray) -> np.ndarray:
        """Reliability ``r`` in (0, 2) of each query's trusted stack."""
        return 2.0 / (1.0 + np.exp(-(self.standardise(features) @ self.gate_coef)))

    def confidence(self, features: np.ndarray) -> np.ndarray:
        """Expected Pearson correlation of the predicted and the measured mean shift."""
        return np.clip(self.standardise(features) @ self.confidence_coef, -1.0, 1.0)


def fit_gate(trusted: np.ndarray, targets: np.ndarray, design: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Coefficients ``b`` of the gate ``r = 2 sigmoid(design @ b)`` minimising
    ``sum_m w_m^2 |y_m - r_m s_m|^2 / sum_m w_m^2 |y_m|^2 + GATE_PENALTY |b|^2 / M``
    (``s``: the trusted stack of each entry).

    Only three numbers per entry enter (``<y, s>``, ``|s|^2``, ``|y|^2``), so the fit is a small
    smooth problem (L-BFGS from ``b = 0``, deterministic).
    """
    w2 = np.asarray(weights, np.float64) ** 2
    cross = w2 * np.einsum("mg,mg->m", targets, trusted, dtype=np.float64)
    size = w2 * np.einsum("mg,mg->m", trusted, trusted, dtype=np.float64)
    total = float(np.sum(w2 * np.einsum("mg,mg->m", targets, targets, dtype=np.float64))) or 1.0
    n = len(design)

    def objective(coef):
        sig = 1.0 / (1.0 + np.exp(-(design @ coef)))
        r = 2.0 * sig
        value = np.sum(r * r * size - 2.0 * r * cross) / total + GATE_PENALTY * coef @ coef / n
        d_r = (2.0 * r * size - 2.0 * cross) / total
        grad = design.T @ (d_r * 2.0 * sig * (1.0 - sig)) + 2.0 * GATE_PENALTY * coef / n
        return value, grad

    return minimize(objective, np.zeros(design.shape[1]), jac=True, method="L-BFGS-B").x


def fit_ridge(design: np.ndarray, target: np.ndarray, penalty: float) -> np.ndarray:
    """Ridge coefficients of ``target`` on ``design`` (its first column, the intercept, unpenalised)."""
    reg = penalty * np.eye(design.shape[1])
    reg[0, 0] = 0.0
    return np.linalg.solve(design.T @ design + reg, design.T @ target)


def trust(cross: np.ndarray, size: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares scale ``sum <y, s> / sum |s|^2`` of an estimate ``s`` of ``y``, per group.

    ``cross`` and ``size`` hold each entry's (weighted) ``<y, s>`` and ``|s|^2``. A group's
    scale is pulled towards the scale over all entries by :data:`TRUST_PRIOR` entries of
    average size and clipped at 0. Returns ``(per group, per entry with the entry left out,
    over all)``.
    """
    codes = np.unique(groups, return_inverse=True)[1]
    overall = float(max(cross.sum(), 0.0) / max(size.sum(), 1e-12))
    prior = TRUST_PRIOR * float(size.mean()) if size.size else 0.0
    group_cross = np.bincount(codes, weights=cross)
    group_size = np.bincount(codes, weights=size)

    def scale(c, s):
        return np.maximum((c + prior * overall) / np.maximum(s + prior, 1e-12), 0.0)

    return scale(group_cross, group_size), scale(group_cross[codes] - cross, group_size[codes] - size), overall


def own_gene_columns(labels: np.ndarray, gene_names: np.ndarray | None, sep: str) -> list[np.ndarray]:
    """For each label, the columns of its member genes among ``gene_names`` (matched upper-case)."""
    if gene_names is None or not len(gene_names):
        return [np.zeros(0, np.int64) for _ in labels]
    import pandas as pd

    index = pd.Index(np.char.upper(np.asarray(gene_names).astype(str)))
    if index.has_duplicates:
        index = index.where(~index.duplicated(keep=False), "")
    out = []
    for label in labels:
        members = [m.strip().upper() for m in str(label).split(sep) if m.strip()]
        cols = index.get_indexer(members)
        out.append(cols[cols >= 0].astype(np.int64))
    return out


def own_gene_ratios(responses: np.ndarray, control_means: np.ndarray, columns: list[np.ndarray]) -> np.ndarray:
    """Relative change ``shift / control mean`` of each single-gene entry's own gene (NaN otherwise)."""
    ratios = np.full(len(columns), np.nan)
    for m, cols in enumerate(columns):
        if len(cols) == 1 and control_means[m, cols[0]] >= MIN_OWN_GENE_MEAN:
            ratios[m] = responses[m, cols[0]] / control_means[m, cols[0]]
    return ratios


def apply_own_gene(specific: np.ndarray, context: np.ndarray, control_mean: np.ndarray, columns: list[np.ndarray], ratio: np.ndarray) -> np.ndarray:
    """Set each query's own genes to ``ratio * control mean`` (as a specific shift: minus the context)."""
    out = specific.copy()
    for i, cols in enumerate(columns):
        if len(cols) and np.isfinite(ratio[i]):
            out[i, cols] = ratio[i] * control_mean[i, cols] - context[i, cols]
    return out
