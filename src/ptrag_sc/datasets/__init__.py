"""Example and synthetic Perturb-seq datasets.

- :func:`perturbench_devel`: a real multi-cell-line Perturb-seq subset shipped with the package
  (Norman 2019 K562 CRISPRa and three glioblastoma lines), with gene embeddings.
- :func:`papalexi_thp1`: a real CRISPR-knockout screen of one cell line (Papalexi 2021 THP-1,
  25 targets) shipped with the package, with gene embeddings; :func:`papalexi_thp1_folds`
  gives its fixed test folds of unseen targets.
- :func:`read_replogle_nadig`: reader for the Replogle–Nadig compilation used by the PT-RAG paper.
- :func:`synthetic`: seeded synthetic Perturb-seq data with gene embeddings and known effects.
"""

from __future__ import annotations

from ._papalexi import papalexi_thp1, papalexi_thp1_folds
from ._perturbench import perturbench_devel
from ._replogle import read_replogle_nadig
from ._synthetic import synthetic

__all__ = [
    "papalexi_thp1",
    "papalexi_thp1_folds",
    "perturbench_devel",
    "read_replogle_nadig",
    "synthetic",
]
