"""Ranked effects of an in-silico screen (``ptrag_sc.tl.screen`` output)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._utils import check_frame, check_save, finish, grid, pick, shared_doc

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from matplotlib.axes import Axes

_REQUIRED = ("perturbation", "score", "rank")
_MEASURED = "#d95f02"
_UNMEASURED = "#7570b3"


@shared_doc
def screen(
    screen_df: pd.DataFrame,
    *,
    cell_type: str | Sequence[str] | None = None,
    n_top: int = 10,
    highlight: Sequence[str] | None = None,
    ncols: int = 2,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> Axes | list[Axes] | None:
    """Ranked screen scores, with the top hits labelled.

    One panel per cell type: every screened perturbation's score against its rank, perturbations
    measured in the cell type in one colour and the others (predictions only) in another; the
    ``n_top`` best and the ``highlight`` perturbations are named.

    Parameters
    ----------
    screen_df
        The table of :func:`ptrag_sc.tl.screen`.
    cell_type
        Cell type(s) to draw (default: all in the table).
    n_top
        Number of top-ranked perturbations to label (``0``: none).
    highlight
        Further perturbations to label (e.g. known hits), wherever they rank.
    ncols
        Panels per row.
    %(ax_show_save)s

    Returns
    -------
    The Axes (one cell type) or a list of Axes, unless the figure was shown.

    Examples
    --------
    >>> import ptrag_sc
    >>> ptrag_sc.settings.progress_bar = False
    >>> adata = ptrag_sc.datasets.perturbench_devel(subset="glioblastoma")
    >>> ptrag_sc.PTRAG.setup_anndata(adata, perturbation_key="gene", cell_type_key="cell_line")
    >>> model = ptrag_sc.PTRAG(
    ...     adata, perturbation_embeddings=adata.uns["gene_embeddings"],
    ...     n_hidden=32, n_layers=1, n_candidates=8,
    ... )
    >>> model.train(max_steps=20)
    >>> hits = ptrag_sc.tl.screen(model, cell_type="U87MG")
    >>> ax = ptrag_sc.pl.screen(hits, n_top=5, show=False)
    """
    check_frame(screen_df, "screen_df", "`ptrag_sc.tl.screen(...)`", _REQUIRED)
    if isinstance(n_top, bool) or not isinstance(n_top, int | np.integer) or n_top < 0:
        raise ValueError(f"`n_top` must be an integer >= 0, got {n_top!r}.")
    check_save(save)
    df = screen_df.copy()
    df["_ct"] = df["cell_type"].astype(str) if "cell_type" in df.columns else ""
    wanted = pick(list(dict.fromkeys(df["_ct"])), cell_type, "cell_type", "the table")
    perturbations = list(dict.fromkeys(df["perturbation"].astype(str)))
    highlight = pick(
        perturbations, [] if highlight is None else highlight, "highlight", "the table"
    )

    fig, axes = grid(len(wanted), ncols, (5.0, 3.6), ax=ax, what="cell types")
    for panel, ct in zip(axes, wanted, strict=True):
        _panel(panel, df[df["_ct"] == ct].sort_values("rank", kind="stable"), ct, n_top, highlight)
    return finish(fig, axes, show=show, save=save, ax=ax)


def _panel(ax: Axes, df: pd.DataFrame, cell_type: str, n_top: int, highlight: list[str]) -> None:
    rank = df["rank"].to_numpy(dtype=float)
    score = df["score"].to_numpy(dtype=float)
    many = {"s": 6, "color": _UNMEASURED, "linewidths": 0, "rasterized": len(df) > 2000}
    if "measured_in_cell_type" in df.columns:
        measured = df["measured_in_cell_type"].to_numpy(dtype=bool)
        ax.scatter(rank[~measured], score[~measured], alpha=0.6, label="predicted only", **many)
        label = "measured in this cell type"
        ax.scatter(
            rank[measured],
            score[measured],
            s=14,
            color=_MEASURED,
            alpha=0.9,
            linewidths=0,
            label=label,
        )
        ax.legend(loc="upper right", fontsize=7, frameon=False)
    else:
        ax.scatter(rank, score, alpha=0.7, **many)
    names = df["perturbation"].astype(str).to_numpy()
    labelled = list(range(min(n_top, len(df)))) + [
        i for i in np.flatnonzero(np.isin(names, highlight)) if i >= n_top
    ]
    for j, i in enumerate(labelled):
        ax.scatter(
            [rank[i]], [score[i]], s=24, facecolors="none", edgecolors="black", linewidths=0.7
        )
        ax.annotate(
            names[i],
            (rank[i], score[i]),
            xytext=(8, -4 - 9 * (j % 4)),
            textcoords="offset points",
            fontsize=7,
            arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"},
        )
    if len(df) > 200:
        ax.set_xscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("score")
    ax.set_title(
        f"{cell_type}: {len(df)} perturbations" if cell_type else f"{len(df)} perturbations",
        fontsize=9,
    )
