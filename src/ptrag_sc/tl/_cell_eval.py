"""Export a prediction layer as the (predicted, real) AnnData pair read by ``cell-eval``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import (
    DEFAULT_CONTROL_GROUP,
    DEFAULT_PERTURBATION_KEY,
    DEFAULT_PRED_LAYER,
)
from ._utils import (
    as_str_tuple,
    check_obs_key,
    dense_rows,
    finite_rows,
    get_matrix,
    in_values,
    labels,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

#: File names written under ``path`` by :func:`to_cell_eval`.
CELL_EVAL_FILES = ("pred.h5ad", "real.h5ad")


def to_cell_eval(
    adata: AnnData,
    *,
    pred_layer: str = DEFAULT_PRED_LAYER,
    perturbation_key: str = DEFAULT_PERTURBATION_KEY,
    control_group: str = DEFAULT_CONTROL_GROUP,
    cell_type_key: str | None = None,
    cell_types: Sequence[str] | str | None = None,
    perturbations: Sequence[str] | None = None,
    split_key: str | None = None,
    split_values: Sequence[str] | str = ("test",),
    real_layer: str | None = None,
    path: str | Path | None = None,
    pert_col: str = "target_gene",
    control_pert: str = "non-targeting",
) -> tuple[AnnData, AnnData]:
    """Build the ``(adata_pred, adata_real)`` pair that ``cell_eval.MetricsEvaluator`` reads.

    Both hold the same cells and genes in the same order, log1p values as dense float32 ``X``
    and the label in ``obs[pert_col]`` (controls renamed ``control_pert``). Cells: the selected
    perturbed cells with a finite prediction, plus every control cell of their cell type(s).
    ``adata_real`` carries the real expression; ``adata_pred`` the prediction on perturbed cells
    and the real values on controls, so both sides share their control means (as
    :func:`ptrag_sc.tl.evaluate`).

    cell-eval compares every perturbation with one control group: with several cell types
    (``obs[cell_type_key]`` is kept), split the pair per cell type first (cell-eval's
    ``--celltype-col`` or ``cell_eval.utils.split_anndata_on_celltype``). cell-eval treats
    data without fractional values as counts and rejects log1p values >= 15 or < 0 (warned
    here).

    Parameters
    ----------
    adata
        Cells with real expression and ``layers[pred_layer]``. Never modified.
    pred_layer
        Layer holding the prediction.
    perturbation_key
        obs column with perturbation labels.
    control_group
        Label of control cells in ``adata``.
    cell_type_key
        obs column with the cell type, or ``None`` (all cells one context).
    cell_types
        Cell type(s) to export (needs ``cell_type_key``); default: all.
    perturbations
        Perturbations to export (default: all).
    split_key
        obs column with the data split; perturbed cells whose value is not in
        ``split_values`` are left out (controls are kept).
    split_values
        Split values to export.
    real_layer
        Layer with the real expression; ``None`` uses ``X``.
    path
        Optional directory to write ``pred.h5ad`` and ``real.h5ad`` to.
    pert_col
        Name of the perturbation column in the exported objects (cell-eval's ``pert_col``).
    control_pert
        Control label in the exported objects (cell-eval's ``control_pert``).

    Returns
    -------
    ``(adata_pred, adata_real)``.

    Examples
    --------
    >>> import ptrag_sc
    >>> adata = ptrag_sc.datasets.perturbench_devel(subset="glioblastoma")
    >>> ptrag_sc.pp.few_shot_split(adata, held_out="U87MG", val=["PLK4"], test=["MAPK1", "SGK1"])
    >>> ptrag_sc.tl.predict_baseline(adata, "context_mean", split_key="split", key_added="ptrag")
    >>> pred, real = ptrag_sc.tl.to_cell_eval(
    ...     adata, cell_type_key="cell_line", cell_types="U87MG", split_key="split"
    ... )
    >>> sorted(set(pred.obs["target_gene"])), pred.shape == real.shape
    (['MAPK1', 'SGK1', 'non-targeting'], True)

    With cell-eval installed (``pip install "ptrag-sc[cell-eval]"``; or ``cell-eval run -ap
    pred.h5ad -ar real.h5ad --pert-col target_gene`` on the written files)::

        from cell_eval import MetricsEvaluator
        ev = MetricsEvaluator(pred, real, pert_col="target_gene", control_pert="non-targeting")
        results, agg = ev.compute(profile="minimal")
    """
    import anndata as ad

    pred_mat = get_matrix(adata, pred_layer, "pred_layer")
    real_mat = get_matrix(adata, real_layer, "real_layer")
    pert = labels(adata, perturbation_key, "perturbation_key")
    is_ctrl = pert == control_group
    if not is_ctrl.any():
        raise ValueError(
            f"No control cells: no cell has obs[{perturbation_key!r}] == {control_group!r} "
            "(`control_group`); cell-eval needs control cells in both objects."
        )
    keep = ~is_ctrl & in_values(pert, as_str_tuple(perturbations))
    if cell_types is not None and cell_type_key is None:
        raise ValueError("`cell_types` needs `cell_type_key` (the obs column of cell types).")
    if cell_type_key is not None:
        ct = labels(adata, cell_type_key, "cell_type_key")
        wanted = as_str_tuple(cell_types)
        unknown = [c for c in wanted or () if c not in set(ct)]
        if unknown:
            raise ValueError(
                f"`cell_types` {unknown} not found in obs[{cell_type_key!r}]; existing: "
                f"{sorted(set(ct))}."
            )
        keep &= in_values(ct, wanted)
    if split_key is not None:
        check_obs_key(adata, split_key, "split_key")
        keep &= in_values(adata.obs[split_key].astype(str).to_numpy(), as_str_tuple(split_values))
    pert_idx = np.flatnonzero(keep)
    finite = finite_rows(pred_mat, pert_idx)
    if not finite.all():
        warnings.warn(
            f"{int((~finite).sum())} selected perturbed cell(s) have non-finite predictions in "
            f"layers[{pred_layer!r}] and are left out of both objects.",
            UserWarning,
            stacklevel=2,
        )
    pert_idx = pert_idx[finite]
    if pert_idx.size == 0:
        raise ValueError("No perturbed cell with a finite prediction matches the selection.")
    if cell_type_key is not None:
        selected = sorted(set(ct[pert_idx]))
        ctrl_idx = np.flatnonzero(is_ctrl & in_values(ct, selected))
        lacking = sorted(set(selected) - set(ct[ctrl_idx]))
        if lacking:
            raise ValueError(
                f"No control cells (obs[{perturbation_key!r}] == {control_group!r}) for cell "
                f"type(s) {lacking} (obs[{cell_type_key!r}]); cell-eval needs them."
            )
    else:
        ctrl_idx = np.flatnonzero(is_ctrl)
    cells = np.concatenate([ctrl_idx, pert_idx])

    real_x = dense_rows(real_mat, cells, dtype=np.float32)
    pred_x = real_x.copy()
    pred_x[ctrl_idx.size :] = dense_rows(pred_mat, pert_idx, dtype=np.float32)
    for name, x in (("real", real_x), ("pred", pred_x)):
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi >= 15:
            warnings.warn(
                f"The {name} values span [{lo:.3g}, {hi:.3g}]; cell-eval expects log1p data in "
                "[0, 15) and will reject this pair.",
                UserWarning,
                stacklevel=2,
            )

    new_labels = np.where(is_ctrl[cells], control_pert, pert[cells]).astype(str)
    obs = pd.DataFrame(index=pd.Index(np.asarray(adata.obs_names)[cells], dtype=str))
    obs[pert_col] = pd.Categorical(new_labels)
    if cell_type_key is not None and cell_type_key != pert_col:
        obs[cell_type_key] = pd.Categorical(ct[cells])
    var = pd.DataFrame(index=pd.Index(np.asarray(adata.var_names), dtype=str))
    adata_real = ad.AnnData(X=real_x, obs=obs.copy(), var=var.copy())
    adata_pred = ad.AnnData(X=pred_x, obs=obs.copy(), var=var.copy())
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        adata_pred.write_h5ad(Path(path) / CELL_EVAL_FILES[0])
        adata_real.write_h5ad(Path(path) / CELL_EVAL_FILES[1])
    return adata_pred, adata_real
