"""Measure what stage 2 of PT-RAG keeps, for the figures quoted in docs/concepts.md.

Run from the repository root::

    python docs/_scripts/measure_retrieval.py            # writes docs/_static/retrieval_keep_rates.csv

Cases, each trained with the user's defaults (``model.train(split_key="split")``: early
stopping on held-out perturbations, best weights kept), seed 0, one torch thread:

- ``devel``: the bundled real data (``datasets.perturbench_devel``), U87MG held out (validation
  PLK4; test MAP2K3, MAPK1, SGK1, TGFBR2);
- ``thp1``: the bundled THP-1 knockouts (``datasets.papalexi_thp1``), the first of its test folds;
- ``synthetic``: ``datasets.synthetic`` (3 cell lines, 30 perturbations, 200 genes), 3
  validation and 6 test perturbations held out in ``cell_line_0``.

For the test perturbations of the held-out cell type, ``model.get_retrieval`` gives each
stage-1 candidate's ``selected_fraction`` (fraction of control cells that keep it; stage 2's
choices enter the cells' encodings) and the query's ``confidence``; the memory's evidence gives
the cell type's trust and each query's reliability (trust times gate: the scale of the stacked
sources). The table reports, separately for the same gene measured in other cell lines and for
every other candidate, the mean selected fraction, with the stacking weights, trust,
reliability, confidence and the training length.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scvi
import torch

import ptrag_sc

OUT = Path(__file__).resolve().parents[1] / "_static" / "retrieval_keep_rates.csv"
#: The candidates most cells keep (``selected``), per case and query.
KEPT = OUT.with_name("retrieval_kept.csv")


def _devel():
    adata = ptrag_sc.datasets.perturbench_devel()
    ptrag_sc.pp.few_shot_split(adata, held_out="U87MG", val=["PLK4"], test=["MAP2K3", "MAPK1", "SGK1", "TGFBR2"])
    return adata, "U87MG"


def _thp1():
    adata = ptrag_sc.datasets.papalexi_thp1()
    test = ptrag_sc.datasets.papalexi_thp1_folds()[0]
    adata.obs["split"] = np.where(adata.obs["gene"].isin(test), "test", "train")
    return adata, "THP-1"


def _synthetic():
    adata = ptrag_sc.datasets.synthetic(seed=0)
    genes = np.array(sorted(set(adata.obs["gene"].astype(str)) - {"non-targeting"}))
    held = np.random.default_rng(0).choice(genes, 9, replace=False)
    first = (adata.obs["cell_line"].astype(str) == "cell_line_0").to_numpy()
    gene = adata.obs["gene"].astype(str).to_numpy()
    split = np.full(adata.n_obs, "train", dtype=object)
    split[first & np.isin(gene, held[:3])] = "val"
    split[first & np.isin(gene, held[3:])] = "test"
    adata.obs["split"] = split
    return adata, "cell_line_0"


def measure(name: str, make, **model_kwargs) -> dict:
    adata, cell_type = make()
    scvi.settings.seed = 0
    ptrag_sc.PTRAG.setup_anndata(adata, perturbation_key="gene", cell_type_key="cell_line")
    model = ptrag_sc.PTRAG(adata, perturbation_embeddings=adata.uns["gene_embeddings"], **model_kwargs)
    start = time.perf_counter()
    model.train(split_key="split")
    seconds = time.perf_counter() - start
    tests = sorted(set(adata.obs.loc[adata.obs["split"] == "test", "gene"].astype(str)))
    table = model.get_retrieval(tests, cell_type=cell_type)
    same = (table["candidate"] == table["query"]).to_numpy()
    kept = table[table["selected"]].assign(case=name)
    n_queries = len(tests)
    evidence = model.memory.evidence_model
    trust = evidence.per_cell_type(np.array([cell_type]), evidence.cell_type_trust, evidence.trust_all)[0]
    reliability = table.groupby("query")["reliability"].first().loc[tests].to_numpy()
    return kept, {
        "case": name,
        "n_test_queries": n_queries,
        "steps": int(model.trainer.global_step),
        "best_step": model.best_step_,
        "train_seconds": round(seconds, 1),
        "stack_weights": " ".join(f"{s}={w:.2f}" for s, w in zip(evidence.sources, evidence.stack_weights, strict=True) if w > 0)
        or "none",
        "cell_type_trust": round(float(trust), 3),
        "query_reliability": " ".join(f"{q}={r:.2f}" for q, r in zip(tests, reliability, strict=True)),
        "mean_confidence": round(float(table.groupby("query")["confidence"].first().mean()), 3),
        "same_gene_candidates_per_query": round(same.sum() / n_queries, 2),
        "same_gene_selected_fraction": round(float(table.loc[same, "selected_fraction"].mean()), 3) if same.any() else np.nan,
        "other_candidates_per_query": round((~same).sum() / n_queries, 2),
        "other_selected_fraction": round(float(table.loc[~same, "selected_fraction"].mean()), 3),
    }


def main() -> int:
    torch.set_num_threads(1)
    ptrag_sc.settings.progress_bar = False
    scvi.settings.verbosity = logging.WARNING
    warnings.filterwarnings("ignore")
    cases = {
        "devel": (_devel, {}),
        "thp1": (_thp1, {}),
        "synthetic": (_synthetic, {}),
    }
    wanted = sys.argv[1:] or list(cases)
    rows, kept = [], []
    for name in wanted:
        make, kwargs = cases[name]
        kept_rows, row = measure(name, make, **kwargs)
        rows.append(row)
        kept.append(kept_rows)
        print(pd.DataFrame(rows[-1:]).T.to_string(header=False), flush=True)
    table, kept = pd.DataFrame(rows), pd.concat(kept, ignore_index=True)
    if OUT.exists() and KEPT.exists() and set(wanted) != set(cases):
        # Re-running some cases replaces their rows only.
        old, old_kept = pd.read_csv(OUT), pd.read_csv(KEPT)
        table = pd.concat([old[~old["case"].isin(wanted)], table], ignore_index=True)
        kept = pd.concat([old_kept[~old_kept["case"].isin(wanted)], kept], ignore_index=True)
    order = {name: i for i, name in enumerate(cases)}
    table = table.sort_values("case", key=lambda c: c.map(order), kind="stable")
    kept = kept.sort_values("case", key=lambda c: c.map(order), kind="stable")
    table.to_csv(OUT, index=False)
    kept[["case", *[c for c in kept.columns if c != "case"]]].round(3).to_csv(KEPT, index=False)
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
