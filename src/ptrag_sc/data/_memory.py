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
from ._annotations import GeneAnnotations, jaccard
from ._matrix import group_means

if TYPE_CHECKING:
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
        The ``G`` genes of the responses (the model's genes), to find a perturbed gene's own column.
    response_codes, response_basis
        Specific shifts projected on their top principal directions ``(M, c)`` and the
        ``(G, c)`` directions: what the candidate encoder reads.
    context_cell_types, context_sums, context_counts
        Cell types with entries, the sum of their entries' responses ``(C, G)`` and how many.
    annotation_terms, annotation_indptr, annotation_indices
        The entries' annotation terms (GO), as a CSR matrix ``(M, T)``.
    sources
        The evidence sources' maps: ``linear_embedding`` (weights ``(D, G)``, centre
        ``(D,)``), ``linear_annotation`` (projection ``(T, r)``, weights ``(r, G)``, centre
        ``(r,)``), and their ridge penalties.
    evidence
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
    sources: dict[str, np.ndarray] | None = None
    evidence_model: ev.EvidenceModel | None = None
    entry_estimates: np.ndarray | None = None
    entry_confidence: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.perturbations.shape[0])

    def to_dict(self) -> dict:
        """Plain arrays and numbers by name (strings as unicode arrays), for saving with the model.

        The source maps and the evidence model are flattened as ``"sources.<name>"`` and
        ``"evidence_model.<name>"``.
        """
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "sources":
                out.update({f"sources.{k}": v for k, v in (value or {}).items()})
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
        sources = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("sources.")}
        model = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("evidence_model.")}
        return cls(
            **kwargs,
            sources=sources or None,
            evidence_model=ev.EvidenceModel.from_dict(model) if model else None,
        )

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

    def annotation_matrix(self) -> sp.csr_matrix:
        """The entries' binary annotation matrix ``(M, T)``."""
        n_terms = 0 if self.annotation_terms is None else len(self.annotation_terms)
        data = np.ones(len(self.annotation_indices), dtype=np.float32)
        return sp.csr_matrix((data, self.annotation_indices, self.annotation_indptr), shape=(len(self), n_terms))

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
        perturbations = np.asarray(perturbations).astype(str)
        cell_types = np.asarray(cell_types).astype(str)
        context, full = self.contexts(perturbations, cell_types)
        own = self.entry_index(perturbations, cell_types)
        stacked = np.zeros_like(context)
        confidence = np.zeros(len(perturbations))
        reliability = np.full(len(perturbations), np.nan)
        is_entry = own >= 0
        stacked[is_entry] = self.entry_estimates[own[is_entry]]
        confidence[is_entry] = self.entry_confidence[own[is_entry]]
        new = np.flatnonzero(~is_entry)
        model = self.evidence_model
        for start in range(0, new.size, ev.CHUNK):
            rows = new[start : start + ev.CHUNK]
            sources, features = self._query_sources(
                perturbations[rows], cell_types[rows], embeddings[rows], None if annotations is None else annotations[rows], context[rows]
            )
            trust = model.per_cell_type(cell_types[rows], model.cell_type_trust, model.trust_all)
            columns = ev.own_gene_columns(perturbations[rows], self.gene_names, sep)
            estimate = np.tensordot(model.stack_weights, sources, axes=1) * trust[:, None]
            features = ev.gate_features(
                sources,
                estimate,
                typical_size=model.per_cell_type(cell_types[rows], model.typical_size, float(np.mean(model.typical_size))),
                cell_type_trust=trust,
                own_gene_measured=np.array([len(c) > 0 for c in columns], dtype=float) * (control_mean is not None),
                members_measured=self._members_measured(perturbations[rows], cell_types[rows], sep),
                **features,
            )
            gate = model.gate(features)
            estimate = estimate * gate[:, None]
            reliability[rows] = trust * gate
            if control_mean is not None:
                ratio = model.per_cell_type(cell_types[rows], model.own_gene_ratio, model.own_gene_ratio_all)
                ratio = np.where(np.isfinite(ratio), ratio, model.own_gene_ratio_all)
                estimate = ev.apply_own_gene(estimate, context[rows], np.asarray(control_mean)[rows], columns, ratio)
            estimate = self._additive(perturbations[rows], cell_types[rows], context[rows], estimate, sep)
            stacked[rows] = estimate
            confidence[rows] = model.confidence(features)
        return {
            "context": context,
            "context_full": full,
            "stacked": stacked,
            "confidence": confidence.astype(np.float32),
            "reliability": reliability.astype(np.float32),
        }

    def _members_measured(self, perturbations: np.ndarray, cell_types: np.ndarray, sep: str) -> np.ndarray:
        """Fraction of each combination's members with an entry in its cell type (0 for single perturbations)."""
        out = np.zeros(len(perturbations))
        for i, label in enumerate(perturbations):
            members = str(label).split(sep)
            if len(members) > 1:
                out[i] = np.mean(self.entry_index(np.array(members), np.full(len(members), cell_types[i])) >= 0)
        return out

    def _additive(self, perturbations: np.ndarray, cell_types: np.ndarray, context: np.ndarray, estimate: np.ndarray, sep: str) -> np.ndarray:
        """Combinations' specific shifts by the additive model: the sum of the members' shifts in
        the query's cell type (measured, or its context response where a member was not),
        minus the query's context. Single perturbations keep ``estimate``."""
        members = [str(p).split(sep) for p in perturbations]
        combos = np.flatnonzero([len(m) > 1 for m in members])
        if combos.size == 0:
            return estimate
        out = estimate.copy()
        _, full = self.contexts(perturbations[combos], cell_types[combos])
        for row, i in enumerate(combos):
            entries = self.entry_index(np.array(members[i]), np.full(len(members[i]), cell_types[i]))
            measured = entries[entries >= 0]
            total = self.responses[measured].sum(axis=0) + (len(entries) - measured.size) * full[row]
            out[i] = total - context[i]
        return out

    def _query_sources(self, perturbations, cell_types, embeddings, annotations, context) -> tuple[np.ndarray, dict]:
        """``(S, n, G)`` evidence sources of queries that are not memory entries, and the
        similarity features of the gate."""
        n, n_genes = len(perturbations), self.responses.shape[1]
        out = np.zeros((len(ev.SOURCES), n, n_genes), dtype=np.float32)
        maps = self.sources
        out[0] = (np.asarray(embeddings, np.float64) - maps["embedding_center"]) @ maps["embedding_weights"]
        entry_ct = self.cell_types.astype(str)
        entry_pert = self.perturbations.astype(str)
        same_ct = cell_types[:, None] == entry_ct[None, :]
        # A cell type without entries takes its neighbours from every cell type, through their
        # specific shifts.
        known = same_ct.any(axis=1)
        allowed = np.where(known[:, None], same_ct, True) & (perturbations[:, None] != entry_pert[None, :])
        specific = self.specific
        cosine = ev.unit_rows(np.asarray(embeddings, np.float32)) @ ev.unit_rows(self.embeddings).T
        if annotations is not None and self.annotation_terms is not None and len(self.annotation_terms):
            out[1] = (annotations @ maps["annotation_projection"] - maps["annotation_center"]) @ maps["annotation_weights"]
            annotation_similarity = jaccard(annotations, self.annotation_matrix())
            depth = np.log1p(np.asarray(annotations.sum(axis=1), dtype=np.float64).ravel())
        else:
            annotation_similarity = np.zeros_like(cosine)
            depth = np.zeros(n)
        for slot, similarity in zip((2, 3), (cosine, annotation_similarity), strict=True):
            raw_mean, has = ev.neighbour_means(similarity, allowed & known[:, None], self.responses)
            spec_mean, has_spec = ev.neighbour_means(similarity, allowed & ~known[:, None], specific)
            out[slot] = np.where(known[:, None], np.where(has[:, None], raw_mean - context, 0.0), np.where(has_spec[:, None], spec_mean, 0.0))
        other = (perturbations[:, None] == entry_pert[None, :]) & ~same_ct
        out[4], out[5] = _other_cell_types(other, specific, self.responses, context)
        features = {
            "neighbour_cosine": ev.closest(cosine, allowed),
            "neighbour_jaccard": ev.closest(annotation_similarity, allowed),
            "annotation_depth": depth,
        }
        return out, features


def _plain(value):
    if isinstance(value, np.ndarray) and value.dtype == object:
        return value.astype(str)
    return value


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
    """Build a memory from the training cells of an in-memory expression matrix.

    A convenience for arrays; the model builds its memory with :func:`memory_from_cells`
    (streamed expression, GO annotations, the ``evidence`` option). Here no annotations are
    used (the annotation sources are zero) and the other evidence sources are all stacked. Only cells with ``train_mask`` contribute, and the response of a (perturbation, cell type)
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
        The evidence sources to stack (:data:`~ptrag_sc.data._evidence.SOURCES`; default all).
    gene_names
        The ``G`` genes, for the rule on a perturbed gene's own expression (``None``: not used).
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
    _fit_evidence(memory, specific, control_means, annotations, sep, evidence)
    return memory


def _fit_evidence(
    memory: RetrievalMemory,
    specific: np.ndarray,
    control_means: np.ndarray,
    annotations: GeneAnnotations | None,
    sep: str,
    use: tuple[str, ...] | None,
) -> None:
    """Fit the evidence sources, their stack, gate, own-gene rule and confidence on the entries,
    each entry's own response left out (see :mod:`ptrag_sc.data._evidence`).

    Sources outside ``use`` (all by default) get weight 0.
    """
    perturbations = memory.perturbations.astype(str)
    cell_types = memory.cell_types.astype(str)
    n = len(memory)
    context, _ = memory.contexts(perturbations, cell_types)
    targets = memory.responses - context
    sources = np.zeros((len(ev.SOURCES), n, specific.shape[1]), dtype=np.float32)
    loo, weights, center, alpha = ev.ridge_leave_one_out(memory.embeddings, specific, cell_types)
    sources[0] = loo
    maps = {"embedding_weights": weights.astype(np.float32), "embedding_center": center.astype(np.float32), "embedding_alpha": np.float64(alpha)}
    if annotations is not None:
        matrix, terms = annotations.matrix(perturbations, sep=sep)
    else:
        matrix, terms = sp.csr_matrix((n, 0), dtype=np.float32), np.zeros(0, dtype=str)
    memory.annotation_terms = terms
    memory.annotation_indptr = matrix.indptr.astype(np.int64)
    memory.annotation_indices = matrix.indices.astype(np.int64)
    projection = np.zeros((matrix.shape[1], 0), dtype=np.float32)
    a_weights, a_center, a_alpha = np.zeros((0, specific.shape[1])), np.zeros(0), float("nan")
    if matrix.shape[1] and matrix.nnz:
        projection = _principal_directions(matrix, n_components=256)
        loo, a_weights, a_center, a_alpha = ev.ridge_leave_one_out(np.asarray(matrix @ projection), specific, cell_types)
        sources[1] = loo
    maps.update(
        annotation_projection=projection.astype(np.float32),
        annotation_weights=np.asarray(a_weights, np.float32),
        annotation_center=np.asarray(a_center, np.float32),
        annotation_alpha=np.float64(a_alpha),
    )
    memory.sources = maps
    same_ct = cell_types[:, None] == cell_types[None, :]
    allowed = same_ct & (perturbations[:, None] != perturbations[None, :])
    cosine = ev.unit_rows(memory.embeddings) @ ev.unit_rows(memory.embeddings).T
    annotation_similarity = jaccard(matrix, matrix) if matrix.nnz else np.zeros_like(cosine)
    for slot, similarity in ((2, cosine), (3, annotation_similarity)):
        means, has = ev.neighbour_means(similarity, allowed, memory.responses)
        sources[slot] = np.where(has[:, None], means - context, 0.0)
    other = (perturbations[:, None] == perturbations[None, :]) & ~same_ct
    sources[4], sources[5] = _other_cell_types(other, specific, memory.responses, context)

    sources *= np.array([use is None or name in use for name in ev.SOURCES])[:, None, None]
    weights = ev.entry_weights(targets)
    stack_weights = ev.fit_stack(sources, targets, weights)
    stacked = np.tensordot(stack_weights, sources, axes=1)

    # How far the stack is to be trusted in a cell type, from its *other* entries.
    cross = weights**2 * np.einsum("mg,mg->m", targets, stacked, dtype=np.float64)
    size = weights**2 * np.einsum("mg,mg->m", stacked, stacked, dtype=np.float64)
    trust_per_type, trust_per_entry, trust_all = ev.trust(cross, size, cell_types)
    type_code = np.unique(cell_types, return_inverse=True)[1]
    typical_size = np.sqrt(np.bincount(type_code, weights=np.sum(specific**2, axis=1)) / memory.context_counts)
    columns = ev.own_gene_columns(perturbations, memory.gene_names, sep)
    trusted = stacked * trust_per_entry[:, None]
    features = ev.gate_features(
        sources,
        trusted,
        neighbour_cosine=ev.closest(cosine, allowed),
        neighbour_jaccard=ev.closest(annotation_similarity, allowed),
        annotation_depth=np.log1p(np.diff(memory.annotation_indptr).astype(np.float64)),
        typical_size=typical_size[type_code],
        # The cell type's trust, not the entry's leave-one-out one: how much that one moves
        # when the entry is left out depends on the entry's own fit.
        cell_type_trust=trust_per_type[type_code],
        own_gene_measured=np.array([len(c) > 0 for c in columns], dtype=float),
        members_measured=memory._members_measured(perturbations, cell_types, sep),
    )
    center = features.mean(axis=0)
    scale = np.where(features.std(axis=0) > 1e-9, features.std(axis=0), 1.0)
    design = np.column_stack([np.ones(n), (features - center) / scale])
    gate_coef = ev.fit_gate(trusted, targets, design, weights)
    estimates = trusted * (2.0 / (1.0 + np.exp(-(design @ gate_coef))))[:, None]

    # The perturbed gene's own expression, from the other entries of the cell type.
    ratios = ev.own_gene_ratios(memory.responses, control_means, columns)
    known = np.isfinite(ratios)
    own_ratio = np.array([np.median(ratios[(cell_types == c) & known]) if ((cell_types == c) & known).any() else np.nan for c in memory.context_cell_types])
    own_all = float(np.median(ratios[known])) if known.any() else float("nan")
    loo_ratio = np.full(n, np.nan)
    for m in np.flatnonzero([len(c) > 0 for c in columns]):
        others = known & (np.arange(n) != m)
        pool = ratios[others & (cell_types == cell_types[m])]
        pool = pool if pool.size else ratios[others]
        loo_ratio[m] = np.median(pool) if pool.size else np.nan
    estimates = ev.apply_own_gene(estimates, context, control_means, columns, loo_ratio)
    estimates = memory._additive(perturbations, cell_types, context, estimates, sep)

    accuracy = ev.row_pearson(context + estimates, memory.responses)
    memory.evidence_model = ev.EvidenceModel(
        sources=np.asarray(ev.SOURCES),
        stack_weights=stack_weights,
        feature_center=center,
        feature_scale=scale,
        gate_coef=gate_coef,
        confidence_coef=ev.fit_ridge(design, accuracy, ev.CONFIDENCE_PENALTY),
        cell_types=memory.context_cell_types,
        typical_size=typical_size,
        cell_type_trust=trust_per_type,
        own_gene_ratio=own_ratio,
        trust_all=trust_all,
        own_gene_ratio_all=own_all,
    )
    memory.entry_estimates = estimates.astype(np.float32)
    memory.entry_confidence = memory.evidence_model.confidence(features).astype(np.float32)


def _other_cell_types(other: np.ndarray, specific: np.ndarray, responses: np.ndarray, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The query's mean specific shift in other cell types, and its mean shift there minus the query's context."""
    counts = other.sum(axis=1)[:, None]
    weights = other.astype(np.float32)
    has = counts > 0
    spec = np.divide(weights @ specific.astype(np.float32), counts, out=np.zeros((other.shape[0], specific.shape[1]), np.float32), where=has)
    raw = np.divide(weights @ responses.astype(np.float32), counts, out=np.zeros_like(spec), where=has)
    return spec, np.where(has, raw - context, 0.0)


def _principal_directions(matrix: sp.csr_matrix, n_components: int) -> np.ndarray:
    """Top right singular vectors ``(T, r)`` of a (sparse) entries x terms matrix."""
    if min(matrix.shape) <= 2000:
        _, s, vt = np.linalg.svd(matrix.toarray().astype(np.float64), full_matrices=False)
    else:
        from sklearn.utils.extmath import randomized_svd

        _, s, vt = randomized_svd(matrix.astype(np.float64), n_components, random_state=0)
    keep = s > (s.max() * 1e-8 if s.size else 0)
    return vt[keep][:n_components].T.astype(np.float32)


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
        annotations=annotations,
        sep=sep,
        evidence=evidence,
        gene_names=data.var_names,
    )
