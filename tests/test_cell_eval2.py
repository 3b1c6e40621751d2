"""Tests of ptrag_sc.tl.score_cell_eval2 (cell-eval2's vcc2026 members, rescaled baseline -> replicate)."""

from __future__ import annotations

import builtins
import os

import numpy as np
import pytest

import ptrag_sc
from ptrag_sc.tl import score_cell_eval2

CONTROL = "non-targeting"


def _synthetic(effect_size: float, n_cells: int, n_perturbations: int, n_genes: int):
    """One cell line whose perturbed cells carry three prediction layers: generic, exact means, control."""
    cell_eval2_baseline = pytest.importorskip("cell_eval2.baseline")
    adata = ptrag_sc.datasets.synthetic(
        n_cell_types=1,
        n_perturbations=n_perturbations,
        n_genes=n_genes,
        n_cells_per_perturbation=n_cells,
        n_control_cells=2 * n_cells,
        effect_size=effect_size,
        seed=0,
    )
    x = np.asarray(adata.X, dtype=np.float32)
    pert = adata.obs["gene"].astype(str).to_numpy()
    perturbed = pert != CONTROL
    means = x.copy()
    for p in set(pert[perturbed]):
        means[pert == p] = x[pert == p].mean(axis=0)
    adata.layers["means"] = means
    # cell-eval2's own generic response (the 0 of its scale), given to every perturbed cell.
    _, real = ptrag_sc.tl.to_cell_eval(adata, pred_layer="means")
    profile = cell_eval2_baseline.generic_response_profile(
        real, pert_col="target_gene", control=CONTROL
    )
    generic = x.copy()
    generic[perturbed] = profile.values
    adata.layers["generic"] = generic
    return adata


@pytest.fixture(scope="module")
def accepted():
    """Clear effects, 60 cells per group: cell-eval2 builds both comparators."""
    pytest.importorskip("cell_eval2")
    pytest.importorskip("pdex")
    os.environ.setdefault("TQDM_DISABLE", "1")
    adata = _synthetic(effect_size=0.5, n_cells=60, n_perturbations=8, n_genes=200)
    snapshot = adata.copy()
    cache: dict = {}
    scores = {
        layer: score_cell_eval2(adata, pred_layer=layer, reference_cache=cache)
        for layer in ("generic", "means")
    }
    return adata, snapshot, scores, cache


@pytest.fixture(scope="module")
def weak():
    """Almost no effect, 6 cells per group."""
    pytest.importorskip("cell_eval2")
    pytest.importorskip("pdex")
    os.environ.setdefault("TQDM_DISABLE", "1")
    return _synthetic(effect_size=0.02, n_cells=6, n_perturbations=6, n_genes=120)


@pytest.fixture(scope="module")
def refused(weak):
    """cell-eval2 refuses its baseline and its replicate on the weak data."""
    return score_cell_eval2(weak, pred_layer="means")


def _members(frame):
    return frame[frame["metric"] != "mean"]


def test_generic_response_scores_zero_and_cell_eval2_scored_it(accepted):
    _, _, scores, _ = accepted
    generic = scores["generic"]
    assert len(_members(generic)) == 6
    assert set(generic["scored_by"]) == {"cell-eval2"}
    assert (generic["refusal"] == "").all()
    # the prediction is the baseline itself: u == b, so every rescaled member is 0
    np.testing.assert_allclose(
        _members(generic)["prediction"], _members(generic)["baseline"], rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(generic["score"], 0.0, atol=1e-6)
    mean = generic[generic["metric"] == "mean"].iloc[0]
    assert mean["n_members"] == 6
    assert mean["scored_by"] == "cell-eval2"


def test_measured_means_score_well_above_the_generic_response(accepted):
    _, _, scores, _ = accepted
    means = scores["means"]
    assert set(means["scored_by"]) == {"cell-eval2"}
    by_metric = means.set_index("metric")
    assert by_metric.loc["pds_cosine", "score"] == pytest.approx(
        1.0
    )  # each mean is its own nearest
    assert by_metric.loc["mean", "score"] > 0.5
    # the same baseline and replicate for both predictions (computed once, cached)
    np.testing.assert_allclose(
        _members(means)["baseline"], _members(scores["generic"])["baseline"]
    )
    np.testing.assert_allclose(
        _members(means)["replicate"], _members(scores["generic"])["replicate"]
    )
    # cell-eval2's policy is linear on these members
    for metric in ("pds_cosine", "de_wilcoxon_direction_reach_raw", "de_wilcoxon_sig_jaccard"):
        row = by_metric.loc[metric]
        expected = (row["prediction"] - row["baseline"]) / (row["replicate"] - row["baseline"])
        assert row["score"] == pytest.approx(expected)
        assert row["score_linear"] == pytest.approx(expected)


def test_references_are_cached_and_data_untouched(accepted):
    adata, snapshot, _, cache = accepted
    assert len(cache) == 1
    np.testing.assert_array_equal(adata.X, snapshot.X)
    assert list(adata.layers) == list(snapshot.layers)
    assert adata.obs.equals(snapshot.obs)


def test_refusal_is_reported_not_raised(refused):
    mean = refused[refused["metric"] == "mean"].iloc[0]
    assert "baseline: ValueError: degenerate baseline" in mean["refusal"]
    assert "replicate anchor: ValueError" in mean["refusal"]
    assert "cell-eval2" not in set(refused["scored_by"])
    members = _members(refused)
    not_rescaled = members[members["scored_by"] == "not rescaled"]
    assert len(not_rescaled) >= 3
    assert not_rescaled["score"].isna().all()
    assert not_rescaled["refusal"].str.len().gt(0).all()
    assert not_rescaled["member_refusal"].str.contains("ValueError").any()
    by_hand = members[members["scored_by"] == "by hand"]
    # rescaled by hand only where both ends are finite and the replicate is on the better side
    assert np.isfinite(by_hand[["baseline", "replicate", "score"]].to_numpy()).all()
    assert mean["n_members"] == len(by_hand)
    if len(by_hand):
        assert mean["score"] == pytest.approx(by_hand["score"].mean())


def test_a_refused_prediction_is_scored_member_by_member(weak):
    # One perturbation: the reference has no measurable aggregate effect, so cell-eval2 refuses
    # the prediction's expression error; the other members are still computed, alone.
    one = sorted(set(weak.obs["gene"].astype(str)) - {CONTROL})[0]
    scores = score_cell_eval2(weak, pred_layer="means", perturbations=[one]).set_index("metric")
    assert scores.loc["mean", "refusal"].startswith(
        "prediction: ValueError: expr_mse_unbiased_capped_norm"
    )
    assert (
        "prediction of expr_mse_unbiased_capped_norm alone: ValueError"
        in scores.loc["expr_mse_unbiased_capped_norm", "member_refusal"]
    )
    assert np.isnan(scores.loc["expr_mse_unbiased_capped_norm", "prediction"])
    assert scores.loc["pds_cosine", "prediction"] == pytest.approx(1.0)  # a single candidate
    assert "prediction of" not in scores.loc["pds_cosine", "member_refusal"]
    assert "a single perturbation" in scores.loc["mean", "refusal"]
    assert np.isnan(scores["baseline"]).all()
    assert (scores["scored_by"] == "not rescaled").all()


def _tiny():
    adata = ptrag_sc.datasets.synthetic(
        n_cell_types=1,
        n_perturbations=2,
        n_genes=20,
        n_cells_per_perturbation=5,
        n_control_cells=5,
    )
    adata.layers["ptrag"] = np.asarray(adata.X)
    return adata


def test_missing_extra_names_it(monkeypatch):
    real_import = builtins.__import__

    def no_cell_eval2(name, *args, **kwargs):
        if name.split(".")[0] == "cell_eval2":
            raise ImportError("No module named 'cell_eval2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cell_eval2)
    adata = _tiny()
    with pytest.raises(ImportError, match=r"ptrag-sc\[cell-eval2\]"):
        score_cell_eval2(adata)


def test_bad_arguments_fail_early():
    adata = _tiny()
    pytest.importorskip("cell_eval2")
    pytest.importorskip("pdex")
    with pytest.raises(ValueError, match="n_splits"):
        score_cell_eval2(adata, n_splits=0)
    with pytest.raises(ValueError, match="cell_type_key"):
        score_cell_eval2(adata, cell_types="cell_line_0")
    with pytest.raises(ValueError, match="`split_key='fold'` is not a column"):
        score_cell_eval2(adata, cell_type_key="cell_line", split_key="fold")
    adata.obs["split"] = "train"
    with pytest.raises(ValueError, match="Nothing to score"):
        score_cell_eval2(adata, cell_type_key="cell_line", split_key="split")
