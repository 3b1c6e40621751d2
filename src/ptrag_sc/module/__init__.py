"""Torch modules of PT-RAG."""

from ._losses import energy_distance, pairwise_distances
from ._module import TENSORS, PTRAGModule, apply_shift

__all__ = ["TENSORS", "PTRAGModule", "apply_shift", "energy_distance", "pairwise_distances"]
