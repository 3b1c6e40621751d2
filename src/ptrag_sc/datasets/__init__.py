"""Example and synthetic Perturb-seq datasets.

- :func:`perturbench_devel`: a real multi-cell-line Perturb-seq subset shipped with the package
  (Norman 2019 K562 CRISPRa and three glioblastoma lines), with gene embeddings.
- :func:`read_replogle_nadig`: reader for the Replogle–Nadig compilation used by the PT-RAG paper.
- :func:`synthetic`: seeded synthetic Perturb-seq data with gene embeddings and known effects.
"""

from __future__ import annotations

from ._perturbench import perturbench_devel
from ._replogle import read_replogle_nadig
from ._synthetic import synthetic

__all__ = ["perturbench_devel", "read_replogle_nadig", "synthetic"]
