"""Predicted vs observed mean shift from the control mean, per perturbation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import (
    DEFAULT_CELL_TYPE_KEY,
    DEFAULT_CONTROL_GROUP,
    DEFAULT_PERTURBATION_KEY,
    DEFAULT_PRED_LAYER,
)
from ..tl import _metrics as M
from ..tl._evaluate import select_groups
from ..tl._utils import as_str_tuple, dense_rows
from ._utils import check_save, finish, grid, shared_doc, single_ax, symmetric_limits

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from anndata import AnnData
    from matplotlib.axes import Axes


@dataclass
class Shift:
    """Mean shifts of one (cell type, perturbation) group, as :func:`ptrag_sc.tl.evaluate`."""

    cell_type: str
    perturbation: str
    predicted: np.ndarray  #: ``mean(P) - mean(C)`` per gene
    observed: np.ndarray  #: ``mean(R) - mean(C)`` per gene
    pearson: float  #: ``pearson_delta`` of ``tl.evaluate``
    n_cells: int
    n_cells_real: int


def compute_shifts(
    adata: AnnData, *, cell_type: Sequence[str] | str | None = None, **selection: Any
) -> tuple[list[Shift], np.ndarray]:
    """Shifts of every selected group and the gene names, selected and computed as
    :func:`ptrag_sc.tl.evaluate` does (``Shift.pearson`` is its ``pearson_delta``); the
    ``selection`` arguments are :func:`shift_scatter`'s."""
    sel = select_groups(adata, cell_types=cell_type, stacklevel=4, **selection)
    keys, wanted_p = sel.keys, sel.perturbations
    if wanted_p is not None:
        found = {p for _, p in keys}
        absent = [p for p in wanted_p if p not in found]
        if absent:
            available = sorted(
                {p for _, p in sel.real_index.index} & {p for _, p in sel.pred_index.index}
            )
            raise ValueError(
                f"No predicted and real cells to compare for perturbation(s) {absent} "
                f"(pred_layer={sel.pred_layer!r}, split_key={sel.split_key!r}, "
                f"split_values={sel.split_values}); perturbations with both: {available[:20]}."
            )
        order = {p: i for i, p in enumerate(wanted_p)}
        keys = sorted(keys, key=lambda k: (order[k[1]], k[0]))
    if not keys:
        raise sel.nothing("plot", cell_type=as_str_tuple(cell_type))
    shifts = []
    for c, p in keys:
        pi, ri = sel.pred_index[(c, p)], sel.real_index[(c, p)]
        dp = dense_rows(sel.pred_mat, pi).mean(axis=0) - sel.control_mean(c)
        dr = sel.real_rows(ri).mean(axis=0) - sel.control_mean(c)
        shifts.append(Shift(c, p, dp, dr, M.pearson(dp, dr), len(pi), len(ri)))
    return shifts, np.asarray(adata.var_names, dtype=str)


@shared_doc
def shift_scatter(
    adata: AnnData,
    *,
    pred_layer: str = DEFAULT_PRED_LAYER,
    perturbation_key: str = DEFAULT_PERTURBATION_KEY,
    control_group: str = DEFAULT_CONTROL_GROUP,
    cell_type_key: str | None = DEFAULT_CELL_TYPE_KEY,
    perturbations: Sequence[str] | str | None = None,
    cell_type: Sequence[str] | str | None = None,
    split_key: str | None = None,
    split_values: Sequence[str] | str = ("test",),
    real_layer: str | None = None,
    reference: AnnData | None = None,
    overlay: bool = False,
    annotate: int = 0,
    ncols: int = 4,
    max_panels: int = 24,
    point_size: float = 8.0,
    panel_size: tuple[float, float] = (3.2, 3.0),
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Axes | list[Axes] | None:
    """Predicted vs observed mean shift from control, one point per gene.

    For each selected (cell type, perturbation) group, the observed shift ``dr`` (x) against
    the predicted shift ``dp`` (y) of :func:`ptrag_sc.tl.evaluate`, whose ``pearson_delta`` is
    the ``r`` of each title (or legend); the dashed line is ``y = x``.

    Parameters
    ----------
    adata
        Cells with real expression in ``X`` (or ``real_layer``) and the prediction in
        ``layers[pred_layer]``. Never modified.
    pred_layer
        Layer holding the prediction.
    perturbation_key
        obs column with perturbation labels.
    control_group
        Label of control cells.
    cell_type_key
        obs column with the cell type; ``None`` treats all cells as one cell type.
    perturbations
        Perturbations to plot, in this order (default: all); each needs predicted and real
        cells.
    cell_type
        Cell type(s) to plot (default: all).
    split_key
        obs column with the data split; only cells in ``split_values`` are plotted (controls
        always serve).
    split_values
        Split values to plot.
    real_layer
        Layer with the real expression; ``None`` uses ``X``.
    reference
        AnnData with the real cells when ``adata`` holds only predictions, as in
        :func:`ptrag_sc.tl.evaluate`.
    overlay
        Draw all groups on one Axes (with ``r`` in the legend) instead of one panel each.
    annotate
        Label the ``annotate`` genes with the largest observed absolute shift in each panel.
    ncols
        Panels per row.
    max_panels
        Refuse to draw more panels than this.
    point_size
        Marker area of the points.
    panel_size
        Width and height of one panel, in inches.
    %(ax_show_save)s

    Returns
    -------
    ``None`` when the figure is shown; otherwise the Axes (one panel or ``overlay=True``) or
    one per group, sorted by cell type then perturbation (or in the order of
    ``perturbations``).

    Raises
    ------
    ValueError
        If a layer, obs column, cell type or perturbation does not exist, if nothing matches
        the selection, or if there are more than ``max_panels`` panels.

    Examples
    --------
    >>> import ptrag_sc
    >>> adata = ptrag_sc.datasets.perturbench_devel(subset="glioblastoma")
    >>> ptrag_sc.pp.few_shot_split(
    ...     adata, held_out="U87MG", val=["PLK4"], test=["MAP2K3", "MAPK1", "SGK1", "TGFBR2"]
    ... )
    >>> ptrag_sc.tl.predict_baseline(
    ...     adata, "other_cell_types", split_key="split", key_added="other"
    ... )
    >>> axes = ptrag_sc.pl.shift_scatter(adata, pred_layer="other", split_key="split", show=False)
    >>> len(axes), axes[1].get_title()  # doctest: +ELLIPSIS
    (4, 'MAPK1 (U87MG)\\nr = ...')
    >>> ax = ptrag_sc.pl.shift_scatter(
    ...     adata, pred_layer="other", split_key="split", perturbations=["MAPK1", "SGK1"],
    ...     overlay=True, show=False,
    ... )
    """
    check_save(save)
    if annotate < 0:
        raise ValueError(f"`annotate` must be >= 0, got {annotate}.")
    shifts, var_names = compute_shifts(
        adata,
        pred_layer=pred_layer,
        perturbation_key=perturbation_key,
        control_group=control_group,
        cell_type_key=cell_type_key,
        perturbations=perturbations,
        cell_type=cell_type,
        split_key=split_key,
        split_values=split_values,
        real_layer=real_layer,
        reference=reference,
    )
    if overlay:
        fig, axis = single_ax(ax, (panel_size[0] * 1.6, panel_size[1] * 1.5))
        axes = [axis] * len(shifts)
    elif len(shifts) > max_panels:
        raise ValueError(
            f"{len(shifts)} (cell type, perturbation) groups to plot, more than "
            f"`max_panels={max_panels}`; choose some with `perturbations=` / `cell_type=`, "
            "use `overlay=True`, or raise `max_panels`."
        )
    else:
        fig, axes = grid(
            len(shifts), ncols, panel_size, ax=ax, what="(cell type, perturbation) groups"
        )
    for axis, shift in zip(axes, shifts, strict=True):
        label = f"{_group_name(shift)}, r = {shift.pearson:.2f}" if overlay else None
        axis.scatter(
            shift.observed, shift.predicted, s=point_size, alpha=0.7, linewidths=0, label=label
        )
        _annotate(axis, shift, var_names, annotate)
        if not overlay:
            _decorate(axis, [shift])
            axis.set_title(f"{_group_name(shift)}\nr = {shift.pearson:.2f}", fontsize="medium")
    if not overlay:
        return finish(fig, axes, show=show, save=save, ax=ax)
    _decorate(axis, shifts)
    axis.set_title("Predicted vs observed shift from control")
    axis.legend(fontsize="small", frameon=False, loc="best")
    return finish(fig, axis, show=show, save=save, ax=ax)


def _group_name(shift: Shift) -> str:
    return f"{shift.perturbation} ({shift.cell_type})"


def _decorate(ax: Axes, shifts: list[Shift]) -> None:
    symmetric_limits(ax, *[s.observed for s in shifts], *[s.predicted for s in shifts])
    ax.axline((0.0, 0.0), slope=1.0, color="0.5", linestyle="--", linewidth=0.8, zorder=0)
    ax.axhline(0.0, color="0.85", linewidth=0.6, zorder=0)
    ax.axvline(0.0, color="0.85", linewidth=0.6, zorder=0)
    ax.set_xlabel("observed shift")
    ax.set_ylabel("predicted shift")


def _annotate(ax: Axes, shift: Shift, var_names: np.ndarray, n: int) -> None:
    for g in M.top_n_genes(shift.observed, n):
        ax.annotate(
            var_names[g],
            (shift.observed[g], shift.predicted[g]),
            fontsize="x-small",
            xytext=(2, 2),
            textcoords="offset points",
        )
