"""Real datasets: bundled perturbench subset, Replogle–Nadig reader, few-shot splits, other screens."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import SHARED_DATA

from ptrag_sc import pp
from ptrag_sc.datasets import perturbench_devel, read_replogle_nadig

DATA = SHARED_DATA
PAPALEXI = DATA / "papalexi2021_thp1_sceptredata" / "papalexi2021_thp1_lowmoi_299genes.h5ad"
DATLINGER = DATA / "datlinger2017_jurkat_scperturb_testdata" / "datlinger2017_jurkat_subset.h5ad"
SHARED_GBM = ["MAP2K3", "MAP2K6", "MAP3K21", "MAP4K3", "MAP4K5", "MAPK1", "PLK4", "SGK1", "TGFBR2"]


@pytest.fixture(scope="module")
def devel():
    return perturbench_devel()


# ------------------------------------------------------------------------------------------
# perturbench_devel


def test_perturbench_devel_schema(devel):
    assert devel.shape == (5961, 500)
    original = {
        "ncounts",
        "ngenes",
        "condition",
        "perturbation",
        "perturbation_type",
        "dataset",
        "cell_type",
        "treatment",
        "dose",
        "perturbation_raw",
        "condition_cell_type",
    }
    assert original <= set(devel.obs.columns)
    assert devel.obs.columns[:2].tolist() == ["gene", "cell_line"]
    obs = devel.obs
    assert (obs["cell_line"].astype(str) == obs["cell_type"].astype(str)).all()
    assert obs["cell_line"].value_counts().to_dict() == {
        "k562": 3375,
        "T98G": 871,
        "U87MG": 865,
        "A172": 850,
    }
    # control renamed, original kept
    ctrl = obs["gene"] == "non-targeting"
    assert ctrl.sum() == 400
    assert (obs.loc[ctrl, "condition"] == "control").all()
    assert "control" not in set(obs["gene"])
    # the old symbol KIAA1804 is MAP3K21 in `gene`, consistently with the embedding table
    assert set(obs.loc[obs["perturbation_raw"] == "KIAA1804", "gene"]) == {"MAP3K21"}
    assert "KIAA1804" not in set(obs["gene"])
    for line in ("k562", "A172", "T98G", "U87MG"):
        assert set(SHARED_GBM) <= set(obs.loc[obs["cell_line"] == line, "gene"])
    combos = sorted(g for g in obs["gene"].unique() if "+" in g)
    assert len(combos) == 15
    assert "MAP2K3+MAP2K6" in combos


def test_perturbench_devel_embeddings_cover_every_perturbed_gene(devel):
    emb = devel.uns["gene_embeddings"]
    genes = {
        g
        for label in devel.obs["gene"].unique()
        if label != "non-targeting"
        for g in label.split("+")
    }
    assert len(genes) == 31
    assert set(emb.index) == genes
    assert emb.shape == (31, 384)
    assert (emb.dtypes == np.float32).all()
    np.testing.assert_allclose(np.linalg.norm(emb.to_numpy(), axis=1), 1.0, atol=1e-5)
    src = devel.uns["gene_embedding_source"]
    assert set(src.index) == genes
    assert set(src["source"]) <= {"summary", "annotation"}
    assert (src["source"] == "summary").all()  # all 31 have a GenePT NCBI+UniProt summary
    assert src.loc["MAP3K21", "matched"] == "MAP3K21"
    assert set(src["model"]) == {"all-MiniLM-L6-v2"}
    # read_gene_embeddings accepts the dataset directly
    np.testing.assert_array_equal(pp.read_gene_embeddings(devel).to_numpy(), emb.to_numpy())


def test_perturbench_devel_subsets_and_roundtrip(tmp_path):
    gbm = perturbench_devel(subset="glioblastoma")
    assert gbm.n_obs == 2586
    assert set(gbm.obs["cell_line"]) == {"A172", "T98G", "U87MG"}
    assert sorted(gbm.uns["gene_embeddings"].index) == SHARED_GBM
    assert gbm.obs["cell_line"].cat.categories.tolist() == ["A172", "T98G", "U87MG"]
    assert not gbm.is_view
    k562 = perturbench_devel(subset="k562")
    assert k562.n_obs == 3375
    assert k562.uns["gene_embeddings"].shape == (31, 384)
    with pytest.raises(
        ValueError,
        match=r"Unknown subset 'hela'; use None, 'glioblastoma' \(or 'gbm'\) or 'k562'\.",
    ):
        perturbench_devel(subset="hela")
    path = tmp_path / "gbm.h5ad"
    gbm.write_h5ad(path)
    back = ad.read_h5ad(path)
    pd.testing.assert_frame_equal(back.uns["gene_embeddings"], gbm.uns["gene_embeddings"])
    assert back.uns["dataset"]["control_group"] == "non-targeting"


# ------------------------------------------------------------------------------------------
# few_shot_split


def test_few_shot_split_explicit_lists(devel):
    adata = perturbench_devel(subset="glioblastoma")
    assert (
        pp.few_shot_split(adata, held_out="U87MG", val=["PLK4"], test=["MAPK1", "KIAA1804"])
        is None
    )
    obs = adata.obs
    assert obs["split"].cat.categories.tolist() == ["train", "val", "test"]
    held = obs["cell_line"] == "U87MG"
    assert set(obs.loc[~held, "split"]) == {"train"}
    assert set(obs.loc[held & obs["gene"].isin(["MAPK1", "MAP3K21"]), "split"]) == {"test"}
    assert set(obs.loc[held & (obs["gene"] == "PLK4"), "split"]) == {"val"}
    assert set(obs.loc[held & (obs["gene"] == "non-targeting"), "split"]) == {"train"}
    assert set(obs.loc[held & (obs["gene"] == "SGK1"), "split"]) == {"train"}
    params = adata.uns["split_params"]
    assert params["test"] == ["MAPK1", "MAP3K21"]
    assert params["held_out"] == ["U87MG"]
    # copy=True leaves the input untouched
    fresh = perturbench_devel(subset="glioblastoma")
    out = pp.few_shot_split(
        fresh, held_out=["A172", "T98G"], test=["SGK1"], val=[], key_added="fold", copy=True
    )
    assert "fold" not in fresh.obs
    assert "fold" in out.obs
    assert set(out.obs.loc[out.obs["gene"] == "SGK1", "fold"]) == {"test", "train"}
    assert (out.obs["fold"] == "val").sum() == 0


def test_few_shot_split_random_is_seeded():
    adata = perturbench_devel(subset="glioblastoma")
    a = pp.few_shot_split(
        adata, held_out="A172", val_fraction=0.2, test_fraction=0.3, seed=1, copy=True
    )
    b = pp.few_shot_split(
        adata, held_out="A172", val_fraction=0.2, test_fraction=0.3, seed=1, copy=True
    )
    assert a.uns["split_params"] == b.uns["split_params"]
    p = a.uns["split_params"]
    assert len(p["val"]) == 2
    assert len(p["test"]) == 3
    assert not set(p["val"]) & set(p["test"])
    assert set(p["val"]) | set(p["test"]) <= set(SHARED_GBM)
    c = pp.few_shot_split(adata, held_out="A172", test_fraction=0.01, val_fraction=0.0, copy=True)
    assert c.uns["split_params"]["val"] == []
    assert len(c.uns["split_params"]["test"]) == 1
    # only test given: val drawn from the rest
    d = pp.few_shot_split(adata, held_out="A172", test=["SGK1"], val_fraction=0.12, copy=True)
    assert d.uns["split_params"]["test"] == ["SGK1"]
    assert len(d.uns["split_params"]["val"]) == 1
    assert d.uns["split_params"]["val"] != ["SGK1"]


def test_few_shot_split_errors_and_warnings():
    adata = perturbench_devel(subset="glioblastoma")
    with pytest.raises(
        KeyError,
        match=r"Column 'cell' not found in adata.obs; available columns: \['gene', 'cell_line'",
    ):
        pp.few_shot_split(adata, held_out="A172", cell_type_key="cell")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Held-out cell type(s) ['HeLa'] not found in adata.obs['cell_line']; available: ['A172', 'T98G', 'U87MG']."
        ),
    ):
        pp.few_shot_split(adata, held_out="HeLa")
    with pytest.raises(
        ValueError, match="The control label 'non-targeting' cannot be held out as `test`"
    ):
        pp.few_shot_split(adata, held_out="A172", test=["non-targeting"])
    with pytest.raises(ValueError, match=r"Perturbations in both `val` and `test`: SGK1\."):
        pp.few_shot_split(adata, held_out="A172", val=["SGK1"], test=["SGK1", "PLK4"])
    with pytest.raises(
        ValueError, match="Pass either `preset` or explicit `val`/`test` lists, not both"
    ):
        pp.few_shot_split(adata, held_out="A172", preset="replogle_nadig", test=["SGK1"])
    with pytest.raises(
        ValueError, match=r"Unknown few-shot preset 'norman'; available: \['replogle_nadig'\]"
    ):
        pp.few_shot_split(adata, held_out="A172", preset="norman")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "None of the 2 `test` perturbations is measured in the held-out cell type(s) ['A172']: KRAS, TP53."
        ),
    ):
        pp.few_shot_split(adata, held_out="A172", test=["KRAS", "TP53"])
    with pytest.raises(ValueError, match=r"`val_fraction` must be in \[0, 1\), got 1.5"):
        pp.few_shot_split(adata, held_out="A172", val_fraction=1.5)
    with pytest.raises(ValueError, match=r"`val_fraction` \+ `test_fraction` must be below 1"):
        pp.few_shot_split(adata, held_out="A172", val_fraction=0.5, test_fraction=0.5)
    with pytest.warns(
        UserWarning,
        match=re.escape(
            "1 of the 2 `test` perturbations are not measured in the held-out cell type(s) ['A172'] and are ignored: KRAS."
        ),
    ):
        pp.few_shot_split(adata, held_out="A172", test=["KRAS", "SGK1"], val=[])
    with pytest.warns(UserWarning, match="the setting is zero-shot, not few-shot"):
        pp.few_shot_split(adata, held_out="A172", test=SHARED_GBM, val=[])
    no_ctrl = adata[
        ~((adata.obs["cell_line"] == "A172") & (adata.obs["gene"] == "non-targeting"))
    ].copy()
    with pytest.raises(
        ValueError,
        match=r"Held-out cell type 'A172' has no control cells \(gene == 'non-targeting'\)",
    ):
        pp.few_shot_split(no_ctrl, held_out="A172")
    nan = adata.copy()
    nan.obs["gene"] = nan.obs["gene"].astype(object)
    nan.obs.iloc[0, 0] = None
    with pytest.raises(ValueError, match=r"adata.obs\['gene'\] has 1 missing values"):
        pp.few_shot_split(nan, held_out="A172")


# ------------------------------------------------------------------------------------------
# Replogle–Nadig reader (on a small file with the same schema)


def _replogle_like(
    tmp_path: Path,
    *,
    sparse: bool = False,
    drop: str | None = None,
    uns_names: bool = False,
    hvg_mask: bool = True,
    control: str = "non-targeting",
) -> Path:
    rng = np.random.default_rng(0)
    lists = pp.few_shot_preset("replogle_nadig")
    perts = [control, *lists["val"][:2], *lists["test"][:3], "AARS", "TRAIN1"]
    lines = ["k562", "rpe1", "hepg2", "jurkat"]
    cells = [(p, c) for c in lines for p in perts for _ in range(3)]
    n, n_genes, n_hvg = len(cells), 12, 5
    obs = pd.DataFrame(
        {
            "gene": [p for p, _ in cells],
            "cell_line": [c for _, c in cells],
            "gem_group": rng.integers(1, 4, size=n).astype(str),
        },
        index=[f"cell{i}" for i in range(n)],
    ).astype("category")
    if drop:
        obs = obs.drop(columns=drop)
    X = rng.poisson(2.0, size=(n, n_genes)).astype(np.float32)
    var = pd.DataFrame(index=[f"GENE{i}" for i in range(n_genes)])
    mask = np.zeros(n_genes, dtype=bool)
    mask[[1, 3, 4, 8, 10]] = True
    if hvg_mask:
        var["highly_variable"] = mask
    adata = ad.AnnData(sp.csr_matrix(X), obs=obs, var=var)
    hvg = np.log1p(X[:, mask])
    adata.obsm["X_hvg"] = sp.csr_matrix(hvg) if sparse else hvg
    if uns_names:
        adata.uns["hvg_names"] = np.array([f"NAMED{i}" for i in range(n_hvg)])
    path = (
        tmp_path / f"replogle_{int(sparse)}_{drop}_{int(uns_names)}_{int(hvg_mask)}_{control}.h5ad"
    )
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("backed", [False, "r"])
def test_read_replogle_nadig(tmp_path, sparse, backed):
    path = _replogle_like(tmp_path, sparse=sparse)
    adata = read_replogle_nadig(path, backed=backed)
    full = ad.read_h5ad(path)
    assert adata.shape == (full.n_obs, 5)
    assert adata.var_names.tolist() == ["GENE1", "GENE3", "GENE4", "GENE8", "GENE10"]
    assert adata.uns["replogle_nadig"]["var_names_source"] == "var['highly_variable']"
    pd.testing.assert_frame_equal(adata.obs, full.obs)
    expected = full.obsm["X_hvg"].toarray() if sparse else full.obsm["X_hvg"]
    if backed:
        assert isinstance(adata.X, h5py.Dataset) != sparse
        sub = adata[[0, 5, 9]].to_memory()
        got = sub.X.toarray() if sp.issparse(sub.X) else sub.X
        np.testing.assert_array_equal(got, expected[[0, 5, 9]])
        pp.few_shot_split(adata, held_out="k562", test=["AARS"], val=[])
        assert (adata.obs["split"] == "test").sum() == 3
        with pytest.raises(ValueError, match=r"`copy=True` cannot copy this AnnData"):
            pp.few_shot_split(adata, held_out="k562", test=["AARS"], val=[], copy=True)
        (adata.X if isinstance(adata.X, h5py.Dataset) else adata.X.group).file.close()
    else:
        got = adata.X.toarray() if sparse else adata.X
        np.testing.assert_array_equal(got, expected)


def test_read_replogle_nadig_var_name_sources(tmp_path):
    named = read_replogle_nadig(_replogle_like(tmp_path, uns_names=True))
    assert named.var_names.tolist() == [f"NAMED{i}" for i in range(5)]
    assert named.uns["replogle_nadig"]["var_names_source"] == "uns['hvg_names']"
    path = _replogle_like(tmp_path, hvg_mask=False)
    with pytest.warns(
        UserWarning,
        match=r"no names found for the 5 columns of obsm\['X_hvg'\] .* Pass `var_names=` to set them",
    ):
        gen = read_replogle_nadig(path)
    assert gen.var_names.tolist() == ["hvg_0000", "hvg_0001", "hvg_0002", "hvg_0003", "hvg_0004"]
    arg = read_replogle_nadig(path, var_names=list("ABCDE"))
    assert arg.var_names.tolist() == list("ABCDE")
    assert arg.uns["replogle_nadig"]["var_names_source"] == "argument"
    with pytest.raises(
        ValueError, match=r"`var_names` has 2 names but obsm\['X_hvg'\] has 5 columns"
    ):
        read_replogle_nadig(path, var_names=["A", "B"])


def test_read_replogle_nadig_schema_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Replogle–Nadig file not found"):
        read_replogle_nadig(tmp_path / "nope.h5ad")
    with pytest.raises(
        KeyError,
        match=re.escape(
            "obs column(s) ['gem_group'] missing (Replogle–Nadig schema needs ['gene', 'cell_line', 'gem_group']); available obs columns: ['gene', 'cell_line']."
        ),
    ):
        read_replogle_nadig(_replogle_like(tmp_path, drop="gem_group"))
    path = _replogle_like(tmp_path)
    with pytest.raises(
        KeyError,
        match=re.escape(
            "obsm['X_pca'] not found (the 2,000-HVG expression matrix); available obsm keys: ['X_hvg']."
        ),
    ):
        read_replogle_nadig(path, hvg_key="X_pca")
    with pytest.raises(
        ValueError,
        match=r"no control cells labelled 'non-targeting' in obs\['gene'\] \(most frequent labels: ",
    ):
        read_replogle_nadig(_replogle_like(tmp_path, control="control"))
    with pytest.raises(
        ValueError, match=re.escape("`backed` must be False, True or 'r', got 'r+'.")
    ):
        read_replogle_nadig(path, backed="r+")


def test_replogle_preset_split(tmp_path):
    adata = read_replogle_nadig(_replogle_like(tmp_path))
    lists = pp.few_shot_preset("replogle_nadig")
    assert len(lists["val"]) == 104
    assert len(lists["test"]) == 624
    assert not set(lists["val"]) & set(lists["test"])
    with pytest.warns(UserWarning, match="perturbations are not measured") as rec:
        pp.few_shot_split(adata, held_out="hepg2", preset="replogle_nadig")
    messages = [str(w.message) for w in rec]
    assert len(messages) == 2
    assert messages[0].startswith(
        "102 of the 104 `val` perturbations are not measured in the held-out cell type(s) ['hepg2'] and are ignored: "
    )
    assert messages[1].startswith("621 of the 624 `test` perturbations are not measured")
    assert messages[1].endswith("... (601 more).")
    obs = adata.obs
    held = obs["cell_line"] == "hepg2"
    assert set(obs.loc[held & obs["gene"].isin(lists["test"][:3]), "split"]) == {"test"}
    assert set(obs.loc[held & obs["gene"].isin(lists["val"][:2]), "split"]) == {"val"}
    assert set(obs.loc[held & obs["gene"].isin(["non-targeting", "AARS", "TRAIN1"]), "split"]) == {
        "train"
    }
    assert set(obs.loc[~held, "split"]) == {"train"}
    assert adata.uns["split_params"]["preset"] == "replogle_nadig"


# ------------------------------------------------------------------------------------------
# other real screens: documented preprocessing gives the package schema


def _preprocess(adata: ad.AnnData) -> ad.AnnData:
    """The documented recipe: keep counts in a layer, normalise to the median depth, log1p."""
    import scanpy as sc

    out = adata.copy()
    out.layers["counts"] = out.X.copy()
    sc.pp.normalize_total(out)
    sc.pp.log1p(out)
    return out


def _check_schema(adata: ad.AnnData, counts) -> None:
    assert {"gene", "cell_line"} <= set(adata.obs.columns)
    assert (adata.obs["gene"] == "non-targeting").sum() > 0
    assert not adata.obs["gene"].isna().any()
    assert (adata.layers["counts"] != counts).nnz == 0
    assert np.allclose(adata.layers["counts"].data, np.round(adata.layers["counts"].data))
    depth = np.asarray(counts.sum(axis=1)).ravel()
    target = np.median(depth[depth > 0])
    row = np.asarray(np.expm1(adata.X).sum(axis=1)).ravel()
    np.testing.assert_allclose(row[depth > 0], target, rtol=1e-3)
    assert "log1p" in adata.uns


@pytest.mark.skipif(not PAPALEXI.exists(), reason="Papalexi 2021 test data not available")
def test_papalexi_thp1_preprocessing_schema():
    raw = ad.read_h5ad(PAPALEXI)
    confident = (raw.obs["grna_top_umi"] >= 5) & (
        raw.obs["grna_top_umi"] >= 3 * raw.obs["grna_second_umi"]
    )
    raw = raw[confident].copy()
    adata = _preprocess(raw)
    adata.obs["gene"] = adata.obs["target_top"].astype(str)  # control already "non-targeting"
    adata.obs["cell_line"] = adata.obs["cell_line"].astype(str)  # "THP-1"
    _check_schema(adata, raw.X)
    targets = sorted(set(adata.obs["gene"]) - {"non-targeting"})
    assert len(targets) == 25
    assert "MARCH8" in targets
    texts = pp.gene_texts(targets, warn=False)
    assert len(texts) == 25  # every target gets at least an annotation text
    assert texts.loc["MARCH8", "matched"] == "MARCHF8"


@pytest.mark.skipif(not DATLINGER.exists(), reason="Datlinger Jurkat test data not available")
def test_datlinger_jurkat_preprocessing_schema():
    raw = ad.read_h5ad(DATLINGER)
    adata = _preprocess(raw)
    adata.obs["gene"] = adata.obs["target_gene"].astype(str).replace({"control": "non-targeting"})
    # one cell line in two conditions: the condition is the "cell type" context
    adata.obs["cell_line"] = "Jurkat_" + adata.obs["perturbation_2"].astype(str)
    _check_schema(adata, raw.X)
    assert set(adata.obs["cell_line"]) == {"Jurkat_stimulated", "Jurkat_unstimulated"}
    targets = sorted(set(adata.obs["gene"]) - {"non-targeting"})
    assert len(targets) == 20
    pp.few_shot_split(adata, held_out="Jurkat_stimulated", test=["ZAP70", "LCK"], val=["LAT"])
    held = adata.obs["cell_line"] == "Jurkat_stimulated"
    assert set(adata.obs.loc[held & adata.obs["gene"].isin(["ZAP70", "LCK"]), "split"]) == {"test"}
    assert set(adata.obs.loc[held & (adata.obs["gene"] == "non-targeting"), "split"]) == {"train"}
    assert len(pp.gene_texts(targets, warn=False)) == 20
