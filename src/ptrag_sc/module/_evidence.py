"""The mean shift of a set, from the evidence a response memory holds."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._constants import N_RELATIONS, RELATION_MEMBER


class EvidenceCombiner(nn.Module):
    """Combine the stacked evidence and the retrieved candidates into a set's mean shift.

    For a query ``q`` in cell type ``c`` (its own memory entry always left out)::

        base      = context + stacked
        retrieved = sum_k w_k (d_k - stacked) / (sum_k w_k + 1)
        delta     = base + a * retrieved

    ``context`` is the mean shift of the cell type's other perturbations (the context-mean
    baseline); ``stacked`` the stacked estimate of the perturbation-specific shift from the
    memory's evidence sources (ridge maps from the gene embedding and annotations, nearest
    neighbours, the same gene in other cell types; see
    :meth:`~ptrag_sc.data.RetrievalMemory.evidence`), whose non-negative weights were fitted
    on the training perturbations with their own entry left out, exactly as for a held-out
    perturbation. ``d_k`` is candidate ``k``'s shift minus the context of its cell type (for a
    candidate of ``c`` itself: minus the context without the query). ``w_k`` is the fraction
    of the set's cells whose stage-2 decision keeps ``k``; the stacked
    evidence counts as one more kept candidate (``prior = 1``); ``a`` is a learned trust in
    ``[0, 1]``: the retrieved candidates move the prediction away from the stacked evidence
    only as far as the training perturbations, their own entries left out, show it pays.

    A combination whose members were measured in ``c`` takes the sum of their shifts (the
    additive model), which is the standard for doubles and needs no training double.
    """

    def __init__(self) -> None:
        super().__init__()
        self.retrieval_logit = nn.Parameter(torch.tensor(0.0))
        # Stage-2 logit offsets from what stage 1 already knows about a candidate.
        # Selection starts nearly closed (p_keep about 0.12): the prediction starts at the
        # stacked evidence, and stage 2 opens the candidates that improve on it.
        self.relation_bias = nn.Parameter(torch.full((N_RELATIONS,), -2.0))
        self.similarity_bias = nn.Parameter(torch.zeros(2))

    @property
    def trust(self) -> torch.Tensor:
        """``a``: how far the retrieved candidates may move the prediction from the stacked evidence."""
        return torch.sigmoid(self.retrieval_logit)

    def selection_bias(self, relation: torch.Tensor, similarity: torch.Tensor, annotation_similarity: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` offset of stage 2's keep logits from the relation and similarities."""
        return self.relation_bias[relation] + self.similarity_bias[0] * similarity + self.similarity_bias[1] * annotation_similarity

    def forward(
        self,
        set_weights: torch.Tensor,
        valid: torch.Tensor,
        relation: torch.Tensor,
        same_cell_type: torch.Tensor,
        specific: torch.Tensor,
        context: torch.Tensor,
        context_full: torch.Tensor,
        stacked: torch.Tensor,
        *,
        rows: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Mean shift of each set.

        Parameters
        ----------
        set_weights
            ``[B, K]`` fraction of the set's cells that keep each candidate.
        valid, relation, same_cell_type
            ``[B, K]`` candidate mask, relation codes and cell-type match.
        specific
            ``[B, K, G]`` each candidate's shift minus its cell type's context (all entries);
            with ``rows``, the memory's ``[M, G]`` table of them.
        context, context_full
            ``[B, G]`` the query cell type's context without and with the query's own entry.
        stacked
            ``[B, G]`` the stacked evidence's estimate of the query's specific shift.
        rows
            ``[B, K]`` the candidates' rows of ``specific`` (padding slots may hold any row:
            their weight is zero).

        Returns
        -------
        dict with ``delta`` ``[B, G]`` and ``weights`` ``[B, K]``, each candidate's weight in
        ``delta``.
        """
        dtype = specific.dtype
        valid_f = valid.to(dtype)
        same = (same_cell_type & valid).to(dtype)
        # The stacked evidence counts as one kept candidate: keeping nothing returns it, and
        # the weight of a candidate is its keep probability (which the sparsity penalty
        # prices), so no other parameter can stand in for the selection.
        weights = set_weights * valid_f
        weights = weights / (weights.sum(-1, keepdim=True) + 1.0)
        # d_k = s_k + [k in c] (context_full - context): a candidate of the query's own cell type
        # is compared with the context that leaves the query out.
        retrieved = _weighted_sum(weights, specific, rows)
        retrieved = retrieved + (weights * same).sum(-1, keepdim=True) * (context_full - context)
        retrieved = retrieved - weights.sum(-1, keepdim=True) * stacked
        delta = context + stacked + self.trust * retrieved
        weights = self.trust * weights
        members = (relation == RELATION_MEMBER) & same_cell_type & valid
        if members.any():
            members_f = members.to(dtype)
            additive = _weighted_sum(members_f, specific, rows) + members_f.sum(-1, keepdim=True) * context_full
            has_members = members.any(-1, keepdim=True)
            delta = torch.where(has_members, additive, delta)
            weights = torch.where(has_members, members_f, weights)
        return {"delta": delta, "weights": weights}


def _weighted_sum(weights: torch.Tensor, specific: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``sum_k weights[b, k] * specific[b, k]`` ``[B, G]``; with ``rows``, of the table's rows."""
    if rows is not None:
        if specific.device.type in ("cpu", "cuda"):
            # Reads the candidates' rows where they lie: no [B, K, G] copy, forward or backward.
            return F.embedding_bag(rows, specific, per_sample_weights=weights, mode="sum")
        specific = specific[rows]
    return torch.bmm(weights.unsqueeze(1), specific).squeeze(1)
