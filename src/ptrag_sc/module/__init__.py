"""Torch modules of PT-RAG."""

from .._constants import TENSORS
from .._shift import apply_shift
from ._evidence import SelectionOffsets
from ._losses import energy_distance, pairwise_distances
from ._module import PTRAGModule

__all__ = [
    "TENSORS",
    "PTRAGModule",
    "SelectionOffsets",
    "apply_shift",
    "energy_distance",
    "pairwise_distances",
]
