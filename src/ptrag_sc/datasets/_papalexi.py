"""The bundled THP-1 CRISPR-knockout screen of Papalexi et al. 2021 (sceptredata subset)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import DEFAULT_CONTROL_GROUP
from ._bundled import bundled, read_gene_embeddings

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["papalexi_thp1", "papalexi_thp1_folds"]

_COUNTS = "papalexi2021_thp1.npz"
_EMBEDDINGS = "papalexi2021_thp1_gene_embeddings.npz"
CELL_LINE = "THP-1"


def papalexi_thp1() -> AnnData:
    """Real CRISPR-knockout Perturb-seq data of one cell line: THP-1, 25 targets (Papalexi 2021).

    19,351 cells x 299 genes: the cells of the ECCITE-seq screen of Papalexi et al. 2021
    (IFN-gamma-stimulated THP-1 cells, 26 targets knocked out with 4 gRNAs each, 9
    non-targeting gRNAs) whose top gRNA has at least 5 UMIs and at least 3x the UMIs of the
    second (sceptre's suggested assignment; 25 targets keep cells), over the 299 genes of the
    sceptredata example subset (9 of the targets, one mitochondrial gene, the rest random).
    ``X`` is log1p of expression normalised to 10,000 counts per cell
    (``sc.pp.normalize_total(target_sum=1e4)`` then ``sc.pp.log1p``, dense float32) and the raw
    UMI counts are in ``layers["counts"]``. MIT licence (sceptredata); built by
    ``scripts/build_papalexi_thp1.py``.

    With a single cell line, this is the dataset for perturbations never measured (unseen
    knockouts): :func:`papalexi_thp1_folds` gives the fixed partition of the targets that the
    benchmark and the demo test on.

    Returns
    -------
    :class:`~anndata.AnnData` with

    - ``obs["gene"]``: the knocked-out gene (control ``"non-targeting"``); ``obs["cell_line"]``:
      ``"THP-1"``; ``obs["bio_rep"]``: the replicate (``rep_1`` to ``rep_3``);
    - ``layers["counts"]``: raw UMI counts (sparse float32);
    - ``uns["gene_embeddings"]``: float32 DataFrame (target x 384) of all-MiniLM-L6-v2
      embeddings of each target's annotation text (official symbol, full name, GO terms; see
      :func:`ptrag_sc.pp.gene_texts`), so no text model is needed;
    - ``uns["gene_embedding_source"]``: per target, ``source``, ``matched`` and ``model``;
    - ``uns["dataset"]``: source, licence, citation and the cell filter.

    Examples
    --------
    >>> import ptrag_sc
    >>> adata = ptrag_sc.datasets.papalexi_thp1()
    >>> adata.shape
    (19351, 299)
    >>> int((adata.obs["gene"] == "non-targeting").sum()), adata.uns["gene_embeddings"].shape
    (2241, (25, 384))
    """
    import anndata
    import scanpy as sc
    from scipy import sparse

    with bundled(_COUNTS).open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
        counts = sparse.csr_matrix(
            (npz["data"].astype(np.float32), npz["indices"].astype(np.int32), npz["indptr"]),
            shape=tuple(npz["shape"]),
        )
        var_names = npz["var_names"].astype(str)
        gene = npz["targets"].astype(str)[npz["target_codes"]]
        bio_rep = npz["bio_reps"].astype(str)[npz["bio_rep_codes"]]
    obs = pd.DataFrame(
        {
            "gene": pd.Categorical(gene, categories=sorted(set(gene))),
            "cell_line": pd.Categorical([CELL_LINE] * len(gene)),
            "bio_rep": pd.Categorical(bio_rep),
        },
        index=[f"cell{i}" for i in range(len(gene))],
    )
    adata = anndata.AnnData(X=counts.copy(), obs=obs, var=pd.DataFrame(index=pd.Index(var_names)))
    adata.layers["counts"] = counts
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.X = np.asarray(adata.X.toarray(), dtype=np.float32)
    adata.uns.pop("log1p", None)

    adata.uns["gene_embeddings"], adata.uns["gene_embedding_source"] = read_gene_embeddings(
        _EMBEDDINGS
    )
    adata.uns["dataset"] = {
        "name": "papalexi_thp1",
        "source": (
            "Katsevich-Lab/sceptredata data/lowmoi_example_data.rda "
            "(commit ec722d5df90dfd34ace6cc9a5745ab6a5c2a6731)"
        ),
        "license": "MIT (sceptredata authors, 2024)",
        "citation": [
            "Papalexi et al., Nat Genet 53:322 (2021)",
            "Barry, Mason, Roeder, Katsevich, sceptre (sceptredata R package, 2024)",
        ],
        "cells": "top gRNA >= 5 UMIs and >= 3x the second gRNA's UMIs",
        "normalisation": "sc.pp.normalize_total(target_sum=1e4) + sc.pp.log1p",
        "perturbation_key": "gene",
        "cell_type_key": "cell_line",
        "control_group": DEFAULT_CONTROL_GROUP,
    }
    return adata


def papalexi_thp1_folds(n_folds: int = 5, *, seed: int = 0) -> list[list[str]]:
    """A fixed partition of the 25 targets of :func:`papalexi_thp1` into test folds.

    The targets (sorted) are permuted with ``numpy.random.default_rng(seed)`` and cut into
    ``n_folds`` consecutive folds of (nearly) equal size (``numpy.array_split``); each fold is
    sorted. The benchmark tests every fold of the default; the demo tests the first.

    Parameters
    ----------
    n_folds
        Number of folds, 1 to 25.
    seed
        Seed of the permutation.

    Returns
    -------
    One sorted list of target genes per fold.

    Examples
    --------
    >>> import ptrag_sc
    >>> ptrag_sc.datasets.papalexi_thp1_folds()[0]
    ['CMTM6', 'IRF7', 'JAK2', 'STAT1', 'UBE2L6']
    """
    embeddings, _ = read_gene_embeddings(_EMBEDDINGS)
    targets = sorted(embeddings.index)
    if (
        isinstance(n_folds, bool)
        or not isinstance(n_folds, int | np.integer)
        or not 1 <= n_folds <= len(targets)
    ):
        raise ValueError(
            f"`n_folds` must be an integer from 1 to {len(targets)}, got {n_folds!r}."
        )
    order = np.random.default_rng(seed).permutation(targets)
    return [sorted(str(g) for g in fold) for fold in np.array_split(order, n_folds)]
