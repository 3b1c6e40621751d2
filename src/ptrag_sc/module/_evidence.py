"""What stage 1 already knows about a candidate, as an offset of stage 2's keep logits."""

from __future__ import annotations

import torch
from torch import nn

from .._constants import N_RELATIONS


class SelectionOffsets(nn.Module):
    """Offsets of stage 2's keep logits from a candidate's relation to the query and its
    similarities.

    ``offset_k = relation_bias[relation_k] + a * similarity_k + b * annotation_similarity_k``,
    the same for every cell of a set. Selection starts nearly closed (``p_keep`` about 0.12), so
    stage 2 opens the candidates that shape the cells better.
    """

    def __init__(self) -> None:
        super().__init__()
        self.relation_bias = nn.Parameter(torch.full((N_RELATIONS,), -2.0))
        self.similarity_bias = nn.Parameter(torch.zeros(2))

    def forward(
        self, relation: torch.Tensor, similarity: torch.Tensor, annotation_similarity: torch.Tensor
    ) -> torch.Tensor:
        """``[B, K]`` offset of each candidate's keep logit."""
        return (
            self.relation_bias[relation]
            + self.similarity_bias[0] * similarity
            + self.similarity_bias[1] * annotation_similarity
        )
