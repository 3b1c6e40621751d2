"""Data registration, perturbation parsing, set sampling and the retrieval memory."""

from ._fields import PerturbationField
from ._memory import NeighbourIndex, RetrievalMemory, build_memory
from ._pairing import match_controls
from ._perturbations import PerturbationEncoder, validate_embedding_table
from ._sets import ExpressionMatrix, SetDataModule, SetGroups

__all__ = [
    "ExpressionMatrix",
    "NeighbourIndex",
    "PerturbationEncoder",
    "PerturbationField",
    "RetrievalMemory",
    "SetDataModule",
    "SetGroups",
    "build_memory",
    "match_controls",
    "validate_embedding_table",
]
