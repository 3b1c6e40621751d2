"""Summaries and tables of benchmark results, shared by ``run_benchmark.py`` and ``make_tables.py``.

This module only reads and formats data frames: it never trains a model, and it imports
neither torch nor cell-eval (``make_tables.py`` must work from the result files alone).

Conventions
-----------
- ``results.csv`` holds one row per (seed, fold, method, cell type, perturbation). Metrics of
  :func:`ptrag_sc.tl.evaluate` keep their names; metrics of cell-eval carry the prefix
  :data:`CELL_EVAL_PREFIX` (``ce_pearson_delta``...), and ``ce_error`` says why cell-eval gave no
  value for a row (e.g. predictions outside the log1p range it accepts).
- ``summary.csv`` holds, per (evaluator, method, metric), the mean and the sample standard
  deviation over seeds of the per-seed mean over (cell type, perturbation) pairs.
- A difference between two methods smaller than the larger of their two standard deviations is
  a **tie**. With a single seed the noise is not measured and no tie can be called.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

#: Evaluator labels (``summary.csv``'s ``evaluator`` column).
OURS = "ptrag_sc"
CELL_EVAL = "cell-eval"
EVALUATORS = (OURS, CELL_EVAL)
#: Prefix of cell-eval's metric columns in ``results.csv``.
CELL_EVAL_PREFIX = "ce_"
#: Column of ``results.csv`` with cell-eval's refusal or failure message (empty when scored).
CELL_EVAL_ERROR = "ce_error"

#: Metrics shown in the per-dataset tables (every metric is kept in the CSV files).
TABLE_METRICS: dict[str, tuple[str, ...]] = {
    OURS: ("pearson_delta", "pearson_pert_centred", "energy", "w1", "w2", "mse", "pearson_delta_de", "split_half_pearson"),
    CELL_EVAL: (
        "pearson_delta",
        "mse",
        "mae",
        "discrimination_score_l1",
        "overlap_at_N",
        "precision_at_N",
        "de_direction_match",
        "pearson_edistance",
    ),
}
#: Metrics whose winner is stated in words under each table.
HEADLINE: dict[str, tuple[str, ...]] = {
    OURS: ("pearson_delta", "pearson_pert_centred", "energy"),
    CELL_EVAL: ("pearson_delta", "mse", "discrimination_score_l1", "overlap_at_N"),
}
#: Data ceilings: reported, never ranked.
NOT_RANKED = frozenset({"split_half_pearson"})
#: Rows of the README table: (evaluator, metric, label).
README_ROWS: tuple[tuple[str, str, str], ...] = (
    (CELL_EVAL, "pearson_delta", "Pearson of shift (cell-eval)"),
    (CELL_EVAL, "mse", "MSE (cell-eval, lower better)"),
    (CELL_EVAL, "discrimination_score_l1", "discrimination L1 (cell-eval, 1 best)"),
    (OURS, "energy", "energy distance (ours, lower better)"),
)
#: Model columns of the README table (names of ``run_benchmark.MODELS``).
README_MODELS = ("PT-RAG (default)", "STATE+GenePT", "PT-RAG (paper)")
#: Datasets, in the order of the tables.
DATASET_ORDER = ("glioblastoma_fewshot", "glioblastoma", "k562_doubles", "thp1", "replogle_like", "synthetic_small")

SUMMARY_COLUMNS = [
    "evaluator",
    "method",
    "kind",
    "metric",
    "mean",
    "sd",
    "n_seeds",
    "n_pairs",
    "lower_is_better",
    "error",
]


# ------------------------------------------------------------------------------ summaries
def metric_columns(results: pd.DataFrame, evaluator: str, ours: Iterable[str]) -> list[str]:
    """Columns of ``results`` holding the metrics of ``evaluator``."""
    if evaluator == CELL_EVAL:
        return [c for c in results.columns if c.startswith(CELL_EVAL_PREFIX) and c != CELL_EVAL_ERROR]
    return [c for c in ours if c in results.columns]


def summarize_seeds(
    results: pd.DataFrame,
    *,
    our_metrics: Sequence[str],
    lower_is_better: dict[tuple[str, str], bool | None],
    kinds: dict[str, str],
) -> pd.DataFrame:
    """Mean and sd over seeds of the per-seed mean over pairs, per evaluator, method and metric.

    For cell-eval, a method with any refused or failed pair gets no mean at all (it is not
    averaged over the pairs or seeds that happened to pass); the first error message is kept.
    """
    rows = []
    has_error = (
        results[CELL_EVAL_ERROR].fillna("").astype(str).str.len() > 0
        if CELL_EVAL_ERROR in results.columns
        else pd.Series(False, index=results.index)
    )
    for evaluator in EVALUATORS:
        cols = metric_columns(results, evaluator, our_metrics)
        for method, frame in results.groupby("method", sort=False):
            err = has_error.loc[frame.index]
            message = ""
            if evaluator == CELL_EVAL and err.any():
                first = frame.loc[err, CELL_EVAL_ERROR].astype(str).iloc[0]
                message = f"{int(err.sum())} of {len(frame)} pairs not scored by cell-eval: {first}"
            for col in cols:
                metric = col[len(CELL_EVAL_PREFIX) :] if evaluator == CELL_EVAL else col
                per_seed = []
                for _, seed_frame in frame.groupby("seed"):
                    if message:  # refused somewhere: no mean over the pairs that happened to pass
                        break
                    values = pd.to_numeric(seed_frame[col], errors="coerce").to_numpy(dtype=float)
                    values = values[np.isfinite(values)]
                    if values.size:
                        per_seed.append(float(values.mean()))
                n = len(per_seed)
                rows.append(
                    {
                        "evaluator": evaluator,
                        "method": method,
                        "kind": kinds.get(method, "baseline"),
                        "metric": metric,
                        "mean": float(np.mean(per_seed)) if n else np.nan,
                        "sd": float(np.std(per_seed, ddof=1)) if n > 1 else np.nan,
                        "n_seeds": n,
                        "n_pairs": int(len(frame) / max(1, frame["seed"].nunique())),
                        "lower_is_better": lower_is_better.get((evaluator, metric)),
                        "error": message,
                    }
                )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# ------------------------------------------------------------------------------ formatting
def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _digits(values: Iterable[float]) -> int:
    """Decimals that show differences: 3, or more for small magnitudes (e.g. MSE ~ 1e-3)."""
    finite = [abs(v) for v in values if _finite(v) and v != 0]
    if not finite:
        return 3
    top = max(finite)
    return 3 if top >= 0.1 else min(6, 2 - int(math.floor(math.log10(top))) + 1)


def fmt(mean, sd, digits: int = 3) -> str:
    """``mean ± sd`` (``mean`` alone when sd is undefined, ``n/a`` when there is no mean)."""
    if not _finite(mean):
        return "n/a"
    if not _finite(sd):
        return f"{float(mean):.{digits}f}"
    return f"{float(mean):.{digits}f} ± {float(sd):.{digits}f}"


def _bool(value) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower())
    return bool(value)


def ranking(summary: pd.DataFrame, evaluator: str, metric: str, methods: Sequence[str] | None = None) -> dict:
    """Best method of one metric and the methods tied with it.

    Returns ``{"order": [(method, mean, sd), ...] best first, "best": name or None,
    "tied": [names within noise of the best, best included], "noise": bool (sds known)}``.
    """
    sub = summary[(summary["evaluator"] == evaluator) & (summary["metric"] == metric)]
    if methods is not None:
        sub = sub[sub["method"].isin(list(methods))]
    sub = sub[[_finite(m) for m in sub["mean"]]]
    out = {"order": [], "best": None, "tied": [], "noise": False, "lower": None}
    if sub.empty or metric in NOT_RANKED:
        return out
    lower = _bool(sub["lower_is_better"].iloc[0])
    if lower is None:
        return out
    sub = sub.sort_values("mean", ascending=lower, kind="stable")
    order = [(r.method, float(r.mean), float(r.sd) if _finite(r.sd) else np.nan) for r in sub.itertuples()]
    best, bmean, bsd = order[0]
    noise = all(_finite(sd) for _, _, sd in order)
    tied = [best]
    for m, mean, sd in order[1:]:
        if mean == bmean or (noise and abs(mean - bmean) < max(bsd, sd)):
            tied.append(m)
    return {"order": order, "best": best, "tied": tied, "noise": noise, "lower": lower}


def verdict(summary: pd.DataFrame, evaluator: str, metric: str, *, reference: str = "PT-RAG (default)") -> str:
    """One sentence: who wins ``metric`` and whether the win is outside the noise."""
    r = ranking(summary, evaluator, metric)
    if r["best"] is None:
        return f"`{metric}`: no ranking (no values)."
    order = r["order"]
    direction = "lower" if r["lower"] else "higher"
    means = {m: (mean, sd) for m, mean, sd in order}
    digits = _digits(v for _, v, _ in order)
    best = r["best"]
    text = f"`{metric}` ({direction} is better): "
    if len(order) == 1:
        return text + f"only {best} has a value ({fmt(*means[best], digits)})."
    second = order[1][0]
    if len(r["tied"]) > 1 and all(means[m][0] == means[best][0] for m in r["tied"]):
        text += f"**tie**: {', '.join(r['tied'])} have the same value ({fmt(*means[best], digits)})."
    elif not r["noise"]:
        text += (
            f"best mean {best} ({fmt(*means[best], digits)}), next {second} "
            f"({fmt(*means[second], digits)}); the noise is not measured (one seed), so this is not a result."
        )
    elif len(r["tied"]) > 1:
        others = ", ".join(f"{m} ({fmt(*means[m], digits)})" for m in r["tied"][1:])
        text += f"**tie**: {best} has the best mean ({fmt(*means[best], digits)}) but {others} lie within the larger sd."
    else:
        diff = abs(means[best][0] - means[second][0])
        noise = max(means[best][1], means[second][1])
        text += (
            f"**{best} wins** ({fmt(*means[best], digits)}), outside the noise: ahead of {second} "
            f"({fmt(*means[second], digits)}) by {diff:.{digits}f} > larger sd {noise:.{digits}f}."
        )
    baselines = summary[(summary["kind"] == "baseline")]["method"].unique().tolist()
    rb = ranking(summary, evaluator, metric, baselines)
    if reference in means and rb["best"] is not None and best != reference and rb["best"] != reference:
        b = rb["best"]
        ref_mean, ref_sd = means[reference]
        b_mean, b_sd = means[b]
        better = (ref_mean < b_mean) if r["lower"] else (ref_mean > b_mean)
        if r["noise"] and abs(ref_mean - b_mean) < max(ref_sd, b_sd):
            rel = "ties with"
        else:
            rel = "is ahead of" if better else "is behind"
        text += f" {reference} ({fmt(ref_mean, ref_sd, digits)}) {rel} the best baseline, {b} ({fmt(b_mean, b_sd, digits)})."
    return text


def method_order(summary: pd.DataFrame) -> list[str]:
    models = summary.loc[summary["kind"] == "model", "method"].unique().tolist()
    baselines = summary.loc[summary["kind"] != "model", "method"].unique().tolist()
    return list(dict.fromkeys(models + baselines))


def evaluator_table(summary: pd.DataFrame, evaluator: str, metrics: Sequence[str] | None = None) -> list[str]:
    """Markdown rows: methods x metrics, ``mean ± sd``, the best and its ties in bold."""
    sub = summary[summary["evaluator"] == evaluator]
    if sub.empty:
        return []
    available = list(dict.fromkeys(sub["metric"]))
    metrics = [m for m in (metrics or available) if m in available]
    cell = {(r.method, r.metric): r for r in sub.itertuples()}
    bold = {m: set(ranking(summary, evaluator, m)["tied"]) for m in metrics}
    digits = {m: _digits(sub.loc[sub["metric"] == m, "mean"]) for m in metrics}
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for method in method_order(summary):
        values = []
        for metric in metrics:
            r = cell.get((method, metric))
            if r is None:
                values.append("n/a")
                continue
            if evaluator == CELL_EVAL and isinstance(r.error, str) and r.error and not _finite(r.mean):
                values.append("refused")
                continue
            text = fmt(r.mean, r.sd, digits[metric])
            values.append(f"**{text}**" if method in bold[metric] and text != "n/a" else text)
        lines.append(f"| {method} | " + " | ".join(values) + " |")
    return lines


def steps_phrase(settings: dict) -> str:
    steps = settings.get("max_steps_override")
    if steps:
        return f"**SMOKE TEST: `--max-steps {steps}` override, not the defaults a user gets**"
    return "models trained with `model.train(split_key=\"split\")` defaults (no `max_steps`)"


def dataset_markdown(name: str, summary: pd.DataFrame, settings: dict, timings: pd.DataFrame | None, *, level: str = "###") -> str:
    """The per-dataset block of ``summary.md`` and ``docs/benchmark.md``."""
    seeds = settings.get("seeds", [])
    n_pairs = int(summary["n_pairs"].max()) if not summary.empty else 0
    title = settings.get("title", name)
    if settings.get("max_steps_override"):
        title += f" (SMOKE TEST: --max-steps {settings['max_steps_override']}, not the defaults)"
    lines = [
        f"{level} {title}",
        "",
        f"`--dataset {name}`: {len(seeds)} seed(s) {seeds}, {len(settings.get('folds', []))} fold(s), "
        f"{n_pairs} (cell type, perturbation) pairs per seed; {steps_phrase(settings)}. "
        "Each value is the mean ± sd over seeds of the per-seed mean over pairs; bold marks the best "
        "mean and every value tied with it (difference smaller than the larger sd).",
        "",
    ]
    if settings.get("description"):
        lines += [settings["description"], ""]
    if timings is not None and not timings.empty and "steps_run" in timings.columns:
        t = timings[timings["kind"] == "model"] if "kind" in timings.columns else timings
        if not t.empty:
            agg = t.groupby("method", sort=False).agg(seconds=("train_seconds", "mean"), steps=("steps_run", "mean"))
            parts = [f"{m} {r.seconds:.0f} s / {r.steps:.0f} steps" for m, r in agg.iterrows()]
            lines += ["Training (mean per fold): " + "; ".join(parts) + ".", ""]
    for evaluator, label in ((CELL_EVAL, "cell-eval 0.8 (`MetricsEvaluator`, profile \"full\")"), (OURS, "`ptrag_sc.tl.evaluate`")):
        rows = evaluator_table(summary, evaluator, TABLE_METRICS[evaluator])
        if not rows:
            continue
        version = settings.get("versions", {}).get("cell_eval") if evaluator == CELL_EVAL else None
        if version:
            label = label.replace("0.8", version)
        lines += [f"Scored by {label}:", "", *rows, ""]
        lines += [f"- {verdict(summary, evaluator, m)}" for m in HEADLINE[evaluator]]
        lines += [""]
    errors = summary[(summary["evaluator"] == CELL_EVAL) & (summary["error"].fillna("").astype(str) != "")]
    for method, message in errors.groupby("method", sort=False)["error"].first().items():
        lines += [f"- cell-eval **refused** {method}: {message}", ""]
    return "\n".join(lines)


def readme_table(blocks: Sequence[tuple[str, pd.DataFrame, dict]]) -> str:
    """The compact README table: dataset, metric, the three models, the best baseline."""
    lines = [
        "| dataset (pairs) | metric | " + " | ".join(README_MODELS) + " | best baseline |",
        "|---|---|" + "---|" * (len(README_MODELS) + 1),
    ]
    smoke = []
    seeds = set()
    for name, summary, settings in blocks:
        seeds.add(len(settings.get("seeds", [])))
        if settings.get("max_steps_override"):
            smoke.append(name)
        n_pairs = int(summary["n_pairs"].max()) if not summary.empty else 0
        first = True
        baselines = summary.loc[summary["kind"] == "baseline", "method"].unique().tolist()
        for evaluator, metric, label in README_ROWS:
            sub = summary[(summary["evaluator"] == evaluator) & (summary["metric"] == metric)]
            if sub.empty:
                continue
            cell = {r.method: r for r in sub.itertuples()}
            rb = ranking(summary, evaluator, metric, baselines)
            shown = [m for m in README_MODELS if m in cell] + ([rb["best"]] if rb["best"] else [])
            tied = set(ranking(summary, evaluator, metric, shown)["tied"])
            digits = _digits(sub["mean"])

            def show(method, prefix=""):
                r = cell.get(method)
                if r is None:
                    return "n/a"
                if evaluator == CELL_EVAL and isinstance(r.error, str) and r.error and not _finite(r.mean):
                    return "refused by cell-eval"
                text = fmt(r.mean, r.sd, digits)
                text = f"**{text}**" if method in tied else text
                return f"{prefix}{text}"

            values = [show(m) for m in README_MODELS]
            values.append(show(rb["best"], f"{rb['best']} ") if rb["best"] else "n/a")
            label_ds = f"{settings.get('short', name)} ({n_pairs})" if first else ""
            lines.append(f"| {label_ds} | {label} | " + " | ".join(values) + " |")
            first = False
    caption = (
        "Mean ± sd over "
        + ("/".join(str(s) for s in sorted(seeds)) if seeds else "0")
        + " seeds of the per-seed mean over held-out (cell type, perturbation) pairs; bold: the best "
        "of the shown columns and every value within the larger sd of it (a tie)."
    )
    if smoke:
        caption += f" **SMOKE TEST (`--max-steps` override) for {', '.join(smoke)}: not the defaults a user gets.**"
    return "\n".join([caption, "", *lines])


def replace_between(text: str, start: str, end: str, body: str) -> str:
    """Replace what lies between the line holding ``start`` and the one starting with ``end``.

    The new block is surrounded by one blank line on each side (Markdown tables need them).
    """
    i = text.find(start)
    if i < 0:
        raise ValueError(f"marker {start!r} not found")
    i = text.find("\n", i) + 1
    j = text.find(end, i)
    if j < 0:
        raise ValueError(f"marker {end!r} not found after {start!r}")
    return text[:i] + "\n" + body.strip("\n") + "\n\n" + text[j:]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
