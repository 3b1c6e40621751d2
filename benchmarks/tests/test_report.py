"""Tests of the benchmark's summaries and tables (no training; a second or two).

Run with ``python -m pytest benchmarks/tests -q`` (not part of the package's test suite).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import _report as report  # noqa: E402
import make_tables  # noqa: E402


def _results(seeds=(0, 1, 2)) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for seed in seeds:
        for method, kind, centre in (("PT-RAG (default)", "model", 0.60), ("STATE+GenePT", "model", 0.30), ("context_mean", "baseline", 0.61)):
            for p in ("A", "B", "C"):
                rows.append(
                    {
                        "seed": seed,
                        "fold": "f0",
                        "method": method,
                        "kind": kind,
                        "cell_line": "X",
                        "gene": p,
                        "pearson_delta": centre + rng.normal(0, 0.02),
                        "energy": 1 - centre + rng.normal(0, 0.02),
                        "ce_pearson_delta": centre + rng.normal(0, 0.02),
                        "ce_error": "" if method != "STATE+GenePT" or seed != 1 else "predictions span [0, 27.9]",
                    }
                )
    return pd.DataFrame(rows)


def _summary(results: pd.DataFrame) -> pd.DataFrame:
    directions = {("ptrag_sc", "pearson_delta"): False, ("ptrag_sc", "energy"): True, ("cell-eval", "pearson_delta"): False}
    kinds = dict(zip(results["method"], results["kind"], strict=False))
    return report.summarize_seeds(results, our_metrics=["pearson_delta", "energy"], lower_is_better=directions, kinds=kinds)


def test_summary_is_mean_and_sd_of_per_seed_means():
    results = _results()
    summary = _summary(results)
    row = summary[(summary.evaluator == "ptrag_sc") & (summary.method == "STATE+GenePT") & (summary.metric == "pearson_delta")].iloc[0]
    per_seed = results[results.method == "STATE+GenePT"].groupby("seed")["pearson_delta"].mean()
    assert row["mean"] == pytest.approx(per_seed.mean())
    assert row["sd"] == pytest.approx(per_seed.std(ddof=1))
    assert row["n_seeds"] == 3
    assert row["n_pairs"] == 3


def test_refused_method_gets_no_cell_eval_mean():
    summary = _summary(_results())
    ce = summary[(summary.evaluator == "cell-eval") & (summary.method == "STATE+GenePT")].iloc[0]
    assert np.isnan(ce["mean"])
    assert "27.9" in ce["error"]
    lines = report.evaluator_table(summary, "cell-eval")
    assert any("STATE+GenePT | refused" in line for line in lines)


def test_tie_is_called_when_difference_is_within_the_larger_sd():
    summary = pd.DataFrame(
        {
            "evaluator": "ptrag_sc",
            "method": ["a", "b", "c"],
            "kind": ["model", "model", "baseline"],
            "metric": "pearson_delta",
            "mean": [0.60, 0.58, 0.30],
            "sd": [0.01, 0.03, 0.01],
            "n_seeds": 3,
            "n_pairs": 4,
            "lower_is_better": False,
            "error": "",
        }
    )
    r = report.ranking(summary, "ptrag_sc", "pearson_delta")
    assert r["best"] == "a"
    assert r["tied"] == ["a", "b"]
    assert "**tie**" in report.verdict(summary, "ptrag_sc", "pearson_delta", reference="b")
    summary.loc[1, "sd"] = 0.005
    text = report.verdict(summary, "ptrag_sc", "pearson_delta", reference="b")
    assert "**a wins**" in text
    assert "outside the noise" in text
    one_seed = summary.assign(sd=np.nan)
    assert "not measured" in report.verdict(one_seed, "ptrag_sc", "pearson_delta")


def test_make_tables_rewrites_only_the_marked_blocks(tmp_path):
    results = _results()
    out = tmp_path / "results" / "thp1"
    out.mkdir(parents=True)
    _summary(results).to_csv(out / "summary.csv", index=False)
    settings = {"dataset": "thp1", "title": "THP-1", "short": "THP-1", "seeds": [0, 1, 2], "folds": ["f0"], "max_steps_override": 20}
    (out / "settings.json").write_text(json.dumps(settings))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- benchmark-table:start -->\nOLDTABLE\n<!-- benchmark-table:end -->\noutro\n")
    docs = tmp_path / "benchmark.md"
    docs.write_text("# B\n<!-- BENCHMARK-RESULTS-START: x -->\nOLDDOCS\n<!-- BENCHMARK-RESULTS-END -->\n## After\n")
    args = ["--results", str(tmp_path / "results"), "--readme", str(readme), "--docs", str(docs)]
    assert make_tables.main(args) == 0
    text = readme.read_text()
    assert text.startswith("intro\n")
    assert text.endswith("outro\n")
    assert "OLDTABLE" not in text
    assert "PT-RAG (default)" in text
    assert "SMOKE TEST" in text
    assert "±" in text
    assert "STATE+GenePT" not in text  # the README compares the default with the baselines only
    doc = docs.read_text()
    assert "STATE+GenePT | refused" in doc
    assert "OLDDOCS" not in doc
    assert doc.endswith("## After\n")
    assert "### THP-1 (SMOKE TEST" in doc
    assert make_tables.main([*args, "--check"]) == 0  # idempotent
    readme.write_text(text.replace("±", "+-", 1))
    assert make_tables.main([*args, "--check"]) == 1
