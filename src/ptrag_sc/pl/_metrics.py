"""Compare methods on one metric, from ``tl.evaluate`` rows or a ``tl.summarize`` table."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..tl import LOWER_IS_BETTER, METRIC_COLUMNS, summarize
from ._utils import check_frame, check_save, finish, pick, shared_doc, single_ax

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from matplotlib.axes import Axes

_SUMMARY_COLUMNS = ("metric", "mean", "ci_low", "ci_high")


def is_summary(frame: pd.DataFrame) -> bool:
    """Whether ``frame`` looks like the output of :func:`ptrag_sc.tl.summarize`."""
    return all(c in frame.columns for c in _SUMMARY_COLUMNS)


@shared_doc
def metric_comparison(
    results_or_summary: pd.DataFrame,
    *,
    metric: str = "pearson_delta",
    method_key: str = "method",
    hue: str | None = None,
    order: Sequence[str] | None = None,
    hue_order: Sequence[str] | None = None,
    show_points: bool = True,
    ci: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Axes | None:
    """Methods compared on one metric: mean with a bootstrap interval, and the per-row values.

    From rows of :func:`ptrag_sc.tl.evaluate` (several methods concatenated), each row is a
    jittered point and the mean with its interval comes from :func:`ptrag_sc.tl.summarize`;
    from a ``tl.summarize`` table, its ``mean`` and ``[ci_low, ci_high]`` are drawn.

    Parameters
    ----------
    results_or_summary
        ``tl.evaluate`` rows or a ``tl.summarize`` table.
    metric
        Metric to compare (a column of ``tl.evaluate``, a value of the summary's ``metric``).
    method_key
        Column naming the method (x axis).
    hue
        Optional second grouping column (e.g. ``"cell_line"``): one colour per value, side by
        side. For a summary it must be one of the columns it was grouped by.
    order
        Methods to show, in this order (default: order of appearance).
    hue_order
        Values of ``hue`` to show, in this order.
    show_points
        Draw the per-row values (``tl.evaluate`` input only).
    ci, n_boot, seed
        Passed to :func:`ptrag_sc.tl.summarize` (``tl.evaluate`` input only).
    figsize
        Figure size when a new figure is made.
    %(ax_show_save)s

    Returns
    -------
    ``None`` when the figure is shown; otherwise the Axes. Its error bars are in
    ``ax.containers``, one per ``hue`` value, methods in x order.

    Examples
    --------
    >>> import pandas as pd
    >>> import ptrag_sc
    >>> adata = ptrag_sc.datasets.perturbench_devel(subset="glioblastoma")
    >>> ptrag_sc.pp.few_shot_split(
    ...     adata, held_out="U87MG", val=["PLK4"], test=["MAP2K3", "MAPK1", "SGK1", "TGFBR2"]
    ... )
    >>> for name in ("control", "context_mean", "other_cell_types"):
    ...     ptrag_sc.tl.predict_baseline(adata, name, split_key="split", key_added=name)
    >>> res = pd.concat(
    ...     [ptrag_sc.tl.evaluate(adata, pred_layer=name, split_key="split")
    ...      for name in ("control", "context_mean", "other_cell_types")]
    ... )
    >>> ax = ptrag_sc.pl.metric_comparison(res, metric="pearson_delta", show=False)
    >>> [t.get_text() for t in ax.get_xticklabels()]
    ['control', 'context_mean', 'other_cell_types']
    >>> table = ptrag_sc.tl.summarize(res, by="method")
    >>> ax = ptrag_sc.pl.metric_comparison(table, metric="mse", show=False)
    """
    check_save(save)
    frame = results_or_summary
    check_frame(frame, "results_or_summary", "`tl.evaluate` or `tl.summarize`")
    if method_key not in frame.columns:
        raise ValueError(
            f"`method_key={method_key!r}` is not a column; columns: {list(frame.columns)}."
        )
    if hue is not None and hue not in frame.columns:
        raise ValueError(f"`hue={hue!r}` is not a column; columns: {list(frame.columns)}.")
    by = [method_key] if hue is None else [method_key, hue]

    if is_summary(frame):
        available = list(dict.fromkeys(frame["metric"].astype(str)))
        if metric not in available:
            raise ValueError(
                f"`metric={metric!r}` is not in the summary; metrics there: {available}."
            )
        table = frame[frame["metric"].astype(str) == metric]
        if table.duplicated(by).any():
            others = [c for c in frame.columns if c not in (*_SUMMARY_COLUMNS, "n", "std", *by)]
            raise ValueError(
                f"The summary has several rows per {by}; it was grouped by more columns "
                f"({others}): pass one of them as `hue`, or summarise by {by} only."
            )
        rows = None
    else:
        if metric not in frame.columns:
            numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
            raise ValueError(
                f"`metric={metric!r}` is not a column of the results; numeric columns: {numeric}."
            )
        if not pd.api.types.is_numeric_dtype(frame[metric]):
            raise ValueError(f"`metric={metric!r}` is not a numeric column.")
        rows = frame
        table = summarize(frame, by=by, metrics=[metric], n_boot=n_boot, ci=ci, seed=seed)

    source = table if rows is None else rows  # order of appearance in the user's frame
    methods = pick(_present(source[method_key]), order, "order", f"column {method_key!r}")
    hues = [None] if hue is None else pick(_present(source[hue]), hue_order, "hue_order", hue)
    width = 0.8
    step = width / len(hues)
    if figsize is None:
        figsize = (max(3.0, 0.9 * len(methods) * max(1, len(hues) * 0.6) + 1.5), 3.6)
    fig, axis = single_ax(ax, figsize)
    rng = np.random.default_rng(seed)
    for h_i, level in enumerate(hues):
        color = f"C{h_i % 10}"
        offset = -width / 2 + step * (h_i + 0.5) if hue is not None else 0.0
        sub = table if level is None else table[table[hue].astype(str) == level]
        stats = sub.set_index(sub[method_key].astype(str)).reindex(methods)
        means, lows, highs = (
            stats[c].to_numpy(dtype=float) for c in ("mean", "ci_low", "ci_high")
        )
        x = np.arange(len(methods)) + offset
        if rows is not None and show_points:
            for x_i, m in zip(x, methods, strict=True):
                mask = rows[method_key].astype(str) == m
                if level is not None:
                    mask &= rows[hue].astype(str) == level
                values = pd.to_numeric(rows.loc[mask, metric], errors="coerce").to_numpy(float)
                values = values[np.isfinite(values)]
                if values.size:
                    jitter = rng.uniform(-0.3, 0.3, values.size) * step
                    axis.scatter(
                        x_i + jitter, values, s=12, color=color, alpha=0.35, linewidths=0, zorder=2
                    )
        has_ci = np.isfinite(lows) & np.isfinite(highs)
        yerr = np.vstack(
            [np.where(has_ci, means - lows, 0.0), np.where(has_ci, highs - means, 0.0)]
        )
        axis.errorbar(
            x,
            means,
            yerr=yerr,
            fmt="o",
            color=color,
            ecolor=color,
            capsize=4,
            markersize=6,
            zorder=3,
            label=level,
        )
    axis.set_xticks(
        np.arange(len(methods)),
        methods,
        rotation=30 if len(methods) > 3 else 0,
        ha="right" if len(methods) > 3 else "center",
    )
    axis.set_xlim(-0.6, len(methods) - 0.4)
    axis.set_ylabel(_metric_label(metric))
    axis.set_xlabel(method_key)
    what = (
        f"mean and {100 * ci:g}% bootstrap interval" if rows is not None else "mean and interval"
    )
    axis.set_title(f"{metric}: {what}", fontsize="medium")
    if hue is not None:
        axis.legend(title=hue, fontsize="small", frameon=False)
    return finish(fig, axis, show=show, save=save, ax=ax)


def _present(column: pd.Series) -> list[str]:
    return list(dict.fromkeys(column.astype(str)))


def _metric_label(metric: str) -> str:
    if metric in METRIC_COLUMNS and metric not in LOWER_IS_BETTER:
        return f"{metric} (higher is better)"
    if metric in LOWER_IS_BETTER:
        return f"{metric} (lower is better)"
    return metric
