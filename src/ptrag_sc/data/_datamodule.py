"""The Lightning data module serving training and validation sets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from ._sets import SetBatchDataset, SetBatchSampler

if TYPE_CHECKING:
    from ._matrix import ExpressionMatrix
    from ._sets import SetGroups


class SetDataModule(pl.LightningDataModule):
    """Serves training and validation sets; each data-parallel rank takes a disjoint share.

    Parameters
    ----------
    expression
        Row access to the expression matrix.
    train_groups, val_groups
        Groups of the training and validation cells (``val_groups`` may be ``None``).
    train_idx, val_idx, test_idx
        Cell indices of each split (recorded on the model after training).
    set_size
        Cells per set.
    batch_size
        Sets per step (per rank).
    seed
        Seed of the sampling plans (the same on every rank, so the shares are disjoint).
    steps_per_epoch
        Training batches per epoch and rank (default: one pass over the training groups).
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
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.expression = expression
        self.train_groups, self.val_groups = train_groups, val_groups
        self.train_idx, self.val_idx, self.test_idx = train_idx, val_idx, test_idx
        self.n_train, self.n_val = len(train_idx), len(val_idx)
        self.set_size, self.batch_size, self.seed = set_size, batch_size, seed
        self.steps_per_epoch = steps_per_epoch

    def _loader(self, groups: SetGroups, *, shuffle: bool) -> DataLoader:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if distributed else 1
        sampler = SetBatchSampler(
            groups,
            set_size=self.set_size,
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=shuffle,
            steps_per_epoch=self.steps_per_epoch if shuffle else None,
            num_replicas=world,
            rank=torch.distributed.get_rank() if distributed else 0,
        )
        return DataLoader(
            SetBatchDataset(self.expression, groups),
            sampler=sampler,
            batch_size=None,
            num_workers=0,
        )

    def transfer_batch_to_device(
        self, batch: object, device: torch.device, dataloader_idx: int
    ) -> object:
        """Move a batch (a flat dict of tensors) without Lightning's generic traversal."""
        if isinstance(batch, dict) and all(isinstance(v, torch.Tensor) for v in batch.values()):
            if all(v.device == device for v in batch.values()):
                return batch
            return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_groups, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_groups is None or len(self.val_groups) == 0:
            return []
        return self._loader(self.val_groups, shuffle=False)
