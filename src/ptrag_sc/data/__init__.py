"""The data layer: registration fields, per-cell views of an AnnData, the retrieval memory and
its index, and the sets and batches the module consumes (for training and prediction)."""

from ._builder import SetBuilder, count_prediction_batches, prediction_batches
from ._cells import NO_CELL_TYPE, PerturbationData, SetupArgs, expression_matrix
from ._datamodule import SetDataModule
from ._fields import PerturbationField
from ._index import NeighbourIndex
from ._matrix import ExpressionMatrix, column_max, group_means, group_sums
from ._memory import RetrievalMemory, build_memory, memory_from_cells, memory_from_means
from ._pairing import match_controls
from ._perturbations import PerturbationEncoder, normalise_labels, validate_embedding_table
from ._sets import SetGroups
from ._sources import SOURCES
from ._state import ModelState

#: The evidence sources by name, in stacking order (``evidence=`` takes these names).
EVIDENCE_SOURCES = SOURCES

__all__ = [
    "EVIDENCE_SOURCES",
    "NO_CELL_TYPE",
    "ExpressionMatrix",
    "ModelState",
    "NeighbourIndex",
    "PerturbationData",
    "PerturbationEncoder",
    "PerturbationField",
    "RetrievalMemory",
    "SetBuilder",
    "SetDataModule",
    "SetGroups",
    "SetupArgs",
    "build_memory",
    "column_max",
    "count_prediction_batches",
    "expression_matrix",
    "group_means",
    "group_sums",
    "match_controls",
    "memory_from_cells",
    "memory_from_means",
    "normalise_labels",
    "prediction_batches",
    "validate_embedding_table",
]
