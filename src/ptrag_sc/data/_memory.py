"""The retrieval memory, built from training cells only, and the evidence it precomputes.

A response memory holds one entry per training (perturbation, cell type) pair with its measured
mean shift from that cell type's controls. From it the model reads, for a query (q, c), with the
query's own entry always left out:

- the context response: the mean shift of the cell type's *other* perturbations;
- the stage-1 candidates' perturbation-specific shifts (shift minus their cell type's context);
- the stacked evidence: a non-negative combination of the sources of
  :data:`~ptrag_sc.data.EVIDENCE_SOURCES` (ridge maps from the gene embedding, Ahlmann-Eltze et
  al. 2025, and from GO annotations; nearest neighbours; the same gene in other cell types),
  with weights fitted on the entries' leave-one-out estimates (stacked regression).
"""

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
    from ._annotations import GeneAnnotations
    from ._cells import PerturbationData
    from ._matrix import MatrixLike
    from ._perturbations import PerturbationEncoder


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
    gene_names
        The ``G`` genes of the responses (the model's genes), to find a perturbed gene's own
        column.
    response_codes, response_basis
        Specific shifts projected on their top principal directions ``(M, c)`` and the
        ``(G, c)`` directions: what the candidate encoder reads.
    context_cell_types, context_sums, context_counts
        Cell types with entries, the sum of their entries' responses ``(C, G)`` and how many.
    annotation_terms, annotation_indptr, annotation_indices
        The entries' annotation terms (GO), as a CSR matrix ``(M, T)``.
    sources
        What each evidence source fitted, by source name (:mod:`~ptrag_sc.data._sources`):
        ``linear_embedding`` (``weights`` ``(D, G)``, ``center`` ``(D,)``, ridge penalty
        ``alpha``), ``linear_annotation`` (``projection`` ``(T, r)``, ``weights`` ``(r, G)``,
        ``center`` ``(r,)``, ``alpha``).
    evidence_model
        The fitted combination of the sources (:class:`~ptrag_sc.data._evidence.EvidenceModel`).
    entry_estimates, entry_confidence
        Each entry's evidence estimate of its specific shift ``(M, G)`` and its confidence
        ``(M,)``, computed with its own entry left out: what a training set of that entry reads.
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
        """Plain arrays and numbers by name (strings as unicode arrays), for saving with the model.

        What the sources fitted and the evidence model are flattened as
        ``"sources.<source>.<name>"`` and ``"evidence_model.<name>"``.
        """
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "sources":
                for source, fitted in (value or {}).items():
                    out.update({f"sources.{source}.{k}": v for k, v in fitted.items()})
                continue
            if f.name == "evidence_model":
                if value is not None:
                    out.update({f"evidence_model.{k}": v for k, v in value.to_dict().items()})
                continue
            out[f.name] = _plain(value)
        return {k: _plain(v) for k, v in out.items()}

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
        return np.char.add(
            np.char.add(self.perturbations.astype(str), "@"), self.cell_types.astype(str)
        )

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
        rows = pd.Index(self.context_cell_types.astype(str)).get_indexer(
            self.cell_types.astype(str)
        )
        return (self.responses - self.context_full[rows]).astype(np.float32)

    def entry_index(self, perturbations: np.ndarray, cell_types: np.ndarray) -> np.ndarray:
        """Entry of each (perturbation, cell type) query, ``-1`` when absent."""
        names = np.char.add(
            np.char.add(np.asarray(perturbations).astype(str), "@"),
            np.asarray(cell_types).astype(str),
        )
        return pd.Index(self.entry_names()).get_indexer(names)

    def contexts(
        self, perturbations: np.ndarray, cell_types: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
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
            The queries, their gene embeddings ``(n, D)`` and annotation rows ``(n, T)`` (in the
            memory's term vocabulary; ``None``: none).
        control_mean
            ``(n, G)`` control mean of each query's cells, for the rule on the perturbed gene's
            own expression (``None``: not applied).
        sep
            Separator of combination labels.

        Returns
        -------
        ``context`` (leave-one-out context response), ``context_full`` and ``stacked`` (the
        evidence's estimate of the specific shift), each ``(n, G)`` float32, ``confidence``
        ``(n,)`` and ``reliability`` ``(n,)``, the cell type's trust times the query's gate (the
        scale of the stacked sources; NaN for memory entries, whose estimates were computed
        with their own entry left out).
        """
        return ev.query(
            self, perturbations, cell_types, embeddings, annotations, control_mean, sep
        )


def _plain(value: object) -> object:
    if isinstance(value, np.ndarray) and value.dtype == object:
        return value.astype(str)
    return value


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

    A convenience for arrays; the model builds its memory with :func:`memory_from_cells`
    (streamed expression, GO annotations, the ``evidence`` option). Here no annotations are
    used (the annotation sources are zero) and the other evidence sources are all stacked. Only
    cells with ``train_mask`` contribute, and the response of a (perturbation, cell type)
    entry is the mean of its training cells minus the mean of that cell type's training
    control cells. See :func:`memory_from_means` for the rest.
    """
    perturbations = np.asarray(perturbations).astype(str)
    cell_types = np.asarray(cell_types).astype(str)
    perturbed = train_mask & ~is_control
    if not perturbed.any():
        raise ValueError(
            "The training split holds no perturbed cells: nothing to build the memory from."
        )
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
        control_means=None
        if control_means is None
        else control_means[control_ct.get_indexer(entry_ct)],
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
    perturbed = train_mask & ~data.is_control
    if not perturbed.any():
        raise ValueError(
            "The training split holds no perturbed cells: nothing to build the memory from."
        )
    keys = pd.MultiIndex.from_arrays(
        [data.labels[perturbed].astype(str), data.cell_types[perturbed].astype(str)]
    )
    codes, uniques = pd.factorize(keys, sort=True)
    entry_of_cell = np.full(data.n_obs, -1, dtype=np.int64)
    entry_of_cell[perturbed] = codes
    entry_pert = np.asarray(uniques.get_level_values(0)).astype(str)
    entry_ct = np.asarray(uniques.get_level_values(1)).astype(str)
    n_cells = np.bincount(codes, minlength=len(uniques))
    if kind == "embedding":
        return memory_from_means(
            kind,
            perturbations=entry_pert,
            cell_types=entry_ct,
            entry_means=None,
            control_means=None,
            n_cells=n_cells,
            encoder=encoder,
        )
    control_ct = pd.Index(np.unique(entry_ct))
    ctrl_mask = train_mask & data.is_control
    ctrl_codes = np.full(data.n_obs, -1, dtype=np.int64)
    ctrl_codes[ctrl_mask] = control_ct.get_indexer(data.cell_types[ctrl_mask].astype(str))
    ctrl_counts = np.bincount(ctrl_codes[ctrl_codes >= 0], minlength=len(control_ct))
    if np.any(ctrl_counts == 0):
        missing = control_ct[ctrl_counts == 0].tolist()
        raise ValueError(
            f"No training control cells for cell type(s) {missing}: the response memory needs "
            "them to measure shifts."
        )
    # One streaming pass for the entries and the controls together.
    codes_all = np.where(
        entry_of_cell >= 0, entry_of_cell, np.where(ctrl_codes >= 0, ctrl_codes + len(uniques), -1)
    )
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
        annotations=annotations,
        sep=sep,
        evidence=evidence,
        gene_names=data.var_names,
    )
