"""Training curves of a :class:`ptrag_sc.PTRAG` model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._utils import check_save, finish, grid, shared_doc

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from matplotlib.axes import Axes

    from ..model import PTRAG

#: Panels of :func:`training_history` and the ``model.history`` keys each one draws.
PANELS = {
    "energy": ("train_energy", "validation_energy"),
    "loss": ("train_loss", "validation_loss"),
    "active_ratio": ("train_active_ratio", "validation_active_ratio"),
}
_YLABEL = {
    "energy": "energy distance",
    "loss": "loss (the objective)",
    "active_ratio": "active-candidate ratio",
}


@shared_doc
def training_history(
    model_or_history: PTRAG | Mapping[str, pd.DataFrame],
    *,
    panels: Sequence[str] | str | None = None,
    mark_best: bool = True,
    panel_size: tuple[float, float] = (4.0, 3.0),
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Axes | list[Axes] | None:
    """Training and validation curves over epochs.

    Panels: ``"energy"`` (energy distance between predicted and observed sets), ``"loss"``
    (the objective, whose validation value model selection watches) and ``"active_ratio"``
    (fraction of stage-1 candidates stage 2 keeps), per epoch (one check interval).

    Parameters
    ----------
    model_or_history
        A trained :class:`ptrag_sc.PTRAG` or its ``model.history`` (one-column DataFrames
        indexed by epoch).
    panels
        Panels to draw, in order. Default: ``"energy"`` and, when recorded,
        ``"active_ratio"``.
    mark_best
        Mark ``model.best_epoch_`` (whose weights were kept) with a vertical line.
    panel_size
        Width and height of one panel, in inches.
    %(ax_show_save)s

    Returns
    -------
    ``None`` when the figure is shown; otherwise the Axes (one panel) or a list of Axes,
    one per panel.

    Raises
    ------
    RuntimeError
        If the model is not trained.
    ValueError
        If a requested panel was not recorded (e.g. ``"active_ratio"`` for
        ``retrieval="none"``).

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
    >>> axes = ptrag_sc.pl.training_history(model, show=False)
    >>> [a.get_title() for a in axes]
    ['energy', 'active_ratio']
    """
    check_save(save)
    history, best = _history(model_or_history)
    if panels is None:
        panels = [p for p in ("energy", "active_ratio") if set(PANELS[p]) & set(history)]
    else:
        panels = [panels] if isinstance(panels, str) else list(panels)
    if not panels:
        raise ValueError(
            f"No energy or active-ratio curves in the history; keys: {sorted(history)}."
        )
    for panel in panels:
        if panel not in PANELS:
            raise ValueError(f"Unknown panel {panel!r}; choose from {list(PANELS)}.")
        if not any(key in history for key in PANELS[panel]):
            raise ValueError(
                f"Panel {panel!r} needs {list(PANELS[panel])} in the history, which holds "
                f"{sorted(history)}."
            )
    fig, axes = grid(len(panels), len(panels), panel_size, ax=ax, what="panels")
    for axis, panel in zip(axes, panels, strict=True):
        for key, style in zip(PANELS[panel], ({}, {"marker": "o", "markersize": 3}), strict=True):
            if key not in history:
                continue
            series = _series(history[key], key)
            axis.plot(series.index.to_numpy(), series.to_numpy(), label=key.split("_")[0], **style)
        if mark_best and best is not None:
            axis.axvline(best, color="0.4", linestyle=":", linewidth=1, label="kept weights")
        axis.set_xlabel("epoch")
        axis.set_ylabel(_YLABEL[panel])
        axis.set_title(panel)
        axis.legend(fontsize="small", frameon=False)
    return finish(fig, axes, show=show, save=save, ax=ax)


def _history(obj: object) -> tuple[dict, int | None]:
    """The history dict and the kept epoch (``None`` when unknown)."""
    if isinstance(obj, Mapping):
        if not obj:
            raise ValueError("The history is empty.")
        return dict(obj), None
    if not hasattr(obj, "history"):
        raise TypeError(
            "`model_or_history` must be a PTRAG model or its `model.history` dict, got "
            f"{type(obj).__name__}."
        )
    if not getattr(obj, "is_trained", True) or obj.history is None:
        raise RuntimeError("Model not trained. Call `model.train()` first.")
    best = getattr(obj, "best_epoch_", None)
    return dict(obj.history), None if best is None else int(best)


def _series(value: object, key: str) -> pd.Series:
    if isinstance(value, pd.DataFrame):
        if value.shape[1] != 1:
            raise ValueError(f"history[{key!r}] must have one column, got {value.shape[1]}.")
        value = value.iloc[:, 0]
    if not isinstance(value, pd.Series):
        value = pd.Series(np.asarray(value, dtype=float))
    return pd.to_numeric(value, errors="coerce")
