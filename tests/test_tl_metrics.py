"""Tests of ptrag_sc.tl.evaluate / summarize / to_cell_eval and the array-level metrics.

Every estimator is checked against a value computed by hand or by an independent formula
(explicit loops, brute-force assignment, scipy, geomloss).
"""

from __future__ import annotations

import itertools
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.stats

from ptrag_sc.tl import _metrics as M
from ptrag_sc.tl import evaluate, summarize, to_cell_eval

threadpoolctl = pytest.importorskip("threadpoolctl")


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # The CI/dev machines are small and shared: multi-threaded BLAS only adds contention here.
    with threadpoolctl.threadpool_limits(1):
        yield


# ----------------------------------------------------------------------------- helpers


def _brute_force_ot(x: np.ndarray, y: np.ndarray, power: int) -> float:
    """Optimal transport between two equal-size uniform sets = best assignment (Birkhoff)."""
    n = x.shape[0]
    best = math.inf
    for perm in itertools.permutations(range(n)):
        cost = np.mean([np.linalg.norm(x[i] - y[j]) ** power for i, j in enumerate(perm)])
        best = min(best, cost)
    return best


def _loop_mmd(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    def k(a, b):
        return math.exp(-float(np.sum((a - b) ** 2)) / (2 * sigma**2))

    kxx = np.mean([k(a, b) for a in x for b in x])
    kyy = np.mean([k(a, b) for a in y for b in y])
    kxy = np.mean([k(a, b) for a in x for b in y])
    return kxx + kyy - 2 * kxy


def _loop_energy(x: np.ndarray, y: np.ndarray) -> float:
    def d(a, b):
        return float(np.linalg.norm(a - b))

    return (
        2 * np.mean([d(a, b) for a in x for b in y])
        - np.mean([d(a, b) for a in x for b in x])
        - np.mean([d(a, b) for a in y for b in y])
    )


def _loop_median_sigma(x: np.ndarray, y: np.ndarray) -> float:
    pooled = np.vstack([x, y])
    dists = [
        np.linalg.norm(pooled[i] - pooled[j])
        for i in range(len(pooled))
        for j in range(i + 1, len(pooled))
    ]
    dists = [d for d in dists if d > 0]
    return float(np.median(dists))


def _make_adata(seed: int = 0, n_genes: int = 5) -> ad.AnnData:
    """Two cell types; controls, P1 and P2 (4 cells each) per cell type; a 'ptrag' layer."""
    rng = np.random.default_rng(seed)
    rows, obs = [], []
    for cell_type, offset in (("A", 0.0), ("B", 1.0)):
        for gene in ("non-targeting", "P1", "P2"):
            for i in range(4):
                rows.append(rng.uniform(0.1, 3.0, n_genes) + offset)
                obs.append((cell_type, gene, "test" if i < 4 else "train"))
    x = np.asarray(rows, dtype=np.float32)
    frame = pd.DataFrame(obs, columns=["cell_line", "gene", "split"])
    frame.index = [f"c{i}" for i in range(len(frame))]
    adata = ad.AnnData(X=x, obs=frame, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    pred = x + rng.normal(0.0, 0.5, x.shape).astype(np.float32)
    adata.layers["ptrag"] = np.maximum(pred, 0.0)
    return adata


def _rows(adata, cell_type, gene, layer=None):
    mask = (adata.obs["cell_line"] == cell_type) & (adata.obs["gene"] == gene)
    mat = adata.X if layer is None else adata.layers[layer]
    return np.asarray(mat[mask.to_numpy()], dtype=np.float64)


# ----------------------------------------------------------------------------- array metrics


def test_pearson_spearman_hand_values():
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = (0, 1, 2), y = (0, 1, 1): cov = 1/3 * ..., r = 1 / sqrt(2 * 2/3) = sqrt(3)/2
    assert M.pearson([0, 1, 2], [0, 1, 1]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(M.pearson([0.3] * 4, [0.3 + 1e-17] * 4))
    assert math.isnan(M.pearson([1.0], [2.0]))
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert M.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    # Spearman with ties equals scipy's (average ranks).
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0])
    y = np.array([2.0, 1.0, 4.0, 4.0, 6.0, 0.0])
    assert M.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic)
    assert M.spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)


def test_wasserstein_hand_values():
    # 1-D: {0, 1} -> {2, 4}: sorted matching, W1 = (2 + 3) / 2, W2 = sqrt((4 + 9) / 2)
    w1, w2 = M.wasserstein(np.array([[0.0], [1.0]]), np.array([[2.0], [4.0]]))
    assert w1 == pytest.approx(2.5)
    assert w2 == pytest.approx(math.sqrt(6.5))
    # 2-D two-point sets: matching vertically costs 1 each, crossing costs sqrt(2).
    x = np.array([[0.0, 0.0], [1.0, 0.0]])
    y = np.array([[1.0, 1.0], [0.0, 1.0]])
    assert M.wasserstein(x, y) == pytest.approx((1.0, 1.0))
    # unequal sizes, 1-D: {0} -> {1, 3}: W1 = 2, W2 = sqrt(5)
    assert M.wasserstein(np.array([[0.0]]), np.array([[1.0], [3.0]])) == pytest.approx(
        (2.0, math.sqrt(5.0))
    )
    # identical sets
    assert M.wasserstein(x, x) == pytest.approx((0.0, 0.0), abs=1e-12)


def test_wasserstein_matches_independent_formulas():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(7, 1)), rng.normal(1.0, 2.0, size=(11, 1))
    # scipy's 1-D W1 (quantile formula) handles unequal sizes.
    w1, _ = M.wasserstein(a, b)
    assert w1 == pytest.approx(scipy.stats.wasserstein_distance(a[:, 0], b[:, 0]))
    # brute-force assignment for equal-size sets in 3-D
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    w1, w2 = M.wasserstein(x, y)
    assert w1 == pytest.approx(_brute_force_ot(x, y, 1))
    assert w2 == pytest.approx(math.sqrt(_brute_force_ot(x, y, 2)))
    assert w2 >= w1 - 1e-12
    # Sinkhorn: an upper bound, close to the exact value with a small regularisation
    s1, s2 = M.wasserstein(x, y, method="sinkhorn", sinkhorn_reg=0.01)
    assert w1 - 1e-9 <= s1 <= w1 * 1.1
    assert w2 - 1e-9 <= s2 <= w2 * 1.1


def test_mmd_hand_values():
    # {0} vs {1}: the only non-zero distance is 1, so sigma = 1; MMD² = 2 - 2 exp(-1/2)
    assert M.mmd_rbf(np.array([[0.0]]), np.array([[1.0]])) == pytest.approx(2 - 2 * math.exp(-0.5))
    # {0, 1} vs {3}: distances 1, 3, 2 -> median 2 -> gamma = 1/8
    x, y = np.array([[0.0], [1.0]]), np.array([[3.0]])
    expected = (2 + 2 * math.exp(-1 / 8)) / 4 + 1 - 2 * (math.exp(-9 / 8) + math.exp(-4 / 8)) / 2
    assert M.mmd_rbf(x, y) == pytest.approx(expected)
    assert M.mmd_rbf(x, y) == pytest.approx(_loop_mmd(x, y, 2.0))
    # fixed bandwidth, and identical samples
    assert M.mmd_rbf(x, y, bandwidth=0.7) == pytest.approx(_loop_mmd(x, y, 0.7))
    assert M.mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-12)
    assert M.mmd_rbf(np.zeros((3, 2)), np.zeros((2, 2))) == 0.0
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 4)), rng.normal(0.5, 1.0, size=(5, 4))
    assert M.mmd_rbf(x, y) == pytest.approx(_loop_mmd(x, y, _loop_median_sigma(x, y)))


def test_energy_hand_values_and_geomloss():
    assert M.energy_distance(np.array([[0.0]]), np.array([[1.0]])) == pytest.approx(2.0)
    # {0, 2} vs {1}: 2 * 1 - (0 + 2 + 2 + 0) / 4 - 0 = 1
    assert M.energy_distance(np.array([[0.0], [2.0]]), np.array([[1.0]])) == pytest.approx(1.0)
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(9, 1)), rng.normal(0.3, 1.5, size=(6, 1))
    # scipy's 1-D energy distance is the square root of ours
    assert M.energy_distance(a, b) == pytest.approx(
        scipy.stats.energy_distance(a[:, 0], b[:, 0]) ** 2
    )
    x, y = rng.normal(size=(8, 3)), rng.normal(0.5, 1.0, size=(5, 3))
    assert M.energy_distance(x, y) == pytest.approx(_loop_energy(x, y))
    torch = pytest.importorskip("torch")
    geomloss = pytest.importorskip("geomloss")
    half = geomloss.SamplesLoss("energy")(torch.as_tensor(x), torch.as_tensor(y)).item()
    # geomloss takes sqrt(d² + 1e-8), i.e. 1e-4 instead of 0 on the diagonals (3.25e-5 here)
    assert M.energy_distance(x, y) == pytest.approx(2 * half, abs=1e-4)


def test_distribution_metrics_agree_with_single_functions():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(4, 3))
    out = M.distribution_metrics(x, y)
    assert (out["w1"], out["w2"]) == pytest.approx(M.wasserstein(x, y))
    assert out["mmd"] == pytest.approx(M.mmd_rbf(x, y))
    assert out["energy"] == pytest.approx(M.energy_distance(x, y))


def test_de_overlap_direction_discrimination_hand_values():
    real = np.array([5.0, -4.0, 3.0, 0.1, 0.0])
    pred = np.array([1.0, 2.0, 0.0, 3.0, 0.0])
    # observed top-2 {0, 1}; predicted top-2 by |shift| {3, 1} -> overlap 1/2
    assert M.de_overlap(pred, real, 2) == pytest.approx(0.5)
    # top-3 observed {0, 1, 2}: signs (+,+), (+,-), (0,+) -> 1/3 agree
    assert M.de_direction(pred, real, 3) == pytest.approx(1 / 3)
    assert list(M.top_n_genes(np.array([1.0, -1.0, 2.0]), 2)) == [2, 0]  # ties: gene order
    # discrimination: L1 distances of pred (0, 0) to shifts (1, 1) [true], (0, 1), (3, 0)
    shifts = np.array([[1.0, 1.0], [0.0, 1.0], [3.0, 0.0]])
    assert M.discrimination_l1(np.zeros(2), shifts, 0) == pytest.approx(0.5)
    assert M.discrimination_l1(np.zeros(2), shifts, 1) == pytest.approx(0.0)
    assert M.discrimination_l1(np.zeros(2), shifts, 2) == pytest.approx(1.0)
    # with the second gene masked, the distances are 1, 0, 3
    assert M.discrimination_l1(np.zeros(2), shifts, 0, np.array([True, False])) == pytest.approx(
        0.5
    )
    assert math.isnan(M.discrimination_l1(np.zeros(2), shifts[:1], 0))


def test_mean_cosine_to_others():
    shifts = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [0.0, 0.0]])
    # pairwise cosines of the three non-zero rows: (1, 2) = 0, (1, 3) = (2, 3) = 1/sqrt(2)
    c = 1 / math.sqrt(2)
    out = M.mean_cosine_to_others(shifts)
    np.testing.assert_allclose(out[:3], [c / 2, c / 2, c])
    assert math.isnan(out[3])  # no direction
    with_nan = M.mean_cosine_to_others(np.vstack([shifts, [np.nan, 1.0]]))
    np.testing.assert_allclose(with_nan[:3], out[:3])
    assert np.isnan(with_nan[3:]).all()
    # the same shift for every perturbation: 1; opposite shifts: -1; fewer than two rows: NaN
    np.testing.assert_allclose(M.mean_cosine_to_others(np.tile([1.0, -2.0, 0.5], (4, 1))), 1.0)
    np.testing.assert_allclose(M.mean_cosine_to_others(np.array([[1.0, 1.0], [-2.0, -2.0]])), -1.0)
    assert np.isnan(M.mean_cosine_to_others(np.ones((1, 3)))).all()


def test_split_half_pearson():
    cells = np.array([[1.0, 2.0, 0.0], [2.0, 3.0, 0.5], [0.0, 1.0, 2.0], [3.0, 1.0, 1.0]])
    control = np.array([0.5, 0.5, 0.5])
    perm = np.random.default_rng(7).permutation(4)
    expected = np.corrcoef(cells[perm[:2]].mean(0) - control, cells[perm[2:]].mean(0) - control)[
        0, 1
    ]
    assert M.split_half_pearson(cells, control, np.random.default_rng(7)) == pytest.approx(
        expected
    )
    assert math.isnan(M.split_half_pearson(cells[:3], control, np.random.default_rng(0)))


def test_fit_pca_preserves_distances_at_full_rank():
    rng = np.random.default_rng(8)
    cells = rng.normal(size=(12, 5))
    mean, comps = M.fit_pca(cells, 50)
    assert comps.shape == (5, 5)
    np.testing.assert_allclose(comps @ comps.T, np.eye(5), atol=1e-10)
    z = (cells - mean) @ comps.T
    np.testing.assert_allclose(
        M.pairwise_sq_dist(z, z), M.pairwise_sq_dist(cells, cells), atol=1e-9
    )
    # wide matrix (more genes than cells): Gram route; variance is ordered
    wide = rng.normal(size=(6, 30))
    mean, comps = M.fit_pca(wide, 3)
    assert comps.shape == (3, 30)
    np.testing.assert_allclose(comps @ comps.T, np.eye(3), atol=1e-10)
    var = ((wide - mean) @ comps.T).var(axis=0)
    assert np.all(np.diff(var) <= 1e-12)
    svals = np.linalg.svd(wide - mean, compute_uv=False)
    np.testing.assert_allclose(np.sort(var)[::-1] * 6, svals[:3] ** 2, rtol=1e-8)


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_matches_hand_computation():
    adata = _make_adata()
    before = adata.copy()
    res = evaluate(adata, n_pcs=50)
    assert list(res.columns[:5]) == ["method", "cell_line", "gene", "n_cells", "n_cells_real"]
    assert res[["cell_line", "gene"]].to_numpy().tolist() == [
        ["A", "P1"],
        ["A", "P2"],
        ["B", "P1"],
        ["B", "P2"],
    ]
    assert (res["method"] == "ptrag").all()
    assert (res["n_cells"] == 4).all()
    for _, row in res.iterrows():
        c, p = row["cell_line"], row["gene"]
        ctrl = _rows(adata, c, "non-targeting").mean(0)
        real, pred = _rows(adata, c, p), _rows(adata, c, p, "ptrag")
        dp, dr = pred.mean(0) - ctrl, real.mean(0) - ctrl
        assert row["pearson_delta"] == pytest.approx(np.corrcoef(dp, dr)[0, 1])
        assert row["spearman_delta"] == pytest.approx(scipy.stats.spearmanr(dp, dr).statistic)
        err = pred.mean(0) - real.mean(0)
        assert row["mse"] == pytest.approx(np.mean(err**2))
        assert row["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)))
        assert row["mae"] == pytest.approx(np.mean(np.abs(err)))
        # 5 genes, 12 real cells per cell type: the PCA is a rotation, so PCA-space
        # quantities equal gene-space ones.
        assert row["mse_pca"] == pytest.approx(np.mean(err**2))
        assert row["w1"] == pytest.approx(_brute_force_ot(pred, real, 1))
        assert row["w2"] == pytest.approx(math.sqrt(_brute_force_ot(pred, real, 2)))
        assert row["mmd"] == pytest.approx(_loop_mmd(pred, real, _loop_median_sigma(pred, real)))
        assert row["energy"] == pytest.approx(_loop_energy(pred, real))
        # with 5 genes, the default n_top_de=20 covers every gene
        assert row["pearson_delta_de"] == pytest.approx(row["pearson_delta"])
        assert row["de_overlap"] == pytest.approx(1.0)
        assert row["de_direction"] == pytest.approx(np.mean(np.sign(dp) == np.sign(dr)))
        assert -1 <= row["split_half_pearson"] <= 1
    # perturbation-centred Pearson: mean over the 2 perturbations of the cell type
    for c in ("A", "B"):
        pm = {p: _rows(adata, c, p, "ptrag").mean(0) for p in ("P1", "P2")}
        rm = {p: _rows(adata, c, p).mean(0) for p in ("P1", "P2")}
        pbar, rbar = (pm["P1"] + pm["P2"]) / 2, (rm["P1"] + rm["P2"]) / 2
        expected = np.corrcoef(pm["P1"] - pbar, rm["P1"] - rbar)[0, 1]
        got = res.loc[(res.cell_line == c) & (res.gene == "P1"), "pearson_pert_centred"].item()
        assert got == pytest.approx(expected)
        # discrimination with two candidates: 0 if the true one is nearer (L1), else 1
        d_true = np.abs(pm["P1"] - rm["P1"]).sum()
        d_other = np.abs(pm["P1"] - rm["P2"]).sum()
        got = res.loc[(res.cell_line == c) & (res.gene == "P1"), "discrimination_l1"].item()
        assert got == float(d_other < d_true)
    # input untouched
    np.testing.assert_array_equal(adata.X, before.X)
    np.testing.assert_array_equal(adata.layers["ptrag"], before.layers["ptrag"])
    assert adata.obs.equals(before.obs)


def test_evaluate_top_de_restriction_and_n_top_de():
    adata = _make_adata(n_genes=8)
    res = evaluate(adata, n_top_de=3, cell_type_key="cell_line")
    row = res.iloc[0]
    ctrl = _rows(adata, "A", "non-targeting").mean(0)
    dp = _rows(adata, "A", "P1", "ptrag").mean(0) - ctrl
    dr = _rows(adata, "A", "P1").mean(0) - ctrl
    top = np.argsort(-np.abs(dr), kind="stable")[:3]
    assert row["pearson_delta_de"] == pytest.approx(np.corrcoef(dp[top], dr[top])[0, 1])
    pred_top = np.argsort(-np.abs(dp), kind="stable")[:3]
    assert row["de_overlap"] == pytest.approx(len(set(top) & set(pred_top)) / 3)
    assert row["de_direction"] == pytest.approx(np.mean(np.sign(dp[top]) == np.sign(dr[top])))


def test_evaluate_perfect_prediction_and_constant_prediction():
    adata = _make_adata()
    adata.layers["perfect"] = adata.X.copy()
    res = evaluate(adata, pred_layer="perfect")
    for col in ("pearson_delta", "spearman_delta", "pearson_pert_centred", "de_overlap"):
        assert res[col].to_numpy() == pytest.approx(1.0)
    for col in ("mse", "mae", "mse_pca", "w1", "w2", "mmd", "energy", "discrimination_l1"):
        assert res[col].to_numpy() == pytest.approx(0.0, abs=1e-9)
    # the same profile for every perturbed cell: perturbation-centred Pearson undefined
    const = adata.X.copy()
    const[adata.obs["gene"].to_numpy() != "non-targeting"] = 1.5
    adata.layers["const"] = const
    res = evaluate(adata, pred_layer="const")
    assert res["pearson_pert_centred"].isna().all()
    assert res["pearson_delta"].notna().all()


def test_evaluate_filters_and_nan_rows():
    adata = _make_adata()
    adata.obs.loc[adata.obs.index[4:6], "split"] = "train"  # two A/P1 cells
    res = evaluate(adata, split_key="split", split_values="test")
    assert res.loc[(res.cell_line == "A") & (res.gene == "P1"), "n_cells"].item() == 2
    res = evaluate(adata, perturbations=["P2"])
    assert set(res["gene"]) == {"P2"}
    assert res["pearson_pert_centred"].isna().all()  # a single perturbation per cell type
    assert res["discrimination_l1"].isna().all()
    res_all = evaluate(adata, perturbations=["P2"], discrimination_reference="all")
    assert res_all["discrimination_l1"].notna().all()
    # a NaN row in the prediction means "not predicted": left out on both sides
    layer = adata.layers["ptrag"].copy()
    layer[4, 0] = np.nan  # first A/P1 cell
    adata.layers["ptrag"] = layer
    res = evaluate(adata)
    row = res[(res.cell_line == "A") & (res.gene == "P1")].iloc[0]
    assert row["n_cells"] == 3
    assert row["n_cells_real"] == 3
    ctrl = _rows(adata, "A", "non-targeting").mean(0)
    pred = _rows(adata, "A", "P1", "ptrag")[1:]
    real = _rows(adata, "A", "P1")[1:]
    assert row["pearson_delta"] == pytest.approx(
        np.corrcoef(pred.mean(0) - ctrl, real.mean(0) - ctrl)[0, 1]
    )
    # no cell type: one context
    res = evaluate(adata, cell_type_key=None, method="m")
    assert set(res["cell_type"]) == {"all"}
    assert set(res["method"]) == {"m"}


def test_evaluate_sparse_and_reference_mode_agree():
    adata = _make_adata()
    dense = evaluate(adata)
    sparse_adata = adata.copy()
    sparse_adata.X = sp.csr_matrix(sparse_adata.X)
    sparse_adata.layers["ptrag"] = sp.csr_matrix(sparse_adata.layers["ptrag"])
    pd.testing.assert_frame_equal(evaluate(sparse_adata), dense, check_exact=False, rtol=1e-6)
    # generation-mode style: predicted cells in their own AnnData, real cells in `reference`
    pert = adata[adata.obs["gene"] != "non-targeting"]
    gen_obs = pert.obs[["cell_line", "gene"]].copy()
    gen_obs.index = [f"gen{i}" for i in range(pert.n_obs)]
    gen = ad.AnnData(X=np.asarray(pert.layers["ptrag"]), obs=gen_obs, var=adata.var.copy())
    gen.layers["ptrag"] = gen.X.copy()
    ref_res = evaluate(gen, reference=adata)
    pd.testing.assert_frame_equal(ref_res, dense, check_exact=False, rtol=1e-6)


def test_evaluate_ot_subsample_and_sinkhorn():
    adata = _make_adata()
    full = evaluate(adata)
    sub = evaluate(adata, ot_max_cells=3)
    assert np.all(np.isfinite(sub[["w1", "w2", "mmd", "energy"]].to_numpy()))
    assert not np.allclose(sub["w1"], full["w1"])
    again = evaluate(adata, ot_max_cells=3)
    pd.testing.assert_frame_equal(sub, again)  # seeded
    sink = evaluate(adata, ot_max_cells=3, ot_large="sinkhorn", sinkhorn_reg=0.01)
    assert np.all(sink["w1"].to_numpy() >= full["w1"].to_numpy() - 1e-9)
    assert np.allclose(sink["w1"], full["w1"], rtol=0.1)


def test_evaluate_errors():
    adata = _make_adata()
    with pytest.raises(ValueError, match=r"`pred_layer='nope'` is not a layer.*\['ptrag'\]"):
        evaluate(adata, pred_layer="nope")
    with pytest.raises(
        ValueError, match=r"`cell_type_key='celltype'`.*existing columns.*cell_line"
    ):
        evaluate(adata, cell_type_key="celltype")
    with pytest.raises(ValueError, match=r"`split_key='fold'`"):
        evaluate(adata, split_key="fold")
    with pytest.raises(ValueError, match="Nothing to evaluate"):
        evaluate(adata, perturbations=["P9"])
    with pytest.raises(ValueError, match="No control cells"):
        evaluate(adata, control_group="ctrl")
    no_ctrl_b = adata[~((adata.obs.cell_line == "B") & (adata.obs.gene == "non-targeting"))].copy()
    with pytest.raises(ValueError, match="for cell type 'B'"):
        evaluate(no_ctrl_b)
    with pytest.raises(ValueError, match="ot_large"):
        evaluate(adata, ot_large="exact")


# ----------------------------------------------------------------------------- summarize


def test_summarize_hand_values():
    results = pd.DataFrame(
        {
            "method": ["a", "a", "a", "b", "b"],
            "gene": ["P1", "P2", "P3", "P1", "P2"],
            "n_cells": [10, 10, 10, 10, 10],
            "pearson_delta": [1.0, 2.0, 3.0, 0.5, np.nan],
            "mse": [0.0, 0.0, 3.0, 1.0, 1.0],
        }
    )
    out = summarize(results, n_boot=200, seed=1)
    assert list(out.columns) == ["method", "metric", "n", "mean", "std", "ci_low", "ci_high"]
    assert set(out["metric"]) == {"pearson_delta", "mse"}  # counts are not metrics
    row = out[(out.method == "a") & (out.metric == "pearson_delta")].iloc[0]
    assert (row["n"], row["mean"], row["std"]) == (3, pytest.approx(2.0), pytest.approx(1.0))
    assert 1.0 <= row["ci_low"] <= 2.0 <= row["ci_high"] <= 3.0
    row = out[(out.method == "b") & (out.metric == "pearson_delta")].iloc[0]
    assert row["n"] == 1
    assert row["mean"] == 0.5
    assert np.isnan(row["ci_low"])
    row = out[(out.method == "b") & (out.metric == "mse")].iloc[0]
    assert row["ci_low"] == row["ci_high"] == 1.0  # no variance, degenerate interval
    # deterministic, order independent
    shuffled = results.sample(frac=1.0, random_state=3)
    pd.testing.assert_frame_equal(summarize(shuffled, n_boot=200, seed=1), out)
    # the bootstrap interval of the mean: reproduce it independently
    rng_means = []
    values = np.array([1.0, 2.0, 3.0])
    for _ in range(2000):
        rng_means.append(np.random.default_rng(_).choice(values, 3).mean())
    wide = summarize(results, n_boot=2000, ci=0.9, metrics=["pearson_delta"])
    row = wide[wide.method == "a"].iloc[0]
    assert row["ci_low"] == pytest.approx(np.quantile(rng_means, 0.05), abs=0.2)
    assert row["ci_high"] == pytest.approx(np.quantile(rng_means, 0.95), abs=0.2)
    # no grouping
    flat = summarize(results, by=None, metrics="mse", n_boot=0)
    assert flat.shape == (1, 6)
    assert flat["mean"].item() == pytest.approx(1.0)
    assert np.isnan(flat["ci_low"].item())


def test_summarize_errors_and_evaluate_output():
    results = pd.DataFrame({"method": ["a"], "x": [1.0]})
    with pytest.raises(ValueError, match="`by` column 'cell_line'"):
        summarize(results, by="cell_line")
    with pytest.raises(ValueError, match=r"`metrics` \['y'\]"):
        summarize(results, metrics=["y"])
    with pytest.raises(ValueError, match="ci"):
        summarize(results, ci=95)
    adata = _make_adata()
    adata.layers["other"] = adata.X.copy()
    res = pd.concat([evaluate(adata), evaluate(adata, pred_layer="other")])
    table = summarize(res, by=("method", "cell_line"), n_boot=50)
    assert set(table["method"]) == {"ptrag", "other"}
    assert len(table) == 2 * 2 * 16  # methods x cell types x metrics


# ----------------------------------------------------------------------------- cell-eval


def _cell_eval_adata(seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    n_genes = 30
    var = pd.DataFrame(index=[f"G{j}" for j in range(n_genes)] + ["P1", "P2"])
    labels = ["non-targeting"] * 24 + [p for p in ("P1", "P2", "P3", "P4") for _ in range(8)]
    x = rng.uniform(0.05, 3.0, (len(labels), n_genes + 2))
    for k, p in enumerate(("P1", "P2", "P3", "P4")):
        idx = [i for i, lab in enumerate(labels) if lab == p]
        x[np.ix_(idx, range(5 * k, 5 * k + 5))] += 1.0
    obs = pd.DataFrame(
        {"gene": labels, "cell_line": "K562"}, index=[f"c{i}" for i in range(len(labels))]
    )
    obs.loc[obs.index[-8:], "cell_line"] = "HepG2"  # P4 lives in another cell type
    obs.loc[obs.index[:4], "cell_line"] = "HepG2"  # with its own controls
    adata = ad.AnnData(X=x.astype(np.float32), obs=obs, var=var)
    pred = np.clip(x + rng.normal(0, 0.4, x.shape), 0, None).astype(np.float32)
    pred[obs["gene"].to_numpy() == "non-targeting"] = 0.0  # must not leak into the export
    adata.layers["ptrag"] = pred
    return adata


def test_to_cell_eval_format(tmp_path):
    adata = _cell_eval_adata()
    pred, real = to_cell_eval(
        adata, cell_type_key="cell_line", cell_types="K562", path=tmp_path / "out"
    )
    assert pred.shape == real.shape == (20 + 24, 32)
    assert list(pred.var_names) == list(real.var_names) == list(adata.var_names)
    assert list(pred.obs_names) == list(real.obs_names)
    assert pred.X.dtype == np.float32
    assert isinstance(pred.X, np.ndarray)
    assert pred.obs["target_gene"].tolist() == real.obs["target_gene"].tolist()
    assert set(real.obs["target_gene"]) == {"non-targeting", "P1", "P2", "P3"}
    ctrl = (real.obs["target_gene"] == "non-targeting").to_numpy()
    assert ctrl.sum() == 20
    np.testing.assert_array_equal(pred.X[ctrl], real.X[ctrl])  # controls: real values in both
    np.testing.assert_array_equal(real.X, adata[real.obs_names].X)
    np.testing.assert_array_equal(pred.X[~ctrl], adata[pred.obs_names[~ctrl]].layers["ptrag"])
    for name in ("pred.h5ad", "real.h5ad"):
        back = ad.read_h5ad(tmp_path / "out" / name)
        assert back.shape == pred.shape
    # custom column names and split/perturbation filters
    adata.obs["split"] = np.where(adata.obs["gene"] == "P1", "train", "test")
    pred, _ = to_cell_eval(
        adata,
        cell_type_key="cell_line",
        cell_types=["K562"],
        split_key="split",
        perturbations=["P1", "P2"],
        pert_col="target",
        control_pert="ctrl",
    )
    assert set(pred.obs["target"]) == {"ctrl", "P2"}
    # several cell types: each keeps its own control cells and the cell type column
    pred, real = to_cell_eval(adata, cell_type_key="cell_line")
    assert pred.n_obs == adata.n_obs
    assert (
        pred.obs.groupby("cell_line", observed=True)["target_gene"]
        .apply(lambda s: "non-targeting" in set(s))
        .all()
    )
    no_ctrl = adata[~((adata.obs.cell_line == "HepG2") & (adata.obs.gene == "non-targeting"))]
    with pytest.raises(ValueError, match=r"No control cells.*\['HepG2'\]"):
        to_cell_eval(no_ctrl.copy(), cell_type_key="cell_line")
    with pytest.raises(ValueError, match="`cell_types` needs `cell_type_key`"):
        to_cell_eval(adata, cell_types="K562")
    with pytest.raises(ValueError, match=r"`pred_layer='x'` is not a layer"):
        to_cell_eval(adata, pred_layer="x")


def test_cell_eval_pearson_delta_matches(tmp_path):
    cell_eval = pytest.importorskip("cell_eval")
    from cell_eval.utils import split_anndata_on_celltype

    adata = _cell_eval_adata()
    ours_all = evaluate(adata, cell_type_key="cell_line")
    pred, real = to_cell_eval(adata, cell_type_key="cell_line")
    pred_split = split_anndata_on_celltype(pred, "cell_line")
    real_split = split_anndata_on_celltype(real, "cell_line")
    assert sorted(real_split) == ["HepG2", "K562"]
    for cell_type in real_split:
        evaluator = cell_eval.MetricsEvaluator(
            adata_pred=pred_split[cell_type].copy(),
            adata_real=real_split[cell_type].copy(),
            control_pert="non-targeting",
            pert_col="target_gene",
            num_threads=1,
            outdir=str(tmp_path / cell_type),
            skip_de=True,
        )
        results, _ = evaluator.compute(profile="minimal", write_csv=False, break_on_error=True)
        theirs = results.to_pandas().set_index("perturbation")
        ours = ours_all[ours_all["cell_line"] == cell_type].set_index("gene")
        assert sorted(theirs.index) == sorted(ours.index)
        n = len(ours)
        for p in ours.index:
            # same control mean on both sides in both packages -> same Pearson and errors
            assert ours.loc[p, "pearson_delta"] == pytest.approx(
                theirs.loc[p, "pearson_delta"], abs=1e-5
            )
            assert ours.loc[p, "mse"] == pytest.approx(theirs.loc[p, "mse"], rel=1e-4)
            assert ours.loc[p, "mae"] == pytest.approx(theirs.loc[p, "mae"], rel=1e-4)
            # cell-eval's score is 1 - rank / n (best 1); ours is rank / (n - 1) (best 0)
            if n > 1:
                assert theirs.loc[p, "discrimination_score_l1"] == pytest.approx(
                    1 - ours.loc[p, "discrimination_l1"] * (n - 1) / n
                )
    assert set(ours_all["cell_line"]) == {"HepG2", "K562"}
