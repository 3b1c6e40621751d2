"""Sets of cells for training and prediction, and the Lightning data module that serves them.

A *group* is the perturbed cells sharing (cell type, perturbation[, batch]); a *set* is ``S`` of
them, each paired with a control cell of the same cell type (and batch, when matching on
batch). Sampling plans are drawn as index arrays and gathered in one step per batch: nothing
loops over cells in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..module._module import TENSORS

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Dense float32 copies of the expression matrix up to this size; larger matrices stay sparse
#: and rows are densified per batch.
DENSE_LIMIT_BYTES = 4 * 1024**3


class ExpressionMatrix:
    """Row access to the registered expression as float32 tensors.

    A dense float32 copy is made once when the matrix is dense and fits in
    ``DENSE_LIMIT_BYTES`` (or already is float32 dense, in which case it is shared, not
    copied); otherwise rows are gathered from CSR and densified per batch.
    """

    def __init__(self, X) -> None:
        self.shape = X.shape
        if sp.issparse(X):
            nbytes = X.shape[0] * X.shape[1] * 4
            if nbytes <= DENSE_LIMIT_BYTES // 4:
                self._dense = torch.from_numpy(X.toarray().astype(np.float32, copy=False))
                self._csr = None
            else:
                self._dense = None
                self._csr = X.tocsr().astype(np.float32, copy=False)
        else:
            array = np.asarray(X)
            self._dense = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            self._csr = None

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """Rows ``index`` (any shape) as a float32 tensor of shape ``index.shape + (G,)``."""
        flat = np.array(index, dtype=np.int64).ravel()  # a writable copy: torch needs one
        if self._dense is not None:
            out = self._dense.index_select(0, torch.from_numpy(flat))
        else:
            out = torch.from_numpy(self._csr[flat].toarray())
        return out.view(*np.shape(index), self.shape[1])


@dataclass
class SetGroups:
    """Groups of perturbed cells and what each set of a group needs.

    Attributes
    ----------
    cells
        Concatenated perturbed-cell indices of all groups; group ``g`` owns
        ``cells[cell_start[g]:cell_start[g + 1]]``.
    pool
        Concatenated control-cell indices of all control pools; pool ``p`` owns
        ``pool[pool_start[p]:pool_start[p + 1]]``.
    group_pool
        Control pool of each group.
    perturbation, cell_type
        Labels of each group.
    embedding
        ``(n_groups, D)`` gene embedding of each group's perturbation.
    candidates, candidate_same_cell_type, candidate_relation
        ``(n_groups, K)`` stage-1 candidates (``-1`` padding), their cell-type match and their
        relation to the query.
    batch
        ``(n_groups,)`` batch code (``-1`` when unknown or not used).
    context_response, context_valid
        ``(n_groups, G)`` mean response of the other training perturbations of the group's cell
        type and whether it exists (response memories only).
    control_mean_table, control_mean_index
        ``(n_cell_types, G)`` mean control profiles and each group's row (response memories).
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
    batch: np.ndarray
    context_response: np.ndarray | None = None
    context_valid: np.ndarray | None = None
    control_mean_table: np.ndarray | None = None
    control_mean_index: np.ndarray | None = None

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


def index_groups(keys: list[np.ndarray], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group the cells of ``mask`` by the joint value of ``keys``.

    Returns the sorted cell indices, the start offset of each group and the group code of each
    group's first cell (in ``np.unique`` order of the keys).
    """
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return idx, np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    stacked = np.stack([np.asarray(k)[idx] for k in keys], axis=1)
    _, first, codes = np.unique(stacked, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(codes.ravel(), kind="stable")
    counts = np.bincount(codes.ravel())
    start = np.concatenate([[0], np.cumsum(counts)])
    return idx[order], start, idx[first]


def plan_sets(
    groups: SetGroups, set_size: int, rng: np.random.Generator, *, shuffle: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch of sets: every group yields ``ceil(n_g / S)`` sets of exactly ``S`` cells.

    Cells are taken without replacement in a random order; the last set of a group (and every
    set of a group smaller than ``S``) is completed by drawing from the group with replacement.

    Returns group ``(n_sets,)``, perturbed cells ``(n_sets, S)``, controls ``(n_sets, S)``.
    """
    sizes = groups.sizes
    n_sets = np.maximum(1, -(-sizes // set_size))
    set_group = np.repeat(np.arange(len(groups)), n_sets)
    total = int(n_sets.sum())
    # Position of each slot within its group's shuffled order; slots past the end resample.
    first_set = np.concatenate([[0], np.cumsum(n_sets)[:-1]])
    set_rank = np.arange(total) - first_set[set_group]
    slot = set_rank[:, None] * set_size + np.arange(set_size)[None, :]
    size = sizes[set_group][:, None]
    overflow = slot >= size
    random_slot = np.floor(rng.random(slot.shape) * size).astype(np.int64)
    slot = np.where(overflow, random_slot, slot)
    # Shuffle within groups: a random key per cell, sorted within each group.
    keys = rng.random(groups.cells.shape[0]) if shuffle else np.arange(groups.cells.shape[0], dtype=float)
    group_of_cell = np.repeat(np.arange(len(groups)), sizes)
    order = np.lexsort((keys, group_of_cell))
    shuffled = groups.cells[order]
    cells = shuffled[groups.cell_start[set_group][:, None] + slot]
    controls = groups.sample_controls(set_group, set_size, rng)
    if shuffle:
        perm = rng.permutation(total)
        set_group, cells, controls = set_group[perm], cells[perm], controls[perm]
    return set_group, cells, controls


class SetBatchDataset(Dataset):
    """Turns a batch plan ``(groups, cells, controls)`` into the module's tensor dict."""

    def __init__(self, expression: ExpressionMatrix, groups: SetGroups) -> None:
        self.expression = expression
        self.groups = groups

    def __len__(self) -> int:  # pragma: no cover - batches come from the sampler
        return len(self.groups)

    def __getitem__(self, plan: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, torch.Tensor]:
        group, cells, controls = plan
        return make_batch(self.expression, self.groups, group, controls, cells)


def make_batch(
    expression: ExpressionMatrix,
    groups: SetGroups,
    group: np.ndarray,
    controls: np.ndarray,
    cells: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Tensor dict for sets of ``group`` with the given control (and target) cells."""
    batch = {
        TENSORS.X_CTRL: expression.rows(controls),
        TENSORS.PERT_EMBEDDING: torch.from_numpy(groups.embedding[group]),
        TENSORS.CANDIDATES: torch.from_numpy(groups.candidates[group]),
        TENSORS.CANDIDATE_SAME_CELL_TYPE: torch.from_numpy(groups.candidate_same_cell_type[group]),
        TENSORS.CANDIDATE_RELATION: torch.from_numpy(groups.candidate_relation[group]),
        TENSORS.BATCH: torch.from_numpy(groups.batch[group]),
    }
    if groups.control_mean_table is not None:
        batch[TENSORS.CONTROL_MEAN] = torch.from_numpy(groups.control_mean_table[groups.control_mean_index[group]])
    if groups.context_response is not None:
        batch[TENSORS.CONTEXT_RESPONSE] = torch.from_numpy(groups.context_response[group])
        batch[TENSORS.CONTEXT_VALID] = torch.from_numpy(groups.context_valid[group])
    if cells is not None:
        batch[TENSORS.X_PERT] = expression.rows(cells)
    return batch


class SetBatchSampler(Sampler):
    """Yields batch plans of ``batch_size`` sets; a new random epoch on every iteration.

    Under data-parallel training each rank takes every ``num_replicas``-th batch of the same
    epoch plan (all ranks draw it from the same seed), truncated to a multiple of
    ``num_replicas`` so that ranks step together.
    """

    def __init__(
        self,
        groups: SetGroups,
        *,
        set_size: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.groups, self.set_size, self.batch_size = groups, set_size, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._fixed = None if shuffle else self._plan(np.random.default_rng(seed))

    def _plan(self, rng: np.random.Generator):
        group, cells, controls = plan_sets(self.groups, self.set_size, rng, shuffle=self.shuffle)
        bounds = list(range(0, group.shape[0], self.batch_size))
        batches = [(group[i : i + self.batch_size], cells[i : i + self.batch_size], controls[i : i + self.batch_size]) for i in bounds]
        usable = len(batches) - len(batches) % self.num_replicas if self.num_replicas > 1 else len(batches)
        return batches[self.rank : usable : self.num_replicas]

    def __iter__(self) -> Iterator:
        if self._fixed is not None:
            yield from self._fixed
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        yield from self._plan(rng)

    def __len__(self) -> int:
        n_sets = int(np.maximum(1, -(-self.groups.sizes // self.set_size)).sum())
        n_batches = -(-n_sets // self.batch_size)
        if self.num_replicas > 1:
            n_batches = n_batches // self.num_replicas
        return n_batches


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class SetDataModule(pl.LightningDataModule):
    """Lightning data module serving training and validation sets.

    Parameters
    ----------
    expression
        Row access to the expression matrix.
    train_groups, val_groups
        Groups of the training and validation cells (``val_groups`` may be empty).
    train_idx, val_idx, test_idx
        Cell indices of each split (recorded on the model after training).
    set_size
        Cells per set.
    batch_size
        Sets per step.
    seed
        Seed of the sampling plans.
    """

    def __init__(
        self,
        expression: ExpressionMatrix,
        train_groups: SetGroups,
        val_groups: SetGroups | None,
        *,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        test_idx: np.ndarray,
        set_size: int,
        batch_size: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.expression = expression
        self.train_groups, self.val_groups = train_groups, val_groups
        self.train_idx, self.val_idx, self.test_idx = train_idx, val_idx, test_idx
        self.n_train, self.n_val = len(train_idx), len(val_idx)
        self.set_size, self.batch_size, self.seed = set_size, batch_size, seed

    def _loader(self, groups: SetGroups, *, shuffle: bool) -> DataLoader:
        world, rank = _distributed()
        sampler = SetBatchSampler(
            groups,
            set_size=self.set_size,
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=shuffle,
            num_replicas=world,
            rank=rank,
        )
        return DataLoader(SetBatchDataset(self.expression, groups), sampler=sampler, batch_size=None, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_groups, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_groups is None or len(self.val_groups) == 0:
            return []
        return self._loader(self.val_groups, shuffle=False)
