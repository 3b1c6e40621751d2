"""Reader for the Replogle–Nadig Perturb-seq compilation used by STATE and PT-RAG."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import DEFAULT_CONTROL_GROUP

if TYPE_CHECKING:
    import h5py
    from anndata import AnnData

__all__ = ["read_replogle_nadig"]

REQUIRED_OBS = ("gene", "cell_line", "gem_group")
#: uns keys searched, in order, for the names of the ``X_hvg`` columns.
UNS_NAME_KEYS = ("hvg_names", "X_hvg_names", "hvg_genes", "highly_variable_genes", "hvg")


def _names_from_uns(
    f: h5py.File, width: int, hvg_key: str
) -> tuple[np.ndarray | None, str | None]:
    from anndata.io import read_elem

    if "uns" not in f:
        return None, None
    for key in (f"{hvg_key}_names", *UNS_NAME_KEYS):
        if key not in f["uns"]:
            continue
        try:
            value = read_elem(f["uns"][key])
        except Exception:  # an unreadable candidate is simply not used
            continue
        arr = np.asarray(value)
        if arr.ndim == 1 and arr.shape[0] == width and arr.dtype.kind in {"U", "S", "O"}:
            return arr.astype(str), f"uns[{key!r}]"
    return None, None


def read_replogle_nadig(
    path: str | os.PathLike[str],
    *,
    backed: bool | Literal["r"] = False,
    hvg_key: str = "X_hvg",
    var_names: Sequence[str] | None = None,
) -> AnnData:
    """Read the Replogle–Nadig compilation (``replogle.h5ad`` of STATE / PT-RAG).

    The file holds about 643k CRISPRi Perturb-seq cells of four cell lines (K562, RPE1 from
    Replogle et al. 2022; HepG2, Jurkat from Nadig et al. 2025), with obs ``gene`` (target;
    control ``"non-targeting"``), ``cell_line`` and ``gem_group``, and the log-normalised
    expression of 2,000 highly variable genes in ``obsm["X_hvg"]``. The schema is checked
    first (only ``obs`` and the HVG matrix's shape are read), then an AnnData whose ``X`` is
    the HVG matrix is built; the full-transcriptome ``X`` of the file is never read, and the
    HVG matrix is read once, without further copies.

    Names of the HVG columns (``var_names``), first match wins:

    1. the ``var_names`` argument;
    2. a string array of the right length in the file's ``uns`` (``"X_hvg_names"``,
       ``"hvg_names"``, ``"hvg_genes"``, ``"highly_variable_genes"``, ``"hvg"``);
    3. ``var_names[var["highly_variable"]]`` of the file when that mask selects exactly as
       many genes: the STATE / cell-load convention, where ``X_hvg`` is
       ``X[:, var.highly_variable]``;
    4. the file's ``var_names`` if ``var`` already has that many rows;
    5. otherwise generated names ``hvg_0000``, ``hvg_0001``, ... (with a warning).

    The choice is recorded in ``uns["replogle_nadig"]["var_names_source"]``.

    Parameters
    ----------
    path
        Path to ``replogle.h5ad``.
    backed
        ``False`` loads the HVG matrix into memory (about 5 GB as dense float32 for the full
        file). ``True`` / ``"r"`` leaves it on disk: ``X`` is then a lazy h5py dataset (dense)
        or anndata sparse dataset; the file stays open for reading while the AnnData is used
        (``adata[idx].to_memory()`` loads a subset).
    hvg_key
        obsm key of the HVG matrix.
    var_names
        Names of the HVG columns, overriding what the file provides.

    Returns
    -------
    :class:`~anndata.AnnData` with ``X`` = the HVG matrix, the file's ``obs`` and, in ``var``,
    the file's var columns for those genes when the names were matched to them.

    Raises
    ------
    FileNotFoundError, KeyError, ValueError
        If the file, an obs column, the obsm matrix or the control label are missing or the
        shapes disagree; the message names what is missing and what is available.

    Examples
    --------
    >>> import ptrag_sc
    >>> adata = ptrag_sc.datasets.read_replogle_nadig("replogle.h5ad")  # doctest: +SKIP
    >>> ptrag_sc.pp.few_shot_split(
    ...     adata, held_out="hepg2", preset="replogle_nadig"
    ... )  # doctest: +SKIP
    """
    import anndata
    import h5py
    from anndata.io import read_elem, sparse_dataset

    if backed not in (False, True, "r"):
        raise ValueError(f"`backed` must be False, True or 'r', got {backed!r}.")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Replogle–Nadig file not found: {path}")

    f = h5py.File(path, "r")
    keep_open = False
    try:
        if "obs" not in f:
            raise ValueError(f"{path} is not an AnnData .h5ad file (no 'obs' group).")
        obs = read_elem(f["obs"])
        missing = [c for c in REQUIRED_OBS if c not in obs.columns]
        if missing:
            raise KeyError(
                f"{path}: obs column(s) {missing} missing (Replogle–Nadig schema needs "
                f"{list(REQUIRED_OBS)}); available obs columns: {list(map(str, obs.columns))}."
            )
        for col in ("gene", "cell_line"):
            if obs[col].isna().any():
                raise ValueError(
                    f"{path}: obs[{col!r}] has {int(obs[col].isna().sum())} missing values."
                )
        if not (obs["gene"].astype(str) == DEFAULT_CONTROL_GROUP).any():
            top = obs["gene"].astype(str).value_counts().index[:5].tolist()
            raise ValueError(
                f"{path}: no control cells labelled {DEFAULT_CONTROL_GROUP!r} in obs['gene'] "
                f"(most frequent labels: {top})."
            )
        obsm_keys = list(f["obsm"].keys()) if "obsm" in f else []
        if hvg_key not in obsm_keys:
            raise KeyError(
                f"{path}: obsm[{hvg_key!r}] not found (the 2,000-HVG expression matrix); "
                f"available obsm keys: {obsm_keys}."
            )
        node = f["obsm"][hvg_key]
        if isinstance(node, h5py.Dataset):
            shape = tuple(node.shape)
        else:
            shape = tuple(int(s) for s in node.attrs.get("shape", ()))
            if node.attrs.get("encoding-type") not in ("csr_matrix", "csc_matrix"):
                raise ValueError(
                    f"{path}: obsm[{hvg_key!r}] is a {node.attrs.get('encoding-type')!r}; "
                    "expected a dense array or a CSR/CSC matrix."
                )
        if len(shape) != 2 or shape[0] != obs.shape[0]:
            raise ValueError(
                f"{path}: obsm[{hvg_key!r}] has shape {shape}, expected ({obs.shape[0]}, n_genes)."
            )
        width = shape[1]

        var_file = read_elem(f["var"]) if "var" in f else pd.DataFrame()
        var = None
        if var_names is not None:
            names = np.asarray(list(var_names), dtype=str)
            if names.shape[0] != width:
                raise ValueError(
                    f"`var_names` has {names.shape[0]} names but obsm[{hvg_key!r}] has {width} "
                    "columns."
                )
            source = "argument"
        else:
            names, source = _names_from_uns(f, width, hvg_key)
        if names is None and "highly_variable" in var_file.columns:
            mask = var_file["highly_variable"].fillna(False).astype(bool).to_numpy()
            if mask.sum() == width:
                names = var_file.index[mask].to_numpy(dtype=str)
                var = var_file.loc[mask].copy()
                source = "var['highly_variable']"
        if names is None and var_file.shape[0] == width:
            names = var_file.index.to_numpy(dtype=str)
            var = var_file.copy()
            source = "var_names"
        if names is None:
            names = np.array([f"hvg_{i:04d}" for i in range(width)])
            source = "generated"
            warnings.warn(
                f"{path}: no names found for the {width} columns of obsm[{hvg_key!r}] (no uns "
                f"name list, var['highly_variable'] does not select {width} genes); using "
                "generated names hvg_0000, ... Pass `var_names=` to set them.",
                UserWarning,
                stacklevel=2,
            )
        if var is None and var_file.shape[0] and pd.Index(names).isin(var_file.index).all():
            var = var_file.loc[names].copy()
        if var is None:
            var = pd.DataFrame(index=pd.Index(names))
        var.index = pd.Index(names, name=None)
        if var.index.has_duplicates:
            dup = var.index[var.index.duplicated()].unique().tolist()[:10]
            raise ValueError(f"{path}: duplicated HVG names {dup} (from {source}).")

        if backed:
            X = node if isinstance(node, h5py.Dataset) else sparse_dataset(node)
            keep_open = True
        else:
            X = read_elem(node)
        adata = anndata.AnnData(X=X, obs=obs, var=var)
        adata.uns["replogle_nadig"] = {
            "path": str(path),
            "hvg_key": hvg_key,
            "var_names_source": source,
            "backed": bool(backed),
        }
        return adata
    finally:
        if not keep_open:
            f.close()
