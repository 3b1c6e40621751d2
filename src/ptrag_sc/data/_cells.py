"""A registered AnnData as the model reads it: per-cell labels, contexts and the expression."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._fields import read_labels, refuse_missing
from ._matrix import ExpressionMatrix, RowSubset, group_means, is_backed

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ._matrix import MatrixLike

#: Cell type of every cell when the model was set up without ``cell_type_key``.
NO_CELL_TYPE = "all"


@dataclass(frozen=True)
class SetupArgs:
    """The obs columns and layer a model was registered with."""

    perturbation_key: str
    control_group: str
    cell_type_key: str | None
    batch_key: str | None
    layer: str | None
    sep: str


def expression_matrix(adata: AnnData, layer: str | None) -> MatrixLike:
    """``adata.X`` or ``adata.layers[layer]``, with an error listing the layers if absent.

    The on-disk ``X`` of a view of a backed AnnData is read by rows on demand (anndata's
    ``view.X`` would load all the view's rows at once).
    """
    if layer is None:
        lazy_view = _backed_view_matrix(adata)
        if lazy_view is not None:
            return lazy_view
        if adata.X is None:
            raise ValueError("`adata.X` is empty; pass `layer=` naming the expression layer.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"`layer={layer!r}` is not in `adata.layers`. Existing layers: "
            f"{list(adata.layers.keys())}."
        )
    return adata.layers[layer]


def _backed_view_matrix(adata: AnnData) -> RowSubset | None:
    """The rows of a view of an AnnData with an on-disk ``X`` as a lazy :class:`RowSubset`
    (``None`` for anything else, or an anndata without these view internals)."""
    if not getattr(adata, "is_view", False):
        return None
    parent = getattr(adata, "_adata_ref", None)
    oidx, vidx = getattr(adata, "_oidx", None), getattr(adata, "_vidx", None)
    if parent is None or oidx is None or vidx is None:
        return None
    matrix = parent.X
    if matrix is None or not is_backed(matrix):
        return None
    rows = np.arange(parent.n_obs)[oidx]
    columns = np.arange(parent.n_vars)[vidx]
    return RowSubset(
        matrix, rows, None if np.array_equal(columns, np.arange(parent.n_vars)) else columns
    )


def gene_columns(var_names: pd.Index, model_var_names: pd.Index) -> np.ndarray | None:
    """Column of ``var_names`` holding each of the model's genes (``None``: already in order);
    a ``ValueError`` names the missing ones."""
    var_names = pd.Index(np.asarray(var_names).astype(str))
    reference = pd.Index(np.asarray(model_var_names).astype(str))
    if var_names.equals(reference):
        return None
    if var_names.has_duplicates:
        dup = var_names[var_names.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"The AnnData has duplicated gene names (e.g. {dup}); make them unique with "
            "`adata.var_names_make_unique()`."
        )
    columns = var_names.get_indexer(reference)
    missing = reference[columns < 0]
    if len(missing):
        raise ValueError(
            f"The AnnData lacks {len(missing)} of the {len(reference)} genes the model was "
            f"trained on (e.g. {missing[:5].tolist()}). Predictions need every one of them."
        )
    return columns


class PerturbationData:
    """Per-cell arrays of an AnnData registered (or transferred) for a :class:`~ptrag_sc.PTRAG`
    model.

    Labels are normalised with :func:`~ptrag_sc.data.normalise_labels` (surrounding
    whitespace removed, gene symbols upper-cased, combination members sorted), so that
    ``" stat1"`` and ``"STAT1"`` are one perturbation and ``"B+A"`` is ``"A+B"``.

    Parameters
    ----------
    adata
        The AnnData (in memory, sparse, or opened with ``backed="r"``).
    setup
        Its registration.
    var_names
        The model's genes: the expression is read in this order, whatever the AnnData's order.
    batch_categories
        The training batches (for batch codes; unseen batches get ``-1``).
    require_labels
        Whether the perturbation column must exist (generation mode accepts AnnData of control
        cells without it).
    """

    def __init__(
        self,
        adata: AnnData,
        setup: SetupArgs,
        var_names: Sequence[str],
        *,
        batch_categories: np.ndarray | None = None,
        require_labels: bool = True,
    ) -> None:
        self.adata = adata
        self.setup = setup
        self.n_obs = adata.n_obs
        obs = adata.obs
        key = setup.perturbation_key
        #: Whether the cells are labelled (generation mode accepts control cells without labels).
        self.has_labels = key in obs.columns
        if self.has_labels or require_labels:
            self.labels = read_labels(adata, key, control_group=setup.control_group, sep=setup.sep)
        else:
            self.labels = np.full(self.n_obs, setup.control_group, dtype=object)
        self.is_control = self.labels == setup.control_group
        self.cell_types = self._cell_types()
        self.has_cell_types = (
            setup.cell_type_key is not None and setup.cell_type_key in obs.columns
        )
        self.batches = self._batch_codes(batch_categories)
        self.matrix = expression_matrix(adata, setup.layer)
        self.columns = gene_columns(adata.var_names, var_names)
        #: The model's genes, in the order expression is read.
        self.var_names = np.asarray(var_names).astype(str)
        # Control cells are drawn by every set: an on-disk matrix keeps them in memory.
        self.expression = ExpressionMatrix(self.matrix, self.columns, cache=self.is_control)

    def _cell_types(self) -> np.ndarray:
        key = self.setup.cell_type_key
        if key is None or key not in self.adata.obs.columns:
            return np.full(self.n_obs, NO_CELL_TYPE, dtype=object)
        values = self.adata.obs[key]
        refuse_missing(values, f"`adata.obs[{key!r}]` (`cell_type_key`)", self.adata.obs_names)
        return values.astype(str).to_numpy().astype(object)

    def _batch_codes(self, categories: np.ndarray | None) -> np.ndarray:
        key = self.setup.batch_key
        if key is None or categories is None or key not in self.adata.obs.columns:
            return np.full(self.n_obs, -1, dtype=np.int64)
        values = self.adata.obs[key]
        refuse_missing(values, f"`adata.obs[{key!r}]` (`batch_key`)", self.adata.obs_names)
        mapping = pd.Index(np.asarray(categories).astype(str))
        return mapping.get_indexer(values.astype(str).to_numpy()).astype(np.int64)

    def column_stats(self, stats: np.ndarray) -> np.ndarray:
        """Statistics computed over the AnnData's genes, in the model's gene order."""
        return stats if self.columns is None else stats[..., self.columns]

    def means(self, codes: np.ndarray, n_groups: int) -> np.ndarray:
        """Mean expression of each group of cells (model gene order), float64 ``[n_groups, G]``."""
        return self.column_stats(group_means(self.matrix, codes, n_groups))

    def contexts(self, match_batch: bool) -> np.ndarray:
        """Context of each cell for control pools: cell type, or cell type and batch."""
        keys = self.cell_types.astype(str)
        if match_batch:
            keys = np.char.add(np.char.add(keys, "|"), self.batches.astype(str))
        return keys.astype(object)
