"""The one inference loop of predictions, retrieval tables and screens (:func:`run`), and the
cells generated from it (:func:`generate`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .._checks import positive_int
from .._constants import OUTPUTS
from .._utils import flush_denormal, progress_bar, settings_threads
from ..data import count_prediction_batches, prediction_batches
from ._guard import local_random, predicting

if TYPE_CHECKING:
    from ..data import ExpressionMatrix, ModelState, PerturbationData, SetGroups
    from ..module import PTRAGModule

#: Sets per forward pass at prediction.
DEFAULT_PREDICT_BATCH_SIZE = 64
#: Largest table of encoded control cells kept during one prediction.
_MAX_ENCODED_BYTES = 256 * 2**20


def check_batch_size(batch_size: int | None) -> int:
    if batch_size is None:
        return DEFAULT_PREDICT_BATCH_SIZE
    return positive_int("batch_size", batch_size)


@contextlib.contextmanager
def evaluating(
    module: PTRAGModule, *, sample_retrieval: bool = False, seed: int | None = None
) -> Iterator[torch.device]:
    """The network in evaluation mode for one prediction, yielding its device: a shared hold
    on it, no gradients, the package's threads, and with ``sample_retrieval`` a generator of
    this call's own (torch's global one is left alone)."""
    device = next(module.parameters()).device
    sampling = contextlib.nullcontext()
    if sample_retrieval:
        sampling = local_random(0 if seed is None else seed, device)
    with predicting(module), sampling, flush_denormal(), settings_threads():
        with torch.inference_mode():
            module.eval()
            yield device


@dataclass
class Step:
    """One batch of ``B`` sets through the network's inference."""

    batch: dict[str, torch.Tensor]
    inference: dict[str, torch.Tensor]
    rows: np.ndarray  # (B, S) output rows of each set
    sets: np.ndarray  # (B,) group of each set
    distance: np.ndarray  # (B,) retrieval distance, NaN where nothing was kept or retrieved
    confidence: np.ndarray  # (B,) NaN without a response memory

    def decode(self, module: PTRAGModule) -> dict[str, torch.Tensor]:
        """The generative pass of this step's sets: cells decoded from the inference."""
        return module.generative(**module._get_generative_input(self.batch, self.inference))


def run(
    module: PTRAGModule,
    device: torch.device,
    groups: SetGroups,
    expression: ExpressionMatrix,
    sources: np.ndarray,
    set_size: int,
    batch_size: int,
    *,
    encoded: tuple[np.ndarray, torch.Tensor] | None = None,
    sample_retrieval: bool = False,
) -> Iterator[Step]:
    """Pass every group through the network's inference in sets of at most ``set_size``, inside
    :func:`evaluating` (``sources[row]``: the control cell of each output row; ``encoded``: from
    :func:`encoded_sources`)."""
    for batch, rows, sets in prediction_batches(
        groups, expression, sources, set_size=set_size, batch_size=batch_size
    ):
        batch = {k: v.to(device) for k, v in batch.items()}
        h_ctrl = None
        if encoded is not None:
            h_ctrl = encoded[1][torch.from_numpy(encoded[0][rows]).to(device)]
        inputs = module._get_inference_input(batch)
        inference = module.inference(**inputs, h_ctrl=h_ctrl, sample_retrieval=sample_retrieval)
        distance = np.full(len(sets), np.nan)
        if OUTPUTS.SET_WEIGHTS in inference:
            # 1 - the similarity of the candidates kept, weighted by their selection; NaN (not a
            # reassuring 0) where nothing was kept.
            weights = inference[OUTPUTS.SET_WEIGHTS].cpu().numpy()
            total = weights.sum(-1)
            sims = np.nan_to_num(groups.similarity[sets], nan=0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                distance = np.where(total > 0, (weights * (1.0 - sims)).sum(-1) / total, np.nan)
        confidence = np.full(len(sets), np.nan)
        if groups.confidence is not None:
            confidence = groups.confidence[sets]
        yield Step(batch, inference, rows, sets, distance, confidence)


def encoded_sources(
    module: PTRAGModule,
    expression: ExpressionMatrix,
    sources: np.ndarray,
    rows: np.ndarray,
    device: torch.device,
) -> tuple[np.ndarray, torch.Tensor] | None:
    """``(position of each row's source, encoded distinct sources)``, or ``None`` when sources
    rarely repeat: a control cell's basal encoding, the widest matrix product of a prediction,
    does not depend on the set it joins, so each distinct source is encoded once."""
    needed = sources[rows]
    distinct = np.unique(needed)
    too_large = distinct.size * module.n_hidden * 4 > _MAX_ENCODED_BYTES
    if 2 * distinct.size > needed.size or too_large:
        return None
    position = np.full(sources.shape[0], -1, dtype=np.int64)
    position[rows] = np.searchsorted(distinct, needed)
    table = torch.empty(distinct.size, module.n_hidden, device=device)
    chunk = 4096
    for start in range(0, distinct.size, chunk):
        cells = expression.rows(distinct[start : start + chunk]).to(device)
        table[start : start + cells.shape[0]] = module.basal_encoder(cells)
    return position, table


def generate(
    state: ModelState,
    module: PTRAGModule,
    data: PerturbationData,
    sources: np.ndarray,
    labels: np.ndarray,
    cell_types: np.ndarray,
    batches: np.ndarray,
    context_index: np.ndarray,
    context_means: np.ndarray,
    *,
    batch_size: int,
    sample_retrieval: bool,
    seed: int | None,
    progress: bool,
    write: Callable[[np.ndarray, np.ndarray], None],
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one cell per row from control cell ``sources[row]`` under ``labels[row]``;
    ``write(rows, predictions)`` receives each batch. Returns each row's retrieval distance and
    confidence."""
    distance = np.full(labels.shape[0], np.nan, dtype=np.float32)
    confidence = np.full(labels.shape[0], np.nan, dtype=np.float32)
    size = state.cell_set_size
    with evaluating(module, sample_retrieval=sample_retrieval, seed=seed) as device:
        groups = state.builder.prediction_groups(
            labels=labels,
            cell_types=cell_types,
            batches=batches,
            context_index=context_index,
            context_means=context_means,
        )
        total = count_prediction_batches(groups, size, batch_size)
        encoded = encoded_sources(module, data.expression, sources, groups.cells, device)
        options = {"encoded": encoded, "sample_retrieval": sample_retrieval}
        steps = run(module, device, groups, data.expression, sources, size, batch_size, **options)
        with progress_bar(total, "Predicting", "batch", progress) as advance:
            for step in steps:
                generated = step.decode(module)
                predictions = generated[OUTPUTS.PREDICTION].reshape(-1, module.n_genes)
                write(step.rows.ravel(), predictions.cpu().numpy())
                distance[step.rows] = step.distance[:, None]
                confidence[step.rows] = step.confidence[:, None]
                advance(1)
    return distance, confidence


def context_index(names: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Position in ``names`` of each context key."""
    return pd.Index(names).get_indexer(keys)


def record(
    state: ModelState, mode: str, sample_retrieval: bool, seed: int | None, **columns: str
) -> dict:
    """What a prediction records in ``uns["ptrag"]``."""
    return {
        "mode": mode,
        "retrieval": state.retrieval,
        "memory": state.memory_kind,
        "n_candidates": state.n_candidates,
        "cell_set_size": state.cell_set_size,
        "sample_retrieval": bool(sample_retrieval),
        "seed": -1 if seed is None else int(seed),
        "perturbation_key": state.setup.perturbation_key,
        "cell_type_key": columns["cell_type_key"],
        "control_group": state.setup.control_group,
        "layer": columns["layer"],
    }
