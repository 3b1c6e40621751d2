"""Evidence for a perturbation's mean shift: the stack of the sources, the cell type's trust, the
query's gate, the combination and own-gene rules and the confidence (docs/concepts.md), all
fitted on the memory's entries with each entry's own response left out."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.optimize import minimize

from ._perturbations import label_members
from ._sources import SOURCES, Rows, unit_rows

if TYPE_CHECKING:
    from ._annotations import GeneAnnotations
    from ._memory import RetrievalMemory

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
#: Queries per chunk when computing similarities to all entries.
CHUNK = 1024
#: Prior strength, in entries, pulling a cell type's trust towards the trust over all entries.
TRUST_PRIOR = 5.0
#: Penalty on the gate's coefficients (per entry), pulling the gate towards the plain stack.
GATE_PENALTY = 1.0
#: Ridge penalty of the confidence regression.
CONFIDENCE_PENALTY = 1.0
#: A gene's control mean below this (log1p units) is too low to measure its relative change.
MIN_OWN_GENE_MEAN = 0.05


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (0 where either is zero)."""
    return np.einsum("ng,ng->n", unit_rows(a), unit_rows(b))


def row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b``."""
    return row_cosines(a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True))


def entry_weights(targets: np.ndarray) -> np.ndarray:
    """``1 / sqrt(|y|^2 + median |y|^2)``: a perturbation with a huge response does not decide
    alone."""
    norms = np.sum(np.square(targets, dtype=np.float64), axis=1)
    return 1.0 / np.sqrt(norms + np.median(norms) + 1e-12)


def closest(similarity: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Largest allowed similarity of each query (0 when nothing is allowed)."""
    return np.where(allowed, similarity, -np.inf).max(axis=1, initial=-np.inf).clip(min=0.0)


def fit_stack(
    sources: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Non-negative least-squares weights of the ``(S, M, G)`` ``sources`` for ``targets``, each
    entry counting with ``weights`` (default :func:`entry_weights`); exact: every subset of
    sources is solved and the best feasible solution kept."""
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
    rows: Rows,
    names: list[str],
    sources: np.ndarray,
    stacked: np.ndarray,
    *,
    typical_size: np.ndarray,
    cell_type_trust: np.ndarray,
    own_gene_measured: np.ndarray,
    sep: str,
) -> np.ndarray:
    """``(n, F)`` values of :data:`GATE_FEATURES` for the ``n`` rows (``sources``: the named
    sources' ``(S, n, G)`` estimates; a source the model lacks reads as zeros)."""
    by_name = dict(zip(names, sources, strict=True))
    zeros = np.zeros_like(stacked)
    return np.column_stack(
        [
            closest(rows.cosine, rows.allowed),
            closest(rows.jaccard, rows.allowed),
            row_cosines(
                by_name.get("linear_embedding", zeros), by_name.get("linear_annotation", zeros)
            ),
            np.linalg.norm(stacked, axis=1) / np.maximum(typical_size, 1e-12),
            rows.annotation_depth(),
            np.abs(by_name.get("other_cell_types", zeros)).sum(axis=1) > 0,
            cell_type_trust,
            own_gene_measured,
            members_measured(rows.memory, rows.perturbations, rows.cell_types, sep),
        ]
    ).astype(np.float64)


@dataclass
class EvidenceModel:
    """The fitted combination of the evidence sources.

    ``stack_weights`` weighs the named ``sources``; ``gate_coef`` and ``confidence_coef`` are
    ``(1 + F,)`` (intercept first) on :data:`GATE_FEATURES` standardised by ``feature_center``
    and ``feature_scale``. Per cell type with entries: the root mean square of its entries'
    specific shifts (``typical_size``), the trust in the stack and the median relative change of
    the perturbed gene (NaN where none is measured); ``trust_all`` and ``own_gene_ratio_all``
    over all entries. ``size_coef``: the Fisher-z line of the entries' accuracy on ``log1p`` of
    their estimate's relative size, for combinations (NaN in models that predate it).
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
    size_coef: np.ndarray = field(default_factory=lambda: np.full(2, np.nan))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict) -> EvidenceModel:
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})

    def per_cell_type(
        self, cell_types: np.ndarray, values: np.ndarray, fallback: float
    ) -> np.ndarray:
        """``values`` (one per fitted cell type) of ``cell_types``, ``fallback`` elsewhere."""
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

    def combination_confidence(self, size: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        """Expected Pearson correlation of combinations' predictions (additive sums, not the
        stack that :meth:`confidence` describes) from their relative size; ``fallback`` where
        the line was not fitted."""
        intercept, slope = np.asarray(self.size_coef, np.float64)
        if not (np.isfinite(intercept) and np.isfinite(slope)):
            return fallback
        return np.tanh(intercept + slope * np.log1p(size))


def fit_gate(
    trusted: np.ndarray, targets: np.ndarray, design: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Coefficients ``b`` of the gate ``r = 2 sigmoid(design @ b)`` minimising
    ``sum_m w_m^2 |y_m - r_m s_m|^2 / sum_m w_m^2 |y_m|^2 + GATE_PENALTY |b|^2 / M`` (``s``: the
    trusted stack), by L-BFGS from ``b = 0`` on three numbers per entry."""
    w2 = np.asarray(weights, np.float64) ** 2
    cross = w2 * np.einsum("mg,mg->m", targets, trusted, dtype=np.float64)
    size = w2 * np.einsum("mg,mg->m", trusted, trusted, dtype=np.float64)
    total = float(np.sum(w2 * np.einsum("mg,mg->m", targets, targets, dtype=np.float64))) or 1.0
    n = len(design)

    def objective(coef: np.ndarray) -> tuple[float, np.ndarray]:
        sig = 1.0 / (1.0 + np.exp(-(design @ coef)))
        r = 2.0 * sig
        value = np.sum(r * r * size - 2.0 * r * cross) / total + GATE_PENALTY * coef @ coef / n
        d_r = (2.0 * r * size - 2.0 * cross) / total
        grad = design.T @ (d_r * 2.0 * sig * (1.0 - sig)) + 2.0 * GATE_PENALTY * coef / n
        return value, grad

    return minimize(objective, np.zeros(design.shape[1]), jac=True, method="L-BFGS-B").x


def fit_size_line(sizes: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """``(intercept, slope)`` of ``arctanh(accuracy)`` on ``log1p(sizes)`` over the finite
    entries (NaN with fewer than three or no spread in size)."""
    finite = np.isfinite(sizes) & np.isfinite(accuracy)
    x = np.log1p(sizes[finite])
    if finite.sum() < 3 or np.ptp(x) <= 1e-12:
        return np.full(2, np.nan)
    y = np.arctanh(np.clip(accuracy[finite], -0.99, 0.99))
    design = np.column_stack([np.ones(x.size), x])
    return np.linalg.lstsq(design, y, rcond=None)[0]


def fit_ridge(design: np.ndarray, target: np.ndarray, penalty: float) -> np.ndarray:
    """Ridge coefficients of ``target`` on ``design`` (the intercept, first, unpenalised)."""
    reg = penalty * np.eye(design.shape[1])
    reg[0, 0] = 0.0
    return np.linalg.solve(design.T @ design + reg, design.T @ target)


def trust(
    cross: np.ndarray, size: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares scale ``sum <y, s> / sum |s|^2`` (``cross``, ``size``: each entry's) per
    group, pulled towards the overall one by :data:`TRUST_PRIOR` average entries, clipped at 0:
    ``(per group, per entry with the entry left out, over all)``."""
    codes = np.unique(groups, return_inverse=True)[1]
    overall = float(max(cross.sum(), 0.0) / max(size.sum(), 1e-12))
    prior = TRUST_PRIOR * float(size.mean()) if size.size else 0.0
    group_cross = np.bincount(codes, weights=cross)
    group_size = np.bincount(codes, weights=size)

    def scale(c: np.ndarray, s: np.ndarray) -> np.ndarray:
        return np.maximum((c + prior * overall) / np.maximum(s + prior, 1e-12), 0.0)

    return (
        scale(group_cross, group_size),
        scale(group_cross[codes] - cross, group_size[codes] - size),
        overall,
    )


def own_gene_columns(
    labels: np.ndarray, gene_names: np.ndarray | None, sep: str
) -> list[np.ndarray]:
    """Columns of each label's member genes among ``gene_names`` (matched upper-case)."""
    if gene_names is None or not len(gene_names):
        return [np.zeros(0, np.int64) for _ in labels]
    index = pd.Index(np.char.upper(np.asarray(gene_names).astype(str)))
    if index.has_duplicates:
        index = index.where(~index.duplicated(keep=False), "")
    columns = [index.get_indexer(label_members(label, sep)) for label in labels]
    return [c[c >= 0].astype(np.int64) for c in columns]


def own_gene_ratios(
    responses: np.ndarray, control_means: np.ndarray, columns: list[np.ndarray]
) -> np.ndarray:
    """``shift / control mean`` of each single-gene entry's own gene (NaN otherwise)."""
    ratios = np.full(len(columns), np.nan)
    for m, cols in enumerate(columns):
        if len(cols) == 1 and control_means[m, cols[0]] >= MIN_OWN_GENE_MEAN:
            ratios[m] = responses[m, cols[0]] / control_means[m, cols[0]]
    return ratios


def apply_own_gene(
    specific: np.ndarray,
    context: np.ndarray,
    control_mean: np.ndarray,
    columns: list[np.ndarray],
    ratio: np.ndarray,
) -> np.ndarray:
    """Each query's own genes set to ``ratio * control mean`` (minus the context)."""
    out = specific.copy()
    for i, cols in enumerate(columns):
        if len(cols) and np.isfinite(ratio[i]):
            out[i, cols] = ratio[i] * control_mean[i, cols] - context[i, cols]
    return out


def fit(
    memory: RetrievalMemory,
    specific: np.ndarray,
    control_means: np.ndarray,
    annotations: GeneAnnotations | None,
    sep: str,
    use: tuple[str, ...] | None,
) -> None:
    """Fit the evidence on the memory's entries and set the memory's annotations, ``sources``,
    ``evidence_model``, ``entry_estimates`` and ``entry_confidence``. Sources outside ``use``
    (default: all) get weight 0."""
    perturbations = memory.perturbations.astype(str)
    cell_types = memory.cell_types.astype(str)
    n = len(memory)
    if annotations is not None:
        matrix, terms = annotations.matrix(perturbations, sep=sep)
    else:
        matrix, terms = sp.csr_matrix((n, 0), dtype=np.float32), np.zeros(0, dtype=str)
    memory.annotation_terms = terms
    memory.annotation_indptr = matrix.indptr.astype(np.int64)
    memory.annotation_indices = matrix.indices.astype(np.int64)
    context, _ = memory.contexts(perturbations, cell_types)
    rows = Rows.build(
        memory,
        perturbations,
        cell_types,
        memory.embeddings,
        memory.annotation_matrix(),
        context,
        specific,
    )
    names = tuple(SOURCES)
    sources = np.zeros((len(names), n, specific.shape[1]), dtype=np.float32)
    memory.sources = {}
    for i, name in enumerate(names):
        sources[i], fitted = SOURCES[name].entries(rows)
        if fitted:
            memory.sources[name] = fitted
    sources *= np.array([use is None or name in use for name in names])[:, None, None]

    targets = memory.responses - context
    weights = entry_weights(targets)
    stack_weights = fit_stack(sources, targets, weights)
    stacked = np.tensordot(stack_weights, sources, axes=1)
    # How far the stack is to be trusted in a cell type, from its *other* entries.
    cross = weights**2 * np.einsum("mg,mg->m", targets, stacked, dtype=np.float64)
    size = weights**2 * np.einsum("mg,mg->m", stacked, stacked, dtype=np.float64)
    trust_per_type, trust_per_entry, trust_all = trust(cross, size, cell_types)
    type_code = np.unique(cell_types, return_inverse=True)[1]
    squares = np.bincount(type_code, weights=np.sum(specific**2, axis=1))
    typical_size = np.sqrt(squares / memory.context_counts)
    columns = own_gene_columns(perturbations, memory.gene_names, sep)
    trusted = stacked * trust_per_entry[:, None]
    features = gate_features(
        rows,
        names,
        sources,
        trusted,
        typical_size=typical_size[type_code],
        # The cell type's trust, not the entry's leave-one-out one: how much that one moves
        # when the entry is left out depends on the entry's own fit.
        cell_type_trust=trust_per_type[type_code],
        own_gene_measured=np.array([len(c) > 0 for c in columns], dtype=float),
        sep=sep,
    )
    center = features.mean(axis=0)
    scale = np.where(features.std(axis=0) > 1e-9, features.std(axis=0), 1.0)
    design = np.column_stack([np.ones(n), (features - center) / scale])
    gate_coef = fit_gate(trusted, targets, design, weights)
    estimates = trusted * (2.0 / (1.0 + np.exp(-(design @ gate_coef))))[:, None]

    # The perturbed gene's own expression, from the other entries of the cell type.
    ratios = own_gene_ratios(memory.responses, control_means, columns)
    known = np.isfinite(ratios)
    own_ratio = np.array(
        [
            np.median(ratios[(cell_types == c) & known])
            if ((cell_types == c) & known).any()
            else np.nan
            for c in memory.context_cell_types
        ]
    )
    own_all = float(np.median(ratios[known])) if known.any() else float("nan")
    loo_ratio = np.full(n, np.nan)
    for m in np.flatnonzero([len(c) > 0 for c in columns]):
        others = known & (np.arange(n) != m)
        pool = ratios[others & (cell_types == cell_types[m])]
        pool = pool if pool.size else ratios[others]
        loo_ratio[m] = np.median(pool) if pool.size else np.nan
    estimates = apply_own_gene(estimates, context, control_means, columns, loo_ratio)
    estimates = additive(memory, perturbations, cell_types, context, estimates, sep)

    accuracy = row_pearson(context + estimates, memory.responses)
    sizes = np.linalg.norm(estimates, axis=1) / np.maximum(typical_size[type_code], 1e-12)
    memory.evidence_model = EvidenceModel(
        sources=np.asarray(names),
        stack_weights=stack_weights,
        feature_center=center,
        feature_scale=scale,
        gate_coef=gate_coef,
        confidence_coef=fit_ridge(design, accuracy, CONFIDENCE_PENALTY),
        cell_types=memory.context_cell_types,
        typical_size=typical_size,
        cell_type_trust=trust_per_type,
        own_gene_ratio=own_ratio,
        trust_all=trust_all,
        own_gene_ratio_all=own_all,
        size_coef=fit_size_line(sizes, accuracy),
    )
    memory.entry_estimates = estimates.astype(np.float32)
    memory.entry_confidence = memory.evidence_model.confidence(features).astype(np.float32)


def query(
    memory: RetrievalMemory,
    perturbations: np.ndarray,
    cell_types: np.ndarray,
    embeddings: np.ndarray,
    annotations: sp.csr_matrix | None,
    control_mean: np.ndarray | None,
    sep: str,
) -> dict[str, np.ndarray]:
    """The body of :meth:`RetrievalMemory.evidence <ptrag_sc.data.RetrievalMemory.evidence>`."""
    perturbations = np.asarray(perturbations).astype(str)
    cell_types = np.asarray(cell_types).astype(str)
    context, full = memory.contexts(perturbations, cell_types)
    own = memory.entry_index(perturbations, cell_types)
    stacked = np.zeros_like(context)
    confidence = np.zeros(len(perturbations))
    reliability = np.full(len(perturbations), np.nan)
    is_entry = own >= 0
    stacked[is_entry] = memory.entry_estimates[own[is_entry]]
    confidence[is_entry] = memory.entry_confidence[own[is_entry]]
    new = np.flatnonzero(~is_entry)
    model = memory.evidence_model
    names = [str(name) for name in model.sources]
    for start in range(0, new.size, CHUNK):
        idx = new[start : start + CHUNK]
        q_pert, q_ct, q_context = perturbations[idx], cell_types[idx], context[idx]
        rows = Rows.build(
            memory,
            q_pert,
            q_ct,
            embeddings[idx],
            None if annotations is None else annotations[idx],
            q_context,
        )
        sources = np.zeros((len(names), len(idx), context.shape[1]), dtype=np.float32)
        for i, name in enumerate(names):
            sources[i] = SOURCES[name].queries(rows, (memory.sources or {}).get(name, {}))
        trusted = model.per_cell_type(q_ct, model.cell_type_trust, model.trust_all)
        columns = own_gene_columns(q_pert, memory.gene_names, sep)
        estimate = np.tensordot(model.stack_weights, sources, axes=1) * trusted[:, None]
        typical = model.per_cell_type(q_ct, model.typical_size, np.mean(model.typical_size))
        measured = np.array([len(c) > 0 for c in columns], dtype=float)
        features = gate_features(
            rows,
            names,
            sources,
            estimate,
            typical_size=typical,
            cell_type_trust=trusted,
            own_gene_measured=measured * (control_mean is not None),
            sep=sep,
        )
        gate = model.gate(features)
        estimate = estimate * gate[:, None]
        reliability[idx] = trusted * gate
        if control_mean is not None:
            ratio = model.per_cell_type(q_ct, model.own_gene_ratio, model.own_gene_ratio_all)
            ratio = np.where(np.isfinite(ratio), ratio, model.own_gene_ratio_all)
            means = np.asarray(control_mean)[idx]
            estimate = apply_own_gene(estimate, q_context, means, columns, ratio)
        stacked[idx] = additive(memory, q_pert, q_ct, q_context, estimate, sep)
        confidence[idx] = model.confidence(features)
        combination = np.array([sep in label for label in q_pert], dtype=bool)
        if combination.any():
            size = np.linalg.norm(stacked[idx][combination], axis=1)
            size = size / np.maximum(typical[combination], 1e-12)
            confidence[idx[combination]] = model.combination_confidence(
                size, confidence[idx[combination]]
            )
    return {
        "context": context,
        "context_full": full,
        "stacked": stacked,
        "confidence": confidence.astype(np.float32),
        "reliability": reliability.astype(np.float32),
    }


def members_measured(
    memory: RetrievalMemory, perturbations: np.ndarray, cell_types: np.ndarray, sep: str
) -> np.ndarray:
    """Fraction of each combination's members with an entry in its cell type (0 for singles)."""
    out = np.zeros(len(perturbations))
    for i, label in enumerate(perturbations):
        members = str(label).split(sep)
        if len(members) > 1:
            entries = memory.entry_index(np.array(members), np.full(len(members), cell_types[i]))
            out[i] = np.mean(entries >= 0)
    return out


def additive(
    memory: RetrievalMemory,
    perturbations: np.ndarray,
    cell_types: np.ndarray,
    context: np.ndarray,
    estimate: np.ndarray,
    sep: str,
) -> np.ndarray:
    """Combinations' specific shifts by the additive model: the sum of the members' shifts in
    the cell type (measured, else its context response) minus the query's context."""
    members = [str(p).split(sep) for p in perturbations]
    combos = np.flatnonzero([len(m) > 1 for m in members])
    if combos.size == 0:
        return estimate
    out = estimate.copy()
    _, full = memory.contexts(perturbations[combos], cell_types[combos])
    for row, i in enumerate(combos):
        entries = memory.entry_index(np.array(members[i]), np.full(len(members[i]), cell_types[i]))
        measured = entries[entries >= 0]
        total = memory.responses[measured].sum(axis=0) + (len(entries) - measured.size) * full[row]
        out[i] = total - context[i]
    return out
