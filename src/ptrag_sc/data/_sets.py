"""Groups of cells, the sets cut from them (``S`` perturbed cells, each paired with a control
cell of its context), and the tensor batches the module consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .._constants import TENSORS

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._matrix import ExpressionMatrix


@dataclass
class SetGroups:
    """Groups of cells (a perturbation in a context) and what each set of a group needs.

    Attributes
    ----------
    cells, cell_start
        Concatenated cell indices of all groups: group ``g`` owns
        ``cells[cell_start[g]:cell_start[g + 1]]``.
    pool, pool_start, group_pool
        Concatenated control-cell indices of all control pools, likewise, and each group's pool.
    perturbation, cell_type
        Labels of each group.
    embedding
        ``(n_groups, D)`` gene embedding of each group's perturbation.
    candidates, candidate_same_cell_type, candidate_relation
        ``(n_groups, K)`` stage-1 candidates (``-1`` padding), their cell-type match and their
        relation to the query.
    similarity, annotation_similarity
        ``(n_groups, K)`` stage-1 similarity (NaN for padding) and annotation Jaccard
        similarity of each candidate.
    batch
        ``(n_groups,)`` batch code (``-1`` when unknown or not used).
    control_mean
        ``(n_groups, G)`` mean control profile of each group's pool.
    context, stacked, confidence, reliability
        The evidence of response memories
        (:meth:`~ptrag_sc.data.RetrievalMemory.evidence`).
    target_shift
        ``(n_groups, G)`` observed mean of each group's cells minus its control mean (training
        and validation groups).
    """

    cells: np.ndarray
    cell_start: np.ndarray
    pool: np.ndarray
    pool_start: np.ndarray
    group_pool: np.ndarray
    perturbation: np.ndarray
    cell_type: np.ndarray
    embedding: np.ndarray
    candidates: np.ndarray
    candidate_same_cell_type: np.ndarray
    candidate_relation: np.ndarray
    similarity: np.ndarray
    annotation_similarity: np.ndarray
    batch: np.ndarray
    control_mean: np.ndarray
    context: np.ndarray | None = None
    stacked: np.ndarray | None = None
    confidence: np.ndarray | None = None
    reliability: np.ndarray | None = None
    target_shift: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.cell_start.shape[0] - 1)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.cell_start)

    def sample_controls(self, groups: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """``(len(groups), n)`` control cells drawn uniformly with replacement from each pool."""
        pools = self.group_pool[groups]
        start = self.pool_start[pools]
        size = self.pool_start[pools + 1] - start
        offsets = np.floor(rng.random((groups.shape[0], n)) * size[:, None]).astype(np.int64)
        return self.pool[start[:, None] + offsets]


def index_groups(
    keys: list[np.ndarray], mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells of ``mask`` grouped by the joint value of ``keys`` (in ``np.unique`` order): their
    indices, the start of each group and each group's first cell."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return idx, np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    columns = [np.asarray(k)[idx] for k in keys]
    joint = _joint_code(columns)
    if joint is None:
        _, first, codes = np.unique(
            np.stack(columns, axis=1), axis=0, return_index=True, return_inverse=True
        )
    else:
        _, first, codes = np.unique(joint, return_index=True, return_inverse=True)
    order = np.argsort(codes.ravel(), kind="stable")
    counts = np.bincount(codes.ravel())
    start = np.concatenate([[0], np.cumsum(counts)])
    return idx[order], start, idx[first]


def _joint_code(columns: list[np.ndarray]) -> np.ndarray | None:
    """One int64 per row ordered as the integer ``columns`` are lexicographically (a
    mixed-radix number, several times faster to sort than ``np.unique(..., axis=0)``); ``None``
    when a column is not integer or the number would overflow."""
    code = np.zeros(columns[0].shape[0], dtype=np.int64)
    span = 1
    for column in columns:
        if column.dtype.kind not in "iu":
            return None
        low, high = int(column.min()), int(column.max())
        if high >= 2**63:
            return None
        size = high - low + 1
        span *= size
        if span >= 2**62:
            return None
        code = code * size + (column.astype(np.int64) - low)
    return code


def n_training_sets(sizes: np.ndarray, set_size: int) -> np.ndarray:
    """Sets per group in one training epoch: ``ceil(n_g / S)``, at least one."""
    return np.maximum(1, -(-np.asarray(sizes) // set_size))


def plan_sets(
    groups: SetGroups, set_size: int, rng: np.random.Generator, *, shuffle: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch of training sets: ``ceil(n_g / S)`` sets of ``S`` cells per group, drawn
    without replacement and completed with replacement. Returns the group ``(n_sets,)``, cells
    and controls ``(n_sets, S)`` of each set."""
    sizes = groups.sizes
    n_sets = n_training_sets(sizes, set_size)
    set_group = np.repeat(np.arange(len(groups)), n_sets)
    total = int(n_sets.sum())
    first_set = np.concatenate([[0], np.cumsum(n_sets)[:-1]])
    set_rank = np.arange(total) - first_set[set_group]
    slot = set_rank[:, None] * set_size + np.arange(set_size)[None, :]
    size = sizes[set_group][:, None]
    overflow = slot >= size
    random_slot = np.floor(rng.random(slot.shape) * size).astype(np.int64)
    slot = np.where(overflow, random_slot, slot)
    keys = (
        rng.random(groups.cells.shape[0])
        if shuffle
        else np.arange(groups.cells.shape[0], dtype=float)
    )
    group_of_cell = np.repeat(np.arange(len(groups)), sizes)
    order = np.lexsort((keys, group_of_cell))
    shuffled = groups.cells[order]
    cells = shuffled[groups.cell_start[set_group][:, None] + slot]
    controls = groups.sample_controls(set_group, set_size, rng)
    if shuffle:
        perm = rng.permutation(total)
        set_group, cells, controls = set_group[perm], cells[perm], controls[perm]
    return set_group, cells, controls


def prediction_sets(groups: SetGroups, set_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every group cut into near-equal consecutive sets of at most ``set_size`` cells: the group
    of each set and the ``[lo, hi)`` positions of its cells in ``groups.cells``."""
    sizes = groups.sizes
    n_sets = -(-sizes // set_size)
    set_group = np.repeat(np.arange(len(groups)), n_sets)
    set_rank = np.arange(set_group.shape[0]) - np.repeat(np.cumsum(n_sets) - n_sets, n_sets)
    lo = groups.cell_start[set_group] + (set_rank * sizes[set_group]) // n_sets[set_group]
    hi = groups.cell_start[set_group] + ((set_rank + 1) * sizes[set_group]) // n_sets[set_group]
    return set_group, lo, hi


def make_batch(
    expression: ExpressionMatrix,
    groups: SetGroups,
    group: np.ndarray,
    controls: np.ndarray,
    cells: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Tensor dict for sets of ``group`` with the given control (and observed) cells."""
    batch = {
        TENSORS.X_CTRL: expression.rows(controls),
        TENSORS.PERT_EMBEDDING: torch.from_numpy(groups.embedding[group]),
        TENSORS.CANDIDATES: torch.from_numpy(groups.candidates[group]),
        TENSORS.CANDIDATE_SAME_CELL_TYPE: torch.from_numpy(groups.candidate_same_cell_type[group]),
        TENSORS.CANDIDATE_RELATION: torch.from_numpy(groups.candidate_relation[group]),
        TENSORS.BATCH: torch.from_numpy(groups.batch[group]),
        TENSORS.CONTROL_MEAN: torch.from_numpy(groups.control_mean[group]),
        TENSORS.CANDIDATE_SIMILARITY: torch.from_numpy(
            np.nan_to_num(groups.similarity[group], nan=0.0)
        ),
        TENSORS.CANDIDATE_ANNOTATION_SIMILARITY: torch.from_numpy(
            groups.annotation_similarity[group]
        ),
    }
    for key, table in (
        (TENSORS.CONTEXT_RESPONSE, groups.context),
        (TENSORS.STACKED_SHIFT, groups.stacked),
    ):
        if table is not None:
            batch[key] = torch.from_numpy(table[group])
    if cells is not None:
        batch[TENSORS.X_PERT] = expression.rows(cells)
        if groups.target_shift is not None:
            batch[TENSORS.TARGET_SHIFT] = torch.from_numpy(groups.target_shift[group])
    return batch


class SetBatchDataset(Dataset):
    """Turns a batch plan ``(groups, cells, controls[, weight])`` into the module's tensor dict
    (a ``weight`` becomes ``TENSORS.METRIC_WEIGHT``, each set's weight in the logged metrics)."""

    def __init__(self, expression: ExpressionMatrix, groups: SetGroups) -> None:
        self.expression = expression
        self.groups = groups

    def __len__(self) -> int:  # pragma: no cover - batches come from the sampler
        return len(self.groups)

    def __getitem__(self, plan: tuple) -> dict[str, torch.Tensor]:
        group, cells, controls = plan[:3]
        batch = make_batch(self.expression, self.groups, group, controls, cells)
        if len(plan) > 3:
            batch[TENSORS.METRIC_WEIGHT] = torch.full((group.shape[0],), float(plan[3]))
        return batch


class SetBatchSampler(Sampler):
    """Yields plans of ``batch_size`` sets; a new random epoch on every iteration (training,
    ``shuffle=True``) or one fixed plan (validation).

    Every data-parallel rank draws the same plan (same ``seed``) and takes every
    ``num_replicas``-th batch. In training ``steps_per_epoch`` (default: one pass over the
    groups) gives every rank exactly that many batches, chaining passes, so ``max_steps`` is
    exact. In validation each set is served once; a rank left without a batch gets a copy of the
    first with weight 0, so every rank takes part and the reduced metrics are a single process's.
    """

    def __init__(
        self,
        groups: SetGroups,
        *,
        set_size: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        steps_per_epoch: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be in [0, num_replicas={num_replicas}), got {rank}.")
        self.groups, self.set_size, self.batch_size = groups, set_size, batch_size
        self.seed, self.shuffle, self.steps_per_epoch = seed, shuffle, steps_per_epoch
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._fixed = (
            None if shuffle else self._validation_share(self._batches(np.random.default_rng(seed)))
        )

    def _batches(self, rng: np.random.Generator) -> list:
        plan = plan_sets(self.groups, self.set_size, rng, shuffle=self.shuffle)
        step = self.batch_size
        return [tuple(part[i : i + step] for part in plan) for i in range(0, len(plan[0]), step)]

    def _validation_share(self, batches: list) -> list:
        share = batches[self.rank :: self.num_replicas]
        if not share and batches:
            share = [(*batches[0], 0.0)]
        return share

    def _training_share(self, batches: list) -> list:
        usable = len(batches) - len(batches) % self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    def __iter__(self) -> Iterator:
        if self._fixed is not None:
            yield from self._fixed
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        batches = self._batches(rng)
        if self.steps_per_epoch is not None:
            needed = self.steps_per_epoch * self.num_replicas
            while len(batches) < needed:
                batches += self._batches(rng)
            batches = batches[:needed]
        yield from self._training_share(batches)

    def __len__(self) -> int:
        if self._fixed is not None:
            return len(self._fixed)
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        n_batches = -(
            -int(n_training_sets(self.groups.sizes, self.set_size).sum()) // self.batch_size
        )
        return n_batches // self.num_replicas
