"""PT-RAG for single-cell perturbation response prediction, as a scvi-tools model."""

from __future__ import annotations

# scvi-tools 1.4.2 calls ``rich.pretty`` in ``view_anndata_setup`` without importing it.
import rich.pretty  # noqa: F401

from . import data, datasets, module, pl, pp, tl
from ._settings import settings
from .model import PTRAG

__version__ = "0.1.0"

__all__ = ["PTRAG", "data", "datasets", "module", "pl", "pp", "settings", "tl"]
