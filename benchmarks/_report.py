"""Summaries and tables of benchmark results, shared by ``run_benchmark.py`` and
``make_tables.py``.

This module only reads and formats data frames: it never trains a model, and it imports
neither torch nor cell-eval (``make_tables.py`` must work from the result files alone).

Conventions
-----------
- ``results.csv`` holds one row per (seed, fold, method, cell type, perturbation). Metrics of
  :func:`ptrag_sc.tl.evaluate` keep their names; metrics of cell-eval carry the prefix
  :data:`CELL_EVAL_PREFIX` (``ce_pearson_delta``...), and ``ce_error`` says why cell-eval gave no
  value for a row (e.g. predictions outside the log1p range it accepts).
- ``cell_eval2.csv`` holds one row per (seed, fold, method, cell type, member) of
  :func:`ptrag_sc.tl.score_cell_eval2`: cell-eval2's ``vcc2026`` members are aggregates over a
  cell type's panel (one has no per-perturbation value at all), so they are not per-pair
  columns of ``results.csv``. Its refusals are in ``refusal`` and ``scored_by`` says how each
  score was obtained (``cell-eval2``, ``by hand``, ``not rescaled``).
- ``summary.csv`` holds, per (evaluator, method, metric), the mean and the sample standard
  deviation over seeds of the per-seed mean over (cell type, perturbation) pairs (over (fold,
  cell type) units for cell-eval2); the ``confidence`` rows hold the per-seed Spearman
  correlation over pairs between a model's confidence and its accuracy.
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
CELL_EVAL2 = "cell-eval2"
CONFIDENCE = "confidence"
EVALUATORS = (OURS, CELL_EVAL)
#: Prefix of cell-eval's metric columns in ``results.csv``.
CELL_EVAL_PREFIX = "ce_"
#: Column of ``results.csv`` with cell-eval's refusal or failure message (empty when scored).
CELL_EVAL_ERROR = "ce_error"

#: The six scored members of cell-eval2's ``vcc2026`` profile, their short labels and whether
#: their raw value is better lower (the rescaled scores are all better higher).
CELL_EVAL2_MEMBERS: dict[str, tuple[str, bool]] = {
    "pds_cosine": ("pds", False),
    "expr_mse_unbiased_capped_norm": ("mse_norm", True),
    "de_wilcoxon_lfc_nmae": ("lfc_nmae", True),
    "de_wilcoxon_direction_fidelity_yield_raw": ("fidelity", False),
    "de_wilcoxon_direction_reach_raw": ("reach", False),
    "de_wilcoxon_sig_jaccard": ("sig_jaccard", False),
}
#: cell-eval2 summary metrics: ``mean`` and each member (rescaled, cell-eval2's policy),
#: ``linear:<m>`` (``(u - b) / (r - b)`` unclamped) and ``value:<m>`` (the raw aggregate).
CELL_EVAL2_MEAN = "mean"
#: Per-pair columns of ``results.csv`` measuring how alike the shifts of a cell type's held-out
#: perturbations are (:func:`ptrag_sc.tl._metrics.mean_cosine_to_others`), predicted and
#: measured, and the mean confidence of the pair's predicted cells (NaN without one).
DISCRIMINATION_COLUMNS = ("cosine_to_others_pred", "cosine_to_others_real")
CONFIDENCE_COLUMN = "confidence"
#: Accuracy columns the confidence is correlated with (Spearman over held-out pairs).
CONFIDENCE_TARGETS = ("pearson_delta", "pearson_pert_centred")

#: Metrics shown in the per-dataset tables (every metric is kept in the CSV files).
TABLE_METRICS: dict[str, tuple[str, ...]] = {
    OURS: (
        "pearson_delta",
        "pearson_pert_centred",
        "energy",
        "w1",
        "w2",
        "mse",
        "pearson_delta_de",
        "split_half_pearson",
    ),
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
    CELL_EVAL2: (CELL_EVAL2_MEAN, *CELL_EVAL2_MEMBERS),
}
#: Metrics whose winner is stated in words under each table.
HEADLINE: dict[str, tuple[str, ...]] = {
    OURS: ("pearson_delta", "pearson_pert_centred", "energy"),
    CELL_EVAL: ("pearson_delta", "mse", "discrimination_score_l1", "overlap_at_N"),
    CELL_EVAL2: (CELL_EVAL2_MEAN, "pds_cosine"),
}
#: Data ceilings: reported, never ranked.
NOT_RANKED = frozenset({"split_half_pearson", *DISCRIMINATION_COLUMNS})
#: Rows of the README table: (evaluator, metric, label).
README_ROWS: tuple[tuple[str, str, str], ...] = (
    (
        CELL_EVAL2,
        CELL_EVAL2_MEAN,
        "cell-eval2 vcc2026, rescaled mean (0 generic response, 1 replicate)",
    ),
    (CELL_EVAL2, "pds_cosine", "cell-eval2 discrimination pds, rescaled"),
    (OURS, "pearson_pert_centred", "perturbation-centred Pearson (ours)"),
    (CELL_EVAL, "pearson_delta", "Pearson of shift (cell-eval)"),
    (CELL_EVAL, "mse", "MSE (cell-eval, lower better)"),
    (CELL_EVAL, "discrimination_score_l1", "discrimination L1 (cell-eval, 1 best)"),
    (OURS, "energy", "energy distance (ours, lower better)"),
)
#: Model columns of the README table (names of ``run_benchmark.MODELS``).
README_MODELS = ("PT-RAG (default)",)
#: Datasets, in the order of the tables.
DATASET_ORDER = (
    "glioblastoma_fewshot",
    "glioblastoma",
    "gbm_zeroshot",
    "k562_doubles",
    "thp1",
    "jurkat",
    "replogle_like",
    "synthetic_small",
)

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
    "scored_by",
]


# ------------------------------------------------------------------------------ summaries
def metric_columns(results: pd.DataFrame, evaluator: str, ours: Iterable[str]) -> list[str]:
    """Columns of ``results`` holding the metrics of ``evaluator``."""
    if evaluator == CELL_EVAL:
        return [
            c for c in results.columns if c.startswith(CELL_EVAL_PREFIX) and c != CELL_EVAL_ERROR
        ]
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
                message = (
                    f"{int(err.sum())} of {len(frame)} pairs not scored by cell-eval: {first}"
                )
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
                        "scored_by": "",
                    }
                )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _summary_row(
    evaluator, method, kind, metric, per_seed, n_units, lower, error="", scored_by=""
) -> dict:
    n = len(per_seed)
    return {
        "evaluator": evaluator,
        "method": method,
        "kind": kind,
        "metric": metric,
        "mean": float(np.mean(per_seed)) if n else np.nan,
        "sd": float(np.std(per_seed, ddof=1)) if n > 1 else np.nan,
        "n_seeds": n,
        "n_pairs": n_units,
        "lower_is_better": lower,
        "error": error,
        "scored_by": scored_by,
    }


def summarize_cell_eval2(ce2: pd.DataFrame, *, kinds: dict[str, str]) -> pd.DataFrame:
    """cell-eval2 rows of ``summary.csv``: mean and sd over seeds of the per-seed mean over units.

    A unit is a (fold, cell type). Metrics: ``mean`` and each member (the rescaled ``score``),
    ``linear:<member>`` / ``linear:mean`` (``score_linear``) and ``value:<member>`` (the raw
    ``prediction``). As for cell-eval, a method with a unit lacking a value gets no mean (never
    a mean over the units that happened to pass); ``error`` then says how many units and why.
    ``error`` also keeps the first cell-eval2 refusal when the values were rescaled by hand, and
    ``scored_by`` says how: ``cell-eval2``, ``by hand``, or ``k of n units by hand``; for
    ``mean`` it adds how many members were averaged when not all six.
    """
    rows = []
    if ce2 is None or ce2.empty:
        return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    text = {
        c: ce2[c].fillna("").astype(str) if c in ce2.columns else ""
        for c in ("refusal", "member_refusal", "scored_by")
    }
    ce2 = ce2.assign(**text)
    for method, frame in ce2.groupby("method", sort=False):
        kind = kinds.get(method, frame["kind"].iloc[0] if "kind" in frame else "baseline")
        for metric in (CELL_EVAL2_MEAN, *CELL_EVAL2_MEMBERS):
            sub = frame[frame["metric"] == metric]
            if sub.empty:
                continue
            n_units = int(len(sub) / max(1, sub["seed"].nunique()))
            refusals = sub.loc[sub["refusal"] != "", "refusal"]
            member_refusals = sub.loc[sub["member_refusal"] != "", "member_refusal"]
            by_hand = int((sub["scored_by"] == "by hand").sum())
            if by_hand == 0:
                how = "cell-eval2"
            elif by_hand == len(sub):
                how = "by hand"
            else:
                how = f"{by_hand} of {len(sub)} units by hand"
            if metric == CELL_EVAL2_MEAN:
                members = sorted({int(m) for m in sub["n_members"].dropna()})
                if members and members != [len(CELL_EVAL2_MEMBERS)]:
                    span = str(members[0]) if len(members) == 1 else f"{members[0]}-{members[-1]}"
                    how += f", mean of {span} of {len(CELL_EVAL2_MEMBERS)} members"
            variants = [(metric, "score", False)]
            if metric == CELL_EVAL2_MEAN:
                variants.append((f"linear:{metric}", "score_linear", False))
            else:
                variants += [
                    (f"linear:{metric}", "score_linear", False),
                    (f"value:{metric}", "prediction", CELL_EVAL2_MEMBERS[metric][1]),
                ]
            for name, column, lower in variants:
                values = pd.to_numeric(sub[column], errors="coerce")
                missing = int(values.isna().sum())
                error = ""
                if missing:
                    reasons = pd.concat([member_refusals, refusals])
                    first = reasons.iloc[0] if len(reasons) else "no value"
                    error = (
                        f"{missing} of {len(sub)} (fold, cell type) units without a value: {first}"
                    )
                elif len(refusals) and column != "prediction":
                    error = (
                        f"cell-eval2 refused in {len(refusals)} of {len(sub)} units, "
                        f"rescaled {how}: {refusals.iloc[0]}"
                    )
                per_seed = (
                    [] if missing else [float(v.mean()) for _, v in values.groupby(sub["seed"])]
                )
                rows.append(
                    _summary_row(
                        CELL_EVAL2,
                        method,
                        kind,
                        name,
                        per_seed,
                        n_units,
                        lower,
                        error,
                        how if column != "prediction" else "",
                    )
                )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def spearman(x, y) -> float:
    """Spearman correlation (average ranks) over the finite pairs; NaN with fewer than 3."""
    x = pd.to_numeric(pd.Series(x), errors="coerce").to_numpy(dtype=float)
    y = pd.to_numeric(pd.Series(y), errors="coerce").to_numpy(dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return float("nan")
    rx = pd.Series(x[keep]).rank().to_numpy()
    ry = pd.Series(y[keep]).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def summarize_confidence(results: pd.DataFrame, *, kinds: dict[str, str]) -> pd.DataFrame:
    """``confidence`` rows of ``summary.csv``: per method carrying a confidence, the Spearman
    correlation over held-out pairs between its per-pair mean confidence and each accuracy of
    :data:`CONFIDENCE_TARGETS`, computed per seed (all folds and cell types pooled), mean and sd
    over seeds. Higher is better: a confidence that ranks predictions by their accuracy."""
    rows = []
    if CONFIDENCE_COLUMN not in results.columns:
        return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    for method, frame in results.groupby("method", sort=False):
        if not pd.to_numeric(frame[CONFIDENCE_COLUMN], errors="coerce").notna().any():
            continue
        for target in CONFIDENCE_TARGETS:
            if target not in frame.columns:
                continue
            per_seed = [
                spearman(f[CONFIDENCE_COLUMN], f[target]) for _, f in frame.groupby("seed")
            ]
            per_seed = [v for v in per_seed if math.isfinite(v)]
            n_pairs = int(len(frame) / max(1, frame["seed"].nunique()))
            rows.append(
                _summary_row(
                    CONFIDENCE,
                    method,
                    kinds.get(method, "model"),
                    f"spearman_vs_{target}",
                    per_seed,
                    n_pairs,
                    False,
                )
            )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def pooled_confidence(results_by_dataset: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Spearman between confidence and accuracy over the held-out pairs of several datasets pooled.

    Per method and seed, the pairs of every dataset holding that method's confidence are pooled
    (each pair once); columns ``method``, ``accuracy``, ``mean``, ``sd`` (over seeds),
    ``n_seeds``, ``n_pairs`` (per seed) and ``datasets``.
    """
    frames = []
    for name, results in results_by_dataset.items():
        if CONFIDENCE_COLUMN in results.columns:
            frames.append(results.assign(dataset=name))
    columns = ["method", "accuracy", "mean", "sd", "n_seeds", "n_pairs", "datasets"]
    if not frames:
        return pd.DataFrame(columns=columns)
    pooled = pd.concat(frames, ignore_index=True)
    pooled = pooled[pd.to_numeric(pooled[CONFIDENCE_COLUMN], errors="coerce").notna()]
    rows = []
    for method, frame in pooled.groupby("method", sort=False):
        for target in CONFIDENCE_TARGETS:
            per_seed = [
                spearman(f[CONFIDENCE_COLUMN], f[target]) for _, f in frame.groupby("seed")
            ]
            per_seed = [v for v in per_seed if math.isfinite(v)]
            rows.append(
                {
                    "method": method,
                    "accuracy": target,
                    "mean": float(np.mean(per_seed)) if per_seed else np.nan,
                    "sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else np.nan,
                    "n_seeds": len(per_seed),
                    "n_pairs": int(len(frame) / max(1, frame["seed"].nunique())),
                    "datasets": ", ".join(sorted(frame["dataset"].unique())),
                }
            )
    return pd.DataFrame(rows, columns=columns)


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
    return 3 if top >= 0.1 else min(6, 2 - math.floor(math.log10(top)) + 1)


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


def ranking(
    summary: pd.DataFrame, evaluator: str, metric: str, methods: Sequence[str] | None = None
) -> dict:
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
    order = [
        (r.method, float(r.mean), float(r.sd) if _finite(r.sd) else np.nan)
        for r in sub.itertuples()
    ]
    best, bmean, bsd = order[0]
    noise = all(_finite(sd) for _, _, sd in order)
    tied = [best]
    for m, mean, sd in order[1:]:
        if mean == bmean or (noise and abs(mean - bmean) < max(bsd, sd)):
            tied.append(m)
    return {"order": order, "best": best, "tied": tied, "noise": noise, "lower": lower}


def verdict(
    summary: pd.DataFrame, evaluator: str, metric: str, *, reference: str = "PT-RAG (default)"
) -> str:
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
        text += (
            f"**tie**: {', '.join(r['tied'])} have the same value ({fmt(*means[best], digits)})."
        )
    elif not r["noise"]:
        text += (
            f"best mean {best} ({fmt(*means[best], digits)}), next {second} "
            f"({fmt(*means[second], digits)}); the noise is not measured (one seed), so this is "
            "not a result."
        )
    elif len(r["tied"]) > 1:
        others = ", ".join(f"{m} ({fmt(*means[m], digits)})" for m in r["tied"][1:])
        text += (
            f"**tie**: {best} has the best mean ({fmt(*means[best], digits)}) but {others} "
            "lie within the larger sd."
        )
    else:
        diff = abs(means[best][0] - means[second][0])
        noise = max(means[best][1], means[second][1])
        text += (
            f"**{best} wins** ({fmt(*means[best], digits)}), outside the noise: ahead of {second} "
            f"({fmt(*means[second], digits)}) by {diff:.{digits}f} > larger sd {noise:.{digits}f}."
        )
    baselines = summary[(summary["kind"] == "baseline")]["method"].unique().tolist()
    rb = ranking(summary, evaluator, metric, baselines)
    if (
        reference in means
        and rb["best"] is not None
        and best != reference
        and rb["best"] != reference
    ):
        b = rb["best"]
        ref_mean, ref_sd = means[reference]
        b_mean, b_sd = means[b]
        better = (ref_mean < b_mean) if r["lower"] else (ref_mean > b_mean)
        if r["noise"] and abs(ref_mean - b_mean) < max(ref_sd, b_sd):
            rel = "ties with"
        else:
            rel = "is ahead of" if better else "is behind"
        text += (
            f" {reference} ({fmt(ref_mean, ref_sd, digits)}) {rel} the best baseline, "
            f"{b} ({fmt(b_mean, b_sd, digits)})."
        )
    return text


def method_order(summary: pd.DataFrame) -> list[str]:
    models = summary.loc[summary["kind"] == "model", "method"].unique().tolist()
    baselines = summary.loc[summary["kind"] != "model", "method"].unique().tolist()
    return list(dict.fromkeys(models + baselines))


def _header(evaluator: str, metric: str) -> str:
    if evaluator == CELL_EVAL2 and metric in CELL_EVAL2_MEMBERS:
        return CELL_EVAL2_MEMBERS[metric][0]
    return metric


def _refused(evaluator: str, row) -> str | None:
    """The cell text of a value an evaluator refused (no mean, an error), else None."""
    if isinstance(row.error, str) and row.error and not _finite(row.mean):
        if evaluator == CELL_EVAL:
            return "refused"
        if evaluator == CELL_EVAL2:
            return "not rescaled"
    return None


def _readme_cell(row, tied: bool, evaluator: str, digits: int, prefix: str = "") -> str:
    """One README table cell: mean ± sd (bold when tied with the best), or the refusal."""
    if row is None:
        return "n/a"
    refused = _refused(evaluator, row)
    if refused:
        by = f"by {evaluator}" if evaluator == CELL_EVAL else f"({evaluator} refused)"
        return f"{refused} {by}"
    text = fmt(row.mean, row.sd, digits)
    text = f"**{text}**" if tied else text
    return f"{prefix}{text}" + (" †" if _by_hand(row) else "")


def _by_hand(row) -> bool:
    return "by hand" in str(getattr(row, "scored_by", "") or "")


def evaluator_table(
    summary: pd.DataFrame, evaluator: str, metrics: Sequence[str] | None = None
) -> list[str]:
    """Markdown rows: methods x metrics, ``mean ± sd``, the best and its ties in bold.

    cell-eval2 values rescaled by hand (cell-eval2 refused a comparator) carry a dagger.
    """
    sub = summary[summary["evaluator"] == evaluator]
    if sub.empty:
        return []
    available = list(dict.fromkeys(sub["metric"]))
    metrics = [m for m in (metrics or available) if m in available]
    cell = {(r.method, r.metric): r for r in sub.itertuples()}
    bold = {m: set(ranking(summary, evaluator, m)["tied"]) for m in metrics}
    digits = {m: _digits(sub.loc[sub["metric"] == m, "mean"]) for m in metrics}
    lines = [
        "| method | " + " | ".join(_header(evaluator, m) for m in metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for method in method_order(summary):
        values = []
        for metric in metrics:
            r = cell.get((method, metric))
            if r is None:
                values.append("n/a")
                continue
            refused = _refused(evaluator, r)
            if refused:
                values.append(refused)
                continue
            text = fmt(r.mean, r.sd, digits[metric])
            text = f"**{text}**" if method in bold[metric] and text != "n/a" else text
            values.append(text + (" †" if _by_hand(r) and text != "n/a" else ""))
        lines.append(f"| {method} | " + " | ".join(values) + " |")
    return lines


def discrimination_table(summary: pd.DataFrame) -> list[str]:
    """Markdown rows: per method, how alike its predicted shifts are next to the measured ones,
    cell-eval2's pds (raw and rescaled) and the confidence's Spearman with accuracy."""
    columns = [
        (OURS, "cosine_to_others_pred", "mean cosine between predicted shifts"),
        (OURS, "cosine_to_others_real", "same, measured shifts"),
        (CELL_EVAL2, "value:pds_cosine", "pds_cosine (raw)"),
        (CELL_EVAL2, "pds_cosine", "pds_cosine (rescaled)"),
        *(
            (CONFIDENCE, f"spearman_vs_{t}", f"Spearman(confidence, {t})")
            for t in CONFIDENCE_TARGETS
        ),
    ]
    cell = {(r.evaluator, r.method, r.metric): r for r in summary.itertuples()}
    present = [
        c for c in columns if any((c[0], m, c[1]) in cell for m in summary["method"].unique())
    ]
    if not present or not any(c[0] == OURS for c in present):
        return []
    lines = [
        "| method | " + " | ".join(label for _, _, label in present) + " |",
        "|---|" + "---|" * len(present),
    ]
    for method in method_order(summary):
        values = []
        for evaluator, metric, _ in present:
            r = cell.get((evaluator, method, metric))
            if r is None:
                values.append("n/a")
                continue
            refused = _refused(evaluator, r)
            values.append(refused or (fmt(r.mean, r.sd, 3) + (" †" if _by_hand(r) else "")))
        lines.append(f"| {method} | " + " | ".join(values) + " |")
    return lines


def steps_phrase(settings: dict) -> str:
    steps = settings.get("max_steps_override")
    if steps:
        return f"**SMOKE TEST: `--max-steps {steps}` override, not the defaults a user gets**"
    return 'models trained with `model.train(split_key="split")` defaults (no `max_steps`)'


def dataset_markdown(
    name: str,
    summary: pd.DataFrame,
    settings: dict,
    timings: pd.DataFrame | None,
    *,
    level: str = "###",
) -> str:
    """The per-dataset block of ``summary.md`` and ``docs/benchmark.md``."""
    seeds = settings.get("seeds", [])
    n_pairs = int(summary["n_pairs"].max()) if not summary.empty else 0
    title = settings.get("title", name)
    if settings.get("max_steps_override"):
        title += f" (SMOKE TEST: --max-steps {settings['max_steps_override']}, not the defaults)"
    lines = [
        f"{level} {title}",
        "",
        f"`--dataset {name}`: {len(seeds)} seed(s) {seeds}, {len(settings.get('folds', []))} "
        "fold(s), "
        f"{n_pairs} (cell type, perturbation) pairs per seed; {steps_phrase(settings)}. "
        "Each value is the mean ± sd over seeds of the per-seed mean over pairs; bold marks the "
        "best "
        "mean and every value tied with it (difference smaller than the larger sd).",
        "",
    ]
    if settings.get("description"):
        lines += [settings["description"], ""]
    if timings is not None and not timings.empty and "steps_run" in timings.columns:
        t = timings[timings["kind"] == "model"] if "kind" in timings.columns else timings
        if not t.empty:
            agg = t.groupby("method", sort=False).agg(
                seconds=("train_seconds", "mean"), steps=("steps_run", "mean")
            )
            parts = [f"{m} {r.seconds:.0f} s / {r.steps:.0f} steps" for m, r in agg.iterrows()]
            lines += ["Training (mean per fold): " + "; ".join(parts) + ".", ""]
    ce2_label = (
        "cell-eval2 {version} (the six `vcc2026` members, log1p input, pdex Wilcoxon DE on CPU; "
        "each "
        "rescaled to (u - b) / (r - b) with cell-eval2's policy: 0 = its generic mean response, 1 "
        "= its "
        "split-half replicate; `mean` averages the rescaled members; per (fold, cell type) unit, "
        "then "
        "over units; † rescaled by hand where cell-eval2 refused a comparator, see below)"
    )
    evaluators = (
        (
            CELL_EVAL2,
            ce2_label.replace(
                "{version}", str(settings.get("versions", {}).get("cell_eval2") or "")
            ),
        ),
        (CELL_EVAL, 'cell-eval 0.8 (`MetricsEvaluator`, profile "full")'),
        (OURS, "`ptrag_sc.tl.evaluate`"),
    )
    for evaluator, label in evaluators:
        rows = evaluator_table(summary, evaluator, TABLE_METRICS[evaluator])
        if not rows:
            continue
        version = settings.get("versions", {}).get("cell_eval") if evaluator == CELL_EVAL else None
        if version:
            label = label.replace("0.8", version)
        lines += [f"Scored by {label}:", "", *rows, ""]
        lines += [f"- {verdict(summary, evaluator, m)}" for m in HEADLINE[evaluator]]
        lines += [""]
        if evaluator == CELL_EVAL2:
            lines += cell_eval2_refusals(summary)
    rows = discrimination_table(summary)
    if rows:
        lines += [
            "Discrimination and confidence: the mean pairwise cosine between the mean shifts of a "
            "cell "
            "type's held-out perturbations, predicted next to measured (near 1: every "
            "perturbation gets "
            "the same shift), cell-eval2's pds, and the Spearman correlation over held-out pairs "
            "between "
            'a model\'s confidence (`obs["ptrag_confidence"]`) and its per-pair accuracy (n/a: no '
            "confidence):",
            "",
            *rows,
            "",
        ]
    errors = summary[
        (summary["evaluator"] == CELL_EVAL) & (summary["error"].fillna("").astype(str) != "")
    ]
    for method, message in errors.groupby("method", sort=False)["error"].first().items():
        lines += [f"- cell-eval **refused** {method}: {message}", ""]
    return "\n".join(lines)


def cell_eval2_refusals(summary: pd.DataFrame) -> list[str]:
    """Markdown bullets: each distinct cell-eval2 refusal once (they are properties of the
    data, shared by every method), with the metrics it affects."""
    sub = summary[
        (summary["evaluator"] == CELL_EVAL2) & (summary["error"].fillna("").astype(str) != "")
    ]
    sub = sub[~sub["metric"].str.contains(":")]
    if sub.empty:
        return []
    texts: dict[str, list[str]] = {}
    for r in sub.itertuples():
        texts.setdefault(r.error.split(": ", 1)[-1], [])
        label = _header(CELL_EVAL2, r.metric)
        if label not in texts[r.error.split(": ", 1)[-1]]:
            texts[r.error.split(": ", 1)[-1]].append(label)
    lines = []
    for text, metrics in texts.items():
        lines += [f"- cell-eval2 **refusal** ({', '.join(metrics)}): {text}", ""]
    means = summary[(summary["evaluator"] == CELL_EVAL2) & (summary["metric"] == CELL_EVAL2_MEAN)]
    hows = sorted({str(h) for h in means["scored_by"] if "members" in str(h)})
    if hows:
        lines += [f"- cell-eval2 `mean`: {'; '.join(hows)} (the others are not rescaled).", ""]
    return lines


def readme_table(blocks: Sequence[tuple[str, pd.DataFrame, dict]]) -> str:
    """The compact README table: dataset, metric, the three models, the best baseline."""
    lines = [
        "| dataset (pairs) | metric | " + " | ".join(README_MODELS) + " | best baseline |",
        "|---|---|" + "---|" * (len(README_MODELS) + 1),
    ]
    smoke = []
    seeds = set()
    with_cell_eval2 = any((summary["evaluator"] == CELL_EVAL2).any() for _, summary, _ in blocks)
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

            values = [
                _readme_cell(cell.get(m), m in tied, evaluator, digits) for m in README_MODELS
            ]
            best = rb["best"]
            values.append(
                _readme_cell(cell.get(best), best in tied, evaluator, digits, f"{best} ")
                if best
                else "n/a"
            )
            label_ds = f"{settings.get('short', name)} ({n_pairs})" if first else ""
            lines.append(f"| {label_ds} | {label} | " + " | ".join(values) + " |")
            first = False
    caption = (
        "Mean ± sd over "
        + ("/".join(str(s) for s in sorted(seeds)) if seeds else "0")
        + " seeds of the per-seed mean over held-out (cell type, perturbation) pairs"
        + (" (cell-eval2: over (fold, cell type) units)" if with_cell_eval2 else "")
        + "; bold: the best of the shown columns and every value within the larger sd of it "
        "(a tie)"
        + (
            "; †: rescaled by hand where cell-eval2 refused a comparator (docs/benchmark.md "
            "quotes the refusals)."
            if with_cell_eval2
            else "."
        )
    )
    if smoke:
        caption += (
            f" **SMOKE TEST (`--max-steps` override) for {', '.join(smoke)}: not the defaults "
            "a user gets.**"
        )
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
