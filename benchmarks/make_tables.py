"""Regenerate the README benchmark table and the results section of docs/benchmark.md.

Reads only the files written by ``run_benchmark.py`` (``summary.csv``, ``settings.json``,
``timings.csv`` of each dataset) and ``speed/speed.md`` from ``speed.py``; never trains.

Usage::

    python benchmarks/make_tables.py                     # rewrite README.md and docs/benchmark.md
    python benchmarks/make_tables.py --check             # exit 1 if they are out of date
    python benchmarks/make_tables.py --results /tmp/bench_smoke --readme /tmp/README.md --docs /tmp/benchmark.md

What is written
---------------
- ``README.md``, between ``<!-- benchmark-table:start -->`` and ``<!-- benchmark-table:end -->``:
  one compact table (dataset, metric, PT-RAG default, best baseline;
  "mean ± sd" over seeds; bold: the best of the shown columns and every value tied with it).
- ``docs/benchmark.md``, between ``<!-- BENCHMARK-RESULTS-START`` and ``<!-- BENCHMARK-RESULTS-END``:
  the machine and versions, then per dataset the evaluators' tables (cell-eval2's rescaled
  members, cell-eval and ``ptrag_sc.tl.evaluate``) with one sentence per headline metric saying
  who wins and whether the win is outside the noise, cell-eval2's refusals, the discrimination
  and confidence table, then the confidence pooled over the real datasets' held-out pairs (read
  from their ``results.csv``), then the speed tables.

Datasets whose result files predate the seeded harness (no ``evaluator`` column in
``summary.csv``) are skipped with a warning.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report as report

ROOT = Path(__file__).resolve().parent.parent
README_START, README_END = "<!-- benchmark-table:start -->", "<!-- benchmark-table:end -->"
DOCS_START, DOCS_END = "<!-- BENCHMARK-RESULTS-START", "<!-- BENCHMARK-RESULTS-END"
CELL_EVAL2_NOTE = (
    " cell-eval2's members are rescaled per (fold, cell type) between its generic mean response (0) and "
    "its split-half replicate (1); where cell-eval2 refuses to build one of the two, its refusal is quoted "
    "under the table, members whose two ends are finite and ordered are rescaled by hand (†) and the "
    "others are *not rescaled*; `cell_eval2.csv` holds every raw value, baseline, replicate and refusal."
)


def read_dataset(directory: Path) -> tuple[pd.DataFrame, dict, pd.DataFrame | None] | None:
    """``(summary, settings, timings)`` of one dataset, or None (missing or old format)."""
    summary_path, settings_path = directory / "summary.csv", directory / "settings.json"
    if not (summary_path.exists() and settings_path.exists()):
        return None
    summary = pd.read_csv(summary_path, keep_default_na=True)
    if "evaluator" not in summary.columns or "sd" not in summary.columns:
        print(f"make_tables: skipping {directory} (results predate the seeded harness; rerun run_benchmark.py)", file=sys.stderr)
        return None
    summary["error"] = summary["error"].fillna("").astype(str)
    summary["scored_by"] = summary["scored_by"].fillna("").astype(str) if "scored_by" in summary.columns else ""
    settings = json.loads(settings_path.read_text())
    timings_path = directory / "timings.csv"
    timings = pd.read_csv(timings_path) if timings_path.exists() else None
    return summary, settings, timings


def collect(results: Path, datasets: list[str] | None) -> list[tuple[str, pd.DataFrame, dict, pd.DataFrame | None]]:
    names = datasets or [d for d in report.DATASET_ORDER if (results / d).is_dir()]
    names += [] if datasets else sorted(p.name for p in results.iterdir() if p.is_dir() and p.name not in names and p.name != "speed")
    blocks = []
    for name in names:
        read = read_dataset(results / name)
        if read is not None:
            blocks.append((name, *read))
    return blocks


def machine_line(blocks) -> str:
    seen = {}
    for name, _, settings, _ in blocks:
        m, v = settings.get("machine", {}), settings.get("versions", {})
        key = (
            f"{m.get('platform', '?')}, {m.get('cpus_available', m.get('cpu_count', '?'))} CPUs available, "
            f"{m.get('torch_threads', '?')} torch thread(s); torch {v.get('torch')}, scvi-tools {v.get('scvi')}, "
            f"cell-eval {v.get('cell_eval')}, "
            + (f"cell-eval2 {v['cell_eval2']}, " if v.get("cell_eval2") else "")
            + f"ptrag_sc {v.get('ptrag_sc')} (commit {v.get('git_commit')})"
        )
        seen.setdefault(key, []).append(name)
    if len(seen) == 1:
        return f"Measured on {next(iter(seen))}."
    return "Measured on: " + "; ".join(f"{', '.join(v)}: {k}" for k, v in seen.items()) + "."


def docs_section(blocks, results: Path) -> str:
    lines = [
        "## Results",
        "",
        machine_line(blocks)
        + " Raw tables: `benchmarks/results/<dataset>/` (`results.csv` per seed, fold and pair; "
        "`summary.csv`; `timings.csv`; `settings.json`).",
        "",
        "Every value is the mean ± sd over training seeds of the per-seed mean over held-out (cell type, "
        "perturbation) pairs. Bold marks the best mean and every value tied with it: a difference smaller "
        "than the larger of the two sds is a tie. cell-eval's `discrimination_score_l1` is best at 1, ours "
        "(`discrimination_l1`) at 0; energy, W1 and W2 (ours) are computed in a 50-component PCA of each "
        "cell type's real cells. cell-eval refuses predictions with log1p values >= 15: such a method is "
        "shown as *refused*, never clipped."
        + (CELL_EVAL2_NOTE if any((summary["evaluator"] == report.CELL_EVAL2).any() for _, summary, _, _ in blocks) else ""),
        "",
    ]
    if not blocks:
        lines += ["No results in the current format yet: run `benchmarks/run_benchmark.py`.", ""]
    for name, summary, settings, timings in blocks:
        lines += [report.dataset_markdown(name, summary, settings, timings, level="###"), ""]
    lines += pooled_confidence_section(blocks, results)
    speed = results / "speed" / "speed.md"
    if speed.exists():
        body = "\n".join(("#" + line) if line.startswith("### ") else line for line in speed.read_text().splitlines())
        lines += ["### Speed", "", "From `benchmarks/speed.py` (`benchmarks/results/speed/`).", "", body.strip(), ""]
    return "\n".join(lines)


def pooled_confidence_section(blocks, results: Path) -> list[str]:
    """Markdown: Spearman between confidence and accuracy over every real dataset's held-out pairs."""
    real = {}
    for name, _, settings, _ in blocks:
        path = results / name / "results.csv"
        if settings.get("synthetic") is None and not settings.get("max_steps_override") and path.exists():
            real[name] = pd.read_csv(path)
    pooled = report.pooled_confidence(real)
    if pooled.empty:
        return []
    lines = [
        "### Confidence, pooled over the real datasets",
        "",
        "Spearman correlation between a model's per-pair mean confidence (`obs[\"ptrag_confidence\"]`) and its "
        "per-pair accuracy over the held-out pairs of every real dataset pooled (per seed, then mean ± sd over "
        "seeds; smoke tests left out):",
        "",
        "| method | accuracy | Spearman | seeds | pairs per seed | datasets |",
        "|---|---|---|---|---|---|",
    ]
    for r in pooled.itertuples():
        lines.append(f"| {r.method} | {r.accuracy} | {report.fmt(r.mean, r.sd)} | {r.n_seeds} | {r.n_pairs} | {r.datasets} |")
    return [*lines, ""]


def rewrite(path: Path, start: str, end: str, body: str, *, check: bool) -> bool:
    """Replace the block of ``path``; returns True when the file changed (or would change)."""
    text = path.read_text()
    new = report.replace_between(text, start, end, body)
    if new == text:
        return False
    if not check:
        path.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="directory of <dataset>/ result folders")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmark.md")
    parser.add_argument("--datasets", nargs="+", default=None, help=f"datasets, in order (default: those present of {list(report.DATASET_ORDER)})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = parser.parse_args(argv)
    blocks = collect(args.results, args.datasets)
    readme_blocks = [(name, summary, settings) for name, summary, settings, _ in blocks]
    changed = []
    if readme_blocks and rewrite(args.readme, README_START, README_END, report.readme_table(readme_blocks), check=args.check):
        changed.append(str(args.readme))
    if rewrite(args.docs, DOCS_START, DOCS_END, docs_section(blocks, args.results), check=args.check):
        changed.append(str(args.docs))
    verb = "out of date" if args.check else "rewritten"
    print(f"make_tables: {len(blocks)} dataset(s) read from {args.results}; {verb}: {changed or 'none'}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
