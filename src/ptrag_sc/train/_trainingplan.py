"""Lightning training plan: energy and pseudobulk objectives, logged per epoch into
``model.history``."""

from __future__ import annotations

import difflib
import inspect
import math
from typing import TYPE_CHECKING, Literal

import torch
from scvi.train import TrainingPlan

from .._constants import TENSORS

if TYPE_CHECKING:
    from collections.abc import Callable

    from scvi.module.base import BaseModuleClass, LossOutput

#: Metrics logged per epoch, as ``{train,validation}_{name}`` (those a module reports).
METRICS = ("loss", "energy", "mean_error", "active_ratio")


class NonFiniteLossError(FloatingPointError, RuntimeError):
    """Raised when the training loss becomes NaN or infinite (a ``FloatingPointError`` and a
    ``RuntimeError``)."""


def _parameters(fn: Callable) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}


def _check_plan_kwargs(module: torch.nn.Module, kwargs: dict) -> None:
    """Names neither :class:`scvi.train.TrainingPlan` nor the module's loss takes fail now, not at
    step 1."""
    own = {
        "lr",
        "weight_decay",
        "evidence_lr",
        "optimizer",
        "eps",
        "reduce_lr_on_plateau",
        "lr_scheduler_metric",
    }
    # The KL warm-up of VAEs does not apply (and is set by this plan).
    scvi_plan = _parameters(TrainingPlan.__init__) - {
        "module",
        "loss_kwargs",
        "n_steps_kl_warmup",
        "n_epochs_kl_warmup",
        "max_kl_weight",
        "min_kl_weight",
    }
    loss = _parameters(module.loss) - {"tensors", "inference_outputs", "generative_outputs"}
    unknown = sorted(set(kwargs) - scvi_plan - loss)
    if unknown:
        accepted = sorted(own | scvi_plan | loss)
        aliases = {
            "learning_rate": "lr",
            "learningrate": "lr",
            "wd": "weight_decay",
            "l2": "weight_decay",
            "optim": "optimizer",
        }
        hints = [
            f"`{u}` -> `{m[0]}`?"
            for u in unknown
            if (
                m := [aliases[u.lower()]]
                if u.lower() in aliases
                else difflib.get_close_matches(u, accepted, n=1, cutoff=0.7)
            )
        ]
        raise TypeError(
            "`plan_kwargs` has unknown key(s) "
            f"{unknown}{' (' + ', '.join(hints) + ')' if hints else ''}. Accepted: {accepted}."
        )


class PTRAGTrainingPlan(TrainingPlan):
    """Training plan of :class:`~ptrag_sc.PTRAG`.

    Logs, per epoch (one validation interval), ``train_loss`` (the objective), ``train_energy``
    (its energy term),
    ``train_mean_error`` (squared error of the sets' mean shift against their groups'
    pseudobulk, over the typical squared shift), ``validation_loss`` (the same objective on
    held-out perturbations: what model selection watches), ``validation_energy`` (energy
    distance to the observed validation sets), ``validation_mean_error`` and, for PT-RAG,
    ``train_active_ratio`` / ``validation_active_ratio`` (fraction of candidates kept).
    Each is the mean over the epoch's sets; under data-parallel training the sums are
    reduced over the ranks, so the values are those of one process that saw every rank's
    sets.

    Parameters
    ----------
    module
        A :class:`~ptrag_sc.module.PTRAGModule`.
    lr
        Learning rate.
    weight_decay
        Weight decay (decoupled, with ``optimizer="AdamW"``).
    evidence_lr
        Learning rate of the few scalars of :class:`~ptrag_sc.module.EvidenceCombiner` (the
        trust ``a`` in the retrieved candidates and stage 2's offsets by relation and
        similarity): they start at a meaningful scale and would take thousands of steps to move
        at ``lr``.
    optimizer
        ``"Adam"`` or ``"AdamW"``.
    eps
        Optimizer epsilon.
    reduce_lr_on_plateau
        Reduce the learning rate when ``lr_scheduler_metric`` plateaus.
    lr_scheduler_metric
        Metric watched by the scheduler.
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (e.g. ``lr_patience``, ``lr_factor``) or, for
        the arguments of :meth:`PTRAGModule.loss <ptrag_sc.module.PTRAGModule.loss>`, to the
        loss. Any other name is refused with a ``TypeError``.
    """

    def __init__(
        self,
        module: BaseModuleClass,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        evidence_lr: float = 2e-2,
        optimizer: Literal["Adam", "AdamW"] = "AdamW",
        eps: float = 1e-8,
        reduce_lr_on_plateau: bool = False,
        lr_scheduler_metric: str = "validation_loss",
        **kwargs: object,
    ) -> None:
        for name, value in (("lr", lr), ("evidence_lr", evidence_lr), ("eps", eps)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"`plan_kwargs['{name}']` must be a finite positive number, got {value!r}."
                )
        if not (
            isinstance(weight_decay, int | float)
            and math.isfinite(weight_decay)
            and weight_decay >= 0
        ):
            raise ValueError(
                "`plan_kwargs['weight_decay']` must be a finite number >= 0, got "
                f"{weight_decay!r}."
            )
        if optimizer not in ("Adam", "AdamW"):
            raise ValueError(
                f"`plan_kwargs['optimizer']` must be 'Adam' or 'AdamW', got {optimizer!r}."
            )
        _check_plan_kwargs(module, kwargs)
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
        self.evidence_lr = evidence_lr
        self._metric_sums: dict[str, torch.Tensor] = {}
        # The module's buffers (the retrieval memory, the data constants) are set before
        # training and identical on every rank: data-parallel training need not broadcast them
        # at every step (the memory alone can be hundreds of MB).
        self._ddp_params_and_buffers_to_ignore = [
            f"module.{name}" for name, _ in module.named_buffers()
        ]

    def configure_optimizers(self) -> dict:
        """AdamW (fused kernels) with a faster, undecayed group for the evidence weights."""
        evidence = getattr(self.module, "evidence", None)
        fast = {id(p) for p in evidence.parameters()} if evidence is not None else set()
        params = [p for p in self.module.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in fast]}]
        if fast:
            groups.append(
                {
                    "params": [p for p in params if id(p) in fast],
                    "lr": self.evidence_lr,
                    "weight_decay": 0.0,
                }
            )
        cls = torch.optim.AdamW if self.optimizer_name == "AdamW" else torch.optim.Adam
        optimizer = cls(
            groups, lr=self.lr, eps=self.eps, weight_decay=self.weight_decay, fused=True
        )
        config = {"optimizer": optimizer}
        if self.reduce_lr_on_plateau:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer,
                patience=self.lr_patience,
                factor=self.lr_factor,
                threshold=self.lr_threshold,
                min_lr=self.lr_min,
                threshold_mode="abs",
            )
            config["lr_scheduler"] = {"scheduler": scheduler, "monitor": self.lr_scheduler_metric}
        return config

    # ------------------------------------------------------------------ metrics
    def _accumulate(self, prefix: str, output: LossOutput, weight: torch.Tensor) -> None:
        """Add a batch's metrics, weighted by its sets, to this epoch's running sums."""
        values = {"loss": output.loss, **output.extra_metrics}
        sums = self._metric_sums.get(prefix)
        if sums is None:
            sums = self._metric_sums[prefix] = torch.zeros(
                2 * len(METRICS), dtype=torch.float64, device=output.loss.device
            )
        for i, name in enumerate(METRICS):
            value = values.get(name)
            if value is not None:
                sums[2 * i] += weight * value.detach()
                sums[2 * i + 1] += weight

    def _log_epoch(self, prefix: str) -> None:
        """Log this epoch's weighted means, reduced over data-parallel ranks.

        The sums are reduced first (one collective), so the means weigh every set equally
        whatever its rank; the logged values are then the same on every rank (``sync_dist``
        keeps Lightning's bookkeeping consistent).
        """
        sums = self._metric_sums.pop(prefix, None)
        if sums is None:
            sums = torch.zeros(2 * len(METRICS), dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        for i, name in enumerate(METRICS):
            total, weight = sums[2 * i], sums[2 * i + 1]
            if weight > 0:
                self.log(
                    f"{prefix}_{name}",
                    (total / weight).float(),
                    on_step=False,
                    on_epoch=True,
                    prog_bar=name == "loss" and prefix == "train",
                    sync_dist=self.use_sync_dist,
                )

    def _step(self, batch: dict, prefix: str) -> torch.Tensor:
        _, _, output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        if not torch.isfinite(output.loss):
            raise NonFiniteLossError(
                f"The {prefix} loss became {float(output.loss.detach())} at step "
                f"{self.global_step}. Training diverged: lower the learning rate (e.g. "
                "`plan_kwargs={'lr': 1e-4}`) or check the input for extreme values."
            )
        weight = batch.get(TENSORS.METRIC_WEIGHT)
        weight = weight.sum() if weight is not None else batch[TENSORS.X_CTRL].shape[0]
        self._accumulate(prefix, output, weight)
        return output.loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One optimisation step on a batch of sets."""
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The objective on a batch of held-out sets."""
        self._step(batch, "validation")

    def on_train_epoch_end(self) -> None:
        """Log the epoch's training metrics."""
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        """Log the validation metrics (the same on every rank)."""
        self._log_epoch("validation")

    # ------------------------------------------------------- speed and processes
    def on_fit_start(self) -> None:
        """Flush denormals in every process that trains (spawned data-parallel workers too)."""
        self._metric_sums = {}
        self._flushing = self.device.type == "cpu" and torch.set_flush_denormal(True)

    def on_fit_end(self) -> None:
        if getattr(self, "_flushing", False):
            torch.set_flush_denormal(False)
            self._flushing = False
