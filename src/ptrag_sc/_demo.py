"""The demo: few-shot prediction on the bundled real data, with baselines, written to a report."""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._settings import settings as _settings
from ._utils import quiet_lightning

if TYPE_CHECKING:
    from anndata import AnnData

#: Few-shot protocol of the demo (SPEC: glioblastoma lines, one held out).
HELD_OUT_LINE = "U87MG"
VALIDATION = ["PLK4"]
TEST = ["MAP2K3", "MAPK1", "SGK1", "TGFBR2"]
BASELINE_METHODS = ("control", "context_mean", "other_cell_types", "linear", "knn")
#: Name of the model in the tables.
MODEL_NAME = "PT-RAG"
#: Metrics of the report's table (``split_half_pearson`` describes the data, not a method).
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
#: Files written by :func:`run_demo` (relative to the output folder).
FILES = {
    "report": "report.md",
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


def run_demo(
    output: str | Path = "demo_output",
    *,
    dataset: str = "perturbench_devel",
    max_steps: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Train PT-RAG, predict held-out perturbations, evaluate against baselines, write a report.

    Running it again into the same folder overwrites the files it wrote before.

    Parameters
    ----------
    output
        Folder for ``report.md`` (results in sentences and tables, linking the figures),
        ``metrics.csv`` (one row per method, cell type and perturbation), ``summary.csv``
        (means with bootstrap CIs), ``retrieval.csv`` (:meth:`ptrag_sc.PTRAG.get_retrieval`),
        ``history.csv``, the figures ``shift_scatter.png`` (predicted vs observed mean shift,
        one panel per method), ``retrieval_heatmap.png`` and ``training_history.png``, and the
        saved model (``model/``).
    dataset
        ``"perturbench_devel"`` (the bundled real data; the glioblastoma line ``U87MG`` is the
        held-out line, with MAP2K3, MAPK1, SGK1 and TGFBR2 as test perturbations and PLK4 for
        validation) or ``"synthetic"`` (three cell lines; four perturbations of the first held
        out).
    max_steps
        Training steps; ``None`` (default) trains for the model's default length
        (``model.train(split_key="split")``).
    seed
        Seed (``scvi.settings.seed``, the baselines' control matching and the bootstrap).

    Returns
    -------
    The summary table (``method, metric, n, mean, std, ci_low, ci_high``).
    """
    if max_steps is not None and (isinstance(max_steps, bool) or int(max_steps) != max_steps or max_steps < 1):
        raise ValueError(f"`max_steps` must be a positive integer or None, got {max_steps!r}.")
    if dataset not in ("perturbench_devel", "synthetic"):
        raise ValueError(f"`dataset` must be 'perturbench_devel' or 'synthetic', got {dataset!r}.")
    import scvi

    from . import PTRAG, datasets, pp, tl

    start = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    quiet = _quiet()
    with quiet_lightning(quiet):  # Lightning's "Seed set to 0"
        scvi.settings.seed = seed
    if dataset == "perturbench_devel":
        adata = datasets.perturbench_devel()
        held_out, val, test = HELD_OUT_LINE, VALIDATION, TEST
    else:
        adata = datasets.synthetic(seed=seed)
        perts = sorted(set(adata.obs["gene"].astype(str)) - {"non-targeting"})
        held_out = str(adata.obs["cell_line"].cat.categories[0])
        val, test = perts[:2], perts[2:6]
    pp.few_shot_split(adata, held_out=held_out, val=val, test=test)
    embeddings = adata.uns["gene_embeddings"]

    PTRAG.setup_anndata(adata, **_KEYS)
    model = PTRAG(adata, perturbation_embeddings=embeddings)
    t0 = time.perf_counter()
    if max_steps is None:
        model.train(split_key="split")
    else:
        model.train(max_steps=int(max_steps), split_key="split")
    train_seconds = time.perf_counter() - t0
    model.predict(adata, key_added="ptrag")
    model.save(output / FILES["model"], overwrite=True)

    for method in BASELINE_METHODS:
        with warnings.catch_warnings():
            if quiet:
                # Fallbacks are counted for the test cells in the report; the warning also
                # counts training perturbations of other cell types that are never evaluated.
                warnings.filterwarnings("ignore", message=r"Baseline '.*documented fallback")
            tl.predict_baseline(adata, method, split_key="split", gene_embeddings=embeddings, key_added=method, seed=seed)
    layers = {MODEL_NAME: "ptrag", **{m: m for m in BASELINE_METHODS}}
    results = pd.concat(
        [
            tl.evaluate(adata, pred_layer=layer, split_key="split", split_values=("test",), method=name, seed=seed)
            for name, layer in layers.items()
        ],
        ignore_index=True,
    )
    summary = tl.summarize(results, by="method", metrics=list(REPORT_METRICS), seed=seed)
    retrieval = model.get_retrieval(test, cell_type=held_out)

    results.to_csv(output / FILES["metrics"], index=False)
    summary.to_csv(output / FILES["summary"], index=False)
    retrieval.to_csv(output / FILES["retrieval"], index=False)
    history = model.history
    history_frame = pd.concat([v.astype(float) for v in history.values()], axis=1)
    history_frame.to_csv(output / FILES["history"])
    _save_figures(output, adata=adata, model=model, retrieval=retrieval, layers=layers, summary=summary)

    best_epoch = getattr(model, "best_epoch_", None)
    settings = {
        "dataset": dataset,
        "held_out_cell_line": held_out,
        "validation_perturbations": list(val),
        "test_perturbations": list(test),
        "max_steps": "model default" if max_steps is None else int(max_steps),
        "epochs_trained": len(history_frame),
        "kept_weights_of_epoch": None if best_epoch is None else int(best_epoch),
        "seed": seed,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "model": getattr(model, "_model_summary_string", type(model).__name__),
    }
    notes = [n for n in (_knn_note(adata, held_out), _fallback_note(adata)) if n]
    (output / FILES["report"]).write_text(
        _report(summary=summary, results=results, retrieval=retrieval, held_out=held_out, notes=notes, settings=settings, seed=seed)
    )
    return summary


def _quiet() -> bool:
    """The package's verbosity rule: Lightning's messages only at ``logging.INFO`` or below."""
    return _settings.verbosity > logging.INFO


# ------------------------------------------------------------------ figures
def _save_figures(output: Path, *, adata: AnnData, model, retrieval: pd.DataFrame, layers: dict, summary: pd.DataFrame) -> None:
    """Write the three figures of the report (closed afterwards, so notebooks do not show them)."""
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
    fig.savefig(output / FILES["shift_figure"], dpi=110, bbox_inches="tight")
    plt.close(fig)

    drawn = [
        pl.retrieval_heatmap(retrieval, show=False, save=output / FILES["retrieval_figure"]),
        pl.training_history(model, show=False, save=output / FILES["history_figure"]),
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


def headline_sentence(results: pd.DataFrame, summary: pd.DataFrame, metric: str, *, seed: int = 0) -> str:
    """One plain sentence: which method wins on ``metric`` and by how much, or which tie.

    The best mean wins; every other method whose paired difference from it (over the same
    cell type and perturbation rows) has a 95% bootstrap interval containing 0 ties with it.
    """
    means = _means(summary, metric)
    lower = _lower_is_better(metric)
    direction = "lower" if lower else "higher"
    name = HEADLINE_METRICS[metric][0] if metric in HEADLINE_METRICS else metric
    label = f"**{name}** (`{metric}`, {direction} is better)"
    if means.empty:
        return f"{label}: no method could be scored."
    ranked = means.sort_values(ascending=lower)
    best = str(ranked.index[0])
    if len(ranked) == 1:
        return f"{label}: only {best} was scored ({ranked.iloc[0]:.3f})."
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
    return sentence


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


def _fallback_note(adata: AnnData) -> str | None:
    """Name the baselines that used their documented fallback for some test cells."""
    test = adata.obs["split"].astype(str).to_numpy() == "test"
    used = {}
    for method in BASELINE_METHODS:
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


def _report(
    *,
    summary: pd.DataFrame,
    results: pd.DataFrame,
    retrieval: pd.DataFrame,
    held_out: str,
    notes: list[str],
    settings: dict,
    seed: int,
) -> str:
    methods = list(dict.fromkeys(results["method"]))
    table = summary.assign(value=[f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in summary[["mean", "ci_low", "ci_high"]].to_numpy()])
    wide = table.pivot(index="method", columns="metric", values="value").reindex(methods)
    wide = wide[[m for m in REPORT_METRICS if m in wide.columns and m != "split_half_pearson"]]

    lines = [
        "# ptrag_sc demo report",
        "",
        f"Few-shot prediction of held-out perturbations in a held-out cell line ({held_out}): "
        "every method is scored by `ptrag_sc.tl.evaluate` on the same test cells. Values are means "
        "over the test perturbations with a 95% bootstrap interval in brackets. Higher is better "
        "for the Pearson correlations, lower for the distances (`energy`, `w1`, `w2`) and `mse`.",
        "",
        "## Results",
        "",
        _markdown(wide.reset_index()),
        "",
        *[f"- {headline_sentence(results, summary, m, seed=seed)}" for m in HEADLINE_METRICS],
        "",
        "A difference counts as a win only when the 95% bootstrap interval of the paired "
        "difference (same cell type and perturbation) excludes 0; otherwise it is a tie.",
        "",
    ]
    split_half = summary[summary["metric"] == "split_half_pearson"]
    if not split_half.empty:
        row = split_half.iloc[0]
        r = _means(summary, "pearson_delta")
        above = int((r > row["mean"]).sum())
        lines += [
            f"**How noisy is the observed shift?** The split-half agreement, "
            f"`split_half_pearson` = {row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}], "
            "is the Pearson correlation between the mean shifts of two disjoint random halves of "
            "the real cells of each test perturbation: it describes the data (how much of the "
            "observed shift is noise; 1 means noiseless), not a method. It is not a ceiling for "
            "`pearson_delta`, which compares a prediction with the mean of all the real cells "
            f"(less noisy than either half): {above} of {len(r)} methods score above it here.",
            "",
        ]
    for note in notes:
        lines += [note, ""]
    lines += [
        f"![Predicted vs observed mean shift]({FILES['shift_figure']})",
        "",
        f"[`{FILES['shift_figure']}`]({FILES['shift_figure']}): predicted vs observed mean shift "
        "from control, one point per gene and one colour per test perturbation; one panel per "
        "method, with its mean `pearson_delta` in the title. The dashed line is y = x.",
        "",
        "## Retrieval",
        "",
        f"![Retrieval heatmap]({FILES['retrieval_figure']})",
        "",
        f"[`{FILES['retrieval_figure']}`]({FILES['retrieval_figure']}): for each test "
        f"perturbation in {held_out} (rows), the stage-1 candidates (columns, \"gene @ cell "
        "type\") coloured by the stage-2 keep probability; dots mark the candidates kept for "
        "most cells.",
        "",
        _retrieval_table(retrieval),
        "",
        "## Training",
        "",
        f"![Training history]({FILES['history_figure']})",
        "",
        f"[`{FILES['history_figure']}`]({FILES['history_figure']}): training and validation "
        "energy distance over epochs; the dotted line marks the epoch whose weights were kept.",
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(settings, indent=2),
        "```",
        "",
        "## Files",
        "",
        f"`{FILES['metrics']}` (one row per method, cell type and perturbation), "
        f"`{FILES['summary']}` (means and bootstrap intervals), `{FILES['retrieval']}` "
        f"(every retrieved candidate), `{FILES['history']}`, and the saved model `{FILES['model']}/` "
        f"(`ptrag_sc.PTRAG.load(\"{FILES['model']}\", adata)`).",
        "",
    ]
    return "\n".join(lines)


def _retrieval_table(retrieval: pd.DataFrame) -> str:
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
        f"was measured. Every candidate: `{FILES['retrieval']}`."
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
