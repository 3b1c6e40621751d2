"""Behaviour of the PTRAG model class: training, prediction modes, save/load, seeds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scvi
from conftest import SMALL_MODEL, few_shot_split, make_small_adata

import ptrag_sc
from ptrag_sc import PTRAG


def _fit(data, steps=40, split_key=None, seed=0, early_stopping=None, **kwargs):
    scvi.settings.seed = seed
    PTRAG.setup_anndata(data)
    params = {**SMALL_MODEL, **kwargs}
    model = PTRAG(data, perturbation_embeddings=data.uns["gene_embeddings"], **params)
    model.train(max_steps=steps, split_key=split_key, early_stopping=early_stopping)
    return model


def test_registry_contents(adata):
    PTRAG.setup_anndata(adata, batch_key="gem_group")
    model = PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **SMALL_MODEL)
    registry = model.registry
    assert registry["setup_args"]["perturbation_key"] == "gene"
    assert registry["setup_args"]["control_group"] == "non-targeting"
    assert registry["setup_args"]["batch_key"] == "gem_group"
    pert_state = registry["field_registries"]["perturbation"]["state_registry"]
    expected = sorted(set(adata.obs["gene"].astype(str)) - {"non-targeting"})
    assert list(pert_state["perturbations"]) == expected
    assert pert_state["n_control_cells"] == int((adata.obs["gene"] == "non-targeting").sum())
    labels = registry["field_registries"]["labels"]["state_registry"]
    assert list(labels["categorical_mapping"]) == list(adata.obs["cell_line"].cat.categories)
    assert model.summary_stats.n_vars == adata.n_vars
    assert model.summary_stats.n_batch == adata.obs["gem_group"].nunique()
    model.view_anndata_setup()  # scvi-tools 1.4.2 needs `rich.pretty` imported


def test_training_lowers_validation_energy():
    # The paper's embedding memory starts from "control cells" and must learn the responses.
    data = make_small_adata()
    data.obs["split"] = few_shot_split(data)
    model = _fit(data, steps=400, split_key="split", retrieval="ptrag", memory="embedding")
    val = model.history["validation_energy"]["validation_energy"].astype(float).to_numpy()
    train = model.history["train_energy"]["train_energy"].astype(float).to_numpy()
    assert len(val) >= 5
    assert val.min() < 0.75 * val[0]
    assert train[-1] < 0.6 * train[0]
    assert "train_active_ratio" in model.history
    assert model.is_trained


def test_keep_best_restores_the_best_validation_epoch():
    data = make_small_adata()
    data.obs["split"] = few_shot_split(data)
    model = _fit(data, steps=200, split_key="split", early_stopping=False)
    # The callback watches `validation_loss` (the objective), not its energy term.
    val = model.history["validation_loss"]["validation_loss"].astype(float)
    assert model.best_epoch_ == val.index[int(np.argmin(val.to_numpy()))]
    no_keep = make_small_adata()
    no_keep.obs["split"] = few_shot_split(no_keep)
    scvi.settings.seed = 0
    PTRAG.setup_anndata(no_keep)
    plain = PTRAG(no_keep, perturbation_embeddings=no_keep.uns["gene_embeddings"], **SMALL_MODEL)
    plain.train(max_steps=200, split_key="split", keep_best=False, early_stopping=False)
    assert plain.best_epoch_ is None
    # Same training run; only the final weights differ (unless the last epoch was the best).
    if model.best_epoch_ != val.index[-1]:
        assert not np.array_equal(model.predict(data, inplace=False), plain.predict(no_keep, inplace=False))


def test_strong_perturbation_moves_towards_observed_cells(trained):
    model, data = trained
    model.predict(data)
    pred, X = data.layers["ptrag"], data.X
    gene = data.obs["gene"].astype(str).to_numpy()
    line = data.obs["cell_line"].astype(str).to_numpy()
    test = data.obs["split"].to_numpy() == "test"
    effects = data.uns["true_effects"]
    keys = {f"{c}:{g}" for c, g in zip(line[test], gene[test], strict=True)}
    strongest = max(keys, key=lambda k: np.linalg.norm(effects.loc[k].to_numpy()))
    ct, p = strongest.split(":")
    cells = (gene == p) & (line == ct)
    ctrl = X[(gene == "non-targeting") & (line == ct)].mean(0)
    observed, predicted = X[cells].mean(0), pred[cells].mean(0)
    # Much closer to the observed mean than doing nothing, and in the right direction.
    assert np.linalg.norm(predicted - observed) < 0.7 * np.linalg.norm(ctrl - observed)
    assert np.corrcoef(predicted - ctrl, effects.loc[strongest].to_numpy())[0, 1] > 0.7


def test_counterfactual_prediction_keeps_controls_and_input(trained):
    model, data = trained
    before = data.X.copy()
    layer = model.predict(data, inplace=False)
    assert layer.shape == data.shape
    assert layer.dtype == np.float32
    control = (data.obs["gene"] == "non-targeting").to_numpy()
    np.testing.assert_array_equal(layer[control], before[control])
    np.testing.assert_array_equal(data.X, before)
    assert (layer >= 0).all()
    assert np.isfinite(layer).all()
    assert not np.allclose(layer[~control], before[~control])
    # Only the requested cells change.
    some = np.flatnonzero(~control)[:5]
    partial = model.predict(data, indices=some, inplace=False)
    untouched = np.setdiff1d(np.arange(data.n_obs), some)
    np.testing.assert_array_equal(partial[untouched], before[untouched])
    np.testing.assert_allclose(partial[some], layer[some], rtol=1e-5, atol=1e-6) if len(some) == len(
        np.flatnonzero(~control)
    ) else None


def test_counterfactual_prediction_writes_a_confidence_per_cell(trained):
    model, data = trained
    data = data.copy()
    model.predict(data, key_added="pred")
    confidence = data.obs["pred_confidence"]
    control = (data.obs["gene"] == "non-targeting").to_numpy()
    assert confidence[control].isna().all()
    assert confidence[~control].between(-1, 1).all()
    # One number per (cell type, perturbation): it describes the prediction, not the cell.
    per_group = confidence[~control].groupby([data.obs["cell_line"][~control], data.obs["gene"][~control]], observed=True).nunique()
    assert (per_group == 1).all()
    # The same number as the retrieval table's and the generation's.
    row = data.obs[~control].iloc[0]
    table = model.get_retrieval([row["gene"]], cell_type=row["cell_line"])
    assert table["confidence"].iloc[0] == pytest.approx(float(confidence[~control].iloc[0]), abs=1e-6)
    # An existing column is replaced only with overwrite=True (with the layer).
    with pytest.raises(ValueError, match="pred"):
        model.predict(data, key_added="pred")
    del data.layers["pred"]
    with pytest.raises(ValueError, match="pred_confidence"):
        model.predict(data, key_added="pred")
    model.predict(data, key_added="pred", overwrite=True)


def test_generation_of_unseen_perturbation_and_combination(trained):
    model, data = trained
    controls = data[data.obs["gene"] == "non-targeting"].copy()
    seen = str(model.training_perturbations_[0])
    # A gene with an embedding that never occurs in the data, and a combination of two genes.
    emb = data.uns["gene_embeddings"]
    out = model.predict(controls, perturbations=[seen, f"{seen}+{model.training_perturbations_[1]}"])
    assert out.n_obs == 2 * controls.n_obs
    assert list(out.var_names) == list(data.var_names)
    np.testing.assert_array_equal(out.X, out.layers["ptrag"])
    assert set(out.obs["gene"].astype(str)) == {seen, f"{seen}+{model.training_perturbations_[1]}"}
    assert out.obs["ptrag_source_cell"].isin(controls.obs_names).all()
    assert not out.obs.loc[out.obs["gene"] == seen, "ptrag_unseen_perturbation"].any()
    assert out.obs.loc[out.obs["gene"] != seen, "ptrag_unseen_perturbation"].all()
    # NaN where stage 2 kept nothing: no distance, rather than a reassuring 0.
    assert out.obs["ptrag_retrieval_distance"].dropna().between(0, 2).all()
    assert out.obs["ptrag_confidence"].between(-1, 1).all()
    assert out.uns["ptrag"]["mode"] == "generation"
    assert (out.X >= 0).all()
    # A perturbation of a gene never seen anywhere: only its embedding is needed.
    extra = pd.DataFrame(emb.iloc[:2].to_numpy().mean(0, keepdims=True), index=["NOVELGENE"], columns=emb.columns)
    model_emb = pd.concat([emb, extra])
    novel = PTRAG.load.__self__
    assert novel is PTRAG
    model.state = model.state.replace(encoder=ptrag_sc.data.PerturbationEncoder(model_emb))
    out2 = model.predict(controls, perturbations=["NOVELGENE"], cell_type=str(controls.obs["cell_line"].iloc[0]))
    assert out2.obs["ptrag_unseen_perturbation"].all()
    assert set(out2.obs["cell_line"]) == {str(controls.obs["cell_line"].iloc[0])}
    model.state = model.state.replace(encoder=ptrag_sc.data.PerturbationEncoder(emb))


def test_generation_without_perturbation_column(trained):
    model, data = trained
    controls = data[data.obs["gene"] == "non-targeting"].copy()
    del controls.obs["gene"]
    out = model.predict(controls, perturbations=[str(model.training_perturbations_[0])])
    assert out.n_obs == controls.n_obs


def test_get_retrieval_table(trained):
    model, data = trained
    query = str(data.obs.loc[data.obs["split"] == "test", "gene"].iloc[0])
    table = model.get_retrieval([query], cell_type="cell_line_0")
    assert list(table.columns) == [
        "query", "cell_type", "rank", "candidate", "candidate_cell_type", "similarity",
        "keep_probability", "selected_fraction", "selected", "confidence", "reliability",
    ]
    assert table["confidence"].nunique() == 1  # one number per query
    # An unmeasured query's evidence has a scale (trust x gate, at least 0); a measured one reads
    # its own entry's leave-one-out estimate, which has none.
    assert table["reliability"].nunique() == 1
    assert (table["reliability"] >= 0).all()
    trained_query = str(model.training_perturbations_[0])
    measured = model.get_retrieval([trained_query], cell_type="cell_line_0")
    assert measured["reliability"].isna().all()
    assert len(table) == model.n_candidates
    assert table["rank"].tolist() == list(range(1, model.n_candidates + 1))
    assert table["similarity"].is_monotonic_decreasing
    assert table["keep_probability"].between(0, 1).all()
    # The exact (query, cell type) entry is never retrieved (it is held out anyway), but the
    # query measured in other cell types is, first.
    assert not ((table["candidate"] == query) & (table["candidate_cell_type"] == "cell_line_0")).any()
    assert table.iloc[0]["candidate"] == query
    assert table.iloc[0]["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_memory_holds_training_cells_only(trained):
    model, data = trained
    memory = model.memory
    split = data.obs["split"].to_numpy()
    gene = data.obs["gene"].astype(str).to_numpy()
    line = data.obs["cell_line"].astype(str).to_numpy()
    for p, ct, response in zip(memory.perturbations, memory.cell_types, memory.responses, strict=True):
        cells = (gene == p) & (line == ct)
        assert (split[cells] == "train").all()
        ctrl = (gene == "non-targeting") & (line == ct) & (split == "train")
        np.testing.assert_allclose(response, data.X[cells].mean(0) - data.X[ctrl].mean(0), atol=1e-5)
    held = set(zip(gene[split != "train"], line[split != "train"], strict=True)) - {("non-targeting", c) for c in line}
    assert not held & set(zip(memory.perturbations, memory.cell_types, strict=True))


def test_memory_ignores_held_out_expression():
    data = make_small_adata()
    data.obs["split"] = few_shot_split(data)
    model_a = _fit(data.copy(), steps=2, split_key="split")
    changed = data.copy()
    held = changed.obs["split"].to_numpy() != "train"
    changed.X[held] = changed.X[held] * 3 + 1
    model_b = _fit(changed, steps=2, split_key="split")
    np.testing.assert_array_equal(model_a.memory.responses, model_b.memory.responses)


def test_prediction_is_deterministic_under_seed():
    preds = []
    for _ in range(2):
        data = make_small_adata()
        model = _fit(data, steps=15, seed=3)
        preds.append(model.predict(data, inplace=False))
    np.testing.assert_array_equal(preds[0], preds[1])
    other = _fit(make_small_adata(), steps=15, seed=4).predict(make_small_adata(), inplace=False)
    assert not np.array_equal(preds[0], other)


def test_sampled_retrieval_is_seeded(trained):
    model, data = trained
    a = model.predict(data, inplace=False, sample_retrieval=True, seed=1)
    b = model.predict(data, inplace=False, sample_retrieval=True, seed=1)
    det = model.predict(data, inplace=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, det)


@pytest.mark.parametrize("with_adata", [True, False])
def test_save_load_roundtrip(trained, tmp_path, with_adata):
    model, data = trained
    expected = model.predict(data, inplace=False)
    model.save(tmp_path / "model", overwrite=True)
    fresh = data.copy()
    for key in ("_scvi_uuid", "_scvi_manager_uuid"):
        fresh.uns.pop(key, None)
    loaded = PTRAG.load(tmp_path / "model", adata=fresh if with_adata else None)
    assert loaded.is_trained
    np.testing.assert_array_equal(loaded.memory.responses, model.memory.responses)
    pd.testing.assert_frame_equal(loaded.perturbation_embeddings, model.perturbation_embeddings)
    np.testing.assert_array_equal(loaded.predict(fresh, inplace=False), expected)


@pytest.mark.parametrize(
    ("retrieval", "context_mode", "memory"),
    [
        ("none", "add", "response"),
        ("vanilla", "add", "response"),
        ("vanilla", "replace", "embedding"),
        ("ptrag", "add", "embedding"),
        ("ptrag", "replace", "response"),
    ],
)
def test_all_modes_train_and_predict(retrieval, context_mode, memory):
    data = make_small_adata(n_perturbations=6)
    model = _fit(data, steps=4, retrieval=retrieval, context_mode=context_mode, memory=memory, backbone="full")
    layer = model.predict(data, inplace=False)
    assert np.isfinite(layer).all()
    if retrieval == "none":
        assert model.memory is None
    else:
        assert (model.memory.responses is None) == (memory == "embedding")


def test_batch_matching_and_sinkhorn_loss():
    data = make_small_adata(n_batches=2, n_perturbations=6)
    scvi.settings.seed = 0
    PTRAG.setup_anndata(data, batch_key="gem_group")
    model = PTRAG(data, perturbation_embeddings=data.uns["gene_embeddings"], loss="sinkhorn", **SMALL_MODEL)
    model.train(max_steps=3)
    assert model.module.batch_embedding is not None
    assert np.isfinite(model.predict(data, inplace=False)).all()
    assert np.isfinite(model.history["train_energy"].astype(float).to_numpy()).all()


def test_add_perturbation_embeddings_and_aliases(trained, tmp_path):
    model, data = trained
    controls = data[data.obs["gene"] == "non-targeting"].copy()
    emb = model.perturbation_embeddings
    extra = pd.DataFrame(emb.iloc[:3].to_numpy().mean(0, keepdims=True), index=["NEWGENE"], columns=emb.columns)
    with pytest.raises(ValueError, match="'NEWGENE'"):
        model.predict(controls, perturbations=["NEWGENE"])
    model.add_perturbation_embeddings(extra)
    out = model.predict(controls, perturbations=["NEWGENE"])
    assert out.obs["ptrag_unseen_perturbation"].all()
    with pytest.raises(ValueError, match="already have a vector"):
        model.add_perturbation_embeddings(extra)
    model.save(tmp_path / "m", overwrite=True)
    loaded = PTRAG.load(tmp_path / "m", adata=data.copy())
    np.testing.assert_array_equal(loaded.predict(controls, perturbations=["NEWGENE"]).X, out.X)


def test_old_gene_symbols_find_their_vectors():
    from ptrag_sc.data import PerturbationEncoder

    table = pd.DataFrame(np.eye(3, dtype=np.float32), index=["MAP3K21", "AARS1", "MAPK1"])
    encoder = PerturbationEncoder(table)
    np.testing.assert_array_equal(encoder.embed(["KIAA1804", "AARS+MAPK1"]), [[1, 0, 0], [0, 1, 1]])
    with pytest.raises(ValueError, match="NOTAGENE"):
        encoder.embed(["NOTAGENE"])
    assert PerturbationEncoder(table, aliases=False).missing(["KIAA1804"]) == {"KIAA1804": ["KIAA1804"]}


def test_prediction_encodes_each_control_cell_once_with_the_same_result(trained, monkeypatch):
    """Counterfactual and generation predictions equal those that encode controls per set."""
    from ptrag_sc.model import _inference

    model, data = trained
    used = []
    encode = _inference.encoded_sources

    def spy(*args, **kwargs):
        result = encode(*args, **kwargs)
        used.append(result is not None)
        return result

    monkeypatch.setattr(_inference, "encoded_sources", spy)
    asked = [str(p) for p in model.training_perturbations_[:2]]
    counterfactual = model.predict(data, inplace=False)
    generated = model.predict(data, perturbations=asked).X
    assert used == [True, True]
    monkeypatch.setattr(_inference, "_MAX_ENCODED_BYTES", 0)
    np.testing.assert_allclose(model.predict(data, inplace=False), counterfactual, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.predict(data, perturbations=asked).X, generated, rtol=1e-5, atol=1e-5)
    assert used == [True, True, False, False]
