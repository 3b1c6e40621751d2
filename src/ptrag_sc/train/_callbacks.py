"""Training callbacks."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.callbacks import Callback, ProgressBar

from .._utils import is_interactive

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import TextIO

    import lightning.pytorch as pl

logger = logging.getLogger(__name__)

#: Keys of ``trainer.callback_metrics`` that carry the restored weights' step and epoch.
BEST_STEP_KEY, BEST_EPOCH_KEY = "keep_best_step", "keep_best_epoch"


class KeepBestWeights(Callback):
    """Keep the module weights of the best validation check in memory; restore them at the end.

    Parameters
    ----------
    monitor
        Logged metric to watch.
    mode
        ``"min"`` or ``"max"``.

    Attributes
    ----------
    best, best_epoch, best_step
        The best value seen, and the epoch and optimisation step it was reached at.
    """

    def __init__(self, monitor: str = "validation_loss", mode: str = "min") -> None:
        super().__init__()
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self._state: dict | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        value = float(value)
        if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
            self.best, self.best_epoch, self.best_step = (
                value,
                trainer.current_epoch,
                trainer.global_step,
            )
            self._state = {k: v.detach().clone() for k, v in pl_module.module.state_dict().items()}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state is None:
            return
        with torch.no_grad():
            pl_module.module.load_state_dict(self._state)
        # Spawned data-parallel workers send `callback_metrics` back to the launching process,
        # whose copy of this callback never ran: the best step travels with them.
        trainer.callback_metrics[BEST_STEP_KEY] = torch.tensor(float(self.best_step))
        trainer.callback_metrics[BEST_EPOCH_KEY] = torch.tensor(float(self.best_epoch))
        logger.info(
            "Restored the weights of step %s (%s = %.4g).", self.best_step, self.monitor, self.best
        )

    @staticmethod
    def from_metrics(metrics: Mapping[str, object]) -> tuple[int | None, int | None]:
        """``(best_step, best_epoch)`` as :meth:`on_train_end` left them in
        ``trainer.callback_metrics``."""
        if BEST_STEP_KEY not in metrics:
            return None, None
        return int(metrics[BEST_STEP_KEY]), int(metrics[BEST_EPOCH_KEY])


class TrainingProgress(ProgressBar):
    """Training progress on stderr, in optimisation steps: on a terminal or in a notebook, a bar
    with the last validation loss; otherwise (a log file, a pipe) one line at the end with the
    steps run, the time and why training stopped.

    Parameters
    ----------
    stream
        Where to write; ``None`` (default) is ``sys.stderr`` at the start of training.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream
        self.is_enabled = True
        self._bar = None
        self._started = 0.0

    def disable(self) -> None:
        self.is_enabled = False

    def enable(self) -> None:
        self.is_enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self._out = sys.stderr if self._stream is None else self._stream
        if self.is_enabled and is_interactive(self._out):
            from tqdm import tqdm

            self._bar = tqdm(
                total=trainer.max_steps,
                desc="Training",
                unit="step",
                file=self._out,
                dynamic_ncols=True,
            )

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if self._bar is not None:
            self._bar.update(trainer.global_step - self._bar.n)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("validation_loss")
        if self._bar is not None and loss is not None and not trainer.sanity_checking:
            self._bar.set_postfix(validation_loss=f"{float(loss):.4g}", refresh=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is None and self.is_enabled:
            seconds = time.perf_counter() - self._started
            text = f"Training: {training_summary(trainer)}, {seconds:.0f} s"
            print(text, file=self._out, flush=True)
        self._close()

    def _close(self, *args: object) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    on_exception = _close


def training_summary(trainer: pl.Trainer) -> str:
    """``"450/1500 steps (stopped early: no better validation_loss in 5 checks)"``."""
    text = f"{trainer.global_step}/{trainer.max_steps} steps"
    stopper = trainer.early_stopping_callback
    if (
        stopper is not None
        and trainer.global_step < trainer.max_steps
        and stopper.wait_count >= stopper.patience
    ):
        text += f" (stopped early: no better {stopper.monitor} in {stopper.patience} checks)"
    return text
