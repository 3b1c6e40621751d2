"""The demo: two prediction tasks on the bundled real data, with baselines, written to a report."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._demo_report import (
    FILES,
    KEYS,
    MODEL_NAME,
    REPORT,
    REPORT_METRICS,
    fallback_note,
    knn_note,
    method_means,
    report,
)
from ._settings import settings as _settings
from ._utils import is_interactive, quiet_lightning

if TYPE_CHECKING:
    from typing import TextIO

    from anndata import AnnData

    from .model import PTRAG

#: Baselines that predict the same shift for every perturbation of a cell type: a
#: perturbation-specific score is undefined for them.
ONE_SHIFT_BASELINES = ("control", "context_mean")


@dataclass(frozen=True)
class Task:
    """A demo task; ``prepare(seed)`` gives the data with ``obs["split"]``, the cell type
    predicted and its test perturbations."""

    name: str
    title: str
    question: str
    baselines: tuple[str, ...]
    prepare: Callable[[int], tuple[AnnData, str, list[str]]]


def _glioblastoma(seed: int) -> tuple[AnnData, str, list[str]]:
    from . import datasets, pp

    adata, test = datasets.perturbench_devel(), ["MAP2K3", "MAPK1", "SGK1", "TGFBR2"]
    pp.few_shot_split(adata, held_out="U87MG", val=["PLK4"], test=test)
    return adata, "U87MG", test


def _thp1(seed: int) -> tuple[AnnData, str, list[str]]:
    from . import datasets

    adata, test = datasets.papalexi_thp1(), datasets.papalexi_thp1_folds()[0]
    adata.obs["split"] = pd.Categorical(np.where(adata.obs["gene"].isin(test), "test", "train"))
    return adata, "THP-1", test


def _synthetic(seed: int) -> tuple[AnnData, str, list[str]]:
    from . import datasets, pp

    adata = datasets.synthetic(seed=seed, n_cells_per_perturbation=64)  # a full cell set per group
    perts = sorted(set(adata.obs["gene"].astype(str)) - {KEYS["control_group"]})
    held_out = str(adata.obs["cell_line"].cat.categories[0])
    pp.few_shot_split(adata, held_out=held_out, val=perts[:2], test=perts[2:6])
    return adata, held_out, perts[2:6]


TASKS = {
    "glioblastoma": Task(
        name="glioblastoma",
        title="Few-shot cell line",
        question=(
            "Predict perturbations in a glioblastoma line (U87MG) in which only a few others were "
            "measured, from the same perturbations measured in two other glioblastoma lines "
            "(A172, T98G) and in K562 (bundled McFaline-Figueroa 2024 and Norman 2019 data, "
            "curated by perturbench). PLK4 in U87MG validates (chooses when to stop)."
        ),
        baselines=("control", "context_mean", "other_cell_types", "linear", "knn"),
        prepare=_glioblastoma,
    ),
    "thp1": Task(
        name="thp1",
        title="Unseen knockouts",
        question=(
            "Predict knockouts never measured in THP-1 cells (the first of the benchmark's five "
            "fixed folds of targets, `ptrag_sc.datasets.papalexi_thp1_folds()[0]`) from the other "
            "knockouts of the same screen and each gene's embedding (bundled Papalexi 2021 "
            "ECCITE-seq data, sceptredata subset, 299 genes). The model holds out some training "
            "knockouts itself to choose when to stop."
        ),
        baselines=("control", "context_mean", "linear", "knn"),
        prepare=_thp1,
    ),
    "synthetic": Task(
        name="synthetic",
        title="Synthetic few-shot cell line",
        question=(
            "Predict 4 perturbations in the first of three simulated cell lines (known effects; "
            "a quick check)."
        ),
        baselines=("control", "context_mean", "other_cell_types", "linear", "knn"),
        prepare=_synthetic,
    ),
}
#: The tasks ``ptrag-sc demo`` runs by default.
DEFAULT_TASKS = ("glioblastoma", "thp1")


def planned_paths(output: Path, tasks: tuple[str, ...]) -> list[Path]:
    """Every file and folder :func:`run_demo` writes for ``tasks`` into ``output``."""
    return [output / REPORT, *(output / task / name for task in tasks for name in FILES.values())]


def prepare_output(
    output: str | os.PathLike[str], tasks: tuple[str, ...], *, overwrite: bool
) -> Path:
    """Check and create the output folder before anything runs: ``ValueError`` for an empty
    name, a file or a folder that cannot be created or written; ``FileExistsError`` for files
    of an earlier run without ``overwrite``."""
    if not isinstance(output, str | os.PathLike) or not str(output).strip():
        raise ValueError(f"The output folder must be a non-empty path, got {output!r}.")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"The output folder '{output}' is an existing file, not a folder.")
    existing = [p for p in planned_paths(output, tasks) if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        listed = ", ".join(str(p.relative_to(output)) for p in existing[:4])
        more = f" and {len(existing) - 4} more" if len(existing) > 4 else ""
        raise FileExistsError(
            f"'{output}' already holds files of a demo run ({listed}{more}); pass --overwrite "
            "(overwrite=True) to replace them, or choose another folder."
        )
    try:
        for task in tasks:
            (output / task).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"Cannot create the output folder '{output}': {exc.strerror or exc}."
        ) from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise ValueError(f"Cannot write into the output folder '{output}': permission denied.")
    return output


class PhaseLog:
    """One line per phase on ``stream`` (default stderr): ``"[task] phase: outcome; 12 s"``.

    Off a terminal the line starts with the phase, so a long phase shows what runs; on a
    terminal, where the training bar draws over it, it is written whole at the end.
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.interactive = is_interactive(self.stream)

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[list[str]]:
        """Yield a list to which the phase appends what it did."""
        outcome: list[str] = []
        early = self.enabled and not self.interactive
        if early:
            print(f"{label}: ", end="", file=self.stream, flush=True)
        start = time.perf_counter()
        try:
            yield outcome
        except BaseException:
            if early:
                print("failed", file=self.stream, flush=True)
            raise
        text = "; ".join([*outcome, f"{time.perf_counter() - start:.0f} s"])
        if self.enabled:
            print(text if early else f"{label}: {text}", file=self.stream, flush=True)


def run_demo(
    output: str | Path = "demo_output",
    *,
    tasks: tuple[str, ...] | list[str] = DEFAULT_TASKS,
    max_steps: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    log: PhaseLog | None = None,
) -> pd.DataFrame:
    """Train PT-RAG on each task, predict its held-out perturbations, score them against
    baselines, save and reload the model, and write a report.

    Parameters
    ----------
    output
        Folder for ``report.md`` and one subfolder per task with the tables (``metrics.csv``,
        ``summary.csv``, ``retrieval.csv``, ``history.csv``), figures and the saved model
        (``model/``); other files there are left alone.
    tasks
        Names from :data:`TASKS`: ``"glioblastoma"`` (a few-shot cell line) and ``"thp1"``
        (unseen knockouts) by default; ``"synthetic"`` is a quick check on simulated data.
    max_steps
        Training steps; ``None`` (default) trains for the model's default length
        (``model.train(split_key="split")``).
    seed
        Seed (``scvi.settings.seed``, the baselines' control matching and the bootstrap).
    overwrite
        Replace the files of an earlier run in ``output``; without it they are refused.
    log
        Where phase lines go; default: one line per phase on stderr when
        ``ptrag_sc.settings.progress_bar`` is on.

    Returns
    -------
    The summary table (``task, method, metric, n, mean, std, ci_low, ci_high``).
    """
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown or len(set(tasks)) != len(tasks):
        raise ValueError(
            f"`tasks` must name distinct tasks of {sorted(TASKS)}, got {list(tasks)}."
        )
    if max_steps is not None and (
        isinstance(max_steps, bool) or not isinstance(max_steps, int | np.integer) or max_steps < 1
    ):
        raise ValueError(f"`max_steps` must be a positive integer or None, got {max_steps!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"`seed` must be an integer from 0 to 2**32 - 1, got {seed!r}.")
    output = prepare_output(output, tasks, overwrite=overwrite)
    log = PhaseLog(_settings.progress_bar) if log is None else log
    import scvi

    start = time.perf_counter()
    outcomes = []
    for i, name in enumerate(tasks, 1):
        with quiet_lightning(True):  # Lightning's "Seed set to 0"
            scvi.settings.seed = seed
        label = f"[{i}/{len(tasks)} {name}]"
        outcomes.append(_run_task(TASKS[name], output / name, max_steps, seed, log, label))
    with log.phase("report written") as done:
        settings = {
            "tasks": list(tasks),
            "max_steps": "model default" if max_steps is None else int(max_steps),
            "seed": seed,
            "torch_threads": _settings.num_threads,
            "total_seconds": round(time.perf_counter() - start, 1),
            **{o["task"].name: o["settings"] for o in outcomes},
        }
        (output / REPORT).write_text(report(outcomes, settings=settings, seed=seed))
        done.append(str(output / REPORT))
    return pd.concat(
        [o["summary"].assign(task=o["task"].name) for o in outcomes], ignore_index=True
    )


def _run_task(
    task: Task, folder: Path, max_steps: int | None, seed: int, log: PhaseLog, label: str
) -> dict:
    from . import PTRAG, tl
    from .train import training_summary

    with log.phase(f"{label} data") as done:
        adata, cell_type, test = task.prepare(seed)
        embeddings = adata.uns["gene_embeddings"]
        PTRAG.setup_anndata(adata, **KEYS)
        obs = adata.obs
        train = obs[(obs["cell_line"] == cell_type) & (obs["split"] == "train")]
        n_train = train.loc[train["gene"] != KEYS["control_group"], "gene"].nunique()
        done.append(
            f"{adata.n_obs:,} cells x {adata.n_vars} genes; {n_train} training perturbations in "
            f"{cell_type}; test {', '.join(test)}"
        )

    with log.phase(f"{label} training PT-RAG") as done:
        model = PTRAG(adata, perturbation_embeddings=embeddings)
        progress = _settings.progress_bar
        # On a terminal the model's bar shows the steps; elsewhere this phase's line does.
        _settings.progress_bar = progress and log.interactive
        t0 = time.perf_counter()
        steps = {} if max_steps is None else {"max_steps": int(max_steps)}
        try:
            model.train(**steps, split_key="split")
        finally:
            _settings.progress_bar = progress
        train_seconds = time.perf_counter() - t0
        done.append(
            f"{training_summary(model.trainer)}, kept the weights of step {model.best_step_}"
        )

    with log.phase(f"{label} prediction") as done:
        model.predict(adata, key_added="ptrag")
        for method in task.baselines:
            with warnings.catch_warnings():
                # Fallbacks are counted for the test cells in the report; the warning also
                # counts training perturbations of other cell types that are never evaluated.
                warnings.filterwarnings("ignore", message=r"Baseline '.*documented fallback")
                tl.predict_baseline(
                    adata,
                    method,
                    split_key="split",
                    gene_embeddings=embeddings,
                    key_added=method,
                    seed=seed,
                )
        done.append(f"{MODEL_NAME} and {len(task.baselines)} baselines")

    with log.phase(f"{label} save and reload") as done:
        saved = folder / FILES["model"]
        model.save(saved, overwrite=True)
        again = PTRAG.load(saved, adata).predict(adata, inplace=False)
        if not np.array_equal(again, adata.layers["ptrag"]):
            raise RuntimeError(
                f"The model reloaded from '{saved}' predicts differently from the model that was "
                f"saved (largest difference {np.max(np.abs(again - adata.layers['ptrag'])):.3g})."
            )
        done.append(f"{again.size:,} predicted values identical after reloading")

    with log.phase(f"{label} scoring") as done:
        layers = {MODEL_NAME: "ptrag", **{m: m for m in task.baselines}}
        results = pd.concat(
            [
                tl.evaluate(
                    adata,
                    pred_layer=layer,
                    split_key="split",
                    split_values=("test",),
                    method=name,
                    seed=seed,
                )
                for name, layer in layers.items()
            ],
            ignore_index=True,
        )
        summary = tl.summarize(results, by="method", metrics=list(REPORT_METRICS), seed=seed)
        retrieval = model.get_retrieval(test, cell_type=cell_type)
        results.to_csv(folder / FILES["metrics"], index=False)
        summary.to_csv(folder / FILES["summary"], index=False)
        retrieval.to_csv(folder / FILES["retrieval"], index=False)
        history_frame = pd.concat([v.astype(float) for v in model.history.values()], axis=1)
        history_frame.to_csv(folder / FILES["history"])
        _save_figures(folder, adata, model, retrieval, layers, summary)
        done.append(f"{len(layers)} methods x {len(test)} test perturbations")

    one_shift = [m for m in ONE_SHIFT_BASELINES if m in task.baselines]
    knn = knn_note(adata, cell_type)
    if knn is not None:
        one_shift.append("knn")
    return {
        "task": task,
        "cell_type": cell_type,
        "test": test,
        "n_train": n_train,
        "auto_validation": not (adata.obs["split"] == "val").any(),
        "results": results,
        "summary": summary,
        "retrieval": retrieval,
        "one_shift": one_shift,
        "notes": [n for n in (knn, fallback_note(adata, task.baselines)) if n],
        "settings": {
            "cell_type": cell_type,
            "test_perturbations": list(test),
            "validation_perturbations": list(model.validation_perturbations_),
            "steps_trained": int(model.trainer.global_step),
            "kept_weights_of_step": None if model.best_step_ is None else int(model.best_step_),
            "train_seconds": round(train_seconds, 1),
            "model": getattr(model, "_model_summary_string", type(model).__name__),
        },
    }


def _save_figures(
    folder: Path,
    adata: AnnData,
    model: PTRAG,
    retrieval: pd.DataFrame,
    layers: dict,
    summary: pd.DataFrame,
) -> None:
    """Write a task's three figures (closed, so notebooks do not show them)."""
    import matplotlib.pyplot as plt

    from . import pl

    r = method_means(summary, "pearson_delta")
    ncols = min(3, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.2 * ncols, 4.0 * nrows), squeeze=False, layout="constrained"
    )
    for ax, (name, layer) in zip(axes.ravel(), layers.items(), strict=False):
        pl.shift_scatter(
            adata, pred_layer=layer, split_key="split", overlay=True, ax=ax, show=False, **KEYS
        )
        ax.set_title(f"{name}: mean r = {r.get(name, np.nan):.2f}", fontsize="medium")
        ax.legend(fontsize="x-small", frameon=False, loc="upper left")
    for ax in axes.ravel()[len(layers) :]:
        fig.delaxes(ax)
    fig.suptitle("Predicted vs observed mean shift from control (one point per gene)")
    fig.savefig(folder / FILES["shift_figure"], dpi=110, bbox_inches="tight")
    plt.close(fig)

    drawn = [
        pl.retrieval_heatmap(retrieval, show=False, save=folder / FILES["retrieval_figure"]),
        pl.training_history(
            model, panels=["loss", "energy"], show=False, save=folder / FILES["history_figure"]
        ),
    ]
    for axes in drawn:
        plt.close((axes[0] if isinstance(axes, list) else axes).figure)
