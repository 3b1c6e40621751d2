"""The text of the demo's report: headline sentences, tables and notes (``report.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData

#: Name of the model in the tables.
MODEL_NAME = "PT-RAG"
#: Metrics of the report's tables (``split_half_pearson`` describes the data, not a method).
REPORT_METRICS = (
    "pearson_delta",
    "pearson_pert_centred",
    "energy",
    "w1",
    "w2",
    "mse",
    "split_half_pearson",
)
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
RETRIEVAL_ROWS = 5
KEYS = {"perturbation_key": "gene", "control_group": "non-targeting", "cell_type_key": "cell_line"}


def method_means(summary: pd.DataFrame, metric: str) -> pd.Series:
    return summary[summary["metric"] == metric].set_index("method")["mean"].dropna()


def _lower_is_better(metric: str) -> bool:
    from .tl import LOWER_IS_BETTER

    return metric in LOWER_IS_BETTER


def _paired_difference(
    results: pd.DataFrame, metric: str, a: str, b: str, seed: int
) -> tuple[float, float, float]:
    """Mean and 95% bootstrap CI of ``metric(a) - metric(b)`` over the shared (cell type,
    perturbation) rows."""
    from .tl import summarize

    groups = [KEYS["cell_type_key"], KEYS["perturbation_key"]]
    wide = results.pivot_table(index=groups, columns="method", values=metric, aggfunc="first")[
        [a, b]
    ].dropna()
    diff = pd.DataFrame({"method": f"{a} - {b}", "difference": (wide[a] - wide[b]).to_numpy()})
    row = summarize(diff, by="method", metrics=["difference"], seed=seed).iloc[0]
    return float(row["mean"]), float(row["ci_low"]), float(row["ci_high"])


def headline_sentence(
    results: pd.DataFrame,
    summary: pd.DataFrame,
    metric: str,
    *,
    seed: int = 0,
    one_shift: tuple[str, ...] | list[str] = (),
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
    direction = "lower" if lower else "higher"
    label = f"**{name}** (`{metric}`, {direction} is better; n = {n} test perturbations)"
    excluded = ""
    if metric == "pearson_pert_centred":
        shown = [m for m in one_shift if m in rows.index]
        rows = rows.drop(index=shown)
        if shown:
            excluded = (
                f" It is undefined for {_join(shown)}, which "
                f"predict{'s' if len(shown) == 1 else ''} one shift "
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
            f"the 95% bootstrap interval of the paired difference, [{lo:.3f}, {hi:.3f}], excludes "
            "0."
        )
    else:
        group = [best, *tied]
        names = (
            ", ".join(f"**{m}** ({ranked[m]:.3f})" for m in group[:-1])
            + f" and **{group[-1]}** ({ranked[group[-1]]:.3f})"
        )
        largest = max(abs(intervals[m][0]) for m in tied)
        no_ci = [m for m in tied if not np.isfinite(intervals[m][1])]
        why = (
            "too few test perturbations for a bootstrap interval"
            if no_ci
            else f"the differences from {best} (up to {largest:.3f}) lie inside their 95% "
            "bootstrap intervals"
        )
        sentence = f"{label}: a tie between {names}: {why}."
    if MODEL_NAME in means.index and MODEL_NAME != best and MODEL_NAME not in tied:
        gap = abs(ranked[MODEL_NAME] - ranked[best])
        side = "above" if lower else "below"
        sentence += f" {MODEL_NAME} scores {ranked[MODEL_NAME]:.3f}, {gap:.3f} {side} the best."
    return sentence + excluded


def _join(names: list[str]) -> str:
    quoted = [f"`{n}`" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" and {quoted[-1]}"


def knn_note(adata: AnnData, held_out: str) -> str | None:
    """Say when ``knn`` equals ``context_mean``: k covers every training perturbation."""
    info = adata.uns.get("knn", {})
    k = int(info.get("options", {}).get("k", 5))
    obs = adata.obs
    train = (obs["split"].astype(str) == "train") & (
        obs[KEYS["perturbation_key"]].astype(str) != KEYS["control_group"]
    )
    n_train = obs.loc[
        train & (obs[KEYS["cell_type_key"]].astype(str) == held_out), KEYS["perturbation_key"]
    ].nunique()
    if n_train > k:
        return None
    return (
        f"`knn` equals `context_mean` here: it averages the shifts of the k = {k} training "
        f"perturbations of {held_out} closest in gene-embedding space, and {held_out} has only "
        f"{n_train} training perturbation{'s' if n_train != 1 else ''}, so it averages all of "
        "them, which is the context mean."
    )


def fallback_note(adata: AnnData, baselines: tuple[str, ...]) -> str | None:
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
        headline_sentence(
            outcome["results"],
            outcome["summary"],
            metric,
            seed=seed,
            one_shift=outcome["one_shift"],
        )
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
        lines += [
            f"**{task.title}** ({task.name}: {len(outcome['test'])} test perturbations in "
            f"{outcome['cell_type']}):",
            "",
        ]
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
        f'`{FILES["model"]}/` (`ptrag_sc.PTRAG.load("<task>/{FILES["model"]}", adata)`).',
        "",
    ]
    return "\n".join(lines)


def _task_section(number: int, outcome: dict) -> list[str]:
    task, summary, results = outcome["task"], outcome["summary"], outcome["results"]
    folder = task.name
    methods = list(dict.fromkeys(results["method"]))
    table = summary.assign(
        value=[
            f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
            for m, lo, hi in summary[["mean", "ci_low", "ci_high"]].to_numpy()
        ]
    )
    one_shift = outcome["one_shift"]
    table.loc[
        (table["metric"] == "pearson_pert_centred") & table["method"].isin(one_shift), "value"
    ] = "undefined"
    wide = table.pivot(index="method", columns="metric", values="value").reindex(methods)
    wide = wide[[m for m in REPORT_METRICS if m in wide.columns and m != "split_half_pearson"]]
    n = int(summary["n"].max())
    lines = [
        f"## {number}. {task.title} ({task.name})",
        "",
        task.question,
        "",
        f"Test perturbations in {outcome['cell_type']} (n = {len(outcome['test'])}): "
        f"{', '.join(outcome['test'])}. "
        f"Other perturbations of {outcome['cell_type']} in the training split: "
        f"{outcome['n_train']}. "
        "Validation (chooses when to stop): "
        f"{', '.join(outcome['settings']['validation_perturbations'])}"
        + (
            " (held out from the training split by the model itself)."
            if outcome["auto_validation"]
            else "."
        ),
        "",
        "Every method is scored by `ptrag_sc.tl.evaluate` on the same test cells. Values are "
        "means "
        f"over the n = {n} test perturbations with a 95% bootstrap interval in brackets (the n "
        "values "
        "resampled). Higher is better for the Pearson correlations, lower for the distances "
        "(`energy`, `w1`, `w2`) and `mse`."
        + (
            f" `pearson_pert_centred` is undefined for {_join(one_shift)}: "
            f"{'it predicts' if len(one_shift) == 1 else 'they predict'} one shift for every "
            "perturbation."
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
        r = method_means(summary, "pearson_delta")
        above = int((r > row["mean"]).sum())
        lines += [
            f"**How noisy is the observed shift?** `split_half_pearson` = {row['mean']:.3f} "
            f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] (n = {int(row['n'])}) is "
            f"{SPLIT_HALF_DEFINITION}: {above} of {len(r)} methods score above it here.",
            "",
        ]
    for note in outcome["notes"]:
        lines += [note, ""]
    shift, heatmap, history = (
        f"{folder}/{FILES[k]}" for k in ("shift_figure", "retrieval_figure", "history_figure")
    )
    lines += [
        f"![Predicted vs observed mean shift]({shift})",
        "",
        f"[`{shift}`]({shift}): predicted vs observed mean shift from control, one point per gene "
        "and "
        "one colour per test perturbation; one panel per method, with its mean `pearson_delta` in "
        "the title. The dashed line is y = x.",
        "",
        f"![Retrieval heatmap]({heatmap})",
        "",
        f"[`{heatmap}`]({heatmap}): for each test perturbation in {outcome['cell_type']} (rows), "
        "the "
        'stage-1 candidates (columns, "gene @ cell type") coloured by the stage-2 keep '
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
        for c in (
            "query",
            "rank",
            "candidate",
            "candidate_cell_type",
            "similarity",
            "keep_probability",
            "selected_fraction",
        )
        if c in retrieval.columns
    ]
    order = [c for c in ("keep_probability", "rank") if c in retrieval.columns]
    top = (
        retrieval.sort_values(order, ascending=[False, True][: len(order)], kind="stable")
        .groupby("query", sort=False)
        .head(RETRIEVAL_ROWS)
    )
    queries = list(dict.fromkeys(retrieval["query"]))
    top = top.assign(_q=top["query"].map({q: i for i, q in enumerate(queries)})).sort_values(
        "_q", kind="stable"
    )
    frame = top[cols].reset_index(drop=True)
    for c in ("similarity", "keep_probability", "selected_fraction"):
        if c in frame:
            frame[c] = [f"{v:.3f}" if np.isfinite(v) else "" for v in frame[c].astype(float)]
    if "rank" in frame:
        frame["rank"] = [
            str(int(v)) if np.isfinite(v) else "" for v in frame["rank"].astype(float)
        ]
    intro = (
        f"The {RETRIEVAL_ROWS} candidates with the highest stage-2 keep probability per query "
        "(mean over control cells; `selected_fraction`: the fraction of cells that keep it, a "
        "candidate counts as kept when it is above 0.5), with their stage-1 rank and cosine "
        "similarity. `candidate_cell_type` is the cell type in which the candidate's response "
        f"was measured. Every candidate: `{folder}/{FILES['retrieval']}`."
    )
    return intro + "\n\n" + _markdown(frame)


def _markdown(frame: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return ""
        text = str(v).replace("|", "\\|")
        # "<context mean>" would read as an HTML tag
        return f"`{text}`" if "<" in text or ">" in text else text

    header = "| " + " | ".join(map(cell, frame.columns)) + " |"
    rule = "|" + "|".join(["---"] * frame.shape[1]) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.to_numpy()]
    return "\n".join([header, rule, *rows])
