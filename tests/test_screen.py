"""In-silico screens: ``tl.screen`` ranks perturbations by predicted effect; ``pl.screen`` draws it."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import scvi
from conftest import SMALL_MODEL, make_small_adata
from scipy.stats import spearmanr

import ptrag_sc
from ptrag_sc.tl import _screen

CT = "cell_line_0"


def _true(adata, labels, ct=CT) -> pd.DataFrame:
    return adata.uns["true_effects"].loc[[f"{ct}:{p}" for p in labels]]


def _held_out(adata) -> list[str]:
    return sorted(set(adata.obs["gene"][adata.obs["split"].to_numpy() != "train"].astype(str)))


def test_effect_ranking_follows_the_true_effects(trained):
    model, adata = trained
    table = ptrag_sc.tl.screen(model, cell_type=CT)
    true_norm = np.linalg.norm(_true(adata, table["perturbation"]).to_numpy(), axis=1)
    assert spearmanr(table["score"], true_norm).statistic > 0.6
    # The best true effect is among the screen's top 3.
    assert table["perturbation"].iloc[int(np.argmax(true_norm))] in set(table["perturbation"].iloc[:3])


def test_signature_screen_finds_the_perturbations_that_move_the_signature(trained):
    model, adata = trained
    held = _held_out(adata)
    effect = adata.uns["true_effects"].loc[f"{CT}:{held[0]}"].sort_values()
    up, down = effect.index[-5:].tolist(), effect.index[:5].tolist()
    table = ptrag_sc.tl.screen(model, cell_type=CT, signature={"up": up, "down": down})
    true = _true(adata, table["perturbation"])
    true_score = true[up].mean(axis=1).to_numpy() - true[down].mean(axis=1).to_numpy()
    assert spearmanr(table["score"], true_score).statistic > 0.8
    k = 3
    top_true = set(table["perturbation"].to_numpy()[np.argsort(-true_score)[:k]])
    precision = len(top_true & set(table["perturbation"].iloc[:k])) / k
    assert precision >= 2 / 3
    # The score is the mean shift of the up genes minus that of the down genes, and it is listed.
    shifts = table[[f"shift_{g}" for g in up + down]].to_numpy()
    np.testing.assert_allclose(table["score"], shifts[:, :5].mean(1) - shifts[:, 5:].mean(1), rtol=1e-5, atol=1e-6)
    # Measured perturbations carry the same score on their observed cells, which agrees.
    measured = table[table["measured_in_cell_type"]]
    assert spearmanr(measured["score"], measured["observed_score"]).statistic > 0.8


def test_table_schema_and_order(trained):
    model, adata = trained
    table, shifts = ptrag_sc.tl.screen(model, cell_type=CT, combinations=["GENE0003+PGENE0001"], return_shifts=True)
    assert list(table.columns) == [
        "cell_type",
        "perturbation",
        "score",
        "rank",
        "shift_norm",
        "measured_in_cell_type",
        "observed_score",
        "trained",
        "retrieval_distance",
        "confidence",
    ]
    assert len(table) == model.perturbation_embeddings.shape[0] + 1
    assert np.all(np.diff(table["score"].to_numpy()) <= 0)
    assert table["rank"].tolist() == list(range(1, len(table) + 1))
    combo = table[table["perturbation"] == "GENE0003+PGENE0001"].iloc[0]
    assert not combo["measured_in_cell_type"]
    assert np.isnan(combo["observed_score"])
    assert not combo["trained"]
    assert table.loc[table["perturbation"] != "GENE0003+PGENE0001", "measured_in_cell_type"].all()
    np.testing.assert_allclose(table["shift_norm"], np.linalg.norm(shifts.to_numpy(), axis=1), rtol=1e-5)
    assert list(shifts.index) == table["perturbation"].tolist()
    assert list(shifts.columns) == list(model.var_names)
    assert (table["retrieval_distance"].dropna().between(0, 2)).all()
    assert (table["confidence"].between(-1, 1)).all()
    # The user's AnnData is not modified.
    assert "ptrag" not in adata.layers


def test_set_level_mean_matches_the_generated_cells(trained):
    model, adata = trained
    ctrl = adata[(adata.obs["gene"] == "non-targeting").to_numpy() & (adata.obs["cell_line"] == CT).to_numpy()].copy()
    perts = ["GENE0003", "PGENE0002", "GENE0003+PGENE0001"]
    _, shifts = ptrag_sc.tl.screen(model, ctrl, cell_type=CT, perturbations=perts, n_cells=ctrl.n_obs, return_shifts=True)
    generated = model.predict(ctrl, perturbations=perts)
    for p in perts:
        observed = np.asarray(generated[generated.obs["gene"] == p].X).mean(0) - np.asarray(ctrl.X).mean(0)
        assert np.corrcoef(observed, shifts.loc[p])[0, 1] > 0.99
        assert np.abs(observed - shifts.loc[p].to_numpy()).mean() < 0.02


def test_generative_path_equals_the_generated_mean():
    """Without a response memory the set mean needs the decoder: the screen uses the generated cells."""
    scvi.settings.seed = 0
    adata = make_small_adata()
    ptrag_sc.PTRAG.setup_anndata(adata)
    model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], retrieval="none", **SMALL_MODEL)
    model.train(max_steps=10, validation_size=0)
    is_ctrl = (adata.obs["gene"] == "non-targeting").to_numpy() & (adata.obs["cell_line"] == CT).to_numpy()
    ctrl = adata[np.flatnonzero(is_ctrl)[: model.cell_set_size]].copy()
    table, shifts = ptrag_sc.tl.screen(model, ctrl, cell_type=CT, perturbations=["GENE0003", "PGENE0004"], n_cells=ctrl.n_obs, return_shifts=True)
    generated = model.predict(ctrl, perturbations=["GENE0003", "PGENE0004"])
    for p in ["GENE0003", "PGENE0004"]:
        mean = np.asarray(generated[generated.obs["gene"] == p].X).mean(0) - np.asarray(ctrl.X).mean(0)
        np.testing.assert_allclose(shifts.loc[p], mean, atol=1e-4)
    assert table["retrieval_distance"].isna().all()
    energy = ptrag_sc.tl.screen(model, ctrl, cell_type=CT, perturbations=["GENE0003", "PGENE0004"], effect="energy", n_cells=ctrl.n_obs)
    assert (energy["score"] > 0).all()


def test_chunks_and_cell_sets_do_not_change_the_result(trained, monkeypatch):
    model, _ = trained
    whole = ptrag_sc.tl.screen(model, cell_type=CT, n_cells=40)
    monkeypatch.setattr(_screen, "CHUNK_PERTURBATIONS", 5)
    chunked = ptrag_sc.tl.screen(model, cell_type=CT, n_cells=40, batch_size=3)
    pd.testing.assert_frame_equal(whole, chunked, atol=1e-5)
    # The same call twice gives the same table (deterministic selection, seeded control cells).
    pd.testing.assert_frame_equal(whole, ptrag_sc.tl.screen(model, cell_type=CT, n_cells=40))


def test_several_cell_types_are_ranked_separately(trained):
    model, _ = trained
    table, shifts = ptrag_sc.tl.screen(model, cell_type=["cell_line_0", "cell_line_2"], return_shifts=True)
    assert list(dict.fromkeys(table["cell_type"])) == ["cell_line_0", "cell_line_2"]
    for _, part in table.groupby("cell_type"):
        assert part["rank"].tolist() == list(range(1, len(part) + 1))
    assert shifts.index.names == ["cell_type", "perturbation"]


def test_weighted_signature_is_the_weighted_sum(trained):
    model, _ = trained
    weights = pd.Series({"GENE0001": 2.0, "GENE0005": -0.5})
    table, shifts = ptrag_sc.tl.screen(model, cell_type=CT, signature=weights, return_shifts=True)
    np.testing.assert_allclose(table["score"], shifts[["GENE0001", "GENE0005"]].to_numpy() @ weights.to_numpy(), rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="not among the model's genes"):
        listed = ptrag_sc.tl.screen(model, cell_type=CT, signature=["GENE0001", "NOTAGENE"])
    np.testing.assert_allclose(listed["score"], listed["shift_GENE0001"], rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, ValueError, "control cells of 3 cell types"),
        ({"cell_type": "nowhere"}, ValueError, "No control cells of cell type"),
        ({"cell_type": CT, "effect": "size"}, ValueError, "`effect` must be one of"),
        ({"cell_type": CT, "signature": ["NOTAGENE"]}, ValueError, "None of the signature genes"),
        ({"cell_type": CT, "signature": {"upregulated": ["GENE0001"]}}, ValueError, "'up' and/or 'down'"),
        ({"cell_type": CT, "signature": 3}, TypeError, "list of genes"),
        ({"cell_type": CT, "perturbations": ["GENE0003", "gene0003"]}, ValueError, "same perturbation twice"),
        ({"cell_type": CT, "perturbations": ["non-targeting"]}, ValueError, "control label"),
        ({"cell_type": CT, "perturbations": ["NOVEL1"]}, ValueError, "no gene embedding"),
        ({"cell_type": CT, "n_cells": 0}, ValueError, "`n_cells` must be an integer"),
    ],
)
def test_bad_arguments_are_refused(trained, kwargs, error, message):
    model, _ = trained
    with pytest.raises(error, match=message):
        ptrag_sc.tl.screen(model, **kwargs)


def test_untrained_model_is_refused(adata):
    ptrag_sc.PTRAG.setup_anndata(adata)
    model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **SMALL_MODEL)
    with pytest.raises(RuntimeError, match="Model not trained"):
        ptrag_sc.tl.screen(model, cell_type=CT)


def test_plot_labels_the_top_hits(trained, tmp_path):
    model, _ = trained
    table = ptrag_sc.tl.screen(model, cell_type=["cell_line_0", "cell_line_1"])
    axes = ptrag_sc.pl.screen(table, n_top=3, highlight=["PGENE0001"], show=False, save=tmp_path / "screen.png")
    assert len(axes) == 2
    assert (tmp_path / "screen.png").stat().st_size > 0
    first = table[table["cell_type"] == "cell_line_0"]
    texts = [t.get_text() for t in axes[0].texts]
    assert texts[:3] == first["perturbation"].iloc[:3].tolist()
    assert "PGENE0001" in texts
    ax = ptrag_sc.pl.screen(table, cell_type="cell_line_1", n_top=0, show=False)
    assert len(ax.texts) == 0
    with pytest.raises(ValueError, match="lacks column"):
        ptrag_sc.pl.screen(table.drop(columns="score"), show=False)
    with pytest.raises(ValueError, match="not in the table"):
        ptrag_sc.pl.screen(table, highlight=["NOPE"], show=False)
