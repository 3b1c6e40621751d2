"""The retrieval memory, built from training cells only, and the evidence it precomputes."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._constants import MEMORY_KINDS, MemoryKind
from . import _evidence as ev
from ._matrix import group_means

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._annotations import GeneAnnotations
    from ._cells import PerturbationData
    from ._matrix import MatrixLike
    from ._perturbations import PerturbationEncoder


@dataclass
class RetrievalMemory:
    """What stage 1 retrieves from, and the evidence derived from it.

    The fields after ``n_cells`` are those of response memories (``None`` for embedding ones).

    Attributes
    ----------
    kind
        ``"embedding"``: one entry per training perturbation (the paper). ``"response"``: one
        per training (perturbation, cell type) pair, with its measured mean shift from that cell
        type's controls.
    perturbations, cell_types
        ``(M,)`` label and cell type of each entry (cell type ``""`` in embedding memories).
    embeddings
        ``(M, D)`` gene embedding of each entry.
    responses
        ``(M, G)`` mean shift of each entry.
    n_cells
        Training cells behind each entry.
    gene_names
        The model's ``G`` genes, to find a perturbed gene's own column.
    response_codes, response_basis
        ``(M, c)`` specific shifts on their top ``(G, c)`` principal directions (what the
        candidate encoder reads).
    context_cell_types, context_sums, context_counts
        Cell types with entries, the ``(C, G)`` sum of their entries' responses and how many.
    annotation_terms, annotation_indptr, annotation_indices
        The entries' ``(M, T)`` annotation terms (GO), as CSR.
    sources
        What each evidence source fitted, by source name.
    evidence_model
        The fitted combination of the sources.
    entry_estimates, entry_confidence
        ``(M, G)`` evidence estimate of each entry's specific shift and ``(M,)`` confidence,
        with its own entry left out: what a training set of that entry reads.
    """

    kind: str
    perturbations: np.ndarray
    cell_types: np.ndarray
    embeddings: np.ndarray
    responses: np.ndarray | None
    n_cells: np.ndarray
    gene_names: np.ndarray | None = None
    response_codes: np.ndarray | None = None
    response_basis: np.ndarray | None = None
    context_cell_types: np.ndarray | None = None
    context_sums: np.ndarray | None = None
    context_counts: np.ndarray | None = None
    annotation_terms: np.ndarray | None = None
    annotation_indptr: np.ndarray | None = None
    annotation_indices: np.ndarray | None = None
    sources: dict[str, dict[str, np.ndarray]] | None = None
    evidence_model: ev.EvidenceModel | None = None
    entry_estimates: np.ndarray | None = None
    entry_confidence: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.perturbations.shape[0])

    def to_dict(self) -> dict:
        """Plain arrays and numbers by name (strings as unicode arrays), for saving: the sources
        and the evidence model flattened as ``"sources.<source>.<name>"`` and
        ``"evidence_model.<name>"``."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "sources":
                for source, fitted in (value or {}).items():
                    out.update({f"sources.{source}.{k}": v for k, v in fitted.items()})
            elif f.name == "evidence_model":
                if value is not None:
                    out.update({f"evidence_model.{k}": v for k, v in value.to_dict().items()})
            else:
                out[f.name] = value
        return {
            k: v.astype(str) if isinstance(v, np.ndarray) and v.dtype == object else v
            for k, v in out.items()
        }

    @classmethod
    def from_dict(cls, state: dict) -> RetrievalMemory:
        known = {f.name for f in fields(cls)} - {"sources", "evidence_model"}
        kwargs = {k: v for k, v in state.items() if k in known}
        sources: dict[str, dict] = {}
        for key, value in state.items():
            if key.startswith("sources."):
                source, name = key.removeprefix("sources.").split(".", 1)
                sources.setdefault(source, {})[name] = value
        model = {
            k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("evidence_model.")
        }
        return cls(
            **kwargs,
            sources=sources or None,
            evidence_model=ev.EvidenceModel.from_dict(model) if model else None,
        )

    def entry_names(self) -> np.ndarray:
        """Readable name of each entry (``"GENE"`` or ``"GENE@cell type"``)."""
        if self.kind == "embedding":
            return self.perturbations.astype(str)
        return _entry_names(self.perturbations, self.cell_types)

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
        rows = pd.Index(self.context_cell_types.astype(str)).get_indexer(
            self.cell_types.astype(str)
        )
        return (self.responses - self.context_full[rows]).astype(np.float32)

    def entry_index(self, perturbations: np.ndarray, cell_types: np.ndarray) -> np.ndarray:
        """Entry of each (perturbation, cell type) query, ``-1`` when absent."""
        return pd.Index(self.entry_names()).get_indexer(_entry_names(perturbations, cell_types))

    def contexts(
        self, perturbations: np.ndarray, cell_types: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(n, G)`` float32 context responses of queries (q, c), the mean response of c's
        entries: ``(over p != q, over all)``. A cell type without (other) entries gets the mean
        context of the others."""
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

    def annotation_matrix(self) -> sp.csr_matrix:
        """The entries' binary annotation matrix ``(M, T)``."""
        n_terms = 0 if self.annotation_terms is None else len(self.annotation_terms)
        data = np.ones(len(self.annotation_indices), dtype=np.float32)
        return sp.csr_matrix(
            (data, self.annotation_indices, self.annotation_indptr), shape=(len(self), n_terms)
        )

    def evidence(
        self,
        perturbations: np.ndarray,
        cell_types: np.ndarray,
        embeddings: np.ndarray,
        annotations: sp.csr_matrix | None,
        control_mean: np.ndarray | None = None,
        *,
        sep: str = "+",
    ) -> dict[str, np.ndarray]:
        """The evidence of each (perturbation, cell type) query, its own entry left out.

        Parameters
        ----------
        perturbations, cell_types, embeddings, annotations
            The queries, their ``(n, D)`` gene embeddings and ``(n, T)`` annotation rows in the
            memory's term vocabulary (``None``: none).
        control_mean
            ``(n, G)`` control mean of each query, for the rule on the perturbed gene's own
            expression (``None``: not applied).
        sep
            Separator of combination labels.

        Returns
        -------
        ``context`` (leave-one-out context response), ``context_full`` and ``stacked`` (the
        estimate of the specific shift), each ``(n, G)`` float32; ``(n,)`` ``confidence`` and
        ``reliability``, the cell type's trust times the query's gate (NaN for memory entries).
        """
        return ev.query(
            self, perturbations, cell_types, embeddings, annotations, control_mean, sep
        )


def _entry_names(perturbations: np.ndarray, cell_types: np.ndarray) -> np.ndarray:
    pairs = np.char.add(np.asarray(perturbations).astype(str), "@")
    return np.char.add(pairs, np.asarray(cell_types).astype(str))


def build_memory(
    kind: MemoryKind,
    *,
    X: MatrixLike,
    perturbations: np.ndarray,
    cell_types: np.ndarray,
    is_control: np.ndarray,
    train_mask: np.ndarray,
    encoder: PerturbationEncoder,
    n_response_components: int = 64,
) -> RetrievalMemory:
    """Build a memory from the training cells of an in-memory expression matrix.

    A convenience for arrays; the model uses :func:`memory_from_cells` (streamed expression,
    GO annotations, the ``evidence`` option). Here the annotation sources are zero and the others
    all stacked. An entry's response is the mean of its ``train_mask`` cells minus that of its
    cell type's training controls; see :func:`memory_from_means` for the rest.
    """
    return _from_training_cells(
        kind,
        np.asarray(perturbations).astype(str),
        np.asarray(cell_types).astype(str),
        is_control,
        train_mask,
        lambda codes, n_groups: group_means(X, codes, n_groups),
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
    annotations: GeneAnnotations | None = None,
    sep: str = "+",
    evidence: tuple[str, ...] | None = None,
    gene_names: np.ndarray | None = None,
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
    annotations
        Gene annotations for the annotation sources of the evidence (``None``: not used).
    sep
        Separator of combination labels.
    evidence
        The evidence sources to stack (:data:`~ptrag_sc.data.EVIDENCE_SOURCES`; default all).
    gene_names
        The ``G`` genes, for the rule on a perturbed gene's own expression (``None``: not used).
    """
    if kind not in MEMORY_KINDS:
        raise ValueError(f"`memory` must be one of {list(MEMORY_KINDS)}, got {kind!r}.")
    perturbations = np.asarray(perturbations).astype(str)
    cell_types = np.asarray(cell_types).astype(str)
    if kind == "embedding":
        labels, inverse = np.unique(perturbations, return_inverse=True)
        counts = np.bincount(
            inverse, weights=np.asarray(n_cells, dtype=np.float64), minlength=len(labels)
        ).astype(np.int64)
        return RetrievalMemory(
            kind=kind,
            perturbations=labels,
            cell_types=np.full(labels.shape[0], "", dtype="<U1"),
            embeddings=encoder.embed(labels),
            responses=None,
            n_cells=counts,
        )
    control_means = np.asarray(control_means, dtype=np.float64)
    responses = np.asarray(entry_means, dtype=np.float64) - control_means
    context_cts, ct_code = np.unique(cell_types, return_inverse=True)
    context_sums = np.zeros((len(context_cts), responses.shape[1]))
    np.add.at(context_sums, ct_code, responses)
    context_counts = np.bincount(ct_code, minlength=len(context_cts)).astype(np.int64)
    specific = responses - (context_sums / context_counts[:, None])[ct_code]
    memory = RetrievalMemory(
        kind=kind,
        perturbations=perturbations,
        cell_types=cell_types,
        embeddings=encoder.embed(perturbations),
        responses=responses.astype(np.float32),
        n_cells=np.asarray(n_cells, dtype=np.int64),
        gene_names=None if gene_names is None else np.asarray(gene_names).astype(str),
        context_cell_types=context_cts.astype(str),
        context_sums=context_sums,
        context_counts=context_counts,
    )
    basis = principal_basis(specific, n_response_components)
    memory.response_codes = (specific @ basis).astype(np.float32)
    memory.response_basis = basis
    ev.fit(memory, specific, control_means, annotations, sep, evidence)
    return memory


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
    data: PerturbationData,
    train_mask: np.ndarray,
    encoder: PerturbationEncoder,
    *,
    n_response_components: int = 64,
    annotations: GeneAnnotations | None = None,
    sep: str = "+",
    evidence: tuple[str, ...] | None = None,
) -> RetrievalMemory:
    """The memory of the training cells of a :class:`~ptrag_sc.data.PerturbationData` view.

    Means are streamed by chunks from the expression (in memory, sparse or on disk) in the
    model's gene order; see :func:`memory_from_means`.
    """
    return _from_training_cells(
        kind,
        data.labels,
        data.cell_types,
        data.is_control,
        train_mask,
        data.means,
        encoder=encoder,
        n_response_components=n_response_components,
        annotations=annotations,
        sep=sep,
        evidence=evidence,
        gene_names=data.var_names,
    )


def _from_training_cells(
    kind: MemoryKind,
    labels: np.ndarray,
    cell_types: np.ndarray,
    is_control: np.ndarray,
    train_mask: np.ndarray,
    means: Callable[[np.ndarray, int], np.ndarray],
    **options: object,
) -> RetrievalMemory:
    """The memory of the training cells, ``means(codes, n_groups)`` giving group means."""
    perturbed = train_mask & ~is_control
    if not perturbed.any():
        raise ValueError(
            "The training split holds no perturbed cells: nothing to build the memory from."
        )
    keys = pd.MultiIndex.from_arrays(
        [labels[perturbed].astype(str), cell_types[perturbed].astype(str)]
    )
    codes, uniques = pd.factorize(keys, sort=True)
    n_entries = len(uniques)
    entry_of_cell = np.full(len(labels), -1, dtype=np.int64)
    entry_of_cell[perturbed] = codes
    entries = {
        "perturbations": np.asarray(uniques.get_level_values(0)).astype(str),
        "cell_types": np.asarray(uniques.get_level_values(1)).astype(str),
        "n_cells": np.bincount(codes, minlength=n_entries),
        "encoder": options.pop("encoder"),
    }
    if kind != "response":
        return memory_from_means(kind, entry_means=None, control_means=None, **entries)
    control_ct = pd.Index(np.unique(entries["cell_types"]))
    ctrl_mask = train_mask & is_control
    ctrl_codes = np.full(len(labels), -1, dtype=np.int64)
    ctrl_codes[ctrl_mask] = control_ct.get_indexer(cell_types[ctrl_mask].astype(str))
    ctrl_counts = np.bincount(ctrl_codes[ctrl_codes >= 0], minlength=len(control_ct))
    if np.any(ctrl_counts == 0):
        missing = control_ct[ctrl_counts == 0].tolist()
        raise ValueError(
            f"No training control cells for cell type(s) {missing}: the response memory needs "
            "them to measure shifts."
        )
    # One streaming pass for the entries and the controls together.
    codes_all = np.where(
        entry_of_cell >= 0, entry_of_cell, np.where(ctrl_codes >= 0, ctrl_codes + n_entries, -1)
    )
    all_means = means(codes_all, n_entries + len(control_ct))
    return memory_from_means(
        kind,
        entry_means=all_means[:n_entries],
        control_means=all_means[n_entries:][control_ct.get_indexer(entries["cell_types"])],
        **entries,
        **options,
    )
