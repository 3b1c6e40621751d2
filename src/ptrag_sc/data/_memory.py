"""The retrieval memory, built from training cells only, and the evidence it precomputes.

A response memory holds one entry per training (perturbation, cell type) pair with its measured
mean shift from that cell type's controls. From it the model reads, for a query (q, c), with the
query's own entry always left out:

- the context response: the mean shift of the cell type's *other* perturbations;
- the stage-1 candidates' perturbation-specific shifts (shift minus their cell type's context);
- a ridge regression from the gene embedding to the specific shift (Ahlmann-Eltze et al. 2025),
  whose estimate for an entry is its leave-one-out prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import MEMORY_KINDS, MemoryKind
from ._matrix import group_means

if TYPE_CHECKING:
    from ._perturbations import PerturbationEncoder

#: Ridge penalties tried (times the mean squared singular value of the centred embeddings);
#: the one with the lowest leave-one-out error is used.
RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass
class RetrievalMemory:
    """What stage 1 retrieves from, and the evidence derived from it.

    Attributes
    ----------
    kind
        ``"embedding"``: one entry per training perturbation carrying its gene embedding (the
        paper). ``"response"``: one entry per training (perturbation, cell type) pair carrying
        its gene embedding and its measured pseudobulk shift from that cell type's controls.
    perturbations, cell_types
        Label and cell type of each entry, shape ``(M,)`` (cell type ``""`` for embedding
        memories).
    embeddings
        Gene embedding of each entry, ``(M, D)``.
    responses
        Mean shift of each entry, ``(M, G)``; ``None`` for embedding memories.
    n_cells
        Training cells behind each entry.
    response_codes, response_basis
        Specific shifts projected on their top principal directions ``(M, c)`` and the
        ``(G, c)`` directions: what the candidate encoder reads.
    context_cell_types, context_sums, context_counts
        Cell types with entries, the sum of their entries' responses ``(C, G)`` and how many.
    linear_loo
        Leave-one-out ridge estimate of each entry's specific shift, ``(M, G)``.
    linear_weights, linear_center, linear_alpha
        The ridge map ``(D, G)`` fitted on all entries, the mean embedding it is centred on and
        the penalty chosen by leave-one-out error.
    """

    kind: str
    perturbations: np.ndarray
    cell_types: np.ndarray
    embeddings: np.ndarray
    responses: np.ndarray | None
    n_cells: np.ndarray
    response_codes: np.ndarray | None = None
    response_basis: np.ndarray | None = None
    context_cell_types: np.ndarray | None = None
    context_sums: np.ndarray | None = None
    context_counts: np.ndarray | None = None
    linear_loo: np.ndarray | None = None
    linear_weights: np.ndarray | None = None
    linear_center: np.ndarray | None = None
    linear_alpha: float | None = None

    def __len__(self) -> int:
        return int(self.perturbations.shape[0])

    def to_dict(self) -> dict:
        """Plain arrays (strings as unicode arrays), for saving with the model."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray) and value.dtype == object:
                value = value.astype(str)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, state: dict) -> RetrievalMemory:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in known})

    def entry_names(self) -> np.ndarray:
        """Readable name of each entry (``"GENE"`` or ``"GENE@cell type"``)."""
        if self.kind == "embedding":
            return self.perturbations.astype(str)
        return np.char.add(np.char.add(self.perturbations.astype(str), "@"), self.cell_types.astype(str))

    # ------------------------------------------------------------------ evidence
    @property
    def context_full(self) -> np.ndarray:
        """``(C, G)`` mean response of each cell type's entries."""
        return (self.context_sums / self.context_counts[:, None]).astype(np.float32)

    @property
    def global_context(self) -> np.ndarray:
        """Mean over cell types of their context: the context of a cell type without entries."""
        return self.context_full.mean(axis=0)

    @property
    def specific(self) -> np.ndarray:
        """``(M, G)`` each entry's response minus its cell type's context."""
        rows = pd.Index(self.context_cell_types.astype(str)).get_indexer(self.cell_types.astype(str))
        return (self.responses - self.context_full[rows]).astype(np.float32)

    def entry_index(self, perturbations: np.ndarray, cell_types: np.ndarray) -> np.ndarray:
        """Entry of each (perturbation, cell type) query, ``-1`` when absent."""
        names = np.char.add(np.char.add(np.asarray(perturbations).astype(str), "@"), np.asarray(cell_types).astype(str))
        return pd.Index(self.entry_names()).get_indexer(names)

    def contexts(self, perturbations: np.ndarray, cell_types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Context responses of queries: leaving the query's own entry out, and all entries.

        For a query (q, c) the first is the mean of the memory's (p, c) responses over
        ``p != q`` — the cell type's generic response to being perturbed, without the query's
        own answer. A cell type without (other) entries gets the mean context of the other
        cell types.

        Returns
        -------
        ``(leave_one_out, full)``, each ``(n, G)`` float32.
        """
        cell_types = np.asarray(cell_types).astype(str)
        n, n_genes = cell_types.shape[0], self.responses.shape[1]
        row = pd.Index(self.context_cell_types.astype(str)).get_indexer(cell_types)
        known = row >= 0
        fallback = self.global_context
        full = np.tile(fallback, (n, 1)).astype(np.float32)
        full[known] = self.context_full[row[known]]
        sums = np.zeros((n, n_genes))
        counts = np.zeros(n)
        sums[known] = self.context_sums[row[known]]
        counts[known] = self.context_counts[row[known]]
        own = self.entry_index(perturbations, cell_types)
        has_own = own >= 0
        sums[has_own] -= self.responses[own[has_own]]
        counts[has_own] -= 1
        loo = np.tile(fallback, (n, 1)).astype(np.float32)
        valid = counts > 0
        loo[valid] = sums[valid] / counts[valid, None]
        return loo, full

    def linear(self, perturbations: np.ndarray, cell_types: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """Ridge estimate of each query's specific shift (leave-one-out for memory entries), ``(n, G)``."""
        out = ((np.asarray(embeddings, dtype=np.float64) - self.linear_center) @ self.linear_weights).astype(np.float32)
        own = self.entry_index(perturbations, cell_types)
        out[own >= 0] = self.linear_loo[own[own >= 0]]
        return out


def build_memory(
    kind: MemoryKind,
    *,
    X,
    perturbations: np.ndarray,
    cell_types: np.ndarray,
    is_control: np.ndarray,
    train_mask: np.ndarray,
    encoder: PerturbationEncoder,
    n_response_components: int = 64,
) -> RetrievalMemory:
    """Build the memory from the training cells of an expression matrix.

    Only cells with ``train_mask`` contribute, and the response of a (perturbation, cell type)
    entry is the mean of its training cells minus the mean of that cell type's training
    control cells. See :func:`memory_from_means` for the rest.
    """
    perturbations = np.asarray(perturbations).astype(str)
    cell_types = np.asarray(cell_types).astype(str)
    perturbed = train_mask & ~is_control
    if not perturbed.any():
        raise ValueError("The training split holds no perturbed cells: nothing to build the memory from.")
    keys = pd.MultiIndex.from_arrays([perturbations[perturbed], cell_types[perturbed]])
    codes, uniques = pd.factorize(keys, sort=True)
    entry_of_cell = np.full(perturbations.shape[0], -1, dtype=np.int64)
    entry_of_cell[perturbed] = codes
    entry_pert = np.asarray(uniques.get_level_values(0), dtype=object)
    entry_ct = np.asarray(uniques.get_level_values(1), dtype=object)
    control_ct = pd.Index(np.unique(entry_ct))
    ctrl_codes = np.full(perturbations.shape[0], -1, dtype=np.int64)
    ctrl_mask = train_mask & is_control
    ctrl_codes[ctrl_mask] = control_ct.get_indexer(cell_types[ctrl_mask])
    ctrl_counts = np.bincount(ctrl_codes[ctrl_codes >= 0], minlength=len(control_ct))
    if kind == "response" and np.any(ctrl_counts == 0):
        missing = control_ct[ctrl_counts == 0].tolist()
        raise ValueError(
            f"No training control cells for cell type(s) {missing}: the response memory needs "
            "them to measure shifts."
        )
    entry_means = group_means(X, entry_of_cell, len(uniques)) if kind == "response" else None
    control_means = group_means(X, ctrl_codes, len(control_ct)) if kind == "response" else None
    return memory_from_means(
        kind,
        perturbations=entry_pert,
        cell_types=entry_ct,
        entry_means=entry_means,
        control_means=None if control_means is None else control_means[control_ct.get_indexer(entry_ct)],
        n_cells=np.bincount(codes, minlength=len(uniques)),
        encoder=encoder,
        n_response_components=n_response_components,
    )


def memory_from_means(
    kind: MemoryKind,
    *,
    perturbations: np.ndarray,
    cell_types: np.ndarray,
    entry_means: np.ndarray | None,
    control_means: np.ndarray | None,
    n_cells: np.ndarray,
    encoder: PerturbationEncoder,
    n_response_components: int = 64,
) -> RetrievalMemory:
    """The memory from per-entry means (the data layer streams them from the training cells).

    Parameters
    ----------
    kind
        ``"response"`` or ``"embedding"``.
    perturbations, cell_types
        One (perturbation, cell type) pair per entry, ``(M,)``.
    entry_means, control_means
        ``(M, G)`` mean of each entry's training cells and of its cell type's training
        controls (response memories; ``None`` for embedding memories).
    n_cells
        Training cells per entry.
    encoder
        Gene embeddings of the perturbations.
    n_response_components
        Size of the response codes read by the candidate encoder.
    """
    if kind not in MEMORY_KINDS:
        raise ValueError(f"`memory` must be one of {list(MEMORY_KINDS)}, got {kind!r}.")
    perturbations = np.asarray(perturbations).astype(str)
    cell_types = np.asarray(cell_types).astype(str)
    if kind == "embedding":
        labels, inverse = np.unique(perturbations, return_inverse=True)
        counts = np.bincount(inverse, weights=np.asarray(n_cells, dtype=np.float64), minlength=len(labels)).astype(np.int64)
        return RetrievalMemory(
            kind=kind,
            perturbations=labels,
            cell_types=np.full(labels.shape[0], "", dtype="<U1"),
            embeddings=encoder.embed(labels),
            responses=None,
            n_cells=counts,
        )
    responses = np.asarray(entry_means, dtype=np.float64) - np.asarray(control_means, dtype=np.float64)
    context_cts, ct_code = np.unique(cell_types, return_inverse=True)
    context_sums = np.zeros((len(context_cts), responses.shape[1]))
    np.add.at(context_sums, ct_code, responses)
    context_counts = np.bincount(ct_code, minlength=len(context_cts)).astype(np.int64)
    specific = responses - (context_sums / context_counts[:, None])[ct_code]
    embeddings = encoder.embed(perturbations)
    loo, weights, center, alpha = ridge_leave_one_out(embeddings, specific)
    basis = principal_basis(specific, n_response_components)
    return RetrievalMemory(
        kind=kind,
        perturbations=perturbations,
        cell_types=cell_types,
        embeddings=embeddings,
        responses=responses.astype(np.float32),
        n_cells=np.asarray(n_cells, dtype=np.int64),
        response_codes=(specific @ basis).astype(np.float32),
        response_basis=basis,
        context_cell_types=context_cts.astype(str),
        context_sums=context_sums,
        context_counts=context_counts,
        linear_loo=loo.astype(np.float32),
        linear_weights=weights.astype(np.float32),
        linear_center=center.astype(np.float32),
        linear_alpha=float(alpha),
    )


def ridge_leave_one_out(
    embeddings: np.ndarray, targets: np.ndarray, grid: tuple[float, ...] = RIDGE_GRID
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Ridge regression of ``targets`` on centred ``embeddings``, with leave-one-out predictions.

    Through the thin SVD ``E - e_bar = U S V^T`` every penalty of ``grid`` (times the mean
    squared singular value) costs one pass: the fitted values are ``U diag(s²/(s²+a)) U^T Y``,
    the leverages ``h = sum_j U_ij² s_j²/(s_j²+a) + 1/M`` and the leave-one-out predictions
    ``(fit - h y) / (1 - h)``. The penalty with the lowest leave-one-out squared error is kept.

    Returns
    -------
    ``(leave-one-out predictions (M, G), weights (D, G), centre (D,), penalty)``.
    """
    E = np.asarray(embeddings, dtype=np.float64)
    Y = np.asarray(targets, dtype=np.float64)
    center = E.mean(axis=0)
    n = E.shape[0]
    if n < 2:
        return np.zeros_like(Y), np.zeros((E.shape[1], Y.shape[1])), center, float("nan")
    U, s, Vt = np.linalg.svd(E - center, full_matrices=False)
    keep = s > s.max() * 1e-10 if s.size else s > 0
    U, s, Vt = U[:, keep], s[keep], Vt[keep]
    projected = U.T @ Y
    scale = float(np.mean(s**2)) if s.size else 1.0
    best = None
    for factor in grid:
        alpha = factor * scale
        shrink = s**2 / (s**2 + alpha)
        fit = (U * shrink) @ projected
        leverage = np.minimum((U**2) @ shrink + 1.0 / n, 1.0 - 1e-6)
        loo = (fit - leverage[:, None] * Y) / (1.0 - leverage[:, None])
        error = float(np.square(loo - Y).sum())
        if best is None or error < best[0]:
            best = (error, alpha, loo, s / (s**2 + alpha))
    _, alpha, loo, gain = best
    weights = (Vt.T * gain) @ projected
    return loo, weights, center, alpha


def principal_basis(responses: np.ndarray, n_components: int) -> np.ndarray:
    """Top principal directions (not centred, sign-fixed) of the rows, as ``(G, c)`` float32."""
    responses = np.asarray(responses, dtype=np.float64)
    k = min(n_components, *responses.shape)
    _, _, vt = np.linalg.svd(responses, full_matrices=False)
    vt = vt[:k]
    signs = np.sign(vt[np.arange(k), np.abs(vt).argmax(axis=1)])
    signs[signs == 0] = 1
    return (vt * signs[:, None]).T.astype(np.float32)


def memory_from_cells(
    kind: MemoryKind,
    data,
    train_mask: np.ndarray,
    encoder: PerturbationEncoder,
    *,
    n_response_components: int = 64,
) -> RetrievalMemory:
    """The memory of the training cells of a :class:`~ptrag_sc.data.PerturbationData` view.

    Means are streamed by chunks from the expression (in memory, sparse or on disk) in the
    model's gene order; see :func:`memory_from_means`.
    """
    perturbed = train_mask & ~data.is_control
    if not perturbed.any():
        raise ValueError("The training split holds no perturbed cells: nothing to build the memory from.")
    keys = pd.MultiIndex.from_arrays([data.labels[perturbed].astype(str), data.cell_types[perturbed].astype(str)])
    codes, uniques = pd.factorize(keys, sort=True)
    entry_of_cell = np.full(data.n_obs, -1, dtype=np.int64)
    entry_of_cell[perturbed] = codes
    entry_pert = np.asarray(uniques.get_level_values(0)).astype(str)
    entry_ct = np.asarray(uniques.get_level_values(1)).astype(str)
    n_cells = np.bincount(codes, minlength=len(uniques))
    if kind == "embedding":
        return memory_from_means(kind, perturbations=entry_pert, cell_types=entry_ct, entry_means=None, control_means=None, n_cells=n_cells, encoder=encoder)
    control_ct = pd.Index(np.unique(entry_ct))
    ctrl_mask = train_mask & data.is_control
    ctrl_codes = np.full(data.n_obs, -1, dtype=np.int64)
    ctrl_codes[ctrl_mask] = control_ct.get_indexer(data.cell_types[ctrl_mask].astype(str))
    ctrl_counts = np.bincount(ctrl_codes[ctrl_codes >= 0], minlength=len(control_ct))
    if np.any(ctrl_counts == 0):
        missing = control_ct[ctrl_counts == 0].tolist()
        raise ValueError(f"No training control cells for cell type(s) {missing}: the response memory needs them to measure shifts.")
    # One streaming pass for the entries and the controls together.
    codes_all = np.where(entry_of_cell >= 0, entry_of_cell, np.where(ctrl_codes >= 0, ctrl_codes + len(uniques), -1))
    means = data.means(codes_all, len(uniques) + len(control_ct))
    entry_means, control_means = means[: len(uniques)], means[len(uniques) :]
    return memory_from_means(
        kind,
        perturbations=entry_pert,
        cell_types=entry_ct,
        entry_means=entry_means,
        control_means=control_means[control_ct.get_indexer(entry_ct)],
        n_cells=n_cells,
        encoder=encoder,
        n_response_components=n_response_components,
    )
