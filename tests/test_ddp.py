"""Data-parallel training through Lightning: disjoint shares, exact steps, reduced metrics."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scvi
import torch
from conftest import SMALL_MODEL, ddp_split, make_small_adata

import ptrag_sc
from ptrag_sc.data._sets import SetBatchSampler, SetGroups
from ptrag_sc.module import TENSORS, PTRAGModule

GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
needs_gloo = pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is not available")
WORKER = Path(__file__).with_name("_ddp_worker.py")


def _groups(sizes) -> SetGroups:
    sizes = np.asarray(sizes)
    n, k = len(sizes), 2
    start = np.concatenate([[0], np.cumsum(sizes)])
    empty = np.zeros((n, k))
    return SetGroups(
        cells=np.arange(start[-1]),
        cell_start=start,
        pool=np.arange(1000, 1010),
        pool_start=np.array([0, 10]),
        group_pool=np.zeros(n, dtype=np.int64),
        perturbation=np.array([f"P{i}" for i in range(n)]),
        cell_type=np.array(["c"] * n),
        embedding=np.zeros((n, 3), np.float32),
        candidates=np.full((n, k), -1),
        candidate_same_cell_type=empty.astype(bool),
        candidate_relation=empty.astype(np.int64),
        similarity=empty,
        annotation_similarity=empty,
        batch=np.full(n, -1),
        control_mean=np.zeros((n, 4), np.float32),
    )


def _sets(batches) -> list[tuple]:
    return [tuple(cells) for plan in batches for cells in plan[1].tolist()]


@pytest.mark.parametrize("sizes", [[40, 17, 5, 64, 33], [40, 17, 5, 64, 33, 9]])
def test_training_shares_are_disjoint_and_exact(sizes):
    groups = _groups(sizes)
    one = SetBatchSampler(groups, set_size=8, batch_size=4, seed=3, steps_per_epoch=7)
    ranks = [SetBatchSampler(groups, set_size=8, batch_size=2, seed=3, steps_per_epoch=7, num_replicas=2, rank=r) for r in range(2)]
    aligned = sum(-(-np.asarray(sizes) // 8)) % 4 == 0
    for _ in range(3):  # epochs: passes over the groups are chained and re-drawn
        single = list(one)
        shares = [list(sampler) for sampler in ranks]
        assert [len(s) for s in shares] == [7, 7] == [len(s) for s in ranks]
        assert all(len(plan[0]) == 2 for share in shares for plan in share)
        assert set(_sets(shares[0])).isdisjoint(_sets(shares[1]))
        if aligned:
            # Passes of a multiple of 4 sets: step i of the two ranks together is step i of
            # one process with twice the batch.
            for i, plan in enumerate(single):
                assert _sets([plan]) == _sets([shares[0][i]]) + _sets([shares[1][i]])


@pytest.mark.parametrize(("sizes", "expected"), [([40, 17, 5, 64, 33], [3, 2]), ([8], [1, 1])])
def test_validation_serves_every_set_once_and_pads_empty_ranks(sizes, expected):
    groups = _groups(sizes)
    one = list(SetBatchSampler(groups, set_size=16, batch_size=3, seed=0, shuffle=False))
    shares = [list(SetBatchSampler(groups, set_size=16, batch_size=3, seed=0, shuffle=False, num_replicas=2, rank=r)) for r in range(2)]
    assert [len(s) for s in shares] == expected
    weighted = [plan for share in shares for plan in share if len(plan) == 3 or plan[3] > 0]
    assert sorted(_sets(weighted)) == sorted(_sets(one))
    padded = [plan for share in shares for plan in share if len(plan) == 4]
    assert all(plan[3] == 0.0 for plan in padded)
    assert len(padded) == (1 if len(one) < 2 else 0)


@pytest.mark.parametrize(
    ("retrieval", "memory", "backbone", "decoder_rank", "n_batch"),
    list(itertools.product(["ptrag", "vanilla", "none"], ["response", "embedding"], ["pooled", "full"], [None, 4], [0, 3])),
)
def test_every_trainable_parameter_takes_part_in_the_loss(retrieval, memory, backbone, decoder_rank, n_batch):
    # DistributedDataParallel (find_unused_parameters=False) fails on a parameter without gradient.
    gen = torch.Generator().manual_seed(0)
    n_genes, n_dims, m, b, s, k = 12, 6, 10, 3, 5, 4
    module = PTRAGModule(n_genes, n_dims, n_hidden=8, n_layers=1, n_heads=2, n_set_tokens=2, retrieval=retrieval,
                         memory=memory, backbone=backbone, decoder_rank=decoder_rank, n_batch=n_batch, n_response_components=4)
    module.set_memory(torch.randn(m, n_dims, generator=gen), torch.randn(m, 3, generator=gen))
    x = torch.rand(b, s, n_genes, generator=gen)
    batch = {
        TENSORS.X_CTRL: x,
        TENSORS.X_PERT: x.flip(1) + 0.1,
        TENSORS.PERT_EMBEDDING: torch.randn(b, n_dims, generator=gen),
        TENSORS.CANDIDATES: torch.tensor([[0, 1, 2, -1], [3, 4, 5, 6], [7, 8, 9, 0]]),
        TENSORS.CANDIDATE_SAME_CELL_TYPE: torch.rand(b, k, generator=gen) > 0.5,
        TENSORS.CANDIDATE_RELATION: torch.randint(0, 3, (b, k), generator=gen),
        TENSORS.CANDIDATE_SIMILARITY: torch.rand(b, k, generator=gen),
        TENSORS.CANDIDATE_ANNOTATION_SIMILARITY: torch.rand(b, k, generator=gen),
        TENSORS.CONTEXT_RESPONSE: torch.randn(b, n_genes, generator=gen) * 0.1,
        TENSORS.STACKED_SHIFT: torch.randn(b, n_genes, generator=gen) * 0.1,
        TENSORS.CONTROL_MEAN: x.mean(1),
        TENSORS.TARGET_SHIFT: torch.randn(b, n_genes, generator=gen) * 0.1,
        TENSORS.BATCH: torch.tensor([0, 2, -1]),
    }
    module.train()
    module(batch)[2].loss.backward()
    unused = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


def _single_process_reference():
    adata = make_small_adata()
    adata.obs["split"] = ddp_split(adata)
    ptrag_sc.PTRAG.setup_anndata(adata)
    scvi.settings.seed = 0
    model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], retrieval="none", **SMALL_MODEL)
    model.train(max_steps=20, check_val_every_n_steps=10, split_key="split", batch_size=4, accelerator="cpu", devices=1)
    return model, model.predict(adata, inplace=False)


def _run_worker(strategy: str, tmp_path: Path) -> list[dict]:
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ptrag_sc.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(WORKER), strategy, str(tmp_path)], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert list(work.iterdir()) == []  # no logs or checkpoints left in the working directory
    return [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]


def _check_data_parallel_run(ranks, tmp_path):
    reference, reference_prediction = _single_process_reference()
    for name, steps in (("none", 20), ("ptrag", 12)):
        if len(ranks) == 2:
            # Exact step counts, and one validation loss, reduced over the ranks, on both.
            assert [r[name]["global_step"] for r in ranks] == [steps, steps]
            assert ranks[0][name]["validation_loss"] == ranks[1][name]["validation_loss"]
            assert ranks[0][name]["best_step"] == ranks[1][name]["best_step"]
        assert ranks[0][name]["best_step"] is not None
        history = ranks[0][name]["history"]
        assert np.all(np.isfinite(history["train_loss"]))
        assert len(history["validation_loss"]) == steps // (10 if name == "none" else 4)
    # Two ranks with 2 sets each take the steps of one process with 4 sets: equal losses.
    for key in ("train_loss", "train_energy", "validation_loss", "validation_mean_error"):
        np.testing.assert_allclose(ranks[0]["none"]["history"][key], reference.history[key][key].astype(float), rtol=1e-5)
    assert ranks[0]["none"]["best_step"] == reference.best_step_
    np.testing.assert_allclose(np.load(tmp_path / "prediction.npy"), reference_prediction, atol=1e-4)
    assert "train_active_ratio" in ranks[0]["ptrag"]["history"]


@needs_gloo
def test_ddp_two_cpu_processes_match_one(tmp_path):
    # Lightning starts the worker script again for rank 1: both ranks report.
    ranks = _run_worker("ddp", tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    _check_data_parallel_run(ranks, tmp_path)


@needs_gloo
@pytest.mark.slow
def test_ddp_spawn_two_cpu_processes_match_one(tmp_path):
    # The launching process gets rank 0's weights, history and best step back.
    ranks = _run_worker("ddp_spawn", tmp_path)
    assert [r["rank"] for r in ranks] == [0]
    _check_data_parallel_run(ranks, tmp_path)
