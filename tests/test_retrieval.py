"""Stage-1 retrieval: memory construction, neighbour tables, self-exclusion, faiss backend."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ptrag_sc.data import EVIDENCE_SOURCES, NeighbourIndex, PerturbationEncoder, build_memory


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
    view = model.state.data(data)
    groups = model.state.builder.training_groups(view, ~view.is_control, view.is_control)
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
    X, labels, cts = _cells()
    memory = build_memory("response", X=X, perturbations=labels, cell_types=cts, is_control=labels == "ctrl", train_mask=np.ones(len(labels), bool), encoder=encoder)
    loo, full = memory.contexts(np.array(["A", "Z", "A"]), np.array(["t1", "t1", "t3"]))
    names = list(memory.entry_names())
    others = [names.index(n) for n in ("B@t1", "C@t1", "D@t1")]
    np.testing.assert_allclose(loo[0], memory.responses[others].mean(0), rtol=1e-6)
    every = [names.index(n) for n in ("A@t1", "B@t1", "C@t1", "D@t1")]
    np.testing.assert_allclose(loo[1], memory.responses[every].mean(0), rtol=1e-6)
    np.testing.assert_allclose(full[0], memory.responses[every].mean(0), rtol=1e-6)
    # A cell type without entries gets the mean context of the cell types that have some.
    t2 = [names.index(n) for n in ("A@t2", "B@t2", "C@t2")]
    np.testing.assert_allclose(loo[2], (memory.responses[every].mean(0) + memory.responses[t2].mean(0)) / 2, rtol=1e-5)


def _specific(responses, groups):
    out = responses.copy()
    for g in np.unique(groups):
        out[groups == g] -= responses[groups == g].mean(0)
    return out


def test_ridge_leave_one_out_is_the_refit_without_the_entry():
    """No part of an entry's response reaches its own leave-one-out estimate: the map, its centre
    and intercept, and the other entries' specific shifts (whose cell-type context included the
    entry) are all recomputed without it."""
    from ptrag_sc.data._sources import ridge_leave_one_out

    rng = np.random.default_rng(0)
    E = rng.normal(size=(14, 30))  # more dimensions than entries: the leak was exact there
    responses = E[:, :4] @ rng.normal(size=(4, 3)) + 0.3 * rng.normal(size=(14, 3))
    groups = np.array(["t1"] * 8 + ["t2"] * 6)
    loo, weights, center, alpha = ridge_leave_one_out(E, _specific(responses, groups), groups, grid=(0.5,))
    for i in range(14):
        keep = np.arange(14) != i
        Y = _specific(responses[keep], groups[keep])
        Ec, y_bar = E[keep] - E[keep].mean(0), Y.mean(0)
        w = np.linalg.solve(Ec.T @ Ec + alpha * np.eye(30), Ec.T @ (Y - y_bar))
        np.testing.assert_allclose(loo[i], (E[i] - E[keep].mean(0)) @ w + y_bar, rtol=1e-6, atol=1e-8)
    full = (E - center) @ weights
    assert np.corrcoef(full.ravel(), _specific(responses, groups).ravel())[0, 1] > 0.9


def test_ridge_leave_one_out_carries_no_signal_from_pure_noise():
    """With responses unrelated to the embeddings, the leave-one-out estimates do not correlate
    with the entries' own specific shifts (a leak through the shared centre made them ~1)."""
    from ptrag_sc.data._evidence import row_cosines
    from ptrag_sc.data._sources import ridge_leave_one_out

    rng = np.random.default_rng(3)
    E = rng.normal(size=(20, 384))
    groups = np.array(["t1"] * 20)
    Y = _specific(rng.normal(size=(20, 50)), groups)
    loo, *_ = ridge_leave_one_out(E, Y, groups)
    assert abs(row_cosines(loo, Y).mean()) < 0.15


def test_stacking_weights_are_the_non_negative_least_squares_solution():
    from scipy.optimize import nnls

    from ptrag_sc.data._evidence import fit_stack

    rng = np.random.default_rng(1)
    sources = rng.normal(size=(4, 30, 6)).astype(np.float32)
    targets = 0.7 * sources[0] - 0.4 * sources[1] + 0.2 * sources[3] + 0.05 * rng.normal(size=(30, 6))
    weights = fit_stack(sources, targets)
    norms = (targets**2).sum(1)
    w = np.repeat(1 / np.sqrt(norms + np.median(norms)), 6)
    reference, _ = nnls(sources.reshape(4, -1).T * w[:, None], targets.ravel() * w)
    np.testing.assert_allclose(weights, reference, atol=1e-4)
    assert weights[1] == 0  # the negatively useful source gets no weight


def test_evidence_of_an_entry_leaves_its_own_response_out(encoder):
    X, labels, cts = _cells()
    train = np.ones(len(labels), dtype=bool)
    kwargs = {"perturbations": labels, "cell_types": cts, "is_control": labels == "ctrl", "train_mask": train, "encoder": encoder}
    memory = build_memory("response", X=X, **kwargs)
    changed = X.copy()
    changed[labels == "D"] += 100.0  # D@t1's own response
    other = build_memory("response", X=changed, **kwargs)
    query = (np.array(["D"]), np.array(["t1"]), encoder.embed(["D"]))
    a = memory.evidence(*query, None)
    b = other.evidence(*query, None)
    np.testing.assert_allclose(a["context"], b["context"], rtol=1e-5)
    # Its stacked estimate uses only the other entries' responses (the stacking weights, fitted
    # on all entries, may change).
    assert memory.evidence_model.stack_weights.shape == (len(EVIDENCE_SOURCES),)
    fresh = memory.evidence(np.array(["E"]), np.array(["t1"]), encoder.embed(["E"]), None)
    assert fresh["stacked"].shape == (1, 3)
    assert np.isfinite(fresh["stacked"]).all()


def test_combination_embedding_is_sum(encoder):
    np.testing.assert_allclose(encoder.embed(["A+B"])[0], encoder.embed(["A"])[0] + encoder.embed(["B"])[0])
    table = encoder.table.copy()
    table.loc["A+B"] = np.ones(table.shape[1])
    own = PerturbationEncoder(table)
    np.testing.assert_allclose(own.embed(["a+b"])[0], np.ones(table.shape[1]))
    with pytest.raises(ValueError, match=r"'A\+Z' \(no vector for \['Z'\]\)"):
        encoder.embed(["A+Z"])
