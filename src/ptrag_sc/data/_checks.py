"""Checks of the data a model reads: expression values, control cells, obs columns, and an
AnnData against a registration (setup arguments, a saved model's genes and control label)."""

from __future__ import annotations

import numbers
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._checks import check_anndata, check_key_type
from ._cells import expression_matrix
from ._fields import missing_obs_key_error, read_labels, refuse_missing, refuse_no_controls
from ._matrix import iter_row_chunks
from ._perturbations import normalise_labels

if TYPE_CHECKING:
    import os

    from anndata import AnnData

    from ._matrix import MatrixLike

#: Largest absolute value accepted in an expression matrix (log1p data stays below ~15).
MAX_EXPRESSION = 1e4


def check_obs_key(adata: AnnData, key: str | None, argument: str) -> None:
    """Raise a ``KeyError`` listing the obs columns when ``key`` is not one of them."""
    if key is not None and key not in adata.obs.columns:
        raise missing_obs_key_error(adata, key, argument)


def check_expression(X: MatrixLike, *, where: str, warn_counts: bool = False) -> None:
    """Reject NaN, infinite, negative and huge expression values (streamed by chunks), naming
    the first bad cells; with ``warn_counts``, warn about integer data (raw counts)."""
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

    Each cache-sized slice is reduced while in cache; the integer test (``floor(v) == v``,
    20x cheaper than ``np.mod``) stops at the first slice with a fraction.
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
    """Raise the error of :func:`check_expression` for a chunk with NaN, inf or negative values."""
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


def check_setup_arguments(
    adata: AnnData,
    *,
    perturbation_key: str,
    control_group: str,
    cell_type_key: str | None,
    batch_key: str | None,
    layer: str | None,
    sep: str,
    where: str = "adata",
) -> None:
    """The checks of :func:`check_setup` that read no obs column."""
    check_anndata(adata, where)
    check_key_type("perturbation_key", perturbation_key, allow_none=False)
    check_key_type("cell_type_key", cell_type_key, allow_none=True)
    check_key_type("batch_key", batch_key, allow_none=True)
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"`layer` must be a layer name (str) or None, got {layer!r}.")
    for key, argument in ((cell_type_key, "cell_type_key"), (batch_key, "batch_key")):
        if key is not None and key == perturbation_key:
            raise ValueError(
                f"`{argument}={key!r}` is also the `perturbation_key`: the perturbation labels "
                f"cannot be the {argument.split('_key')[0].replace('_', ' ')} too. Pass the "
                "column that holds it (or None)."
            )
    if adata.is_view:
        raise ValueError(
            f"`{where}` is a view of another AnnData; registration writes keys into it. Pass a "
            "copy: `adata = adata[mask].copy()`."
        )
    if adata.n_vars == 0:
        raise ValueError(f"`{where}` has no genes (n_vars = 0).")
    if adata.n_obs == 0:
        raise ValueError(f"`{where}` has no cells (n_obs = 0).")
    if adata.var_names.has_duplicates:
        dup = adata.var_names[adata.var_names.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"`{where}.var_names` has duplicated genes (e.g. {dup}); run "
            "`.var_names_make_unique()`."
        )
    if not isinstance(control_group, str) or not control_group.strip():
        raise ValueError(f"`control_group` must be a non-empty string, got {control_group!r}.")
    if not isinstance(sep, str) or not sep or sep.isspace():
        raise ValueError(f"`perturbation_sep` must be a non-empty string, got {sep!r}.")


def check_setup(adata: AnnData, *, transfer: bool, **arguments: str | None) -> None:
    """Everything :meth:`~ptrag_sc.PTRAG.setup_anndata` checks before writing into the AnnData
    (``arguments``: those of :func:`check_setup_arguments`)."""
    check_setup_arguments(adata, **arguments)
    perturbation_key, control_group = arguments["perturbation_key"], arguments["control_group"]
    cell_type_key, layer = arguments["cell_type_key"], arguments["layer"]
    check_obs_key(adata, perturbation_key, "perturbation_key")
    for argument in ("cell_type_key", "batch_key"):
        key = arguments[argument]
        check_obs_key(adata, key, argument)
        if key is not None:
            check_categories(
                adata.obs[key], f"`adata.obs[{key!r}]` (`{argument}`)", adata.obs_names
            )
    labels = read_labels(
        adata,
        perturbation_key,
        control_group=control_group,
        sep=arguments["sep"],
        refuse_empty=not transfer,
    )
    X = expression_matrix(adata, layer)
    check_expression(
        X,
        where="`adata.X`" if layer is None else f"`adata.layers[{layer!r}]`",
        warn_counts=not transfer,
    )
    if transfer:
        return
    refuse_no_controls(adata, perturbation_key, labels, control_group)
    cell_types = (
        adata.obs[cell_type_key].astype(str).to_numpy()
        if cell_type_key is not None
        else np.full(adata.n_obs, "all")
    )
    check_controls_per_cell_type(labels == control_group, cell_types, where="the AnnData")


def check_categories(values: pd.Series, where: str, cell_names: pd.Index) -> None:
    """A cell-type or batch column scvi-tools can turn into categories: no missing value, no mix
    of strings with numbers (which cannot be sorted)."""
    refuse_missing(values, where, cell_names)
    items = values.cat.categories if isinstance(values.dtype, pd.CategoricalDtype) else values
    if items.dtype == object:
        kinds = {
            "str"
            if isinstance(v, str)
            else "number"
            if isinstance(v, numbers.Number)
            else type(v).__name__
            for v in pd.unique(items)
        }
        if len(kinds) > 1:
            raise ValueError(
                f"{where} mixes values of types {sorted(kinds)}, which cannot be ordered as "
                "categories. Make it one type, e.g. `.astype(str)`."
            )


def check_genes(adata: AnnData, var_names: np.ndarray, dir_path: str | os.PathLike) -> None:
    """``adata`` has exactly a saved model's genes, in the model's order."""
    reference = pd.Index(np.asarray(var_names).astype(str))
    genes = pd.Index(np.asarray(adata.var_names).astype(str))
    if genes.equals(reference):
        return
    missing, extra = reference.difference(genes), genes.difference(reference)
    if len(missing) == 0 and len(extra) == 0:
        raise ValueError(
            "The AnnData has the model's genes in a different order; predictions and training "
            "would mix up genes. Reorder it first: `genes = PTRAG.load(dir_path, "
            "adata=False).var_names`, then `adata = adata[:, genes].copy()` "
            f"(dir_path={str(dir_path)!r})."
        )
    raise ValueError(
        f"The AnnData's genes differ from the {len(reference)} genes the model was trained on: "
        f"{len(missing)} missing (e.g. {missing[:5].tolist()}), {len(extra)} extra (e.g. "
        f"{extra[:5].tolist()}). If it holds all of them, subset it with `adata[:, "
        "model.var_names]` (model loaded without an AnnData)."
    )


def check_control_label(adata: AnnData, setup_args: dict, embeddings: pd.DataFrame | None) -> None:
    """Loading onto data with another control label: labels without a gene embedding, where no
    cell has the saved ``control_group``, are named as the likely control label."""
    from ._perturbations import PerturbationEncoder

    key, control = setup_args.get("perturbation_key"), setup_args.get("control_group")
    sep = setup_args.get("perturbation_sep", "+")
    if (
        key not in adata.obs.columns
        or not isinstance(embeddings, pd.DataFrame)
        or adata.obs[key].isna().any()
    ):
        return  # registration names these problems
    raw = pd.unique(adata.obs[key].astype(str).to_numpy())
    labels = normalise_labels(raw, control_group=control, sep=sep)
    if (labels == control).any():
        return
    unknown = set(PerturbationEncoder(embeddings, sep=sep).missing(labels))
    written = [r for r, label in zip(raw, labels, strict=True) if label in unknown]
    if written:
        raise ValueError(
            f"No cell of `adata.obs[{key!r}]` has the control label {control!r} the model was "
            f"saved with (`control_group`), and the label(s) {written[:5]} have no gene "
            f"embedding. If they mark the control cells, relabel them: `adata.obs[{key!r}] = "
            f"adata.obs[{key!r}].replace({{{written[0]!r}: {control!r}}})`."
        )
