"""Early checks on user input, with errors that name the key or value at fault."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data._fields import missing_obs_key_error


def check_obs_key(adata, key: str | None, argument: str) -> None:
    """Raise a ``KeyError`` listing the obs columns when ``key`` is not one of them."""
    if key is not None and key not in adata.obs.columns:
        raise missing_obs_key_error(adata, key, argument)


def expression_matrix(adata, layer: str | None):
    """``adata.X`` or ``adata.layers[layer]``, with an error listing the layers if absent."""
    if layer is None:
        if adata.X is None:
            raise ValueError("`adata.X` is empty; pass `layer=` naming the expression layer.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"`layer={layer!r}` is not in `adata.layers`. Existing layers: {list(adata.layers.keys())}.")
    return adata.layers[layer]


def check_expression(X, *, where: str, chunk_rows: int = 65536) -> None:
    """Reject NaN, infinite and negative expression values, naming the first bad cells.

    The model generates non-negative log-normalised expression; raw counts must be normalised
    (``sc.pp.normalize_total`` then ``sc.pp.log1p``) and z-scored data is not supported.
    """
    n_obs = X.shape[0]
    for start in range(0, n_obs, chunk_rows):
        block = X[start : start + chunk_rows]
        if sp.issparse(block):
            block = block.tocsr()
            values = block.data
            rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        else:
            values = np.asarray(block).ravel()
            rows = np.repeat(np.arange(block.shape[0]), block.shape[1])
        bad_nan = ~np.isfinite(values)
        if bad_nan.any():
            cells = np.unique(rows[bad_nan] + start)
            raise ValueError(
                f"{where} holds NaN or infinite values in {len(cells)}+ cell(s) (first rows: "
                f"{cells[:5].tolist()}). Remove or impute them before registering."
            )
        bad_neg = values < 0
        if bad_neg.any():
            cells = np.unique(rows[bad_neg] + start)
            raise ValueError(
                f"{where} holds negative values in {len(cells)}+ cell(s) (first rows: "
                f"{cells[:5].tolist()}, min {values.min():.3g}). PTRAG models non-negative "
                "log-normalised expression: keep raw counts in a layer and run "
                "`sc.pp.normalize_total` + `sc.pp.log1p`, not `sc.pp.scale`."
            )


def check_controls_per_cell_type(is_control: np.ndarray, cell_types: np.ndarray, *, where: str) -> None:
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


def check_same_genes(var_names: pd.Index, reference: np.ndarray) -> None:
    """The AnnData must have the genes the model was trained on, in the same order."""
    reference = pd.Index(np.asarray(reference).astype(str))
    var_names = pd.Index(np.asarray(var_names).astype(str))
    if var_names.equals(reference):
        return
    missing = reference.difference(var_names)
    extra = var_names.difference(reference)
    if len(missing) == 0 and len(extra) == 0:
        raise ValueError(
            "The AnnData has the model's genes in a different order. Reorder it with "
            "`adata = adata[:, model.var_names].copy()`."
        )
    raise ValueError(
        f"The AnnData's genes differ from the {len(reference)} genes the model was trained on: "
        f"{len(missing)} missing (e.g. {missing[:5].tolist()}), {len(extra)} extra (e.g. "
        f"{extra[:5].tolist()}). Subset it with `adata[:, model.var_names]` if it holds all of them."
    )
