"""Concurrent saves: processes overwrite one model folder at the same moment; does it still load?

Usage::

    python benchmarks/concurrent_saves.py                     # 200 rounds, 4 writers
    python benchmarks/concurrent_saves.py --rounds 50 --label before

Each round, ``--writers`` processes (forked once, each holding one of two models with
different weights) wait at a barrier and call ``model.save(folder, overwrite=True)`` together;
then the folder is loaded and its weights compared with the two models. A round counts as
*unloadable* when the folder does not load, or loads weights that are neither model's (a
mix). A reader process loads the folder in a loop meanwhile; its failures (a load that met
the old folder while it was being removed) are counted apart: they leave nothing broken.

Appends a row to ``<output>/concurrent_saves.csv`` and rewrites ``concurrent_saves.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "results" / "faults"


def _models():
    import scvi
    import torch

    import ptrag_sc
    from ptrag_sc import PTRAG

    torch.set_num_threads(1)
    ptrag_sc.settings.progress_bar = False
    data = ptrag_sc.datasets.synthetic(
        n_cell_types=2,
        n_perturbations=4,
        n_genes=40,
        n_cells_per_perturbation=12,
        n_control_cells=24,
        seed=0,
    )
    PTRAG.setup_anndata(data)
    models = []
    for seed in (0, 1):
        scvi.settings.seed = seed
        model = PTRAG(
            data,
            perturbation_embeddings=data.uns["gene_embeddings"],
            n_hidden=32,
            n_layers=1,
            n_heads=2,
            cell_set_size=8,
            n_candidates=4,
            gene_annotations=None,
        )
        model.train(max_steps=2)
        models.append(model)
    return models


def _writer(model, folder: str, rounds: int, barrier, errors) -> None:
    for _ in range(rounds):
        barrier.wait()
        try:
            model.save(folder, overwrite=True)
        except Exception as exc:  # reported, and the round still checked
            errors.put(f"{type(exc).__name__}: {exc}")
        barrier.wait()


def _reader(folder: str, stop, counts) -> None:
    from ptrag_sc import PTRAG

    ok = failed = 0
    while not stop.is_set():
        if os.path.isdir(folder):
            try:
                PTRAG.load(folder, adata=False)
                ok += 1
            except Exception:
                failed += 1
    counts.put((ok, failed))


def _weights_of(model) -> dict:
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def run(rounds: int, n_writers: int) -> dict:
    import torch

    from ptrag_sc import PTRAG

    warnings.simplefilter("ignore")
    models = _models()
    references = [_weights_of(m) for m in models]
    context = multiprocessing.get_context(
        "fork"
    )  # the writers inherit the models: no import per process
    tmp = Path(tempfile.mkdtemp(prefix="ptrag_concurrent_"))
    folder = str(tmp / "model")
    barrier = context.Barrier(n_writers + 1)
    errors, counts, stop = context.Queue(), context.Queue(), context.Event()
    writers = [
        context.Process(target=_writer, args=(models[i % 2], folder, rounds, barrier, errors))
        for i in range(n_writers)
    ]
    reader = context.Process(target=_reader, args=(folder, stop, counts))
    for process in [*writers, reader]:
        process.start()
    unloadable, reasons, start = 0, [], time.perf_counter()
    for _ in range(rounds):
        barrier.wait()  # the writers save now
        barrier.wait()  # ... and are done
        try:
            loaded = PTRAG.load(folder, adata=False).module.state_dict()
            if not any(all(torch.equal(loaded[k], ref[k]) for k in ref) for ref in references):
                unloadable += 1
                reasons.append("weights of neither model")
        except Exception as exc:
            unloadable += 1
            reasons.append(f"{type(exc).__name__}: {str(exc)[:160]}")
    seconds = time.perf_counter() - start
    stop.set()
    for process in writers:
        process.join()
    ok, failed = counts.get()
    reader.join()
    save_errors = []
    while not errors.empty():
        save_errors.append(errors.get())
    leftovers = sorted(p.name for p in tmp.iterdir() if p.name != "model")
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "rounds": rounds,
        "writers": n_writers,
        "unloadable_rounds": unloadable,
        "save_errors": len(save_errors),
        "reader_loads_ok": ok,
        "reader_loads_failed": failed,
        "leftover_entries": len(leftovers),
        "seconds": round(seconds, 1),
        "first_problem": (reasons + save_errors + leftovers + [""])[0],
    }


def render(table: pd.DataFrame, output: Path) -> str:
    """Write ``concurrent_saves.md`` from the table of runs; returns its text."""
    lines = [
        "# Concurrent saves",
        "",
        "Each round, `writers` processes call `model.save(folder, overwrite=True)` at the same "
        "moment (a "
        "barrier); the folder is then loaded. *Unloadable*: it does not load, or holds weights of "
        "neither "
        "model. A reader process loads the folder in a loop meanwhile (its failed loads met a "
        "folder being "
        "replaced; they leave nothing broken). `before`: ptrag_sc at the start of issue 19; "
        "`after`: with "
        "atomic saves. Written by `benchmarks/concurrent_saves.py`.",
        "",
        table.drop(columns=["ptrag_sc"]).fillna("").to_markdown(index=False),
        "",
    ]
    text = "\n".join(lines)
    (output / "concurrent_saves.md").write_text(text)
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--label", default="after")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    import ptrag_sc

    result = {"label": args.label, **run(args.rounds, args.writers)}
    result["ptrag_sc"] = str(Path(ptrag_sc.__file__).parent)
    result["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    args.output.mkdir(parents=True, exist_ok=True)
    table_path = args.output / "concurrent_saves.csv"
    table = pd.read_csv(table_path) if table_path.exists() else pd.DataFrame()
    table = pd.concat(
        [table[table.get("label", pd.Series(dtype=str)) != args.label], pd.DataFrame([result])],
        ignore_index=True,
    )
    table.to_csv(table_path, index=False)
    print(render(table, args.output))
    sys.exit(0 if result["unloadable_rounds"] == 0 else 1)


if __name__ == "__main__":
    main()
