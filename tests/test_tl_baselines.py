"""Tests of ptrag_sc.tl.predict_baseline on a tiny AnnData whose predictions are known by hand."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ptrag_sc.data._pairing import match_controls
from ptrag_sc.tl import BASELINES, predict_baseline

# Cells: (cell type, perturbation, split, expression of g0, g1, g2).
# Control means: A = (1, 1, 1), B = (2, 2, 2). Training shifts:
#   s(A, X) = (2, 0, 0)   s(A, Y) = (0, 2, 0)   s(B, X) = (0, 0, 3)   s(B, Z) = (0, -2, 0)
# Context shifts: ctx(A) = (1, 1, 0), ctx(B) = (0, -1, 1.5).
CELLS = [
    ("A", "non-targeting", "train", (1, 1, 1)),
    ("A", "non-targeting", "train", (1, 1, 1)),
    ("B", "non-targeting", "train", (2, 2, 2)),
    ("B", "non-targeting", "train", (2, 2, 2)),
    ("A", "X", "train", (2, 1, 1)),
    ("A", "X", "train", (4, 1, 1)),
    ("A", "Y", "train", (1, 3, 1)),
    ("B", "X", "train", (2, 2, 5)),
    ("B", "Z", "train", (2, 0, 2)),
    ("A", "X+Y", "test", (9, 9, 9)),
    ("A", "X+W", "test", (3, 3, 3)),
    ("A", "Z", "test", (5, 5, 5)),
    ("A", "Z", "val", (6, 0, 6)),
    ("B", "Y", "test", (7, 7, 7)),
]

EMBEDDINGS = pd.DataFrame(
    [[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.0, -1.0]], index=["X", "Y", "Z", "W"]
)

CTRL = {"A": (1, 1, 1), "B": (2, 2, 2)}
CTX_A, CTX_B = (2, 2, 1), (2, 1, 3.5)  # control + context shift

# Expected prediction of every perturbed (cell type, perturbation) and whether it fell back.
EXPECTED = {
    "control": {},
    "context_mean": {
        **{("A", p): (CTX_A, False) for p in ("X", "Y", "X+Y", "X+W", "Z")},
        **{("B", p): (CTX_B, False) for p in ("X", "Z", "Y")},
    },
    "other_cell_types": {
        ("A", "X"): ((1, 1, 4), False),
        ("A", "Y"): (CTX_A, True),
        ("A", "X+Y"): (CTX_A, True),
        ("A", "X+W"): (CTX_A, True),
        ("A", "Z"): ((1, 0, 1), False),  # (1, -1, 1) clipped at 0
        ("B", "X"): ((4, 2, 2), False),
        ("B", "Z"): (CTX_B, True),
        ("B", "Y"): ((2, 3, 2), False),  # (2, 4, 2) capped at the largest training value of g1, 3
    },
    "additive": {
        ("A", "X"): ((3, 1, 1), False),
        ("A", "Y"): ((1, 3, 1), False),
        ("A", "X+Y"): ((3, 3, 1), False),
        ("A", "X+W"): ((3, 1, 1), True),  # only X measured: partial sum, flagged
        ("A", "Z"): (CTX_A, True),
        ("B", "X"): ((2, 2, 5), False),
        ("B", "Z"): ((2, 0, 2), False),
        ("B", "Y"): (CTX_B, True),
    },
    "knn": {  # k = 1
        ("A", "X"): ((1, 3, 1), False),  # itself excluded -> Y
        ("A", "Y"): ((3, 1, 1), False),
        ("A", "X+Y"): ((3, 1, 1), False),  # tie X/Y broken by label order
        ("A", "X+W"): ((3, 1, 1), False),
        ("A", "Z"): ((3, 1, 1), False),
        ("B", "X"): ((2, 0, 2), False),
        ("B", "Z"): ((2, 2, 5), False),
        ("B", "Y"): ((2, 0, 2), False),  # cos(Y, Z) > cos(Y, X) = 0
    },
}
EXPECTED["control"] = {key: (CTRL[key[0]], False) for key in EXPECTED["context_mean"]}


def _adata(cells=CELLS) -> ad.AnnData:
    obs = pd.DataFrame(
        [c[:3] for c in cells],
        columns=["cell_line", "gene", "split"],
        index=[f"cell{i}" for i in range(len(cells))],
    )
    x = np.array([c[3] for c in cells], dtype=np.float32)
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=["g0", "g1", "g2"]))


def _expected_layer(adata, table) -> np.ndarray:
    out = np.asarray(adata.X, dtype=np.float32).copy()
    for i, (c, p) in enumerate(zip(adata.obs["cell_line"], adata.obs["gene"], strict=True)):
        if p != "non-targeting":
            out[i] = table[(c, p)][0]
    return out


def _run(adata, method, **kwargs):
    kwargs.setdefault("split_key", "split")
    if method in ("linear", "knn"):
        kwargs.setdefault("gene_embeddings", EMBEDDINGS)
    if method == "knn":
        kwargs.setdefault("k", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        predict_baseline(adata, method, **kwargs)
    return adata.layers[kwargs.get("key_added") or f"baseline_{method}"]


@pytest.mark.parametrize(
    "method", ["control", "context_mean", "other_cell_types", "additive", "knn"]
)
def test_baseline_hand_values(method):
    adata = _adata()
    x_before = adata.X.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict_baseline(
            adata,
            method,
            split_key="split",
            gene_embeddings=EMBEDDINGS if method == "knn" else None,
            **({"k": 1} if method == "knn" else {}),
        )
    table = EXPECTED[method]
    key = f"baseline_{method}"
    np.testing.assert_array_equal(adata.layers[key], _expected_layer(adata, table))
    assert adata.layers[key].dtype == np.float32
    np.testing.assert_array_equal(adata.X, x_before)  # X untouched
    ctrl = (adata.obs["gene"] == "non-targeting").to_numpy()
    np.testing.assert_array_equal(adata.layers[key][ctrl], adata.X[ctrl])
    expected_flags = [
        table[(c, p)][1] if p != "non-targeting" else False
        for c, p in zip(adata.obs["cell_line"], adata.obs["gene"], strict=True)
    ]
    assert adata.obs[f"{key}_fallback"].tolist() == expected_flags
    info = adata.uns[key]
    assert info["method"] == method
    assert info["n_fallback_cells"] == sum(expected_flags)
    assert info["in_sample"] is False
    assert info["n_train_cells"] == 9
    fallback_warnings = [w for w in caught if "fallback" in str(w.message)]
    assert len(fallback_warnings) == (1 if any(expected_flags) else 0)
    if fallback_warnings:
        assert f"{sum(expected_flags)} of 10 perturbed cell(s)" in str(
            fallback_warnings[0].message
        )


def test_knn_k_larger_than_candidates():
    adata = _adata()
    layer = _run(adata, "knn", k=5)
    obs = adata.obs.reset_index(drop=True)
    row = obs.index[(obs.cell_line == "A") & (obs.gene == "X+Y")][0]
    np.testing.assert_array_equal(layer[row], CTX_A)  # mean of X and Y shifts
    row = obs.index[(obs.cell_line == "B") & (obs.gene == "Y")][0]
    np.testing.assert_array_equal(layer[row], CTX_B)
    row = obs.index[(obs.cell_line == "A") & (obs.gene == "X")][0]
    np.testing.assert_array_equal(layer[row], (1, 3, 1))  # only Y remains after excluding X


def test_linear_matches_closed_form_ridge():
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    adata = _adata()
    alpha = 0.3
    layer = _run(adata, "linear", alpha=alpha)
    # training pairs (A, X), (A, Y), (B, X), (B, Z); targets: shift - context shift
    pairs = [("A", "X"), ("A", "Y"), ("B", "X"), ("B", "Z")]
    shifts = {
        ("A", "X"): np.array([2.0, 0, 0]),
        ("A", "Y"): np.array([0.0, 2, 0]),
        ("B", "X"): np.array([0.0, 0, 3]),
        ("B", "Z"): np.array([0.0, -2, 0]),
    }
    ctx = {"A": np.array([1.0, 1, 0]), "B": np.array([0.0, -1, 1.5])}
    emb = {p: EMBEDDINGS.loc[p].to_numpy() for p in EMBEDDINGS.index}
    emb["X+Y"] = emb["X"] + emb["Y"]
    emb["X+W"] = emb["X"] + emb["W"]
    e = np.array([emb[p] for _, p in pairs])
    y = np.array([shifts[k] - ctx[k[0]] for k in pairs])
    e_bar = e.mean(0)
    model = sklearn_linear.Ridge(alpha=alpha, fit_intercept=False).fit(e - e_bar, y)
    obs = adata.obs.reset_index(drop=True)
    for i, (c, p) in enumerate(zip(obs.cell_line, obs.gene, strict=True)):
        if p == "non-targeting":
            continue
        delta = ctx[c] + model.predict((emb[p] - e_bar)[None])[0]
        expected = np.maximum(np.array(CTRL[c], dtype=float) + delta, 0)
        np.testing.assert_allclose(layer[i], expected, rtol=1e-5, atol=1e-5)
    # a huge penalty shrinks the linear term: the context mean is left
    big = _run(adata, "linear", alpha=1e12, key_added="big")
    np.testing.assert_allclose(big, _expected_layer(adata, EXPECTED["context_mean"]), atol=1e-5)
    # one model per cell type: fitted on that cell type's pairs only
    per = _run(adata, "linear", alpha=alpha, per_cell_type=True, key_added="per")
    a_pairs = pairs[:2]
    ea = np.array([emb[p] for _, p in a_pairs])
    ya = np.array([shifts[k] - ctx["A"] for k in a_pairs])
    model_a = sklearn_linear.Ridge(alpha=alpha, fit_intercept=False).fit(ea - ea.mean(0), ya)
    i = obs.index[(obs.cell_line == "A") & (obs.gene == "Z")][0]
    delta = ctx["A"] + model_a.predict((emb["Z"] - ea.mean(0))[None])[0]
    np.testing.assert_allclose(per[i], np.maximum(np.array(CTRL["A"]) + delta, 0), atol=1e-5)


def test_linear_dual_and_primal_forms_agree():
    # more embedding dimensions than training pairs (dual form) vs. fewer (primal form)
    rng = np.random.default_rng(0)
    wide = pd.DataFrame(rng.normal(size=(4, 10)), index=EMBEDDINGS.index)
    narrow_dims = wide.iloc[:, :2]
    a = _run(_adata(), "linear", gene_embeddings=wide, alpha=0.5)
    b = _run(_adata(), "linear", gene_embeddings=narrow_dims, alpha=0.5)
    assert np.all(np.isfinite(a))
    assert np.all(np.isfinite(b))
    # the dual solution equals the primal one on the same data
    from ptrag_sc.tl._baselines import _solve

    e = rng.normal(size=(4, 10))
    y = rng.normal(size=(4, 3))
    dual = e.T @ _solve(e @ e.T + 0.5 * np.eye(4), y)
    primal = _solve(e.T @ e + 0.5 * np.eye(10), e.T @ y)
    np.testing.assert_allclose(dual, primal, atol=1e-10)


@pytest.mark.parametrize("method", BASELINES)
def test_no_leakage_from_held_out_cells(method):
    adata = _adata()
    before = _run(adata, method).copy()
    held_out = (adata.obs["split"] != "train").to_numpy()
    changed = adata.copy()
    x = changed.X.copy()
    x[held_out] = x[held_out] * 10 + 3
    changed.X = x
    after = _run(changed, method)
    # every prediction, the held-out cells' own included, is unchanged
    np.testing.assert_array_equal(after, before)
    # sanity: the same change applied to a training perturbed cell does change the estimate
    if method not in ("control",):
        train_pert = np.flatnonzero(~held_out & (adata.obs["gene"] == "X").to_numpy())
        moved = adata.copy()
        x = moved.X.copy()
        x[train_pert] = x[train_pert] * 10 + 3
        moved.X = x
        assert not np.array_equal(_run(moved, method), before)


def test_train_mask_equals_split_key_and_default_is_in_sample():
    adata = _adata()
    by_split = _run(adata, "context_mean").copy()
    mask = (adata.obs["split"] == "train").to_numpy()
    by_mask = _run(adata, "context_mean", split_key=None, train_mask=mask, key_added="m")
    np.testing.assert_array_equal(by_split, by_mask)
    predict_baseline(adata, "context_mean", key_added="all")
    assert adata.uns["all"]["in_sample"] is True
    assert adata.uns["all"]["n_train_cells"] == adata.n_obs
    # in-sample: every perturbed cell enters the context shift
    assert not np.array_equal(adata.layers["all"], by_split)


def test_matched_controls_and_batch():
    cells = list(CELLS)
    cells[1] = ("A", "non-targeting", "train", (1, 2, 1))  # distinct controls in A
    adata = _adata(cells)
    seed = 3
    layer = _run(adata, "context_mean", seed=seed)
    is_ctrl = (adata.obs["gene"] == "non-targeting").to_numpy()
    paired = match_controls(is_ctrl, adata.obs["cell_line"].to_numpy(), seed=seed)
    # control mean of A is now (1, 1.5, 1); ctx(A) = mean((3,1,1), (1,3,1)) - that = (1, 0.5, 0)
    deltas = {"A": np.array([1.0, 0.5, 0.0]), "B": np.array([0.0, -1.0, 1.5])}
    gene, line = adata.obs["gene"].to_numpy(), adata.obs["cell_line"].to_numpy()
    for c, p in {(c, p) for c, p in zip(line[~is_ctrl], gene[~is_ctrl], strict=True)}:
        rows = np.flatnonzero((line == c) & (gene == p))
        x = adata.X[paired[rows]]
        # The model's rule: scale each expressed gene so the set's mean becomes mu(c) + delta.
        mu = adata.X[is_ctrl & (line == c)].mean(0)
        target, set_mean = mu + deltas[c], x.mean(0)
        scale = np.where(set_mean > 0.05, np.clip(target / np.maximum(set_mean, 0.05), 0, 10), 1.0)
        expected = np.maximum(x * scale + (target - set_mean * scale), 0)
        np.testing.assert_allclose(layer[rows], expected, rtol=1e-6, atol=1e-6)
        if (target > 0).all():
            np.testing.assert_allclose(layer[rows].mean(0), target, rtol=1e-5)
    # with a batch key, a perturbed cell gets the control of its own batch
    adata.obs["gem_group"] = ["1", "2", "1", "2"] + ["1", "2"] * 5
    layer = _run(adata, "control", batch_key="gem_group", key_added="b")
    for i in np.flatnonzero(~is_ctrl):
        c, batch = adata.obs["cell_line"].iloc[i], adata.obs["gem_group"].iloc[i]
        j = np.flatnonzero(
            is_ctrl
            & (adata.obs["cell_line"] == c).to_numpy()
            & (adata.obs["gem_group"] == batch).to_numpy()
        )
        np.testing.assert_array_equal(layer[i], adata.X[j[0]])  # one control per batch here


def test_sparse_input_copy_and_key_added():
    adata = _adata()
    dense = _run(adata, "additive").copy()
    sparse_adata = _adata()
    sparse_adata.X = sp.csr_matrix(sparse_adata.X)
    np.testing.assert_array_equal(_run(sparse_adata, "additive"), dense)
    fresh = _adata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = predict_baseline(fresh, "additive", split_key="split", key_added="add", copy=True)
    assert "add" in out.layers
    assert "add_fallback" in out.obs
    assert "add" in out.uns
    assert "add" not in fresh.layers
    assert "add_fallback" not in fresh.obs
    assert not fresh.uns
    assert predict_baseline(fresh, "control", split_key="split") is None
    # input from a layer
    fresh.layers["counts_log"] = fresh.X * 2
    _run(fresh, "control", layer="counts_log", key_added="c2")
    np.testing.assert_array_equal(fresh.layers["c2"][:4], fresh.X[:4] * 2)


def test_errors():
    adata = _adata()
    with pytest.raises(ValueError, match=r"`method='mean'` is not a baseline.*context_mean"):
        predict_baseline(adata, "mean")
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['k'\] for baseline 'linear'"):
        predict_baseline(adata, "linear", gene_embeddings=EMBEDDINGS, k=3)
    with pytest.raises(ValueError, match="needs `gene_embeddings`"):
        predict_baseline(adata, "knn")
    with pytest.raises(ValueError, match=r"no gene embedding.*'W'"):
        predict_baseline(adata, "knn", gene_embeddings=EMBEDDINGS.drop(index="W"))
    with pytest.raises(
        ValueError, match=r"`cell_type_key='celltype'`.*\['cell_line', 'gene', 'split'\]"
    ):
        predict_baseline(adata, "control", cell_type_key="celltype")
    with pytest.raises(ValueError, match=r"`split_key='fold'`"):
        predict_baseline(adata, "control", split_key="fold")
    with pytest.raises(
        ValueError, match=r"No perturbed training cell.*\['test', 'train', 'val'\]"
    ):
        predict_baseline(adata, "control", split_key="split", train_values="training")
    with pytest.raises(ValueError, match="either `split_key` or `train_mask`"):
        predict_baseline(adata, "control", split_key="split", train_mask=np.ones(14, bool))
    with pytest.raises(ValueError, match=r"`train_mask` has shape \(3,\)"):
        predict_baseline(adata, "control", train_mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="No control cells"):
        predict_baseline(adata, "control", control_group="ctrl")
    with pytest.raises(ValueError, match=r"`layer='x'` is not a layer"):
        predict_baseline(adata, "control", layer="x")
    with pytest.raises(ValueError, match="positive integer"):
        predict_baseline(adata, "knn", gene_embeddings=EMBEDDINGS, k=0)
    no_b_ctrl = adata[~((adata.obs.cell_line == "B") & (adata.obs.gene == "non-targeting"))].copy()
    with pytest.raises(ValueError, match=r"No control cells.*\('B',\)"):
        predict_baseline(no_b_ctrl, "control")
    assert "baseline_control" not in adata.layers  # failed calls write nothing
