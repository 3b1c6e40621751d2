"""Small helpers shared by the evaluation and baseline tools (validation, matrices, groups)."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from .._constants import DEFAULT_PERTURBATION_SEP
from ..data._matrix import group_means  # noqa: F401  (re-exported for tl modules)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from anndata import AnnData

#: Placeholder cell type used when ``cell_type_key=None`` (all cells share one context).
ALL_CELLS = "all"


def check_obs_key(adata: AnnData, key: str, argument: str, *, where: str = "adata") -> None:
    """Raise a ValueError naming ``argument`` and listing the obs columns if ``key`` is absent."""
    if key not in adata.obs.columns:
        raise ValueError(
            f"`{argument}={key!r}` is not a column of {where}.obs; existing columns: "
            f"{list(map(str, adata.obs.columns))}."
        )


def check_anndata(value: object, argument: str = "adata") -> None:
    """Raise a ``TypeError`` naming ``argument`` unless ``value`` is an AnnData (before use)."""
    from anndata import AnnData

    if isinstance(value, AnnData):
        return
    kind = type(value).__name__
    hint = ""
    if hasattr(value, "module") and hasattr(value, "adata"):  # a model where the data goes
        hint = f" Pass the AnnData (e.g. `model.adata`); the model itself is not {argument}."
    elif kind == "MuData":
        hint = " Pass its RNA modality, e.g. `mdata.mod['rna']`."
    raise TypeError(f"`{argument}` must be an AnnData, got {kind}.{hint}")


def get_matrix(
    adata: AnnData, layer: str | None, argument: str, *, where: str = "adata"
) -> np.ndarray | sparse.spmatrix:
    """Return ``adata.X`` (``layer=None``) or ``adata.layers[layer]`` with a clear error."""
    check_anndata(adata, where)
    if layer is None:
        if adata.X is None:
            raise ValueError(f"{where}.X is empty; pass `{argument}` naming a layer.")
        return adata.X
    if layer not in adata.layers:
        raise ValueError(
            f"`{argument}={layer!r}` is not a layer of {where}; existing layers: "
            f"{list(adata.layers.keys())}."
        )
    return adata.layers[layer]


def dense_rows(
    matrix: np.ndarray | sparse.spmatrix,
    idx: np.ndarray | None = None,
    dtype: np.dtype | type = np.float64,
) -> np.ndarray:
    """Rows ``idx`` (all rows if None) of a dense or sparse matrix, as a dense array."""
    sub = matrix if idx is None else matrix[np.asarray(idx)]
    if sparse.issparse(sub):
        sub = sub.toarray()
    return np.asarray(sub, dtype=dtype)


def labels(adata: AnnData, key: str | None, argument: str, *, where: str = "adata") -> np.ndarray:
    """obs column ``key`` as an array of str (``ALL_CELLS`` everywhere when ``key`` is None)."""
    if key is None:
        return np.full(adata.n_obs, ALL_CELLS, dtype=object)
    check_obs_key(adata, key, argument, where=where)
    column = adata.obs[key]
    if column.isna().any():
        raise ValueError(
            f"obs column {key!r} (`{argument}`) of {where} has {int(column.isna().sum())} "
            "missing value(s); label every cell."
        )
    return column.astype(str).to_numpy(dtype=object)


def as_str_tuple(values: str | Iterable | None) -> tuple[str, ...] | None:
    """Normalise a str or an iterable of values to a tuple of str (None stays None)."""
    if values is None:
        return None
    if isinstance(values, str):
        return (values,)
    return tuple(str(v) for v in values)


def members(
    perturbation: str, control_group: str, sep: str = DEFAULT_PERTURBATION_SEP
) -> list[str]:
    """Single genes of a label (``"A+B"`` -> ``["A", "B"]``), control members dropped."""
    parts = [p.strip() for p in str(perturbation).split(sep)]
    return [p for p in parts if p and p != control_group]


def group_rng(seed: int, *key: str) -> np.random.Generator:
    """Generator seeded by ``seed`` and a stable hash of ``key`` (independent of group order)."""
    digest = zlib.crc32("\x00".join(map(str, key)).encode())
    return np.random.default_rng([int(seed), digest])


def finite_rows(
    matrix: np.ndarray | sparse.spmatrix, idx: np.ndarray, chunk: int = 8192
) -> np.ndarray:
    """Boolean mask over ``idx``: rows of ``matrix`` with no NaN/inf value (read in chunks)."""
    idx = np.asarray(idx)
    out = np.ones(idx.shape[0], dtype=bool)
    for start in range(0, idx.shape[0], chunk):
        sub = matrix[idx[start : start + chunk]]
        if sparse.issparse(sub):
            sub = sparse.csr_matrix(sub)
            bad = ~np.isfinite(sub.data)
            row_of = np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr))
            out[start + row_of[bad]] = False
        else:
            out[start : start + chunk] = np.isfinite(np.asarray(sub)).all(axis=1)
    return out


def in_values(values: np.ndarray, allowed: Sequence[str] | None) -> np.ndarray:
    """Boolean mask: which ``values`` (str) are in ``allowed`` (all when ``allowed`` is None)."""
    if allowed is None:
        return np.ones(len(values), dtype=bool)
    return np.isin(np.asarray(values, dtype=object).astype(str), np.asarray(allowed, dtype=str))
