"""Speed of an in-silico screen (``ptrag_sc.tl.screen``) of 20,000 genes.

Usage::

    # 20,000 genes; 64 and 500 control cells; energy path
    python benchmarks/screen_speed.py
    python benchmarks/screen_speed.py --n-genes 2000 --no-energy   # a quick check

Setup: a default :class:`ptrag_sc.PTRAG` (response memory, H=128, 4 layers, K=32) on
``synthetic(preset="replogle_nadig_like")`` scaled to 300 perturbations x 4 cell lines (20 cells
each, 500 control cells per line, 2,000 genes, 1,536-d embeddings: GenePT's size), so the memory
holds 1,200 entries. The model is trained for a few steps only: the cost of a screen does not
depend on the weights. Random 1,536-d embeddings are added for real human gene symbols (from
the shipped GO annotations) until ``--n-genes`` genes have a vector; the screen then predicts
every one of them for the k562 control cells.

Rows of the table: the set-level path (response memory: the encoders and stage 2 run, no cell
is decoded) with ``n_cells=64`` (the default) and ``n_cells=500`` (every control cell of the line,
cut into 8 sets per gene), and the generative path (``effect="energy"``: cells are decoded, as a
model without a response memory needs) with ``n_cells=64``.

Writes ``benchmarks/results/screen/speed.csv`` and ``speed.md`` (machine, threads and load noted).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

DATA = {
    "preset": "replogle_nadig_like",
    "n_perturbations": 300,
    "n_cells_per_perturbation": 20,
    "n_control_cells": 500,
    "embedding_dim": 1536,
    "sparse": False,
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n-genes",
        type=int,
        default=20_000,
        help="genes with an embedding to screen (default 20,000)",
    )
    parser.add_argument(
        "--n-cells",
        type=int,
        nargs="+",
        default=[64, 500],
        help="control cells per gene (default: 64 500)",
    )
    parser.add_argument(
        "--no-energy", action="store_true", help="skip the generative path (effect='energy')"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=30,
        help="training steps before the screen (speed does not depend on them)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "screen")
    args = parser.parse_args(argv)

    import scvi
    import torch

    import ptrag_sc
    from ptrag_sc.data._annotations import GeneAnnotations

    torch.set_num_threads(args.threads)
    ptrag_sc.settings.progress_bar = False
    scvi.settings.seed = 0
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()

    t0 = time.perf_counter()
    adata = ptrag_sc.datasets.synthetic(seed=0, **DATA)
    data_seconds = time.perf_counter() - t0
    ptrag_sc.PTRAG.setup_anndata(adata)
    model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"])
    t0 = time.perf_counter()
    model.train(max_steps=args.train_steps, validation_size=0)
    train_seconds = time.perf_counter() - t0

    have = set(model.perturbation_embeddings.index)
    symbols = pd.unique(GeneAnnotations().terms.index.astype(str).str.upper())
    names = [g for g in symbols if g not in have][: max(0, args.n_genes - len(have))]
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(names), model.perturbation_embeddings.shape[1])).astype(
        np.float32
    )
    model.add_perturbation_embeddings(
        pd.DataFrame(vectors, index=names, columns=model.perturbation_embeddings.columns)
    )
    n_genes = model.perturbation_embeddings.shape[0]
    n_controls = int(
        ((adata.obs["gene"] == "non-targeting") & (adata.obs["cell_line"] == "k562")).sum()
    )
    print(
        f"data {data_seconds:.0f}s, train {train_seconds:.0f}s; screening {n_genes} genes on k562 "
        f"({n_controls} control cells)",
        flush=True,
    )

    runs = [("set level (response memory)", n, "shift_norm") for n in args.n_cells]
    if not args.no_energy:
        runs.append(("generative (cells decoded)", 64, "energy"))
    rows = []
    for path, n_cells, effect in runs:
        t0 = time.perf_counter()
        table = ptrag_sc.tl.screen(model, cell_type="k562", n_cells=n_cells, effect=effect)
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "path": path,
                "effect": effect,
                "n_genes": len(table),
                "n_cells": min(n_cells, n_controls),
                "seconds": round(seconds, 1),
                "genes_per_second": round(len(table) / seconds, 1),
                "peak_rss_gib": round(peak_rss_gib(), 2),
                "load_average_1min": round(os.getloadavg()[0], 2),
            }
        )
        print(rows[-1], flush=True)
        pd.DataFrame(rows).to_csv(args.out / "speed.csv", index=False)

    frame = pd.DataFrame(rows)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    lines = [
        "# In-silico screen speed",
        "",
        f"`python benchmarks/screen_speed.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"Machine: {platform.platform()}, {cpus} CPU cores available, torch threads "
        f"{args.threads}; load average "
        f"(1 min) {load_start[0]:.1f} at the start (the machine was shared with other jobs, so "
        "these are upper bounds).",
        f"Model: default PTRAG (response memory of {len(model.memory)} entries, H=128, 4 layers, "
        "K=32, 2,000 genes, "
        f"1,536-d embeddings), trained {args.train_steps} steps. Screen: {n_genes} genes with an "
        "embedding, cell type k562 "
        f"({n_controls} control cells). Peak RSS is the whole process's (data and model "
        "included).",
        "",
        frame.to_markdown(index=False),
        "",
    ]
    (args.out / "speed.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
