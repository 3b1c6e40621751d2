"""The retrieval memory (built from training cells only) and its stage-1 neighbour index."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

if TYPE_CHECKING:
    from ._perturbations import PerturbationEncoder

MemoryKind = Literal["embedding", "response"]
IndexBackend = Literal["auto", "exact", "faiss"]

#: How a candidate relates to its query (module input; the context entry is added by the model).
RELATION_OTHER, RELATION_SAME_PERTURBATION, RELATION_MEMBER, RELATION_CONTEXT = 0, 1, 2, 3

#: Memories larger than this use faiss when ``index_backend="auto"`` and faiss is installed.
FAISS_AUTO_THRESHOLD = 100_000


@dataclass
class RetrievalMemory:
    """What stage 1 retrieves from.

    Attributes
    ----------
    kind
        ``"embedding"``: one entry per training perturbation carrying its gene embedding (the
        paper). ``"response"``: one entry per training (perturbation, cell type) pair carrying
        its gene embedding and its measured pseudobulk shift from that cell type's controls.
    perturbations
        Perturbation label of each entry, shape ``(M,)``.
    cell_types
        Cell type of each entry (``""`` for embedding memories), shape ``(M,)``.
    embeddings
        Gene embedding of each entry, shape ``(M, D)``.
    responses
        Mean shift of each entry in expression space, shape ``(M, G)``; ``None`` for
        embedding memories.
    n_cells
        Number of training cells behind each entry.
    response_codes
        ``responses`` projected on their top principal directions (sign-fixed, unscaled),
        shape ``(M, c)``; what the candidate encoder reads, so that encoding ``K`` candidates per
        set does not cost ``K * G`` multiply-adds per hidden unit.
    response_basis
        The ``(G, c)`` principal directions, to code other responses the same way.
    """

    kind: str
    perturbations: np.ndarray
    cell_types: np.ndarray
    embeddings: np.ndarray
    responses: np.ndarray | None
    n_cells: np.ndarray
    response_codes: np.ndarray | None = None
    response_basis: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.perturbations.shape[0])

    def to_dict(self) -> dict:
        """Plain arrays, for saving with the model."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict) -> RetrievalMemory:
        return cls(**state)

    def entry_names(self) -> np.ndarray:
        """Readable name of each entry (``"GENE"`` or ``"GENE@cell type"``)."""
        if self.kind == "embedding":
            return self.perturbations.astype(str)
        return np.char.add(np.char.add(self.perturbations.astype(str), "@"), self.cell_types.astype(str))


def group_means(matrix, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean row of ``matrix`` per group code (codes < 0 are ignored); float64 ``[n_groups, G]``.

    A sparse indicator product, so it works for dense and sparse matrices without looping over
    cells. Empty groups get NaN rows.
    """
    codes = np.asarray(codes)
    keep = np.flatnonzero(codes >= 0)
    counts = np.bincount(codes[keep], minlength=n_groups).astype(np.float64)
    with np.errstate(divide="ignore"):
        weights = 1.0 / counts[codes[keep]]
    indicator = sp.csr_matrix((weights, (codes[keep], keep)), shape=(n_groups, codes.shape[0]))
    means = indicator @ matrix
    if sp.issparse(means):
        means = means.toarray()
    means = np.asarray(means, dtype=np.float64)
    means[counts == 0] = np.nan
    return means


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
    """Build the memory from training cells only.

    Validation and test cells never enter: only cells with ``train_mask`` contribute entries,
    and the response of a (perturbation, cell type) entry is the mean of its training cells
    minus the mean of that cell type's training control cells.
    """
    perturbations = np.asarray(perturbations).astype(str)
    cell_types = np.asarray(cell_types).astype(str)
    perturbed = train_mask & ~is_control
    if not perturbed.any():
        raise ValueError("The training split holds no perturbed cells: nothing to build the memory from.")
    if kind == "embedding":
        labels, counts = np.unique(perturbations[perturbed], return_counts=True)
        return RetrievalMemory(
            kind=kind,
            perturbations=labels.astype(object),
            cell_types=np.full(labels.shape[0], "", dtype=object),
            embeddings=encoder.embed(labels),
            responses=None,
            n_cells=counts,
        )
    if kind != "response":
        raise ValueError(f"`memory` must be 'embedding' or 'response', got {kind!r}.")
    keys = pd.MultiIndex.from_arrays([perturbations[perturbed], cell_types[perturbed]])
    codes, uniques = pd.factorize(keys, sort=True)
    entry_of_cell = np.full(perturbations.shape[0], -1, dtype=np.int64)
    entry_of_cell[perturbed] = codes
    entry_means = group_means(X, entry_of_cell, len(uniques))
    entry_pert = np.asarray(uniques.get_level_values(0), dtype=object)
    entry_ct = np.asarray(uniques.get_level_values(1), dtype=object)

    control_ct = pd.Index(np.unique(entry_ct))
    ctrl_codes = np.full(perturbations.shape[0], -1, dtype=np.int64)
    ctrl_mask = train_mask & is_control
    ctrl_codes[ctrl_mask] = control_ct.get_indexer(cell_types[ctrl_mask])
    ctrl_counts = np.bincount(ctrl_codes[ctrl_codes >= 0], minlength=len(control_ct))
    if np.any(ctrl_counts == 0):
        missing = control_ct[ctrl_counts == 0].tolist()
        raise ValueError(
            f"No training control cells for cell type(s) {missing}: the response memory needs "
            "them to measure shifts."
        )
    control_means = group_means(X, ctrl_codes, len(control_ct))
    responses = entry_means - control_means[control_ct.get_indexer(entry_ct)]
    basis = principal_basis(responses, n_response_components)
    return RetrievalMemory(
        kind=kind,
        perturbations=entry_pert,
        cell_types=entry_ct,
        embeddings=encoder.embed(entry_pert),
        responses=responses.astype(np.float32),
        n_cells=np.bincount(codes, minlength=len(uniques)),
        response_codes=(responses @ basis).astype(np.float32),
        response_basis=basis,
    )


def principal_basis(responses: np.ndarray, n_components: int) -> np.ndarray:
    """Top principal directions (not centred, sign-fixed) of the rows, as ``(G, c)`` float32."""
    responses = np.asarray(responses, dtype=np.float64)
    k = min(n_components, *responses.shape)
    _, _, vt = np.linalg.svd(responses, full_matrices=False)
    vt = vt[:k]
    signs = np.sign(vt[np.arange(k), np.abs(vt).argmax(axis=1)])
    signs[signs == 0] = 1
    return (vt * signs[:, None]).T.astype(np.float32)


def context_responses(
    memory: RetrievalMemory, perturbations: np.ndarray, cell_types: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean response of the other training perturbations of each query's cell type.

    For a query (q, c) this is the mean of the memory's (p, c) responses over ``p != q``: the
    cell type's generic response to being perturbed (the "context mean"), with the query's own
    entry left out so that training sets never see their own answer.

    Returns
    -------
    responses
        ``(n, G)`` float32 (zeros where undefined).
    valid
        ``(n,)`` bool, False when the cell type has no other training perturbation.
    """
    perturbations = np.asarray(perturbations).astype(str)
    cell_types = np.asarray(cell_types).astype(str)
    n, n_genes = perturbations.shape[0], memory.responses.shape[1]
    mem_ct = pd.Index(memory.cell_types.astype(str))
    vocab = pd.Index(np.unique(mem_ct))
    codes = vocab.get_indexer(mem_ct)
    sums = np.zeros((len(vocab), n_genes))
    np.add.at(sums, codes, memory.responses)
    counts = np.bincount(codes, minlength=len(vocab)).astype(np.float64)
    q_ct = vocab.get_indexer(cell_types)
    known = q_ct >= 0
    total = np.zeros((n, n_genes))
    count = np.zeros(n)
    total[known] = sums[q_ct[known]]
    count[known] = counts[q_ct[known]]
    entry = pd.Index(memory.entry_names()).get_indexer(np.char.add(np.char.add(perturbations, "@"), cell_types))
    own = entry >= 0
    total[own] -= memory.responses[entry[own]]
    count[own] -= 1
    valid = count > 0
    out = np.zeros((n, n_genes), dtype=np.float32)
    out[valid] = total[valid] / count[valid, None]
    return out, valid


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class NeighbourIndex:
    """Stage 1: the ``n_candidates`` memory entries closest to a query by cosine similarity.

    The query itself is excluded: for an embedding memory every entry of the query
    perturbation, for a response memory only the exact (query perturbation, query cell type)
    entry, so the same perturbation measured in *other* cell types stays retrievable. For a
    response memory, ties in similarity are broken in favour of entries of the query's cell
    type. Results depend only on the query, so callers compute them once per query key and
    gather.

    Parameters
    ----------
    memory
        The memory to search.
    n_candidates
        Number of candidates ``K`` per query.
    backend
        ``"exact"`` (dense matrix product), ``"faiss"`` (``faiss.IndexFlatIP``; needs the
        ``faiss`` extra) or ``"auto"`` (faiss beyond ``FAISS_AUTO_THRESHOLD`` entries when
        installed).
    """

    def __init__(
        self,
        memory: RetrievalMemory,
        *,
        n_candidates: int,
        backend: IndexBackend = "auto",
        sep: str = "+",
    ) -> None:
        self.memory = memory
        self.sep = sep
        self.n_candidates = int(n_candidates)
        self._keys = _normalise(memory.embeddings)
        self._pert_vocab = pd.Index(np.unique(memory.perturbations.astype(str)))
        self._ct_vocab = pd.Index(np.unique(memory.cell_types.astype(str)))
        self._mem_pert = self._pert_vocab.get_indexer(memory.perturbations.astype(str))
        self._mem_ct = self._ct_vocab.get_indexer(memory.cell_types.astype(str))
        if backend == "auto":
            backend = "faiss" if len(memory) > FAISS_AUTO_THRESHOLD and _faiss_available() else "exact"
        if backend not in ("exact", "faiss"):
            raise ValueError(f"`index_backend` must be 'auto', 'exact' or 'faiss', got {backend!r}.")
        self.backend = backend
        self._faiss = None
        if backend == "faiss":
            if not _faiss_available():
                raise ImportError('The faiss backend needs faiss: pip install "ptrag-sc[faiss]".')
            import faiss

            self._faiss = faiss.IndexFlatIP(self._keys.shape[1])
            self._faiss.add(self._keys)

    def _codes(self, perturbations: np.ndarray, cell_types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Memory vocabulary codes of query labels (``-2`` when absent, never matching)."""
        p = self._pert_vocab.get_indexer(perturbations)
        c = self._ct_vocab.get_indexer(cell_types)
        return np.where(p < 0, -2, p), np.where(c < 0, -2, c)

    def _excluded(self, pert_codes: np.ndarray, ct_codes: np.ndarray) -> np.ndarray:
        """Boolean ``(n, M)``: entries a query must not retrieve."""
        same_pert = pert_codes[:, None] == self._mem_pert[None, :]
        if self.memory.kind == "embedding":
            return same_pert
        return same_pert & (ct_codes[:, None] == self._mem_ct[None, :])

    def query(
        self,
        perturbations: np.ndarray,
        embeddings: np.ndarray,
        cell_types: np.ndarray,
        *,
        chunk_size: int = 2048,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Top-``K`` candidates of each query.

        Returns
        -------
        candidates
            ``(n, K)`` int64 entry indices, ``-1`` where fewer than ``K`` entries exist.
        similarity
            ``(n, K)`` float32 cosine similarities (``nan`` for ``-1``).
        same_cell_type
            ``(n, K)`` bool, whether the entry was measured in the query's cell type.
        relation
            ``(n, K)`` int64: ``RELATION_SAME_PERTURBATION`` for the query measured in another
            cell type, ``RELATION_MEMBER`` for a single gene of a combination query (``A`` for
            ``A+B``), ``RELATION_OTHER`` otherwise.
        """
        perturbations = np.asarray(perturbations).astype(str)
        cell_types = np.asarray(cell_types).astype(str)
        q = _normalise(np.asarray(embeddings, dtype=np.float32))
        n, k = q.shape[0], self.n_candidates
        cand = np.full((n, k), -1, dtype=np.int64)
        sim = np.full((n, k), np.nan, dtype=np.float32)
        pert_codes, ct_codes = self._codes(perturbations, cell_types)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            if self._faiss is None:
                idx, val = self._exact(q[start:stop], pert_codes[start:stop], ct_codes[start:stop])
            else:
                idx, val = self._search_faiss(q[start:stop], pert_codes[start:stop], ct_codes[start:stop])
            cand[start:stop, : idx.shape[1]] = idx
            sim[start:stop, : val.shape[1]] = val
        valid = cand >= 0
        sim[~valid] = np.nan
        same = np.zeros_like(valid)
        if self.memory.kind == "response":
            same[valid] = self._mem_ct[cand[valid]] == np.repeat(ct_codes, valid.sum(axis=1))
        safe = np.maximum(cand, 0)
        relation = np.where(valid & (self._mem_pert[safe] == pert_codes[:, None]), RELATION_SAME_PERTURBATION, RELATION_OTHER)
        mem_labels = self.memory.perturbations.astype(str)
        for row in np.flatnonzero(np.char.find(perturbations, self.sep) >= 0):
            members = [m.strip().upper() for m in perturbations[row].split(self.sep)]
            is_member = valid[row] & np.isin(np.char.upper(mem_labels[safe[row]]), members)
            relation[row, is_member] = RELATION_MEMBER
        return cand, sim, same, relation

    def _exact(self, q, pert_codes, ct_codes):
        scores = torch.from_numpy(q) @ torch.from_numpy(self._keys).T
        ranking = scores.clone()
        if self.memory.kind == "response":
            ranking += 1e-5 * torch.from_numpy(ct_codes[:, None] == self._mem_ct[None, :])
        excluded = torch.from_numpy(self._excluded(pert_codes, ct_codes))
        ranking[excluded] = -torch.inf
        k = min(self.n_candidates, ranking.shape[1])
        top = torch.topk(ranking, k, dim=1)
        idx = top.indices.numpy().astype(np.int64)
        val = torch.gather(scores, 1, top.indices).numpy()
        idx[~np.isfinite(top.values.numpy())] = -1
        return idx, val

    def _search_faiss(self, q, pert_codes, ct_codes):
        k = min(self.n_candidates + 1, len(self.memory))
        val, idx = self._faiss.search(q, k)
        idx = idx.astype(np.int64)
        safe = np.maximum(idx, 0)
        excluded = (idx >= 0) & (self._mem_pert[safe] == pert_codes[:, None])
        if self.memory.kind == "response":
            excluded &= self._mem_ct[safe] == ct_codes[:, None]
        idx[excluded] = -1
        # Move excluded slots to the end while keeping the order of the others.
        order = np.argsort(idx < 0, axis=1, kind="stable")
        idx = np.take_along_axis(idx, order, axis=1)[:, : self.n_candidates]
        val = np.take_along_axis(val, order, axis=1)[:, : self.n_candidates]
        return idx, val


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True
