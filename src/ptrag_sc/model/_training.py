"""What :meth:`PTRAG.train` does: split, memory, sets, model selection, and a clean failure."""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from scvi import settings as scvi_settings

from .._checks import finite_float, positive_int
from .._settings import settings
from ..data import SetDataModule, column_max
from ..data._checks import check_expression, check_obs_key
from ..data._sets import n_training_sets
from ..train import KeepBestWeights, TrainingProgress
from ..train._runner import (
    InterruptWatcher,
    check_trainer_kwargs,
    deterministic_algorithms,
    is_data_parallel,
    keep_sigint,
    run_trainer,
    runs_on_cpu,
)
from ._guard import training

if TYPE_CHECKING:
    from anndata import AnnData
    from scvi.train import TrainRunner

    from ..data import ModelState, PerturbationData, RetrievalMemory
    from ..module import PTRAGModule
    from ..train import PTRAGTrainingPlan

logger = logging.getLogger(__name__)

#: Optimisation steps when neither ``max_steps`` nor ``max_epochs`` is given.
DEFAULT_MAX_STEPS = 1500
#: A ``cell_set_size`` beyond this many times the largest training group is refused; between 1x
#: and this it is a warning.
MAX_SET_OVERSAMPLING = 4
#: Fraction of the training (perturbation, cell type) groups held out for model selection.
DEFAULT_VALIDATION_SIZE = 0.1
#: At most this many groups are held out automatically.
MAX_AUTO_VALIDATION_GROUPS = 200
#: A cell type keeps at least this many training groups when groups are held out from it.
MIN_TRAINING_GROUPS_PER_CELL_TYPE = 3

_SPLIT_VALUES = {"train", "val", "validation", "test"}


def split_masks(
    data: PerturbationData, adata: AnnData, split_key: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training, validation and test masks from ``adata.obs[split_key]`` (all training without
    one)."""
    n = data.n_obs
    if split_key is None:
        return np.ones(n, dtype=bool), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    check_obs_key(adata, split_key, "split_key")
    column = adata.obs[split_key]
    if column.isna().any():
        raise ValueError(
            f"`adata.obs[{split_key!r}]` (`split_key`) has missing values; every cell needs "
            "'train', 'val' or 'test'."
        )
    split = column.astype(str).str.strip().str.lower().to_numpy()
    unknown = sorted(set(np.unique(split)) - _SPLIT_VALUES)
    if unknown:
        raise ValueError(
            f"`adata.obs[{split_key!r}]` holds values {unknown[:5]}; expected 'train', 'val' (or "
            "'validation') and 'test'."
        )
    return split == "train", np.isin(split, ["val", "validation"]), split == "test"


def hold_out_groups(
    data: PerturbationData, train: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """Cells of a random ``fraction`` of the training (perturbation, cell type) groups (at least
    one, at most ``MAX_AUTO_VALIDATION_GROUPS``; each cell type keeps a few, so its context
    stays measured)."""
    perturbed = train & ~data.is_control
    frame = pd.DataFrame(
        {"p": data.labels[perturbed].astype(str), "c": data.cell_types[perturbed].astype(str)}
    )
    groups = frame.drop_duplicates().sort_values(["c", "p"]).reset_index(drop=True)
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(groups))
    target = min(MAX_AUTO_VALIDATION_GROUPS, max(1, round(fraction * len(groups))))
    remaining = groups["c"].value_counts().to_dict()
    chosen = []
    for i in order:
        c = groups.at[i, "c"]
        if len(chosen) == target:
            break
        if remaining[c] > MIN_TRAINING_GROUPS_PER_CELL_TYPE:
            chosen.append(i)
            remaining[c] -= 1
    cell_keys = pd.MultiIndex.from_arrays([data.labels.astype(str), data.cell_types.astype(str)])
    return perturbed & cell_keys.isin(pd.MultiIndex.from_frame(groups.loc[chosen, ["p", "c"]]))


@dataclass
class Trained:
    """What :func:`train` gives the model: its new state and when the kept weights were
    reached."""

    state: ModelState
    best_step: int | None
    best_epoch: int | None
    validation_perturbations: np.ndarray


def _seed(distributed: bool) -> int:
    """``scvi.settings.seed`` if set, else random; 0 under data-parallel training, where every
    process must draw the same split and sets."""
    if scvi_settings.seed is not None:
        return int(scvi_settings.seed)
    if distributed:
        logger.info(
            "Data-parallel training without `scvi.settings.seed`: sampling with seed 0 on every "
            "process."
        )
        return 0
    return int(np.random.default_rng().integers(2**31))


def train(
    state: ModelState,
    module: PTRAGModule,
    adata: AnnData,
    *,
    runner: Callable[..., TrainRunner],
    plan_cls: type[PTRAGTrainingPlan],
    max_epochs: int | None,
    max_steps: int | None,
    batch_size: int,
    split_key: str | None,
    validation_size: float | None,
    early_stopping: bool | None,
    early_stopping_patience: int,
    keep_best: bool,
    check_val_every_n_steps: int | None,
    accelerator: str,
    devices: int | list[int] | str,
    plan_kwargs: dict | None,
    trainer_kwargs: dict,
) -> Trained:
    """The body of :meth:`PTRAG.train`; ``runner`` is scvi-tools' runner for the model. If
    training fails or is interrupted, the network is left as it was."""
    batch_size = positive_int("batch_size", batch_size)
    max_steps = positive_int("max_steps", max_steps, allow_none=True)
    max_epochs = positive_int("max_epochs", max_epochs, allow_none=True)
    early_stopping_patience = positive_int("early_stopping_patience", early_stopping_patience)
    interval = positive_int("check_val_every_n_steps", check_val_every_n_steps, allow_none=True)
    if validation_size is not None:
        validation_size = finite_float(
            "validation_size", validation_size, minimum=0.0, maximum=1.0
        )
    if plan_kwargs is not None and not isinstance(plan_kwargs, dict):
        raise TypeError(f"`plan_kwargs` must be a dict, got {type(plan_kwargs).__name__}.")
    check_trainer_kwargs(trainer_kwargs)
    # Built first: a typo in `plan_kwargs` fails here, before anything changes.
    plan_cls(module, **(plan_kwargs or {}))

    distributed = is_data_parallel(trainer_kwargs.get("strategy"))
    seed = _seed(distributed)
    data = state.data(adata)
    # The AnnData may have changed since `setup_anndata` checked it.
    layer = state.setup.layer
    where = "`adata.X`" if layer is None else f"`adata.layers[{layer!r}]`"
    check_expression(data.matrix, where=where)
    train_mask, val_mask, test_mask = split_masks(data, adata, split_key)
    is_control = data.is_control
    if not (train_mask & ~is_control).any():
        raise ValueError("The training split holds no perturbed cells.")
    state.encoder.check(np.unique(data.labels[~is_control]), context=" in the training AnnData")
    auto_held = np.zeros(data.n_obs, dtype=bool)
    if not (val_mask & ~is_control).any() and validation_size != 0.0:
        fraction = validation_size or DEFAULT_VALIDATION_SIZE
        auto_held = hold_out_groups(data, train_mask, fraction, seed)
        val_mask = val_mask | auto_held
        train_mask = train_mask & ~auto_held
    perturbed_train, perturbed_val = train_mask & ~is_control, val_mask & ~is_control
    has_val = bool(perturbed_val.any())
    if early_stopping is None:
        early_stopping = has_val
    if early_stopping and not has_val:
        raise ValueError(
            "`early_stopping=True` needs validation perturbations: give 'val' cells in "
            "`split_key`, or leave `validation_size` at its default."
        )

    watcher = InterruptWatcher()
    old_memory = state.memory
    with training(module), keep_sigint(), _undone_on_failure(module, old_memory, watcher):
        n_components = module.n_response_components
        memory = None
        if state.retrieval != "none":
            memory = _install(module, state.build_memory(data, train_mask, n_components))
        state = state.replace(
            memory=memory,
            training_perturbations=np.unique(data.labels[perturbed_train].astype(str)),
            training_cell_types=np.unique(data.cell_types[perturbed_train].astype(str)),
        )
        contexts = state.builder.control_contexts(data, is_control)
        groups_of = state.builder.training_groups
        train_groups = groups_of(data, perturbed_train, is_control, contexts=contexts)
        val_groups = (
            groups_of(data, perturbed_val, is_control, contexts=contexts) if has_val else None
        )
        for name, groups in (("training", train_groups), ("validation", val_groups)):
            if groups is not None and int(groups.sizes.max()) < 2:
                raise ValueError(
                    f"Every {name} group has a single cell: sets need at least 2 cells per "
                    "(perturbation, cell type)."
                )
        _check_set_size(state.cell_set_size, data, perturbed_train)

        # The largest value a gene reaches in the training data bounds what the model generates.
        ceiling = data.column_stats(column_max(data.matrix, train_mask | is_control))
        baseline = train_groups.context if train_groups.context is not None else 0.0
        scale = float(np.mean(np.sum(np.square(train_groups.target_shift - baseline), axis=1)))
        module.set_data_constants(ceiling, scale)

        n_sets = int(n_training_sets(train_groups.sizes, state.cell_set_size).sum())
        if max_steps is None and max_epochs is not None:
            max_steps = max_epochs * max(1, math.ceil(n_sets / batch_size))
        max_steps = max_steps or DEFAULT_MAX_STEPS
        interval = min(interval or int(np.clip(max_steps // 30, 10, 50)), max_steps)
        datamodule = SetDataModule(
            data.expression,
            train_groups,
            val_groups,
            train_idx=np.flatnonzero(train_mask),
            val_idx=np.flatnonzero(val_mask),
            test_idx=np.flatnonzero(test_mask),
            set_size=state.cell_set_size,
            batch_size=batch_size,
            seed=seed,
            steps_per_epoch=interval,
        )
        callbacks = [*(trainer_kwargs.get("callbacks") or []), watcher]
        trainer_kwargs = {**trainer_kwargs, "max_steps": max_steps}
        trainer_kwargs["use_distributed_sampler"] = False
        trainer_kwargs.setdefault("gradient_clip_val", 10.0)
        trainer_kwargs.setdefault("enable_progress_bar", settings.progress_bar)
        trainer_kwargs["check_val_every_n_epoch"] = 1 if has_val else None
        if not has_val:
            trainer_kwargs.setdefault("limit_val_batches", 0)
        if trainer_kwargs["enable_progress_bar"] and "simple_progress_bar" not in trainer_kwargs:
            from lightning.pytorch.callbacks import ProgressBar

            # Instead of scvi-tools' bar, which counts epochs (validation intervals) on stdout.
            trainer_kwargs["simple_progress_bar"] = False
            if not any(isinstance(c, ProgressBar) for c in callbacks):
                callbacks.append(TrainingProgress())
        if early_stopping:
            # Lightning's own callback, not scvi-tools' `early_stopping=True`, which prints its
            # reason for stopping to stdout. Under DDP the validation loss is reduced over the
            # ranks, so every rank stops together.
            from lightning.pytorch.callbacks import EarlyStopping

            patience = early_stopping_patience
            callbacks.append(EarlyStopping("validation_loss", patience=patience, verbose=True))
        keeper = KeepBestWeights("validation_loss") if keep_best and has_val else None
        callbacks += [keeper] if keeper is not None else []
        trainer_kwargs["callbacks"] = callbacks
        # Same seed and thread count -> the same weights on the CPU; a user's own
        # `deterministic=` trainer argument is left to Lightning.
        deterministic = "deterministic" not in trainer_kwargs and runs_on_cpu(accelerator)
        with contextlib.ExitStack() as stack:
            if distributed:
                # The history travels from rank 0 through a file: a temporary folder, not the
                # working directory.
                log_dir = tempfile.TemporaryDirectory(
                    prefix="ptrag_sc_ddp_", ignore_cleanup_errors=True
                )
                trainer_kwargs.setdefault("log_save_dir", stack.enter_context(log_dir))
            stack.enter_context(deterministic_algorithms(deterministic))
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="early_stopping was automatically disabled")
            started = run_trainer(
                runner,
                plan_cls(module, **(plan_kwargs or {})),
                datamodule,
                max_epochs=math.ceil(max_steps / interval),
                accelerator=accelerator,
                devices=devices,
                early_stopping=False,
                trainer_kwargs=trainer_kwargs,
            )
        best_step = best_epoch = None
        if keeper is not None:
            best_step, best_epoch = keeper.best_step, keeper.best_epoch
            if best_step is None:  # `ddp_spawn`: the callback ran in the worker processes.
                best_step, best_epoch = KeepBestWeights.from_metrics(
                    started.trainer.callback_metrics
                )
        if auto_held.any() and state.retrieval != "none":
            # The held-out groups were training data: after model selection they join the
            # memory, as evidence for predictions.
            memory = state.build_memory(data, train_mask | auto_held, module.n_response_components)
            state = state.replace(memory=_install(module, memory))
    held = data.labels[auto_held | perturbed_val]
    return Trained(state, best_step, best_epoch, np.unique(held.astype(str)))


def _install(module: PTRAGModule, memory: RetrievalMemory) -> RetrievalMemory:
    """``memory``, its tables installed in the network (what its candidate encoder reads)."""
    module.set_memory(memory.embeddings, memory.response_codes)
    return memory


@contextlib.contextmanager
def _undone_on_failure(
    module: PTRAGModule, memory: RetrievalMemory | None, watcher: InterruptWatcher
) -> Iterator[None]:
    """Put back the network's weights, mode and memory tables if the block fails."""
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    mode = module.training
    try:
        yield
    except BaseException as exc:
        if memory is not None:
            _install(module, memory)
        with torch.no_grad():
            module.load_state_dict(weights)
        module.train(mode)
        if watcher.interrupted and isinstance(exc, SystemExit):
            # Lightning answers Ctrl+C with `sys.exit(1)`, which would end a script or a
            # notebook cell as if the program had finished: give back the interrupt.
            raise KeyboardInterrupt(
                "`train()` was interrupted; the model is as it was before the call."
            ) from None
        raise


def _check_set_size(
    cell_set_size: int, data: PerturbationData, perturbed_train: np.ndarray
) -> None:
    """Refuse sets far larger than every training group; warn when sets must repeat cells."""
    groups = pd.DataFrame(
        {"p": data.labels[perturbed_train], "c": data.cell_types[perturbed_train]}
    )
    largest = int(groups.value_counts().max())
    if cell_set_size > MAX_SET_OVERSAMPLING * largest:
        raise ValueError(
            f"`cell_set_size={cell_set_size}` is larger than every training group: the largest "
            f"(perturbation, cell type) group has {largest} cells, so every set would only "
            f"repeat cells (and cost memory for nothing). Build the model with `cell_set_size` "
            f"<= {largest}."
        )
    if cell_set_size > largest:
        # Small screens (e.g. 40 cells per group) with the default of 64: sets repeat some
        # cells, which costs time but not correctness; say so rather than refuse the defaults.
        warnings.warn(
            f"`cell_set_size={cell_set_size}` is larger than every training group (the largest "
            f"has {largest} cells): sets repeat cells. `cell_set_size={largest}` trains faster "
            "for the same data.",
            UserWarning,
            stacklevel=4,
        )
