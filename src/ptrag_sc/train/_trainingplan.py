"""Lightning training plan: the module's loss, its metrics logged per epoch."""

from __future__ import annotations

import difflib
import inspect
from typing import TYPE_CHECKING, Literal

import torch
from scvi.train import TrainingPlan

from .._checks import finite_float
from .._constants import TENSORS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from scvi.module.base import BaseModuleClass
    from torch.optim import Optimizer

#: Metrics logged per epoch, as ``{train,validation}_{name}`` (those a module reports).
METRICS = ("loss", "energy", "mean_error", "active_ratio")


class NonFiniteLossError(FloatingPointError, RuntimeError):
    """Raised when the training loss becomes NaN or infinite (a ``FloatingPointError`` and a
    ``RuntimeError``)."""


def _parameters(fn: Callable) -> set[str]:
    """Names of ``fn``'s arguments, without ``self``, ``*args`` and ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}


#: Common misnamings of the plan's arguments that `difflib` would not match.
_ALIASES = {
    "learning_rate": "lr",
    "learningrate": "lr",
    "wd": "weight_decay",
    "l2": "weight_decay",
    "optim": "optimizer",
}
#: scvi-tools' plan arguments that do not apply: the KL warm-up of VAEs (set by this plan).
_NOT_PASSED = {"module", "loss_kwargs", "n_steps_kl_warmup", "n_epochs_kl_warmup"}
_NOT_PASSED |= {"max_kl_weight", "min_kl_weight"}


def _check_plan_kwargs(module: torch.nn.Module, kwargs: dict) -> None:
    """Names neither scvi-tools' plan nor the module's loss takes fail now, not at step 1."""
    scvi_plan = _parameters(TrainingPlan.__init__) - _NOT_PASSED
    loss = _parameters(module.loss) - {"tensors", "inference_outputs", "generative_outputs"}
    unknown = sorted(set(kwargs) - scvi_plan - loss)
    if unknown:
        accepted = sorted(_parameters(PTRAGTrainingPlan.__init__) - {"module"} | scvi_plan | loss)
        hints = [
            f"`{u}` -> `{m[0]}`?"
            for u in unknown
            if (
                m := [_ALIASES[u.lower()]]
                if u.lower() in _ALIASES
                else difflib.get_close_matches(u, accepted, n=1, cutoff=0.7)
            )
        ]
        raise TypeError(
            "`plan_kwargs` has unknown key(s) "
            f"{unknown}{' (' + ', '.join(hints) + ')' if hints else ''}. Accepted: {accepted}."
        )


class PTRAGTrainingPlan(TrainingPlan):
    """Training plan of :class:`~ptrag_sc.PTRAG`.

    Logs per epoch (one validation interval), prefixed ``train_`` or ``validation_``: ``loss``
    (the objective; ``validation_loss`` is what model selection watches), ``energy`` (its energy
    term; in validation, to the observed sets), ``mean_error`` (squared error of the sets' mean
    shift against their groups' pseudobulk, over the typical squared shift) and, for PT-RAG,
    ``active_ratio`` (fraction of candidates kept). Each is the mean over the epoch's sets, of
    every rank under data-parallel training.

    Parameters
    ----------
    module
        A :class:`~ptrag_sc.module.PTRAGModule`.
    lr
        Learning rate.
    weight_decay
        Weight decay (decoupled, with ``optimizer="AdamW"``).
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
        optimizer: Literal["Adam", "AdamW"] = "AdamW",
        eps: float = 1e-8,
        reduce_lr_on_plateau: bool = False,
        lr_scheduler_metric: str = "validation_loss",
        **kwargs: object,
    ) -> None:
        for name, value in (("lr", lr), ("eps", eps)):
            finite_float(f"plan_kwargs['{name}']", value, minimum=0.0, strict=True)
        finite_float("plan_kwargs['weight_decay']", weight_decay, minimum=0.0)
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
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._flushing = False
        # The module's buffers (the retrieval memory, the data constants) are set before
        # training and identical on every rank: data-parallel training need not broadcast them
        # at every step (the memory alone can be hundreds of MB).
        self._ddp_params_and_buffers_to_ignore = [
            f"module.{name}" for name, _ in module.named_buffers()
        ]

    def get_optimizer_creator(self) -> Callable[[Iterable[torch.nn.Parameter]], Optimizer]:
        """AdamW or Adam with PyTorch's fused kernels."""
        cls = torch.optim.AdamW if self.optimizer_name == "AdamW" else torch.optim.Adam

        def create(params: Iterable[torch.nn.Parameter]) -> Optimizer:
            return cls(
                [{"params": list(params)}],
                lr=self.lr,
                eps=self.eps,
                weight_decay=self.weight_decay,
                fused=True,
            )

        return create

    def _step(self, batch: dict, prefix: str) -> torch.Tensor:
        """The loss of a batch of sets; its metrics, weighted by its sets, join the epoch sums."""
        _, _, output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        if not torch.isfinite(output.loss):
            raise NonFiniteLossError(
                f"The {prefix} loss became {float(output.loss.detach())} at step "
                f"{self.global_step}. Training diverged: lower the learning rate (e.g. "
                "`plan_kwargs={'lr': 1e-4}`) or check the input for extreme values."
            )
        weight = batch.get(TENSORS.METRIC_WEIGHT)
        weight = weight.sum() if weight is not None else batch[TENSORS.X_CTRL].shape[0]
        if prefix not in self._metric_sums:
            self._metric_sums[prefix] = self._zero_sums(output.loss.device)
        sums = self._metric_sums[prefix]
        values = {"loss": output.loss, **output.extra_metrics}
        for i, name in enumerate(METRICS):
            if values.get(name) is not None:
                sums[i, 0] += weight * values[name].detach()
                sums[i, 1] += weight
        return output.loss

    @staticmethod
    def _zero_sums(device: torch.device) -> torch.Tensor:
        return torch.zeros(len(METRICS), 2, dtype=torch.float64, device=device)

    def _log_epoch(self, prefix: str) -> None:
        """Log the epoch's weighted means; the sums are reduced over ranks first, so every set
        weighs the same whatever its rank, and every rank logs the same values."""
        sums = self._metric_sums.pop(prefix, None)
        if sums is None:
            sums = self._zero_sums(self.device)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        for name, (total, weight) in zip(METRICS, sums, strict=True):
            if weight > 0:
                self.log(
                    f"{prefix}_{name}",
                    (total / weight).float(),
                    on_step=False,
                    on_epoch=True,
                    prog_bar=name == "loss" and prefix == "train",
                    sync_dist=self.use_sync_dist,
                )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "validation")

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("validation")

    def on_fit_start(self) -> None:
        """Flush denormals in every process that trains (spawned data-parallel workers too)."""
        self._metric_sums = {}
        self._flushing = self.device.type == "cpu" and torch.set_flush_denormal(True)

    def on_fit_end(self) -> None:
        if self._flushing:
            torch.set_flush_denormal(False)
            self._flushing = False
