"""Lightning training plan: energy-distance objective, logged per epoch into ``model.history``."""

from __future__ import annotations

from typing import Literal

from scvi.train import TrainingPlan

from ..module._module import TENSORS


class PTRAGTrainingPlan(TrainingPlan):
    """Training plan of :class:`~ptrag_sc.PTRAG`.

    Logs, per epoch, ``train_loss`` (energy distance plus the sparsity penalty),
    ``train_energy`` and ``validation_energy`` (energy distance between predicted and observed
    sets, geomloss convention), ``validation_loss`` and, for PT-RAG, ``train_active_ratio`` /
    ``validation_active_ratio`` (fraction of candidates kept).

    Parameters
    ----------
    module
        A :class:`~ptrag_sc.module.PTRAGModule`.
    lr
        Learning rate.
    weight_decay
        Weight decay (decoupled, with ``optimizer="AdamW"``).
    optimizer
        ``"Adam"``, ``"AdamW"`` or ``"Custom"`` (with ``optimizer_creator``).
    eps
        Optimizer epsilon.
    reduce_lr_on_plateau
        Reduce the learning rate when ``lr_scheduler_metric`` plateaus.
    lr_scheduler_metric
        Metric watched by the scheduler.
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan`.
    """

    def __init__(
        self,
        module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        optimizer: Literal["Adam", "AdamW", "Custom"] = "AdamW",
        eps: float = 1e-8,
        reduce_lr_on_plateau: bool = False,
        lr_scheduler_metric: str = "validation_energy",
        **kwargs,
    ) -> None:
        super().__init__(
            module,
            lr=lr,
            weight_decay=weight_decay,
            optimizer=optimizer,
            eps=eps,
            reduce_lr_on_plateau=reduce_lr_on_plateau,
            lr_scheduler_metric=lr_scheduler_metric,
            n_epochs_kl_warmup=None,
            n_steps_kl_warmup=None,
            **kwargs,
        )

    def _optimizer_creator_fn(self, optimizer_cls):
        # The fused kernels (CPU and CUDA) make the optimizer step several times cheaper.
        return lambda params: optimizer_cls(
            params, lr=self.lr, eps=self.eps, weight_decay=self.weight_decay, fused=True
        )

    def _log_step(self, batch: dict, prefix: str):
        _, _, output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        n_sets = batch[TENSORS.X_CTRL].shape[0]
        options = {"on_step": False, "on_epoch": True, "batch_size": n_sets, "sync_dist": self.use_sync_dist}
        self.log(f"{prefix}_loss", output.loss, prog_bar=prefix == "train", **options)
        for name, value in output.extra_metrics.items():
            self.log(f"{prefix}_{name}", value, prog_bar=prefix == "validation" and name == "energy", **options)
        return output.loss

    def training_step(self, batch, batch_idx):
        """One optimisation step on a batch of sets."""
        return self._log_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        """Validation energy distance on a batch of held-out sets."""
        self._log_step(batch, "validation")
