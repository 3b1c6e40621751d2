"""MuData input: ``PTRAG.setup_mudata`` from guide counts, and the model on a MuData."""

from __future__ import annotations

import doctest
import warnings

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import SHARED_DATA

import ptrag_sc
from ptrag_sc import PTRAG
from ptrag_sc.model import _mudata

torch.set_num_threads(1)
ptrag_sc.settings.progress_bar = False

PAPALEXI = (SHARED_DATA / "papalexi2021_thp1_sceptredata/papalexi2021_thp1_lowmoi_299genes.h5ad")
TINY = {"n_hidden": 16, "n_layers": 1, "n_heads": 2, "cell_set_size": 8, "n_candidates": 4}


def mudata(mods: dict) -> md.MuData:
    with md.set_options(pull_on_update=False):
        return md.MuData(mods)


def synthetic_mudata(seed: int = 0, n_multiplet: int = 12, n_unassigned: int = 9):
    """RNA from ``datasets.synthetic`` (labels removed) + guide counts, 2 guides per gene.

    Returns the MuData, the true labels and the expected status of every cell.
    """
    rna = ptrag_sc.datasets.synthetic(
        n_cell_types=2, n_perturbations=6, n_genes=30, n_cells_per_perturbation=20, n_control_cells=40, seed=seed
    )
    truth = rna.obs["gene"].astype(str).to_numpy()
    embeddings = rna.uns.pop("gene_embeddings")
    del rna.obs["gene"]
    genes = sorted(set(truth) - {"non-targeting"})
    names = [f"{g}_{k}" for g in [*genes, "NT"] for k in (1, 2)]
    targets = [g for g in [*genes, "non-targeting"] for _ in (1, 2)]
    rng = np.random.default_rng(seed)
    n = rna.n_obs
    counts = rng.poisson(0.3, (n, len(names))).astype(np.float32)
    own = np.array([names.index(f"{'NT' if t == 'non-targeting' else t}_{1 + i % 2}") for i, t in enumerate(truth)])
    counts[np.arange(n), own] = rng.integers(20, 60, n)
    status = np.full(n, "assigned", dtype=object)
    cells = rng.permutation(n)
    doublets, empties = cells[:n_multiplet], cells[n_multiplet : n_multiplet + n_unassigned]
    counts[doublets, (own[doublets] + 2) % len(names)] = counts[doublets, own[doublets]]  # a tie
    counts[empties] = 0
    counts[empties, own[empties]] = 3
    status[doublets], status[empties] = "multiplet", "unassigned"
    var = pd.DataFrame({"target_gene": targets}, index=names)
    gdo = ad.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame(index=rna.obs_names), var=var)
    return mudata({"rna": rna, "gdo": gdo}), truth, status, embeddings


@pytest.fixture(scope="module")
def trained():
    mdata, truth, status, embeddings = synthetic_mudata()
    PTRAG.setup_mudata(mdata, guide_mod="gdo", batch_key="gem_group")
    model = PTRAG(mdata, perturbation_embeddings=embeddings, **TINY)
    model.train(max_steps=3, batch_size=4)
    return model, mdata, truth, status, embeddings


def test_setup_mudata_labels_cells_and_drops_the_rest():
    mdata, truth, status, _ = synthetic_mudata()
    rna, gdo = mdata.mod["rna"], mdata.mod["gdo"]
    n = rna.n_obs
    PTRAG.setup_mudata(mdata, guide_mod="gdo")
    kept = status == "assigned"
    assert mdata.mod["rna"] is rna  # filtered in place, the same object
    assert rna.n_obs == kept.sum() == n - 21
    assert gdo.n_obs == n
    assert mdata.n_obs == n
    assert (rna.obs["gene"].astype(str).to_numpy() == truth[kept]).all()
    assert not {"multiplet", "unassigned"} & set(rna.obs["gene"].astype(str))
    assert (gdo.obs["guide_status"].astype(str).to_numpy() == status).all()
    assert "_scvi_uuid" in rna.uns  # registered


def test_model_on_mudata(trained, tmp_path):
    model, mdata, truth, status, _embeddings = trained
    rna = mdata.mod["rna"]
    assert model.adata is rna
    # unassigned cells and multiplets are no perturbation, and no control either
    assert set(model.training_perturbations_) <= set(truth) - {"non-targeting"}
    assert model.registry_["field_registries"]["perturbation"]["state_registry"]["n_control_cells"] == (
        (truth == "non-targeting") & (status == "assigned")
    ).sum()
    model.predict(mdata)  # counterfactual, written back into the RNA modality
    assert rna.layers["ptrag"].shape == rna.shape
    assert np.isfinite(rna.layers["ptrag"]).all()
    controls = (rna.obs["gene"] == "non-targeting").to_numpy()
    np.testing.assert_array_equal(rna.layers["ptrag"][controls], rna.X[controls])
    generated = model.predict(mdata, perturbations=["PGENE0001", "GENE0016+PGENE0001"])
    assert isinstance(generated, ad.AnnData)
    assert generated.n_obs == 2 * controls.sum()
    table = model.get_retrieval(["PGENE0001"], adata=mdata)
    assert set(table["query"]) == {"PGENE0001"}
    assert len(table) > 0
    # A copy of the MuData (not registered): the modality with the model's genes is used.
    with md.set_options(pull_on_update=False):
        other = mdata.copy()
    out = model.predict(other, inplace=False)
    assert out.shape == rna.shape
    # save / load with a MuData
    model.save(tmp_path / "model", overwrite=True)
    loaded = PTRAG.load(tmp_path / "model", adata=mdata)
    assert loaded.adata is rna
    with md.set_options(pull_on_update=False):
        mdata.write(tmp_path / "screen.h5mu")
        reread = md.read_h5mu(tmp_path / "screen.h5mu")
    fresh = PTRAG.load(tmp_path / "model", adata=reread)  # not registered here: the "rna" modality
    assert fresh.adata is reread.mod["rna"]
    np.testing.assert_allclose(fresh.predict(inplace=False), loaded.predict(inplace=False), atol=1e-5)


def test_resolver_passes_anndata_through_and_rejects_unclear_mudata(trained):
    model, mdata, *_ = trained
    rna = mdata.mod["rna"]
    assert model._resolve_adata(rna) is rna
    assert model._resolve_adata(None) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the twins share var names
        twins = mudata({"a": rna.copy(), "b": rna.copy()})
    with pytest.raises(ValueError, match=r"Several modalities of the MuData have the model's genes: \['a', 'b'\]"):
        model.predict(twins)
    unregistered, *_ = synthetic_mudata(seed=1)
    with pytest.raises(ValueError, match=r"Cannot tell which modality.*'rna' \(320 x 30\).*setup_mudata"):
        PTRAG(unregistered, perturbation_embeddings=trained[4])


def test_existing_column_is_not_overwritten_by_default():
    mdata, truth, status, _ = synthetic_mudata()
    mdata.mod["rna"].obs["gene"] = "something"
    with pytest.raises(ValueError, match=r"already has a column 'gene'.*overwrite=True"):
        PTRAG.setup_mudata(mdata, guide_mod="gdo")
    assert mdata.mod["rna"].n_obs == len(truth)  # nothing dropped
    PTRAG.setup_mudata(mdata, guide_mod="gdo", overwrite=True)
    assert (mdata.mod["rna"].obs["gene"].astype(str).to_numpy() == truth[status == "assigned"]).all()


def test_labels_from_an_existing_column():
    mdata, truth, status, _ = synthetic_mudata()
    rna = mdata.mod["rna"]
    labels = pd.Series(truth.copy(), index=rna.obs_names, dtype=object)
    labels[status == "multiplet"] = "multiplet"
    labels[status == "unassigned"] = None
    rna.obs["gene"] = pd.Categorical(labels)
    PTRAG.setup_mudata(mdata)  # guide_mod=None: labels as they are
    assert rna.n_obs == (status == "assigned").sum()
    assert list(rna.obs["gene"].cat.categories) == sorted(set(truth))  # unused "multiplet" dropped


def test_excluded_cells_raise():
    mdata, *_ = synthetic_mudata()
    with pytest.raises(ValueError, match=r"21 cell\(s\).*9 unassigned, 12 multiplets.*excluded_cells='drop'"):
        PTRAG.setup_mudata(mdata, guide_mod="gdo", excluded_cells="raise")
    assert "gene" not in mdata.mod["rna"].obs
    clean, *_ = synthetic_mudata(n_multiplet=0, n_unassigned=0)
    PTRAG.setup_mudata(clean, guide_mod="gdo", excluded_cells="raise")
    assert clean.mod["rna"].n_obs == 320


def test_cell_type_from_global_obs_and_rna_cells_without_guides():
    mdata, _truth, status, _ = synthetic_mudata()
    rna = mdata.mod["rna"]
    line = pd.Series(rna.obs["cell_line"].astype(str).to_numpy(), index=rna.obs_names)
    del rna.obs["cell_line"]
    mdata = mudata({"rna": rna, "gdo": mdata.mod["gdo"][:-5].copy()})  # 5 RNA cells lack guide data
    mdata.obs["line"] = line.reindex(mdata.obs_names).to_numpy()
    PTRAG.setup_mudata(mdata, guide_mod="gdo", cell_type_key="line")
    expected = (status == "assigned") & (np.arange(len(status)) < len(status) - 5)
    assert rna.n_obs == expected.sum()
    assert rna.obs["line"].tolist() == line.to_numpy()[expected].tolist()  # copied into the RNA obs


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rna_mod": "RNA"}, KeyError, r"`rna_mod='RNA'` is not a modality.*'rna' \(320 x 30\), 'gdo' \(320 x 14\)"),
        ({"guide_mod": "guides"}, KeyError, r"`guide_mod='guides'` is not a modality"),
        ({"guide_mod": "rna"}, ValueError, "are the same modality"),
        ({"cell_type_key": "celltype"}, KeyError, r"`cell_type_key='celltype'` is a column neither of `mdata.mod\['rna'\].obs`"),
        ({"batch_key": "batch"}, KeyError, r"`batch_key='batch'`"),
        ({"layer": "counts"}, KeyError, r"`layer='counts'` is not in `adata.layers`"),
        ({"modalities": {"rna_layer": "rna"}}, TypeError, "instead of scvi-tools' `modalities=`"),
        ({"assign_kwargs": {"copy": True}}, ValueError, r"must not set \['copy'\]"),
        ({"assign_kwargs": {"control_group": "NT"}}, ValueError, "differs from `control_group"),
        ({"assign_kwargs": {"control_targets": ["NT"]}, "control_group": "ctrl"}, ValueError, "No control cells"),
        ({"control_group": "ctrl", "guide_mod": None}, KeyError, r"`perturbation_key='gene'` is a column neither"),
        ({"excluded_cells": "keep"}, ValueError, "`excluded_cells` must be 'drop' or 'raise'"),
    ],
)
def test_errors_leave_the_rna_modality_alone(kwargs, error, match):
    mdata, truth, *_ = synthetic_mudata()
    kwargs = {"guide_mod": "gdo", **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            PTRAG.setup_mudata(mdata, **kwargs)
    rna = mdata.mod["rna"]
    assert rna.n_obs == len(truth)
    assert "gene" not in rna.obs
    assert "_scvi_uuid" not in rna.uns


def test_rejects_anndata():
    rna = ptrag_sc.datasets.synthetic(n_cell_types=1, n_perturbations=2, n_genes=10, n_cells_per_perturbation=5, n_control_cells=5)
    with pytest.raises(TypeError, match=r"must be a MuData, got AnnData\. For an AnnData use `PTRAG.setup_anndata`"):
        PTRAG.setup_mudata(rna)


def test_docstring_example():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(_mudata, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.skipif(not PAPALEXI.exists(), reason="Papalexi 2021 test data not available")
def test_papalexi_eccite_seq_end_to_end():
    import scanpy as sc

    raw = ad.read_h5ad(PAPALEXI)
    rng = np.random.default_rng(0)
    raw = raw[np.sort(rng.choice(raw.n_obs, 3000, replace=False))].copy()
    rna = ad.AnnData(raw.X.copy(), obs=raw.obs[["bio_rep", "cell_line"]].copy(), var=raw.var.copy())
    sc.pp.normalize_total(rna)
    sc.pp.log1p(rna)
    torch.set_num_threads(1)  # numba, in normalize_total, resets it
    var = pd.DataFrame({"target_gene": np.asarray(raw.uns["grna_target"]).astype(str)}, index=np.asarray(raw.uns["grna_ids"]).astype(str))
    gdo = ad.AnnData(raw.obsm["grna_counts"].copy(), obs=pd.DataFrame(index=raw.obs_names), var=var)
    mdata = mudata({"rna": rna, "gdo": gdo})

    PTRAG.setup_mudata(mdata, guide_mod="gdo", cell_type_key="cell_line", batch_key="bio_rep")
    confident = ((raw.obs["grna_top_umi"] >= 5) & (raw.obs["grna_top_umi"] >= 3 * raw.obs["grna_second_umi"])).to_numpy()
    assert rna.n_obs == confident.sum()
    assert mdata.mod["gdo"].n_obs == 3000
    assert (rna.obs["gene"].astype(str).to_numpy() == raw.obs["target_top"].astype(str).to_numpy()[confident]).all()
    status = mdata.mod["gdo"].obs["guide_status"].astype(str).value_counts()
    assert status["multiplet"] == 3000 - confident.sum()
    assert status.get("unassigned", 0) == 0

    targets = sorted(set(rna.obs["gene"].astype(str)) - {"non-targeting"})
    embeddings = pd.DataFrame(rng.normal(size=(len(targets), 8)), index=targets)  # plumbing, not accuracy
    model = PTRAG(mdata, perturbation_embeddings=embeddings, **TINY)
    model.train(max_steps=5)
    model.predict(mdata)
    layer = mdata.mod["rna"].layers["ptrag"]
    assert layer.shape == (confident.sum(), 299)
    assert np.isfinite(layer).all()
    assert (layer >= 0).all()
    generated = model.predict(mdata, perturbations=["STAT1", "IFNGR1"])
    assert generated.n_obs == 2 * (rna.obs["gene"] == "non-targeting").sum()
    assert set(model.get_retrieval(["STAT1"], adata=mdata)["cell_type"]) == {"THP-1"}
