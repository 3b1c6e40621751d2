"""Bad input gets an early error naming the key or value at fault, and leaves the AnnData as it was."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import SMALL_MODEL

from ptrag_sc import PTRAG


def _snapshot(adata):
    return (list(adata.obs.columns), sorted(adata.uns.keys()), list(adata.layers.keys()), adata.X.copy())


def _assert_untouched(adata, snapshot):
    columns, uns, layers, X = snapshot
    assert list(adata.obs.columns) == columns
    assert sorted(adata.uns.keys()) == uns
    assert list(adata.layers.keys()) == layers
    np.testing.assert_array_equal(adata.X, X)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"perturbation_key": "guide"}, r"`perturbation_key='guide'` is not a column of `adata.obs`. Existing columns: \['gene', 'cell_line', 'gem_group'\]"),
        ({"cell_type_key": "celltype"}, r"`cell_type_key='celltype'` is not a column.*Existing columns: \['gene'"),
        ({"batch_key": "batch"}, r"`batch_key='batch'` is not a column"),
        ({"layer": "counts"}, r"`layer='counts'` is not in `adata.layers`"),
    ],
)
def test_missing_keys(adata, kwargs, message):
    snap = _snapshot(adata)
    with pytest.raises(KeyError, match=message):
        PTRAG.setup_anndata(adata, **kwargs)
    _assert_untouched(adata, snap)


def test_no_control_cells(adata):
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match=r"No control cells: `control_group='ctrl'` does not occur in `adata.obs\['gene'\]`"):
        PTRAG.setup_anndata(adata, control_group="ctrl")
    _assert_untouched(adata, snap)


def test_no_control_cells_for_one_cell_type(adata):
    keep = ~((adata.obs["cell_line"] == "cell_line_1") & (adata.obs["gene"] == "non-targeting")).to_numpy()
    data = adata[keep].copy()
    snap = _snapshot(data)
    with pytest.raises(ValueError, match=r"No control cells for cell type\(s\) \['cell_line_1'\]"):
        PTRAG.setup_anndata(data)
    _assert_untouched(data, snap)


@pytest.mark.parametrize(("value", "message"), [(np.nan, "NaN or infinite values"), (np.inf, "NaN or infinite values"), (-1.0, "negative values")])
def test_bad_expression_values(adata, value, message):
    adata.X[3, 2] = value
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match=rf"`adata.X` holds {message} in 1\+ cell\(s\) \(first rows: \[3\]"):
        PTRAG.setup_anndata(adata)
    _assert_untouched(adata, snap)


def test_bad_sparse_layer(adata):
    counts = sp.csr_matrix(adata.X)
    counts.data[0] = np.nan
    adata.layers["norm"] = counts
    with pytest.raises(ValueError, match=r"`adata.layers\['norm'\]` holds NaN"):
        PTRAG.setup_anndata(adata, layer="norm")


def test_perturbation_without_embedding(adata):
    PTRAG.setup_anndata(adata)
    emb = adata.uns["gene_embeddings"]
    missing = sorted(emb.index)[:2]
    with pytest.raises(ValueError, match=r"2 perturbation\(s\) in the registered AnnData have no gene embedding: .*" + missing[0]):
        PTRAG(adata, perturbation_embeddings=emb.drop(index=missing), **SMALL_MODEL)


@pytest.mark.parametrize(
    ("table", "error", "message"),
    [
        ("array", TypeError, "must be a pandas DataFrame indexed by gene symbol"),
        ("empty", ValueError, r"has shape \(0, 32\)"),
        ("nan", ValueError, r"NaN or infinite values for 1 gene\(s\), e.g. \['GENE"),
        ("zero", ValueError, "all-zero rows"),
        ("duplicate", ValueError, "duplicated gene symbols"),
        ("text", ValueError, "must hold numbers only"),
    ],
)
def test_bad_embedding_tables(adata, table, error, message):
    PTRAG.setup_anndata(adata)
    emb = adata.uns["gene_embeddings"].copy()
    bad = {
        "array": emb.to_numpy(),
        "empty": emb.iloc[:0],
        "nan": emb.assign(**{emb.columns[0]: [np.nan] + [0.1] * (len(emb) - 1)}),
        "zero": emb.assign(**{c: 0.0 for c in emb.columns}),
        "duplicate": pd.concat([emb, emb.iloc[:1].rename(index=str.lower)]),
        "text": emb.assign(**{emb.columns[0]: "x"}),
    }[table]
    with pytest.raises(error, match=message):
        PTRAG(adata, perturbation_embeddings=bad, **SMALL_MODEL)


def test_predict_before_train(adata):
    PTRAG.setup_anndata(adata)
    model = PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **SMALL_MODEL)
    with pytest.raises(RuntimeError, match=r"Model not trained. Call `model.train\(\)` first."):
        model.predict(adata)
    with pytest.raises(RuntimeError, match="Model not trained"):
        model.get_retrieval(["GENE0001"])
    assert "ptrag" not in adata.layers


def test_predict_errors(trained):
    model, data = trained
    # Genes are matched by name: another order gives the same predictions, in that order.
    other = data[:, ::-1].copy()
    np.testing.assert_array_equal(model.predict(other, inplace=False), model.predict(data, inplace=False)[:, ::-1])
    fewer = data[:, 1:].copy()
    with pytest.raises(ValueError, match=r"lacks 1 of the 60 genes the model was trained on \(e.g. \['GENE0001'\]\)"):
        model.predict(fewer)
    with pytest.raises(ValueError, match=r"perturbation\(s\) requested have no gene embedding: 'NOTAGENE'"):
        model.predict(data, perturbations=["NOTAGENE"])
    with pytest.raises(ValueError, match=r"`cell_type='liver'` does not occur"):
        model.predict(data, perturbations=[str(model.training_perturbations_[0])], cell_type="liver")
    no_ctrl = data[(data.obs["gene"] != "non-targeting").to_numpy() | (data.obs["cell_line"] != "cell_line_2").to_numpy()].copy()
    snap = _snapshot(no_ctrl)
    with pytest.raises(ValueError, match=r"No control cells for cell type\(s\) \['cell_line_2'\] in the AnnData to predict"):
        model.predict(no_ctrl)
    bad = data.copy()
    bad.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="the AnnData to predict holds NaN"):
        model.predict(bad)
    assert "ptrag" not in bad.layers
    assert list(no_ctrl.layers.keys()) == snap[2]


def test_invalid_model_options(adata):
    PTRAG.setup_anndata(adata)
    emb = adata.uns["gene_embeddings"]
    with pytest.raises(ValueError, match=r"`retrieval` must be one of \['ptrag', 'vanilla', 'none'\], got 'rag'"):
        PTRAG(adata, perturbation_embeddings=emb, retrieval="rag")
    with pytest.raises(ValueError, match=r"`cell_set_size` must be an integer >= 2, got 1"):
        PTRAG(adata, perturbation_embeddings=emb, cell_set_size=1)


def test_invalid_split(adata):
    PTRAG.setup_anndata(adata)
    model = PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **SMALL_MODEL)
    with pytest.raises(KeyError, match=r"`split_key='split'` is not a column"):
        model.train(max_steps=1, split_key="split")
    adata.obs["split"] = "holdout"
    with pytest.raises(ValueError, match=r"holds values \['holdout'\]"):
        model.train(max_steps=1, split_key="split")
