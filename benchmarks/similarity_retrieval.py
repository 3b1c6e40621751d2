"""How good are the stage-1 neighbours of each ``similarity`` choice? (no training needed)

Usage::

    python benchmarks/similarity_retrieval.py

For every entry (q, c) of a response memory built from all the cells of a dataset, stage 1 is
asked for q in c (its own entry is always left out) with each ``similarity`` option. The
query's other-cell-type entries, which every option ranks first, are set aside: the question is
whether the *other* perturbations it retrieves respond like q. Score: Pearson correlation
between q's perturbation-specific shift in c and the mean specific shift of its top-``k``
other-perturbation candidates (k = 1, 5), averaged over entries; "random" draws the k
candidates at random (mean of 20 draws).

Datasets: the bundled glioblastoma + K562 data (``datasets.perturbench_devel``, real GO
annotations; single perturbations only) and ``datasets.synthetic`` (3 lines x 120
perturbations, 500 genes, with the synthetic genes renamed to real human genes so that GO terms
exist; their GO terms are unrelated to the simulated effects, so GO should be no better than
random there: a negative control).

Writes ``benchmarks/results/screen/similarity_retrieval.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np
import pandas as pd

KS = (1, 5)
OPTIONS = ("embedding", "go", "response")


def memory_of(adata, embeddings):
    from ptrag_sc.data import PerturbationData, PerturbationEncoder, SetupArgs, memory_from_cells

    setup = SetupArgs(
        perturbation_key="gene",
        control_group="non-targeting",
        cell_type_key="cell_line",
        batch_key=None,
        layer=None,
        sep="+",
    )
    data = PerturbationData(adata, setup, adata.var_names)
    encoder = PerturbationEncoder(embeddings)
    return memory_from_cells(
        "response", data, np.ones(adata.n_obs, bool), encoder, evidence=()
    ), encoder


def score(memory, encoder, option, rng) -> dict:
    from ptrag_sc.data import NeighbourIndex
    from ptrag_sc.data._similarity import make_similarity

    perts = memory.perturbations.astype(str)
    cts = memory.cell_types.astype(str)
    specific = memory.specific
    out = {}
    if option == "random":
        for k in KS:
            values = []
            for i in range(len(perts)):
                pool = np.flatnonzero(perts != perts[i])
                draws = [
                    np.corrcoef(specific[i], specific[rng.choice(pool, k, replace=False)].mean(0))[
                        0, 1
                    ]
                    for _ in range(20)
                ]
                values.append(np.nanmean(draws))
            out[f"pearson_top{k}"] = float(np.nanmean(values))
        return out
    index = NeighbourIndex(
        memory, n_candidates=len(memory), backend="exact", similarity=make_similarity(option)
    )
    cand, _, _, _ = index.query(perts, encoder.embed(perts), cts)
    for k in KS:
        values = []
        for i in range(len(perts)):
            row = cand[i][cand[i] >= 0]
            row = row[perts[row] != perts[i]][:k]
            values.append(np.corrcoef(specific[i], specific[row].mean(0))[0, 1])
        out[f"pearson_top{k}"] = float(np.nanmean(values))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "screen")
    args = parser.parse_args(argv)
    import ptrag_sc
    from ptrag_sc.data._annotations import GeneAnnotations

    args.out.mkdir(parents=True, exist_ok=True)
    datasets = {}
    real = ptrag_sc.datasets.perturbench_devel()
    real = real[~real.obs["gene"].astype(str).str.contains("+", regex=False).to_numpy()].copy()
    datasets["bundled glioblastoma + K562 (real)"] = (real, real.uns["gene_embeddings"])
    syn = ptrag_sc.datasets.synthetic(
        n_cell_types=3,
        n_perturbations=120,
        n_genes=500,
        n_cells_per_perturbation=30,
        n_control_cells=200,
        n_batches=1,
        seed=0,
    )
    symbols = [
        g for g in pd.unique(GeneAnnotations().terms.index.astype(str).str.upper()) if g.isalnum()
    ][:2000:16][:120]
    rename = dict(zip(syn.uns["gene_embeddings"].index, symbols, strict=True))
    syn.obs["gene"] = (
        syn.obs["gene"].astype(str).map(lambda g: rename.get(g, g)).astype("category")
    )
    datasets["synthetic, renamed to real genes (GO unrelated: negative control)"] = (
        syn,
        syn.uns["gene_embeddings"].rename(index=rename),
    )
    rows = []
    for name, (adata, embeddings) in datasets.items():
        memory, encoder = memory_of(adata, embeddings)
        rng = np.random.default_rng(0)
        for option in (*OPTIONS, "random"):
            rows.append(
                {
                    "dataset": name,
                    "similarity": option,
                    "entries": len(memory),
                    **score(memory, encoder, option, rng),
                }
            )
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out / "similarity_retrieval.csv", index=False)
    text = "\n".join(
        [
            "# Stage-1 neighbours by similarity choice",
            "",
            "`python benchmarks/similarity_retrieval.py` (no training; "
            f"{platform.platform()}, {os.cpu_count()} CPUs). Mean Pearson between a memory "
            "entry's specific shift and "
            "the mean specific shift of its top-k candidates of *other* perturbations (its own "
            "entries left out).",
            "",
            frame.to_markdown(index=False, floatfmt=".3f"),
            "",
        ]
    )
    (args.out / "similarity_retrieval.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
