"""The text of the demo's report (``report.md``): headline sentences, tables and notes."""

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


def _paired_difference(
    results: pd.DataFrame, metric: str, a: str, b: str, seed: int
) -> tuple[float, float, float]:
    """Mean and 95% bootstrap CI of ``metric(a) - metric(b)`` over shared (cell type,
    perturbation) rows."""
    from .tl import summarize

    groups = [KEYS["cell_type_key"], KEYS["perturbation_key"]]
    wide = results.pivot_table(index=groups, columns="method", values=metric, aggfunc="first")
    wide = wide[[a, b]].dropna()
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

    The best mean wins; every other method whose paired difference from it (same cell type and
    perturbation rows) has a 95% bootstrap interval containing 0 ties with it. For
    ``pearson_pert_centred`` the ``one_shift`` methods are not ranked, and when no other
    method's own 95% interval lies above 0 the sentence says that no method has
    perturbation-specific signal.
    """
    from .tl import LOWER_IS_BETTER

    lower = metric in LOWER_IS_BETTER
    name = HEADLINE_METRICS.get(metric, (metric,))[0]
    rows = summary[summary["metric"] == metric].set_index("method")
    n = int(rows["n"].max()) if len(rows) else 0
    label = (
        f"**{name}** (`{metric}`, {'lower' if lower else 'higher'} is better; "
        f"n = {n} test perturbations)"
    )
    excluded = ""
    if metric == "pearson_pert_centred":
        shown = [m for m in one_shift if m in rows.index]
        rows = rows.drop(index=shown)
        if shown:
            excluded = (
                f" It is undefined for {_join(shown)}, which predict{'s' * (len(shown) == 1)} "
                "one shift for every perturbation, so they are not ranked."
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
    intervals = {
        m: _paired_difference(results, metric, best, str(m), seed) for m in ranked.index[1:]
    }
    tied = [
        str(m)
        for m, (_, lo, hi) in intervals.items()
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo <= 0 <= hi
    ]
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
        group = [f"**{m}** ({ranked[m]:.3f})" for m in [best, *tied]]
        names = ", ".join(group[:-1]) + f" and {group[-1]}"
        if any(not np.isfinite(intervals[m][1]) for m in tied):
            why = "too few test perturbations for a bootstrap interval"
        else:
            largest = max(abs(intervals[m][0]) for m in tied)
            why = (
                f"the differences from {best} (up to {largest:.3f}) lie inside their 95% "
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
    k = int(adata.uns.get("knn", {}).get("options", {}).get("k", 5))
    obs = adata.obs
    perturbation = obs[KEYS["perturbation_key"]]
    train = (
        (obs["split"].astype(str) == "train")
        & (perturbation.astype(str) != KEYS["control_group"])
        & (obs[KEYS["cell_type_key"]].astype(str) == held_out)
    )
    n_train = perturbation[train].nunique()
    if n_train > k:
        return None
    return (
        f"`knn` equals `context_mean` here: it averages the shifts of the k = {k} training "
        f"perturbations of {held_out} closest in gene-embedding space, and {held_out} has only "
        f"{n_train} training perturbation{'s' * (n_train != 1)}, so it averages all of "
        "them, which is the context mean."
    )


def fallback_note(adata: AnnData, baselines: tuple[str, ...]) -> str | None:
    """Name the baselines that used their documented fallback for some test cells."""
    test = adata.obs["split"].astype(str).to_numpy() == "test"
    used = {
        m: int(adata.obs[f"{m}_fallback"].to_numpy(dtype=bool)[test].sum())
        for m in baselines
        if f"{m}_fallback" in adata.obs
    }
    listed = ", ".join(f"`{m}` ({n} cells)" for m, n in used.items() if n)
    if not listed:
        return None
    return (
        f"Some test cells could not be predicted as the baseline intends and used its documented "
        f"fallback (see `ptrag_sc.tl.predict_baseline`): {listed}."
    )


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
        for metric in HEADLINE_METRICS:
            sentence = headline_sentence(
                outcome["results"],
                outcome["summary"],
                metric,
                seed=seed,
                one_shift=outcome["one_shift"],
            )
            lines.append(f"- {sentence}")
        lines.append("")
    lines += [
        "A difference counts as a win only when the 95% bootstrap interval of the paired "
        "difference (same cell type and perturbation, resampled over the n test perturbations) "
        "excludes 0; otherwise it is a tie. With n = 4 or 5 these intervals are rough.",
        "",
    ]
    for i, outcome in enumerate(outcomes, 1):
        lines += _task_section(i, outcome)
    model = FILES["model"]
    lines += [
        "## Settings",
        "",
        "```json",
        json.dumps(settings, indent=2),
        "```",
        "",
        "## Files",
        "",
        f"One folder per task, each with `{FILES['metrics']}` (one row per method, cell type and "
        f"perturbation), `{FILES['summary']}` (means and bootstrap intervals), "
        f"`{FILES['retrieval']}` (every retrieved candidate), `{FILES['history']}`, the figures, "
        f'and the saved model `{model}/` (`ptrag_sc.PTRAG.load("<task>/{model}", adata)`).',
        "",
    ]
    return "\n".join(lines)


def _task_section(number: int, outcome: dict) -> list[str]:
    task, summary, results = outcome["task"], outcome["summary"], outcome["results"]
    cell_type, one_shift = outcome["cell_type"], outcome["one_shift"]
    table = summary.assign(
        value=[
            f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
            for m, lo, hi in summary[["mean", "ci_low", "ci_high"]].to_numpy()
        ]
    )
    undefined = (table["metric"] == "pearson_pert_centred") & table["method"].isin(one_shift)
    table.loc[undefined, "value"] = "undefined"
    wide = table.pivot(index="method", columns="metric", values="value")
    wide = wide.reindex(list(dict.fromkeys(results["method"])))
    wide = wide[[m for m in REPORT_METRICS if m in wide.columns and m != "split_half_pearson"]]
    validation = ", ".join(outcome["settings"]["validation_perturbations"])
    if outcome["auto_validation"]:
        validation += " (held out from the training split by the model itself)"
    undefined_note = ""
    if one_shift:
        they = "it predicts" if len(one_shift) == 1 else "they predict"
        undefined_note = (
            f" `pearson_pert_centred` is undefined for {_join(one_shift)}: {they} one shift for "
            "every perturbation."
        )
    lines = [
        f"## {number}. {task.title} ({task.name})",
        "",
        task.question,
        "",
        f"Test perturbations in {cell_type} (n = {len(outcome['test'])}): "
        f"{', '.join(outcome['test'])}. Other perturbations of {cell_type} in the training "
        f"split: {outcome['n_train']}. Validation (chooses when to stop): {validation}.",
        "",
        "Every method is scored by `ptrag_sc.tl.evaluate` on the same test cells. Values are "
        f"means over the n = {int(summary['n'].max())} test perturbations with a 95% bootstrap "
        "interval in brackets (the n values resampled). Higher is better for the Pearson "
        "correlations, lower for the distances (`energy`, `w1`, `w2`) and `mse`." + undefined_note,
        "",
        _markdown(wide.reset_index()),
        "",
    ]
    split_half = summary[summary["metric"] == "split_half_pearson"]
    if not split_half.empty:
        row = split_half.iloc[0]
        r = method_means(summary, "pearson_delta")
        lines += [
            f"**How noisy is the observed shift?** `split_half_pearson` = {row['mean']:.3f} "
            f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] (n = {int(row['n'])}) is "
            f"{SPLIT_HALF_DEFINITION}: {int((r > row['mean']).sum())} of {len(r)} methods score "
            "above it here.",
            "",
        ]
    for note in outcome["notes"]:
        lines += [note, ""]
    shift, heatmap, history = (
        f"{task.name}/{FILES[k]}" for k in ("shift_figure", "retrieval_figure", "history_figure")
    )
    lines += [
        f"![Predicted vs observed mean shift]({shift})",
        "",
        f"[`{shift}`]({shift}): predicted vs observed mean shift from control, one point per gene "
        "and one colour per test perturbation; one panel per method, with its mean "
        "`pearson_delta` in the title. The dashed line is y = x.",
        "",
        f"![Retrieval heatmap]({heatmap})",
        "",
        f"[`{heatmap}`]({heatmap}): for each test perturbation in {cell_type} (rows), the "
        'stage-1 candidates (columns, "gene @ cell type") coloured by the stage-2 keep '
        "probability; dots mark the candidates kept for most cells. A white cell is a candidate "
        "that stage 1 did not retrieve for that query (each query retrieves its own nearest "
        "candidates; the columns are their union).",
        "",
        _retrieval_table(outcome["retrieval"], task.name),
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
    numbers = ("similarity", "keep_probability", "selected_fraction")
    cols = ["query", "rank", "candidate", "candidate_cell_type", *numbers]
    order = [c for c in ("keep_probability", "rank") if c in retrieval.columns]
    top = (
        retrieval.sort_values(order, ascending=[False, True][: len(order)], kind="stable")
        .groupby("query", sort=False)
        .head(RETRIEVAL_ROWS)
    )
    query_order = {q: i for i, q in enumerate(dict.fromkeys(retrieval["query"]))}
    top = top.sort_values("query", key=lambda q: q.map(query_order), kind="stable")
    frame = top[[c for c in cols if c in retrieval.columns]].reset_index(drop=True)
    for c in frame.columns.intersection(numbers):
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
    rows = ["| " + " | ".join(map(cell, row)) + " |" for row in frame.to_numpy()]
    return "\n".join([header, rule, *rows])
