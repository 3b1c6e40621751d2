"""Out-of-core data: backed AnnData in training and prediction, lazy views, chunked outputs."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import scvi
import torch
from conftest import SMALL_MODEL, make_small_adata

import ptrag_sc
from ptrag_sc.data import _matrix, expression_matrix
from ptrag_sc.data._matrix import (
    BackedReader,
    ExpressionMatrix,
    RowSubset,
    column_max,
    group_means,
    read_rows,
)
from ptrag_sc.model import _predict


def _fit(adata):
    scvi.settings.seed = 0
    ptrag_sc.PTRAG.setup_anndata(adata, batch_key="gem_group")
    model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], gene_annotations=None, **SMALL_MODEL)
    model.train(max_steps=6, check_val_every_n_steps=3)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same data in memory and opened ``backed="r"``, each with a model trained the same way."""
    path = tmp_path_factory.mktemp("backed") / "cells.h5ad"
    make_small_adata(sparse=True, n_batches=2).write_h5ad(path)
    memory = ad.read_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    return memory, _fit(memory), backed, _fit(backed), path


def test_backed_training_and_prediction_equal_in_memory(pair):
    memory, model_memory, backed, model_backed, _ = pair
    assert backed.isbacked
    assert model_backed.state.data(backed).expression.backed
    for a, b in zip(model_memory.module.state_dict().values(), model_backed.module.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    np.testing.assert_array_equal(model_memory.predict(memory, inplace=False), model_backed.predict(backed, inplace=False))


def test_sparse_layer_and_output_file_equal_the_dense_layer(pair, tmp_path):
    _, _, backed, model, _ = pair
    dense = model.predict(backed, inplace=False)
    layer = model.predict(backed, inplace=False, sparse=True)
    assert sp.issparse(layer)
    assert layer.format == "csr"
    np.testing.assert_array_equal(layer.toarray(), dense)
    out = model.predict(backed, output=tmp_path / "pred.h5ad")
    assert out.isbacked
    assert out.shape == backed.shape
    np.testing.assert_array_equal(out.X[:], dense)
    predicted = out.obs["ptrag_predicted"].to_numpy()
    np.testing.assert_array_equal(predicted, ~model.state.data(backed).is_control)
    assert list(out.obs_names) == list(backed.obs_names)
    assert out.uns["ptrag"]["mode"] == "counterfactual"
    out.file.close()


def test_chunked_outputs_with_indices_and_other_gene_order(pair, tmp_path):
    """Genes in another order plus one the model lacks: predicted genes move, the extra keeps its values."""
    memory, model, _, _, _ = pair
    order = np.random.default_rng(0).permutation(memory.n_vars)
    shuffled = memory[:, order].copy()
    shuffled.var_names = shuffled.var_names.astype(str)
    extra = ad.AnnData(X=sp.csr_matrix(np.full((memory.n_obs, 1), 0.5, np.float32)), obs=shuffled.obs[[]], var={"gene_ids": ["EXTRA"]})
    extra.var_names = ["EXTRA"]
    wide = ad.concat([shuffled, extra], axis=1, merge="first")
    wide.obs = shuffled.obs.copy()
    path = tmp_path / "wide.h5ad"
    wide.write_h5ad(path)
    wide_backed = ad.read_h5ad(path, backed="r")
    indices = np.arange(0, memory.n_obs, 3)
    dense = model.predict(wide, indices=indices, inplace=False)
    np.testing.assert_array_equal(dense[:, -1], 0.5)
    sparse_layer = model.predict(wide_backed, indices=indices, inplace=False, sparse=True)
    np.testing.assert_array_equal(sparse_layer.toarray(), dense)
    out = model.predict(wide_backed, indices=indices, output=tmp_path / "wide_pred.h5ad")
    np.testing.assert_array_equal(out.X[:], dense)
    out.file.close()
    # The predicted genes equal those of a prediction on the data in the model's gene order.
    reference = model.predict(memory, indices=indices, inplace=False)
    np.testing.assert_array_equal(dense[:, : memory.n_vars][:, np.argsort(order)], reference)


def test_output_file_is_not_overwritten_and_failures_leave_none(pair, tmp_path, monkeypatch):
    _, _, backed, model, path = pair
    target = tmp_path / "pred.h5ad"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.predict(backed, output=target)
    assert target.read_text() == "keep me"
    with pytest.raises(ValueError, match="counterfactual"):
        model.predict(backed, perturbations=[model.training_perturbations_[0]], output=tmp_path / "x.h5ad")
    with pytest.raises(ValueError, match="is a folder"):
        model.predict(backed, output=tmp_path, overwrite=True)
    with pytest.raises(ValueError, match="the file the AnnData is read from"):
        model.predict(backed, output=path, overwrite=True)
    link = tmp_path / "link.h5ad"
    link.symlink_to(target)
    model.predict(backed, output=link, overwrite=True)  # the link is replaced, never written through
    assert target.read_text() == "keep me"
    assert not link.is_symlink()

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(_predict, "generate", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        model.predict(backed, output=tmp_path / "failed.h5ad")
    with pytest.raises(RuntimeError, match="interrupted"):
        model.predict(backed, output=target, overwrite=True)  # a failed overwrite keeps the old file
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.h5ad", "pred.h5ad"]


def test_obs_columns_h5ad_cannot_store_are_refused_before_writing(pair, tmp_path):
    memory, model, _, _, _ = pair
    adata = memory.copy()
    mixed = np.array(["a"] * adata.n_obs, dtype=object)
    mixed[:3] = 7
    adata.obs["note"] = mixed
    with pytest.raises(ValueError, match=r"`adata.obs\['note'\]` cannot be written.*\['int', 'str'\].*astype\(str\)"):
        model.predict(adata, output=tmp_path / "pred.h5ad")
    assert list(tmp_path.iterdir()) == []


def test_views_of_backed_data_are_read_lazily(pair):
    memory, model, backed, _, _ = pair
    rows = np.arange(backed.n_obs)[::-2]  # reversed: rows out of file order
    view = backed[rows]
    assert isinstance(expression_matrix(view, None), RowSubset)
    np.testing.assert_array_equal(model.predict(view, inplace=False), model.predict(memory[rows].copy(), inplace=False))
    controls = backed[(backed.obs["gene"] == "non-targeting").to_numpy()]
    generated = model.predict(controls, perturbations=[model.training_perturbations_[0]])
    reference = model.predict(memory[(memory.obs["gene"] == "non-targeting").to_numpy()].copy(), perturbations=[model.training_perturbations_[0]])
    np.testing.assert_array_equal(generated.X, reference.X)


@pytest.mark.filterwarnings("ignore:Writing zarr v2 data:UserWarning")
def test_zarr_backed_sparse_x(pair, tmp_path):
    """An AnnData whose X is a zarr-backed CSR dataset (anndata's lazy sparse access) trains and predicts."""
    zarr = pytest.importorskip("zarr")
    memory, model_memory, _, _, _ = pair
    store = tmp_path / "cells.zarr"
    memory.write_zarr(store)
    group = zarr.open(store, mode="r")
    lazy = ad.AnnData(X=ad.io.sparse_dataset(group["X"]), obs=ad.io.read_elem(group["obs"]), var=ad.io.read_elem(group["var"]), uns=ad.io.read_elem(group["uns"]))
    model = _fit(lazy)
    assert model.state.data(lazy).expression.backed
    np.testing.assert_array_equal(model.predict(lazy, inplace=False), model_memory.predict(memory, inplace=False))


@pytest.mark.parametrize("dense", [False, True])
def test_backed_reads_and_streamed_statistics(tmp_path, dense, monkeypatch):
    rng = np.random.default_rng(0)
    X = sp.random(3000, 40, density=0.3, format="lil", dtype=np.float32, random_state=0)
    X[100:160] = 0  # empty rows
    X = X.tocsr()
    path = tmp_path / "m.h5ad"
    ad.AnnData(X=X.toarray() if dense else X).write_h5ad(path)
    disk = ad.read_h5ad(path, backed="r").X
    reader = BackedReader(disk)
    for rows in (rng.integers(0, 3000, 500), np.arange(90, 170), np.array([2999, 0, 0, 5]), np.zeros(0, int)):
        np.testing.assert_array_equal(read_rows(disk, rows), X[rows].toarray())
    assert reader.sparse is not dense
    np.testing.assert_array_equal(reader.read(np.arange(3000)), X.toarray())
    subset = RowSubset(disk, np.arange(3000)[::-7], np.array([3, 1, 2]))
    np.testing.assert_array_equal(read_rows(subset, np.array([4, 0, 4])), X[np.arange(3000)[::-7][[4, 0, 4]]][:, [3, 1, 2]].toarray())
    codes = np.where(rng.random(3000) < 0.2, -1, rng.integers(0, 7, 3000))
    codes[:1000] = -1  # whole chunks without grouped rows
    np.testing.assert_allclose(group_means(disk, codes, 8, chunk_rows=256), group_means(X, codes, 8), rtol=1e-12)
    mask = codes == 3
    np.testing.assert_array_equal(column_max(disk, mask, chunk_rows=256), X[mask].max(axis=0).toarray().ravel())
    # Cached rows (controls) come from memory, the others from disk; both equal the source.
    cache = rng.random(3000) < 0.1
    asked = rng.integers(0, 3000, (7, 9))
    for limit in (_matrix.CACHE_LIMIT, 100):  # the second is too small: nothing is cached
        monkeypatch.setattr(_matrix, "CACHE_LIMIT", limit)
        expression = ExpressionMatrix(disk, np.array([5, 0, 7]), cache=cache)
        np.testing.assert_array_equal(expression.rows(asked).numpy(), X[asked.ravel()][:, [5, 0, 7]].toarray().reshape(7, 9, 3))
        assert (expression._cache is not None) is (limit > 100)


def test_large_dense_layers_are_committed_zeros_that_behave_as_arrays(pair, tmp_path, monkeypatch):
    import copy
    import mmap
    import pickle

    from ptrag_sc.data import _writers

    zeros = _writers.committed_zeros((300, 7), np.float32)
    assert isinstance(zeros, np.ndarray)
    assert (zeros.shape, zeros.dtype) == ((300, 7), np.float32)
    assert not zeros.any()
    assert zeros.flags.writeable
    assert zeros.flags.c_contiguous
    # Every layer takes the committed allocation in this test (where Linux offers it).
    monkeypatch.setattr(_writers, "_COMMIT_AT_ONCE_BYTES", 0)
    mapped = _writers.committed_zeros((300, 7), np.float32)
    assert not mapped.any()
    assert mapped.flags.writeable
    mapped[:] = 2.5
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(mapped)), mapped)
    np.testing.assert_array_equal(copy.deepcopy(mapped), mapped)
    memory, model, _, _, _ = pair
    reference = model.predict(memory, inplace=False)
    adata = memory.copy()
    model.predict(adata, key_added="predicted")
    layer = adata.layers["predicted"]
    assert isinstance(layer, np.ndarray)
    owner = layer
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    owner = owner.obj if isinstance(owner, memoryview) else owner
    assert isinstance(owner, mmap.mmap) == hasattr(mmap, "MAP_POPULATE")
    np.testing.assert_array_equal(layer, reference)
    path = tmp_path / "with_layer.h5ad"
    adata.write_h5ad(path)
    np.testing.assert_array_equal(ad.read_h5ad(path).layers["predicted"], reference)
