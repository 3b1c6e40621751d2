"""What :meth:`PTRAG.predict` and :meth:`PTRAG.get_retrieval` do, on top of the data layer."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._constants import (
    CONFIDENCE_SUFFIX,
    OBS_RETRIEVAL_DISTANCE,
    OBS_SOURCE_CELL,
    OBS_UNSEEN_CELL_TYPE,
    OBS_UNSEEN_PERTURBATION,
    OUTPUTS,
    TENSORS,
    UNS_KEY,
)
from .._settings import settings
from .._symbols import _format_list
from .._utils import flush_denormal, progress_bar, settings_threads
from ..data import NO_CELL_TYPE, count_prediction_batches, match_controls, prediction_batches
from ..data._writers import DenseLayerWriter, H5ADWriter, SparseLayerWriter
from ._guard import local_random, predicts
from ._validation import (
    check_anndata,
    check_controls_per_cell_type,
    check_expression,
    check_flag,
    check_seed,
    positive_int,
)

#: obs column of a counterfactual output file: whether the row is a prediction (else a copy of the input).
OBS_PREDICTED = "ptrag_predicted"
#: Sets per forward pass at prediction.
DEFAULT_PREDICT_BATCH_SIZE = 64


def check_batch_size(batch_size) -> int:
    return DEFAULT_PREDICT_BATCH_SIZE if batch_size is None else positive_int("batch_size", batch_size)


def predict(model, adata, perturbations, *, cell_type, indices, batch_size, key_added, inplace, overwrite, sample_retrieval, seed, output, sparse):
    """The body of :meth:`PTRAG.predict`: check the arguments, then run the mode they ask for."""
    adata = model._resolve_adata(adata)
    model._require_trained()
    adata = model.adata if adata is None else adata
    if adata is None:
        raise ValueError("Pass an AnnData: this model was loaded without one.")
    check_anndata(adata)
    batch_size = check_batch_size(batch_size)
    inplace = check_flag("inplace", inplace)
    overwrite = check_flag("overwrite", overwrite)
    sample_retrieval = check_flag("sample_retrieval", sample_retrieval)
    seed = check_seed("seed", seed)
    if perturbations is None and inplace and adata.is_view:
        raise ValueError(
            "`adata` is a view: writing the prediction layer would turn it into a copy and leave the "
            "AnnData it views unchanged. Predict on the full AnnData with `indices=`, on "
            "`adata[mask].copy()`, or pass `inplace=False`."
        )
    if perturbations is not None:
        if indices is not None:
            raise ValueError("`indices` applies to counterfactual prediction; use it without `perturbations`.")
        if output is not None or sparse:
            raise ValueError("`output` and `sparse` apply to counterfactual prediction; use them without `perturbations`.")
        return generation(model, adata, perturbations, cell_type, batch_size, key_added, sample_retrieval, seed)
    if cell_type is not None:
        raise ValueError("`cell_type` applies to generation mode (with `perturbations=[...]`).")
    return counterfactual(model, adata, indices, batch_size, key_added, inplace, overwrite, sample_retrieval, seed, output=output, sparse=sparse)


def _progress(total: int, description: str, enabled: bool):
    return progress_bar(total, description, "batch", enabled)


@predicts
@torch.inference_mode()
def generate(model, data, sources, labels, cell_types, batches, context_index, context_means, *, batch_size, sample_retrieval, seed, progress, write):
    """Generate one cell per row from control cell ``sources[row]`` under ``labels[row]``.

    Rows are grouped by (cell type, perturbation[, batch], control context) and cut into sets
    of at most ``cell_set_size``; ``write(rows, predictions)`` receives each batch's output
    (model gene order). Returns the retrieval distance and the confidence of every row (NaN
    where the model has no response memory; a distance is NaN where nothing was retrieved).
    """
    builder = model._builder()
    groups = builder.prediction_groups(
        labels=labels, cell_types=cell_types, batches=batches, context_index=context_index, context_means=context_means
    )
    distance = np.full(labels.shape[0], np.nan, dtype=np.float32)
    confidence = np.full(labels.shape[0], np.nan, dtype=np.float32)
    module = model.module
    device = next(module.parameters()).device
    # Sampling draws from a generator of this call's own: torch's global one is left alone, and
    # predictions running in other threads do not draw from it.
    sampling = local_random(0 if seed is None else seed, device) if sample_retrieval else contextlib.nullcontext()
    bar = _progress(count_prediction_batches(groups, model.cell_set_size, batch_size), "Predicting", progress)
    try:
        with sampling, flush_denormal(), settings_threads():
            module.eval()
            encoded = _encoded_sources(module, data.expression, sources, groups.cells, device)
            for batch, out_rows, set_group in prediction_batches(
                groups, data.expression, sources, set_size=model.cell_set_size, batch_size=batch_size
            ):
                batch = {k: v.to(device) for k, v in batch.items()}
                h_ctrl = None if encoded is None else encoded[1][torch.from_numpy(encoded[0][out_rows]).to(device)]
                inference = module.inference(**module._get_inference_input(batch), h_ctrl=h_ctrl, sample_retrieval=sample_retrieval)
                generated = module.generative(**module._get_generative_input(batch, inference))
                write(out_rows.ravel(), generated[OUTPUTS.PREDICTION].reshape(-1, module.n_genes).cpu().numpy())
                if OUTPUTS.SET_WEIGHTS in inference:
                    distance[out_rows] = _retrieval_distance(inference[OUTPUTS.SET_WEIGHTS].cpu().numpy(), groups.similarity[set_group])[:, None]
                if groups.confidence is not None:
                    confidence[out_rows] = groups.confidence[set_group][:, None]
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return distance, confidence


def _retrieval_distance(weights: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """One minus the similarity of the retrieved candidates, weighted by their selection, per set;
    NaN where nothing was retrieved (no distance to speak of, rather than a reassuring 0)."""
    total = weights.sum(-1)
    sims = np.nan_to_num(similarity, nan=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (weights * (1.0 - sims)).sum(-1) / total, np.nan)


#: Largest table of encoded control cells kept during one prediction.
_MAX_ENCODED_BYTES = 256 * 2**20


def _encoded_sources(module, expression, sources, rows, device):
    """``(position of each row's source, encoded distinct sources)``, or ``None`` when sources rarely repeat.

    A control cell is the source of many predicted cells (every perturbation of a generation
    run, and about one in (perturbed / control cells) of a counterfactual one); its basal
    encoding, the widest matrix product of a prediction, does not depend on the set it joins.
    Encoding each distinct source once saves that product for every repeat.
    """
    needed = sources[rows]
    distinct = np.unique(needed)
    if 2 * distinct.size > needed.size or distinct.size * module.n_hidden * 4 > _MAX_ENCODED_BYTES:
        return None
    position = np.full(sources.shape[0], -1, dtype=np.int64)
    position[rows] = np.searchsorted(distinct, needed)
    table = torch.empty(distinct.size, module.n_hidden, device=device)
    chunk = 4096
    for start in range(0, distinct.size, chunk):
        cells = expression.rows(distinct[start : start + chunk]).to(device)
        table[start : start + cells.shape[0]] = module.basal_encoder(cells)
    return position, table


def _context_index(names, keys) -> np.ndarray:
    """Position in ``names`` of each context key (object arrays of str, as the builder makes them)."""
    return pd.Index(names).get_indexer(keys)


def counterfactual(model, adata, indices, batch_size, key_added, inplace, overwrite, sample_retrieval, seed, output=None, sparse=False):
    """Counterfactual prediction of every perturbed cell of ``adata`` (see :meth:`PTRAG.predict`)."""
    setup = model._setup
    if inplace and output is None:
        if not isinstance(key_added, str) or not key_added:
            raise ValueError(f"`key_added` must be a non-empty string, got {key_added!r}.")
        if setup.layer is not None and key_added == setup.layer:
            raise ValueError(f"`key_added={key_added!r}` is the layer the model reads its input from; choose another name.")
        if key_added in adata.layers and not overwrite:
            raise ValueError(f"`adata.layers[{key_added!r}]` already exists; pass `overwrite=True` to replace it, or another `key_added`.")
        column = key_added + CONFIDENCE_SUFFIX
        if model.memory_kind == "response" and model.retrieval != "none" and column in adata.obs.columns and not overwrite:
            raise ValueError(f"`adata.obs[{column!r}]` already exists; pass `overwrite=True` to replace it, or another `key_added`.")
    data = model._data(adata)
    check_expression(data.matrix, where="the AnnData to predict", warn_counts=True)
    is_control = data.is_control
    query = ~is_control
    if indices is not None:
        idx = np.asarray(indices)
        if idx.dtype == bool:
            raise ValueError("`indices` holds positions of cells, not a boolean mask; pass `np.flatnonzero(mask)`.")
        if idx.size == 0:
            raise ValueError("`indices` is empty: no cell to predict.")
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"`indices` must hold integer positions, got dtype {idx.dtype}.")
        if idx.min() < -data.n_obs or idx.max() >= data.n_obs:
            raise ValueError(f"`indices` holds positions outside [0, {data.n_obs}).")
        chosen = np.zeros(data.n_obs, dtype=bool)
        chosen[idx] = True
        query &= chosen
    involved = query | is_control
    check_controls_per_cell_type(is_control[involved], data.cell_types[involved], where="the AnnData to predict")
    # Sorted like np.unique (the error lists them in this order), found by hashing: a sort of
    # every cell's label costs ~50 ms per 100k cells.
    model._encoder.check(np.sort(pd.unique(data.labels[query])), context=" in the AnnData to predict")
    builder = model._builder()
    keys, (names, means) = builder.control_contexts(data, is_control)
    sources = match_controls(is_control, keys, seed=0 if seed is None else seed, query=query)
    rows = np.flatnonzero(query)
    writer = _output_writer(model, adata, data, query, output=output, sparse=sparse, overwrite=overwrite, sample_retrieval=sample_retrieval, seed=seed)

    def write(positions, predictions):
        writer.write(rows[positions], predictions)

    try:
        _, confidence = generate(
            model,
            data,
            sources[rows],
            data.labels[rows],
            data.cell_types[rows],
            data.batches[rows],
            _context_index(names, keys[rows]),
            means,
            batch_size=batch_size,
            sample_retrieval=sample_retrieval,
            seed=seed,
            progress=settings.progress_bar and len(rows) > 20_000,
            write=write,
        )
    except BaseException:
        writer.abort()
        raise
    result = writer.finish()
    if output is not None or not inplace:
        return result
    adata.layers[key_added] = result
    if model.memory_kind == "response" and model.retrieval != "none":
        per_cell = np.full(data.n_obs, np.nan, dtype=np.float32)
        per_cell[rows] = confidence
        adata.obs[key_added + CONFIDENCE_SUFFIX] = per_cell
    return None


def _output_writer(model, adata, data, query, *, output, sparse, overwrite, sample_retrieval, seed):
    """Where counterfactual predictions go: a dense or sparse layer, or a new h5ad file (``output``)."""
    if not isinstance(sparse, bool | np.bool_):
        raise ValueError(f"`sparse` must be True or False, got {sparse!r}.")
    if output is None:
        writer_cls = SparseLayerWriter if sparse else DenseLayerWriter
        return writer_cls(data.matrix, data.columns, query)
    if sparse:
        raise ValueError("`sparse=True` applies to the layer written in memory; with `output=` the file's `X` is dense.")
    setup = model._setup
    record = {
        "mode": "counterfactual",
        "retrieval": model.retrieval,
        "memory": model.memory_kind,
        "n_candidates": model.n_candidates,
        "cell_set_size": model.cell_set_size,
        "sample_retrieval": bool(sample_retrieval),
        "seed": -1 if seed is None else int(seed),
        "perturbation_key": setup.perturbation_key,
        "cell_type_key": setup.cell_type_key or "",
        "control_group": setup.control_group,
        "layer": "X",
    }
    obs = adata.obs.drop(columns=[c for c in adata.obs.columns if str(c).startswith("_scvi_")])
    obs[OBS_PREDICTED] = query
    return H5ADWriter(
        output,
        obs=obs,
        var=adata.var,
        uns={UNS_KEY: record},
        matrix=data.matrix,
        columns=data.columns,
        predicted=query,
        overwrite=overwrite,
        input_file=adata.filename if adata.isbacked else None,
    )


def generation(model, adata, perturbations, cell_type, batch_size, key_added, sample_retrieval, seed):
    """Generation of new cells from control cells (see :meth:`PTRAG.predict`)."""
    setup = model._setup
    requested = [perturbations] if isinstance(perturbations, str) else list(perturbations)
    if not requested:
        raise ValueError("`perturbations` is empty.")
    requested = [str(p) for p in requested]
    from ..data import normalise_labels

    canonical = normalise_labels(requested, control_group=setup.control_group, sep=setup.sep)
    duplicated = pd.Index(canonical)[pd.Index(canonical).duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"`perturbations` asks for the same perturbation twice (as written or after normalisation): {duplicated[:5]}.")
    if np.any(canonical == setup.control_group):
        raise ValueError(f"`perturbations` holds the control label {setup.control_group!r}; ask for genes.")
    model._encoder.check(canonical, context=" requested")
    data = model._data(adata, require_labels=False)
    keep = data.is_control.copy()
    if data.has_cell_types:
        if cell_type is not None:
            present = set(map(str, data.cell_types))
            if cell_type not in present:
                raise ValueError(
                    f"`cell_type={cell_type!r}` does not occur in `adata.obs[{setup.cell_type_key!r}]` (values: {sorted(present)[:10]})."
                )
            keep &= data.cell_types == cell_type
        cell_types = data.cell_types
    else:
        if setup.cell_type_key is not None and cell_type is None:
            raise ValueError(
                f"The AnnData has no column {setup.cell_type_key!r} (`cell_type_key`): pass `cell_type=` naming the "
                f"control cells' cell type (trained: {_format_list(model.training_cell_types_, limit=10)})."
            )
        cell_types = np.full(data.n_obs, cell_type or NO_CELL_TYPE, dtype=object)
        data.cell_types = cell_types
    if not keep.any():
        raise ValueError(
            f"No control cells to generate from: no cell of the AnnData is labelled {setup.control_group!r} in "
            f"`obs[{setup.perturbation_key!r}]`" + (f" with cell type {cell_type!r}." if cell_type else ".")
        )
    controls = np.flatnonzero(keep)
    check_expression(data.matrix[controls] if not data.expression.backed else data.matrix, where="the control cells", warn_counts=True)
    builder = model._builder()
    keys, (names, means) = builder.control_contexts(data, keep)
    n_ctrl, n_pert = controls.shape[0], len(requested)
    sources = np.tile(controls, n_pert)
    labels = np.repeat(canonical, n_ctrl)
    out = np.empty((sources.shape[0], model.module.n_genes), dtype=np.float32)

    def write(positions, predictions):
        out[positions] = predictions

    distance, confidence = generate(
        model,
        data,
        sources,
        labels,
        cell_types[sources],
        data.batches[sources],
        _context_index(names, keys[sources]),
        means,
        batch_size=batch_size,
        sample_retrieval=sample_retrieval,
        seed=seed,
        progress=settings.progress_bar and n_pert > 1,
        write=write,
    )
    pert_key = setup.perturbation_key
    ct_key = setup.cell_type_key or "cell_type"
    shown = np.repeat(np.asarray(requested, dtype=object), n_ctrl)
    source_names = np.asarray(adata.obs_names)[sources]
    obs = pd.DataFrame(
        {
            pert_key: pd.Categorical(shown, categories=requested),
            ct_key: pd.Categorical(cell_types[sources].astype(str)),
            OBS_SOURCE_CELL: source_names,
            OBS_UNSEEN_PERTURBATION: ~np.isin(labels.astype(str), model.training_perturbations_.astype(str)),
            OBS_UNSEEN_CELL_TYPE: ~np.isin(cell_types[sources].astype(str), model.training_cell_types_.astype(str)),
            OBS_RETRIEVAL_DISTANCE: distance,
            key_added + CONFIDENCE_SUFFIX: confidence,
        },
        index=pd.Index([f"{p}:{c}" for p, c in zip(shown, source_names, strict=True)]),
    )
    if setup.batch_key is not None and setup.batch_key in adata.obs.columns:
        obs[setup.batch_key] = pd.Categorical(adata.obs[setup.batch_key].astype(str).to_numpy()[sources])
    result = AnnData(X=out, obs=obs, var=pd.DataFrame(index=model.var_names.copy()))
    result.layers[key_added] = out.copy()
    result.uns[UNS_KEY] = {
        "mode": "generation",
        "retrieval": model.retrieval,
        "memory": model.memory_kind,
        "n_candidates": model.n_candidates,
        "cell_set_size": model.cell_set_size,
        "sample_retrieval": bool(sample_retrieval),
        "seed": -1 if seed is None else int(seed),
        "perturbation_key": pert_key,
        "cell_type_key": ct_key,
        "control_group": setup.control_group,
        "layer": key_added,
    }
    return result


@predicts
@torch.inference_mode()
def retrieval_table(model, perturbations, cell_type, adata, n_cells, seed) -> pd.DataFrame:
    """The table of :meth:`PTRAG.get_retrieval`."""
    adata = model._resolve_adata(adata)
    model._require_trained()
    adata = model.adata if adata is None else adata
    check_anndata(adata, allow_none=True)
    seed = check_seed("seed", seed, allow_none=False)
    if model.retrieval == "none":
        raise ValueError("This model was built with `retrieval='none'`: it retrieves nothing.")
    if adata is None:
        raise ValueError("Pass an AnnData with control cells: this model was loaded without one.")
    n_cells = positive_int("n_cells", n_cells)
    setup = model._setup
    queries = [perturbations] if isinstance(perturbations, str) else [str(p) for p in perturbations]
    if not queries:
        raise ValueError("`perturbations` is empty.")
    from ..data import normalise_labels

    canonical = normalise_labels(queries, control_group=setup.control_group, sep=setup.sep)
    if pd.Index(canonical).has_duplicates:
        raise ValueError(f"`perturbations` asks for the same perturbation twice: {pd.Index(canonical)[pd.Index(canonical).duplicated()].tolist()[:5]}.")
    if np.any(canonical == setup.control_group) or np.any(canonical == ""):
        raise ValueError(f"`perturbations` holds the control label {setup.control_group!r} (or an empty label); ask for genes.")
    model._encoder.check(canonical, context=" requested")
    data = model._data(adata, require_labels=False)
    wanted = list(model.training_cell_types_) if cell_type is None else ([cell_type] if isinstance(cell_type, str) else list(cell_type))
    wanted = [str(ct) for ct in wanted]
    available = sorted(set(map(str, data.cell_types[data.is_control])))
    absent = [ct for ct in wanted if ct not in available]
    if absent:
        raise ValueError(
            f"No control cells of cell type(s) {absent} in the AnnData (`cell_type`): stage 2 runs on control "
            f"cells of the queried cell type. Cell types with control cells: {available[:10]}."
        )
    memory = model.memory
    names = memory.perturbations.astype(str)
    entry_cts = memory.cell_types.astype(str)
    rng = np.random.default_rng(seed)
    builder = model._builder()
    keys, (context_names, means) = builder.control_contexts(data, data.is_control)
    module = model.module
    module.eval()
    device = next(module.parameters()).device
    frames = []
    for ct in wanted:
        pool = np.flatnonzero(data.is_control & (data.cell_types == ct))
        if pool.size == 0:
            raise ValueError(f"No control cells of cell type {ct!r} in the AnnData.")
        cells = np.sort(rng.choice(pool, size=min(n_cells, pool.size), replace=False))
        n = cells.size
        sources = np.tile(cells, len(queries))
        groups = builder.prediction_groups(
            labels=np.repeat(canonical, n),
            cell_types=np.full(sources.shape[0], ct, dtype=object),
            batches=np.full(sources.shape[0], -1),
            context_index=np.full(sources.shape[0], pd.Index(context_names).get_indexer([str(ct)])[0]),
            context_means=means,
        )
        for batch, _, set_group in prediction_batches(groups, data.expression, sources, set_size=n, batch_size=len(queries)):
            batch = {k: v.to(device) for k, v in batch.items()}
            inference = module.inference(**module._get_inference_input(batch), sample_retrieval=False)
            if OUTPUTS.KEEP in inference:
                keep_p = inference[OUTPUTS.KEEP_PROBABILITY].mean(1).cpu().numpy()
                selected = inference[OUTPUTS.KEEP].mean(1).cpu().numpy()
            else:
                keep_p = inference[OUTPUTS.ATTENTION].mean(1).cpu().numpy()
                selected = np.full_like(keep_p, np.nan)
            cand = groups.candidates[set_group]
            valid = cand >= 0
            k = cand.shape[1]
            confidence = groups.confidence[set_group] if groups.confidence is not None else np.full(len(set_group), np.nan)
            frame = pd.DataFrame(
                {
                    "query": np.repeat(np.asarray(queries, dtype=object)[_query_order(groups, set_group, canonical)], k),
                    "cell_type": ct,
                    "rank": np.tile(np.arange(1, k + 1), len(set_group)),
                    "candidate": np.where(valid, names[np.maximum(cand, 0)], None).ravel(),
                    "candidate_cell_type": np.where(valid, entry_cts[np.maximum(cand, 0)], None).ravel(),
                    "similarity": groups.similarity[set_group].ravel().astype(np.float64),
                    "keep_probability": keep_p.ravel(),
                    "selected_fraction": selected.ravel(),
                    "confidence": np.repeat(confidence.astype(np.float64), k),
                }
            )
            frames.append(frame[valid.ravel()])
    out = pd.concat(frames, ignore_index=True)
    order = pd.DataFrame({"c": pd.Categorical(out["cell_type"], categories=list(dict.fromkeys(map(str, wanted)))), "q": pd.Categorical(out["query"], categories=queries), "r": out["rank"]})
    out = out.iloc[order.sort_values(["c", "q", "r"], kind="stable").index].reset_index(drop=True)
    out["selected"] = out["selected_fraction"] > 0.5
    out = out[["query", "cell_type", "rank", "candidate", "candidate_cell_type", "similarity", "keep_probability", "selected_fraction", "selected", "confidence"]]
    if memory.kind != "response":
        out = out.drop(columns=["candidate_cell_type", "confidence"])
    return out


def _query_order(groups, set_group, canonical) -> np.ndarray:
    """Position in the requested list of each set's query."""
    return pd.Index(canonical).get_indexer(groups.perturbation[set_group])


@predicts
def screen_shifts(model, builder, data, labels, cell_type, cells, context_index, context_means, *, ceiling, fast, energy, batch_size, progress, chunk_size):
    """Predicted mean shift ``(P, G)``, energy ``(P,)``, retrieval distance ``(P,)`` and
    confidence ``(P,)`` of every label.

    The model side of :func:`ptrag_sc.tl.screen`: ``chunk_size`` perturbations at a time, each one
    set of the control ``cells`` of ``cell_type``; with ``fast`` the set mean comes from the evidence
    alone (no cells decoded).
    """
    from ..module import energy_distance

    n_labels, n_genes, n_cells = len(labels), model.module.n_genes, cells.size
    sums = np.zeros((n_labels, n_genes), dtype=np.float64)
    energies = np.zeros(n_labels, dtype=np.float64)
    distances = np.zeros(n_labels, dtype=np.float64)
    confidences = np.full(n_labels, np.nan, dtype=np.float64)
    weights = np.zeros(n_labels, dtype=np.float64)
    module = model.module
    module.eval()
    device = next(module.parameters()).device
    ceiling_t = torch.as_tensor(ceiling, dtype=torch.float32, device=device)
    bar = progress_bar(n_labels, f"Screening {cell_type}", "perturbation", progress)
    try:
        with torch.inference_mode(), flush_denormal(), settings_threads():
            for start in range(0, n_labels, chunk_size):
                chunk = labels[start : start + chunk_size]
                sources = np.tile(cells, len(chunk))
                groups = builder.prediction_groups(
                    labels=np.repeat(chunk, n_cells),
                    cell_types=np.full(sources.shape[0], cell_type, dtype=object),
                    batches=data.batches[sources],
                    context_index=np.tile(context_index, len(chunk)),
                    context_means=context_means,
                )
                row_of_group = start + pd.Index(chunk).get_indexer(groups.perturbation)
                if groups.confidence is not None:
                    confidences[row_of_group] = groups.confidence
                for batch, out_rows, set_group in prediction_batches(groups, data.expression, sources, set_size=model.cell_set_size, batch_size=batch_size):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    inference = module.inference(**module._get_inference_input(batch), sample_retrieval=False)
                    control_mean = batch[TENSORS.CONTROL_MEAN]
                    if fast:
                        mean = torch.minimum((control_mean + inference[OUTPUTS.DELTA]).clamp_min(0.0), ceiling_t)
                        shift = mean - control_mean
                    else:
                        generated = module.generative(**module._get_generative_input(batch, inference))
                        shift = generated[OUTPUTS.MEAN_SHIFT]
                        if energy:
                            e = energy_distance(generated[OUTPUTS.PREDICTION], batch[TENSORS.X_CTRL], include_target_term=True)
                            np.add.at(energies, row_of_group[set_group], e.cpu().numpy().astype(np.float64) * out_rows.shape[1])
                    size = float(out_rows.shape[1])
                    rows = row_of_group[set_group]
                    np.add.at(sums, rows, shift.cpu().numpy().astype(np.float64) * size)
                    np.add.at(weights, rows, size)
                    if OUTPUTS.SET_WEIGHTS in inference:
                        np.add.at(distances, rows, _retrieval_distance(inference[OUTPUTS.SET_WEIGHTS].cpu().numpy(), groups.similarity[set_group]) * size)
                    else:
                        distances[rows] = np.nan
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    weights = np.maximum(weights, 1e-12)
    energies = energies / weights if energy else np.full(n_labels, np.nan)
    return (sums / weights[:, None]).astype(np.float32), energies, distances / weights, confidences
