"""Checks of the data a model reads: expression values, control cells, obs columns."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._fields import missing_obs_key_error
from ._matrix import iter_row_chunks

if TYPE_CHECKING:
    from anndata import AnnData

    from ._matrix import MatrixLike

__all__ = ["check_controls_per_cell_type", "check_expression", "check_obs_key"]

#: Largest absolute value accepted in an expression matrix (log1p data stays below ~15).
MAX_EXPRESSION = 1e4


def check_obs_key(adata: AnnData, key: str | None, argument: str) -> None:
    """Raise a ``KeyError`` listing the obs columns when ``key`` is not one of them."""
    if key is not None and key not in adata.obs.columns:
        raise missing_obs_key_error(adata, key, argument)


def check_expression(X: MatrixLike, *, where: str, warn_counts: bool = False) -> None:
    """Reject NaN, infinite and negative expression values (streamed by chunks), naming the first
    bad cells.

    The model generates non-negative log-normalised expression; raw counts must be normalised
    (``sc.pp.normalize_total`` then ``sc.pp.log1p``) and z-scored data is not supported. With
    ``warn_counts``, integer-valued data (raw counts) gets a warning saying so.
    """
    all_integer = warn_counts
    largest = 0.0
    for start, block in iter_row_chunks(X):
        values = block.data if sp.issparse(block) else np.asarray(block).ravel()
        if values.size == 0:
            continue
        low, high, all_integer = _scan(values, all_integer)
        # Cells are located only when something is wrong.
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0:
            _raise_bad_values(block, values, start, where)
        largest = max(largest, float(high))
    if largest > MAX_EXPRESSION:
        raise ValueError(
            f"{where} holds values up to {largest:.3g}: PTRAG models log-normalised expression "
            "(typically below 15). Run `sc.pp.normalize_total` + `sc.pp.log1p` first."
        )
    if warn_counts and all_integer and largest > 0:
        warnings.warn(
            f"{where} holds only integer values, which look like raw counts. PTRAG models "
            "log-normalised expression: run `sc.pp.normalize_total(adata)` and "
            "`sc.pp.log1p(adata)` (keep the counts in a layer) before `setup_anndata`.",
            UserWarning,
            stacklevel=3,
        )


#: Values per slice in :func:`_scan`: a slice stays in cache between its reductions.
_SLICE = 1 << 18


def _scan(values: np.ndarray, integer: bool) -> tuple[float, float, bool]:
    """Minimum and maximum of ``values`` (NaN when one is NaN) and whether all are integer.

    One read of memory: each cache-sized slice is reduced twice while in cache. The integer
    test (``floor(v) == v``; ``np.mod`` costs ~20x more per value) runs only while ``integer``
    holds and stops at the first slice with a fraction, so log-normalised data settle it at
    once and only integer data (raw counts) are tested through.
    """
    test = integer and values.dtype.kind == "f"  # other dtypes hold integers only
    lows, highs = [], []
    for i in range(0, values.size, _SLICE):
        part = values[i : i + _SLICE]
        lows.append(part.min())
        highs.append(part.max())
        if test:
            integer = test = bool(np.array_equal(np.floor(part), part))
    return np.min(lows), np.max(highs), integer


def _raise_bad_values(
    block: np.ndarray | sp.csr_matrix, values: np.ndarray, start: int, where: str
) -> None:
    """Raise the error of :func:`check_expression` for a chunk holding NaN, infinite or negative
    values."""
    if sp.issparse(block):
        rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
    else:
        rows = np.repeat(np.arange(block.shape[0]), block.shape[1])
    bad_nan = ~np.isfinite(values)
    if bad_nan.any():
        cells = np.unique(rows[bad_nan] + start)
        raise ValueError(
            f"{where} holds NaN or infinite values in {len(cells)}+ cell(s) (first rows: "
            f"{cells[:5].tolist()}). Remove or impute them before registering."
        )
    bad_neg = values < 0
    cells = np.unique(rows[bad_neg] + start)
    raise ValueError(
        f"{where} holds negative values in {len(cells)}+ cell(s) (first rows: "
        f"{cells[:5].tolist()}, min {values.min():.3g}). PTRAG models non-negative "
        "log-normalised expression: keep raw counts in a layer and run "
        "`sc.pp.normalize_total` + `sc.pp.log1p`, not `sc.pp.scale`."
    )


def check_controls_per_cell_type(
    is_control: np.ndarray, cell_types: np.ndarray, *, where: str
) -> None:
    """Every cell type holding perturbed cells needs control cells."""
    frame = pd.DataFrame({"ct": cell_types, "ctrl": is_control})
    has_ctrl = frame.groupby("ct", observed=True)["ctrl"].any()
    missing = has_ctrl.index[~has_ctrl.to_numpy()].astype(str).tolist()
    if missing:
        raise ValueError(
            f"No control cells for cell type(s) {missing[:10]} in {where}: perturbed cells are "
            "generated from control cells of their own cell type. Add control cells of these "
            "cell types or drop their cells."
        )
