"""Tests of the benchmark's cell-eval2 summaries, discrimination and confidence measurements.

No training and no cell-eval2 run: the inputs are small hand-made frames (the confidence is a
fake column until the model writes ``obs["ptrag_confidence"]``). Run with
``python -m pytest benchmarks/tests -q``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import _report as report  # noqa: E402
import make_tables  # noqa: E402
import run_benchmark  # noqa: E402

MEMBERS = list(report.CELL_EVAL2_MEMBERS)


def _ce2(by_hand_fold: str | None = None, missing: tuple[str, str] | None = None) -> pd.DataFrame:
    """cell_eval2.csv rows: 3 seeds x 2 folds x 2 methods; a method's score is its centre + noise."""
    rng = np.random.default_rng(1)
    rows = []
    for seed in (0, 1, 2):
        for fold in ("f0", "f1"):
            for method, kind, centre in (("PT-RAG (default)", "model", 0.40), ("linear", "baseline", 0.20)):
                hand = fold == by_hand_fold
                scores = {m: centre + rng.normal(0, 0.01) for m in MEMBERS}
                if missing and fold == missing[0]:
                    scores[missing[1]] = np.nan
                for m in MEMBERS:
                    rows.append(
                        {
                            "seed": seed,
                            "fold": fold,
                            "method": method,
                            "kind": kind,
                            "cell_line": "X",
                            "metric": m,
                            "prediction": 0.5 + scores[m],
                            "baseline": 0.5,
                            "replicate": 1.5,
                            "score": scores[m],
                            "score_linear": scores[m],
                            "scored_by": "not rescaled" if np.isnan(scores[m]) else ("by hand" if hand else "cell-eval2"),
                            "refusal": "replicate anchor: ValueError: no lfc_nmae reference" if hand or np.isnan(scores[m]) else "",
                            "member_refusal": "ValueError: split 0 produced no usable value" if np.isnan(scores[m]) else "",
                            "n_members": 1,
                        }
                    )
                finite = [v for v in scores.values() if np.isfinite(v)]
                rows.append(
                    {
                        **rows[-1],
                        "metric": "mean",
                        "prediction": np.nan,
                        "baseline": np.nan,
                        "replicate": np.nan,
                        "score": float(np.mean(finite)),
                        "score_linear": float(np.mean(finite)),
                        "scored_by": "by hand" if hand or len(finite) < 6 else "cell-eval2",
                        "member_refusal": "",
                        "n_members": len(finite),
                    }
                )
    return pd.DataFrame(rows)


def _kinds(frame):
    return dict(zip(frame["method"], frame["kind"], strict=False))


def _row(summary, method, metric, evaluator=report.CELL_EVAL2):
    sub = summary[(summary.evaluator == evaluator) & (summary.method == method) & (summary.metric == metric)]
    assert len(sub) == 1, (method, metric)
    return sub.iloc[0]


def test_cell_eval2_summary_is_mean_and_sd_over_seeds_of_unit_means():
    ce2 = _ce2()
    summary = report.summarize_cell_eval2(ce2, kinds=_kinds(ce2))
    row = _row(summary, "PT-RAG (default)", "mean")
    per_seed = ce2[(ce2.method == "PT-RAG (default)") & (ce2.metric == "mean")].groupby("seed")["score"].mean()
    assert row["mean"] == pytest.approx(per_seed.mean())
    assert row["sd"] == pytest.approx(per_seed.std(ddof=1))
    assert row["n_pairs"] == 2  # (fold, cell type) units per seed
    assert row["scored_by"] == "cell-eval2"
    assert row["error"] == ""
    assert not row["lower_is_better"]
    # raw values carry the member's own direction
    assert _row(summary, "linear", "value:expr_mse_unbiased_capped_norm")["lower_is_better"]
    assert not _row(summary, "linear", "value:pds_cosine")["lower_is_better"]
    ranking = report.ranking(summary, report.CELL_EVAL2, "mean")
    assert ranking["best"] == "PT-RAG (default)"
    assert ranking["tied"] == ["PT-RAG (default)"]  # 0.40 vs 0.20 with sd ~0.01: outside the noise


def test_by_hand_scores_are_marked_and_their_refusal_kept():
    ce2 = _ce2(by_hand_fold="f1")
    summary = report.summarize_cell_eval2(ce2, kinds=_kinds(ce2))
    row = _row(summary, "PT-RAG (default)", "pds_cosine")
    assert np.isfinite(row["mean"])
    assert row["scored_by"] == "3 of 6 units by hand"
    assert "no lfc_nmae reference" in row["error"]
    table = report.evaluator_table(summary, report.CELL_EVAL2, report.TABLE_METRICS[report.CELL_EVAL2])
    assert table[0].startswith("| method | mean | pds | mse_norm")
    assert any(line.startswith("| PT-RAG (default) | **0.") and "†" in line for line in table)
    assert any("refusal" in line and "no lfc_nmae reference" in line for line in report.cell_eval2_refusals(summary))


def test_a_member_missing_in_one_unit_gets_no_mean_and_says_why():
    ce2 = _ce2(missing=("f0", "de_wilcoxon_lfc_nmae"))
    summary = report.summarize_cell_eval2(ce2, kinds=_kinds(ce2))
    row = _row(summary, "linear", "de_wilcoxon_lfc_nmae")
    assert np.isnan(row["mean"])
    assert row["error"].startswith("3 of 6 (fold, cell type) units without a value")
    assert "no usable value" in row["error"]  # the member's own refusal comes first
    assert "not rescaled" in " ".join(report.evaluator_table(summary, report.CELL_EVAL2))
    mean = _row(summary, "linear", "mean")
    assert np.isfinite(mean["mean"])
    assert "mean of 5-6 of 6 members" in mean["scored_by"]


def _pairs_with_fake_confidence(noise: float, seeds=(0, 1, 2), n=30) -> pd.DataFrame:
    """results.csv rows of one model whose fake confidence follows its accuracy (plus noise)."""
    rng = np.random.default_rng(2)
    rows = []
    for seed in seeds:
        accuracy = rng.uniform(0, 1, n)
        for i in range(n):
            rows.append(
                {
                    "seed": seed,
                    "fold": "f0",
                    "method": "PT-RAG (default)",
                    "kind": "model",
                    "cell_line": "X",
                    "gene": f"G{i}",
                    "pearson_delta": accuracy[i],
                    "pearson_pert_centred": -accuracy[i],
                    report.CONFIDENCE_COLUMN: accuracy[i] + rng.normal(0, noise),
                }
            )
            rows.append({**rows[-1], "method": "linear", "kind": "baseline", report.CONFIDENCE_COLUMN: np.nan})
    return pd.DataFrame(rows)


def test_confidence_spearman_per_seed():
    exact = report.summarize_confidence(_pairs_with_fake_confidence(0.0), kinds={})
    assert set(exact["method"]) == {"PT-RAG (default)"}  # baselines carry no confidence
    assert _row(exact, "PT-RAG (default)", "spearman_vs_pearson_delta", report.CONFIDENCE)["mean"] == pytest.approx(1.0)
    assert _row(exact, "PT-RAG (default)", "spearman_vs_pearson_pert_centred", report.CONFIDENCE)["mean"] == pytest.approx(-1.0)
    noisy = report.summarize_confidence(_pairs_with_fake_confidence(0.3), kinds={})
    row = _row(noisy, "PT-RAG (default)", "spearman_vs_pearson_delta", report.CONFIDENCE)
    assert 0.4 < row["mean"] < 0.95
    assert row["n_seeds"] == 3
    assert row["sd"] > 0
    # the same values, by scipy
    scipy_stats = pytest.importorskip("scipy.stats")
    frame = _pairs_with_fake_confidence(0.3)
    frame = frame[frame.method == "PT-RAG (default)"]
    by_scipy = [scipy_stats.spearmanr(f[report.CONFIDENCE_COLUMN], f["pearson_delta"])[0] for _, f in frame.groupby("seed")]
    assert row["mean"] == pytest.approx(np.mean(by_scipy))


def test_pooled_confidence_pools_the_pairs_of_every_dataset():
    a = _pairs_with_fake_confidence(0.0)
    b = _pairs_with_fake_confidence(0.0).assign(**{report.CONFIDENCE_COLUMN: lambda f: -f[report.CONFIDENCE_COLUMN]})
    pooled = report.pooled_confidence({"a": a, "b": b})
    row = pooled[(pooled.method == "PT-RAG (default)") & (pooled.accuracy == "pearson_delta")].iloc[0]
    assert row["n_pairs"] == 60
    assert row["datasets"] == "a, b"
    assert abs(row["mean"]) < 0.5  # +1 in one dataset, -1 in the other: pooled they cancel
    assert report.pooled_confidence({"a": a[a.method == "linear"]}).empty  # no confidence, no row


def test_pair_table_cosines_and_confidence():
    obs = pd.DataFrame(
        {
            "gene": ["non-targeting"] * 2 + ["A", "A", "B", "B", "C"],
            "cell_line": "X",
            "split": ["train"] * 2 + ["test"] * 5,
        },
        index=[f"c{i}" for i in range(7)],
    )
    x = np.zeros((7, 3), dtype=np.float32)
    evaluation = ad.AnnData(X=x, obs=obs)
    shifts = {"A": ([1.0, 0, 0], [1.0, 0, 0]), "B": ([0, 1.0, 0], [2.0, 0, 0]), "C": ([0, 0, 1.0], [3.0, 0, 0])}
    pairs = [("X", p, np.array(real), np.array(pred)) for p, (real, pred) in shifts.items()]
    confidence = np.array([np.nan, np.nan, 0.2, 0.2, 0.7, 0.7, 0.9])
    table = run_benchmark.pair_table(pairs, evaluation, confidence)
    np.testing.assert_allclose(table["cosine_to_others_pred"], 1.0)  # one shift for every perturbation
    np.testing.assert_allclose(table["cosine_to_others_real"], 0.0)  # orthogonal measured shifts
    np.testing.assert_allclose(table[report.CONFIDENCE_COLUMN], [0.2, 0.7, 0.9])
    assert run_benchmark.pair_table(pairs, evaluation, None)[report.CONFIDENCE_COLUMN].isna().all()


class _FakeModel:
    """Writes a prediction layer, a confidence column and an uns entry, as a model would."""

    def predict(self, adata, key_added):
        adata.layers[key_added] = np.asarray(adata.X) + 1
        adata.obs[key_added + "_confidence"] = np.linspace(0, 1, adata.n_obs)
        adata.obs["_scvi_labels"] = 0
        adata.uns["_scvi_uuid"] = "x"


def test_predict_with_confidence_reads_and_removes_what_the_model_adds():
    evaluation = ad.AnnData(X=np.ones((4, 2), dtype=np.float32), obs=pd.DataFrame({"gene": list("ABCD")}, index=list("abcd")))
    layer, confidence = run_benchmark.predict_with_confidence(_FakeModel(), evaluation)
    np.testing.assert_array_equal(layer, 2.0)
    np.testing.assert_allclose(confidence, np.linspace(0, 1, 4))
    assert list(evaluation.obs.columns) == ["gene"]
    assert not evaluation.layers
    assert "_scvi_uuid" not in evaluation.uns


def test_discrimination_table_and_make_tables_with_cell_eval2(tmp_path):
    ce2 = _ce2(by_hand_fold="f1")
    results = _pairs_with_fake_confidence(0.1).assign(cosine_to_others_pred=0.9, cosine_to_others_real=0.4)
    kinds = _kinds(results)
    summary = pd.concat(
        [
            report.summarize_seeds(results, our_metrics=["pearson_delta", *report.DISCRIMINATION_COLUMNS], lower_is_better={}, kinds=kinds),
            report.summarize_cell_eval2(ce2, kinds=kinds),
            report.summarize_confidence(results, kinds=kinds),
        ],
        ignore_index=True,
    )
    rows = report.discrimination_table(summary)
    assert "Spearman(confidence, pearson_delta)" in rows[0]
    model = next(line for line in rows if line.startswith("| PT-RAG (default)"))
    assert "0.900" in model
    assert "0.400" in model
    assert next(line for line in rows if line.startswith("| linear")).endswith("n/a | n/a |")
    # cosines are reported, never ranked
    assert report.ranking(summary, report.OURS, "cosine_to_others_pred")["best"] is None

    out = tmp_path / "results" / "thp1"
    out.mkdir(parents=True)
    summary.to_csv(out / "summary.csv", index=False)
    results.to_csv(out / "results.csv", index=False)
    (out / "settings.json").write_text(json.dumps({"dataset": "thp1", "title": "THP-1", "seeds": [0, 1, 2], "folds": ["f0", "f1"]}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- benchmark-table:start -->\n<!-- benchmark-table:end -->\n")
    docs = tmp_path / "benchmark.md"
    docs.write_text("<!-- BENCHMARK-RESULTS-START -->\n<!-- BENCHMARK-RESULTS-END -->\n")
    args = ["--results", str(tmp_path / "results"), "--readme", str(readme), "--docs", str(docs)]
    assert make_tables.main(args) == 0
    assert "cell-eval2 vcc2026, rescaled mean" in readme.read_text()
    doc = docs.read_text()
    assert "Scored by cell-eval2" in doc
    assert "### Confidence, pooled over the real datasets" in doc
    assert "| PT-RAG (default) | pearson_delta |" in doc
    assert make_tables.main([*args, "--check"]) == 0
