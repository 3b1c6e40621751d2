"""The evidence of a response memory on data with known effects: when a source applies, the
perturbed gene's own shift, and a confidence that ranks predictions by their accuracy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ptrag_sc.data import PerturbationEncoder, memory_from_means
from ptrag_sc.data import _evidence as ev

N_GENES = 40


def _pathway_and_bystanders(seed: int = 0, n_pathway: int = 16, n_bystanders: int = 16):
    """One cell type: a pathway whose members share a strong response and near-identical
    embeddings, and bystanders without a response whose embeddings are closer to the pathway
    (cosine 0.7) than to each other (about 0.5): their nearest neighbours are pathway members."""
    rng = np.random.default_rng(seed)
    dims = 64
    axis = np.zeros(dims)
    axis[0] = 1.0
    pathway = axis + 0.1 * _unit(rng.normal(size=(n_pathway, dims)))
    noise = rng.normal(size=(n_bystanders, dims))
    noise[:, 0] = 0.0
    bystanders = 0.7 * axis + 0.71 * _unit(noise)
    names = [f"P{i}" for i in range(n_pathway)] + [f"N{i}" for i in range(n_bystanders)]
    table = pd.DataFrame(np.vstack([pathway, bystanders]), index=names)
    response = np.zeros(N_GENES)
    response[:10] = np.linspace(1.0, 0.4, 10)
    effects = np.vstack(
        [np.outer(1 + 0.1 * rng.normal(size=n_pathway), response), np.zeros((n_bystanders, N_GENES))]
    )
    return names, table, effects, rng


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _memory(names, table, effects, rng, noise=0.05, control=None, gene_names=None, evidence=None):
    control = np.full(N_GENES, 1.0) if control is None else control
    means = control + effects + noise * rng.normal(size=effects.shape)
    return memory_from_means(
        "response",
        perturbations=np.array(names),
        cell_types=np.array(["t"] * len(names)),
        entry_means=means,
        control_means=np.tile(control, (len(names), 1)),
        n_cells=np.full(len(names), 100),
        encoder=PerturbationEncoder(table),
        gene_names=gene_names,
        evidence=evidence,
    )


def test_gate_trusts_evidence_only_where_it_applies():
    """Evidence that is right for one kind of query and lends an unrelated strong response to
    another: the stack can only give it one compromise weight, the gate ~1 where it applies
    and ~0 where it does not."""
    rng = np.random.default_rng(0)
    n, n_genes = 60, 20
    applies = np.arange(n) % 3 != 0
    strong = np.zeros(n_genes)
    strong[:5] = 1.0
    source = strong + 0.05 * rng.normal(size=(n, n_genes))
    target = np.where(applies[:, None], source, 0.0) + 0.05 * rng.normal(size=(n, n_genes))
    weights = ev.entry_weights(target)
    stack = ev.fit_stack(source[None], target, weights)
    assert 0.4 < stack[0] < 0.85
    stacked = stack[0] * source
    design = np.column_stack([np.ones(n), np.where(applies, 1.0, -1.0)])
    coef = ev.fit_gate(stacked, target, design, weights)
    reliability = 2.0 / (1.0 + np.exp(-(design @ coef)))
    assert (reliability[applies] * stack[0]).min() > 0.85
    assert (reliability[~applies] * stack[0]).max() < 0.15


def test_bystanders_are_not_lent_the_pathway_response():
    names, table, effects, rng = _pathway_and_bystanders()
    held = ["P0", "N0", "N1"]
    train = [n for n in names if n not in held]
    keep = [names.index(n) for n in train]
    memory = _memory(train, table.loc[train], effects[keep], rng)
    encoder = PerturbationEncoder(table)
    out = memory.evidence(np.array(held), np.array(["t"] * 3), encoder.embed(held), None)
    estimate = out["context"] + out["stacked"]
    pathway = effects[names.index("P1")]
    # The pathway member gets the pathway's response...
    assert np.linalg.norm(estimate[0] - effects[0]) < 0.35 * np.linalg.norm(pathway)
    # ...the bystanders, whose nearest neighbours are pathway members, keep their own (no)
    # response: their specific shift points away from the pathway's, towards 0.
    lent = pathway - out["context"][1]
    for row in (1, 2):
        assert out["stacked"][row] @ lent < 0
        assert np.linalg.norm(estimate[row]) < 0.5 * np.linalg.norm(estimate[row] - pathway)


def test_confidence_ranks_known_good_above_known_bad():
    names, table, effects, rng = _pathway_and_bystanders(seed=1)
    held = ["P0", "P1", "N0", "N1", "N2"]
    train = [n for n in names if n not in held]
    keep = [names.index(n) for n in train]
    memory = _memory(train, table.loc[train], effects[keep], rng)
    encoder = PerturbationEncoder(table)
    out = memory.evidence(np.array(held), np.array(["t"] * len(held)), encoder.embed(held), None)
    confidence = out["confidence"]
    assert confidence.shape == (len(held),)
    assert np.all((confidence >= -1) & (confidence <= 1))
    # The pathway members' predictions are accurate, the bystanders' are noise around the
    # context: every pathway member is more confident than every bystander.
    assert confidence[:2].min() > confidence[2:].max()
    # Entries carry their own leave-one-out confidence, on the same scale.
    assert memory.entry_confidence.shape == (len(train),)


def test_discrimination_two_pathways_are_not_confused():
    """Perturbations of two pathways with distinct responses are predicted with distinct shifts."""
    rng = np.random.default_rng(2)
    dims = 12
    axes = np.eye(dims)[:2]
    names, rows, effects = [], [], []
    responses = np.zeros((2, N_GENES))
    responses[0, :8] = 1.0
    responses[1, 20:28] = 1.0
    for k in range(2):
        for i in range(10):
            names.append(f"{'AB'[k]}{i}")
            rows.append(axes[k] + 0.15 * rng.normal(size=dims) / np.sqrt(dims))
            effects.append(responses[k] * (1 + 0.1 * rng.normal()))
    table = pd.DataFrame(np.vstack(rows), index=names)
    effects = np.vstack(effects)
    held = ["A0", "A1", "B0", "B1"]
    train = [n for n in names if n not in held]
    keep = [names.index(n) for n in train]
    memory = _memory(train, table.loc[train], effects[keep], rng)
    encoder = PerturbationEncoder(table)
    out = memory.evidence(np.array(held), np.array(["t"] * 4), encoder.embed(held), None)
    shift = out["context"] + out["stacked"]
    specific = shift - shift.mean(0)
    cosine = ev.unit_rows(specific) @ ev.unit_rows(specific).T
    assert cosine[0, 1] > 0.8
    assert cosine[2, 3] > 0.8
    assert cosine[:2, 2:].max() < 0.0  # the two pathways point away from each other
    # Each prediction is closest to its own pathway's measured response.
    truth = effects[[names.index(h) for h in held]]
    assert (np.argmax(ev.unit_rows(shift) @ ev.unit_rows(truth).T, axis=1) // 2 == np.array([0, 0, 1, 1])).all()


def test_perturbed_gene_takes_the_median_relative_change_of_measured_targets():
    names, table, effects, rng = _pathway_and_bystanders(seed=3)
    gene_names = np.array([f"G{i}" for i in range(N_GENES)])
    # Every perturbation is a knock-down of a measured gene: the gene falls to 30% of control.
    targets = {n: 10 + i for i, n in enumerate(names[: N_GENES - 10])}
    gene_names[list(targets.values())] = list(targets.keys())
    control = np.full(N_GENES, 2.0)
    effects = effects.copy()
    for n, col in targets.items():
        effects[names.index(n), col] = -0.7 * control[col]
    held = ["N5"]
    train = [n for n in names if n not in held]
    keep = [names.index(n) for n in train]
    memory = _memory(train, table.loc[train], effects[keep], rng, noise=0.01, control=control, gene_names=gene_names)
    encoder = PerturbationEncoder(table)
    query = np.array(held)
    out = memory.evidence(query, np.array(["t"]), encoder.embed(held), None, control_mean=control[None, :])
    col = targets["N5"]
    predicted = out["context"][0, col] + out["stacked"][0, col]
    assert predicted == pytest.approx(-0.7 * control[col], abs=0.05)
    # Without the control mean the rule cannot apply: the gene gets what the sources say.
    plain = memory.evidence(query, np.array(["t"]), encoder.embed(held), None)
    assert abs(plain["context"][0, col] + plain["stacked"][0, col]) < 0.5
    # A training entry's own gene is estimated from the *other* entries (left out).
    entry = memory.entry_index(np.array(["N6"]), np.array(["t"]))[0]
    ctx, _ = memory.contexts(np.array(["N6"]), np.array(["t"]))
    col6 = targets["N6"]
    assert ctx[0, col6] + memory.entry_estimates[entry, col6] == pytest.approx(-0.7 * control[col6], abs=0.05)


def test_evidence_model_survives_to_dict():
    names, table, effects, rng = _pathway_and_bystanders(seed=4)
    memory = _memory(names, table, effects, rng)
    state = memory.to_dict()
    assert all(isinstance(k, str) for k in state)
    assert not any(isinstance(v, dict) for v in state.values())
    again = type(memory).from_dict(state)
    query = np.array(["P0+N0"])
    encoder = PerturbationEncoder(table)
    a = memory.evidence(query, np.array(["t"]), encoder.embed(query), None)
    b = again.evidence(query, np.array(["t"]), encoder.embed(query), None)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_combinations_follow_the_additive_model():
    """``A+B``: the sum of its members' measured shifts; an unmeasured member counts as the
    context response (the typical perturbation of the cell type)."""
    names, table, effects, rng = _pathway_and_bystanders(seed=5)
    memory = _memory(names, table, effects, rng)
    encoder = PerturbationEncoder(table)
    extra = pd.DataFrame(rng.normal(size=(1, table.shape[1])), index=["NEW"], columns=table.columns)
    encoder = PerturbationEncoder(pd.concat([table, extra]))
    queries = np.array(["N0+P0", "NEW+P1"])
    out = memory.evidence(queries, np.array(["t", "t"]), encoder.embed(queries), None)
    shift = out["context"] + out["stacked"]
    row = {n: i for i, n in enumerate(memory.perturbations)}
    np.testing.assert_allclose(shift[0], memory.responses[row["N0"]] + memory.responses[row["P0"]], rtol=1e-5, atol=1e-6)
    context = memory.context_full[0]
    np.testing.assert_allclose(shift[1], memory.responses[row["P1"]] + context, rtol=1e-5, atol=1e-6)


def test_combination_confidence_follows_the_size_of_the_additive_sum():
    """A combination is predicted by the additive sum of its members: two strong pathway members
    sum to a large, accurate shift, two bystanders to noise around the context. The confidence
    must read that sum (not the combination's own embedding, which sits between the two)."""
    names, table, effects, rng = _pathway_and_bystanders(seed=6)
    memory = _memory(names, table, effects, rng)
    assert np.all(np.isfinite(memory.evidence_model.size_coef))
    encoder = PerturbationEncoder(table)
    queries = np.array(["P0+P1", "P2+P3", "N0+N1", "N2+N3"])
    out = memory.evidence(queries, np.array(["t"] * 4), encoder.embed(queries), None)
    confidence = out["confidence"]
    assert np.all((confidence >= -1) & (confidence <= 1))
    assert confidence[:2].min() > confidence[2:].max()
    # A model file written before the line existed has no coefficients: the combination then
    # reads the feature-based confidence, as it did.
    state = {k: v for k, v in memory.to_dict().items() if k != "evidence_model.size_coef"}
    older = type(memory).from_dict(state)
    assert np.all(np.isnan(older.evidence_model.size_coef))
    fallback = older.evidence(queries, np.array(["t"] * 4), encoder.embed(queries), None)
    singles = np.array(["P0", "N0"])
    np.testing.assert_array_equal(
        older.evidence(singles, np.array(["t"] * 2), encoder.embed(singles), None)["confidence"],
        memory.evidence(singles, np.array(["t"] * 2), encoder.embed(singles), None)["confidence"],
    )
    assert not np.array_equal(fallback["confidence"], confidence)
