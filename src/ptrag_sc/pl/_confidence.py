"""How well a prediction's confidence ranks it by its measured accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import DEFAULT_CELL_TYPE_KEY, DEFAULT_PERTURBATION_KEY
from ._utils import check_frame, check_save, finish, shared_doc, single_ax

if TYPE_CHECKING:
    import os

    from anndata import AnnData
    from matplotlib.axes import Axes


@shared_doc
def confidence(
    adata: AnnData,
    results: pd.DataFrame,
    *,
    confidence_key: str = "ptrag_confidence",
    metric: str = "pearson_delta",
    perturbation_key: str = DEFAULT_PERTURBATION_KEY,
    cell_type_key: str | None = DEFAULT_CELL_TYPE_KEY,
    label: bool = True,
    figsize: tuple[float, float] = (4.5, 4.0),
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Axes | None:
    """A prediction's confidence against its measured accuracy, one point per perturbation.

    The confidence is ``obs[f"{key_added}_confidence"]`` of :meth:`ptrag_sc.PTRAG.predict`
    (the Pearson correlation with the measured mean shift the model expects), the accuracy
    ``metric`` of :func:`ptrag_sc.tl.evaluate`; the title gives their Spearman correlation.

    Parameters
    ----------
    adata
        The AnnData that was predicted (in place), holding ``obs[confidence_key]``.
    results
        Rows of :func:`ptrag_sc.tl.evaluate` for that prediction (one per cell type and
        perturbation).
    confidence_key
        The obs column of the confidence.
    metric
        Column of ``results`` to put on the y axis.
    perturbation_key, cell_type_key
        The obs columns that ``results`` is grouped by (as passed to ``tl.evaluate``).
    label
        Write each perturbation's name next to its point.
    figsize
        Figure size when a new figure is made.
    %(ax_show_save)s

    Returns
    -------
    The Axes, unless the figure was shown.

    Examples
    --------
    >>> import ptrag_sc, scvi
    >>> ptrag_sc.settings.progress_bar = False
    >>> scvi.settings.seed = 0
    >>> adata = ptrag_sc.datasets.synthetic(n_perturbations=12, n_genes=60)
    >>> ptrag_sc.pp.few_shot_split(
    ...     adata, held_out="cell_line_0", val_fraction=0.2, test_fraction=0.4, seed=0
    ... )
    >>> ptrag_sc.PTRAG.setup_anndata(adata)
    >>> model = ptrag_sc.PTRAG(
    ...     adata, perturbation_embeddings=adata.uns["gene_embeddings"], n_hidden=32, n_layers=1
    ... )
    >>> model.train(max_steps=50, split_key="split")
    >>> model.predict(adata, key_added="ptrag")
    >>> scores = ptrag_sc.tl.evaluate(adata, pred_layer="ptrag", split_key="split")
    >>> ax = ptrag_sc.pl.confidence(adata, scores, show=False)
    """
    from scipy.stats import spearmanr

    check_save(save)
    cell_type_col = cell_type_key or "cell_type"
    required = (metric, perturbation_key, cell_type_col)
    check_frame(results, "results", "`ptrag_sc.tl.evaluate`", required)
    if confidence_key not in adata.obs.columns:
        raise ValueError(
            f"`adata.obs` has no column {confidence_key!r}: predict in place with a response "
            "memory (`model.predict(adata, key_added=...)` writes "
            "`obs[key_added + '_confidence']`) or pass `confidence_key=`."
        )
    obs = adata.obs
    keys = {perturbation_key: obs[perturbation_key].astype(str).to_numpy()}
    keys[cell_type_col] = (
        obs[cell_type_key].astype(str).to_numpy() if cell_type_key else np.full(adata.n_obs, "all")
    )
    per_pair = (
        pd.DataFrame({**keys, "confidence": obs[confidence_key].to_numpy(dtype=float)})
        .dropna()
        .groupby([cell_type_col, perturbation_key], observed=True)["confidence"]
        .mean()
    )
    rows = results[[cell_type_col, perturbation_key, metric]].astype(
        {cell_type_col: str, perturbation_key: str}
    )
    pairs = rows.join(per_pair, on=[cell_type_col, perturbation_key]).dropna(
        subset=["confidence", metric]
    )
    if pairs.empty:
        raise ValueError(
            "No (cell type, perturbation) of `results` has a confidence in "
            f"`obs[{confidence_key!r}]`."
        )

    fig, ax_ = single_ax(ax, figsize)
    ax_.scatter(pairs["confidence"], pairs[metric], s=28, color="#3b6ea5", alpha=0.8)
    if label:
        for _, row in pairs.iterrows():
            ax_.annotate(
                str(row[perturbation_key]),
                (row["confidence"], row[metric]),
                fontsize=7,
                xytext=(3, 2),
                textcoords="offset points",
            )
    rho = spearmanr(pairs["confidence"], pairs[metric]).statistic if len(pairs) > 2 else np.nan
    ax_.set_xlabel(f"confidence ({confidence_key})")
    ax_.set_ylabel(f"measured {metric}")
    ax_.set_title(
        f"Spearman {rho:.2f}, n = {len(pairs)}" if np.isfinite(rho) else f"n = {len(pairs)}",
        fontsize="medium",
    )
    return finish(fig, ax_, show=show, save=save, ax=ax)
