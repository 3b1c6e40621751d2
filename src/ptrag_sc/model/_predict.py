"""The bodies of :meth:`PTRAG.predict` and :meth:`PTRAG.get_retrieval`: they read the model's
:class:`~ptrag_sc.data.ModelState` and its network, never the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from .._checks import check_anndata, check_flag, check_seed, positive_int
from .._constants import (
    CONFIDENCE_SUFFIX,
    OBS_RETRIEVAL_DISTANCE,
    OBS_SOURCE_CELL,
    OBS_UNSEEN_CELL_TYPE,
    OBS_UNSEEN_PERTURBATION,
    OUTPUTS,
    UNS_KEY,
)
from .._settings import settings
from .._symbols import _format_list
from ..data import NO_CELL_TYPE, match_controls
from ..data._checks import check_controls_per_cell_type, check_expression
from ..data._writers import DenseLayerWriter, H5ADWriter, SparseLayerWriter
from ._inference import check_batch_size, context_index, evaluating, generate, record, run

if TYPE_CHECKING:
    import os

    from ..data import ModelState
    from ..module import PTRAGModule

#: obs column of a counterfactual output file: whether the row is a prediction.
OBS_PREDICTED = "ptrag_predicted"


def predict(
    state: ModelState,
    module: PTRAGModule,
    adata: AnnData | None,
    perturbations: Sequence[str] | None,
    *,
    cell_type: str | None,
    indices: Sequence[int] | None,
    batch_size: int | None,
    key_added: str,
    inplace: bool,
    overwrite: bool,
    sample_retrieval: bool,
    seed: int | None,
    output: str | os.PathLike | None,
    sparse: bool,
) -> AnnData | np.ndarray | object | None:
    """The body of :meth:`PTRAG.predict`."""
    if adata is None:
        raise ValueError("Pass an AnnData: this model was loaded without one.")
    check_anndata(adata)
    batch_size = check_batch_size(batch_size)
    inplace = check_flag("inplace", inplace)
    overwrite = check_flag("overwrite", overwrite)
    sample_retrieval = check_flag("sample_retrieval", sample_retrieval)
    seed = check_seed("seed", seed)
    options = {"batch_size": batch_size, "sample_retrieval": sample_retrieval, "seed": seed}
    if perturbations is None and inplace and adata.is_view:
        raise ValueError(
            "`adata` is a view: writing the prediction layer would turn it into a copy and leave "
            "the AnnData it views unchanged. Predict on the full AnnData with `indices=`, on "
            "`adata[mask].copy()`, or pass `inplace=False`."
        )
    if perturbations is not None:
        if indices is not None:
            raise ValueError(
                "`indices` applies to counterfactual prediction; use it without `perturbations`."
            )
        if output is not None or sparse:
            raise ValueError(
                "`output` and `sparse` apply to counterfactual prediction; use them without "
                "`perturbations`."
            )
        return generation(state, module, adata, perturbations, cell_type, key_added, **options)
    if cell_type is not None:
        raise ValueError("`cell_type` applies to generation mode (with `perturbations=[...]`).")
    options.update(output=output, sparse=sparse)
    return counterfactual(state, module, adata, indices, key_added, inplace, overwrite, **options)


def _check_layer_key(state: ModelState, adata: AnnData, key_added: str, overwrite: bool) -> None:
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"`key_added` must be a non-empty string, got {key_added!r}.")
    if state.setup.layer is not None and key_added == state.setup.layer:
        raise ValueError(
            f"`key_added={key_added!r}` is the layer the model reads its input from; choose "
            "another name."
        )
    column = key_added + CONFIDENCE_SUFFIX
    for where, present in (
        (f"`adata.layers[{key_added!r}]`", key_added in adata.layers),
        (f"`adata.obs[{column!r}]`", state.has_confidence and column in adata.obs.columns),
    ):
        if present and not overwrite:
            raise ValueError(
                f"{where} already exists; pass `overwrite=True` to replace it, or another "
                "`key_added`."
            )


def _indices_mask(indices: Sequence[int], n_obs: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.dtype == bool:
        raise ValueError(
            "`indices` holds positions of cells, not a boolean mask; pass `np.flatnonzero(mask)`."
        )
    if idx.size == 0:
        raise ValueError("`indices` is empty: no cell to predict.")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"`indices` must hold integer positions, got dtype {idx.dtype}.")
    if idx.min() < -n_obs or idx.max() >= n_obs:
        raise ValueError(f"`indices` holds positions outside [0, {n_obs}).")
    chosen = np.zeros(n_obs, dtype=bool)
    chosen[idx] = True
    return chosen


def counterfactual(
    state: ModelState,
    module: PTRAGModule,
    adata: AnnData,
    indices: Sequence[int] | None,
    key_added: str,
    inplace: bool,
    overwrite: bool,
    *,
    batch_size: int,
    sample_retrieval: bool,
    seed: int | None,
    output: str | os.PathLike | None,
    sparse: bool,
) -> np.ndarray | object | None:
    """Counterfactual prediction of every perturbed cell of ``adata`` (or of ``indices``)."""
    if inplace and output is None:
        _check_layer_key(state, adata, key_added, overwrite)
    data = state.data(adata)
    where = "the AnnData to predict"
    check_expression(data.matrix, where=where, warn_counts=True)
    is_control = data.is_control
    query = ~is_control
    if indices is not None:
        query &= _indices_mask(indices, data.n_obs)
    involved = query | is_control
    check_controls_per_cell_type(is_control[involved], data.cell_types[involved], where=where)
    # Sorted like np.unique (the error lists them in this order), found by hashing: a sort of
    # every cell's label costs ~50 ms per 100k cells.
    queried = np.sort(pd.unique(data.labels[query]))
    state.encoder.check(queried, context=" in the AnnData to predict")
    keys, (names, means) = state.builder.control_contexts(data, is_control)
    sources = match_controls(is_control, keys, seed=0 if seed is None else seed, query=query)
    rows = np.flatnonzero(query)
    if not isinstance(sparse, bool | np.bool_):
        raise ValueError(f"`sparse` must be True or False, got {sparse!r}.")
    if output is None:
        writer_cls = SparseLayerWriter if sparse else DenseLayerWriter
        writer = writer_cls(data.matrix, data.columns, query)
    else:
        if sparse:
            raise ValueError(
                "`sparse=True` applies to the layer written in memory; with `output=` the "
                "file's `X` is dense."
            )
        ct_key = state.setup.cell_type_key or ""
        uns = record(
            state, "counterfactual", sample_retrieval, seed, cell_type_key=ct_key, layer="X"
        )
        obs = adata.obs.drop(columns=[c for c in adata.obs.columns if str(c).startswith("_scvi_")])
        obs[OBS_PREDICTED] = query
        writer = H5ADWriter(
            output,
            obs=obs,
            var=adata.var,
            uns={UNS_KEY: uns},
            matrix=data.matrix,
            columns=data.columns,
            predicted=query,
            overwrite=overwrite,
            input_file=adata.filename if adata.isbacked else None,
        )
    try:
        _, confidence = generate(
            state,
            module,
            data,
            sources[rows],
            data.labels[rows],
            data.cell_types[rows],
            data.batches[rows],
            context_index(names, keys[rows]),
            means,
            batch_size=batch_size,
            sample_retrieval=sample_retrieval,
            seed=seed,
            progress=settings.progress_bar and len(rows) > 20_000,
            write=lambda positions, predictions: writer.write(rows[positions], predictions),
        )
    except BaseException:
        writer.abort()
        raise
    result = writer.finish()
    if output is not None or not inplace:
        return result
    adata.layers[key_added] = result
    if state.has_confidence:
        per_cell = np.full(data.n_obs, np.nan, dtype=np.float32)
        per_cell[rows] = confidence
        adata.obs[key_added + CONFIDENCE_SUFFIX] = per_cell
    return None


def generation(
    state: ModelState,
    module: PTRAGModule,
    adata: AnnData,
    perturbations: str | Sequence[str],
    cell_type: str | None,
    key_added: str,
    *,
    batch_size: int,
    sample_retrieval: bool,
    seed: int | None,
) -> AnnData:
    """New cells generated from the control cells of ``adata``, one per perturbation."""
    setup = state.setup
    requested, canonical = state.requested(perturbations)
    data = state.data(adata, require_labels=False)
    keep = data.is_control.copy()
    if data.has_cell_types:
        if cell_type is not None:
            present = set(map(str, data.cell_types))
            if cell_type not in present:
                raise ValueError(
                    f"`cell_type={cell_type!r}` does not occur in "
                    f"`adata.obs[{setup.cell_type_key!r}]` (values: {sorted(present)[:10]})."
                )
            keep &= data.cell_types == cell_type
    else:
        if setup.cell_type_key is not None and cell_type is None:
            trained = _format_list(state.training_cell_types, limit=10)
            raise ValueError(
                f"The AnnData has no column {setup.cell_type_key!r} (`cell_type_key`): pass "
                f"`cell_type=` naming the control cells' cell type (trained: {trained})."
            )
        data.cell_types = np.full(data.n_obs, cell_type or NO_CELL_TYPE, dtype=object)
    cell_types = data.cell_types
    if not keep.any():
        of_type = f" with cell type {cell_type!r}." if cell_type else "."
        raise ValueError(
            f"No control cells to generate from: no cell of the AnnData is labelled "
            f"{setup.control_group!r} in `obs[{setup.perturbation_key!r}]`" + of_type
        )
    controls = np.flatnonzero(keep)
    matrix = data.matrix if data.expression.backed else data.matrix[controls]
    check_expression(matrix, where="the control cells", warn_counts=True)
    keys, (names, means) = state.builder.control_contexts(data, keep)
    n_ctrl, n_pert = controls.shape[0], len(requested)
    sources = np.tile(controls, n_pert)
    labels = np.repeat(canonical, n_ctrl)
    out = np.empty((sources.shape[0], module.n_genes), dtype=np.float32)
    distance, confidence = generate(
        state,
        module,
        data,
        sources,
        labels,
        cell_types[sources],
        data.batches[sources],
        context_index(names, keys[sources]),
        means,
        batch_size=batch_size,
        sample_retrieval=sample_retrieval,
        seed=seed,
        progress=settings.progress_bar and n_pert > 1,
        write=out.__setitem__,
    )
    pert_key = setup.perturbation_key
    ct_key = setup.cell_type_key or "cell_type"
    shown = np.repeat(np.asarray(requested, dtype=object), n_ctrl)
    source_names = np.asarray(adata.obs_names)[sources]
    source_types = cell_types[sources].astype(str)
    obs = pd.DataFrame(
        {
            pert_key: pd.Categorical(shown, categories=requested),
            ct_key: pd.Categorical(source_types),
            OBS_SOURCE_CELL: source_names,
            OBS_UNSEEN_PERTURBATION: ~np.isin(
                labels.astype(str), state.training_perturbations.astype(str)
            ),
            OBS_UNSEEN_CELL_TYPE: ~np.isin(source_types, state.training_cell_types.astype(str)),
            OBS_RETRIEVAL_DISTANCE: distance,
            key_added + CONFIDENCE_SUFFIX: confidence,
        },
        index=pd.Index([f"{p}:{c}" for p, c in zip(shown, source_names, strict=True)]),
    )
    if setup.batch_key is not None and setup.batch_key in adata.obs.columns:
        batch = adata.obs[setup.batch_key].astype(str).to_numpy()[sources]
        obs[setup.batch_key] = pd.Categorical(batch)
    result = AnnData(X=out, obs=obs, var=pd.DataFrame(index=state.var_names.copy()))
    result.layers[key_added] = out.copy()
    columns = {"cell_type_key": ct_key, "layer": key_added}
    result.uns[UNS_KEY] = record(state, "generation", sample_retrieval, seed, **columns)
    return result


def retrieval_table(
    state: ModelState,
    module: PTRAGModule,
    perturbations: str | Sequence[str],
    cell_type: str | Sequence[str] | None,
    adata: AnnData | None,
    n_cells: int,
    seed: int,
) -> pd.DataFrame:
    """The table of :meth:`PTRAG.get_retrieval`."""
    check_anndata(adata, allow_none=True)
    seed = check_seed("seed", seed, allow_none=False)
    if state.retrieval == "none":
        raise ValueError("This model was built with `retrieval='none'`: it retrieves nothing.")
    if adata is None:
        raise ValueError("Pass an AnnData with control cells: this model was loaded without one.")
    n_cells = positive_int("n_cells", n_cells)
    queries, canonical = state.requested(perturbations)
    data = state.data(adata, require_labels=False)
    wanted = [cell_type] if isinstance(cell_type, str) else cell_type
    wanted = [str(ct) for ct in (state.training_cell_types if cell_type is None else wanted)]
    available = sorted(set(map(str, data.cell_types[data.is_control])))
    absent = [ct for ct in wanted if ct not in available]
    if absent:
        raise ValueError(
            f"No control cells of cell type(s) {absent} in the AnnData (`cell_type`): stage 2 "
            "runs on control cells of the queried cell type. Cell types with control cells: "
            f"{available[:10]}."
        )
    memory = state.memory
    names, entry_cts = memory.perturbations.astype(str), memory.cell_types.astype(str)
    rng = np.random.default_rng(seed)
    frames = []
    with evaluating(module) as device:
        _, (context_names, means) = state.builder.control_contexts(data, data.is_control)
        for ct in wanted:
            pool = np.flatnonzero(data.is_control & (data.cell_types == ct))
            cells = np.sort(rng.choice(pool, size=min(n_cells, pool.size), replace=False))
            sources = np.tile(cells, len(queries))
            n_rows = sources.shape[0]
            groups = state.builder.prediction_groups(
                labels=np.repeat(canonical, cells.size),
                cell_types=np.full(n_rows, ct, dtype=object),
                batches=np.full(n_rows, -1),
                context_index=np.full(n_rows, context_index(context_names, [str(ct)])[0]),
                context_means=means,
            )
            steps = run(module, device, groups, data.expression, sources, cells.size, len(queries))
            for step in steps:
                inference = step.inference
                if OUTPUTS.KEEP in inference:
                    keep_p = inference[OUTPUTS.KEEP_PROBABILITY].mean(1).cpu().numpy()
                    selected = inference[OUTPUTS.KEEP].mean(1).cpu().numpy()
                else:
                    keep_p = inference[OUTPUTS.ATTENTION].mean(1).cpu().numpy()
                    selected = np.full_like(keep_p, np.nan)
                cand = groups.candidates[step.sets]
                valid, entry, k = cand >= 0, np.maximum(cand, 0), cand.shape[1]
                order = pd.Index(canonical).get_indexer(groups.perturbation[step.sets])
                reliability = np.full(len(step.sets), np.nan)
                if groups.reliability is not None:
                    reliability = groups.reliability[step.sets].astype(np.float64)
                frame = pd.DataFrame(
                    {
                        "query": np.repeat(np.asarray(queries, dtype=object)[order], k),
                        "cell_type": ct,
                        "rank": np.tile(np.arange(1, k + 1), len(step.sets)),
                        "candidate": np.where(valid, names[entry], None).ravel(),
                        "candidate_cell_type": np.where(valid, entry_cts[entry], None).ravel(),
                        "similarity": groups.similarity[step.sets].ravel().astype(np.float64),
                        "keep_probability": keep_p.ravel(),
                        "selected_fraction": selected.ravel(),
                        "confidence": np.repeat(step.confidence.astype(np.float64), k),
                        "reliability": np.repeat(reliability, k),
                    }
                )
                frames.append(frame[valid.ravel()])
    out = pd.concat(frames, ignore_index=True)
    order = pd.DataFrame(
        {
            "c": pd.Categorical(out["cell_type"], categories=list(dict.fromkeys(wanted))),
            "q": pd.Categorical(out["query"], categories=queries),
            "r": out["rank"],
        }
    )
    out = out.iloc[order.sort_values(["c", "q", "r"], kind="stable").index].reset_index(drop=True)
    out.insert(8, "selected", out["selected_fraction"] > 0.5)
    if memory.kind != "response":
        out = out.drop(columns=["candidate_cell_type", "confidence", "reliability"])
    return out
