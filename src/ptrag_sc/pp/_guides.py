"""Guide assignment: which gRNA (and so which target gene) each cell of a screen got."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._constants import DEFAULT_CONTROL_GROUP
from .._symbols import _format_list

if TYPE_CHECKING:
    from collections.abc import Callable

    from anndata import AnnData

__all__ = ["GUIDE_ASSIGNED", "assign_guides", "guide_columns"]

#: Value of the status column for cells assigned to one guide.
GUIDE_ASSIGNED = "assigned"

_CHUNK_ROWS = 65536


def guide_columns(key_added: str = "guide") -> dict[str, str]:
    """The obs columns :func:`assign_guides` writes: ``{"guide": "<key_added>_id", "target":
    "<key_added>_target", ...}`` for ``top_umi``, ``second_umi`` and ``status`` too."""
    suffixes = ("id", "target", "top_umi", "second_umi", "status")
    return {("guide" if s == "id" else s): f"{key_added}_{s}" for s in suffixes}


def assign_guides(
    guides: AnnData,
    *,
    min_umi: float = 5,
    min_ratio: float = 3.0,
    target_key: str = "target_gene",
    control_targets: str | Sequence[str] = ("non-targeting",),
    control_group: str = DEFAULT_CONTROL_GROUP,
    unassigned: str = "unassigned",
    multiplet: str = "multiplet",
    layer: str | None = None,
    key_added: str = "guide",
    inplace: bool = True,
    copy: bool = False,
) -> AnnData | pd.DataFrame | None:
    """Assign each cell to the guide RNA it carries, from guide UMI counts (low-MOI screens).

    For every cell let *top* be its largest guide UMI count and *second* its second largest
    (0 when at most one guide was detected; equal to *top* when the two largest tie). The cell
    is

    - **assigned** to its top guide when ``top >= min_umi`` and ``top >= min_ratio * second``
      and ``top > second``;
    - **unassigned** when ``top < min_umi`` (too few guide UMIs to call a guide; this includes
      cells without any guide UMI);
    - a **multiplet** otherwise: ``top >= min_umi`` but ``top < min_ratio * second``, or the
      two largest counts tie (a tie is never assigned, whatever ``min_ratio``).

    With the defaults (5 UMIs, ratio 3) this is the rule suggested for the Papalexi et al.
    (2021) ECCITE-seq screen, ``top >= 5 & top >= 3 * second``. The rule compares guides,
    not target genes: a cell with two guides of the same gene is a multiplet too.

    Parameters
    ----------
    guides
        Guide-count AnnData, cells x guides (e.g. the guide modality of a MuData, such as
        ``mdata.mod["gdo"]``), with non-negative UMI counts, dense or sparse.
    min_umi
        Least UMI count of the top guide to assign a cell (> 0).
    min_ratio
        Least ratio of the top to the second guide's count to assign a cell (>= 1).
    target_key
        Column of ``guides.var`` with each guide's target gene.
    control_targets
        Values of ``guides.var[target_key]`` marking control guides (e.g.
        ``("non-targeting", "safe-targeting")``); their cells are labelled ``control_group``.
    control_group
        Target label of cells assigned to a control guide.
    unassigned, multiplet
        Labels of unassigned cells and multiplets in the guide, target and status columns.
    layer
        Layer with the counts (default: ``guides.X``).
    key_added
        Prefix of the obs columns (see Returns).
    inplace
        Write the columns into ``guides.obs`` (``True``) or return them as a DataFrame.
    copy
        Return a copy of ``guides`` with the columns written (``guides`` is left alone).

    Returns
    -------
    ``None`` by default; a copy of ``guides`` with ``copy=True``; with ``inplace=False`` a
    DataFrame indexed like ``guides.obs``. The columns (written to ``guides.obs``, here for
    ``key_added="guide"``):

    - ``guide_id``: the assigned guide (a name from ``guides.var_names``), or ``unassigned``
      / ``multiplet``;
    - ``guide_target``: its target gene, ``control_group`` for control guides, or
      ``unassigned`` / ``multiplet``;
    - ``guide_top_umi``, ``guide_second_umi``: the two largest guide counts (float);
    - ``guide_status``: ``"assigned"``, ``unassigned`` or ``multiplet``.

    Raises
    ------
    KeyError
        If ``target_key`` is not a column of ``guides.var`` or ``layer`` not a layer (the
        error lists those that exist).
    ValueError
        If the counts hold negative, NaN or infinite values; ``min_umi <= 0``;
        ``min_ratio < 1``; a guide has no target; the ``unassigned`` / ``multiplet`` labels
        clash with each other, a target, a guide or ``control_group``; or ``copy=True`` is
        combined with ``inplace=False``.

    Notes
    -----
    Among tied top guides the one with the lowest column index is reported (a tie is a
    multiplet anyway).

    Examples
    --------
    >>> import anndata as ad
    >>> import numpy as np
    >>> import pandas as pd
    >>> import ptrag_sc
    >>> counts = np.array([[12, 1, 0], [0, 9, 6], [2, 0, 0], [0, 0, 7]])
    >>> targets = {"target_gene": ["STAT1", "IRF1", "non-targeting"]}
    >>> var = pd.DataFrame(targets, index=["STAT1g1", "IRF1g1", "NTg1"])
    >>> guides = ad.AnnData(counts.astype(np.float32), var=var)
    >>> ptrag_sc.pp.assign_guides(guides)
    >>> guides.obs["guide_target"].tolist()
    ['STAT1', 'multiplet', 'unassigned', 'non-targeting']
    >>> guides.obs["guide_status"].tolist()
    ['assigned', 'multiplet', 'unassigned', 'assigned']
    """
    from anndata import AnnData

    if not isinstance(guides, AnnData):
        raise TypeError(
            "`guides` must be an AnnData of guide counts (cells x guides), got "
            f"{type(guides).__name__}. "
            "For a MuData pass its guide modality, e.g. `mdata.mod['gdo']`."
        )
    if copy and not inplace:
        raise ValueError(
            "`copy=True` returns a copy with the columns written; it cannot be combined with "
            "`inplace=False`."
        )
    min_umi = _check_number("min_umi", min_umi)
    min_ratio = _check_number("min_ratio", min_ratio)
    if min_umi <= 0:
        raise ValueError(
            f"`min_umi` must be positive (a guide needs UMIs to be called), got {min_umi}."
        )
    if min_ratio < 1:
        raise ValueError(
            "`min_ratio` must be at least 1 (the top guide's count over the second's), got "
            f"{min_ratio}."
        )
    if guides.n_vars == 0:
        raise ValueError("`guides` has no guides (0 variables).")
    if target_key not in guides.var.columns:
        columns = list(map(str, guides.var.columns))
        raise KeyError(
            f"`target_key={target_key!r}` is not a column of `guides.var`. Existing columns: "
            f"{columns[:30]}{' ...' if len(columns) > 30 else ''}. Add each guide's target gene, "
            "e.g. `guides.var['target_gene'] = ...`."
        )
    targets = guides.var[target_key]
    if targets.isna().any():
        bad = guides.var_names[targets.isna().to_numpy()].tolist()
        raise ValueError(
            f"`guides.var[{target_key!r}]` has no target for {len(bad)} guide(s): "
            f"{_format_list(bad, 10)}. "
            "Give control guides their control label (see `control_targets`)."
        )
    if isinstance(control_targets, str):
        control_targets = (control_targets,)
    control_targets = [str(c) for c in control_targets]
    targets = targets.astype(str).to_numpy()
    is_control = np.isin(targets, control_targets)
    if not is_control.any():
        warnings.warn(
            f"No guide targets any of `control_targets={control_targets}` in "
            f"`guides.var[{target_key!r}]` (targets include "
            f"{_format_list(sorted(set(targets)), 10)}); no cell will be labelled "
            f"{control_group!r}.",
            UserWarning,
            stacklevel=2,
        )
    guide_labels = np.where(is_control, str(control_group), targets).astype(object)
    guide_names = guides.var_names.astype(str).to_numpy()
    _check_labels(unassigned, multiplet, control_group, guide_labels, guide_names)

    if layer is None:
        X, where = guides.X, "`guides.X`"
        if X is None:
            raise ValueError(
                "`guides.X` is empty; pass `layer=` naming the layer with guide counts."
            )
    elif layer not in guides.layers:
        raise KeyError(
            f"`layer={layer!r}` is not in `guides.layers`. Existing layers: "
            f"{list(guides.layers.keys())}."
        )
    else:
        X, where = guides.layers[layer], f"`guides.layers[{layer!r}]`"
    top_idx, top, second = _top_two(X, where)

    assigned = (top >= min_umi) & (top >= min_ratio * second) & (top > second)
    status = np.where(
        top < min_umi, unassigned, np.where(assigned, GUIDE_ASSIGNED, multiplet)
    ).astype(object)
    guide, target = status.copy(), status.copy()
    guide[assigned] = guide_names[top_idx[assigned]]
    target[assigned] = guide_labels[top_idx[assigned]]
    names = guide_columns(key_added)
    result = pd.DataFrame(
        {
            names["guide"]: pd.Categorical(guide),
            names["target"]: pd.Categorical(target),
            names["top_umi"]: top,
            names["second_umi"]: second,
            names["status"]: pd.Categorical(
                status, categories=list(dict.fromkeys([GUIDE_ASSIGNED, unassigned, multiplet]))
            ),
        },
        index=guides.obs_names.copy(),
    )
    if not inplace:
        return result
    out = guides.copy() if copy else guides
    for column in result.columns:
        out.obs[column] = result[column].values  # positional (obs names may repeat)
    return out if copy else None


def _check_number(name: str, value: object) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a number, got {value!r}.") from err
    if not np.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    return value


def _check_labels(
    unassigned: object,
    multiplet: object,
    control_group: object,
    guide_labels: np.ndarray,
    guide_names: np.ndarray,
) -> None:
    for name, value in (("unassigned", unassigned), ("multiplet", multiplet)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"`{name}` must be a non-empty string, got {value!r}.")
        if value == GUIDE_ASSIGNED:
            raise ValueError(
                f"`{name}={value!r}` is the status of assigned cells; choose another label."
            )
        if value == str(control_group):
            raise ValueError(f"`{name}={value!r}` equals `control_group`; choose another label.")
        if value in set(guide_labels):
            raise ValueError(f"`{name}={value!r}` is the target of a guide; choose another label.")
        if value in set(guide_names):
            raise ValueError(f"`{name}={value!r}` is the name of a guide; choose another label.")
    if unassigned == multiplet:
        raise ValueError(f"`unassigned` and `multiplet` must differ, both are {unassigned!r}.")


def _check_counts(
    values: np.ndarray, rows: Callable[[np.ndarray], np.ndarray], where: str
) -> None:
    """Reject NaN, infinite and negative counts; ``rows(mask)`` gives the rows of bad values."""
    for bad, what, hint in (
        (~np.isfinite(values), "NaN or infinite", ""),
        (values < 0, "negative", f", min {values.min(initial=0):.3g}); pass raw UMI counts"),
    ):
        if bad.any():
            cells = rows(bad)
            raise ValueError(
                f"{where} holds {what} guide counts in {len(cells)}+ cell(s) (first rows: "
                f"{cells[:5].tolist()}{hint or ')'}."
            )


def _top_two(X: np.ndarray | sp.spmatrix, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: column of the largest value (``-1`` if none stored), the largest and second
    largest values (float64; missing ones are 0). Ties go to the lowest column."""
    n_obs, n_vars = X.shape
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        if not X.has_canonical_format:
            X = X.copy()
            X.sum_duplicates()
        data = np.asarray(X.data)
        if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
            raise TypeError(f"{where} must hold numbers, got dtype {data.dtype}.")
        data = data.astype(np.float64, copy=False)
        per_row = np.diff(X.indptr)
        rows = np.repeat(np.arange(n_obs), per_row)
        _check_counts(data, lambda bad: np.unique(rows[bad]), where)
        # Rows first, then ascending value, then descending column: the last stored entry of
        # each row is its largest value at the lowest column.
        order = np.lexsort((-X.indices.astype(np.int64), data, rows))
        data, cols = data[order], X.indices[order]
        end = X.indptr[1:]
        has1, has2 = per_row >= 1, per_row >= 2
        top_idx = np.full(n_obs, -1, dtype=np.int64)
        top = np.zeros(n_obs)
        second = np.zeros(n_obs)
        top_idx[has1] = cols[end[has1] - 1]
        top[has1] = data[end[has1] - 1]
        second[has2] = data[end[has2] - 2]
        return top_idx, top, second
    top_idx = np.empty(n_obs, dtype=np.int64)
    top = np.empty(n_obs)
    second = np.zeros(n_obs)
    for start in range(0, n_obs, _CHUNK_ROWS):
        block = np.asarray(X[start : start + _CHUNK_ROWS])
        if not (np.issubdtype(block.dtype, np.number) or block.dtype == bool):
            raise TypeError(f"{where} must hold numbers, got dtype {block.dtype}.")
        block = block.astype(np.float64, copy=False)
        _check_counts(
            block, lambda bad, start=start: np.flatnonzero(bad.any(axis=1)) + start, where
        )
        stop = start + block.shape[0]
        top_idx[start:stop] = np.argmax(block, axis=1)
        top[start:stop] = block[np.arange(block.shape[0]), top_idx[start:stop]]
        if n_vars >= 2:
            second[start:stop] = np.partition(block, n_vars - 2, axis=1)[:, n_vars - 2]
    return top_idx, top, second
