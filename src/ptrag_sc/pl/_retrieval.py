"""Heatmap of what the retriever fetched and kept (``PTRAG.get_retrieval`` output)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._utils import check_frame, check_save, finish, grid, pick, shared_doc

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from matplotlib.axes import Axes

#: Candidate name of a context entry (the cell type's mean response), drawn last when a table has
#: one; the tables of ``PTRAG.get_retrieval`` list memory entries only.
CONTEXT_CANDIDATE = "<context mean>"
_REQUIRED = ("query", "rank", "candidate")
_ALL = "all"


def retrieval_matrix(
    retrieval_df: pd.DataFrame,
    *,
    value: str = "keep_probability",
    cell_type: Sequence[str] | str | None = None,
    queries: Sequence[str] | None = None,
    max_rank: int | None = None,
    show_context: bool = True,
) -> dict[str, pd.DataFrame]:
    """Queries x candidates matrices of ``value``, one per cell type, as the heatmap shows them
    (NaN: not retrieved for that query)."""
    check_frame(retrieval_df, "retrieval_df", "`model.get_retrieval(...)`", (*_REQUIRED, value))
    if not pd.api.types.is_numeric_dtype(retrieval_df[value]):
        raise ValueError(f"`value={value!r}` must name a numeric column of `retrieval_df`.")
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"`max_rank` must be >= 1 or None, got {max_rank}.")

    df = retrieval_df.copy()
    df["_ct"] = df["cell_type"].astype(str) if "cell_type" in df.columns else _ALL
    candidate = df["candidate"].astype(str)
    is_context = candidate == CONTEXT_CANDIDATE
    if "candidate_cell_type" in df.columns:
        label = candidate + " @ " + df["candidate_cell_type"].astype(str)
        df["_label"] = label.where(~is_context, CONTEXT_CANDIDATE)
    else:
        df["_label"] = candidate
    df["_query"] = df["query"].astype(str)
    if not show_context:
        df = df[~is_context]
    if max_rank is not None:
        df = df[(df["rank"] <= max_rank) | (df["_label"] == CONTEXT_CANDIDATE)]

    cts = pick(list(dict.fromkeys(df["_ct"])), cell_type, "cell_type", "`retrieval_df`")
    all_queries = pick(list(dict.fromkeys(df["_query"])), queries, "queries", "`retrieval_df`")
    if queries is not None:
        df = df[df["_query"].isin(all_queries)]

    out: dict[str, pd.DataFrame] = {}
    for ct in cts:
        sub = df[df["_ct"] == ct]
        if sub.empty:
            raise ValueError(f"Nothing left to plot for cell type {ct!r} after the selection.")
        dup = sub.duplicated(["_query", "_label"])
        if dup.any():
            pairs = sub.loc[dup, ["_query", "_label"]].head(5).values.tolist()
            raise ValueError(
                f"`retrieval_df` has several rows for the same (query, candidate) in cell type "
                f"{ct!r}, e.g. {pairs}; pass the output of one `get_retrieval` call."
            )
        best = sub.groupby("_label")["rank"].min()
        context_last = best.index == CONTEXT_CANDIDATE
        order = (
            pd.DataFrame({"ctx": context_last, "rank": best.to_numpy(), "label": best.index})
            .sort_values(["ctx", "rank", "label"])["label"]
            .tolist()
        )
        rows = [q for q in all_queries if q in set(sub["_query"])]
        matrix = sub.pivot(index="_query", columns="_label", values=value).reindex(
            index=rows, columns=order
        )
        matrix.index.name, matrix.columns.name = "query", "candidate"
        out[ct] = matrix.astype(float)
    return out


@shared_doc
def retrieval_heatmap(
    retrieval_df: pd.DataFrame,
    *,
    value: str = "keep_probability",
    cell_type: Sequence[str] | str | None = None,
    queries: Sequence[str] | None = None,
    max_rank: int | None = None,
    show_context: bool = True,
    mark_selected: bool = True,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Axes | list[Axes] | None:
    """Queries x retrieved candidates, coloured by keep probability (or another column).

    One heatmap per cell type of :meth:`ptrag_sc.PTRAG.get_retrieval`'s table: rows are the
    queries (in order of appearance), columns the stage-1 candidates (``"GENE @ cell type"``
    for a response memory) by the best rank they reach, a ``"<context mean>"`` entry last.
    Blank: not retrieved for that query; a white dot: kept by stage 2 for most cells.

    Parameters
    ----------
    retrieval_df
        The DataFrame of ``model.get_retrieval(...)``.
    value
        Numeric column to colour by: ``"keep_probability"`` (stage 2, mean over cells; the
        mean attention weight for vanilla RAG), ``"selected_fraction"`` or ``"similarity"``
        (stage 1 cosine similarity).
    cell_type
        Cell type(s) to draw (default: every cell type of the frame).
    queries
        Query perturbations to draw, in this order (default: all, in order of appearance).
    max_rank
        Keep only candidates of stage-1 rank ``<= max_rank`` (a context entry is kept).
    show_context
        Include the column of a ``"<context mean>"`` entry, if the table has one.
    mark_selected
        Mark the ``selected`` candidates (needs the ``selected`` column).
    cmap, vmin, vmax
        Colour map and range, shared by all heatmaps (default: ``[0, 1]`` for probabilities
        and fractions, else the data range).
    %(ax_show_save)s

    Returns
    -------
    ``None`` when the figure is shown; otherwise the Axes (one cell type) or a list of Axes,
    one per cell type.

    Examples
    --------
    >>> import ptrag_sc
    >>> ptrag_sc.settings.progress_bar = False
    >>> adata = ptrag_sc.datasets.perturbench_devel(subset="glioblastoma")
    >>> ptrag_sc.pp.few_shot_split(adata, held_out="U87MG", val=["PLK4"], test=["MAPK1", "SGK1"])
    >>> ptrag_sc.PTRAG.setup_anndata(adata, perturbation_key="gene", cell_type_key="cell_line")
    >>> model = ptrag_sc.PTRAG(
    ...     adata, perturbation_embeddings=adata.uns["gene_embeddings"],
    ...     n_hidden=32, n_layers=1, n_candidates=8,
    ... )
    >>> model.train(max_steps=20, split_key="split")
    >>> df = model.get_retrieval(["MAPK1", "SGK1"], cell_type="U87MG")
    >>> ax = ptrag_sc.pl.retrieval_heatmap(df, show=False)
    >>> ax.get_title()
    'U87MG: keep_probability'
    """
    check_save(save)
    matrices = retrieval_matrix(
        retrieval_df,
        value=value,
        cell_type=cell_type,
        queries=queries,
        max_rank=max_rank,
        show_context=show_context,
    )
    if mark_selected and "selected" not in retrieval_df.columns:
        raise ValueError(
            "`mark_selected=True` needs a `selected` column; pass `mark_selected=False`."
        )
    values = np.concatenate([m.to_numpy().ravel() for m in matrices.values()])
    finite = values[np.isfinite(values)]
    if value in ("keep_probability", "selected_fraction") or finite.size == 0:
        low, high = 0.0, 1.0
    else:
        low, high = float(finite.min()), float(finite.max())
    vmin, vmax = low if vmin is None else vmin, high if vmax is None else vmax
    n_cols = max(m.shape[1] for m in matrices.values())
    n_rows = max(m.shape[0] for m in matrices.values())
    longest = max((len(str(c)) for m in matrices.values() for c in m.columns), default=0)
    panel = (2.5 + 0.28 * n_cols, 1.6 + 0.3 * n_rows + 0.09 * longest)
    fig, axes = grid(len(matrices), 1, panel, ax=ax, what="cell types")
    selected = _selected(retrieval_df, matrices) if mark_selected else {}
    for axis, (ct, matrix) in zip(axes, matrices.items(), strict=True):
        data = np.ma.masked_invalid(matrix.to_numpy())
        image = axis.imshow(
            data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest"
        )
        axis.set_xticks(np.arange(matrix.shape[1]), matrix.columns, rotation=90, fontsize="small")
        axis.set_yticks(np.arange(matrix.shape[0]), matrix.index, fontsize="small")
        axis.set_xlabel("retrieved candidate (best rank first)")
        axis.set_ylabel("query")
        axis.set_title(
            f"{ct}: {value}" if ct != _ALL or "cell_type" in retrieval_df.columns else value
        )
        axis.figure.colorbar(image, ax=axis, label=value, shrink=0.8)
        rows, cols = selected.get(ct, ((), ()))
        if len(rows):
            axis.scatter(
                cols, rows, s=14, c="white", edgecolors="black", linewidths=0.5, label="selected"
            )
    return finish(fig, axes, show=show, save=save, ax=ax)


def _selected(retrieval_df: pd.DataFrame, matrices: dict[str, pd.DataFrame]) -> dict:
    """Positions (rows, cols) of the ``selected`` candidates in each matrix."""
    flags = retrieval_matrix(
        retrieval_df.assign(_selected=retrieval_df["selected"].fillna(False).astype(float)),
        value="_selected",
        cell_type=list(matrices),
        queries=None,
    )
    return {
        ct: np.nonzero(np.nan_to_num(flags[ct].reindex_like(matrix).to_numpy()) > 0.5)
        for ct, matrix in matrices.items()
    }
