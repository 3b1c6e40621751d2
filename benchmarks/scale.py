"""Out-of-core training and prediction at 1M cells x 2,000 genes, with the peak resident memory.

Usage::

    python benchmarks/scale.py                      # 1,000,000 cells (the preset, scaled)
    python benchmarks/scale.py --cells-per-perturbation 5 --controls 2000 --out /tmp/scale-smoke

Three steps, each in its own process so that each peak resident set size (``VmHWM``) is its own:

1. ``build``: the ``replogle_nadig_like`` preset of :func:`ptrag_sc.datasets.synthetic` scaled
   to ``4 x (controls + 2,000 x cells-per-perturbation)`` cells (1,000,000 by default) is written
   to an h5ad file chunk by chunk (CSR ``X``, float32, 64-bit ``indptr``): the generator's
   expression step is run on consecutive blocks of cells and each block is appended to the file,
   so the whole matrix is never in memory. Same random stream as the in-memory generator, so the
   file holds exactly the cells ``synthetic(...)`` would return. Skipped when the file exists.
2. ``run``: the file is opened with ``anndata.read_h5ad(path, backed="r")``; ``setup_anndata``,
   the model, ``train`` (default options, ``max_steps`` steps) and a counterfactual
   ``predict(adata, output=...)`` writing a new h5ad chunk by chunk. Timings of each phase
   (opening, setup, model, the memory build, the training groups, the optimisation, prediction)
   and the peak RSS after each phase.
3. the tables: ``benchmarks/results/scale/scale.json`` and ``scale.md`` (or under ``--out``).

Everything runs with ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report as report

RESULTS = Path(__file__).parent / "results" / "scale"
N_PERTURBATIONS = 2000  # the preset's
N_CELL_TYPES = 4  # the preset's
#: Cells per block appended to the file (a multiple of the generator's own chunk of 2,097 rows,
#: so the random stream is the in-memory generator's).
BLOCK_CHUNKS = 24


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (``VmHWM``), GiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def rss_gib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def machine() -> str:
    load = os.getloadavg()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    cpu = report.cpu_name()
    average = "/".join(f"{value:.1f}" for value in load[:3])
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, load average {average}"


# ----------------------------------------------------------------------------------- build
def build(
    path: Path, cells_per_perturbation: int, controls: int, n_perturbations: int = N_PERTURBATIONS
) -> dict:
    """Write the scaled preset to ``path`` without holding its expression matrix in memory."""
    import h5py
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    import ptrag_sc.datasets._synthetic as synthetic_module

    original = synthetic_module._simulate_expression
    tmp = path.with_suffix(".partial.h5ad")
    state = {"rows": 0, "nnz": 0, "seconds": 0.0}

    def streamed(rng, *, cell_line, cell_group, cell_batch, size_factor, chunk, sparse, **kwargs):
        # Called once by `synthetic` with the whole design: simulate consecutive blocks of a
        # multiple of `chunk` rows (the random stream is consumed exactly as in one call) and
        # append each to the file; `synthetic` gets an empty matrix of the right shape back.
        t0 = time.perf_counter()
        n_obs, n_genes = cell_line.shape[0], kwargs["base"].shape[1]
        block = chunk * BLOCK_CHUNKS
        with h5py.File(tmp, "w") as f:
            for start in range(0, n_obs, block):
                rows = slice(start, min(start + block, n_obs))
                part = original(
                    rng,
                    cell_line=cell_line[rows],
                    cell_group=cell_group[rows],
                    cell_batch=cell_batch[rows],
                    size_factor=size_factor[rows],
                    chunk=chunk,
                    sparse=True,
                    **kwargs,
                )
                part = sp.csr_matrix(
                    (part.data, part.indices.astype(np.int32), part.indptr.astype(np.int64)),
                    shape=part.shape,
                )
                if start == 0:
                    write_elem(f, "X", part, dataset_kwargs={"indptr_dtype": np.int64})
                else:
                    sparse_dataset(f["X"]).append(part)
                state["rows"] += part.shape[0]
                state["nnz"] += part.nnz
                print(f"  {state['rows']:,} / {n_obs:,} cells written", flush=True)
        state["seconds"] = time.perf_counter() - t0
        return sp.csr_matrix((n_obs, n_genes), dtype=np.float32)

    t0 = time.perf_counter()
    synthetic_module._simulate_expression = streamed
    try:
        adata = synthetic_module.synthetic(
            preset="replogle_nadig_like",
            n_perturbations=n_perturbations,
            n_cells_per_perturbation=cells_per_perturbation,
            n_control_cells=controls,
            seed=0,
        )
    finally:
        synthetic_module._simulate_expression = original
    with h5py.File(tmp, "a") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        for key in ("obs", "var", "uns"):
            write_elem(f, key, getattr(adata, key) if key != "uns" else dict(adata.uns))
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, key, {})
    tmp.rename(path)
    return {
        "n_obs": int(adata.n_obs),
        "n_vars": int(adata.n_vars),
        "nnz": int(state["nnz"]),
        "density": state["nnz"] / (adata.n_obs * adata.n_vars),
        "file_gib": path.stat().st_size / 1024**3,
        "expression_seconds": state["seconds"],
        "total_seconds": time.perf_counter() - t0,
        "peak_rss_gib": peak_rss_gib(),
    }


# ------------------------------------------------------------------------------------- run
class Phases:
    """Wall time, call count and peak RSS after each instrumented phase."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def record(self, name: str, seconds: float) -> None:
        row = self.rows.setdefault(name, {"seconds": 0.0, "calls": 0})
        row["seconds"] += seconds
        row["calls"] += 1
        row["peak_rss_gib_after"] = peak_rss_gib()
        row["rss_gib_after"] = rss_gib()

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, time.perf_counter() - t0)

    def wrap(self, owner, attribute: str, name: str) -> None:
        """Time every call of ``owner.attribute`` under ``name``."""
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.record(name, time.perf_counter() - t0)

        setattr(owner, attribute, timed)


def run(path: Path, *, max_steps: int, output: Path, threads: int) -> dict:
    """Backed training and chunked counterfactual prediction on ``path``; timings and peak RSS."""
    import torch

    torch.set_num_threads(threads)
    import anndata
    import scvi

    import ptrag_sc
    from ptrag_sc.data import ModelState, _builder, _checks, _sets, _writers
    from ptrag_sc.model import _predict, _training
    from ptrag_sc.train import PTRAGTrainingPlan

    ptrag_sc.settings.progress_bar = False
    scvi.settings.seed = 0
    phases = Phases()
    # Parts of `setup_anndata`, `train` and `predict`, timed where they happen.
    phases.wrap(_checks, "check_expression", "input check (a pass over X)")
    phases.wrap(_predict, "check_expression", "input check (a pass over X)")
    phases.wrap(ModelState, "build_memory", "train: retrieval memory (a pass over X)")
    phases.wrap(_builder.SetBuilder, "control_contexts", "control means (a pass over controls)")
    phases.wrap(
        _builder.SetBuilder,
        "training_groups",
        "train: groups, candidates, evidence (a pass over X)",
    )
    phases.wrap(_training, "column_max", "train: gene ceilings (a pass over X)")
    phases.wrap(_training, "run_trainer", "train: optimisation and validation (Lightning)")
    phases.wrap(_sets.SetBatchDataset, "__getitem__", "train: reading rows and assembling batches")
    phases.wrap(PTRAGTrainingPlan, "training_step", "train: training steps (forward)")
    phases.wrap(PTRAGTrainingPlan, "validation_step", "train: validation steps (forward)")
    phases.wrap(_builder.SetBuilder, "prediction_groups", "predict: groups, candidates, evidence")
    phases.wrap(_predict, "generate", "predict: model and writing the batches")
    phases.wrap(_builder, "make_batch", "predict: reading rows and assembling batches")
    phases.wrap(_writers.H5ADWriter, "write", "predict: writing predicted rows")
    phases.wrap(_writers.H5ADWriter, "finish", "predict: copying control rows to the file")

    info = {"machine_before": machine(), "threads": threads, "max_steps": max_steps}
    with phases.phase("open (read_h5ad backed='r')"):
        adata = anndata.read_h5ad(path, backed="r")
    embeddings = adata.uns["gene_embeddings"]
    with phases.phase("setup_anndata"):
        ptrag_sc.PTRAG.setup_anndata(adata, batch_key="gem_group")
    with phases.phase("model"):
        model = ptrag_sc.PTRAG(adata, perturbation_embeddings=embeddings)
    with phases.phase("train (total)"):
        model.train(max_steps=max_steps)
    output.unlink(missing_ok=True)
    with phases.phase("predict (total), output= h5ad"):
        result = model.predict(adata, output=output)
    # Spot check: control rows are copies of the input; predicted rows are finite and bounded.
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(adata.n_obs, 2000, replace=False))
    predicted = result.obs["ptrag_predicted"].to_numpy()
    got = result.X[rows]
    source = adata.X[rows].toarray()
    info.update(
        n_obs=int(adata.n_obs),
        n_vars=int(adata.n_vars),
        memory_entries=len(model.memory),
        training_steps=int(phases.rows["train: training steps (forward)"]["calls"]),
        validation_batches=int(
            phases.rows.get("train: validation steps (forward)", {"calls": 0})["calls"]
        ),
        best_step=model.best_step_,
        predicted_cells=int(predicted.sum()),
        output_gib=output.stat().st_size / 1024**3,
        controls_copied_exactly=bool(
            np.array_equal(got[~predicted[rows]], source[~predicted[rows]])
        ),
        predictions_finite=bool(np.isfinite(got).all()),
        peak_rss_gib=peak_rss_gib(),
        phases=phases.rows,
        machine_after=machine(),
        torch=torch.__version__,
    )
    result.file.close()
    return info


# ---------------------------------------------------------------------------------- tables
def table(build_info: dict, result: dict) -> str:
    lines = [
        f"### Out-of-core PT-RAG at {result['n_obs']:,} cells x {result['n_vars']:,} genes "
        "(backed h5ad)",
        "",
        f"Machine: {result['machine_before']} at the start of the run, {result['machine_after']} "
        "at its end "
        f"(other jobs shared the 2 cores). {result['threads']} torch thread; torch "
        f"{result['torch']}.",
        "",
        f"Data: the `replogle_nadig_like` preset scaled to {result['n_obs']:,} cells (4 cell "
        "lines x "
        f"(10,000 controls + 2,000 perturbations x 120 cells)), CSR float32 h5ad of "
        f"{build_info.get('file_gib', float('nan')):.2f} GiB (density "
        f"{build_info.get('density', float('nan')):.3f}); "
        f"written chunk by chunk in {build_info.get('total_seconds', float('nan')):.0f} s with a "
        "peak RSS of "
        f"{build_info.get('peak_rss_gib', float('nan')):.2f} GiB (its own process).",
        "",
        f"Run: `read_h5ad(backed='r')`, `setup_anndata`, `PTRAG(...)` with default options, "
        f"`train(max_steps={result['max_steps']})` (default validation: held-out groups, early "
        "stopping), "
        f"`predict(adata, output=...)` (counterfactual, every perturbed cell, written to a new "
        f"{result['output_gib']:.2f} GiB h5ad). Memory: {result['memory_entries']:,} entries; "
        f"{result['training_steps']} training steps, {result['validation_batches']} validation "
        "batches; "
        f"{result['predicted_cells']:,} cells predicted.",
        "",
        f"**Peak RSS of the training + prediction process: {result['peak_rss_gib']:.2f} GiB** "
        f"(control rows copied exactly: {result['controls_copied_exactly']}; predictions finite: "
        f"{result['predictions_finite']}).",
        "",
        "| phase | seconds | calls | peak RSS after (GiB) |",
        "|:--|--:|--:|--:|",
    ]
    for name, row in result["phases"].items():
        lines.append(
            f"| {name} | {row['seconds']:.1f} | {row['calls']} | {row['peak_rss_gib_after']:.2f} |"
        )
    lines.append("")
    lines.append(
        "Phases nest: the `train:` and `predict:` rows are parts of the totals; the input check "
        "and the control means occur in setup, train and predict."
    )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="?", default="all", choices=["all", "build", "run"])
    parser.add_argument("--data", type=Path, default=None, help="h5ad file to build or reuse")
    parser.add_argument("--cells-per-perturbation", type=int, default=120)
    parser.add_argument("--controls", type=int, default=10_000)
    parser.add_argument("--perturbations", type=int, default=N_PERTURBATIONS)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--json", type=Path, default=None, help="(run) where to write the run's result"
    )
    args = parser.parse_args()
    n_cells = N_CELL_TYPES * (args.controls + args.perturbations * args.cells_per_perturbation)
    data = args.data or Path(os.environ.get("TMPDIR", "/tmp")) / f"ptrag_scale_{n_cells}.h5ad"
    build_json = data.with_suffix(".build.json")
    if args.command == "build":
        info = build(data, args.cells_per_perturbation, args.controls, args.perturbations)
        info["machine"] = machine()
        build_json.write_text(json.dumps(info, indent=1))
        return
    if args.command == "run":
        result = run(
            data,
            max_steps=args.max_steps,
            output=data.with_suffix(".predicted.h5ad"),
            threads=args.threads,
        )
        args.json.write_text(json.dumps(result, indent=1))
        return
    script = [sys.executable, __file__, "--data", str(data), "--threads", str(args.threads)]
    if not data.exists():
        print(f"building {data} ...", flush=True)
        subprocess.run(
            [
                *script,
                "build",
                "--cells-per-perturbation",
                str(args.cells_per_perturbation),
                "--controls",
                str(args.controls),
                "--perturbations",
                str(args.perturbations),
            ],
            check=True,
        )
    build_info = json.loads(build_json.read_text()) if build_json.exists() else {}
    args.out.mkdir(parents=True, exist_ok=True)
    result_json = args.out / "run.json"
    subprocess.run(
        [*script, "run", "--max-steps", str(args.max_steps), "--json", str(result_json)],
        check=True,
    )
    result = json.loads(result_json.read_text())
    (args.out / "scale.json").write_text(
        json.dumps({"build": build_info, "run": result}, indent=1)
    )
    result_json.unlink()
    text = table(build_info, result)
    (args.out / "scale.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
