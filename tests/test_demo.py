"""The demo report (``ptrag-sc demo``): sentences, figures, tables, and a second run."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

import ptrag_sc
from ptrag_sc import _demo
from ptrag_sc._demo import FILES, HEADLINE_METRICS, headline_sentence, run_demo

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the demo twice into the same folder (the second run must overwrite the first)."""
    out = tmp_path_factory.mktemp("demo")
    first = run_demo(out, max_steps=30)
    (out / FILES["report"]).write_text("stale report of an earlier run")
    second = run_demo(out, max_steps=30)
    return out, first, second, (out / FILES["report"]).read_text()


def test_second_run_overwrites(demo):
    out, first, second, report = demo
    assert "stale report" not in report
    assert report.startswith("# ptrag_sc demo report")
    assert (out / FILES["model"] / "model.safetensors").exists()
    # the baselines are deterministic: the same numbers twice
    base = [m for m in first["method"].unique() if m != _demo.MODEL_NAME]
    a = first[first["method"].isin(base)].reset_index(drop=True)
    b = second[second["method"].isin(base)].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_report_headline_sentences(demo):
    report = demo[3]
    for metric, (name, _) in HEADLINE_METRICS.items():
        lines = [line for line in report.splitlines() if line.startswith(f"- **{name}** (`{metric}`")]
        assert len(lines) == 1, metric
        assert re.search(r"\*\*[\w-]+\*\* wins with|a tie between", lines[0]), lines[0]
        assert ("lower is better" if metric in ptrag_sc.tl.LOWER_IS_BETTER else "higher is better") in lines[0]


def test_report_split_half_is_not_a_ceiling(demo):
    report = demo[3]
    assert "data's own ceiling" not in report
    assert "It is not a ceiling for `pearson_delta`" in report
    assert re.search(r"\d of 6 methods score above it here", report)
    # split_half_pearson describes the data, not a method: not a column of the methods table
    header = next(line for line in report.splitlines() if line.startswith("| method |"))
    assert "split_half_pearson" not in header


def test_report_knn_note(demo):
    # U87MG keeps 4 training perturbations and knn averages k = 5: it is the context mean
    assert "`knn` equals `context_mean` here" in demo[3]
    summary = demo[1]
    knn = summary[summary["method"] == "knn"].set_index("metric")["mean"]
    ctx = summary[summary["method"] == "context_mean"].set_index("metric")["mean"]
    np.testing.assert_allclose(knn["pearson_delta"], ctx["pearson_delta"], rtol=1e-6)


def test_report_figures(demo):
    out, report = demo[0], demo[3]
    for key in ("shift_figure", "retrieval_figure", "history_figure"):
        name = FILES[key]
        assert f"]({name})" in report, name
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name


def test_report_retrieval_table(demo):
    report = demo[3]
    header = "| query | rank | candidate | candidate_cell_type | similarity | keep_probability | selected_fraction |"
    assert header in report
    rows = report.split(header, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]
    assert len(rows) == 4 * _demo._RETRIEVAL_ROWS
    cell_types = {row.split("|")[4].strip() for row in rows}
    assert cell_types <= {"U87MG", "A172", "T98G", "k562"}, cell_types


def test_report_settings(demo):
    report = demo[3]
    settings = json.loads(report.split("```json", 1)[1].split("```", 1)[0])
    assert settings["max_steps"] == 30
    assert settings["held_out_cell_line"] == "U87MG"
    assert settings["epochs_trained"] >= 1


def test_csv_outputs(demo):
    out = demo[0]
    methods = {_demo.MODEL_NAME, *_demo.BASELINE_METHODS}
    metrics = pd.read_csv(out / FILES["metrics"])
    assert set(metrics["method"]) == methods
    assert len(metrics) == len(methods) * len(_demo.TEST)
    assert set(metrics["gene"]) == set(_demo.TEST)
    summary = pd.read_csv(out / FILES["summary"])
    assert {"method", "metric", "mean", "ci_low", "ci_high"} <= set(summary.columns)
    assert set(summary["metric"]) == set(_demo.REPORT_METRICS)
    retrieval = pd.read_csv(out / FILES["retrieval"])
    assert {"query", "candidate", "candidate_cell_type", "keep_probability", "selected"} <= set(retrieval.columns)
    assert set(retrieval["query"]) == set(_demo.TEST)
    history = pd.read_csv(out / FILES["history"], index_col=0)
    assert "train_loss" in history.columns and len(history) >= 1


def test_demo_trains_with_the_model_default(monkeypatch, tmp_path):
    """Without ``max_steps`` the demo calls ``model.train(split_key="split")`` and nothing else."""
    calls = []

    class Stop(Exception):
        pass

    def train(self, *args, **kwargs):
        calls.append((args, kwargs))
        raise Stop

    monkeypatch.setattr(ptrag_sc.PTRAG, "train", train)
    with pytest.raises(Stop):
        run_demo(tmp_path)
    assert calls == [((), {"split_key": "split"})]


@pytest.mark.parametrize(("kwargs", "match"), [({"max_steps": 0}, "max_steps"), ({"max_steps": 2.5}, "max_steps"), ({"dataset": "x"}, "dataset")])
def test_demo_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_demo(tmp_path, **kwargs)


# --------------------------------------------------------- sentence logic
def _fake(values: dict[str, list[float]], metric: str = "pearson_delta"):
    genes = [f"G{i}" for i in range(len(next(iter(values.values()))))]
    results = pd.concat(
        [pd.DataFrame({"method": m, "cell_line": "A", "gene": genes, metric: v}) for m, v in values.items()],
        ignore_index=True,
    )
    return results, ptrag_sc.tl.summarize(results, by="method", metrics=[metric])


def test_sentence_win():
    results, summary = _fake({"PT-RAG": [0.8, 0.82, 0.79, 0.81], "context_mean": [0.5, 0.52, 0.49, 0.51]})
    sentence = headline_sentence(results, summary, "pearson_delta")
    assert "**PT-RAG** wins with 0.805" in sentence
    assert "0.300 above the next best, context_mean (0.505)" in sentence
    assert "excludes 0" in sentence


def test_sentence_tie_and_model_behind():
    results, summary = _fake(
        {"PT-RAG": [0.1, 0.2, 0.1, 0.2], "context_mean": [0.6, 0.5, 0.7, 0.6], "knn": [0.6, 0.5, 0.7, 0.6]}
    )
    sentence = headline_sentence(results, summary, "pearson_delta")
    assert "a tie between **context_mean** (0.600) and **knn** (0.600)" in sentence
    assert "PT-RAG scores 0.150, 0.450 below the best" in sentence


def test_sentence_lower_is_better_tie_inside_interval():
    results, summary = _fake({"PT-RAG": [0.30, 0.50, 0.40, 0.60], "linear": [0.35, 0.45, 0.45, 0.55]}, metric="energy")
    sentence = headline_sentence(results, summary, "energy")
    assert "lower is better" in sentence
    assert "a tie between" in sentence and "inside their 95% bootstrap intervals" in sentence
