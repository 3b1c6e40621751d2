"""Writes ``tests/data/model_v1``: a model saved in format version 1 (ptrag_sc 0.1.0, before the
explicit schema), with its AnnData and its predictions on it.

The folder in the repository was written by the code at commit 0edcd07 (``main`` when format
version 2 came), run as ``PYTHONPATH=<that checkout>/src python tests/data/make_model_v1.py
tests/data/model_v1``; the current code must load it and predict the same.
"""

import sys

import numpy as np
import scvi
import torch

import ptrag_sc
from ptrag_sc import PTRAG

torch.set_num_threads(1)
ptrag_sc.settings.progress_bar = False
out = sys.argv[1]
data = ptrag_sc.datasets.synthetic(
    n_cell_types=2, n_perturbations=5, n_genes=16, n_cells_per_perturbation=8, n_control_cells=16, n_batches=2,
    embedding_dim=8, seed=3,
)
scvi.settings.seed = 0
PTRAG.setup_anndata(data, batch_key="gem_group")
model = PTRAG(
    data, perturbation_embeddings=data.uns["gene_embeddings"], n_hidden=8, n_layers=1, n_heads=2, cell_set_size=4,
    n_candidates=2, decoder_rank=4, n_scorer_hidden=8,
)
model.train(max_steps=3)
model.save(out, save_anndata=True)
np.save(out + "/reference_prediction.npy", model.predict(data, inplace=False))
