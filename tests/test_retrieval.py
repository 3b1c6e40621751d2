"""Stage-1 retrieval: memory construction, neighbour tables, self-exclusion, faiss backend."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ptrag_sc.data import NeighbourIndex, PerturbationEncoder, build_memory


@pytest.fixture
def encoder():
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.normal(size=(6, 4)), index=list("ABCDEF"))
    return PerturbationEncoder(table)


def _cells():
    # Two cell types; A, B, C measured in both, D only in t1; controls in both.
    labels = np.array(["ctrl"] * 4 + ["A", "A", "B", "C", "D"] + ["A", "B", "C"])
    cts = np.array(["t1", "t1", "t2", "t2"] + ["t1"] * 5 + ["t2"] * 3)
    X = np.arange(len(labels) * 3, dtype=float).reshape(-1, 3)
    return X, labels, cts


def test_response_memory_entries_and_shifts(encoder):
    X, labels, cts = _cells()
    train = np.ones(len(labels), dtype=bool)
    memory = build_memory("response", X=X, perturbations=labels, cell_types=cts, is_control=labels == "ctrl", train_mask=train, encoder=encoder)
    assert list(memory.entry_names()) == ["A@t1", "A@t2", "B@t1", "B@t2", "C@t1", "C@t2", "D@t1"]
    ctrl_t1 = X[:2].mean(0)
    np.testing.assert_allclose(memory.responses[0], X[4:6].mean(0) - ctrl_t1)
    assert memory.n_cells.tolist() == [2, 1, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(memory.embeddings[1], encoder.embed(["A"])[0])
    assert memory.response_codes.shape == (7, 3)


def test_embedding_memory_has_one_entry_per_training_perturbation(encoder):
    X, labels, cts = _cells()
    train = labels != "D"
    memory = build_memory("embedding", X=X, perturbations=labels, cell_types=cts, is_control=labels == "ctrl", train_mask=train, encoder=encoder)
    assert list(memory.perturbations) == ["A", "B", "C"]
    assert memory.responses is None


def test_self_exclusion_embedding_memory(encoder):
    X, labels, cts = _cells()
    memory = build_memory("embedding", X=X, perturbations=labels, cell_types=cts, is_control=labels == "ctrl", train_mask=np.ones(len(labels), bool), encoder=encoder)
    index = NeighbourIndex(memory, n_candidates=10, backend="exact")
    queries = np.array(["A", "B", "D", "E"])
    cand, sim, same, relation = index.query(queries, encoder.embed(queries), np.array(["t1"] * 4))
    assert (relation == 0).all()
    for q, row in zip(queries, cand, strict=True):
        names = memory.perturbations[row[row >= 0]]
        assert q not in names  # a perturbation never retrieves itself
    # 4 entries, one excluded for a measured query: 3 candidates, then padding.
    assert (cand[0] >= 0).sum() == 3
    assert (cand[3] >= 0).sum() == 4
    assert np.isnan(sim[0, 3])
    assert not same.any()
    # Sorted by decreasing similarity, and the similarity is the cosine.
    valid = sim[3][cand[3] >= 0]
    assert np.all(np.diff(valid) <= 1e-6)
    e = encoder.embed(["E"])[0]
    best = memory.embeddings[cand[3, 0]]
    assert valid[0] == pytest.approx(e @ best / np.linalg.norm(e) / np.linalg.norm(best), rel=1e-5)


def test_self_exclusion_response_memory_is_per_cell_type(encoder):
    X, labels, cts = _cells()
    memory = build_memory("response", X=X, perturbations=labels, cell_types=cts, is_control=labels == "ctrl", train_mask=np.ones(len(labels), bool), encoder=encoder)
    index = NeighbourIndex(memory, n_candidates=3, backend="exact")
    queries = np.array(["A", "A", "D"])
    query_ct = np.array(["t1", "t2", "t2"])
    cand, sim, _, relation = index.query(queries, encoder.embed(queries), query_ct)
    assert relation[0, 0] == 1
    assert relation[1, 0] == 1
    assert relation[2, 0] == 1
    assert (relation[:, 1:] == 0).all()
    names = memory.entry_names()
    # The exact entry is excluded; the query measured in the other cell type comes first.
    assert names[cand[0, 0]] == "A@t2"
    assert "A@t1" not in names[cand[0]]
    assert names[cand[1, 0]] == "A@t1"
    assert "A@t2" not in names[cand[1]]
    assert names[cand[2, 0]] == "D@t1"  # D was never measured in t2: its t1 entry is evidence
    assert sim[0, 0] == pytest.approx(1.0)
    # Ties in similarity prefer the query's own cell type.
    b = np.array(["B"])
    c2, _, s2, _ = index.query(np.array(["E"]), encoder.embed(["B"]), np.array(["t2"]))
    assert names[c2[0, 0]] == "B@t2"
    assert s2[0, 0]
    assert names[c2[0, 1]] == "B@t1"
    assert not s2[0, 1]
    assert b.size == 1


def test_faiss_backend_matches_exact():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(300)]
    encoder = PerturbationEncoder(pd.DataFrame(rng.normal(size=(300, 16)), index=genes))
    labels = np.repeat(genes, 2)
    cts = np.tile(["a", "b"], 300)
    X = rng.random((600, 5))
    labels = np.concatenate([labels, ["ctrl"] * 4])
    cts = np.concatenate([cts, ["a", "b", "a", "b"]])
    X = np.concatenate([X, rng.random((4, 5))])
    for kind in ("embedding", "response"):
        memory = build_memory(kind, X=X, perturbations=labels, cell_types=cts, is_control=labels == "ctrl", train_mask=np.ones(len(labels), bool), encoder=encoder)
        queries = np.array([*genes[:50], "G5+G7"])
        q_ct = np.array(["a"] * 51)
        exact = NeighbourIndex(memory, n_candidates=8, backend="exact").query(queries, encoder.embed(queries), q_ct)[:2]
        fast = NeighbourIndex(memory, n_candidates=8, backend="faiss").query(queries, encoder.embed(queries), q_ct)[:2]
        if kind == "embedding":
            np.testing.assert_array_equal(exact[0], fast[0])
        else:  # ties between cell types of one gene may be ordered differently
            genes_of = lambda c, m=memory: [sorted(m.perturbations[r]) for r in c]  # noqa: E731
            assert genes_of(exact[0]) == genes_of(fast[0])
        np.testing.assert_allclose(np.sort(exact[1], 1), np.sort(fast[1], 1), rtol=1e-5)


def test_training_groups_never_retrieve_their_own_entry(trained):
    model, data = trained
    memory = model.memory
    names = memory.entry_names()
    labels = data.obs["gene"].astype(str).to_numpy()
    cts = data.obs["cell_line"].astype(str).to_numpy()
    groups = model._groups(
        member=(labels != "non-targeting"),
        labels=labels,
        cell_types=cts,
        batches=np.full(data.n_obs, -1),
        control_mask=labels == "non-targeting",
    )
    for p, ct, row in zip(groups.perturbation, groups.cell_type, groups.candidates, strict=True):
        assert f"{p}@{ct}" not in set(names[row[row >= 0]])
        # The same perturbation in the other training cell types is among the candidates.
        others = {f"{p}@{c}" for c in memory.cell_types if c != ct} & set(names)
        assert others <= set(names[row[row >= 0]])


def test_combination_members_are_flagged(encoder):
    X, labels, cts = _cells()
    memory = build_memory("response", X=X, perturbations=labels, cell_types=cts, is_control=labels == "ctrl", train_mask=np.ones(len(labels), bool), encoder=encoder)
    index = NeighbourIndex(memory, n_candidates=7, backend="exact")
    cand, _, _, relation = index.query(np.array(["A+B"]), encoder.embed(["A+B"]), np.array(["t1"]))
    names = memory.entry_names()[cand[0]]
    members = {n for n, r in zip(names, relation[0], strict=True) if r == 2}
    assert members == {"A@t1", "A@t2", "B@t1", "B@t2"}


def test_context_response_leaves_the_query_out(encoder):
    from ptrag_sc.data._memory import context_responses

    X, labels, cts = _cells()
    memory = build_memory("response", X=X, perturbations=labels, cell_types=cts, is_control=labels == "ctrl", train_mask=np.ones(len(labels), bool), encoder=encoder)
    ctx, valid = context_responses(memory, np.array(["A", "Z", "A"]), np.array(["t1", "t1", "t3"]))
    names = list(memory.entry_names())
    others = [names.index(n) for n in ("B@t1", "C@t1", "D@t1")]
    np.testing.assert_allclose(ctx[0], memory.responses[others].mean(0), rtol=1e-6)
    every = [names.index(n) for n in ("A@t1", "B@t1", "C@t1", "D@t1")]
    np.testing.assert_allclose(ctx[1], memory.responses[every].mean(0), rtol=1e-6)
    assert valid.tolist() == [True, True, False]
    assert not ctx[2].any()


def test_combination_embedding_is_sum(encoder):
    np.testing.assert_allclose(encoder.embed(["A+B"])[0], encoder.embed(["A"])[0] + encoder.embed(["B"])[0])
    table = encoder.table.copy()
    table.loc["A+B"] = np.ones(table.shape[1])
    own = PerturbationEncoder(table)
    np.testing.assert_allclose(own.embed(["a+b"])[0], np.ones(table.shape[1]))
    with pytest.raises(ValueError, match=r"'A\+Z' \(no vector for \['Z'\]\)"):
        encoder.embed(["A+Z"])
