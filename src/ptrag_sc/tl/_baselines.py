"""Baselines that write a prediction layer the same way ``PTRAG.predict`` does."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from scipy import linalg, sparse

from .._constants import (
    DEFAULT_CELL_TYPE_KEY,
    DEFAULT_CONTROL_GROUP,
    DEFAULT_PERTURBATION_KEY,
    DEFAULT_PERTURBATION_SEP,
)
from .._shift import apply_shift
from ..data._matrix import column_max
from ..data._pairing import context_codes, match_controls
from ._utils import (
    as_str_tuple,
    check_anndata,
    check_obs_key,
    get_matrix,
    group_means,
    in_values,
    labels,
    members,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from anndata import AnnData

    from ..data._matrix import MatrixLike

    Embed = Callable[[Sequence[str]], np.ndarray]

#: Names accepted by :func:`predict_baseline`.
BASELINES = ("control", "other_cell_types", "context_mean", "linear", "knn", "additive")

#: Extra keyword arguments of each baseline and their defaults.
_METHOD_KWARGS: dict[str, dict[str, Any]] = {
    "control": {},
    "other_cell_types": {},
    "context_mean": {},
    "linear": {"alpha": 0.1, "per_cell_type": False},
    "knn": {"k": 5},
    "additive": {},
}


def predict_baseline(
    adata: AnnData,
    method: str,
    *,
    key_added: str | None = None,
    layer: str | None = None,
    split_key: str | None = None,
    train_values: Sequence[str] | str = ("train",),
    train_mask: np.ndarray | Sequence[bool] | None = None,
    perturbation_key: str = DEFAULT_PERTURBATION_KEY,
    control_group: str = DEFAULT_CONTROL_GROUP,
    cell_type_key: str | None = DEFAULT_CELL_TYPE_KEY,
    batch_key: str | None = None,
    gene_embeddings: pd.DataFrame | None = None,
    perturbation_sep: str = DEFAULT_PERTURBATION_SEP,
    seed: int = 0,
    copy: bool = False,
    **method_kwargs: Any,
) -> AnnData | None:
    """Predict every perturbed cell with a simple baseline, in the model's output format.

    Each baseline estimates a mean shift ``delta(c, p)`` of perturbation ``p`` in cell type ``c``
    from **training cells only** and applies it, with the model's rule
    (:func:`ptrag_sc.module.apply_shift`, see :doc:`/concepts`), to control cells of the same
    cell type (and batch, with ``batch_key``) matched to each perturbed cell with ``seed``, any
    split. Predicted cells are thus built on real control cells as the model's are; control
    cells keep their own values.

    Training statistics: the control mean ``mu(c)`` (training controls of ``c``, or all its
    controls when none trains); the training shift ``s(c, q)`` = mean of the training cells of
    ``(c, q)`` minus ``mu(c)``; the context shift ``ctx(c)``, the unweighted mean of ``s(c, q)``
    over the training perturbations of ``c`` (as cell-eval's mean baseline).

    Methods (``delta(c, p)``):

    - ``"control"``: 0 (no effect).
    - ``"other_cell_types"``: unweighted mean of ``s(c', p)`` over the other cell types where
      ``p`` trains. Fallback: ``ctx(c)``.
    - ``"context_mean"``: ``ctx(c)`` for every perturbation.
    - ``"linear"``: ridge regression from the gene embedding to the shift (Ahlmann-Eltze, Huber
      & Anders, Nat. Methods 2025): ``ctx(c) + (e_p - e_bar) W``, ``W`` minimising
      ``sum_(c,q) |s(c, q) - ctx(c) - (e_q - e_bar) W|² + alpha |W|²`` over the training pairs
      (closed form), pooled across cell types unless ``per_cell_type=True``. Options ``alpha``
      (default 0.1), ``per_cell_type`` (default False).
    - ``"knn"``: unweighted mean of ``s(c, q)`` over the ``k`` training perturbations ``q != p``
      of ``c`` with the most cosine-similar gene embeddings (ties: label order). Option ``k``
      (default 5). Fallback: ``ctx(c)``.
    - ``"additive"``: for ``p = "A+B"`` (control members ignored) ``s(c, A) + s(c, B)``; members
      without training cells in ``c`` are left out of the sum and the cells flagged; with none,
      fallback ``ctx(c)``.

    Where the fallback is undefined too (``c`` has no training perturbed cell) ``delta = 0``.
    Fallback cells are flagged in ``obs[f"{key_added}_fallback"]``, counted in a warning and in
    ``uns[key_added]``. Gene embeddings are read as the model reads them (symbols upper-cased;
    a combination without its own row is the sum of its members' vectors); a perturbation
    without one is a ValueError naming it, never a zero vector.

    Parameters
    ----------
    adata
        Cells with log1p expression in ``X`` (or ``layer``).
    method
        One of :data:`BASELINES`.
    key_added
        Layer to write; default ``f"baseline_{method}"``.
    layer
        Layer with the input expression; ``None`` uses ``X``.
    split_key
        obs column with the data split; training cells have a value in ``train_values``.
    train_values
        Split values that are training data.
    train_mask
        Boolean mask of training cells (instead of ``split_key``).
    perturbation_key
        obs column with perturbation labels.
    control_group
        Label of control cells.
    cell_type_key
        obs column with the cell type; ``None`` treats all cells as one cell type.
    batch_key
        Optional obs column: matched controls then share the batch as well as the cell type
        (the shifts remain per cell type).
    gene_embeddings
        Gene embedding table for ``"linear"`` and ``"knn"``.
    perturbation_sep
        Separator of combination labels.
    seed
        Seed of the control matching.
    copy
        Return a modified copy instead of writing into ``adata``.
    **method_kwargs
        Method options (see above).

    Returns
    -------
    The modified copy if ``copy=True``, else ``None``. Writes ``layers[key_added]``
    (float32, same shape as ``X``), ``obs[f"{key_added}_fallback"]`` (bool) and
    ``uns[key_added]`` (method, options, number of training cells, whether the prediction is
    in-sample, fallback counts). Without ``split_key`` and ``train_mask`` every cell is a
    training cell and the baseline is evaluated in-sample (``uns[key_added]["in_sample"]``).

    Examples
    --------
    >>> import ptrag_sc
    >>> adata = ptrag_sc.datasets.perturbench_devel(subset="glioblastoma")
    >>> ptrag_sc.pp.few_shot_split(adata, held_out="U87MG", val=["PLK4"], test=["MAPK1", "SGK1"])
    >>> emb = adata.uns["gene_embeddings"]
    >>> for name in ptrag_sc.tl.BASELINES:
    ...     ptrag_sc.tl.predict_baseline(adata, name, split_key="split", gene_embeddings=emb)
    >>> sorted(k for k in adata.layers if k.startswith("baseline_"))
    ['baseline_additive', 'baseline_context_mean', 'baseline_control', 'baseline_knn',
    'baseline_linear', 'baseline_other_cell_types']
    >>> res = ptrag_sc.tl.evaluate(adata, pred_layer="baseline_knn", split_key="split")
    >>> len(res)
    2
    """
    check_anndata(adata)
    if method not in BASELINES:
        raise ValueError(
            f"`method={method!r}` is not a baseline; choose one of {list(BASELINES)}."
        )
    options = dict(_METHOD_KWARGS[method])
    unknown = sorted(set(method_kwargs) - set(options))
    if unknown:
        raise TypeError(
            f"Unknown option(s) {unknown} for baseline {method!r}; it accepts "
            f"{sorted(options) or 'no option'}."
        )
    options.update(method_kwargs)
    if method in ("linear", "knn") and gene_embeddings is None:
        raise ValueError(
            f"Baseline {method!r} needs `gene_embeddings` (a DataFrame indexed by gene)."
        )
    if method == "knn" and (int(options["k"]) != options["k"] or options["k"] < 1):
        raise ValueError(f"`k={options['k']}` must be a positive integer.")
    if method == "linear" and options["alpha"] < 0:
        raise ValueError(f"`alpha={options['alpha']}` must be >= 0.")
    if split_key is not None and train_mask is not None:
        raise ValueError("Pass either `split_key` or `train_mask`, not both.")
    key_added = key_added or f"baseline_{method}"

    matrix = get_matrix(adata, layer, "layer")
    pert = labels(adata, perturbation_key, "perturbation_key")
    ct = labels(adata, cell_type_key, "cell_type_key")
    context = [ct]
    if batch_key is not None:
        context.append(labels(adata, batch_key, "batch_key"))
    is_ctrl = pert == control_group
    if not is_ctrl.any():
        raise ValueError(
            f"No control cells: no cell has obs[{perturbation_key!r}] == {control_group!r} "
            "(`control_group`)."
        )
    if train_mask is not None:
        train = np.asarray(train_mask, dtype=bool)
        if train.shape != (adata.n_obs,):
            raise ValueError(f"`train_mask` has shape {train.shape}; expected ({adata.n_obs},).")
    elif split_key is not None:
        check_obs_key(adata, split_key, "split_key")
        train_values = as_str_tuple(train_values)
        train = in_values(adata.obs[split_key].astype(str).to_numpy(), train_values)
        if not (train & ~is_ctrl).any():
            raise ValueError(
                f"No perturbed training cell: no perturbed cell has obs[{split_key!r}] in "
                f"{list(train_values)}; existing values: "
                f"{sorted(map(str, adata.obs[split_key].unique()))}."
            )
    else:
        train = np.ones(adata.n_obs, dtype=bool)

    query = ~is_ctrl
    paired = match_controls(is_ctrl, *context, seed=seed, query=query)
    stats = _TrainingStats(matrix, pert, ct, is_ctrl, train)
    qidx = np.flatnonzero(query)
    grouped = pd.DataFrame({"c": ct[qidx], "p": pert[qidx]}).groupby(["c", "p"], sort=True)
    targets: list[tuple[str, str]] = list(grouped.size().index)
    cell_target = grouped.ngroup().to_numpy()
    if method in ("linear", "knn"):
        needed = {q for _, q in targets} | {q for _, q in stats.keys}
        embed = _embedder(gene_embeddings, control_group, perturbation_sep, needed)
        if method == "linear":
            alpha, per_cell_type = float(options["alpha"]), bool(options["per_cell_type"])
            learned = _linear_deltas(stats, embed, targets, alpha, per_cell_type)
        else:
            learned = _knn_deltas(stats, embed, targets, int(options["k"]))

    deltas = np.zeros((len(targets), adata.n_vars), dtype=np.float64)
    fallback = np.zeros(len(targets), dtype=bool)
    for t, (c, p) in enumerate(targets):
        partial = False
        if method == "control":
            continue
        if method == "context_mean":
            delta = stats.ctx.get(c)
        elif method == "other_cell_types":
            rows = [
                stats.shift[(c2, p)]
                for c2 in stats.cell_types
                if c2 != c and (c2, p) in stats.shift
            ]
            delta = np.mean(rows, axis=0) if rows else None
        elif method == "additive":
            genes = members(p, control_group, perturbation_sep)
            rows = [stats.shift[(c, g)] for g in genes if (c, g) in stats.shift]
            delta = np.sum(rows, axis=0) if rows else None
            partial = len(rows) < len(genes)
        else:
            delta = learned[t]
        fallback[t] = delta is None or partial
        deltas[t] = stats.ctx.get(c, 0.0) if delta is None else delta

    # Shifts are applied per (target, control context): the set's mean becomes the mean of the
    # controls it was matched from plus the shift, as in the model, and no value exceeds the
    # largest the training data (and the controls) reach for that gene.
    out = _dense_float32(matrix)
    ceiling = column_max(matrix, train | is_ctrl)
    ctx_code = context_codes(*context)
    ctx_means = group_means(matrix, np.where(is_ctrl, ctx_code, -1), int(ctx_code.max()) + 1)
    chunk = pd.Series(qidx).groupby([cell_target, ctx_code[qidx]]).indices
    for (t, code), positions in chunk.items():
        rows = qidx[positions]
        out[rows] = _apply(
            _dense_float32(matrix[paired[rows]]), deltas[t], ctx_means[code], ceiling
        )

    fell_back = np.zeros(adata.n_obs, dtype=bool)
    fell_back[qidx] = fallback[cell_target]
    fallback_groups = [f"{c}/{p}" for (c, p), f in zip(targets, fallback, strict=True) if f]
    if fallback_groups:
        warnings.warn(
            f"Baseline {method!r}: {int(fell_back.sum())} of {qidx.size} perturbed cell(s) in "
            f"{len(fallback_groups)} (cell type, perturbation) group(s) could not be predicted "
            f"as the method intends and used its documented fallback, e.g. {fallback_groups[:5]}; "
            f"see obs[{key_added + '_fallback'!r}].",
            UserWarning,
            stacklevel=2,
        )

    target = adata.copy() if copy else adata
    target.layers[key_added] = out
    target.obs[f"{key_added}_fallback"] = fell_back
    info: dict[str, Any] = {
        "method": method,
        "options": options,
        "seed": int(seed),
        "n_train_cells": int(train.sum()),
        "in_sample": train_mask is None and split_key is None,
        "n_fallback_cells": int(fell_back.sum()),
        "fallback_groups": fallback_groups,
    }
    if split_key is not None:
        info["split_key"] = split_key
        info["train_values"] = list(train_values)
    target.uns[key_added] = info
    return target if copy else None


def _apply(
    x_ctrl: np.ndarray, delta: np.ndarray, control_mean: np.ndarray, ceiling: np.ndarray
) -> np.ndarray:
    """The model's rule for applying a mean shift to a group's matched control cells."""
    ceiling = torch.from_numpy(ceiling)
    scaled, offset = apply_shift(
        torch.from_numpy(x_ctrl)[None],
        torch.as_tensor(delta, dtype=torch.float32)[None, None],
        torch.as_tensor(control_mean, dtype=torch.float32)[None],
        ceiling,
    )
    return torch.minimum(torch.relu(scaled + offset), ceiling)[0].numpy()


def _dense_float32(matrix: MatrixLike) -> np.ndarray:
    if sparse.issparse(matrix):
        return matrix.toarray().astype(np.float32, copy=False)
    return np.array(matrix, dtype=np.float32, copy=True)


class _TrainingStats:
    """Training control means, per-(cell type, perturbation) shifts and context shifts."""

    def __init__(
        self,
        matrix: MatrixLike,
        pert: np.ndarray,
        ct: np.ndarray,
        is_ctrl: np.ndarray,
        train: np.ndarray,
    ) -> None:
        cell_types, ct_code = np.unique(ct, return_inverse=True)
        self.cell_types = list(cell_types)
        # Controls are inputs, not targets: all of a cell type's controls when none trains.
        ctrl_train = is_ctrl & train
        has_train_ctrl = np.bincount(ct_code[ctrl_train], minlength=len(cell_types)) > 0
        use = np.where(has_train_ctrl[ct_code], ctrl_train, is_ctrl)
        ctrl_means = group_means(matrix, np.where(use, ct_code, -1), len(cell_types))
        self.control_mean = dict(zip(self.cell_types, ctrl_means, strict=True))

        pert_train = train & ~is_ctrl
        grouped = pd.DataFrame({"c": ct[pert_train], "p": pert[pert_train]}).groupby(
            ["c", "p"], sort=True
        )
        codes = np.full(ct.shape[0], -1, dtype=np.int64)
        codes[pert_train] = grouped.ngroup().to_numpy()
        self.keys: list[tuple[str, str]] = list(grouped.size().index)
        means = group_means(matrix, codes, len(self.keys))
        self.shift: dict[tuple[str, str], np.ndarray] = {}
        self.by_cell_type: dict[str, list[str]] = {}
        for i, (c, p) in enumerate(self.keys):
            if np.isnan(self.control_mean[c]).any():
                raise ValueError(f"No control cells for cell type {c!r}; cannot compute shifts.")
            self.shift[(c, p)] = means[i] - self.control_mean[c]
            self.by_cell_type.setdefault(c, []).append(p)
        self.ctx: dict[str, np.ndarray] = {
            c: np.mean([self.shift[(c, p)] for p in ps], axis=0)
            for c, ps in self.by_cell_type.items()
        }


def _embedder(table: pd.DataFrame, control_group: str, sep: str, needed: Iterable[str]) -> Embed:
    """Embeddings of perturbation labels (control members dropped) by the model's encoder."""
    from ..data._perturbations import PerturbationEncoder

    encoder = PerturbationEncoder(table, sep=sep)
    canonical = {p: sep.join(members(p, control_group, sep)) for p in needed}
    empty = sorted(p for p, c in canonical.items() if not c)
    if empty:
        raise ValueError(f"Perturbation label(s) {empty[:10]} have no gene to embed.")
    encoder.check(sorted(set(canonical.values())), context=" (baseline)")
    return lambda perts: encoder.embed([canonical[p] for p in perts]).astype(np.float64)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _by_cell_type(targets: list[tuple[str, str]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for t, (c, _) in enumerate(targets):
        out.setdefault(c, []).append(t)
    return out


def _knn_deltas(
    stats: _TrainingStats, embed: Embed, targets: list[tuple[str, str]], k: int
) -> list[np.ndarray | None]:
    """Mean training shift of the ``k`` most cosine-similar other training perturbations."""
    out: list[np.ndarray | None] = [None] * len(targets)
    for c, tids in _by_cell_type(targets).items():
        candidates = stats.by_cell_type.get(c, [])  # sorted by label
        if not candidates:
            continue
        names = np.asarray(candidates, dtype=object)
        shifts = np.vstack([stats.shift[(c, q)] for q in candidates])
        sim = _unit_rows(embed([targets[t][1] for t in tids])) @ _unit_rows(embed(candidates)).T
        for row, t in enumerate(tids):
            valid = np.flatnonzero(names != targets[t][1])
            if valid.size == 0:
                continue
            nearest = valid[np.argsort(-sim[row, valid], kind="stable")[:k]]
            out[t] = shifts[nearest].mean(axis=0)
    return out


def _linear_deltas(
    stats: _TrainingStats,
    embed: Embed,
    targets: list[tuple[str, str]],
    alpha: float,
    per_cell_type: bool,
) -> list[np.ndarray | None]:
    """Ridge regression of (shift - context shift) on centred embeddings, closed form."""
    groups = [None] if not per_cell_type else list(stats.by_cell_type)
    models: dict[str | None, tuple[np.ndarray, np.ndarray]] = {}
    for g in groups:
        keys = [k for k in stats.keys if g is None or k[0] == g]
        if not keys:
            continue
        e = embed([q for _, q in keys])
        y = np.vstack([stats.shift[k] - stats.ctx[k[0]] for k in keys])
        e_bar = e.mean(axis=0)
        ec = e - e_bar
        n, d = ec.shape
        if n <= d:  # dual form: W = E^T (E E^T + alpha I)^-1 Y
            w = ec.T @ _solve(ec @ ec.T + alpha * np.eye(n), y)
        else:  # primal form: W = (E^T E + alpha I)^-1 E^T Y
            w = _solve(ec.T @ ec + alpha * np.eye(d), ec.T @ y)
        models[g] = (e_bar, w)

    out: list[np.ndarray | None] = [None] * len(targets)
    for c, tids in _by_cell_type(targets).items():
        model = models.get(c if per_cell_type else None)
        ctx = stats.ctx.get(c)
        if model is None or ctx is None:
            continue
        e_bar, w = model
        pred = ctx + (embed([targets[t][1] for t in tids]) - e_bar) @ w
        for row, t in enumerate(tids):
            out[t] = pred[row]
    return out


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return linalg.solve(a, b, assume_a="pos")
    except (linalg.LinAlgError, ValueError):
        return linalg.lstsq(a, b)[0]
