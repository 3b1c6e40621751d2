"""Stage-1 similarity choices: embedding cosine, GO Jaccard, measured response, a user table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scvi
from conftest import SMALL_MODEL, few_shot_split, make_small_adata

import ptrag_sc
from ptrag_sc.data import NeighbourIndex, PerturbationEncoder, memory_from_means
from ptrag_sc.data._annotations import GeneAnnotations
from ptrag_sc.data._similarity import make_similarity, validate_similarity_table

#: Well-annotated human genes standing in for the synthetic perturbations (so GO terms exist).
REAL_GENES = ["MAPK1", "MAPK3", "MAP2K1", "MAP2K2", "SGK1", "TP53", "MDM2", "CDK1", "CDK2", "CCNB1", "JAK1", "STAT1"]


def real_gene_adata(seed: int = 0):
    """The small synthetic data with its 12 perturbations renamed to real human genes."""
    adata = make_small_adata(seed)
    emb = adata.uns["gene_embeddings"]
    rename = dict(zip(emb.index, REAL_GENES, strict=True))
    adata.obs["gene"] = adata.obs["gene"].astype(str).map(lambda g: rename.get(g, g)).astype("category")
    adata.uns["gene_embeddings"] = emb.rename(index=rename)
    return adata


def response_memory(perturbations, n_cell_types=3, n_genes=20, seed=0, missing=()):
    """A response memory of every (perturbation, cell type) pair, except the ``missing`` ones."""
    rng = np.random.default_rng(seed)
    pairs = [(p, f"ct{c}") for p in perturbations for c in range(n_cell_types) if (p, f"ct{c}") not in set(missing)]
    perts = np.array([p for p, _ in pairs])
    cts = np.array([c for _, c in pairs])
    emb = pd.DataFrame(rng.normal(size=(len(perturbations), 8)).astype(np.float32), index=list(perturbations))
    encoder = PerturbationEncoder(emb)
    means = rng.normal(size=(len(pairs), n_genes)) + 5.0
    memory = memory_from_means(
        "response",
        perturbations=perts,
        cell_types=cts,
        entry_means=means,
        control_means=np.full_like(means, 5.0),
        n_cells=np.full(len(pairs), 30),
        encoder=encoder,
        evidence=(),
    )
    return memory, encoder


def test_table_ranking_follows_the_table():
    genes = REAL_GENES[:8]
    memory, encoder = response_memory(genes)
    rng = np.random.default_rng(1)
    table = pd.DataFrame(rng.normal(size=(8, 6)), index=genes, columns=genes[:6])  # not square, not symmetric
    index = NeighbourIndex(memory, n_candidates=24, backend="exact", similarity=make_similarity(table))
    query = np.array(["MAPK1"])
    cand, sim, _, _ = index.query(query, encoder.embed(query), np.array(["ct0"]))
    names = memory.perturbations[cand[0][cand[0] >= 0]]
    # The query measured in the other cell types first; then every covered gene by the table's value.
    assert list(names[:2]) == ["MAPK1", "MAPK1"]
    covered = names[2:][np.isin(names[2:], genes[:6])]
    values = table.loc["MAPK1", covered].to_numpy()
    assert np.all(np.diff(values) <= 1e-12)
    assert np.allclose(sim[0][2 : 2 + len(covered)], values, atol=1e-6)
    # Genes missing from the columns come after all covered ones, with NaN similarity.
    first_missing = np.flatnonzero(~np.isin(names, genes[:6]))[0]
    assert np.all(~np.isin(names[first_missing:], genes[:6]))
    assert np.all(np.isnan(sim[0][first_missing : len(names)]))


def test_table_query_missing_from_the_index_falls_back_to_the_embedding():
    genes = REAL_GENES[:8]
    memory, encoder = response_memory(genes)
    table = pd.DataFrame(np.eye(8), index=genes, columns=genes).drop(index="CDK1")
    plain = NeighbourIndex(memory, n_candidates=10, backend="exact")
    prior = NeighbourIndex(memory, n_candidates=10, backend="exact", similarity=make_similarity(table))
    query = np.array(["CDK1"])
    a = plain.query(query, encoder.embed(query), np.array(["ct1"]))
    b = prior.query(query, encoder.embed(query), np.array(["ct1"]))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)


def test_go_ranking_is_the_jaccard_of_go_terms():
    genes = REAL_GENES
    memory, encoder = response_memory(genes, n_cell_types=2)
    annotations = GeneAnnotations()
    index = NeighbourIndex(memory, n_candidates=30, backend="exact", similarity=make_similarity("go", annotations=annotations))
    query = np.array(["MAPK3"])
    cand, sim, _, _ = index.query(query, encoder.embed(query), np.array(["ct0"]))
    valid = cand[0] >= 0
    names = memory.perturbations[cand[0][valid]]
    terms = {g: set(t) for g, t in annotations._terms_of(genes).items()}
    expected = np.array([len(terms["MAPK3"] & terms[g]) / len(terms["MAPK3"] | terms[g]) for g in names])
    np.testing.assert_allclose(sim[0][valid], expected, atol=1e-6)
    assert names[0] == "MAPK3"
    others = expected[names != "MAPK3"]
    assert np.all(np.diff(others) <= 1e-9)
    assert names[names != "MAPK3"][0] == "MAPK1"  # its closest paralogue shares the most terms


def test_response_ranking_uses_the_query_measured_in_other_cell_types():
    genes = REAL_GENES[:6]
    memory, encoder = response_memory(genes, missing=[("TP53", "ct1"), ("TP53", "ct2")])
    index = NeighbourIndex(memory, n_candidates=20, backend="exact", similarity=make_similarity("response"))
    specific = memory.specific
    query = np.array(["MAPK1"])
    cand, sim, _, _ = index.query(query, encoder.embed(query), np.array(["ct0"]))
    own = (memory.perturbations == "MAPK1") & (memory.cell_types != "ct0")
    profile = specific[own].mean(axis=0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    expected = unit(specific) @ unit(profile)
    valid = cand[0] >= 0
    np.testing.assert_allclose(sim[0][valid], expected[cand[0][valid]], atol=1e-5)
    assert set(memory.perturbations[cand[0][:2]]) == {"MAPK1"}
    assert np.all(np.diff(sim[0][2:][valid[2:]]) <= 1e-6)
    # TP53 is measured in ct0 only: asked in ct0 it has no other cell type, so the embedding ranks.
    plain = NeighbourIndex(memory, n_candidates=20, backend="exact")
    query = np.array(["TP53"])
    a = plain.query(query, encoder.embed(query), np.array(["ct0"]))
    b = index.query(query, encoder.embed(query), np.array(["ct0"]))
    np.testing.assert_array_equal(a[0], b[0])


SIMILARITIES = ["embedding", "go", "response", "table"]


@pytest.mark.parametrize("option", SIMILARITIES)
def test_each_similarity_trains_and_predicts(option, tmp_path):
    scvi.settings.seed = 0
    adata = real_gene_adata()
    adata.obs["split"] = few_shot_split(adata)
    ptrag_sc.PTRAG.setup_anndata(adata)
    similarity = option
    if option == "table":
        rng = np.random.default_rng(0)
        similarity = pd.DataFrame(rng.random((12, 12)), index=REAL_GENES, columns=REAL_GENES)
    model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], similarity=similarity, **SMALL_MODEL)
    model.train(max_steps=20, split_key="split")
    test = adata.obs["split"].to_numpy() == "test"
    query = sorted(set(adata.obs["gene"][test].astype(str)))
    ct = adata.obs["cell_line"][test].astype(str).iloc[0]
    controls = adata[(adata.obs["gene"] == "non-targeting").to_numpy() & (adata.obs["cell_line"] == ct).to_numpy()].copy()
    generated = model.predict(controls, perturbations=query)
    assert generated.n_obs == len(query) * controls.n_obs
    assert np.isfinite(generated.X).all()
    table = model.get_retrieval(query, cell_type=ct)
    if option == "table":
        # The retrieval reports the table's value.
        row = table[table["candidate"] != table["query"]].iloc[0]
        assert row["similarity"] == pytest.approx(similarity.loc[row["query"], row["candidate"]], abs=1e-6)
    # The choice is saved with the model (a table as a DataFrame) and gives the same predictions.
    model.save(tmp_path / "m")
    loaded = ptrag_sc.PTRAG.load(tmp_path / "m", adata=adata)
    if option == "table":
        pd.testing.assert_frame_equal(loaded.similarity, similarity)
    else:
        assert loaded.similarity == option
    again = loaded.predict(controls, perturbations=query)
    np.testing.assert_allclose(again.X, generated.X, atol=1e-5)


def test_similarities_change_the_candidates():
    """GO and response priors retrieve other candidates than the embedding does."""
    scvi.settings.seed = 0
    adata = real_gene_adata()
    ptrag_sc.PTRAG.setup_anndata(adata)
    tables = {}
    for option in ("embedding", "go"):
        model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], similarity=option, **SMALL_MODEL)
        model.train(max_steps=2, validation_size=0)
        tables[option] = model.get_retrieval(["MAPK3"], cell_type="cell_line_0", n_cells=8)
    order = {k: t.loc[t["candidate"] != "MAPK3", "candidate"].tolist()[:4] for k, t in tables.items()}
    assert order["go"][0] == "MAPK1"
    assert order["go"] != order["embedding"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("cosine", "`similarity` must be one of"),
        (pd.DataFrame([[1.0, np.nan]], index=["A"], columns=["A", "B"]), "NaN or infinite"),
        (pd.DataFrame([[1.0, 2.0]], index=["A"], columns=["a", "A"]), "duplicated genes"),
        (pd.DataFrame([["x"]], index=["A"], columns=["A"]), "non-numeric"),
        (pd.DataFrame(), "empty"),
    ],
)
def test_bad_similarity_is_refused(adata, value, message):
    ptrag_sc.PTRAG.setup_anndata(adata)
    with pytest.raises(ValueError, match=message):
        ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], similarity=value, **SMALL_MODEL)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"similarity": "response", "memory": "embedding"}, "needs `memory='response'`"),
        ({"similarity": "go", "retrieval": "none"}, "nothing is retrieved"),
        ({"similarity": "go", "index_backend": "faiss"}, "searches gene embeddings only"),
    ],
)
def test_similarity_conflicts_are_refused(adata, options, message):
    ptrag_sc.PTRAG.setup_anndata(adata)
    with pytest.raises(ValueError, match=message):
        ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **options, **SMALL_MODEL)


def test_table_validation_canonicalises_gene_names():
    table = pd.DataFrame([[1.0, 0.5]], index=[" mapk1"], columns=["MAPK1", "sgk1"])
    clean = validate_similarity_table(table)
    assert list(clean.index) == ["MAPK1"]
    assert list(clean.columns) == ["MAPK1", "SGK1"]
    with pytest.raises(TypeError, match="pandas DataFrame"):
        validate_similarity_table(np.eye(2))
