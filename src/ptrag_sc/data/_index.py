"""Stage 1 of the retrieval: the memory entries nearest to each query, computed once per query."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .._constants import INDEX_BACKENDS, RELATION_MEMBER, RELATION_OTHER, RELATION_SAME_PERTURBATION, IndexBackend
from ._memory import RetrievalMemory
from ._similarity import StageOneSimilarity

#: Memories larger than this use faiss when ``index_backend="auto"`` and faiss is installed.
FAISS_AUTO_THRESHOLD = 100_000


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
    similarity
        What to rank entries by instead of the embedding cosine (a
        :class:`~ptrag_sc.data._similarity.StageOneSimilarity`, e.g. from
        :func:`~ptrag_sc.data._similarity.make_similarity`; ``None``: the embedding cosine). A
        prior is searched exactly (``backend="auto"`` means ``"exact"`` then).
    """

    def __init__(
        self,
        memory: RetrievalMemory,
        *,
        n_candidates: int,
        backend: IndexBackend = "auto",
        sep: str = "+",
        similarity: StageOneSimilarity | None = None,
    ) -> None:
        self.memory = memory
        # Ranking hook: a stage-1 prior other than the embedding cosine, bound to this memory.
        self.similarity = None if similarity is None else similarity.bind(memory)
        if self.similarity is not None:
            if backend == "faiss":
                raise ValueError("`index_backend='faiss'` searches gene embeddings only; with a `similarity` other than 'embedding' use 'exact' or 'auto'.")
            backend = "exact"
        self.sep = sep
        self.n_candidates = int(n_candidates)
        self._keys = _normalise(memory.embeddings)
        self._pert_vocab = pd.Index(np.unique(memory.perturbations.astype(str)))
        self._ct_vocab = pd.Index(np.unique(memory.cell_types.astype(str)))
        self._mem_pert = self._pert_vocab.get_indexer(memory.perturbations.astype(str))
        self._mem_ct = self._ct_vocab.get_indexer(memory.cell_types.astype(str))
        if backend == "auto":
            backend = "faiss" if len(memory) > FAISS_AUTO_THRESHOLD and _faiss_available() else "exact"
        if backend not in INDEX_BACKENDS:
            raise ValueError(f"`index_backend` must be one of {list(INDEX_BACKENDS)}, got {backend!r}.")
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
        if self.similarity is not None:
            # The prior is dense in float64: bound a chunk to about 16 M entries.
            chunk_size = max(1, min(chunk_size, (1 << 24) // max(1, len(self.memory))))
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            if self.similarity is not None:
                rows = slice(start, stop)
                idx, val = self._exact(q[rows], pert_codes[rows], ct_codes[rows], prior=(perturbations[rows], cell_types[rows]))
            elif self._faiss is None:
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

    def _exact(self, q, pert_codes, ct_codes, prior=None):
        scores = torch.from_numpy(q) @ torch.from_numpy(self._keys).T
        ranking = scores.clone()
        if prior is not None:  # ranking hook: (labels, cell types) of the queries, ranked by the prior
            same = pert_codes[:, None] == self._mem_pert[None, :]
            similarity, order = self.similarity.scores(*prior, scores.numpy(), same)
            scores, ranking = torch.from_numpy(similarity), torch.from_numpy(order)
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
