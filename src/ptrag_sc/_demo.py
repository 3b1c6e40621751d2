"""The demo: two prediction tasks on the bundled real data, with baselines, written to a report."""

from __future__ import annotations

import contextlib
import json
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

from ._settings import settings as _settings
from ._utils import is_interactive, quiet_lightning

if TYPE_CHECKING:
    from anndata import AnnData

#: Name of the model in the tables.
MODEL_NAME = "PT-RAG"
#: Baselines that predict the same shift for every perturbation of a cell type: a
#: perturbation-specific score is undefined for them.
ONE_SHIFT_BASELINES = ("control", "context_mean")
#: Metrics of the report's tables (``split_half_pearson`` describes the data, not a method).
REPORT_METRICS = ("pearson_delta", "pearson_pert_centred", "energy", "w1", "w2", "mse", "split_half_pearson")
#: Metrics that get a sentence saying which method wins: metric -> (name, what it measures).
HEADLINE_METRICS = {
    "pearson_delta": (
        "Shift correlation",
        "Pearson correlation of the predicted and observed mean shift from control, over genes",
    ),
    "pearson_pert_centred": (
        "Perturbation-specific shift correlation",
        "the same after subtracting the mean over the test perturbations, so that a shift "
        "shared by all perturbations does not count",
    ),
    "energy": ("Energy distance", "between the predicted and the real cells, in PCA space"),
}
#: The one definition of ``split_half_pearson`` (also in ``tl.evaluate`` and the docs).
SPLIT_HALF_DEFINITION = (
    "the Pearson correlation between the mean shifts from control of two disjoint random halves "
    "of a perturbation's real cells: how noisy the observed shift is (1: no noise). It is not a "
    "ceiling for `pearson_delta`, which compares a prediction with the mean of all the real "
    "cells, less noisy than either half"
)
#: Files written per task, in ``<output>/<task>/``; the report is ``<output>/report.md``.
REPORT = "report.md"
FILES = {
    "metrics": "metrics.csv",
    "summary": "summary.csv",
    "retrieval": "retrieval.csv",
    "history": "history.csv",
    "shift_figure": "shift_scatter.png",
    "retrieval_figure": "retrieval_heatmap.png",
    "history_figure": "training_history.png",
    "model": "model",
}
#: Candidates per query in the report's retrieval table.
_RETRIEVAL_ROWS = 5
_KEYS = {"perturbation_key": "gene", "control_group": "non-targeting", "cell_type_key": "cell_line"}


@dataclass(frozen=True)
class Task:
    """One prediction task of the demo.

    ``prepare(seed)`` returns the AnnData with ``obs["split"]`` (train / val / test), the cell
    type whose test perturbations are predicted and the test perturbations.
    """

    name: str
    title: str
    question: str
    baselines: tuple[str, ...]
    prepare: Callable[[int], tuple[AnnData, str, list[str]]]


def _glioblastoma(seed: int) -> tuple[AnnData, str, list[str]]:
    from . import datasets, pp

    adata = datasets.perturbench_devel()
    test = ["MAP2K3", "MAPK1", "SGK1", "TGFBR2"]
    pp.few_shot_split(adata, held_out="U87MG", val=["PLK4"], test=test)
    return adata, "U87MG", test


def _thp1(seed: int) -> tuple[AnnData, str, list[str]]:
    from . import datasets

    adata = datasets.papalexi_thp1()
    test = datasets.papalexi_thp1_folds()[0]
    adata.obs["split"] = pd.Categorical(np.where(adata.obs["gene"].isin(test), "test", "train"))
    return adata, "THP-1", test


def _synthetic(seed: int) -> tuple[AnnData, str, list[str]]:
    from . import datasets, pp

    adata = datasets.synthetic(seed=seed, n_cells_per_perturbation=64)  # a full cell set per group
    perts = sorted(set(adata.obs["gene"].astype(str)) - {_KEYS["control_group"]})
    held_out = str(adata.obs["cell_line"].cat.categories[0])
    pp.few_shot_split(adata, held_out=held_out, val=perts[:2], test=perts[2:6])
    return adata, held_out, perts[2:6]


TASKS = {
    "glioblastoma": Task(
        name="glioblastoma",
        title="Few-shot cell line",
        question=(
            "Predict perturbations in a glioblastoma line (U87MG) in which only a few others were "
            "measured, from the same perturbations measured in two other glioblastoma lines (A172, "
            "T98G) and in K562 (bundled McFaline-Figueroa 2024 and Norman 2019 data, curated by "
            "perturbench). PLK4 in U87MG validates (chooses when to stop)."
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
        question="Predict 4 perturbations in the first of three simulated cell lines (known effects; a quick check).",
        baselines=("control", "context_mean", "other_cell_types", "linear", "knn"),
        prepare=_synthetic,
    ),
}
#: The tasks ``ptrag-sc demo`` runs by default.
DEFAULT_TASKS = ("glioblastoma", "thp1")


# ------------------------------------------------------------------ output
def planned_paths(output: Path, tasks: tuple[str, ...]) -> list[Path]:
    """Every file and folder :func:`run_demo` writes for ``tasks`` into ``output``."""
    return [output / REPORT, *(output / task / name for task in tasks for name in FILES.values())]


def prepare_output(output, tasks: tuple[str, ...], *, overwrite: bool) -> Path:
    """Check the output folder before anything runs and create it.

    Raises
    ------
    ValueError
        An empty name, an existing file, or a folder that cannot be created or written.
    FileExistsError
        Files of an earlier run are there and ``overwrite`` is False.
    """
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
        raise ValueError(f"Cannot create the output folder '{output}': {exc.strerror or exc}.") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise ValueError(f"Cannot write into the output folder '{output}': permission denied.")
    return output


class PhaseLog:
    """One line per phase on ``stream`` (default ``sys.stderr``): ``"[task] phase: outcome; 12 s"``.

    When the stream is not interactive (a log file, a pipe), the line starts when the phase
    starts and ends when it ends, so a long phase shows what runs; on a terminal, where the
    training bar draws over the line, it is written whole at the end.
    """

    def __init__(self, enabled: bool, stream=None) -> None:
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.interactive = is_interactive(self.stream)

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

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
        if early:
            print(text, file=self.stream, flush=True)
        else:
            self.line(f"{label}: {text}")


# -------------------------------------------------------------------- run
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
        Folder for ``report.md`` (a bottom line per task, then results in sentences and
        tables, linking the figures) and one subfolder per task with ``metrics.csv`` (one row
        per method, cell type and perturbation), ``summary.csv`` (means with bootstrap
        intervals), ``retrieval.csv`` (:meth:`ptrag_sc.PTRAG.get_retrieval`), ``history.csv``,
        the figures ``shift_scatter.png``, ``retrieval_heatmap.png`` and
        ``training_history.png``, and the saved model (``model/``). Other files there are
        left alone.
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
        raise ValueError(f"`tasks` must name distinct tasks of {sorted(TASKS)}, got {list(tasks)}.")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int | np.integer) or max_steps < 1):
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
        outcomes.append(_run_task(TASKS[name], output / name, max_steps=max_steps, seed=seed, log=log, label=f"[{i}/{len(tasks)} {name}]"))
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
    return pd.concat([o["summary"].assign(task=o["task"].name) for o in outcomes], ignore_index=True)


def _run_task(task: Task, folder: Path, *, max_steps: int | None, seed: int, log: PhaseLog, label: str) -> dict:
    from . import PTRAG, tl
    from .train import training_summary

    with log.phase(f"{label} data") as done:
        adata, cell_type, test = task.prepare(seed)
        embeddings = adata.uns["gene_embeddings"]
        PTRAG.setup_anndata(adata, **_KEYS)
        obs = adata.obs
        in_cell_type = (obs["cell_line"] == cell_type) & (obs["split"] == "train") & (obs["gene"] != _KEYS["control_group"])
        n_train = obs.loc[in_cell_type, "gene"].nunique()
        done.append(f"{adata.n_obs:,} cells x {adata.n_vars} genes; {n_train} training perturbations in {cell_type}; test {', '.join(test)}")

    with log.phase(f"{label} training PT-RAG") as done:
        model = PTRAG(adata, perturbation_embeddings=embeddings)
        progress = _settings.progress_bar
        # On a terminal the model's bar shows the steps; elsewhere this phase's line does.
        _settings.progress_bar = progress and log.interactive
        t0 = time.perf_counter()
        try:
            if max_steps is None:
                model.train(split_key="split")
            else:
                model.train(max_steps=int(max_steps), split_key="split")
        finally:
            _settings.progress_bar = progress
        train_seconds = time.perf_counter() - t0
        done.append(f"{training_summary(model.trainer)}, kept the weights of step {model.best_step_}")

    with log.phase(f"{label} prediction") as done:
        model.predict(adata, key_added="ptrag")
        for method in task.baselines:
            with warnings.catch_warnings():
                # Fallbacks are counted for the test cells in the report; the warning also
                # counts training perturbations of other cell types that are never evaluated.
                warnings.filterwarnings("ignore", message=r"Baseline '.*documented fallback")
                tl.predict_baseline(adata, method, split_key="split", gene_embeddings=embeddings, key_added=method, seed=seed)
        done.append(f"{MODEL_NAME} and {len(task.baselines)} baselines")

    with log.phase(f"{label} save and reload") as done:
        model.save(folder / FILES["model"], overwrite=True)
        reloaded = PTRAG.load(folder / FILES["model"], adata)
        again = reloaded.predict(adata, inplace=False)
        if not np.array_equal(again, adata.layers["ptrag"]):
            raise RuntimeError(
                f"The model reloaded from '{folder / FILES['model']}' predicts differently from the model "
                f"that was saved (largest difference {np.max(np.abs(again - adata.layers['ptrag'])):.3g})."
            )
        done.append(f"{again.size:,} predicted values identical after reloading")

    with log.phase(f"{label} scoring") as done:
        layers = {MODEL_NAME: "ptrag", **{m: m for m in task.baselines}}
        results = pd.concat(
            [
                tl.evaluate(adata, pred_layer=layer, split_key="split", split_values=("test",), method=name, seed=seed)
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
        _save_figures(folder, adata=adata, model=model, retrieval=retrieval, layers=layers, summary=summary)
        done.append(f"{len(layers)} methods x {len(test)} test perturbations")

    one_shift = [m for m in ONE_SHIFT_BASELINES if m in task.baselines]
    knn = _knn_note(adata, cell_type)
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
        "notes": [n for n in (knn, _fallback_note(adata, task.baselines)) if n],
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


# ------------------------------------------------------------------ figures
def _save_figures(folder: Path, *, adata: AnnData, model, retrieval: pd.DataFrame, layers: dict, summary: pd.DataFrame) -> None:
    """Write the three figures of a task (closed afterwards, so notebooks do not show them)."""
    import matplotlib.pyplot as plt

    from . import pl

    r = _means(summary, "pearson_delta")
    ncols = min(3, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.0 * nrows), squeeze=False, layout="constrained")
    for ax, (name, layer) in zip(axes.ravel(), layers.items(), strict=False):
        pl.shift_scatter(adata, pred_layer=layer, split_key="split", overlay=True, ax=ax, show=False, **_KEYS)
        ax.set_title(f"{name}: mean r = {r.get(name, np.nan):.2f}", fontsize="medium")
        ax.legend(fontsize="x-small", frameon=False, loc="upper left")
    for ax in axes.ravel()[len(layers) :]:
        fig.delaxes(ax)
    fig.suptitle("Predicted vs observed mean shift from control (one point per gene)")
    fig.savefig(folder / FILES["shift_figure"], dpi=110, bbox_inches="tight")
    plt.close(fig)

    drawn = [
        pl.retrieval_heatmap(retrieval, show=False, save=folder / FILES["retrieval_figure"]),
        pl.training_history(model, panels=["loss", "energy"], show=False, save=folder / FILES["history_figure"]),
    ]
    for axes in drawn:
        plt.close((axes[0] if isinstance(axes, list) else axes).figure)


# ------------------------------------------------------------------- report
def _means(summary: pd.DataFrame, metric: str) -> pd.Series:
    return summary[summary["metric"] == metric].set_index("method")["mean"].dropna()


def _lower_is_better(metric: str) -> bool:
    from .tl import LOWER_IS_BETTER

    return metric in LOWER_IS_BETTER


def _paired_difference(results: pd.DataFrame, metric: str, a: str, b: str, seed: int) -> tuple[float, float, float]:
    """Mean and 95% bootstrap CI of ``metric(a) - metric(b)`` over the shared (cell type, perturbation) rows."""
    from .tl import summarize

    groups = [_KEYS["cell_type_key"], _KEYS["perturbation_key"]]
    wide = results.pivot_table(index=groups, columns="method", values=metric, aggfunc="first")[[a, b]].dropna()
    diff = pd.DataFrame({"method": f"{a} - {b}", "difference": (wide[a] - wide[b]).to_numpy()})
    row = summarize(diff, by="method", metrics=["difference"], seed=seed).iloc[0]
    return float(row["mean"]), float(row["ci_low"]), float(row["ci_high"])


def headline_sentence(
    results: pd.DataFrame, summary: pd.DataFrame, metric: str, *, seed: int = 0, one_shift: tuple[str, ...] | list[str] = ()
) -> str:
    """One plain sentence: which method wins on ``metric``, by how much and over how many
    perturbations, or which methods tie.

    The best mean wins; every other method whose paired difference from it (over the same
    cell type and perturbation rows) has a 95% bootstrap interval containing 0 ties with it.
    For ``pearson_pert_centred`` the ``one_shift`` methods (one predicted shift for every
    perturbation) are not ranked, and when no other method's own 95% interval lies above 0 the
    sentence says that no method has perturbation-specific signal.
    """
    lower = _lower_is_better(metric)
    name = HEADLINE_METRICS[metric][0] if metric in HEADLINE_METRICS else metric
    rows = summary[summary["metric"] == metric].set_index("method")
    n = int(rows["n"].max()) if len(rows) else 0
    label = f"**{name}** (`{metric}`, {'lower' if lower else 'higher'} is better; n = {n} test perturbations)"
    excluded = ""
    if metric == "pearson_pert_centred":
        shown = [m for m in one_shift if m in rows.index]
        rows = rows.drop(index=shown)
        if shown:
            excluded = (
                f" It is undefined for {_join(shown)}, which predict{'s' if len(shown) == 1 else ''} one shift "
                "for every perturbation, so they are not ranked."
            )
    means = rows["mean"].dropna()
    if means.empty:
        return f"{label}: no method could be scored.{excluded}"
    ranked = means.sort_values(ascending=lower)
    best = str(ranked.index[0])
    if metric == "pearson_pert_centred" and not (rows["ci_low"] > 0).any():
        return (
            f"{label}: no method has perturbation-specific signal here: no method's 95% bootstrap "
            f"interval lies above 0 (the highest is {best} with {ranked[best]:.3f} "
            f"[{rows.at[best, 'ci_low']:.3f}, {rows.at[best, 'ci_high']:.3f}]).{excluded}"
        )
    if len(ranked) == 1:
        return f"{label}: only {best} was scored ({ranked.iloc[0]:.3f}).{excluded}"
    tied, intervals = [], {}
    for other in ranked.index[1:]:
        intervals[other] = _paired_difference(results, metric, best, str(other), seed)
        _, lo, hi = intervals[other]
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo <= 0 <= hi:
            tied.append(str(other))
    if not tied:
        runner = str(ranked.index[1])
        diff, lo, hi = intervals[runner]
        sentence = (
            f"{label}: **{best}** wins with {ranked[best]:.3f}, {abs(diff):.3f} "
            f"{'below' if lower else 'above'} the next best, {runner} ({ranked[runner]:.3f}); "
            f"the 95% bootstrap interval of the paired difference, [{lo:.3f}, {hi:.3f}], excludes 0."
        )
    else:
        group = [best, *tied]
        names = ", ".join(f"**{m}** ({ranked[m]:.3f})" for m in group[:-1]) + f" and **{group[-1]}** ({ranked[group[-1]]:.3f})"
        largest = max(abs(intervals[m][0]) for m in tied)
        no_ci = [m for m in tied if not np.isfinite(intervals[m][1])]
        why = (
            "too few test perturbations for a bootstrap interval"
            if no_ci
            else f"the differences from {best} (up to {largest:.3f}) lie inside their 95% bootstrap intervals"
        )
        sentence = f"{label}: a tie between {names}: {why}."
    if MODEL_NAME in means.index and MODEL_NAME != best and MODEL_NAME not in tied:
        gap = abs(ranked[MODEL_NAME] - ranked[best])
        sentence += f" {MODEL_NAME} scores {ranked[MODEL_NAME]:.3f}, {gap:.3f} {'above' if lower else 'below'} the best."
    return sentence + excluded


def _join(names: list[str]) -> str:
    quoted = [f"`{n}`" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" and {quoted[-1]}"


def _knn_note(adata: AnnData, held_out: str) -> str | None:
    """Say when ``knn`` equals ``context_mean``: k covers every training perturbation."""
    info = adata.uns.get("knn", {})
    k = int(info.get("options", {}).get("k", 5))
    obs = adata.obs
    train = (obs["split"].astype(str) == "train") & (obs[_KEYS["perturbation_key"]].astype(str) != _KEYS["control_group"])
    n_train = obs.loc[train & (obs[_KEYS["cell_type_key"]].astype(str) == held_out), _KEYS["perturbation_key"]].nunique()
    if n_train > k:
        return None
    return (
        f"`knn` equals `context_mean` here: it averages the shifts of the k = {k} training "
        f"perturbations of {held_out} closest in gene-embedding space, and {held_out} has only "
        f"{n_train} training perturbation{'s' if n_train != 1 else ''}, so it averages all of "
        "them, which is the context mean."
    )


def _fallback_note(adata: AnnData, baselines: tuple[str, ...]) -> str | None:
    """Name the baselines that used their documented fallback for some test cells."""
    test = adata.obs["split"].astype(str).to_numpy() == "test"
    used = {}
    for method in baselines:
        column = f"{method}_fallback"
        if column in adata.obs:
            n = int(adata.obs[column].to_numpy(dtype=bool)[test].sum())
            if n:
                used[method] = n
    if not used:
        return None
    listed = ", ".join(f"`{m}` ({n} cells)" for m, n in used.items())
    return (
        f"Some test cells could not be predicted as the baseline intends and used its documented "
        f"fallback (see `ptrag_sc.tl.predict_baseline`): {listed}."
    )


def bottom_line(outcome: dict, *, seed: int) -> list[str]:
    """The headline sentences of one task (one per metric of :data:`HEADLINE_METRICS`)."""
    return [
        headline_sentence(outcome["results"], outcome["summary"], metric, seed=seed, one_shift=outcome["one_shift"])
        for metric in HEADLINE_METRICS
    ]


def bottom_line_text(report_path: str | Path) -> str:
    """The "Bottom line" section of a written report, as plain text (for the terminal)."""
    text = Path(report_path).read_text()
    section = text.split("## Bottom line", 1)[1].split("\n## ", 1)[0]
    return "Bottom line\n" + section.replace("**", "").replace("`", "").strip()


def report(outcomes: list[dict], *, settings: dict, seed: int) -> str:
    """The text of ``report.md``."""
    lines = ["# ptrag_sc demo report", "", "## Bottom line", ""]
    for outcome in outcomes:
        task = outcome["task"]
        lines += [f"**{task.title}** ({task.name}: {len(outcome['test'])} test perturbations in {outcome['cell_type']}):", ""]
        lines += [f"- {sentence}" for sentence in bottom_line(outcome, seed=seed)]
        lines.append("")
    lines += [
        "A difference counts as a win only when the 95% bootstrap interval of the paired "
        "difference (same cell type and perturbation, resampled over the n test perturbations) "
        "excludes 0; otherwise it is a tie. With n = 4 or 5 these intervals are rough.",
        "",
    ]
    for i, outcome in enumerate(outcomes, 1):
        lines += _task_section(i, outcome)
    lines += [
        "## Settings",
        "",
        "```json",
        json.dumps(settings, indent=2),
        "```",
        "",
        "## Files",
        "",
        "One folder per task, each with "
        f"`{FILES['metrics']}` (one row per method, cell type and perturbation), "
        f"`{FILES['summary']}` (means and bootstrap intervals), `{FILES['retrieval']}` "
        f"(every retrieved candidate), `{FILES['history']}`, the figures, and the saved model "
        f"`{FILES['model']}/` (`ptrag_sc.PTRAG.load(\"<task>/{FILES['model']}\", adata)`).",
        "",
    ]
    return "\n".join(lines)


def _task_section(number: int, outcome: dict) -> list[str]:
    task, summary, results = outcome["task"], outcome["summary"], outcome["results"]
    folder = task.name
    methods = list(dict.fromkeys(results["method"]))
    table = summary.assign(value=[f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in summary[["mean", "ci_low", "ci_high"]].to_numpy()])
    one_shift = outcome["one_shift"]
    table.loc[(table["metric"] == "pearson_pert_centred") & table["method"].isin(one_shift), "value"] = "undefined"
    wide = table.pivot(index="method", columns="metric", values="value").reindex(methods)
    wide = wide[[m for m in REPORT_METRICS if m in wide.columns and m != "split_half_pearson"]]
    n = int(summary["n"].max())
    lines = [
        f"## {number}. {task.title} ({task.name})",
        "",
        task.question,
        "",
        f"Test perturbations in {outcome['cell_type']} (n = {len(outcome['test'])}): {', '.join(outcome['test'])}. "
        f"Other perturbations of {outcome['cell_type']} in the training split: {outcome['n_train']}. "
        f"Validation (chooses when to stop): {', '.join(outcome['settings']['validation_perturbations'])}"
        + (" (held out from the training split by the model itself)." if outcome["auto_validation"] else "."),
        "",
        f"Every method is scored by `ptrag_sc.tl.evaluate` on the same test cells. Values are means "
        f"over the n = {n} test perturbations with a 95% bootstrap interval in brackets (the n values "
        "resampled). Higher is better for the Pearson correlations, lower for the distances "
        "(`energy`, `w1`, `w2`) and `mse`."
        + (
            f" `pearson_pert_centred` is undefined for {_join(one_shift)}: "
            f"{'it predicts' if len(one_shift) == 1 else 'they predict'} one shift for every perturbation."
            if one_shift
            else ""
        ),
        "",
        _markdown(wide.reset_index()),
        "",
    ]
    split_half = summary[summary["metric"] == "split_half_pearson"]
    if not split_half.empty:
        row = split_half.iloc[0]
        r = _means(summary, "pearson_delta")
        above = int((r > row["mean"]).sum())
        lines += [
            f"**How noisy is the observed shift?** `split_half_pearson` = {row['mean']:.3f} "
            f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] (n = {int(row['n'])}) is "
            f"{SPLIT_HALF_DEFINITION}: {above} of {len(r)} methods score above it here.",
            "",
        ]
    for note in outcome["notes"]:
        lines += [note, ""]
    shift, heatmap, history = (f"{folder}/{FILES[k]}" for k in ("shift_figure", "retrieval_figure", "history_figure"))
    lines += [
        f"![Predicted vs observed mean shift]({shift})",
        "",
        f"[`{shift}`]({shift}): predicted vs observed mean shift from control, one point per gene and "
        "one colour per test perturbation; one panel per method, with its mean `pearson_delta` in "
        "the title. The dashed line is y = x.",
        "",
        f"![Retrieval heatmap]({heatmap})",
        "",
        f"[`{heatmap}`]({heatmap}): for each test perturbation in {outcome['cell_type']} (rows), the "
        "stage-1 candidates (columns, \"gene @ cell type\") coloured by the stage-2 keep "
        "probability; dots mark the candidates kept for most cells. A white cell is a candidate "
        "that stage 1 did not retrieve for that query (each query retrieves its own nearest "
        "candidates; the columns are their union).",
        "",
        _retrieval_table(outcome["retrieval"], folder),
        "",
        f"![Training history]({history})",
        "",
        f"[`{history}`]({history}): the training objective (`loss`: `train_loss` per interval, "
        "`validation_loss` at each check) and the energy distance over epochs (one epoch is one "
        "check interval); the dotted line marks the check with the lowest `validation_loss`, "
        f"whose weights were kept (step {outcome['settings']['kept_weights_of_step']}).",
        "",
    ]
    return lines


def _retrieval_table(retrieval: pd.DataFrame, folder: str) -> str:
    """The candidates with the highest keep probability per query, with their cell type."""
    cols = [
        c
        for c in ("query", "rank", "candidate", "candidate_cell_type", "similarity", "keep_probability", "selected_fraction")
        if c in retrieval.columns
    ]
    order = [c for c in ("keep_probability", "rank") if c in retrieval.columns]
    top = (
        retrieval.sort_values(order, ascending=[False, True][: len(order)], kind="stable")
        .groupby("query", sort=False)
        .head(_RETRIEVAL_ROWS)
    )
    queries = list(dict.fromkeys(retrieval["query"]))
    top = top.assign(_q=top["query"].map({q: i for i, q in enumerate(queries)})).sort_values("_q", kind="stable")
    frame = top[cols].reset_index(drop=True)
    for c in ("similarity", "keep_probability", "selected_fraction"):
        if c in frame:
            frame[c] = [f"{v:.3f}" if np.isfinite(v) else "" for v in frame[c].astype(float)]
    if "rank" in frame:
        frame["rank"] = [str(int(v)) if np.isfinite(v) else "" for v in frame["rank"].astype(float)]
    intro = (
        f"The {_RETRIEVAL_ROWS} candidates with the highest stage-2 keep probability per query "
        "(mean over control cells; `selected_fraction`: the fraction of cells that keep it, a "
        "candidate counts as kept when it is above 0.5), with their stage-1 rank and cosine "
        "similarity. `candidate_cell_type` is the cell type in which the candidate's response "
        f"was measured. Every candidate: `{folder}/{FILES['retrieval']}`."
    )
    return intro + "\n\n" + _markdown(frame)


def _markdown(frame: pd.DataFrame) -> str:
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return ""
        text = str(v).replace("|", "\\|")
        # "<context mean>" would read as an HTML tag
        return f"`{text}`" if "<" in text or ">" in text else text

    header = "| " + " | ".join(map(cell, frame.columns)) + " |"
    rule = "|" + "|".join(["---"] * frame.shape[1]) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.to_numpy()]
    return "\n".join([header, rule, *rows])
