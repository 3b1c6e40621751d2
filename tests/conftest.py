"""Shared fixtures: small synthetic Perturb-seq data and a trained model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scvi
import torch

import ptrag_sc


def _shared_data() -> Path:
    """``../shared/data`` beside the checkout (CI and developers), or ``$PTRAG_SC_SHARED_DATA``."""
    env = os.environ.get("PTRAG_SC_SHARED_DATA")
    if env:
        return Path(env)
    for root in Path(__file__).resolve().parents[1:]:
        if (root / "shared" / "data").is_dir():
            return root / "shared" / "data"
    return Path(__file__).resolve().parents[2] / "shared" / "data"


#: The project's shared real datasets (tests that need them skip when they are absent).
SHARED_DATA = _shared_data()

# Small models train fastest on one thread; this also makes timings independent of load.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Keep one thread per test: numba (scanpy's normalisation) shares the OpenMP runtime and
    resets torch's thread count, and a second thread on a busy 2-core machine slows small
    models down many times over."""
    torch.set_num_threads(1)
ptrag_sc.settings.progress_bar = False

SMALL_MODEL = {"n_hidden": 32, "n_layers": 1, "n_heads": 4, "cell_set_size": 16, "n_candidates": 8}


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="needs --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def make_small_adata(seed: int = 0, **kwargs):
    """3 cell lines x 12 perturbations x 40 cells, 60 genes, strong effects."""
    params = {
        "n_cell_types": 3,
        "n_perturbations": 12,
        "n_genes": 60,
        "n_cells_per_perturbation": 40,
        "n_control_cells": 120,
        "effect_size": 1.0,
        "n_batches": 1,
        "seed": seed,
    }
    params.update(kwargs)
    return ptrag_sc.datasets.synthetic(**params)


def few_shot_split(adata, *, n_val: int = 2, n_test: int = 3, seed: int = 0) -> np.ndarray:
    """Hold out some perturbations of the first cell line for validation and test."""
    perts = np.array(sorted(set(adata.obs["gene"].astype(str)) - {"non-targeting"}))
    rng = np.random.default_rng(seed)
    held = rng.choice(perts, n_val + n_test, replace=False)
    first = adata.obs["cell_line"].astype(str).to_numpy() == adata.obs["cell_line"].cat.categories[0]
    gene = adata.obs["gene"].astype(str).to_numpy()
    split = np.full(adata.n_obs, "train", dtype=object)
    split[first & np.isin(gene, held[:n_val])] = "val"
    split[first & np.isin(gene, held[n_val:])] = "test"
    return split


@pytest.fixture
def adata():
    return make_small_adata()


@pytest.fixture(scope="module")
def trained():
    """A PT-RAG model trained briefly on a few-shot split (shared by a test module)."""
    scvi.settings.seed = 0
    data = make_small_adata()
    data.obs["split"] = few_shot_split(data)
    ptrag_sc.PTRAG.setup_anndata(data)
    model = ptrag_sc.PTRAG(data, perturbation_embeddings=data.uns["gene_embeddings"], **SMALL_MODEL)
    model.train(max_steps=300, split_key="split")
    return model, data


def ddp_split(adata) -> np.ndarray:
    """4 perturbations of the first cell line for validation, the rest for training.

    32 training groups of 40 cells make 96 sets of 16 per pass: a multiple of 4, so that 2
    data-parallel ranks with 2 sets per step draw exactly the sets of one process with 4.
    """
    gene = adata.obs["gene"].astype(str).to_numpy()
    first = adata.obs["cell_line"].astype(str).to_numpy() == adata.obs["cell_line"].cat.categories[0]
    held = sorted(set(gene) - {"non-targeting"})[:4]
    return np.where(first & np.isin(gene, held), "val", "train").astype(object)
