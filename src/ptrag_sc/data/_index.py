"""Stage 1 of the retrieval: the memory entries nearest to each query, exact by chunked matrix
products or, with faiss beyond ``APPROXIMATE_THRESHOLD`` entries, approximate by k-means lists."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .._constants import (
    INDEX_BACKENDS,
    RELATION_MEMBER,
    RELATION_OTHER,
    RELATION_SAME_PERTURBATION,
    IndexBackend,
)
from ._memory import RetrievalMemory
from ._perturbations import label_members
from ._similarity import StageOneSimilarity
from ._sources import unit_rows

#: Memories larger than this use faiss when ``index_backend="auto"`` and faiss is installed.
FAISS_AUTO_THRESHOLD = 100_000
#: With faiss, memories larger than this get the approximate search; smaller ones an exact one.
APPROXIMATE_THRESHOLD = 100_000
#: The exact search scores at most this many (query, entry) pairs at once (float32: 128 MiB).
EXACT_PAIRS_PER_CHUNK = 1 << 25
#: Lists whose entries a query of the approximate search is scored against.
DEFAULT_N_PROBE = 8
#: Queries of the approximate search handled per pass over the lists.
QUERIES_PER_PASS = 1 << 18
#: k-means iterations and training points per list of the approximate search.
KMEANS_ITERATIONS, KMEANS_POINTS_PER_LIST = 10, 40


def n_lists_for(n_entries: int) -> int:
    """Lists of the approximate search: about ``sqrt(M)``, 1 to 65,536."""
    return int(np.clip(round(np.sqrt(n_entries)), 1, 65536))


class NeighbourIndex:
    """Stage 1: the ``n_candidates`` memory entries closest to a query by cosine similarity.

    The query itself is excluded: for an embedding memory every entry of the query
    perturbation, for a response memory only the exact (query perturbation, query cell type)
    entry, so the same perturbation measured in *other* cell types stays retrievable. For a
    response memory, ties in similarity are broken in favour of entries of the query's cell
    type. Results depend only on the query: callers compute them once per query key.

    Parameters
    ----------
    memory
        The memory to search.
    n_candidates
        Number of candidates ``K`` per query.
    backend
        ``"exact"`` (matrix products over chunks of queries), ``"faiss"`` (needs the ``faiss``
        extra: the approximate search of faiss k-means lists beyond ``APPROXIMATE_THRESHOLD``
        entries, the exact one below) or ``"auto"`` (faiss beyond ``FAISS_AUTO_THRESHOLD``
        entries when installed, else exact).
    sep
        Separator of combination labels.
    approximate
        With faiss, force the approximate search (``True``) or the exact one (``False``);
        default (``None``): by size, as above.
    n_probe
        Lists a query of the approximate search is scored against (default
        ``DEFAULT_N_PROBE``): more is slower and closer to exact.
    similarity
        A stage-1 prior to rank entries by instead of the embedding cosine (from
        :func:`~ptrag_sc.data._similarity.make_similarity`; ``None``: the cosine), searched
        exactly (``backend="auto"`` means ``"exact"`` then).
    """

    def __init__(
        self,
        memory: RetrievalMemory,
        *,
        n_candidates: int,
        backend: IndexBackend = "auto",
        sep: str = "+",
        approximate: bool | None = None,
        n_probe: int | None = None,
        similarity: StageOneSimilarity | None = None,
    ) -> None:
        self.memory = memory
        # Ranking hook: a stage-1 prior other than the embedding cosine, bound to this memory.
        self.similarity = None if similarity is None else similarity.bind(memory)
        if self.similarity is not None:
            if backend == "faiss":
                raise ValueError(
                    "`index_backend='faiss'` searches gene embeddings only; with a `similarity` "
                    "other than 'embedding' use 'exact' or 'auto'."
                )
            backend = "exact"
        self.sep = sep
        self.n_candidates = int(n_candidates)
        self._keys = unit_rows(memory.embeddings)
        self._pert_vocab = pd.Index(np.unique(memory.perturbations.astype(str)))
        self._ct_vocab = pd.Index(np.unique(memory.cell_types.astype(str)))
        self._mem_pert = self._pert_vocab.get_indexer(memory.perturbations.astype(str))
        self._mem_ct = self._ct_vocab.get_indexer(memory.cell_types.astype(str))
        # Entries of each perturbation, to exclude a query's own entries without an (n, M) mask.
        self._by_pert = np.argsort(self._mem_pert, kind="stable")
        self._pert_start = np.searchsorted(
            self._mem_pert[self._by_pert], np.arange(len(self._pert_vocab) + 1)
        )
        if backend == "auto":
            backend = (
                "faiss" if len(memory) > FAISS_AUTO_THRESHOLD and _faiss_available() else "exact"
            )
        if backend not in INDEX_BACKENDS:
            raise ValueError(
                f"`index_backend` must be one of {list(INDEX_BACKENDS)}, got {backend!r}."
            )
        self.backend = backend
        self.approximate = False
        self._lists: _Lists | None = None
        if backend == "faiss":
            if not _faiss_available():
                raise ImportError('The faiss backend needs faiss: pip install "ptrag-sc[faiss]".')
            self.approximate = (
                len(memory) > APPROXIMATE_THRESHOLD if approximate is None else bool(approximate)
            )
            if self.approximate:
                self._lists = _Lists(
                    self._keys,
                    n_lists_for(len(memory)),
                    DEFAULT_N_PROBE if n_probe is None else int(n_probe),
                )

    @property
    def n_probe(self) -> int | None:
        """Lists searched per query (approximate search), else ``None``."""
        return None if self._lists is None else self._lists.n_probe

    @n_probe.setter
    def n_probe(self, value: int) -> None:
        if self._lists is None:
            raise ValueError("`n_probe` applies to the approximate search only.")
        self._lists.set_probe(int(value))

    def _codes(
        self, perturbations: np.ndarray, cell_types: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Memory vocabulary codes of query labels (``-2`` when absent, never matching)."""
        p = self._pert_vocab.get_indexer(perturbations)
        c = self._ct_vocab.get_indexer(cell_types)
        return np.where(p < 0, -2, p), np.where(c < 0, -2, c)

    def _excluded(
        self, pert_codes: np.ndarray, ct_codes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(query row, entry)`` pairs a query must not retrieve (its own entries)."""
        safe = np.maximum(pert_codes, 0)
        counts = np.where(pert_codes >= 0, self._pert_start[safe + 1] - self._pert_start[safe], 0)
        rows = np.repeat(np.arange(pert_codes.shape[0]), counts)
        first = np.repeat(self._pert_start[safe], counts)
        entries = self._by_pert[
            first + (np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts))
        ]
        if self.memory.kind == "response":
            keep = self._mem_ct[entries] == ct_codes[rows]
            rows, entries = rows[keep], entries[keep]
        return rows, entries

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
        q = unit_rows(np.asarray(embeddings, dtype=np.float32))
        n, k = q.shape[0], self.n_candidates
        cand = np.full((n, k), -1, dtype=np.int64)
        sim = np.full((n, k), np.nan, dtype=np.float32)
        pert_codes, ct_codes = self._codes(perturbations, cell_types)
        if self._lists is not None:
            self._search_lists(q, pert_codes, ct_codes, cand, sim)
        else:
            # A prior is dense in float64: about 16 M of its values at a time.
            budget = EXACT_PAIRS_PER_CHUNK if self.similarity is None else 1 << 24
            chunk_size = max(1, min(chunk_size, budget // max(1, len(self.memory))))
            for start in range(0, n, chunk_size):
                rows = slice(start, start + chunk_size)
                prior = (
                    None if self.similarity is None else (perturbations[rows], cell_types[rows])
                )
                idx, val = self._exact(q[rows], pert_codes[rows], ct_codes[rows], prior)
                cand[rows, : idx.shape[1]] = idx
                sim[rows, : val.shape[1]] = val
        valid = cand >= 0
        sim[~valid] = np.nan
        same = np.zeros_like(valid)
        if self.memory.kind == "response":
            same[valid] = self._mem_ct[cand[valid]] == np.repeat(ct_codes, valid.sum(axis=1))
        safe = np.maximum(cand, 0)
        relation = np.where(
            valid & (self._mem_pert[safe] == pert_codes[:, None]),
            RELATION_SAME_PERTURBATION,
            RELATION_OTHER,
        )
        combination = np.flatnonzero(np.char.find(perturbations, self.sep) >= 0)
        if combination.size:
            mem_labels = self.memory.perturbations.astype(str)
            for row in combination:
                members = label_members(perturbations[row], self.sep)
                is_member = valid[row] & np.isin(np.char.upper(mem_labels[safe[row]]), members)
                relation[row, is_member] = RELATION_MEMBER
        return cand, sim, same, relation

    def _exact(
        self,
        q: np.ndarray,
        pert_codes: np.ndarray,
        ct_codes: np.ndarray,
        prior: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``K`` of each query among all entries by one matrix product; with ``prior`` (the
        queries' labels and cell types) ranked by and reporting the stage-1 prior."""
        cosine = torch.from_numpy(q) @ torch.from_numpy(self._keys).T
        reported = None
        if prior is not None:
            same = pert_codes[:, None] == self._mem_pert[None, :]
            similarity, order = self.similarity.scores(*prior, cosine.numpy(), same)
            reported, cosine = torch.from_numpy(similarity), torch.from_numpy(np.array(order))
        ranking = self._ranking(cosine, pert_codes, ct_codes)
        k = min(self.n_candidates, ranking.shape[1])
        top = torch.topk(ranking, k, dim=1)
        del ranking
        idx = top.indices.numpy().astype(np.int64)
        val = (
            self._cosines(q, idx)
            if reported is None
            else torch.gather(reported, 1, top.indices).numpy()
        )
        idx[~np.isfinite(top.values.numpy())] = -1
        return idx, val

    def _cosines(self, q: np.ndarray, idx: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """Cosine of each query with its entries ``idx`` (``-1`` gives garbage), by chunks."""
        out = np.empty(idx.shape, dtype=np.float32)
        for start in range(0, idx.shape[0], chunk):
            rows = slice(start, start + chunk)
            out[rows] = np.einsum("nd,nkd->nk", q[rows], self._keys[np.maximum(idx[rows], 0)])
        return out

    def _search_lists(
        self,
        q: np.ndarray,
        pert_codes: np.ndarray,
        ct_codes: np.ndarray,
        cand: np.ndarray,
        sim: np.ndarray,
    ) -> None:
        """Approximate search: each query against the entries of its ``n_probe`` nearest lists.

        The queries probing a list are scored against its entries by one matrix product, each
        keeping its running top ``K``. Lists are visited nearest first for every query, so from
        the second on a query none of whose scores beats its ``K``-th best skips the selection.
        """
        lists = self._lists
        k = self.n_candidates
        for start in range(0, q.shape[0], QUERIES_PER_PASS):
            rows = slice(start, min(start + QUERIES_PER_PASS, q.shape[0]))
            block_q, block_pert, block_ct = q[rows], pert_codes[rows], ct_codes[rows]
            n = block_q.shape[0]
            probes = lists.nearest(block_q, lists.n_probe)
            best_rank = torch.full((n, k), -torch.inf)
            best_idx = torch.full((n, k), -1, dtype=torch.int64)
            for choice in range(probes.shape[1]):
                order = np.argsort(probes[:, choice], kind="stable")
                bounds = np.searchsorted(probes[order, choice], np.arange(lists.n_lists + 1))
                for lst in np.flatnonzero(np.diff(bounds)):
                    entries = lists.entries(lst)
                    if entries.size == 0:
                        continue
                    keys = torch.from_numpy(self._keys[entries])
                    queries = order[bounds[lst] : bounds[lst + 1]]
                    step = max(1, EXACT_PAIRS_PER_CHUNK // entries.size)
                    for first in range(0, queries.size, step):
                        chosen = queries[first : first + step]
                        scores = torch.from_numpy(block_q[chosen]) @ keys.T
                        rank = self._ranking(scores, block_pert[chosen], block_ct[chosen], entries)
                        if choice:
                            better = (rank > best_rank[chosen, -1:]).any(dim=1).numpy()
                            if not better.any():
                                continue
                            chosen, rank = chosen[better], rank[torch.from_numpy(better)]
                        top = torch.topk(rank, min(k, entries.size), dim=1)
                        merged_rank = torch.cat([best_rank[chosen], top.values], dim=1)
                        merged_idx = torch.cat(
                            [best_idx[chosen], torch.from_numpy(entries)[top.indices]], dim=1
                        )
                        keep = torch.topk(merged_rank, k, dim=1)
                        best_rank[chosen] = keep.values
                        best_idx[chosen] = torch.gather(merged_idx, 1, keep.indices)
            idx = best_idx.numpy()
            idx[~np.isfinite(best_rank.numpy())] = -1
            cand[rows] = idx
            sim[rows] = self._cosines(block_q, idx)

    def _ranking(
        self,
        scores: torch.Tensor,
        pert_codes: np.ndarray,
        ct_codes: np.ndarray,
        entries: np.ndarray | None = None,
    ) -> torch.Tensor:
        """``scores`` of queries against all entries (or ``entries``, sorted), + 1e-5 for the
        query's cell type (response memories) and ``-inf`` for the query's own entries."""
        if self.memory.kind == "response":
            mem_ct = self._mem_ct if entries is None else self._mem_ct[entries]
            scores.add_(torch.from_numpy(ct_codes[:, None] == mem_ct[None, :]), alpha=1e-5)
        rows, excluded = self._excluded(pert_codes, ct_codes)
        if rows.size and entries is not None:
            position = np.searchsorted(entries, excluded)
            found = (position < entries.size) & (
                entries[np.minimum(position, entries.size - 1)] == excluded
            )
            rows, excluded = rows[found], position[found]
        scores[torch.from_numpy(rows), torch.from_numpy(excluded)] = -torch.inf
        return scores


class _Lists:
    """The unit-norm entry embeddings ``keys`` cut into ``n_lists`` faiss k-means lists, of
    which a query searches the ``n_probe`` nearest."""

    def __init__(self, keys: np.ndarray, n_lists: int, n_probe: int) -> None:
        import faiss

        n_entries, dim = keys.shape
        self.n_lists = max(1, min(int(n_lists), n_entries))
        n_train = min(n_entries, KMEANS_POINTS_PER_LIST * self.n_lists)
        sample = (
            keys
            if n_train == n_entries
            else keys[np.sort(np.random.default_rng(0).choice(n_entries, n_train, replace=False))]
        )
        kmeans = faiss.Kmeans(
            dim,
            self.n_lists,
            niter=KMEANS_ITERATIONS,
            seed=1234,
            spherical=True,
            max_points_per_centroid=KMEANS_POINTS_PER_LIST,
            min_points_per_centroid=1,
            verbose=False,
        )
        kmeans.train(np.ascontiguousarray(sample))
        self.centroids = torch.from_numpy(unit_rows(kmeans.centroids))
        own = self.nearest(keys, 1)[:, 0]
        self.members = np.argsort(own, kind="stable")
        self.start = np.searchsorted(own[self.members], np.arange(self.n_lists + 1))
        self.set_probe(n_probe)

    def nearest(self, x: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` lists whose centroids are nearest to each row of ``x``."""
        out = np.empty((x.shape[0], k), dtype=np.int64)
        step = max(1, EXACT_PAIRS_PER_CHUNK // self.n_lists)
        for start in range(0, x.shape[0], step):
            scores = (
                torch.from_numpy(np.ascontiguousarray(x[start : start + step])) @ self.centroids.T
            )
            out[start : start + scores.shape[0]] = (
                scores.argmax(1, keepdim=True) if k == 1 else torch.topk(scores, k, dim=1).indices
            ).numpy()
        return out

    def set_probe(self, n_probe: int) -> None:
        if n_probe < 1:
            raise ValueError(f"`n_probe` must be an integer >= 1, got {n_probe}.")
        self.n_probe = min(n_probe, self.n_lists)

    def entries(self, lst: int) -> np.ndarray:
        """Entries of list ``lst``, sorted."""
        return self.members[self.start[lst] : self.start[lst + 1]]


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True
