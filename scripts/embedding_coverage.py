"""Report gene-embedding coverage (summary / annotation / none) of the real perturbation sets.

Development script (reads the shared data folder, not used by the package)::

    python scripts/embedding_coverage.py [--quality]

``--quality`` also embeds the 86 Adamson genes with MiniLM from the summaries and from the
annotation texts, and compares their pairwise cosine similarities with the released GenePT
(ada-002) embeddings of the same genes (Spearman over gene pairs).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ptrag_sc import pp

DATA = Path("/work/shared/data")
SUMMARIES = DATA / "genept_gene_summaries" / "GeneSummary_NCBI_UniProt_1915genes.json.gz"


def _sets() -> dict[str, list[str]]:
    devel = ad.read_h5ad(DATA / "perturbench_devel" / "devel.h5ad", backed="r")
    genes = {
        g
        for label in devel.obs["condition"].astype(str).unique()
        if label != "control"
        for g in label.split("+")
    }
    split = pd.read_csv(DATA / "replogle_nadig_split" / "replogle_nadig_fewshot_split.csv")
    papalexi = ad.read_h5ad(
        DATA / "papalexi2021_thp1_sceptredata" / "papalexi2021_thp1_lowmoi_299genes.h5ad",
        backed="r",
    )
    datlinger = ad.read_h5ad(
        DATA / "datlinger2017_jurkat_scperturb_testdata" / "datlinger2017_jurkat_subset.h5ad",
        backed="r",
    )
    return {
        "perturbench_devel": sorted(genes),
        "replogle_nadig_split_val": split.loc[split["split"] == "val", "perturbation"].tolist(),
        "replogle_nadig_split_test": split.loc[split["split"] == "test", "perturbation"].tolist(),
        "replogle_nadig_split_all": split["perturbation"].tolist(),
        "papalexi2021_thp1": sorted(
            set(papalexi.obs["target_top"].astype(str)) - {"non-targeting"}
        ),
        "datlinger_jurkat": sorted(set(datlinger.obs["target_gene"].astype(str)) - {"control"}),
    }


def coverage() -> dict[str, list[str]]:
    summaries = pp.read_gene_summaries(SUMMARIES)
    sets = _sets()
    for name, genes in sets.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            texts = pp.gene_texts(genes, summaries=summaries)
        n_sum = int((texts["source"] == "summary").sum())
        n_ann = int((texts["source"] == "annotation").sum())
        none = [g for g in genes if g not in texts.index]
        renamed = texts[texts.index != texts["matched"]]
        print(
            f"{name}: {len(genes)} genes: summary {n_sum}, annotation {n_ann}, none {len(none)}"
            + (f" {none}" if none else "")
        )
        if len(renamed):
            print(
                "   resolved via alias:", dict(zip(renamed.index, renamed["matched"], strict=True))
            )
    return sets


def quality() -> None:
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ada = pp.read_gene_embeddings(
            DATA / "genept_gene_summaries" / "GenePT_embedding_small_adamson.csv.gz"
        )
    summaries = pp.read_gene_summaries(SUMMARIES)
    s_texts = pp.gene_texts(ada.index, summaries=summaries, annotations=False, warn=False)
    a_texts = pp.gene_texts(s_texts.index, warn=False)
    genes = [g for g in s_texts.index if g in a_texts.index]
    s_emb = pp.embed_gene_text(s_texts.loc[genes], show_progress=False, device="cpu")
    a_emb = pp.embed_gene_text(a_texts.loc[genes], show_progress=False, device="cpu")
    iu = np.triu_indices(len(genes), 1)

    def sims(df: pd.DataFrame) -> np.ndarray:
        x = df.loc[genes].to_numpy(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return (x @ x.T)[iu]

    ref = sims(ada)
    print(
        f"{len(genes)} Adamson genes, {len(iu[0])} pairs; Spearman of pairwise cosine vs GenePT ada:"
    )
    print(f"  MiniLM on summary text:    {spearmanr(ref, sims(s_emb)).statistic:.3f}")
    print(f"  MiniLM on annotation text: {spearmanr(ref, sims(a_emb)).statistic:.3f}")
    print(f"  summary vs annotation (MiniLM): {spearmanr(sims(s_emb), sims(a_emb)).statistic:.3f}")
    same = np.sum(s_emb.to_numpy() * a_emb.to_numpy(), axis=1)
    cross = s_emb.to_numpy() @ a_emb.to_numpy().T
    rank = (cross >= same[:, None]).sum(axis=1)
    print(
        f"  cos(summary, annotation) same gene: median {np.median(same):.3f}; "
        f"other genes: median {np.median(cross[~np.eye(len(genes), dtype=bool)]):.3f}; "
        f"same gene ranked first for {np.mean(rank == 1):.0%} of genes"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", action="store_true")
    args = parser.parse_args()
    coverage()
    if args.quality:
        quality()


if __name__ == "__main__":
    main()
