"""Bad input gets an early error naming the key or value at fault, and leaves the AnnData as it was."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import SMALL_MODEL

import ptrag_sc
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


@pytest.mark.parametrize("sparse", [False, True])
def test_check_expression_streams_every_chunk(sparse, monkeypatch):
    """Bad values, the value ceiling and the raw-count test see every chunk and every slice, not the first."""
    import warnings

    from ptrag_sc.data import _checks as _validation
    from ptrag_sc.data._matrix import CHUNK_ROWS

    monkeypatch.setattr(_validation, "_SLICE", 7)
    n = CHUNK_ROWS + 40
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, (n, 5)).astype(np.float32)

    def check(X, **kwargs):
        _validation.check_expression(sp.csr_matrix(X) if sparse else X, where="`X`", **kwargs)

    with pytest.warns(UserWarning, match="look like raw counts"):
        check(counts, warn_counts=True)
    late = counts.copy()
    late[n - 3, 2] = 1.5  # the one fraction, in the last chunk
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(late, warn_counts=True)
    for value, message in ((np.nan, "NaN or infinite"), (-np.inf, "NaN or infinite"), (-0.5, "negative")):
        bad = late.copy()
        bad[[n - 2, n - 1], 1] = value
        with pytest.raises(ValueError, match=rf"`X` holds {message} values in 2\+ cell\(s\) \(first rows: \[{n - 2}, {n - 1}\]"):
            check(bad)
    big = late.copy()
    big[n - 1, 0] = 2e4
    with pytest.raises(ValueError, match=r"`X` holds values up to 2e\+04: PTRAG models log-normalised"):
        check(big)


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


def test_predict_matches_genes_by_name(trained):
    model, data = trained
    reference = model.predict(data, inplace=False)
    other = data[:, data.var_names[::-1]].copy()
    reordered = model.predict(other, inplace=False)
    np.testing.assert_array_equal(reordered, reference[:, ::-1])
    fewer = data[:, 1:].copy()
    with pytest.raises(ValueError, match=r"lacks 1 of the 60 genes the model was trained on \(e.g. \['GENE0001'\]\)"):
        model.predict(fewer)


def test_predict_errors(trained):
    model, data = trained
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
    with pytest.raises(ValueError, match="`cell_set_size` must be an integer >= 2, got 1"):
        PTRAG(adata, perturbation_embeddings=emb, cell_set_size=1)


def test_invalid_split(adata):
    PTRAG.setup_anndata(adata)
    model = PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **SMALL_MODEL)
    with pytest.raises(KeyError, match=r"`split_key='split'` is not a column"):
        model.train(max_steps=1, split_key="split")
    adata.obs["split"] = "holdout"
    with pytest.raises(ValueError, match=r"holds values \['holdout'\]"):
        model.train(max_steps=1, split_key="split")


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda a: PTRAG.setup_anndata(a.to_df()), TypeError, r"`adata` must be an AnnData \(or a MuData\), got DataFrame"),
        (lambda a: PTRAG.setup_anndata(a, perturbation_key=["gene"]), TypeError, r"`perturbation_key` must be a column name \(str\)"),
        (lambda a: PTRAG.setup_anndata(a, cell_type_key="gene"), ValueError, r"`cell_type_key='gene'` is also the `perturbation_key`"),
    ],
)
def test_setup_argument_types(adata, call, error, message):
    snap = _snapshot(adata)
    with pytest.raises(error, match=message):
        call(adata)
    _assert_untouched(adata, snap)


def test_empty_labels(adata):
    gene = adata.obs["gene"].astype(str).to_numpy().astype(object)
    gene[:3] = ["  ", "+", " + "]
    adata.obs["gene"] = gene
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match=r"`adata.obs\['gene'\]` has empty labels \(blank or only separators\) in 3 cell\(s\)"):
        PTRAG.setup_anndata(adata)
    _assert_untouched(adata, snap)


def test_constructor_checks_adata_and_converts_integral_floats(adata):
    emb = adata.uns["gene_embeddings"]
    with pytest.raises(ValueError, match=r"`adata` is not set up for PTRAG: call `PTRAG.setup_anndata"):
        PTRAG(adata, perturbation_embeddings=emb, **SMALL_MODEL)
    with pytest.raises(ValueError, match="Pass `adata`"):
        PTRAG(None, perturbation_embeddings=emb, **SMALL_MODEL)
    PTRAG.setup_anndata(adata)
    model = PTRAG(adata, perturbation_embeddings=emb, **{**SMALL_MODEL, "n_hidden": 32.0, "n_candidates": 8.0})
    assert model.module.n_hidden == 32
    assert isinstance(model.n_candidates, int)
    with pytest.raises(ValueError, match=r"`n_hidden` must be an integer below 2\*\*31"):
        PTRAG(adata, perturbation_embeddings=emb, **{**SMALL_MODEL, "n_hidden": 1e30})
    with pytest.raises(ValueError, match=r"`perturbation_embeddings` has values up to .*e\+(29|30) .*beyond 1e\+06 .*Rescale the table"):
        PTRAG(adata, perturbation_embeddings=emb * 1e30, **SMALL_MODEL)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_epoch": 3}, TypeError, r"unknown argument\(s\) \['max_epoch'\].*did you mean `max_epochs`"),
        ({"callbacks": "x"}, TypeError, r"`callbacks` must be a list of Lightning `Callback` objects"),
        ({"gradient_clip_val": -1.0}, ValueError, r"`gradient_clip_val` must be >= 0.0"),
        ({"plan_kwargs": {"learning_rate": 1e-3}}, TypeError, r"`plan_kwargs` has unknown key\(s\) \['learning_rate'\] \(`learning_rate` -> `lr`\?\)"),
        ({"accelerator": "cpuu"}, ValueError, r"The trainer cannot be set up with `accelerator='cpuu'`"),
        ({"devices": 0}, ValueError, r"The trainer cannot be set up with .*`devices=0`"),
    ],
)
def test_train_arguments(adata, kwargs, error, message):
    PTRAG.setup_anndata(adata)
    model = PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **SMALL_MODEL)
    with pytest.raises(error, match=message):
        model.train(max_steps=2, **kwargs)
    assert not model.is_trained_
    assert model.memory_ is None


def test_train_checks_data_and_set_size(adata):
    PTRAG.setup_anndata(adata)
    model = PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **{**SMALL_MODEL, "cell_set_size": 10_000})
    with pytest.raises(ValueError, match=r"`cell_set_size=10000` is larger than every training group: the largest .* has 40 cells"):
        model.train(max_steps=2)
    assert not model.is_trained_
    assert model.memory_ is None
    # A little larger than every group (e.g. the default 64 on a 40-cell screen): a warning, and it trains.
    model = PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **{**SMALL_MODEL, "cell_set_size": 64})
    with pytest.warns(UserWarning, match=r"`cell_set_size=64` is larger than every training group \(the largest has 40 cells\)"):
        model.train(max_steps=2)
    assert model.is_trained_
    model = PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **SMALL_MODEL)
    adata.X[5, 3] = np.nan  # changed after setup_anndata
    with pytest.raises(ValueError, match=r"`adata.X` holds NaN or infinite values .*first rows: \[5\]"):
        model.train(max_steps=2)


def test_predict_argument_checks(trained):
    model, data = trained
    with pytest.raises(ValueError, match=r"`seed` must be an integer >= 0 or None, got -1"):
        model.predict(data, seed=-1)
    with pytest.raises(TypeError, match=r"`inplace` must be True or False, got 'no'"):
        model.predict(data, inplace="no")
    with pytest.raises(TypeError, match=r"`adata` must be an AnnData"):
        model.predict(data.to_df())
    view = data[:100]
    with pytest.raises(ValueError, match=r"`adata` is a view: writing the prediction layer would turn it into a copy"):
        model.predict(view)
    assert "ptrag" not in data.layers
    with pytest.raises(ValueError, match=r"`seed` must be an integer >= 0, got -1"):
        model.get_retrieval(["GENE0003"], seed=-1)
    with pytest.raises(ValueError, match=r"`perturbations` holds the control label 'non-targeting'"):
        model.get_retrieval(["non-targeting"])
    with pytest.raises(ValueError, match=r"No control cells of cell type\(s\) \['liver'\] in the AnnData \(`cell_type`\)"):
        model.get_retrieval(["GENE0003"], cell_type="liver")


def test_predict_warns_on_raw_counts(trained):
    model, data = trained
    counts = data.copy()
    counts.X = np.round(np.expm1(counts.X) * 3)
    with pytest.warns(UserWarning, match="look like raw counts"):
        model.predict(counts, inplace=False)


def test_load_accepts_new_cell_types_and_refuses_other_objects(trained, tmp_path):
    model, data = trained
    model.save(tmp_path / "m")
    with pytest.raises(TypeError, match=r"`adata` must be an AnnData \(or a MuData\), got DataFrame"):
        PTRAG.load(tmp_path / "m", adata=data.to_df())
    other = data.copy()
    other.obs["cell_line"] = other.obs["cell_line"].astype(str).replace({"cell_line_1": "new_line"})
    loaded = PTRAG.load(tmp_path / "m", adata=other)
    pred = loaded.predict(other, inplace=False)
    assert np.isfinite(pred).all()
    assert (other.obs["cell_line"] == "new_line").sum() > 0


def test_embedding_symbols_are_read_without_surrounding_spaces(adata):
    table = adata.uns["gene_embeddings"].copy()
    table.index = [f" {g.lower()} " for g in table.index]
    PTRAG.setup_anndata(adata)
    model = PTRAG(adata, perturbation_embeddings=table, gene_annotations=None, **SMALL_MODEL)
    assert list(model.perturbation_embeddings.index) == [g.upper() for g in adata.uns["gene_embeddings"].index]
    table.index = ["  ", *table.index[1:]]
    with pytest.raises(ValueError, match="1 blank gene symbol"):
        PTRAG(adata, perturbation_embeddings=table, gene_annotations=None, **SMALL_MODEL)
    resolved = ptrag_sc.pp.resolve_gene_symbols([" stat1", "SGK1 "], [" STAT1 ", "SGK1"], warn=False)
    assert resolved.mapping == {" stat1": " STAT1 ", "SGK1 ": "SGK1"}


@pytest.mark.parametrize(
    ("option", "value"),
    [("n_hidden", 65536), ("cell_set_size", 200_000), ("n_layers", 10**8), ("n_candidates", 10**7)],
)
def test_sizes_beyond_memory_are_refused_naming_the_option(adata, option, value):
    PTRAG.setup_anndata(adata)
    kwargs = {**SMALL_MODEL, "gene_annotations": None, option: value}
    with pytest.raises(ValueError, match=rf"`{option}={value}` makes the model too large.*GiB of memory; with `{option}="):
        PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **kwargs)


def _tl_pl_calls(model, data):
    frame = pd.DataFrame({"x": [1.0]})
    return {
        "tl.screen(adata)": (lambda: ptrag_sc.tl.screen(data, cell_type="x"), r"`model` must be a trained PTRAG model, got AnnData\. The model comes first"),
        "tl.screen(model, model)": (lambda: ptrag_sc.tl.screen(model, model), r"`adata` must be an AnnData.*got PTRAG"),
        "tl.evaluate(model)": (lambda: ptrag_sc.tl.evaluate(model), r"`adata` must be an AnnData, got PTRAG.*model.adata"),
        "tl.evaluate(reference=frame)": (lambda: ptrag_sc.tl.evaluate(data, reference=frame), r"`reference` must be an AnnData, got DataFrame"),
        "tl.predict_baseline(model)": (lambda: ptrag_sc.tl.predict_baseline(model, "control"), r"`adata` must be an AnnData, got PTRAG"),
        "tl.to_cell_eval(frame)": (lambda: ptrag_sc.tl.to_cell_eval(frame), r"`adata` must be an AnnData, got DataFrame"),
        "pl.shift_scatter(model)": (lambda: ptrag_sc.pl.shift_scatter(model), r"`adata` must be an AnnData, got PTRAG"),
        "pl.screen(model)": (lambda: ptrag_sc.pl.screen(model), r"`screen_df` must be the DataFrame"),
        "pl.training_history(data)": (lambda: ptrag_sc.pl.training_history(data), r"`model_or_history` must be"),
    }


def test_tl_and_pl_check_argument_types_first(trained):
    model, data = trained
    for name, (call, message) in _tl_pl_calls(model, data).items():
        with pytest.raises(TypeError, match=message):
            call()
        assert name  # (named for the failure report)


@pytest.mark.parametrize(
    "signature",
    [["GENE0001", "GENE0001"], ["GENE0001", "gene0001"], {"up": ["GENE0001"], "down": ["GENE0001"]}, {"up": ["GENE0001", "GENE0002", "GENE0001"]}],
)
def test_a_signature_listing_a_gene_twice_is_refused(trained, signature):
    model, data = trained
    cell_type = str(data.obs["cell_line"].iloc[0])
    with pytest.raises(ValueError, match=r"`signature` lists the same gene more than once: \['GENE0001'"):
        ptrag_sc.tl.screen(model, cell_type=cell_type, signature=signature)
