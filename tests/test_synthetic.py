"""Tests of the synthetic Perturb-seq generator ``ptrag_sc.datasets.synthetic``."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ptrag_sc.datasets import synthetic

CONTROL = "non-targeting"


def _dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def _observed_shift(adata: ad.AnnData, cell_line: str, gene: str) -> np.ndarray:
    X = _dense(adata.X)
    in_line = (adata.obs["cell_line"] == cell_line).to_numpy()
    ctrl = X[in_line & (adata.obs["gene"] == CONTROL).to_numpy()].mean(axis=0)
    return X[in_line & (adata.obs["gene"] == gene).to_numpy()].mean(axis=0) - ctrl


@pytest.fixture(scope="module")
def default() -> ad.AnnData:
    return synthetic()


def test_default_shape_and_schema(default: ad.AnnData) -> None:
    adata = default
    info = adata.uns["synthetic"]
    n_ct, n_pert = info["n_cell_types"], info["n_perturbations"]
    assert (n_ct, n_pert, adata.n_vars) == (3, 30, 200)
    assert adata.n_obs == n_ct * (
        info["n_control_cells"] + n_pert * info["n_cells_per_perturbation"]
    )
    assert isinstance(adata.X, np.ndarray)
    assert adata.X.dtype == np.float32
    for key in ("gene", "cell_line", "gem_group"):
        assert isinstance(adata.obs[key].dtype, pd.CategoricalDtype)
    assert adata.obs["cell_line"].nunique() == 3
    assert adata.obs["gem_group"].nunique() == info["n_batches"] == 2
    assert adata.var_names.is_unique
    assert adata.obs_names.is_unique
    assert adata.var_names[0].startswith("GENE")

    emb = adata.uns["gene_embeddings"]
    singles = sorted(set(adata.obs["gene"]) - {CONTROL})
    assert sorted(emb.index) == singles
    assert emb.shape == (n_pert, info["embedding_dim"])
    assert (emb.dtypes == np.float32).all()
    np.testing.assert_allclose(np.linalg.norm(emb.to_numpy(), axis=1), 1.0, atol=1e-5)

    true = adata.uns["true_effects"]
    assert list(true.columns) == list(adata.var_names)
    expected_rows = {f"{cl}:{g}" for cl in adata.obs["cell_line"].cat.categories for g in singles}
    assert set(true.index) == expected_rows
    assert np.isfinite(true.to_numpy()).all()

    # some perturbed genes are measured (and knocked down), the others are not
    measured = set(info["measured_targets"])
    assert measured
    assert measured < set(singles)
    assert measured <= set(adata.var_names)
    assert not (set(singles) - measured) & set(adata.var_names)


def test_deterministic_under_seed() -> None:
    kwargs = {"n_perturbations": 8, "n_genes": 60, "n_cells_per_perturbation": 10}
    a, b, c = synthetic(seed=7, **kwargs), synthetic(seed=7, **kwargs), synthetic(seed=8, **kwargs)
    np.testing.assert_array_equal(a.X, b.X)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.uns["gene_embeddings"], b.uns["gene_embeddings"])
    pd.testing.assert_frame_equal(a.uns["true_effects"], b.uns["true_effects"])
    assert a.X.shape == c.X.shape
    assert not np.array_equal(a.X, c.X)
    assert not np.allclose(
        a.uns["gene_embeddings"].to_numpy(), c.uns["gene_embeddings"].to_numpy()
    )


def test_values_nonnegative_finite_and_sparse_like_counts(default: ad.AnnData) -> None:
    X = default.X
    assert np.isfinite(X).all()
    assert X.min() == 0.0
    density = (X > 0).mean()
    assert 0.15 < density < 0.8
    # log1p of counts normalised to 1e4 with ~1e4 counts per cell: values stay in a realistic range
    assert 2.0 < X.max() < 12.0


def test_controls_present_in_every_cell_line_and_batch(default: ad.AnnData) -> None:
    obs = default.obs
    ctrl = obs[obs["gene"] == CONTROL]
    table = pd.crosstab(ctrl["cell_line"], ctrl["gem_group"])
    assert table.shape == (3, 2)
    assert (table.to_numpy() == 100).all()  # 200 controls per line, balanced over 2 batches
    groups = pd.crosstab([obs["cell_line"], obs["gene"]], obs["gem_group"])
    assert (groups.to_numpy() == 25).sum() == groups.size - 2 * 3  # perturbed groups: 50 = 25 + 25


def test_observed_shift_of_strong_perturbation_matches_true_effect(default: ad.AnnData) -> None:
    true = default.uns["true_effects"]
    strongest = true.pow(2).sum(axis=1).idxmax()
    cell_line, gene = strongest.split(":", 1)
    observed = _observed_shift(default, cell_line, gene)
    expected = true.loc[strongest].to_numpy()
    assert np.corrcoef(observed, expected)[0, 1] > 0.9
    # a mismatched true effect does not fit as well
    other = true.pow(2).sum(axis=1).idxmin()
    assert np.corrcoef(observed, true.loc[other].to_numpy())[0, 1] < 0.6


def test_true_effects_are_calibrated_on_a_large_sample() -> None:
    adata = synthetic(
        n_cell_types=1,
        n_perturbations=3,
        n_genes=80,
        n_cells_per_perturbation=4000,
        n_control_cells=4000,
        n_combinations=1,
        seed=5,
    )
    true = adata.uns["true_effects"]
    for row in true.index:
        cell_line, gene = row.split(":", 1)
        observed = _observed_shift(adata, cell_line, gene)
        expected = true.loc[row].to_numpy()
        # sampling noise of a difference of two 4,000-cell means is ~0.015 per gene
        assert np.sqrt(np.mean((observed - expected) ** 2)) < 0.03
        assert abs(observed @ expected / (expected @ expected) - 1.0) < 0.1


def test_knockdown_lowers_measured_target(default: ad.AnnData) -> None:
    true = default.uns["true_effects"]
    cell_line = default.obs["cell_line"].cat.categories[0]
    targets = list(default.uns["synthetic"]["measured_targets"])
    own = np.array([true.loc[f"{cell_line}:{g}", g] for g in targets])
    assert (own < 0).all()
    observed = np.array(
        [_observed_shift(default, cell_line, g)[default.var_names.get_loc(g)] for g in targets]
    )
    assert (observed < 0).mean() > 0.8


def _embedding_effect_correlation(adata: ad.AnnData) -> float:
    emb = adata.uns["gene_embeddings"]
    true = adata.uns["true_effects"]
    cell_line = adata.obs["cell_line"].cat.categories[0]
    effects = true.loc[[f"{cell_line}:{g}" for g in emb.index]].to_numpy(dtype=float)
    cosine = emb.to_numpy(dtype=float) @ emb.to_numpy(dtype=float).T
    effect_corr = np.corrcoef(effects)
    upper = np.triu_indices(len(emb), k=1)
    return float(np.corrcoef(cosine[upper], effect_corr[upper])[0, 1])


@pytest.mark.parametrize("seed", [0, 1])
def test_embedding_similarity_predicts_effect_similarity_only_when_smooth(seed: int) -> None:
    kwargs = {
        "n_cell_types": 1,
        "n_perturbations": 40,
        "n_cells_per_perturbation": 2,
        "n_control_cells": 2,
        "seed": seed,
    }
    smooth = _embedding_effect_correlation(synthetic(embedding_smoothness=1.0, **kwargs))
    rough = _embedding_effect_correlation(synthetic(embedding_smoothness=0.0, **kwargs))
    assert smooth > 0.6
    assert abs(rough) < 0.2
    # nearest neighbours in the embedding share a program
    adata = synthetic(embedding_smoothness=1.0, **kwargs)
    emb = adata.uns["gene_embeddings"].to_numpy(dtype=float)
    program = adata.uns["synthetic"]["embedding_program"]
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    assert (program[sim.argmax(axis=1)] == program).mean() > 0.9


def test_cell_type_specificity_controls_cross_line_agreement() -> None:
    def cross_line_corr(gamma: float) -> float:
        adata = synthetic(
            n_cell_types=2,
            n_cells_per_perturbation=2,
            n_control_cells=2,
            cell_type_specificity=gamma,
            seed=3,
        )
        true = adata.uns["true_effects"]
        lines = list(adata.obs["cell_line"].cat.categories)
        genes = adata.uns["gene_embeddings"].index
        a = true.loc[[f"{lines[0]}:{g}" for g in genes]].to_numpy().ravel()
        b = true.loc[[f"{lines[1]}:{g}" for g in genes]].to_numpy().ravel()
        return float(np.corrcoef(a, b)[0, 1])

    shared, specific = cross_line_corr(0.0), cross_line_corr(3.0)
    assert shared > 0.8
    assert specific < shared - 0.4


def test_combinations_parse_as_pairs_of_known_genes() -> None:
    adata = synthetic(n_perturbations=12, n_combinations=6, combination_interaction=0.0, seed=2)
    singles = set(adata.uns["gene_embeddings"].index)
    labels = set(adata.obs["gene"]) - {CONTROL}
    combos = {g for g in labels if "+" in g}
    assert len(combos) == 6
    assert combos == set(adata.uns["synthetic"]["combinations"])
    assert labels - combos == singles
    assert not combos & singles
    true = adata.uns["true_effects"]
    for combo in combos:
        a, b = combo.split("+")
        assert a in singles
        assert b in singles
        assert a != b
        assert (adata.obs["gene"] == combo).sum() == 3 * 50  # 50 cells in each of 3 lines
        for cl in adata.obs["cell_line"].cat.categories:
            # additive in the latent space: close to the sum of the single shifts
            additive = true.loc[f"{cl}:{a}"].to_numpy() + true.loc[f"{cl}:{b}"].to_numpy()
            assert np.corrcoef(true.loc[f"{cl}:{combo}"].to_numpy(), additive)[0, 1] > 0.8


def test_sparse_option_returns_csr_with_the_same_values() -> None:
    kwargs = {"n_perturbations": 6, "n_genes": 50, "n_cells_per_perturbation": 10, "seed": 4}
    dense = synthetic(**kwargs)
    sparse = synthetic(sparse=True, **kwargs)
    assert isinstance(sparse.X, sp.csr_matrix)
    assert sparse.X.dtype == np.float32
    assert sparse.X.has_canonical_format
    assert (sparse.X.data > 0).all()
    np.testing.assert_array_equal(sparse.X.toarray(), dense.X)


def test_preset_knobs_are_applied_and_overridable() -> None:
    adata = synthetic(
        preset="replogle_nadig_like",
        n_perturbations=20,
        n_genes=100,
        n_cells_per_perturbation=4,
        n_control_cells=16,
        n_batches=2,
    )
    info = adata.uns["synthetic"]
    assert info["preset"] == "replogle_nadig_like"
    assert list(adata.obs["cell_line"].cat.categories) == ["hepg2", "jurkat", "k562", "rpe1"]
    assert info["embedding_dim"] == 128 == adata.uns["gene_embeddings"].shape[1]
    assert info["n_programs"] == 40
    assert isinstance(adata.X, sp.csr_matrix)
    # explicit arguments win over the preset
    assert adata.n_vars == 100
    assert adata.n_obs == 4 * (16 + 20 * 4)
    assert adata.obs["gem_group"].nunique() == 2
    # a full-size preset value applies when not overridden
    assert (
        synthetic(
            preset="replogle_nadig_like",
            n_perturbations=4,
            n_genes=20,
            n_cells_per_perturbation=1,
            n_control_cells=4,
        )
        .obs["gem_group"]
        .nunique()
        == 4
    )


def test_write_h5ad_round_trip(tmp_path) -> None:
    adata = synthetic(n_perturbations=6, n_genes=40, n_combinations=2, sparse=True, seed=1)
    path = tmp_path / "synthetic.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert isinstance(back.X, sp.csr_matrix)
    np.testing.assert_array_equal(back.X.toarray(), adata.X.toarray())
    pd.testing.assert_frame_equal(back.obs, adata.obs)
    pd.testing.assert_frame_equal(back.uns["gene_embeddings"], adata.uns["gene_embeddings"])
    pd.testing.assert_frame_equal(back.uns["true_effects"], adata.uns["true_effects"])
    assert list(back.uns["synthetic"]["combinations"]) == list(
        adata.uns["synthetic"]["combinations"]
    )
    # also without combinations and with a dense X
    plain = synthetic(n_perturbations=3, n_genes=20, n_cells_per_perturbation=5)
    plain.write_h5ad(tmp_path / "plain.h5ad")
    assert ad.read_h5ad(tmp_path / "plain.h5ad").shape == plain.shape


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_cell_types": 0}, "n_cell_types"),
        ({"n_genes": 2.5}, "n_genes"),
        ({"embedding_smoothness": 1.5}, "embedding_smoothness"),
        ({"effect_size": -1.0}, "effect_size"),
        ({"knockdown": 1.0}, "knockdown"),
        ({"n_perturbations": 3, "n_combinations": 4}, "n_combinations"),
        ({"n_genes": 5, "n_perturbations": 30, "target_overlap": 1.0}, "target_overlap"),
        ({"library_size": 0}, "library_size"),
        ({"preset": "nope"}, "preset"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        synthetic(**kwargs)
