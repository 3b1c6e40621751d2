"""Keys shared across the package: registry keys, obs/uns/layer names written to AnnData."""

from __future__ import annotations

from typing import NamedTuple


class _RegistryKeys(NamedTuple):
    X_KEY: str = "X"
    PERTURBATION_KEY: str = "perturbation"
    CELL_TYPE_KEY: str = "cell_type"
    BATCH_KEY: str = "batch"


REGISTRY_KEYS = _RegistryKeys()

DEFAULT_PERTURBATION_KEY = "gene"
DEFAULT_CONTROL_GROUP = "non-targeting"
DEFAULT_CELL_TYPE_KEY = "cell_line"
DEFAULT_PERTURBATION_SEP = "+"

#: Default layer written by ``PTRAG.predict`` and read by ``ptrag_sc.tl.evaluate``.
DEFAULT_PRED_LAYER = "ptrag"

#: obs columns written by generation-mode ``PTRAG.predict``.
OBS_SOURCE_CELL = "ptrag_source_cell"
OBS_UNSEEN_PERTURBATION = "ptrag_unseen_perturbation"
OBS_UNSEEN_CELL_TYPE = "ptrag_unseen_cell_type"
OBS_RETRIEVAL_DISTANCE = "ptrag_retrieval_distance"

#: uns key holding prediction settings.
UNS_KEY = "ptrag"
