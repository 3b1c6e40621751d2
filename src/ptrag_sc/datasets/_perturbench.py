"""The bundled real multi-cell-line Perturb-seq subset of the perturbench repository."""

from __future__ import annotations

from importlib.resources import as_file
from typing import TYPE_CHECKING, Literal

import pandas as pd

from .._constants import DEFAULT_CONTROL_GROUP, DEFAULT_PERTURBATION_SEP
from ._bundled import bundled, read_gene_embeddings

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["perturbench_devel"]

_H5AD = "perturbench_devel.h5ad"
_EMBEDDINGS = "perturbench_devel_gene_embeddings.npz"
_SOURCE_CONTROL = "control"
_SUBSETS = {
    "glioblastoma": ("dataset", "mcfaline23"),
    "gbm": ("dataset", "mcfaline23"),
    "k562": ("cell_type", "k562"),
}


def perturbench_devel(*, subset: Literal["glioblastoma", "gbm", "k562"] | None = None) -> AnnData:
    """Real multi-cell-line Perturb-seq data: K562 CRISPRa and three glioblastoma lines.

    5,961 cells x 500 highly variable genes (log1p of library-size-normalised expression, no
    raw counts), the development dataset of perturbench (Altos Labs, BSD-3-Clause):

    - ``k562`` (3,375 cells): Norman et al. 2019 (Science), CRISPRa, 18 single and 15 double
      perturbations (``"A+B"``), about 100 cells each;
    - ``A172``, ``T98G``, ``U87MG`` (850 / 871 / 865 cells): McFaline-Figueroa et al. 2024
      (Cell Genomics), kinase knockdowns/knockouts (labelled CRISPRi by perturbench),
      vehicle-treated cells only.

    All four cell types share 9 perturbations (MAP2K3, MAP2K6, MAP3K21, MAP4K3, MAP4K5, MAPK1,
    PLK4, SGK1, TGFBR2) plus controls, which makes this a small real fixture for held-out
    cell-type prediction. The three glioblastoma lines (same experiment) are the clean
    cross-cell-type comparison; K562 differs in study, modality and depth.

    Parameters
    ----------
    subset
        ``None`` for all cells; ``"glioblastoma"`` (or ``"gbm"``) for the three
        glioblastoma lines; ``"k562"`` for the Norman 2019 part.

    Returns
    -------
    :class:`~anndata.AnnData` with

    - ``obs["gene"]``: the perturbation in the package's convention (control
      ``"non-targeting"``, combinations ``"A+B"``, current symbols, e.g. ``MAP3K21`` for the
      original ``KIAA1804``); ``obs["cell_line"]``: the cell type. The original columns
      (``condition`` with control ``"control"``, ``perturbation``, ``perturbation_raw``,
      ``cell_type``, ``dataset``, ``perturbation_type``, ``dose``, ``ncounts``, ...) are kept;
    - ``uns["gene_embeddings"]``: float32 DataFrame (symbol x 384) of GenePT-style
      all-MiniLM-L6-v2 embeddings for every perturbed gene of the returned cells;
    - ``uns["gene_embedding_source"]``: DataFrame per gene, ``source`` = ``"summary"``
      (GenePT NCBI + UniProt summary text) or ``"annotation"`` (symbol, full name and GO
      terms, see :func:`ptrag_sc.pp.gene_text_from_annotations`), ``matched`` and ``model``;
    - ``uns["dataset"]``: source, licence and citations.

    Examples
    --------
    >>> import ptrag_sc
    >>> adata = ptrag_sc.datasets.perturbench_devel()
    >>> adata.shape
    (5961, 500)
    >>> adata.obs["cell_line"].value_counts().to_dict()
    {'k562': 3375, 'T98G': 871, 'U87MG': 865, 'A172': 850}
    >>> gbm = ptrag_sc.datasets.perturbench_devel(subset="glioblastoma")
    >>> sorted(gbm.obs["gene"].unique())[:3], gbm.uns["gene_embeddings"].shape
    (['MAP2K3', 'MAP2K6', 'MAP3K21'], (9, 384))
    """
    import anndata

    if subset is not None and subset not in _SUBSETS:
        raise ValueError(
            f"Unknown subset {subset!r}; use None, 'glioblastoma' (or 'gbm') or 'k562'."
        )
    with as_file(bundled(_H5AD)) as path:
        adata = anndata.read_h5ad(path)
    if subset is not None:
        column, value = _SUBSETS[subset]
        adata = adata[adata.obs[column] == value].copy()

    emb, source = read_gene_embeddings(_EMBEDDINGS)
    obs = adata.obs.copy()
    for col in obs.columns:
        if isinstance(obs[col].dtype, pd.CategoricalDtype):
            obs[col] = obs[col].cat.remove_unused_categories()

    condition = obs["condition"].astype(str)
    genes = {
        g
        for label in condition.unique()
        if label != _SOURCE_CONTROL
        for g in label.split(DEFAULT_PERTURBATION_SEP)
    }
    from ..pp import resolve_gene_symbols

    res = resolve_gene_symbols(sorted(genes), emb.index, warn=False)
    if res.missing:  # pragma: no cover - guarded by the build script and the tests
        raise RuntimeError(f"Bundled embeddings lack perturbed genes: {res.missing}.")

    def harmonise(label: str) -> str:
        if label == _SOURCE_CONTROL:
            return DEFAULT_CONTROL_GROUP
        return DEFAULT_PERTURBATION_SEP.join(
            res.mapping[g] for g in label.split(DEFAULT_PERTURBATION_SEP)
        )

    mapping = {label: harmonise(label) for label in condition.unique()}
    gene = condition.map(mapping)
    new = pd.DataFrame(
        {
            "gene": pd.Categorical(gene, categories=sorted(gene.unique())),
            "cell_line": obs["cell_type"].astype("category"),
        },
        index=obs.index,
    )
    adata.obs = pd.concat([new, obs], axis=1)

    used = sorted({res.mapping[g] for g in genes})
    adata.uns["gene_embeddings"] = emb.loc[used].copy()
    adata.uns["gene_embedding_source"] = source.loc[used].copy()
    adata.uns["dataset"] = {
        "name": "perturbench_devel",
        "source": (
            "altoslabs/perturbench src/perturbench/data/resources/devel.h5ad "
            "(commit d357dfae3b50968e800e9f5f273ff145080ae67c)"
        ),
        "license": "BSD-3-Clause (Copyright (c) 2024, Altos Labs)",
        "citation": [
            "Norman et al., Science 365:786 (2019)",
            "McFaline-Figueroa et al., Cell Genomics (2024)",
            "Wu et al., PerturBench (arXiv:2408.10609, 2024)",
        ],
        "perturbation_key": "gene",
        "cell_type_key": "cell_line",
        "control_group": DEFAULT_CONTROL_GROUP,
    }
    return adata
