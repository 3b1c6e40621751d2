"""The demo report (``ptrag-sc demo``): bottom line, sentences, figures, tables, save/reload,
and the files it refuses to replace."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import ptrag_sc
from ptrag_sc import _demo, _demo_report
from ptrag_sc._demo import PhaseLog, run_demo
from ptrag_sc._demo_report import (
    FILES,
    HEADLINE_METRICS,
    REPORT,
    SPLIT_HALF_DEFINITION,
    headline_sentence,
)

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Both default tasks, 30 training steps each, phase lines captured."""
    out = tmp_path_factory.mktemp("demo")
    stream = io.StringIO()
    summary = run_demo(out, max_steps=30, log=PhaseLog(True, stream))
    return out, summary, (out / REPORT).read_text(), stream.getvalue()


def _section(report: str, title: str) -> str:
    return report.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_report_opens_with_a_bottom_line_per_task(demo):
    report = demo[2]
    assert report.startswith("# ptrag_sc demo report\n\n## Bottom line\n\n")
    bottom = _section(report, "Bottom line")
    assert "**Few-shot cell line** (glioblastoma: 4 test perturbations in U87MG):" in bottom
    assert "**Unseen knockouts** (thp1: 5 test perturbations in THP-1):" in bottom
    for metric, (name, _) in HEADLINE_METRICS.items():
        lines = [line for line in bottom.splitlines() if line.startswith(f"- **{name}** (`{metric}`")]
        assert len(lines) == 2, metric  # one per task
        assert "n = 4 test perturbations" in lines[0]
        assert "n = 5 test perturbations" in lines[1]
        for line in lines:
            assert re.search(r"\*\*[\w-]+\*\* wins with|a tie between|no method has perturbation-specific signal", line), line
            assert ("lower is better" if metric in ptrag_sc.tl.LOWER_IS_BETTER else "higher is better") in line


def test_one_shift_methods_are_never_ranked_on_the_specific_metric(demo):
    report = demo[2]
    for line in report.splitlines():
        if line.startswith("- **Perturbation-specific"):
            assert "**control**" not in line, line
            assert "**context_mean**" not in line, line
            assert re.search(r"undefined for `control`(, | and )`context_mean`", line), line
    # in the tables too
    rows = [line for line in report.splitlines() if line.startswith(("| control |", "| context_mean |"))]
    assert len(rows) == 4
    assert all(line.split(" | ")[2] == "undefined" for line in rows)


def test_every_number_of_the_bottom_line_comes_from_the_results(demo):
    out, summary, report = demo[0], demo[1], demo[2]
    for task in ("glioblastoma", "thp1"):
        written = pd.read_csv(out / task / FILES["summary"])
        mine = summary[summary["task"] == task].drop(columns="task").reset_index(drop=True)
        pd.testing.assert_frame_equal(written, mine, check_dtype=False)
        model_mean = mine.set_index(["method", "metric"]).loc[(_demo_report.MODEL_NAME, "pearson_delta"), "mean"]
        assert f"{model_mean:.3f}" in _section(report, "Bottom line")


def test_split_half_has_one_definition_everywhere(demo):
    report = demo[2]
    assert report.count(SPLIT_HALF_DEFINITION) == 2  # once per task
    assert "data's own ceiling" not in report
    assert re.search(r"\d of 6 methods score above it here", report)
    header = next(line for line in report.splitlines() if line.startswith("| method |"))
    assert "split_half_pearson" not in header  # it describes the data, not a method

    def flat(text: str) -> str:
        return " ".join(text.replace("``", "`").split())

    core = flat(SPLIT_HALF_DEFINITION.split(":", 1)[1])  # "how noisy ... either half"
    for where in (ROOT / "docs" / "concepts.md", ROOT / "docs" / "benchmark.md", ROOT / "docs" / "faq.md"):
        text = flat(where.read_text())
        assert core in text, where
        assert "own ceiling" not in text, where
    assert core in flat(ptrag_sc.tl.evaluate.__doc__)


def test_phase_lines(demo):
    lines = demo[3].splitlines()
    phases = ["data", "training PT-RAG", "prediction", "save and reload", "scoring"]
    for i, task in enumerate(("glioblastoma", "thp1")):
        mine = lines[i * len(phases) : (i + 1) * len(phases)]
        assert [line.split("] ", 1)[1].split(":", 1)[0] for line in mine] == phases
        assert all(line.startswith(f"[{i + 1}/2 {task}] ") and re.search(r"; \d+ s$", line) for line in mine)
        assert "30/30 steps" in mine[1]
        assert "identical after reloading" in mine[3]
    assert lines[-1].startswith(f"report written: {demo[0] / REPORT}")
    assert len(lines) == 2 * len(phases) + 1


def test_report_knn_note(demo):
    # U87MG keeps 4 training perturbations and knn averages k = 5: it is the context mean
    report = demo[2]
    assert "`knn` equals `context_mean` here" in _section(report, "1. Few-shot cell line")
    assert "`knn` equals" not in _section(report, "2. Unseen knockouts")
    summary = demo[1]
    gbm = summary[summary["task"] == "glioblastoma"]
    knn = gbm[gbm["method"] == "knn"].set_index("metric")["mean"]
    ctx = gbm[gbm["method"] == "context_mean"].set_index("metric")["mean"]
    np.testing.assert_allclose(knn["pearson_delta"], ctx["pearson_delta"], rtol=1e-6)


def test_report_figures(demo):
    out, report = demo[0], demo[2]
    for task in ("glioblastoma", "thp1"):
        for key in ("shift_figure", "retrieval_figure", "history_figure"):
            name = f"{task}/{FILES[key]}"
            assert f"]({name})" in report, name
            data = (out / name).read_bytes()
            assert data.startswith(PNG), name
            assert len(data) > 10_000, name
    assert "A white cell is a candidate that stage 1 did not retrieve for that query" in report
    assert "`validation_loss`" in report
    assert "whose weights were kept (step " in report
    assert "retrieval_distance" not in report


def test_report_retrieval_tables(demo):
    report = demo[2]
    header = "| query | rank | candidate | candidate_cell_type | similarity | keep_probability | selected_fraction |"
    tables = report.split(header)[1:]
    assert len(tables) == 2
    for table, n_queries, cell_types in ((tables[0], 4, {"U87MG", "A172", "T98G", "k562"}), (tables[1], 5, {"THP-1"})):
        rows = table.split("\n\n", 1)[0].strip().splitlines()[1:]
        assert len(rows) == n_queries * _demo_report.RETRIEVAL_ROWS
        assert {row.split("|")[4].strip() for row in rows} <= cell_types


def test_report_settings(demo):
    settings = json.loads(demo[2].split("```json", 1)[1].split("```", 1)[0])
    assert settings["max_steps"] == 30
    assert settings["tasks"] == ["glioblastoma", "thp1"]
    assert settings["torch_threads"] == ptrag_sc.settings.num_threads
    assert settings["glioblastoma"]["cell_type"] == "U87MG"
    assert settings["glioblastoma"]["validation_perturbations"] == ["PLK4"]
    assert settings["thp1"]["test_perturbations"] == ptrag_sc.datasets.papalexi_thp1_folds()[0]
    assert settings["thp1"]["validation_perturbations"]  # held out by the model itself
    assert settings["thp1"]["steps_trained"] == 30


def test_csv_outputs(demo):
    out = demo[0]
    for task, n_test in (("glioblastoma", 4), ("thp1", 5)):
        folder = out / task
        methods = {_demo_report.MODEL_NAME, *_demo.TASKS[task].baselines}
        metrics = pd.read_csv(folder / FILES["metrics"])
        assert set(metrics["method"]) == methods
        assert len(metrics) == len(methods) * n_test
        summary = pd.read_csv(folder / FILES["summary"])
        assert set(summary["metric"]) == set(_demo_report.REPORT_METRICS)
        retrieval = pd.read_csv(folder / FILES["retrieval"])
        assert {"query", "candidate", "candidate_cell_type", "keep_probability", "selected"} <= set(retrieval.columns)
        assert retrieval["query"].nunique() == n_test
        history = pd.read_csv(folder / FILES["history"], index_col=0)
        assert {"train_loss", "validation_loss"} <= set(history.columns)
        assert (folder / FILES["model"] / "model.safetensors").exists()


def test_refuses_to_replace_an_earlier_run(demo):
    out = demo[0]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=r"already holds files of a demo run \(report.md, glioblastoma/metrics.csv"):
        run_demo(out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_prepare_output(tmp_path):
    tasks = ("glioblastoma",)
    mine = tmp_path / "notes.txt"
    mine.write_text("kept")
    assert _demo.prepare_output(tmp_path, tasks, overwrite=False) == tmp_path  # unrelated files are fine
    assert (tmp_path / "glioblastoma").is_dir()
    (tmp_path / "glioblastoma" / FILES["metrics"]).write_text("old")
    with pytest.raises(FileExistsError, match=r"glioblastoma/metrics\.csv"):
        _demo.prepare_output(tmp_path, tasks, overwrite=False)
    _demo.prepare_output(tmp_path, tasks, overwrite=True)
    for bad, match in (("", "non-empty"), (" ", "non-empty"), (None, "non-empty"), (mine, "existing file"), (mine / "x", "Cannot create")):
        with pytest.raises(ValueError, match=match):
            _demo.prepare_output(bad, tasks, overwrite=True)
    assert mine.read_text() == "kept"


def test_reload_check_fails_loudly(monkeypatch, tmp_path):
    """A reloaded model that predicts differently stops the demo."""
    load = ptrag_sc.PTRAG.load.__func__

    def load_and_change(cls, *args, **kwargs):
        model = load(cls, *args, **kwargs)
        next(model.module.parameters()).data.add_(1.0)
        return model

    monkeypatch.setattr(ptrag_sc.PTRAG, "load", classmethod(load_and_change))
    with pytest.raises(RuntimeError, match="predicts differently from the model that was saved"):
        run_demo(tmp_path, tasks=["synthetic"], max_steps=2, log=PhaseLog(False))


def test_demo_trains_with_the_model_default(monkeypatch, tmp_path):
    """Without ``max_steps`` the demo calls ``model.train(split_key="split")`` and nothing else."""
    calls = []

    class Stop(Exception):
        pass

    def train(self, *args, **kwargs):
        calls.append((args, kwargs))
        raise Stop

    monkeypatch.setattr(ptrag_sc.PTRAG, "train", train)
    stream = io.StringIO()
    with pytest.raises(Stop):
        run_demo(tmp_path, tasks=["thp1"], log=PhaseLog(True, stream))
    assert calls == [((), {"split_key": "split"})]
    # the phase line says where it failed
    assert stream.getvalue().splitlines()[-1] == "[1/1 thp1] training PT-RAG: failed"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": 2.5}, "max_steps"),
        ({"tasks": ["x"]}, "tasks"),
        ({"tasks": []}, "tasks"),
        ({"tasks": ["thp1", "thp1"]}, "tasks"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_demo_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_demo(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_phase_log_on_a_terminal_writes_whole_lines():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        log = PhaseLog(True, stream)
        with log.phase("[x] step") as done:
            if stream is pipe:
                assert stream.getvalue() == "[x] step: "  # visible while the phase runs
            else:
                assert stream.getvalue() == ""
            done.append("did it")
    assert terminal.getvalue() == pipe.getvalue() == "[x] step: did it; 0 s\n"
    silent = io.StringIO()
    with PhaseLog(False, silent).phase("[x] step") as done:
        done.append("did it")
    assert silent.getvalue() == ""


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
    assert "n = 4 test perturbations" in sentence
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
    assert "a tie between" in sentence
    assert "inside their 95% bootstrap intervals" in sentence


def test_sentence_no_specific_signal_and_one_shift_methods_left_out():
    # control has the highest value by noise; it predicts one shift for every perturbation
    results, summary = _fake(
        {"PT-RAG": [0.1, -0.2, 0.05, -0.1], "control": [0.9, 0.8, 0.9, 0.85], "linear": [-0.1, 0.2, -0.3, 0.1]},
        metric="pearson_pert_centred",
    )
    sentence = headline_sentence(results, summary, "pearson_pert_centred", one_shift=["control"])
    assert "no method has perturbation-specific signal here" in sentence
    assert "the highest is" in sentence
    assert "control" not in sentence.split("It is undefined")[0]
    assert "It is undefined for `control`, which predicts one shift for every perturbation" in sentence


def test_sentence_specific_signal_ranked_without_one_shift_methods():
    results, summary = _fake(
        {"PT-RAG": [0.5, 0.6, 0.55, 0.5], "control": [0.9, 0.8, 0.9, 0.85], "linear": [0.1, 0.0, 0.2, 0.1]},
        metric="pearson_pert_centred",
    )
    sentence = headline_sentence(results, summary, "pearson_pert_centred", one_shift=["control"])
    assert "**PT-RAG** wins with 0.537" in sentence
    assert "next best, linear" in sentence
    assert "**control**" not in sentence
