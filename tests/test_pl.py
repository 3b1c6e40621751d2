"""Tests of ptrag_sc.pl: each plot returns Axes and draws exactly what it claims."""

from __future__ import annotations

import doctest
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from conftest import few_shot_split, make_small_adata
from matplotlib.collections import PathCollection

import ptrag_sc
from ptrag_sc import pl, tl
from ptrag_sc.pl._retrieval import CONTEXT_CANDIDATE, retrieval_matrix
from ptrag_sc.pl._shifts import compute_shifts

plt.switch_backend("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def scored():
    """Synthetic data with a few-shot split and two baseline prediction layers."""
    data = make_small_adata()
    data.obs["split"] = few_shot_split(data)
    for name in ("context_mean", "other_cell_types"):
        tl.predict_baseline(data, name, split_key="split", key_added=name)
    return data


def _r_from_title(title: str) -> float:
    match = re.search(r"r = (-?\d+\.\d+)", title)
    assert match, title
    return float(match.group(1))


def _scatter_collections(ax) -> list[PathCollection]:
    return [c for c in ax.collections if isinstance(c, PathCollection)]


# ------------------------------------------------------------------ shift_scatter
def test_shift_scatter_one_panel_per_group_with_evaluate_correlation(scored):
    res = tl.evaluate(scored, pred_layer="context_mean", split_key="split")
    axes = pl.shift_scatter(scored, pred_layer="context_mean", split_key="split", show=False)
    assert isinstance(axes, list)
    assert len(axes) == len(res)
    expected = {(row.cell_line, row.gene): row.pearson_delta for row in res.itertuples()}
    for ax in axes:
        points = _scatter_collections(ax)
        assert len(points) == 1
        assert points[0].get_offsets().shape == (scored.n_vars, 2)
        name, ct = re.match(r"(\S+) \((\S+)\)", ax.get_title()).groups()
        assert _r_from_title(ax.get_title()) == pytest.approx(expected[(ct, name)], abs=0.005)
        assert ax.get_xlabel() == "observed shift"
        assert ax.get_ylabel() == "predicted shift"


def test_shift_values_equal_evaluate_and_hand_computation(scored):
    res = tl.evaluate(scored, pred_layer="other_cell_types", split_key="split")
    shifts, genes = compute_shifts(scored, pred_layer="other_cell_types", split_key="split")
    assert list(genes) == list(scored.var_names)
    got = {(s.cell_type, s.perturbation): s for s in shifts}
    assert len(got) == len(res)
    for row in res.itertuples():
        shift = got[(row.cell_line, row.gene)]
        assert shift.pearson == pytest.approx(row.pearson_delta, abs=1e-12)
        assert shift.n_cells == row.n_cells
        cells = (scored.obs.cell_line == row.cell_line) & (scored.obs.gene == row.gene)
        cells &= scored.obs.split == "test"
        ctrl = (scored.obs.cell_line == row.cell_line) & (scored.obs.gene == "non-targeting")
        ctrl_mean = np.asarray(scored.X[ctrl.to_numpy()].mean(0)).ravel()
        real = np.asarray(scored.X[cells.to_numpy()].mean(0)).ravel() - ctrl_mean
        pred = scored.layers["other_cell_types"][cells.to_numpy()].mean(0) - ctrl_mean
        np.testing.assert_allclose(shift.observed, real, atol=1e-5)
        np.testing.assert_allclose(shift.predicted, pred, atol=1e-5)
    ax = pl.shift_scatter(
        scored,
        pred_layer="other_cell_types",
        split_key="split",
        perturbations=[shifts[0].perturbation],
        show=False,
    )
    np.testing.assert_allclose(
        _scatter_collections(ax)[0].get_offsets(),
        np.column_stack([shifts[0].observed, shifts[0].predicted]),
        atol=1e-6,
    )


def test_shift_scatter_overlay_and_annotation(scored):
    res = tl.evaluate(scored, pred_layer="context_mean", split_key="split")
    ax = pl.shift_scatter(
        scored, pred_layer="context_mean", split_key="split", overlay=True, annotate=2, show=False
    )
    assert len(_scatter_collections(ax)) == len(res)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    for row, text in zip(res.itertuples(), legend, strict=True):
        assert text.startswith(f"{row.gene} ({row.cell_line})")
        assert _r_from_title(text) == pytest.approx(row.pearson_delta, abs=0.005)
    assert len(ax.texts) == 2 * len(res)


def test_shift_scatter_order_single_panel_and_given_ax(scored):
    perts = sorted(set(scored.obs.gene[scored.obs.split == "test"]))[::-1]
    axes = pl.shift_scatter(
        scored, pred_layer="context_mean", split_key="split", perturbations=perts, show=False
    )
    assert [a.get_title().split(" ")[0] for a in axes] == perts
    _, ax = plt.subplots()
    out = pl.shift_scatter(
        scored, pred_layer="context_mean", split_key="split", perturbations=perts[0], ax=ax
    )
    assert out is ax  # show=None does not show a figure it did not make
    assert pl.shift_scatter(scored, pred_layer="context_mean", split_key="split") is None


def test_shift_scatter_generation_mode_with_reference(trained):
    model, data = trained
    test_perts = sorted(set(data.obs.gene[data.obs.split == "test"]))
    ct = str(data.obs.cell_line[data.obs.split == "test"].iloc[0])
    controls = data[(data.obs.gene == "non-targeting") & (data.obs.cell_line == ct)]
    generated = model.predict(controls, perturbations=test_perts)
    res = tl.evaluate(generated, reference=data, split_key="split")
    axes = pl.shift_scatter(generated, reference=data, split_key="split", show=False)
    assert len(axes) == len(test_perts) == len(res)
    for ax, row in zip(axes, res.itertuples(), strict=True):
        assert ax.get_title().startswith(f"{row.gene} ({row.cell_line})")
        assert _r_from_title(ax.get_title()) == pytest.approx(row.pearson_delta, abs=0.005)


def test_shift_scatter_errors(scored):
    with pytest.raises(ValueError, match="not a layer"):
        pl.shift_scatter(scored, pred_layer="nope", show=False)
    with pytest.raises(ValueError, match="NOPE"):
        pl.shift_scatter(
            scored,
            pred_layer="context_mean",
            split_key="split",
            perturbations=["NOPE"],
            show=False,
        )
    with pytest.raises(ValueError, match="cell_type"):
        pl.shift_scatter(scored, pred_layer="context_mean", cell_type="nowhere", show=False)
    with pytest.raises(ValueError, match="max_panels"):
        pl.shift_scatter(scored, pred_layer="context_mean", max_panels=2, show=False)
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="single panel"):
        pl.shift_scatter(scored, pred_layer="context_mean", split_key="split", ax=ax)
    with pytest.raises(TypeError, match="file path"):
        pl.shift_scatter(scored, pred_layer="context_mean", save=True, show=False)
    with pytest.raises(ValueError, match="split_key"):
        pl.shift_scatter(scored, pred_layer="context_mean", split_key="nope", show=False)


# --------------------------------------------------------------- retrieval_heatmap
@pytest.fixture(scope="module")
def retrieval(trained):
    model, data = trained
    queries = sorted(set(data.obs.gene) - {"non-targeting"})[:4]
    return model.get_retrieval(queries, cell_type=list(data.obs.cell_line.cat.categories[:2]))


def _pivot(df, value, ct):
    sub = df[df.cell_type == ct]
    label = np.where(
        sub.candidate == CONTEXT_CANDIDATE,
        CONTEXT_CANDIDATE,
        sub.candidate.astype(str) + " @ " + sub.candidate_cell_type.astype(str),
    )
    return sub.assign(label=label).pivot(index="query", columns="label", values=value)


@pytest.mark.parametrize("value", ["keep_probability", "similarity", "selected_fraction"])
def test_retrieval_heatmap_data_equals_pivot(retrieval, value):
    axes = pl.retrieval_heatmap(retrieval, value=value, show=False)
    cell_types = list(dict.fromkeys(retrieval.cell_type))
    assert len(axes) == len(cell_types)
    for ax, ct in zip(axes, cell_types, strict=True):
        assert len(ax.images) == 1
        rows = [t.get_text() for t in ax.get_yticklabels()]
        cols = [t.get_text() for t in ax.get_xticklabels()]
        expected = _pivot(retrieval, value, ct).reindex(index=rows, columns=cols)
        assert set(cols) == set(_pivot(retrieval, value, ct).columns)
        data = ax.images[0].get_array()
        np.testing.assert_array_equal(np.ma.getmaskarray(data), expected.isna().to_numpy())
        np.testing.assert_allclose(data.filled(np.nan), expected.to_numpy(), equal_nan=True)
        assert ax.get_title() == f"{ct}: {value}"
        marks = _scatter_collections(ax)
        n_selected = int(retrieval[(retrieval.cell_type == ct)].selected.sum())
        assert sum(len(m.get_offsets()) for m in marks) == n_selected


def test_retrieval_heatmap_column_order_and_filters(retrieval):
    ct = retrieval.cell_type.iloc[0]
    matrix = retrieval_matrix(retrieval, cell_type=ct, max_rank=3)[ct]
    sub = retrieval[(retrieval.cell_type == ct)]
    best = (
        sub.assign(label=sub.candidate + " @ " + sub.candidate_cell_type)
        .groupby("label")["rank"]
        .min()
    )
    ranks = [best[c] for c in matrix.columns if c != CONTEXT_CANDIDATE]
    assert ranks == sorted(ranks)
    assert max(ranks) <= 3
    no_ctx = retrieval_matrix(retrieval, cell_type=ct, show_context=False)[ct]
    assert CONTEXT_CANDIDATE not in no_ctx.columns
    queries = list(dict.fromkeys(retrieval["query"]))[::-1][:2]
    ax = pl.retrieval_heatmap(retrieval, cell_type=ct, queries=queries, show=False)
    assert [t.get_text() for t in ax.get_yticklabels()] == queries


def test_retrieval_heatmap_from_hand_made_frame():
    df = pd.DataFrame(
        {
            "query": ["A", "A", "B", "B"],
            "rank": [1, 2, 1, 2],
            "candidate": ["X", "Y", "Y", "Z"],
            "keep_probability": [0.9, 0.2, 0.6, 0.1],
            "selected": [True, False, True, False],
        }
    )
    ax = pl.retrieval_heatmap(df, show=False)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["X", "Y", "Z"]
    expected = np.array([[0.9, 0.2, np.nan], [np.nan, 0.6, 0.1]])
    np.testing.assert_allclose(ax.images[0].get_array().filled(np.nan), expected, equal_nan=True)
    assert sorted(map(tuple, _scatter_collections(ax)[0].get_offsets())) == [(0, 0), (1, 1)]


def test_retrieval_heatmap_errors(retrieval):
    with pytest.raises(TypeError, match="get_retrieval"):
        pl.retrieval_heatmap(retrieval.to_dict(), show=False)
    with pytest.raises(ValueError, match="lacks column"):
        pl.retrieval_heatmap(retrieval.drop(columns="candidate"), show=False)
    with pytest.raises(ValueError, match="numeric"):
        pl.retrieval_heatmap(retrieval, value="candidate_cell_type", show=False)
    with pytest.raises(ValueError, match="not in `retrieval_df`"):
        pl.retrieval_heatmap(retrieval, cell_type="nowhere", show=False)
    with pytest.raises(ValueError, match="several rows"):
        pl.retrieval_heatmap(pd.concat([retrieval, retrieval]), show=False)
    with pytest.raises(ValueError, match="mark_selected"):
        pl.retrieval_heatmap(retrieval.drop(columns="selected"), show=False)
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="single panel"):
        pl.retrieval_heatmap(retrieval, ax=ax)


# ---------------------------------------------------------------- metric_comparison
@pytest.fixture(scope="module")
def results(scored):
    return pd.concat(
        [
            tl.evaluate(scored, pred_layer=k, split_key="split")
            for k in ("context_mean", "other_cell_types")
        ],
        ignore_index=True,
    )


def _errorbar_spans(container) -> list[tuple[float, float, float]]:
    """(x, low, high) of each vertical error bar of an ErrorbarContainer."""
    _, _, barcols = container.lines
    return [
        (seg[0][0], min(seg[0][1], seg[1][1]), max(seg[0][1], seg[1][1]))
        for seg in barcols[0].get_segments()
    ]


def test_metric_comparison_from_results_points_and_ci(results):
    ax = pl.metric_comparison(results, metric="pearson_delta", show=False)
    methods = [t.get_text() for t in ax.get_xticklabels()]
    assert methods == ["context_mean", "other_cell_types"]
    summary = tl.summarize(results, by="method", metrics=["pearson_delta"])
    assert len(ax.containers) == 1
    spans = _errorbar_spans(ax.containers[0])
    for (x, low, high), method in zip(spans, methods, strict=True):
        row = summary[summary.method == method].iloc[0]
        assert x == pytest.approx(methods.index(method))
        assert low == pytest.approx(row.ci_low)
        assert high == pytest.approx(row.ci_high)
    means = ax.containers[0].lines[0].get_ydata()
    np.testing.assert_allclose(
        means, [summary.set_index("method").loc[m, "mean"] for m in methods]
    )
    points = _scatter_collections(ax)
    assert [len(p.get_offsets()) for p in points] == [
        int((results.method == m).sum()) for m in methods
    ]
    assert "higher is better" in ax.get_ylabel()


@pytest.fixture(scope="module")
def all_results(scored):
    """Every cell line (in-sample rows too): several values of the hue column."""
    return pd.concat(
        [
            tl.evaluate(scored, pred_layer=k, ot_max_cells=50)
            for k in ("context_mean", "other_cell_types")
        ],
        ignore_index=True,
    )


def test_metric_comparison_from_summary_with_hue_and_order(all_results):
    summary = tl.summarize(all_results, by=["method", "cell_line"])
    assert summary.cell_line.nunique() == 3
    ax = pl.metric_comparison(
        summary,
        metric="mse",
        hue="cell_line",
        order=["other_cell_types", "context_mean"],
        show=False,
    )
    assert [t.get_text() for t in ax.get_xticklabels()] == ["other_cell_types", "context_mean"]
    hues = list(dict.fromkeys(summary.cell_line))
    assert len(ax.containers) == len(hues)
    for container, ct in zip(ax.containers, hues, strict=True):
        for (_, low, high), method in zip(
            _errorbar_spans(container), ["other_cell_types", "context_mean"], strict=True
        ):
            row = summary[
                (summary.metric == "mse") & (summary.method == method) & (summary.cell_line == ct)
            ].iloc[0]
            if np.isfinite(row.ci_low):
                assert (low, high) == pytest.approx((row.ci_low, row.ci_high))
    assert not _scatter_collections(ax)  # a summary has no per-row values
    assert "lower is better" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == hues


def test_metric_comparison_errors(results, all_results):
    with pytest.raises(ValueError, match="not a column"):
        pl.metric_comparison(results, metric="nope", show=False)
    with pytest.raises(ValueError, match="not in the summary"):
        pl.metric_comparison(tl.summarize(results), metric="nope", show=False)
    with pytest.raises(ValueError, match="several rows"):
        pl.metric_comparison(tl.summarize(all_results, by=["method", "cell_line"]), show=False)
    with pytest.raises(ValueError, match="method_key"):
        pl.metric_comparison(results.drop(columns="method"), show=False)
    with pytest.raises(ValueError, match="order"):
        pl.metric_comparison(results, order=["nope"], show=False)
    with pytest.raises(TypeError, match="DataFrame"):
        pl.metric_comparison([1, 2], show=False)


# ----------------------------------------------------------------- training_history
def test_training_history_lines_match_history(trained):
    model, _ = trained
    axes = pl.training_history(model, panels=["energy", "loss", "active_ratio"], show=False)
    assert [a.get_title() for a in axes] == ["energy", "loss", "active_ratio"]
    keys = {"energy": "energy", "loss": "loss", "active_ratio": "active_ratio"}
    for ax in axes:
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        for split in ("train", "validation"):
            frame = model.history[f"{split}_{keys[ax.get_title()]}"]
            np.testing.assert_array_equal(lines[split].get_xdata(), frame.index.to_numpy())
            np.testing.assert_allclose(lines[split].get_ydata(), frame.iloc[:, 0].to_numpy(float))
        if model.best_epoch_ is not None:
            assert lines["kept weights"].get_xdata()[0] == model.best_epoch_


def test_training_history_from_dict_and_defaults(trained):
    model, _ = trained
    history = {k: v for k, v in model.history.items() if "active" not in k}
    ax = pl.training_history(history, show=False)  # no active ratio recorded: one panel
    assert ax.get_title() == "energy"
    assert len(ax.get_lines()) == 2
    with pytest.raises(ValueError, match="active_ratio"):
        pl.training_history(history, panels="active_ratio", show=False)
    with pytest.raises(ValueError, match="Unknown panel"):
        pl.training_history(model, panels="nope", show=False)


def test_training_history_untrained_model(adata):
    ptrag_sc.PTRAG.setup_anndata(adata)
    model = ptrag_sc.PTRAG(
        adata, perturbation_embeddings=adata.uns["gene_embeddings"], n_hidden=16
    )
    with pytest.raises(RuntimeError, match="not trained"):
        pl.training_history(model, show=False)
    with pytest.raises(TypeError, match="PTRAG model"):
        pl.training_history(42, show=False)


# --------------------------------------------------------------------- save / show
@pytest.mark.parametrize("suffix", ["png", "pdf", "svg"])
def test_save_writes_a_file(scored, trained, retrieval, results, tmp_path, suffix):
    model, _ = trained
    calls = {
        "shift": lambda p: pl.shift_scatter(
            scored, pred_layer="context_mean", split_key="split", save=p, show=False
        ),
        "heatmap": lambda p: pl.retrieval_heatmap(retrieval, save=p, show=False),
        "metric": lambda p: pl.metric_comparison(results, save=p, show=False),
        "history": lambda p: pl.training_history(model, save=p, show=False),
    }
    for name, call in calls.items():
        path = tmp_path / f"{name}.{suffix}"
        assert call(path) is not None
        assert path.exists(), name
        assert path.stat().st_size > 500, name


def test_show_none_returns_none_for_own_figure(results):
    assert pl.metric_comparison(results) is None
    assert pl.metric_comparison(results, show=True) is None
    assert pl.metric_comparison(results, show=False) is not None


# --------------------------------------------------------------------- confidence
def test_confidence_plots_each_pairs_mean_confidence_against_its_accuracy(trained):
    from scipy.stats import spearmanr

    model, data = trained
    data = data.copy()
    model.predict(data, key_added="pred")
    results = tl.evaluate(data, pred_layer="pred", split_key="split")
    ax = pl.confidence(data, results, confidence_key="pred_confidence", show=False)
    points = _scatter_collections(ax)[0].get_offsets()
    assert len(points) == len(results)
    groups = data.obs.groupby(["cell_line", "gene"], observed=True)["pred_confidence"].mean()
    expected = np.array([groups[(c, g)] for c, g in zip(results["cell_line"], results["gene"], strict=True)])
    np.testing.assert_allclose(np.sort(points[:, 0]), np.sort(expected), rtol=1e-6)
    np.testing.assert_allclose(np.sort(points[:, 1]), np.sort(results["pearson_delta"]), rtol=1e-6)
    rho = spearmanr(expected, results["pearson_delta"]).statistic
    assert ax.get_title() == f"Spearman {rho:.2f}, n = {len(results)}"
    with pytest.raises(ValueError, match="no column 'ptrag_confidence'"):
        pl.confidence(data, results, show=False)
    with pytest.raises(TypeError, match=r"tl\.evaluate"):
        pl.confidence(data, results.to_dict(), confidence_key="pred_confidence", show=False)


# --------------------------------------------------------------------- docstrings
@pytest.mark.parametrize("name", pl.__all__)
def test_docstring_examples_run(name):
    """Every public pl function documents a runnable example on the bundled data."""
    func = getattr(pl, name)
    tests = doctest.DocTestFinder().find(func, name, globs={})
    assert tests, name
    assert tests[0].examples, f"{name} has no Examples section"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"the example of {name} failed"
