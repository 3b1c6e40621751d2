"""Stage 1 of the retrieval: the memory entries nearest to each query, computed once per query.

Three searches, chosen by ``index_backend`` and the size of the memory:

- exact, by matrix products over chunks of queries (at most ``EXACT_PAIRS_PER_CHUNK`` scores,
  float32, at a time: memory does not grow with the number of (query, entry) pairs);
- exact with faiss (``IndexFlatIP``), for faiss users with memories up to
  ``APPROXIMATE_THRESHOLD`` entries;
- approximate, beyond ``APPROXIMATE_THRESHOLD`` entries with faiss: an inverted-file search.
  faiss k-means (spherical, on a sample) cuts the entries into about ``sqrt(M)`` lists; a query
  is scored exactly against the entries of the ``n_probe`` lists whose centroids are nearest to
  the centroid of its own list. Queries of one list share their candidates, so they are scored
  together by one matrix product: a neighbour table for many queries costs
  ``M * n_probe / sqrt(M)`` multiply-adds per query at matrix-product speed, where a per-query
  IVF search scans the lists one query at a time.
"""

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
    """Lists of the approximate search for ``n_entries`` entries: about ``sqrt(M)``, 1 to
    65,536."""
    return int(np.clip(round(np.sqrt(n_entries)), 1, 65536))


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
        ``"exact"`` (matrix products over chunks of queries), ``"faiss"`` (needs the ``faiss``
        extra: exact ``IndexFlatIP`` up to ``APPROXIMATE_THRESHOLD`` entries, the approximate
        list search beyond; see the module notes) or ``"auto"`` (faiss beyond
        ``FAISS_AUTO_THRESHOLD`` entries when installed, else exact).
    sep
        Separator of combination labels.
    approximate
        With faiss, force the approximate search (``True``) or an exact one (``False``);
        default (``None``): by size, as above. Ignored by the exact backend.
    n_probe
        Lists a query of the approximate search is scored against (default
        ``DEFAULT_N_PROBE``): more is slower and closer to exact; all lists is exact.
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
        self._faiss = None
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
            else:
                import faiss

                self._faiss = faiss.IndexFlatIP(self._keys.shape[1])
                self._faiss.add(self._keys)

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
        if self.similarity is not None:
            # The prior is dense in float64: bound a chunk to about 16 M entries.
            chunk_size = max(1, min(chunk_size, (1 << 24) // max(1, len(self.memory))))
            for start in range(0, n, chunk_size):
                rows = slice(start, min(start + chunk_size, n))
                idx, val = self._exact(
                    q[rows],
                    pert_codes[rows],
                    ct_codes[rows],
                    prior=(perturbations[rows], cell_types[rows]),
                )
                cand[rows, : idx.shape[1]] = idx
                sim[rows, : val.shape[1]] = val
        elif self._lists is not None:
            self._search_lists(q, pert_codes, ct_codes, cand, sim)
        else:
            if self._faiss is None:
                chunk_size = max(
                    1, min(chunk_size, EXACT_PAIRS_PER_CHUNK // max(1, len(self.memory)))
                )
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                if self._faiss is None:
                    idx, val = self._exact(
                        q[start:stop], pert_codes[start:stop], ct_codes[start:stop]
                    )
                else:
                    idx, val = self._search_faiss(
                        q[start:stop], pert_codes[start:stop], ct_codes[start:stop]
                    )
                cand[start:stop, : idx.shape[1]] = idx
                sim[start:stop, : val.shape[1]] = val
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
                members = [m.strip().upper() for m in perturbations[row].split(self.sep)]
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
        """Top-``K`` of each query among all entries by one matrix product.

        Holds one ``(n, M)`` float32 score matrix (plus a boolean one for response memories).
        With ``prior`` (the queries' labels and cell types), entries are ranked by the stage-1
        similarity prior instead, and the prior's values are reported.
        """
        reported = None
        if prior is None:
            ranking = self._ranking(q, pert_codes, ct_codes)
        else:
            cosine = torch.from_numpy(q) @ torch.from_numpy(self._keys).T
            same = pert_codes[:, None] == self._mem_pert[None, :]
            similarity, order = self.similarity.scores(*prior, cosine.numpy(), same)
            reported, ranking = torch.from_numpy(similarity), torch.from_numpy(np.array(order))
            if self.memory.kind == "response":
                ranking.add_(
                    torch.from_numpy(ct_codes[:, None] == self._mem_ct[None, :]), alpha=1e-5
                )
            rows, excluded = self._excluded(pert_codes, ct_codes)
            ranking[torch.from_numpy(rows), torch.from_numpy(excluded)] = -torch.inf
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
        """Cosine of each query with its entries ``idx`` (``(n, K)``; ``-1`` gives garbage), by
        chunks."""
        out = np.empty(idx.shape, dtype=np.float32)
        for start in range(0, idx.shape[0], chunk):
            rows = slice(start, start + chunk)
            out[rows] = np.einsum("nd,nkd->nk", q[rows], self._keys[np.maximum(idx[rows], 0)])
        return out

    def _search_lists(
        self,
        q: torch.Tensor,
        pert_codes: torch.Tensor,
        ct_codes: torch.Tensor,
        cand: np.ndarray,
        sim: np.ndarray,
    ) -> None:
        """Approximate search: each query against the entries of its ``n_probe`` nearest lists.

        Organised by list: the queries probing a list are scored against its entries by one
        matrix product, and each query keeps its running top ``K``. Lists are visited nearest
        first for every query (all first choices, then all second choices, ...): after its
        nearest list a query has a threshold (its ``K``-th best score so far), and a query
        none of whose scores in a later list beats it skips the selection there.
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
                    queries = order[bounds[lst] : bounds[lst + 1]]
                    step = max(1, EXACT_PAIRS_PER_CHUNK // entries.size)
                    for first in range(0, queries.size, step):
                        chosen = queries[first : first + step]
                        rank = self._ranking(
                            block_q[chosen], block_pert[chosen], block_ct[chosen], entries
                        )
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
        q: torch.Tensor,
        pert_codes: torch.Tensor,
        ct_codes: torch.Tensor,
        entries: np.ndarray | None = None,
    ) -> torch.Tensor:
        """Scores of queries against all entries (or ``entries``, sorted): cosine, + 1e-5 for the
        query's cell type (response memories), ``-inf`` for the query's own entries."""
        keys = self._keys if entries is None else self._keys[entries]
        ranking = torch.from_numpy(q) @ torch.from_numpy(keys).T
        if self.memory.kind == "response":
            mem_ct = self._mem_ct if entries is None else self._mem_ct[entries]
            ranking.add_(torch.from_numpy(ct_codes[:, None] == mem_ct[None, :]), alpha=1e-5)
        rows, excluded = self._excluded(pert_codes, ct_codes)
        if rows.size and entries is not None:
            position = np.searchsorted(entries, excluded)
            found = (position < entries.size) & (
                entries[np.minimum(position, entries.size - 1)] == excluded
            )
            rows, excluded = rows[found], position[found]
        ranking[torch.from_numpy(rows), torch.from_numpy(excluded)] = -torch.inf
        return ranking

    def _search_faiss(
        self, q: np.ndarray, pert_codes: np.ndarray, ct_codes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """faiss search for ``K`` plus room for the excluded entry and for ties between cell
        types."""
        extra = len(self._ct_vocab) if self.memory.kind == "response" else 1
        k = min(self.n_candidates + extra, len(self.memory))
        val, idx = self._faiss.search(q, k)
        idx = idx.astype(np.int64)
        safe = np.maximum(idx, 0)
        excluded = (idx >= 0) & (self._mem_pert[safe] == pert_codes[:, None])
        if self.memory.kind == "response":
            excluded &= self._mem_ct[safe] == ct_codes[:, None]
        idx[excluded] = -1
        # Rank as the exact search does (similarity, then the query's cell type first); missing
        # and excluded slots go to the end.
        ranking = np.where(idx >= 0, val.astype(np.float64), -np.inf)
        if self.memory.kind == "response":
            ranking = ranking + 1e-5 * ((idx >= 0) & (self._mem_ct[safe] == ct_codes[:, None]))
        order = np.argsort(-ranking, axis=1, kind="stable")
        idx = np.take_along_axis(idx, order, axis=1)[:, : self.n_candidates]
        val = np.take_along_axis(val, order, axis=1)[:, : self.n_candidates]
        return idx, val


class _Lists:
    """The entries cut into k-means lists (faiss), and the lists each list's queries search.

    Parameters
    ----------
    keys
        Unit-norm entry embeddings ``(M, D)``.
    n_lists
        Number of lists (at most ``M``).
    n_probe
        Lists searched per query (at most ``n_lists``).
    """

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
        """The ``k`` lists whose centroids are nearest to each row of ``x`` (matrix products by
        chunks)."""
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
