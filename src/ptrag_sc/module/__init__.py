"""Torch modules of PT-RAG."""

from ._losses import energy_distance, pairwise_distances
from ._module import TENSORS, PTRAGModule

__all__ = ["TENSORS", "PTRAGModule", "energy_distance", "pairwise_distances"]
