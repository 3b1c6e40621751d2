"""Preprocessing: guide assignment, gene embeddings, gene texts, symbol resolution and few-shot
splits.

Perturbation labels of a screen with guide capture (ECCITE-seq, CROP-seq) come from its guide
counts (:func:`assign_guides`).

Gene embeddings (the perturbation features of PT-RAG) come either from a published table
(:func:`read_gene_embeddings`, e.g. GenePT's pickle) or are computed locally from gene texts
(:func:`gene_texts` -> :func:`embed_gene_text`). Perturbation labels are matched to the table
with :func:`resolve_gene_symbols`. :func:`few_shot_split` writes the paper's held-out cell-type
split.
"""

from __future__ import annotations

from .._symbols import SymbolResolution, resolve_gene_symbols
from ._embeddings import embed_gene_text, read_gene_embeddings
from ._gene_text import gene_text_from_annotations, gene_texts, read_gene_summaries
from ._guides import assign_guides
from ._split import few_shot_preset, few_shot_split

__all__ = [
    "SymbolResolution",
    "assign_guides",
    "embed_gene_text",
    "few_shot_preset",
    "few_shot_split",
    "gene_text_from_annotations",
    "gene_texts",
    "read_gene_embeddings",
    "read_gene_summaries",
    "resolve_gene_symbols",
]
