"""Shared plumbing of the plotting functions: figures, ``show`` / ``save`` handling."""

from __future__ import annotations

import inspect
import math
import os
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: The parameters every plot shares, put into its docstring's ``%(ax_show_save)s`` field.
_SHARED_PARAMETERS = {
    "ax_show_save": """\
ax
    Axes to draw into, for a plot of a single panel; default: a new figure.
show
    Show the figure; default: when the function made it.
save
    File path to save the figure to (format from the extension)."""
}
_Documented = TypeVar("_Documented")

#: Backends that cannot display a window; ``plt.show()`` would only warn there.
_NON_INTERACTIVE = ("agg", "pdf", "ps", "svg", "pgf", "cairo", "template")


def shared_doc(func: _Documented) -> _Documented:
    """Fill the shared parameters into ``func``'s docstring (as ``model._docs.fill`` does)."""
    func.__doc__ = inspect.cleandoc(func.__doc__) % _SHARED_PARAMETERS
    return func


def check_ax(ax: object) -> None:
    """Raise a TypeError unless ``ax`` is ``None`` or a matplotlib Axes."""
    from matplotlib.axes import Axes

    if ax is not None and not isinstance(ax, Axes):
        raise TypeError(f"`ax` must be a matplotlib Axes or None, got {type(ax).__name__}.")


def check_save(save: object) -> None:
    """Raise a TypeError unless ``save`` is ``None``, a str or a path."""
    if save is not None and (isinstance(save, bool) or not isinstance(save, str | os.PathLike)):
        raise TypeError(
            f"`save` must be a file path (e.g. 'figure.png') or None, got {save!r}; the file "
            "format follows the extension."
        )


def check_frame(frame: object, argument: str, source: str, required: Sequence[str] = ()) -> None:
    """Raise unless ``frame`` is a non-empty DataFrame of ``source`` with ``required`` columns."""
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        raise TypeError(
            f"`{argument}` must be the DataFrame of {source}, got {type(frame).__name__}."
        )
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(
            f"`{argument}` lacks column(s) {missing}; expected the output of {source} (columns: "
            f"{list(frame.columns)})."
        )
    if frame.empty:
        raise ValueError(f"`{argument}` is empty.")


def pick(
    present: list[str], wanted: Sequence[str] | str | None, argument: str, where: str
) -> list[str]:
    """``wanted`` as a list of str, each checked to be in ``present`` (``present`` if None)."""
    if wanted is None:
        return present
    wanted = [wanted] if isinstance(wanted, str) else [str(w) for w in wanted]
    unknown = [w for w in wanted if w not in present]
    if unknown:
        raise ValueError(f"`{argument}` {unknown} not in {where}; values there: {present[:20]}.")
    return wanted


def single_ax(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """The given Axes and its figure, or a new figure with one Axes."""
    import matplotlib.pyplot as plt

    check_ax(ax)
    return (ax.figure, ax) if ax is not None else plt.subplots(figsize=figsize)


def grid(
    n_panels: int,
    ncols: int,
    panel_size: tuple[float, float],
    *,
    ax: Axes | None = None,
    what: str,
) -> tuple[Figure, list[Axes]]:
    """A figure with ``n_panels`` Axes on a grid of ``ncols`` columns (unused cells removed).

    ``ax`` is accepted only for a single panel; several panels need their own figure.
    """
    import matplotlib.pyplot as plt

    check_ax(ax)
    if ax is not None:
        if n_panels != 1:
            raise ValueError(
                f"`ax` holds a single panel but this plot has {n_panels} {what}; pass `ax=None` "
                "(a new figure is made) or restrict the selection to one panel."
            )
        return ax.figure, [ax]
    if ncols < 1:
        raise ValueError(f"`ncols` must be at least 1, got {ncols}.")
    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
        squeeze=False,
        layout="constrained",
    )
    flat = list(axes.ravel())
    for extra in flat[n_panels:]:
        fig.delaxes(extra)
    return fig, flat[:n_panels]


def finish(
    fig: Figure,
    axes: Axes | list[Axes],
    *,
    show: bool | None,
    save: str | os.PathLike[str] | None,
    ax: Axes | None,
) -> Axes | list[Axes] | None:
    """Save and/or show the figure; return the Axes (a single one unwrapped) unless shown.

    ``show=None`` shows the figure when the function made it (no ``ax`` given), scanpy-style;
    a figure drawn into a caller's ``ax`` is left for the caller to finish.
    """
    import matplotlib
    import matplotlib.pyplot as plt

    if save is not None:
        fig.savefig(os.fspath(save), bbox_inches="tight")
    if show is None:
        show = ax is None
    if show:
        if matplotlib.get_backend().lower() not in _NON_INTERACTIVE:
            plt.show()
        return None
    return axes[0] if isinstance(axes, list) and len(axes) == 1 else axes


def symmetric_limits(ax: Axes, *values: np.ndarray, margin: float = 0.05) -> None:
    """Same limits on both axes, covering all ``values`` (for predicted-vs-observed plots)."""
    finite = np.concatenate([np.asarray(v, dtype=float).ravel() for v in values])
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return
    lo, hi = float(finite.min()), float(finite.max())
    pad = (hi - lo) * margin or 1.0
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
