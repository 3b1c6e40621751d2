"""How a model drives Lightning: trainer arguments, Ctrl+C, CPU determinism, scvi-tools'
runner."""

from __future__ import annotations

import contextlib
import difflib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.callbacks import Callback

from .._checks import finite_float
from .._settings import settings
from .._utils import flush_denormal, quiet_lightning, settings_threads
from ._trainingplan import _parameters

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule, Trainer
    from scvi.train import TrainingPlan, TrainRunner


def is_data_parallel(strategy: object) -> bool:
    """Whether a Lightning ``strategy`` (name or instance) trains data-parallel over processes."""
    if isinstance(strategy, str):
        return "ddp" in strategy
    from lightning.pytorch.strategies import DDPStrategy

    return isinstance(strategy, DDPStrategy)


#: Arguments of `train` itself (for suggestions), and those scvi-tools' runner takes beside the
#: Trainers' own.
_OWN_KEYS = set("max_epochs max_steps batch_size split_key validation_size plan_kwargs".split())
_RUNNER_KEYS = {"ckpt_path", "trainer_config", "callbacks"}


def check_trainer_kwargs(trainer_kwargs: dict) -> None:
    """Unknown Lightning arguments, callbacks that are not a list and a negative clip value fail
    here."""
    import lightning.pytorch as pl
    from scvi.train import Trainer

    accepted = _RUNNER_KEYS | _parameters(pl.Trainer.__init__) | _parameters(Trainer.__init__)
    unknown = sorted(set(trainer_kwargs) - accepted)
    if unknown:
        known = sorted(accepted | _OWN_KEYS)
        hints = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
        hint = "; ".join(f"did you mean `{h[0]}` for `{u}`?" for u, h in hints.items() if h)
        raise TypeError(
            f"`train()` got unknown argument(s) {unknown}: neither arguments of `train` nor of "
            f"the Lightning Trainer.{' ' + hint if hint else ''}"
        )
    callbacks = trainer_kwargs.get("callbacks")
    if callbacks is not None and (
        not isinstance(callbacks, list | tuple)
        or not all(isinstance(c, Callback) for c in callbacks)
    ):
        raise TypeError(
            f"`callbacks` must be a list of Lightning `Callback` objects, got {callbacks!r}."
        )
    clip = trainer_kwargs.get("gradient_clip_val")
    if clip is not None:
        finite_float("gradient_clip_val", clip, minimum=0.0)


class InterruptWatcher(Callback):
    """Records whether Lightning handled a ``KeyboardInterrupt`` (it turns Ctrl+C into
    ``SystemExit``)."""

    interrupted = False

    def on_exception(self, trainer: Trainer, pl_module: object, exception: BaseException) -> None:
        self.interrupted = self.interrupted or isinstance(exception, KeyboardInterrupt)


@contextlib.contextmanager
def keep_sigint() -> Iterator[None]:
    """Restore the Ctrl+C handler that Lightning sets to "ignore" when it handles an interrupt."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main and handler is not None and signal.getsignal(signal.SIGINT) != handler:
            signal.signal(signal.SIGINT, handler)


def runs_on_cpu(accelerator: object) -> bool:
    """Whether Lightning will train on the CPU with this ``accelerator``."""
    if isinstance(accelerator, str) and accelerator.lower() == "cpu":
        return True
    if accelerator not in (None, "auto"):
        return False
    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Use PyTorch's deterministic algorithms while the block runs (when ``enabled``).

    On the CPU with several threads, the backward pass of an indexing with repeated indices
    (one memory entry retrieved by several sets) adds gradients in thread order, so two runs
    with one seed drift apart and early stopping can pick another step.
    """
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


def run_trainer(
    runner: Callable[..., TrainRunner],
    training_plan: TrainingPlan,
    datamodule: LightningDataModule,
    *,
    max_epochs: int,
    accelerator: str,
    devices: int | list[int] | str,
    early_stopping: bool,
    trainer_kwargs: dict,
) -> TrainRunner:
    """Hand the data module and the training plan to scvi-tools' runner, and run it."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    training_plan.module.train()
    with flush_denormal(), settings_threads(), quiet_lightning(settings.verbosity > logging.INFO):
        try:
            started = runner(
                training_plan=training_plan,
                data_splitter=datamodule,
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                early_stopping=early_stopping,
                **trainer_kwargs,
            )
        except (MisconfigurationException, ImportError, ValueError, TypeError) as exc:
            names = ("strategy", "num_nodes", "precision")
            extra = "".join(f", `{k}={trainer_kwargs[k]!r}`" for k in names if k in trainer_kwargs)
            raise ValueError(
                f"The trainer cannot be set up with `accelerator={accelerator!r}`, "
                f"`devices={devices!r}`{extra}: {exc} Check these arguments of `train()` "
                "(`accelerator='cpu'` always works)."
            ) from exc
        started()
    training_plan.module.eval()
    return started
