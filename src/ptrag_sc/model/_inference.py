"""The one inference loop of predictions, retrieval tables and screens.

Every prediction, retrieval table and screen (:func:`ptrag_sc.tl.screen`) runs the network the
same way: :func:`evaluating` holds it in evaluation mode on its device, :func:`run` passes the
sets of a :class:`~ptrag_sc.data.SetGroups` through its inference, and each :class:`Step`
carries the retrieval distance and confidence of its sets; :func:`generate` decodes cells from
them, and :func:`record` is what a prediction notes in ``uns``.
"""

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


# ------------------------------------------------------------------- inference
@contextlib.contextmanager
def evaluating(
    module: PTRAGModule, *, sample_retrieval: bool = False, seed: int | None = None
) -> Iterator[torch.device]:
    """The network in evaluation mode for one prediction, yielding its device.

    A shared hold on the network (refused while it trains), no gradients, the package's thread
    setting, and, with ``sample_retrieval``, random numbers from a generator of this call's own
    (torch's global one is left alone, and predictions in other threads do not draw from it).
    """
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
    """One batch of sets through the network's inference.

    Attributes
    ----------
    batch, inference
        The batch's tensors and the inference outputs.
    rows, sets
        ``(B, S)`` output rows of each set and ``(B,)`` the group of each set.
    distance, confidence
        ``(B,)`` retrieval distance (``1 -`` the similarity of the candidates stage 2 kept,
        weighted by their selection; NaN where nothing was kept or retrieved) and confidence
        (NaN without a response memory) of each set.
    """

    batch: dict[str, torch.Tensor]
    inference: dict[str, torch.Tensor]
    rows: np.ndarray
    sets: np.ndarray
    distance: np.ndarray
    confidence: np.ndarray

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
    """Pass every group through the network's inference, cut into sets of at most
    ``set_size`` (see :func:`~ptrag_sc.data.prediction_batches`), inside :func:`evaluating`.

    ``sources[row]`` is the control cell each output row is generated from; ``encoded``, from
    :func:`encoded_sources`, their basal encodings.
    """
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
            weights = inference[OUTPUTS.SET_WEIGHTS].cpu().numpy()
            distance = _retrieval_distance(weights, groups.similarity[sets])
        confidence = np.full(len(sets), np.nan)
        if groups.confidence is not None:
            confidence = groups.confidence[sets]
        yield Step(batch, inference, rows, sets, distance, confidence)


def _retrieval_distance(weights: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """One minus the similarity of the retrieved candidates, weighted by their selection, per
    set; NaN where nothing was retrieved (no distance to speak of, rather than a reassuring 0)."""
    total = weights.sum(-1)
    sims = np.nan_to_num(similarity, nan=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (weights * (1.0 - sims)).sum(-1) / total, np.nan)


def encoded_sources(
    module: PTRAGModule,
    expression: ExpressionMatrix,
    sources: np.ndarray,
    rows: np.ndarray,
    device: torch.device,
) -> tuple[np.ndarray, torch.Tensor] | None:
    """``(position of each row's source, encoded distinct sources)``, or ``None`` when sources
    rarely repeat.

    A control cell is the source of many predicted cells (every perturbation of a generation
    run, and about one in (perturbed / control cells) of a counterfactual one); its basal
    encoding, the widest matrix product of a prediction, does not depend on the set it joins.
    Encoding each distinct source once saves that product for every repeat.
    """
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
    """Generate one cell per row from control cell ``sources[row]`` under ``labels[row]``.

    Rows are grouped by (cell type, perturbation[, batch], control context) and cut into sets
    of at most ``cell_set_size``; ``write(rows, predictions)`` receives each batch's output
    (model gene order). Returns the retrieval distance and the confidence of every row.
    """
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
        steps = run(
            module,
            device,
            groups,
            data.expression,
            sources,
            set_size=size,
            batch_size=batch_size,
            encoded=encoded,
            sample_retrieval=sample_retrieval,
        )
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
    """Position in ``names`` of each context key (object arrays of str, as the builder makes
    them)."""
    return pd.Index(names).get_indexer(keys)


def record(
    state: ModelState, mode: str, sample_retrieval: bool, seed: int | None, **columns: str
) -> dict:
    """What a prediction records in ``uns["ptrag"]`` (``columns``: ``cell_type_key``,
    ``layer``)."""
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
