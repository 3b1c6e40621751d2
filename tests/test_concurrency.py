"""Predictions are re-entrant (threads, seeds) and never switch the mode of a model that trains."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import scvi
import torch
from conftest import make_small_adata
from lightning.pytorch.callbacks import Callback

from ptrag_sc import PTRAG
from ptrag_sc.model._guard import predicting

TINY = {"n_hidden": 16, "n_layers": 1, "n_heads": 2, "cell_set_size": 8, "n_candidates": 4, "gene_annotations": None}


@pytest.fixture(scope="module")
def trained():
    data = make_small_adata(n_perturbations=5, n_genes=20, n_cells_per_perturbation=12, n_control_cells=24)
    scvi.settings.seed = 0
    PTRAG.setup_anndata(data)
    model = PTRAG(data, perturbation_embeddings=data.uns["gene_embeddings"], **TINY)
    model.train(max_steps=3)
    return model, data


def test_sampled_retrieval_uses_its_own_generator(trained):
    model, data = trained
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = model.predict(data, inplace=False, sample_retrieval=True, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is not touched
    np.testing.assert_array_equal(model.predict(data, inplace=False, sample_retrieval=True, seed=1), first)
    assert not np.array_equal(model.predict(data, inplace=False, sample_retrieval=True, seed=2), first)


def test_threads_predicting_with_different_seeds_get_their_own_draws(trained):
    model, data = trained
    expected = {seed: model.predict(data, inplace=False, sample_retrieval=True, seed=seed) for seed in (1, 2)}
    results, errors = {1: [], 2: []}, []

    def run(seed):
        try:
            for _ in range(3):
                results[seed].append(model.predict(data, inplace=False, sample_retrieval=True, seed=seed))
                torch.rand(1000)  # another use of the global generator in between
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2, 1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for seed, outputs in results.items():
        assert len(outputs) == 6
        for output in outputs:
            np.testing.assert_array_equal(output, expected[seed])


class _PredictEachStep(Callback):
    """Calls `predict` while the model trains (as a user's callback might) and records what happens."""

    def __init__(self, model, data) -> None:
        self.model, self.data, self.errors, self.modes = model, data, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        try:
            self.model.predict(self.data, inplace=False)
        except RuntimeError as exc:
            self.errors.append(str(exc))
        self.modes.append(pl_module.module.training)


def test_predict_during_training_is_refused_and_training_unchanged(trained):
    _, data = trained
    weights = []
    for with_callback in (False, True):
        scvi.settings.seed = 0
        model = PTRAG(data, perturbation_embeddings=data.uns["gene_embeddings"], **TINY)
        model.train(max_steps=2)
        callback = _PredictEachStep(model, data)  # a trained model, trained further
        model.train(max_steps=3, callbacks=[callback] if with_callback else None)
        weights.append(model.module.state_dict())
    assert len(callback.errors) == 3
    assert all("This model is training" in e and "deepcopy" in e for e in callback.errors)
    assert callback.modes == [True, True, True]  # never switched to evaluation mode
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0)
    model.predict(data, inplace=False)  # and once training returned, prediction works


def test_train_while_predicting_is_refused(trained):
    model, _ = trained
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with predicting(model.module), pytest.raises(RuntimeError, match="a prediction is running for this model"):
        model.train(max_steps=1)
    for name, value in model.module.state_dict().items():
        assert torch.equal(value, before[name])
