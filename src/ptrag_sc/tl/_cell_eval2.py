"""Score a prediction with cell-eval2's vcc2026 members, rescaled between the generic response
and a replicate."""

from __future__ import annotations

import hashlib
import math
import tempfile
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import DEFAULT_CONTROL_GROUP, DEFAULT_PERTURBATION_KEY, DEFAULT_PRED_LAYER
from ._cell_eval import to_cell_eval
from ._utils import as_str_tuple, in_values, labels

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import ModuleType
    from typing import Any

    from anndata import AnnData

#: How a row's ``score`` was obtained (column ``scored_by``).
BY_CELL_EVAL2 = "cell-eval2"
BY_HAND = "by hand"
NOT_RESCALED = "not rescaled"
#: The row holding the mean of the rescaled members of a cell type (column ``metric``).
MEAN_ROW = "mean"
#: Columns of :func:`score_cell_eval2` after the cell-type column.
SCORE_COLUMNS = (
    "metric",
    "prediction",
    "baseline",
    "replicate",
    "score",
    "score_linear",
    "scored_by",
    "refusal",
    "member_refusal",
    "n_members",
)
_PERT_COL, _CONTROL = "target_gene", "non-targeting"
_SINGLE_PERTURBATION = (
    "a single perturbation in this cell type: cell-eval2's generic response would be its own "
    "measured mean response, so no member is rescaled"
)
_MISSING_EXTRA = (
    "ptrag_sc.tl.score_cell_eval2 needs cell-eval2 (>= 0.20) and pdex: "
    'pip install "ptrag-sc[cell-eval2]".'
)


def score_cell_eval2(
    adata: AnnData,
    *,
    pred_layer: str = DEFAULT_PRED_LAYER,
    perturbation_key: str = DEFAULT_PERTURBATION_KEY,
    control_group: str = DEFAULT_CONTROL_GROUP,
    cell_type_key: str | None = None,
    cell_types: Sequence[str] | str | None = None,
    perturbations: Sequence[str] | None = None,
    split_key: str | None = None,
    split_values: Sequence[str] | str = ("test",),
    real_layer: str | None = None,
    n_splits: int = 5,
    seed: int = 0,
    num_threads: int = 1,
    reference_cache: dict | None = None,
) -> pd.DataFrame:
    """Does a prediction beat the mean response of the data, on the scale of a replicate?

    Scores ``layers[pred_layer]`` with the six scored members of cell-eval2's ``vcc2026``
    profile (the 2026 Virtual Cell Challenge suite) and rescales each member ``u`` to
    ``(u - b) / (r - b)``: ``b`` its value for cell-eval2's generic response (the mean response
    of the evaluated perturbations given to each of them: an oracle comparator) and ``r`` for
    the split-half replicate (half of the measured cells predicting the other half, averaged
    over ``n_splits`` splits). 0 is the mean response, 1 a repeat of the experiment.

    cell-eval2 runs on CPU with log1p input, pdex Wilcoxon DE, the generic response emitted
    with ``emit="tile"`` and ``cell_eval2.anchor.compute_replicate_anchor``, on the pair of
    :func:`ptrag_sc.tl.to_cell_eval`, one cell type at a time. A label that is not a gene of
    ``adata`` (a double ``"A+B"``) is declared as having no target gene.

    Where cell-eval2 **refuses** a comparator (e.g. a degenerate baseline at ~100 cells per
    group), its text is in ``refusal``, and each member whose two ends are finite and ordered
    is rescaled by hand with the member's own cell-eval2 policy (``scored_by="by hand"``); the
    others are ``"not rescaled"``. A replicate or prediction refused as a whole is computed
    member by member, so one refused member does not take the others with it.

    Parameters
    ----------
    adata
        Cells with real log1p expression in ``X`` (or ``real_layer``) and the prediction in
        ``layers[pred_layer]`` (counterfactual mode: the same cells). Never modified.
    pred_layer
        Layer holding the prediction.
    perturbation_key
        obs column with perturbation labels.
    control_group
        Label of control cells.
    cell_type_key
        obs column with the cell type (each is scored on its own, against its own control
        cells), or ``None`` (all cells one context).
    cell_types
        Cell type(s) to score (needs ``cell_type_key``); default: every cell type with
        selected perturbed cells.
    perturbations
        Perturbations to score (default: all). A cell type with a single one gets raw values
        only (its generic response would be its own measured response; ``refusal`` says so).
    split_key
        obs column with the data split; perturbed cells whose value is not in
        ``split_values`` are left out (controls are kept).
    split_values
        Split values to score.
    real_layer
        Layer with the real expression; ``None`` uses ``X``.
    n_splits
        Splits averaged by the replicate anchor (cell-eval2's default 5).
    seed
        Seed of the replicate splits (cell-eval2's ``base_seed``).
    num_threads
        Threads of the pdex DE test (-1: all CPUs).
    reference_cache
        A dict kept by the caller to score several predictions of the same cells: the
        baseline and replicate of a cell type (real cells only) are computed once.

    Returns
    -------
    :class:`pandas.DataFrame`, per cell type one row per member and a ``"mean"`` row, with
    columns ``cell_type_key`` (``"cell_type"`` holding ``"all"`` when ``None``) and

    - ``metric``: the member, or ``"mean"`` (the mean of the rescaled members);
    - ``prediction``, ``baseline``, ``replicate``: the raw panel aggregates ``u``, ``b``, ``r``;
    - ``score``: the rescaled value, with each member's cell-eval2 policy (linear, except
      ``expr_mse_unbiased_capped_norm`` clamped to [0, 1], ``de_wilcoxon_lfc_nmae`` floored at
      -6, a non-finite ``u`` the member's worst value);
    - ``score_linear``: ``(u - b) / (r - b)`` unclamped, where the three are finite and ordered;
    - ``scored_by``: ``"cell-eval2"`` (its ``score_metrics``), ``"by hand"`` or
      ``"not rescaled"``;
    - ``refusal``: cell-eval2's refusal text(s) for the cell type ("" when none);
    - ``member_refusal``: why this member alone was refused too, when the replicate or the
      prediction was refused as a whole ("" otherwise);
    - ``n_members``: on the mean row, how many members it averages (1 elsewhere).

    Examples
    --------
    >>> import ptrag_sc
    >>> adata = ptrag_sc.datasets.perturbench_devel(subset="glioblastoma")
    >>> ptrag_sc.pp.few_shot_split(
    ...     adata, held_out="U87MG", val=["PLK4"], test=["MAPK1", "SGK1", "MAP2K3", "TGFBR2"]
    ... )
    >>> ptrag_sc.tl.predict_baseline(adata, "context_mean", split_key="split", key_added="mean")

    With cell-eval2 installed (``pip install "ptrag-sc[cell-eval2]"``; about 10 s on one CPU;
    ``TQDM_DISABLE=1`` silences pdex's progress bars)::

        scores = ptrag_sc.tl.score_cell_eval2(
            adata, pred_layer="mean", cell_type_key="cell_line", split_key="split"
        )
        scores[["metric", "score", "scored_by"]]
        #                                      metric  score     scored_by
        # 0                                pds_cosine    0.0       by hand
        # 1             expr_mse_unbiased_capped_norm    NaN  not rescaled
        # 2                      de_wilcoxon_lfc_nmae    NaN  not rescaled
        # 3  de_wilcoxon_direction_fidelity_yield_raw    NaN  not rescaled
        # 4           de_wilcoxon_direction_reach_raw    NaN  not rescaled
        # 5                   de_wilcoxon_sig_jaccard    0.0       by hand
        # 6                                      mean    0.0       by hand

    The context mean is no better than the generic response here (0); at ~90 cells per group
    cell-eval2 refuses both comparators (``scores["refusal"]``), so two members are rescaled
    by hand.
    """
    cell_eval2 = _import_cell_eval2()
    if n_splits < 1:
        raise ValueError(f"`n_splits={n_splits}` must be >= 1.")
    cell_type_col = cell_type_key or "cell_type"
    if cell_type_key is None:
        if cell_types is not None:
            raise ValueError("`cell_types` needs `cell_type_key` (the obs column of cell types).")
        wanted = [None]
    else:
        wanted = list(as_str_tuple(cell_types) or ())
        if not wanted:
            pert = labels(adata, perturbation_key, "perturbation_key")
            chosen = (pert != control_group) & in_values(pert, as_str_tuple(perturbations))
            if split_key is not None:
                split = labels(adata, split_key, "split_key")
                chosen &= in_values(split, as_str_tuple(split_values))
            wanted = sorted(set(labels(adata, cell_type_key, "cell_type_key")[chosen]))
            if not wanted:
                raise ValueError(
                    "Nothing to score: no perturbed cell matches the selection "
                    f"(perturbations={perturbations}, split_key={split_key!r}, "
                    f"split_values={split_values})."
                )
    cache = {} if reference_cache is None else reference_cache
    frames = []
    for ct in wanted:
        with warnings.catch_warnings():
            # to_cell_eval's range warning is about cell-eval (v1); cell-eval2 validates itself.
            warnings.filterwarnings("ignore", message=".*cell-eval expects log1p data.*")
            pred, real = to_cell_eval(
                adata,
                pred_layer=pred_layer,
                perturbation_key=perturbation_key,
                control_group=control_group,
                cell_type_key=cell_type_key,
                cell_types=ct,
                perturbations=perturbations,
                split_key=split_key,
                split_values=split_values,
                real_layer=real_layer,
                pert_col=_PERT_COL,
                control_pert=_CONTROL,
            )
        frame = _score_one_context(
            cell_eval2,
            pred,
            real,
            n_splits=n_splits,
            seed=seed,
            num_threads=num_threads,
            cache=cache,
        )
        frame.insert(0, cell_type_col, "all" if ct is None else ct)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _import_cell_eval2() -> ModuleType:
    try:
        import cell_eval2
        import pdex  # noqa: F401  (the DE backend cell-eval2 is told to use)
    except ImportError as exc:
        raise ImportError(_MISSING_EXTRA) from exc
    return cell_eval2


def _config(cell_eval2: ModuleType, real: AnnData, num_threads: int) -> Any:
    """cell-eval2's vcc2026 preset, on log1p input, pdex DE on CPU, for the pair's labels."""
    base = cell_eval2.EvalConfig.from_preset("vcc2026")
    targets = set(real.obs[_PERT_COL].astype(str)) - {_CONTROL}
    not_genes = {t: None for t in sorted(targets - set(real.var_names))}
    return replace(
        base,
        input_type="lognorm",
        pert_col=_PERT_COL,
        control=_CONTROL,
        device="cpu",
        num_threads=num_threads,
        de=replace(base.de, backend="pdex"),
        target_gene_map=not_genes or None,
    )


def _members(cfg: Any) -> list[str]:
    """The scored members of the profile, under the names cell-eval2 emits."""
    from cell_eval2.catalog import _NAME_TO_CANONICAL, CATALOG
    from cell_eval2.run import metric_output_names

    names = metric_output_names(cfg)
    return [n for n in names if CATALOG[_NAME_TO_CANONICAL.get(n, n)].scoring.scored]


def _mean_row(agg: Any) -> dict[str, float]:
    """``{metric: mean}`` of an ``aggregate_metrics_wide`` frame."""
    row = agg.filter(agg["statistic"] == "mean").drop("statistic")
    return {k: _float(v) for k, v in row.row(0, named=True).items()}


def _float(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _replicate_policy(policy: Any, replicate: float) -> Any:
    """The member's cell-eval2 policy anchored at the replicate; None when none is usable."""
    if not math.isfinite(replicate):
        return None
    try:  # cell-eval2 rejects e.g. a negative replicate for a member bounded in [0, 1]
        return replace(policy, anchor=replicate, allow_negative_baseline=False)
    except ValueError:
        return None


def _refusal(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _member_by_member(
    members: list[str], cfg: Any, values_of: Callable[[Any], dict[str, float]]
) -> tuple[dict[str, float], dict[str, str]]:
    """Each member's value computed alone, and the refusal texts of those cell-eval2 refused."""
    values, refusals = {}, {}
    for member in members:
        try:
            values[member] = _float(values_of(replace(cfg, metrics=[member])).get(member))
        except ValueError as exc:
            values[member], refusals[member] = math.nan, _refusal(exc)
    return values, refusals


def _references(
    cell_eval2: ModuleType,
    real: AnnData,
    cfg: Any,
    members: list[str],
    *,
    n_splits: int,
    seed: int,
    cache: dict,
) -> dict:
    """Baseline and replicate of one context (cached on the real cells and the settings)."""
    digest = hashlib.sha1()
    digest.update("\n".join(map(str, real.obs_names)).encode())
    digest.update("\n".join(real.obs[_PERT_COL].astype(str)).encode())
    digest.update(np.ascontiguousarray(real.X).tobytes())
    key = (digest.hexdigest(), repr(cfg.to_dict()), int(n_splits), int(seed))
    if key in cache:
        return cache[key]
    from cell_eval2.anchor import _derive_seeds, build_meta, compute_replicate_anchor
    from cell_eval2.catalog import resolve_metrics

    def baseline_of(config: Any, allow_degenerate: bool = True) -> Any:
        return cell_eval2.build_generic_baseline(
            real, config=config, emit="tile", allow_degenerate=allow_degenerate
        )

    def replicate_of(config: Any) -> tuple[Any, Any, dict[str, float]]:
        splits, anchor = compute_replicate_anchor(
            real, config=config, base_seed=seed, n_splits=n_splits
        )
        values = zip(anchor["metric"], anchor["replicate"], strict=True)
        return splits, anchor, {m: _float(v) for m, v in values}

    ref = {"refusals": {}, "member_refusals": {}, "baseline_agg": None, "anchor": None}
    try:
        built = baseline_of(cfg, allow_degenerate=False)
    except ValueError as exc:
        ref["refusals"]["baseline"] = _refusal(exc)
        try:  # the same build, written anyway, so its finite members can be rescaled by hand
            built = baseline_of(cfg)
        except ValueError:
            built = None
    if built is not None:
        ref["baseline_agg"] = built.agg
        ref["baseline"] = _mean_row(built.agg)
    else:
        ref["baseline"], ref["member_refusals"]["baseline"] = _member_by_member(
            members, cfg, lambda config: _mean_row(baseline_of(config).agg)
        )
    try:
        splits, anchor, ref["replicate"] = replicate_of(cfg)
        names, _ = resolve_metrics(cfg.metrics, version=cfg.version)
        meta = build_meta(
            real_ad=real,
            cfg=cfg,
            names=list(names),
            base_seed=seed,
            n_splits=n_splits,
            seeds=_derive_seeds(seed, n_splits),
            metrics=list(anchor["metric"]),
        )
        ref["anchor"] = (splits, anchor, meta)
    except ValueError as exc:
        ref["refusals"]["replicate anchor"] = _refusal(exc)
        ref["replicate"], ref["member_refusals"]["replicate"] = _member_by_member(
            members, cfg, lambda config: replicate_of(config)[2]
        )
    cache[key] = ref
    return ref


def _score_one_context(
    cell_eval2: ModuleType,
    pred: AnnData,
    real: AnnData,
    *,
    n_splits: int,
    seed: int,
    num_threads: int,
    cache: dict,
) -> pd.DataFrame:
    from cell_eval2.anchor import write_anchor
    from cell_eval2.baseline import build_run_meta
    from cell_eval2.catalog import _NAME_TO_CANONICAL, CATALOG
    from cell_eval2.run import aggregate_metrics_wide, metric_output_names
    from cell_eval2.score import expect_from_run_meta
    from cell_eval2.scoring import is_degenerate, score_one

    cfg = _config(cell_eval2, real, num_threads)
    members = _members(cfg)
    n_perturbations = len(set(real.obs[_PERT_COL].astype(str)) - {_CONTROL})
    if n_perturbations < 2:
        # cell-eval2's generic response is the mean over the evaluated perturbations: with one,
        # it is that perturbation's own measured response, and the scale means nothing.
        ref = {
            "refusals": {"ptrag_sc": _SINGLE_PERTURBATION},
            "member_refusals": {},
            "baseline": {},
            "replicate": {},
            "anchor": None,
        }
    else:
        ref = _references(
            cell_eval2, real, cfg, members, n_splits=n_splits, seed=seed, cache=cache
        )

    def aggregate_of(config: Any) -> Any:
        tidy = cell_eval2.compute_metrics(pred, real, config=config)
        return aggregate_metrics_wide(tidy, metrics=metric_output_names(config))

    refusals = dict(ref["refusals"])
    member_refusals = dict(ref["member_refusals"])
    try:
        user_agg = aggregate_of(cfg)
        u = _mean_row(user_agg)
    except ValueError as exc:
        # One member's refusal (e.g. a reference panel without a measurable effect for the
        # expression error) must not take the others with it: score them one at a time.
        refusals = {"prediction": _refusal(exc), **refusals}
        user_agg = None
        u, member_refusals["prediction"] = _member_by_member(
            members, cfg, lambda config: _mean_row(aggregate_of(config))
        )

    official = {}
    if user_agg is not None and ref["anchor"] is not None and "baseline" not in refusals:
        splits, anchor, meta = ref["anchor"]
        with tempfile.TemporaryDirectory(prefix="ptrag_cell_eval2_anchor_") as directory:
            write_anchor(directory, splits, anchor, meta=meta)
            try:
                scored = cell_eval2.score_metrics(
                    user_agg,
                    ref["baseline_agg"],
                    anchor=directory,
                    anchor_expect=expect_from_run_meta(build_run_meta(cfg, real, pred)),
                )
                official = {
                    m: _float(v)
                    for m, v in zip(scored["metric"], scored["from_replicate"], strict=True)
                }
            except ValueError as exc:
                refusals["score_metrics"] = _refusal(exc)
    context_refusal = "; ".join(f"{what}: {text}" for what, text in refusals.items())
    rows = []
    for member in members:
        b, r = ref["baseline"].get(member, math.nan), ref["replicate"].get(member, math.nan)
        value = u.get(member, math.nan)
        # The replicate scale of this member, as cell-eval2 builds it (score._replicate_entries).
        policy = CATALOG[_NAME_TO_CANONICAL.get(member, member)].scoring
        on_replicate = _replicate_policy(policy, r)
        ordered = (
            math.isfinite(b) and on_replicate is not None and not is_degenerate(b, on_replicate)
        )
        linear = (value - b) / (r - b) if ordered and math.isfinite(value) else math.nan
        if member in official and math.isfinite(official[member]):
            score, how = official[member], BY_CELL_EVAL2
        elif ordered and member not in member_refusals.get("prediction", {}):
            score, how = score_one(value, b, on_replicate), BY_HAND
        else:
            score, how = math.nan, NOT_RESCALED
        alone = "; ".join(
            f"{what} of {member} alone: {texts[member]}"
            for what, texts in member_refusals.items()
            if member in texts
        )
        rows.append([member, value, b, r, score, linear, how, context_refusal, alone, 1])
    frame = pd.DataFrame(rows, columns=list(SCORE_COLUMNS))
    rescaled = frame[frame["scored_by"] != NOT_RESCALED]
    if "avg_score" in official and len(rescaled) == len(frame):
        mean, how = official["avg_score"], BY_CELL_EVAL2
    elif len(rescaled):
        mean, how = float(rescaled["score"].mean()), BY_HAND
    else:
        mean, how = math.nan, NOT_RESCALED
    linear = rescaled["score_linear"].to_numpy(dtype=float)
    mean_row = {
        "metric": MEAN_ROW,
        "score": mean,
        "score_linear": float(linear.mean())
        if len(linear) and np.isfinite(linear).all()
        else math.nan,
        "scored_by": how,
        "refusal": context_refusal,
        "member_refusal": "",
        "n_members": len(rescaled),
    }
    mean_frame = pd.DataFrame([mean_row], columns=list(SCORE_COLUMNS))
    return pd.concat([frame, mean_frame], ignore_index=True)
