"""Pairing of perturbed cells with control cells of the same context."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from collections.abc import Sequence


def context_codes(*columns: Sequence) -> np.ndarray:
    """Integer code of each row's combination of context columns (cell type, batch, ...)."""
    frame = pd.DataFrame({i: np.asarray(col, dtype=object) for i, col in enumerate(columns)})
    return frame.groupby(list(frame.columns), sort=True, dropna=False).ngroup().to_numpy()


def match_controls(
    is_control: np.ndarray,
    *context: Sequence,
    seed: int = 0,
    query: np.ndarray | None = None,
) -> np.ndarray:
    """Draw, for each query cell, one control cell that shares its context.

    Parameters
    ----------
    is_control
        Boolean mask of control cells, length ``n_obs``.
    *context
        Columns (length ``n_obs``) whose joint value defines a context, e.g. the cell type and,
        optionally, the batch. With no column, every cell shares one context.
    seed
        Seed of the draw; the same seed gives the same pairs.
    query
        Boolean mask of the cells to pair; defaults to all non-control cells.

    Returns
    -------
    Array of length ``n_obs`` holding the index of the paired control cell for query cells and
    ``-1`` elsewhere. Control cells are drawn uniformly with replacement within each context.

    Raises
    ------
    ValueError
        If a context holding query cells has no control cell.
    """
    is_control = np.asarray(is_control, dtype=bool)
    n_obs = is_control.shape[0]
    query = ~is_control if query is None else np.asarray(query, dtype=bool)
    codes = context_codes(*context) if context else np.zeros(n_obs, dtype=np.int64)
    rng = np.random.default_rng(seed)
    paired = np.full(n_obs, -1, dtype=np.int64)
    control_idx = np.flatnonzero(is_control)
    control_codes = codes[control_idx]
    order = np.argsort(control_codes, kind="stable")
    control_idx, control_codes = control_idx[order], control_codes[order]
    query_idx = np.flatnonzero(query)
    query_codes = codes[query_idx]
    starts = np.searchsorted(control_codes, query_codes, side="left")
    stops = np.searchsorted(control_codes, query_codes, side="right")
    counts = stops - starts
    if np.any(counts == 0):
        missing = np.unique(query_codes[counts == 0])
        examples = []
        for code in missing[:5]:
            first = query_idx[query_codes == code][0]
            examples.append(tuple(str(np.asarray(col)[first]) for col in context) or ("all",))
        raise ValueError(
            f"No control cells for {len(missing)} context(s) that hold perturbed cells, e.g. "
            f"{examples}. Every cell type (and batch, when matching on batch) needs control cells."
        )
    offsets = np.floor(rng.random(query_idx.shape[0]) * counts).astype(np.int64)
    paired[query_idx] = control_idx[starts + offsets]
    return paired
