"""From cells to the sets the module consumes (training, validation and prediction): groups,
control pools, candidates and evidence."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ._annotations import jaccard
from ._sets import SetGroups, index_groups, make_batch, prediction_sets

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._annotations import GeneAnnotations
    from ._cells import PerturbationData
    from ._index import NeighbourIndex
    from ._matrix import ExpressionMatrix
    from ._memory import RetrievalMemory
    from ._perturbations import PerturbationEncoder


@dataclass(eq=False)
class SetBuilder:
    """Builds :class:`~ptrag_sc.data.SetGroups` for a model.

    Parameters
    ----------
    encoder
        Gene embeddings of perturbation labels.
    memory, index
        The retrieval memory and its stage-1 index (``None`` without retrieval).
    n_candidates
        ``K``; groups get ``-1`` candidates without retrieval.
    match_batch
        Pair cells with control cells of their own batch (falling back to the cell type when
        a batch has none).
    annotations
        Gene annotations of the evidence's annotation sources (``None``: not used).
    """

    encoder: PerturbationEncoder
    memory: RetrievalMemory | None
    index: NeighbourIndex | None
    n_candidates: int = field(kw_only=True)
    match_batch: bool = field(kw_only=True)
    annotations: GeneAnnotations | None = field(default=None, kw_only=True)

    def control_contexts(
        self, data: PerturbationData, control_mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(context of each cell, (contexts, (n_contexts, G) float32 control means))``; a
        context is the cell type, or (cell type, batch) when matching on batch and that batch
        has control cells in ``control_mask``."""
        # Object arrays of str throughout: each conversion to and from numpy's fixed-width
        # strings costs ~10 ms per 100k cells.
        keys = data.contexts(match_batch=False)
        if self.match_batch and data.setup.batch_key is not None:
            with_batch = data.contexts(match_batch=True)
            keys = np.where(
                np.isin(with_batch, np.unique(with_batch[control_mask])), with_batch, keys
            )
        codes, uniques = pd.factorize(np.where(control_mask, keys, None), sort=True)
        means = data.means(codes, len(uniques)).astype(np.float32)
        return keys, (np.asarray(uniques, dtype=object), means)

    def _group_level(
        self,
        labels: np.ndarray,
        cell_types: np.ndarray,
        batches: np.ndarray,
        control_mean: np.ndarray,
    ) -> dict:
        """Embedding, candidates and evidence of each group."""
        n = labels.shape[0]
        embedding = (
            self.encoder.embed(labels) if n else np.zeros((0, self.encoder.n_dims), np.float32)
        )
        if self.index is not None and n:
            cand, sim, same, relation = self.index.query(labels, embedding, cell_types)
        else:
            cand = np.full((n, self.n_candidates), -1, dtype=np.int64)
            sim = np.full(cand.shape, np.nan, dtype=np.float32)
            same = np.zeros(cand.shape, dtype=bool)
            relation = np.zeros(cand.shape, dtype=np.int64)
        out = {
            "embedding": embedding,
            "batch": batches.astype(np.int64),
            "control_mean": control_mean,
            "candidates": cand,
            "similarity": sim,
            "annotation_similarity": np.zeros(cand.shape, dtype=np.float32),
            "candidate_same_cell_type": same,
            "candidate_relation": relation,
        }
        memory, annotations = self.memory, None
        if memory is None or memory.kind != "response" or not n:
            return out
        terms = memory.annotation_terms
        if self.annotations is not None and terms is not None and len(terms):
            annotations, _ = self.annotations.matrix(
                labels, sep=self.encoder.sep, vocabulary=terms
            )
            entries = memory.annotation_matrix()
            for start in range(0, n, 1024):
                rows = slice(start, start + 1024)
                block = jaccard(annotations[rows], entries)
                out["annotation_similarity"][rows] = np.where(
                    cand[rows] >= 0, np.take_along_axis(block, np.maximum(cand[rows], 0), 1), 0.0
                )
        evidence = memory.evidence(
            labels, cell_types, embedding, annotations, control_mean, sep=self.encoder.sep
        )
        out.update(
            {key: evidence[key] for key in ("context", "stacked", "confidence", "reliability")}
        )
        return out

    def training_groups(
        self,
        data: PerturbationData,
        member: np.ndarray,
        control_mask: np.ndarray,
        *,
        contexts: tuple[np.ndarray, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> SetGroups:
        """Groups of the ``member`` cells by (cell type, perturbation[, batch]), with pools of
        the ``control_mask`` cells of their context and their target shift."""
        keys, (context_names, context_means) = contexts or self.control_contexts(
            data, control_mask
        )
        use_batch = self.match_batch and data.setup.batch_key is not None
        ct_codes = pd.factorize(data.cell_types, sort=True)[0]
        pert_codes = pd.factorize(data.labels, sort=True)[0]
        batch_key = data.batches if use_batch else np.zeros(data.n_obs, dtype=np.int64)
        cells, start, first = index_groups([ct_codes, pert_codes, batch_key], member)
        context_code = pd.Index(context_names).get_indexer(keys)
        pool_cells, pool_start, pool_first = index_groups([context_code], control_mask)
        pool_of_context = np.full(len(context_names), -1, dtype=np.int64)
        pool_of_context[context_code[pool_first]] = np.arange(len(pool_first))
        group_context = context_code[first]
        group_pool = pool_of_context[group_context]
        if np.any(group_pool < 0):
            missing = sorted(set(data.cell_types[first[group_pool < 0]].astype(str)))
            raise ValueError(
                f"No control cells for cell type(s) {missing[:10]}: every cell type with "
                "perturbed cells needs control cells."
            )
        if use_batch:
            fallback = int(np.sum(keys[first].astype(str) == data.cell_types[first].astype(str)))
            if fallback:
                warnings.warn(
                    f"{fallback} group(s) have no control cells in their own batch; their "
                    "controls come from the whole cell type.",
                    UserWarning,
                    stacklevel=3,
                )
        labels = data.labels[first].astype(str)
        cell_types = data.cell_types[first].astype(str)
        control_mean = context_means[group_context]
        group_code = np.full(data.n_obs, -1, dtype=np.int64)
        group_code[cells] = np.repeat(np.arange(len(first)), np.diff(start))
        target = (
            (data.means(group_code, len(first)) - control_mean).astype(np.float32)
            if len(first)
            else None
        )
        return SetGroups(
            cells=cells,
            cell_start=start,
            pool=pool_cells,
            pool_start=pool_start,
            group_pool=group_pool,
            perturbation=labels,
            cell_type=cell_types,
            target_shift=target,
            **self._group_level(
                labels,
                cell_types,
                batch_key[first] if use_batch else np.full(len(first), -1),
                control_mean,
            ),
        )

    def prediction_groups(
        self,
        *,
        labels: np.ndarray,
        cell_types: np.ndarray,
        batches: np.ndarray,
        context_index: np.ndarray,
        context_means: np.ndarray,
    ) -> SetGroups:
        """Groups of output rows by (cell type, perturbation[, batch], context) for prediction;
        ``context_index``: each row's control mean in ``context_means``."""
        use_batch = self.match_batch
        ct_codes = pd.factorize(cell_types, sort=True)[0]
        pert_codes = pd.factorize(labels, sort=True)[0]
        batch_key = batches if use_batch else np.zeros_like(batches)
        rows = np.ones(labels.shape[0], dtype=bool)
        cells, start, first = index_groups([ct_codes, pert_codes, batch_key, context_index], rows)
        group_labels = np.asarray(labels)[first].astype(str)
        group_cts = np.asarray(cell_types)[first].astype(str)
        empty = np.zeros(0, dtype=np.int64)
        return SetGroups(
            cells=cells,
            cell_start=start,
            pool=empty,
            pool_start=np.zeros(1, dtype=np.int64),
            group_pool=np.zeros(len(first), dtype=np.int64),
            perturbation=group_labels,
            cell_type=group_cts,
            **self._group_level(
                group_labels,
                group_cts,
                np.asarray(batches)[first] if use_batch else np.full(len(first), -1),
                context_means[context_index[first]],
            ),
        )


def prediction_batches(
    groups: SetGroups,
    expression: ExpressionMatrix,
    sources: np.ndarray,
    *,
    set_size: int,
    batch_size: int,
) -> Iterator[tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray]]:
    """Batches of prediction sets: every group cut into near-equal sets of at most ``set_size``.

    Sets of equal size are batched together. Yields ``(batch, output rows [B, S], group of each
    set [B])``; ``sources[row]`` is the control cell each output row is generated from.
    """
    set_group, lo, hi = prediction_sets(groups, set_size)
    set_len = hi - lo
    for size in np.unique(set_len):
        set_ids = np.flatnonzero(set_len == size)
        for b in range(0, len(set_ids), batch_size):
            chosen = set_ids[b : b + batch_size]
            out_rows = groups.cells[lo[chosen][:, None] + np.arange(size)[None, :]]
            batch = make_batch(expression, groups, set_group[chosen], sources[out_rows])
            yield batch, out_rows, set_group[chosen]


def count_prediction_batches(groups: SetGroups, set_size: int, batch_size: int) -> int:
    """Number of batches :func:`prediction_batches` yields."""
    _, lo, hi = prediction_sets(groups, set_size)
    _, counts = np.unique(hi - lo, return_counts=True)
    return int(np.sum(-(-counts // batch_size)))
