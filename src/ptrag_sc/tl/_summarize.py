"""Aggregate per-(cell type, perturbation) metrics into means with bootstrap intervals."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._utils import group_rng

if TYPE_CHECKING:
    from collections.abc import Sequence

#: Count columns of :func:`ptrag_sc.tl.evaluate` that are not metrics.
_COUNT_COLUMNS = ("n_cells", "n_cells_real")


def summarize(
    results: pd.DataFrame,
    *,
    by: str | Sequence[str] | None = ("method",),
    metrics: Sequence[str] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean of each metric over rows (perturbations) with a percentile bootstrap interval.

    Parameters
    ----------
    results
        Output of :func:`ptrag_sc.tl.evaluate` (one row per cell type and perturbation), or
        several such outputs concatenated (each carries a ``method`` column).
    by
        Column(s) to group by, e.g. ``"method"`` or ``("method", "cell_line")``; ``None``
        aggregates all rows together.
    metrics
        Metric columns to aggregate; by default every numeric column except the grouping
        columns and the cell counts ``n_cells`` / ``n_cells_real``.
    n_boot
        Bootstrap resamples of the rows (0 disables the interval).
    ci
        Coverage of the interval, in (0, 1).
    seed
        Seed of the bootstrap (with the group's and metric's names, on sorted values: results
        do not depend on the order of groups or rows).

    Returns
    -------
    Long :class:`pandas.DataFrame` with columns ``*by, metric, n, mean, std, ci_low, ci_high``:
    ``n`` the non-NaN values, ``std`` with ``ddof=1``, ``[ci_low, ci_high]`` the percentile
    bootstrap interval of the mean (NaN when ``n < 2`` or ``n_boot == 0``).

    Examples
    --------
    >>> import pandas as pd
    >>> import ptrag_sc
    >>> adata = ptrag_sc.datasets.perturbench_devel(subset="glioblastoma")
    >>> ptrag_sc.pp.few_shot_split(adata, held_out="U87MG", val=["PLK4"], test=["MAPK1", "SGK1"])
    >>> for name in ("control", "context_mean"):
    ...     ptrag_sc.tl.predict_baseline(adata, name, split_key="split", key_added=name)
    >>> res = pd.concat([ptrag_sc.tl.evaluate(adata, pred_layer=k, split_key="split")
    ...                  for k in ("control", "context_mean")])
    >>> table = ptrag_sc.tl.summarize(res, metrics=["pearson_delta", "energy"], n_boot=200)
    >>> table.pivot(index="method", columns="metric", values="mean").shape
    (2, 2)
    """
    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"`results` must be a pandas DataFrame, got {type(results).__name__}.")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"`ci={ci}` must lie in (0, 1).")
    if n_boot < 0:
        raise ValueError(f"`n_boot={n_boot}` must be >= 0.")
    by_cols: list[str] = [] if by is None else ([by] if isinstance(by, str) else list(by))
    for col in by_cols:
        if col not in results.columns:
            raise ValueError(
                f"`by` column {col!r} is not a column of `results`; existing columns: "
                f"{list(results.columns)}."
            )
    if metrics is None:
        metric_cols = [
            col
            for col in results.columns
            if col not in by_cols
            and col not in _COUNT_COLUMNS
            and pd.api.types.is_numeric_dtype(results[col])
            and not pd.api.types.is_bool_dtype(results[col])
        ]
    else:
        metric_cols = [metrics] if isinstance(metrics, str) else list(metrics)
        missing = [m for m in metric_cols if m not in results.columns]
        if missing:
            raise ValueError(
                f"`metrics` {missing} are not columns of `results`; existing columns: "
                f"{list(results.columns)}."
            )

    lo_q, hi_q = (1.0 - ci) / 2.0, 1.0 - (1.0 - ci) / 2.0
    groups = [((), results)] if not by_cols else results.groupby(by_cols, sort=True, dropna=False)
    records = []
    for key, frame in groups:
        key = key if isinstance(key, tuple) else (key,)
        for metric in metric_cols:
            values = pd.to_numeric(frame[metric], errors="coerce").to_numpy(dtype=np.float64)
            values = np.sort(values[np.isfinite(values)])  # row order does not matter
            n = values.size
            mean = float(values.mean()) if n else np.nan
            std = float(values.std(ddof=1)) if n > 1 else np.nan
            low = high = np.nan
            if n > 1 and n_boot > 0:
                rng = group_rng(seed, *map(str, key), metric)
                boot = values[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
                low, high = (float(v) for v in np.quantile(boot, [lo_q, hi_q]))
            records.append([*key, metric, n, mean, std, low, high])
    columns = [*by_cols, "metric", "n", "mean", "std", "ci_low", "ci_high"]
    return pd.DataFrame(records, columns=columns)
