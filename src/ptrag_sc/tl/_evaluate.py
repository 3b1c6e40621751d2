"""Per (cell type, perturbation) evaluation of a predicted expression layer."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import (
    DEFAULT_CELL_TYPE_KEY,
    DEFAULT_CONTROL_GROUP,
    DEFAULT_PERTURBATION_KEY,
    DEFAULT_PRED_LAYER,
)
from . import _metrics as M
from ._utils import (
    as_str_tuple,
    check_anndata,
    check_obs_key,
    dense_rows,
    finite_rows,
    get_matrix,
    group_means,
    group_rng,
    in_values,
    labels,
    members,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

    from ..data._matrix import MatrixLike

#: Metric columns of :func:`evaluate`, in output order.
METRIC_COLUMNS = (
    "pearson_delta",
    "spearman_delta",
    "pearson_delta_de",
    "pearson_pert_centred",
    "mse",
    "rmse",
    "mae",
    "mse_pca",
    "w1",
    "w2",
    "mmd",
    "energy",
    "de_overlap",
    "de_direction",
    "discrimination_l1",
    "split_half_pearson",
)
#: Metrics of :data:`METRIC_COLUMNS` where lower is better (the others: higher is better).
LOWER_IS_BETTER = frozenset(
    {"mse", "rmse", "mae", "mse_pca", "w1", "w2", "mmd", "energy", "discrimination_l1"}
)


@dataclass
class Selection:
    """The (cell type, perturbation) groups scored by :func:`evaluate` and ``pl.shift_scatter``."""

    pred_mat: MatrixLike
    real_mat: MatrixLike
    gene_idx: np.ndarray | None  # adata's genes in the reference, None when in the same order
    pert_r: np.ndarray
    ct_r: np.ndarray
    ctrl_r: np.ndarray
    where_ref: str
    pred_layer: str
    perturbations: tuple[str, ...] | None
    split_key: str | None
    split_values: tuple[str, ...]
    pred_index: pd.Series  # (cell type, perturbation) -> row indices, sorted
    real_index: pd.Series
    keys: list[tuple[str, str]]  # groups with predicted and real cells, sorted
    keys_of_obs: tuple[str, str | None, str]  # perturbation_key, cell_type_key, control_group
    _control_means: dict = field(default_factory=dict)

    def nothing(self, what: str, **selection: object) -> ValueError:
        listed = {"perturbations": self.perturbations, **selection, "split_key": self.split_key}
        return ValueError(
            f"Nothing to {what}: no perturbed cell with a finite prediction in "
            f"layers[{self.pred_layer!r}] matches the selection ("
            + ", ".join(f"{k}={v!r}" for k, v in listed.items())
            + f", split_values={self.split_values})."
        )

    def real_rows(self, idx: np.ndarray) -> np.ndarray:
        rows = dense_rows(self.real_mat, idx)
        return rows if self.gene_idx is None else rows[:, self.gene_idx]

    def control_mean(self, cell_type: str) -> np.ndarray:
        if cell_type not in self._control_means:
            ctrl_idx = np.flatnonzero(self.ctrl_r & (self.ct_r == cell_type))
            if ctrl_idx.size == 0:
                perturbation_key, cell_type_key, control_group = self.keys_of_obs
                raise ValueError(
                    f"No control cells (obs[{perturbation_key!r}] == {control_group!r}) for cell "
                    f"type {cell_type!r} (obs[{cell_type_key!r}]) in {self.where_ref}; cannot "
                    "compute shifts."
                )
            self._control_means[cell_type] = self.real_rows(ctrl_idx).mean(axis=0)
        return self._control_means[cell_type]


def select_groups(
    adata: AnnData,
    *,
    reference: AnnData | None = None,
    pred_layer: str = DEFAULT_PRED_LAYER,
    real_layer: str | None = None,
    perturbation_key: str = DEFAULT_PERTURBATION_KEY,
    cell_type_key: str | None = DEFAULT_CELL_TYPE_KEY,
    control_group: str = DEFAULT_CONTROL_GROUP,
    perturbations: Sequence[str] | str | None = None,
    split_key: str | None = None,
    split_values: Sequence[str] | str = ("test",),
    cell_types: Sequence[str] | str | None = None,
    stacklevel: int = 3,
) -> Selection:
    """The selected perturbed cells with a finite prediction, grouped, and their real cells."""
    check_anndata(adata)
    if reference is not None:
        check_anndata(reference, "reference")
    pred_mat = get_matrix(adata, pred_layer, "pred_layer")
    ref = adata if reference is None else reference
    where_ref = "adata" if reference is None else "reference"
    real_mat = get_matrix(ref, real_layer, "real_layer", where=where_ref)
    gene_idx = None
    if reference is not None:
        idx = reference.var_names.get_indexer(adata.var_names)
        if np.any(idx < 0):
            raise ValueError(
                f"{int(np.sum(idx < 0))} gene(s) of adata are not in reference.var_names, "
                f"e.g. {list(adata.var_names[idx < 0][:10])}."
            )
        if not np.array_equal(idx, np.arange(reference.n_vars)):
            gene_idx = idx
    pert_p = labels(adata, perturbation_key, "perturbation_key")
    ct_p = labels(adata, cell_type_key, "cell_type_key")
    if reference is None:
        pert_r, ct_r = pert_p, ct_p
    else:
        pert_r = labels(reference, perturbation_key, "perturbation_key", where="reference")
        ct_r = labels(reference, cell_type_key, "cell_type_key", where="reference")
    ctrl_r = pert_r == control_group
    if not ctrl_r.any():
        raise ValueError(
            f"No control cells: no cell of {where_ref} has "
            f"obs[{perturbation_key!r}] == {control_group!r} (`control_group`)."
        )

    cell_types = as_str_tuple(cell_types)
    if cell_types is not None:
        unknown = [c for c in cell_types if c not in set(ct_p)]
        if unknown:
            raise ValueError(
                f"`cell_type` {unknown} not found in adata.obs[{cell_type_key!r}]; existing: "
                f"{sorted(set(ct_p))}."
            )
    perturbations = as_str_tuple(perturbations)
    ok_p = pert_p != control_group
    ok_p &= in_values(pert_p, perturbations) & in_values(ct_p, cell_types)
    ok_r = ~ctrl_r & in_values(pert_r, perturbations) & in_values(ct_r, cell_types)
    split_values = as_str_tuple(split_values)
    if split_key is not None:
        check_obs_key(ref, split_key, "split_key", where=where_ref)
        in_split = in_values(ref.obs[split_key].astype(str).to_numpy(), split_values)
        ok_r &= in_split
        if reference is None:
            ok_p &= in_split
    cand = np.flatnonzero(ok_p)
    cand = cand[finite_rows(pred_mat, cand)]
    sel_p = np.zeros(adata.n_obs, bool)
    sel_p[cand] = True
    sel_r = sel_p if reference is None else ok_r

    pred_groups = pd.DataFrame({"c": ct_p[sel_p], "p": pert_p[sel_p], "i": cand})
    real_groups = pd.DataFrame({"c": ct_r[sel_r], "p": pert_r[sel_r], "i": np.flatnonzero(sel_r)})
    pred_index = pred_groups.groupby(["c", "p"], sort=True)["i"].apply(np.asarray)
    real_index = real_groups.groupby(["c", "p"], sort=True)["i"].apply(np.asarray)
    no_real = [k for k in pred_index.index if k not in real_index.index]
    if no_real:
        warnings.warn(
            f"{len(no_real)} (cell type, perturbation) group(s) have predicted cells but no real "
            f"cell in the selection and are skipped, e.g. {no_real[:5]}.",
            UserWarning,
            stacklevel=stacklevel,
        )
    return Selection(
        pred_mat,
        real_mat,
        gene_idx,
        pert_r,
        ct_r,
        ctrl_r,
        where_ref,
        pred_layer,
        perturbations,
        split_key,
        split_values,
        pred_index,
        real_index,
        [k for k in pred_index.index if k in real_index.index],
        (perturbation_key, cell_type_key, control_group),
    )


def evaluate(
    adata: AnnData,
    *,
    pred_layer: str = DEFAULT_PRED_LAYER,
    perturbation_key: str = DEFAULT_PERTURBATION_KEY,
    control_group: str = DEFAULT_CONTROL_GROUP,
    cell_type_key: str | None = DEFAULT_CELL_TYPE_KEY,
    real_layer: str | None = None,
    reference: AnnData | None = None,
    perturbations: Sequence[str] | None = None,
    split_key: str | None = None,
    split_values: Sequence[str] | str = ("test",),
    method: str | None = None,
    n_top_de: int = 20,
    n_pcs: int = 50,
    pca_max_cells: int = 20_000,
    ot_max_cells: int = 1_000,
    ot_large: Literal["subsample", "sinkhorn"] = "subsample",
    sinkhorn_reg: float = 0.05,
    discrimination_reference: Literal["evaluated", "all"] = "evaluated",
    seed: int = 0,
) -> pd.DataFrame:
    """Score predicted cells against real cells, per (cell type, perturbation).

    The prediction is ``layers[pred_layer]``, the real expression ``X`` (or ``real_layer``) of
    the same cells (or of ``reference``). Evaluated: the perturbed cells in ``split_values``
    and ``perturbations`` (when given) whose predicted row is finite (NaN rows count as not
    predicted, on both sides).

    Notation for cell type ``c`` and perturbation ``p``: ``P`` the predicted cells, ``R`` the
    real ones, ``C`` all real control cells of ``c`` (any split), ``mean(.)`` the mean profile,
    ``dp = mean(P) - mean(C)`` and ``dr = mean(R) - mean(C)`` (the same control mean on both
    sides, as cell-eval). Metrics use all genes unless said otherwise. Columns:

    - ``method`` (``method`` or ``pred_layer``), the cell type (``cell_type_key``, or
      ``"cell_type"`` holding ``"all"``) and ``perturbation_key``;
    - ``n_cells`` / ``n_cells_real``: predicted / real cells of the group;
    - ``pearson_delta``, ``spearman_delta``: Pearson / Spearman (average ranks) of ``dp`` and
      ``dr``;
    - ``pearson_delta_de``: Pearson of ``dp`` and ``dr`` over the top-``n_top_de`` genes by
      ``|dr|``;
    - ``pearson_pert_centred``: Pearson of ``mean(P_p) - avg_q mean(P_q)`` and
      ``mean(R_p) - avg_q mean(R_q)``, ``q`` over the evaluated perturbations of ``c``; NaN
      with a single one;
    - ``mse``, ``rmse``, ``mae``: errors between ``mean(P)`` and ``mean(R)`` (equal to those on
      ``dp`` and ``dr``);
    - ``mse_pca``: mean squared difference of ``mean(P)`` and ``mean(R)`` over the components
      of an ``n_pcs`` PCA fitted on the real cells of ``c`` (controls and every perturbation,
      any split; at most ``pca_max_cells``, seeded);
    - ``w1``, ``w2``: exact 1- and 2-Wasserstein distances (``ot.emd2``, uniform weights,
      ``w2`` the square root of the cost with ``|x - y|²``) between ``P`` and ``R`` in that
      PCA space. Above ``ot_max_cells`` cells on a side, ``ot_large="subsample"`` draws
      ``ot_max_cells`` of them (seeded) and ``"sinkhorn"`` uses ``ot.sinkhorn2`` on all cells
      (an upper bound);
    - ``mmd``: biased MMD² with the RBF kernel, bandwidth the median non-zero pairwise
      distance of the pooled cells, in the PCA space (at most ``ot_max_cells`` per side);
    - ``energy``: energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (V-statistics) in the PCA
      space (at most ``ot_max_cells`` per side): twice geomloss' ``SamplesLoss("energy")``,
      cell-eval's ``edistance``;
    - ``de_overlap``: fraction of the top-``n_top_de`` genes by ``|dr|`` among the top ones by
      ``|dp|``; ``de_direction``: fraction of them with ``sign(dp) == sign(dr)``;
    - ``discrimination_l1``: fraction of the other candidate perturbations of ``c`` whose
      observed shift is strictly closer (L1, target genes of ``p`` left out) to ``dp`` than
      ``dr`` is; 0 best. Candidates: the evaluated perturbations
      (``discrimination_reference="evaluated"``, as cell-eval, whose
      ``discrimination_score_l1`` is ``1 - discrimination_l1 * (n - 1) / n`` without ties) or
      every perturbation with real cells in ``c`` (``"all"``);
    - ``split_half_pearson``: Pearson of the shifts from ``mean(C)`` of two disjoint random
      halves of ``R`` (NaN below 4 cells): how noisy the observed shift is (1: no noise). It is
      not a ceiling for ``pearson_delta``, which compares a prediction with the mean of all the
      real cells, less noisy than either half.

    Random draws use ``seed`` and the group's name, so a group's values do not depend on the
    other groups (except ``pearson_pert_centred`` and ``discrimination_l1``).

    Parameters
    ----------
    adata
        Cells with real expression in ``X`` (or ``real_layer``) and the prediction in
        ``layers[pred_layer]``. Never modified.
    pred_layer
        Layer holding the prediction.
    perturbation_key
        obs column with perturbation labels.
    control_group
        Label of control cells.
    cell_type_key
        obs column with the cell type; ``None`` treats all cells as one cell type.
    real_layer
        Layer holding the real expression (log1p); ``None`` uses ``X``.
    reference
        AnnData of the real cells when ``adata`` holds other cells (e.g. generation-mode
        ``PTRAG.predict``): real cells, controls, PCA and split then come from it (it must
        hold every gene of ``adata``).
    perturbations
        Restrict rows to these perturbation labels.
    split_key
        obs column with the data split; only cells whose value is in ``split_values`` are
        evaluated (control cells are always available as controls).
    split_values
        Split values to evaluate.
    method
        Label written to the ``method`` column; defaults to ``pred_layer``.
    n_top_de
        Top observed genes (by ``|dr|``) of ``pearson_delta_de``, ``de_overlap`` and
        ``de_direction`` (the usual "top-20 DE genes" of GEARS and successors).
    n_pcs
        Number of principal components of the distributional metrics and ``mse_pca``.
    pca_max_cells
        At most this many real cells of a cell type fit its PCA.
    ot_max_cells
        Cells per side above which distributional metrics subsample (or use Sinkhorn for W1/W2).
    ot_large
        ``"subsample"`` (exact OT on a seeded subsample) or ``"sinkhorn"``.
    sinkhorn_reg
        Entropic regularisation of Sinkhorn, relative to the largest transport cost.
    discrimination_reference
        Candidate set of ``discrimination_l1``: ``"evaluated"`` or ``"all"``.
    seed
        Seed of the subsamples and of the split-half draw.

    Returns
    -------
    :class:`pandas.DataFrame`, one row per evaluated (cell type, perturbation), sorted by cell
    type then perturbation; the settings are in ``DataFrame.attrs["settings"]``.

    Examples
    --------
    >>> import ptrag_sc
    >>> adata = ptrag_sc.datasets.perturbench_devel(subset="glioblastoma")
    >>> ptrag_sc.pp.few_shot_split(adata, held_out="U87MG", val=["PLK4"], test=["MAPK1", "SGK1"])
    >>> ptrag_sc.tl.predict_baseline(adata, "context_mean", split_key="split", key_added="mean")
    >>> res = ptrag_sc.tl.evaluate(adata, pred_layer="mean", split_key="split")
    >>> res[["cell_line", "gene"]].to_numpy().tolist()
    [['U87MG', 'MAPK1'], ['U87MG', 'SGK1']]
    >>> bool((res["pearson_delta"] > 0.3).all())
    True
    """
    if ot_large not in ("subsample", "sinkhorn"):
        raise ValueError(f"`ot_large={ot_large!r}` must be 'subsample' or 'sinkhorn'.")
    if discrimination_reference not in ("evaluated", "all"):
        raise ValueError(
            f"`discrimination_reference={discrimination_reference!r}` must be 'evaluated' or "
            "'all'."
        )
    if n_top_de < 1 or n_pcs < 1 or ot_max_cells < 2 or pca_max_cells < 2:
        raise ValueError(
            "`n_top_de` and `n_pcs` must be >= 1, `ot_max_cells` and `pca_max_cells` >= 2."
        )

    sel = select_groups(
        adata,
        reference=reference,
        pred_layer=pred_layer,
        real_layer=real_layer,
        perturbation_key=perturbation_key,
        cell_type_key=cell_type_key,
        control_group=control_group,
        perturbations=perturbations,
        split_key=split_key,
        split_values=split_values,
    )
    if not sel.keys:
        raise sel.nothing("evaluate")
    var_names = np.asarray(adata.var_names, dtype=str)
    ct_r, ctrl_r, pert_r = sel.ct_r, sel.ctrl_r, sel.pert_r

    cell_type_col = cell_type_key or "cell_type"
    label = method if method is not None else pred_layer
    records: list[dict] = []
    by_cell_type: dict[str, list[str]] = {}
    for c, p in sel.keys:
        by_cell_type.setdefault(c, []).append(p)

    for c, perts in by_cell_type.items():
        ctrl_mean = sel.control_mean(c)

        # PCA of the cell type, fitted on its real cells (controls + all perturbed, any split).
        fit_idx = np.flatnonzero(ct_r == c)
        if fit_idx.size > pca_max_cells:
            fit_idx = np.sort(
                group_rng(seed, "pca", c).choice(fit_idx, pca_max_cells, replace=False)
            )
        pca_mean, comps = M.fit_pca(sel.real_rows(fit_idx), n_pcs, seed=seed)

        def project(
            cells: np.ndarray, mean: np.ndarray = pca_mean, axes: np.ndarray = comps
        ) -> np.ndarray:
            return (cells - mean) @ axes.T

        pred_means, real_means, group_rows = [], [], []
        for p in perts:
            rng = group_rng(seed, c, p)
            pi, ri = sel.pred_index[(c, p)], sel.real_index[(c, p)]
            pred_cells = dense_rows(sel.pred_mat, pi)
            real_cells = sel.real_rows(ri)
            pm, rm = pred_cells.mean(axis=0), real_cells.mean(axis=0)
            dp, dr = pm - ctrl_mean, rm - ctrl_mean
            err = pm - rm
            top = M.top_n_genes(dr, n_top_de)
            dist = M.distribution_metrics(
                project(_subsample(pred_cells, ot_max_cells, rng)),
                project(_subsample(real_cells, ot_max_cells, rng)),
            )
            if ot_large == "sinkhorn" and max(len(pi), len(ri)) > ot_max_cells:
                dist["w1"], dist["w2"] = M.wasserstein(
                    project(pred_cells),
                    project(real_cells),
                    method="sinkhorn",
                    sinkhorn_reg=sinkhorn_reg,
                )
            row = {
                "method": label,
                cell_type_col: c,
                perturbation_key: p,
                "n_cells": len(pi),
                "n_cells_real": len(ri),
                "pearson_delta": M.pearson(dp, dr),
                "spearman_delta": M.spearman(dp, dr),
                "pearson_delta_de": M.pearson(dp[top], dr[top]),
                "pearson_pert_centred": np.nan,
                "mse": float(np.mean(err**2)),
                "rmse": float(np.sqrt(np.mean(err**2))),
                "mae": float(np.mean(np.abs(err))),
                "mse_pca": float(np.mean((err @ comps.T) ** 2)),
                **dist,  # w1, w2, mmd, energy
                "de_overlap": M.de_overlap(dp, dr, n_top_de),
                "de_direction": M.de_direction(dp, dr, n_top_de),
                "discrimination_l1": np.nan,
                "split_half_pearson": M.split_half_pearson(real_cells, ctrl_mean, rng),
            }
            pred_means.append(pm)
            real_means.append(rm)
            group_rows.append(row)

        pred_means_arr = np.vstack(pred_means)
        real_means_arr = np.vstack(real_means)
        if len(perts) >= 2:
            pc = pred_means_arr - pred_means_arr.mean(axis=0)
            rc = real_means_arr - real_means_arr.mean(axis=0)
            for row, a, b in zip(group_rows, pc, rc, strict=True):
                row["pearson_pert_centred"] = M.pearson(a, b)

        # Discrimination: observed shifts of the candidate perturbations of this cell type.
        if discrimination_reference == "evaluated":
            cand_names = list(perts)
            cand_shifts = real_means_arr - ctrl_mean
        else:
            cidx = np.flatnonzero((ct_r == c) & ~ctrl_r)
            cand_names = sorted(set(pert_r[cidx]))
            codes = pd.Categorical(pert_r[cidx], categories=cand_names).codes
            sub_means = group_means(sel.real_mat[cidx], codes, len(cand_names))
            if sel.gene_idx is not None:
                sub_means = sub_means[:, sel.gene_idx]
            cand_shifts = sub_means - ctrl_mean
        position = {name: i for i, name in enumerate(cand_names)}
        for row, pm in zip(group_rows, pred_means, strict=True):
            p = row[perturbation_key]
            targets = members(p, control_group)
            gene_mask = ~np.isin(var_names, targets)
            row["discrimination_l1"] = M.discrimination_l1(
                pm - ctrl_mean, cand_shifts, position[p], gene_mask
            )
        records.extend(group_rows)

    result = pd.DataFrame.from_records(records)
    result.attrs["settings"] = {
        "pred_layer": pred_layer,
        "real_layer": real_layer,
        "n_top_de": int(n_top_de),
        "n_pcs": int(n_pcs),
        "ot_max_cells": int(ot_max_cells),
        "ot_large": ot_large,
        "sinkhorn_reg": float(sinkhorn_reg),
        "discrimination_reference": discrimination_reference,
        "seed": int(seed),
    }
    return result


def _subsample(cells: np.ndarray, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    if cells.shape[0] <= max_cells:
        return cells
    return cells[np.sort(rng.choice(cells.shape[0], max_cells, replace=False))]
