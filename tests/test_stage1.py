"""Stage 1 at scale: the approximate (list) search against the exact one, and bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from ptrag_sc.data import RetrievalMemory
from ptrag_sc.data import _index as index_module
from ptrag_sc.data._index import NeighbourIndex


def _memory(kind: str, n_perturbations: int = 1500, dim: int = 24, seed: int = 0) -> RetrievalMemory:
    """Clustered unit embeddings; a response memory holds each perturbation in two cell types."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(25, dim))
    emb = centres[rng.integers(0, 25, n_perturbations)] + 0.6 * rng.normal(size=(n_perturbations, dim))
    labels = np.array([f"P{i}" for i in range(n_perturbations)], dtype=object)
    if kind == "embedding":
        cts = np.full(n_perturbations, "", dtype=object)
    else:
        emb, labels = np.repeat(emb, 2, axis=0), np.repeat(labels, 2)
        cts = np.tile(np.array(["a", "b"], dtype=object), n_perturbations)
    return RetrievalMemory(kind=kind, perturbations=labels, cell_types=cts, embeddings=emb.astype(np.float32), responses=None, n_cells=np.ones(len(labels), np.int64))


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([np.intersect1d(f[f >= 0], e[e >= 0]).size / (e >= 0).sum() for f, e in zip(found, exact, strict=True)]))


@pytest.mark.parametrize("kind", ["embedding", "response"])
def test_approximate_search_recall_and_exclusion(kind):
    pytest.importorskip("faiss")
    memory = _memory(kind)
    queries = memory.perturbations.astype(str)
    cts = np.where(np.arange(len(queries)) % 2, "a", "b") if kind == "response" else memory.cell_types
    exact = NeighbourIndex(memory, n_candidates=16, backend="exact").query(queries, memory.embeddings, cts)
    index = NeighbourIndex(memory, n_candidates=16, backend="faiss", approximate=True, n_probe=4)
    assert index.approximate
    assert index.n_probe == 4
    found = index.query(queries, memory.embeddings, cts)
    assert _recall(found[0], exact[0]) > 0.97
    # Never the query's own entry; similarities are the exact cosines of what was found.
    own = (memory.perturbations[np.maximum(found[0], 0)] == queries[:, None]) & (found[0] >= 0)
    if kind == "response":
        own &= memory.cell_types[np.maximum(found[0], 0)] == cts[:, None]
    assert not own.any()
    unit = memory.embeddings / np.linalg.norm(memory.embeddings, axis=1, keepdims=True)
    np.testing.assert_allclose(found[1], np.einsum("nd,nkd->nk", unit, unit[found[0]]), atol=1e-5)
    # Probing every list is the exact search.
    index.n_probe = index._lists.n_lists
    for got, want in zip(index.query(queries, memory.embeddings, cts), exact, strict=True):
        np.testing.assert_array_equal(got, want)


def test_faiss_is_approximate_only_beyond_the_threshold(monkeypatch):
    pytest.importorskip("faiss")
    memory = _memory("embedding", n_perturbations=300)
    assert not NeighbourIndex(memory, n_candidates=8, backend="faiss").approximate
    monkeypatch.setattr(index_module, "APPROXIMATE_THRESHOLD", 200)
    assert NeighbourIndex(memory, n_candidates=8, backend="faiss").approximate


def test_exact_search_is_chunked_by_pairs(monkeypatch):
    memory = _memory("response", n_perturbations=400)
    queries, cts = memory.perturbations.astype(str), memory.cell_types.astype(str)
    whole = NeighbourIndex(memory, n_candidates=8, backend="exact").query(queries, memory.embeddings, cts)
    seen = []
    original = NeighbourIndex._exact

    def spy(self, q, *args, **kwargs):
        seen.append(q.shape[0] * len(self.memory))
        return original(self, q, *args, **kwargs)

    monkeypatch.setattr(index_module, "EXACT_PAIRS_PER_CHUNK", 5 * len(memory))
    monkeypatch.setattr(NeighbourIndex, "_exact", spy)
    chunked = NeighbourIndex(memory, n_candidates=8, backend="exact").query(queries, memory.embeddings, cts)
    assert max(seen) <= 5 * len(memory)
    assert len(seen) == -(-len(queries) // 5)
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_array_equal(a, b)
