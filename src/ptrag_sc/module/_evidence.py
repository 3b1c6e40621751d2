"""The mean shift of a set, from the evidence a response memory holds."""

from __future__ import annotations

import torch
from torch import nn

from .._constants import N_RELATIONS, RELATION_MEMBER


class EvidenceCombiner(nn.Module):
    """Combine the sources of evidence for a (perturbation, cell type) mean shift.

    For a query ``q`` in cell type ``c`` (its own memory entry always left out)::

        retrieved = (sum_k w_k g_rel(k) d_k) / (sum_k w_k g_rel(k) + prior)
        delta     = context + a_ret * retrieved + a_lin * linear

    ``context`` is the mean shift of the cell type's other perturbations (the context-mean
    baseline); ``d_k`` is candidate ``k``'s shift minus the context of its cell type (for a
    candidate of ``c`` itself: ``r_k - context``), so neighbours measured in ``c``, the query
    measured in other cell types and neighbours measured elsewhere all contribute their
    perturbation-specific part; ``w_k`` is the fraction of the set's cells whose stage-2 choice
    keeps ``k`` (vanilla RAG: its mean attention weight); ``g_rel`` a learned gain per
    relation to the query (other gene, same gene in another cell type, member of a
    combination); ``prior`` a learned pseudo-count that shrinks the retrieved part towards the
    context when little is kept; ``linear`` the ridge estimate of the specific shift from the
    gene embedding (leave-one-out for memory entries). ``a_ret`` and ``a_lin`` are learned: how
    much to trust each source, fitted on training perturbations whose evidence leaves their own
    answer out, exactly as it is for a held-out perturbation.

    A combination whose members were all measured in ``c`` takes the sum of their shifts (the
    additive model), which is the standard for doubles and needs no training double.
    """

    #: Parameters that start at a meaningful scale and are trained with a larger step.
    fast_parameters = ("retrieved_weight", "linear_weight", "log_prior", "relation_log_gain")

    def __init__(self) -> None:
        super().__init__()
        self.retrieved_weight = nn.Parameter(torch.tensor(1.0))
        self.linear_weight = nn.Parameter(torch.tensor(0.5))
        self.log_prior = nn.Parameter(torch.tensor(0.0))
        self.relation_log_gain = nn.Parameter(torch.zeros(N_RELATIONS))

    def forward(
        self,
        set_weights: torch.Tensor,
        valid: torch.Tensor,
        relation: torch.Tensor,
        same_cell_type: torch.Tensor,
        specific: torch.Tensor,
        context: torch.Tensor,
        context_full: torch.Tensor,
        linear: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Mean shift of each set.

        Parameters
        ----------
        set_weights
            ``[B, K]`` selection weight of each candidate for the set.
        valid, relation, same_cell_type
            ``[B, K]`` candidate mask, relation codes and cell-type match.
        specific
            ``[B, K, G]`` each candidate's shift minus its cell type's context (all entries).
        context, context_full
            ``[B, G]`` the query cell type's context without and with the query's own entry.
        linear
            ``[B, G]`` ridge estimate of the query's specific shift.

        Returns
        -------
        dict with ``delta`` ``[B, G]`` and the per-candidate weights ``weights`` ``[B, K]``
        (normalised, as they enter the retrieved shift).
        """
        dtype = specific.dtype
        valid_f = valid.to(dtype)
        same = (same_cell_type & valid).to(dtype)
        gains = torch.exp(self.relation_log_gain)[relation] * valid_f
        weights = set_weights * gains
        total = weights.sum(-1, keepdim=True) + torch.exp(self.log_prior)
        weights = weights / total
        # A candidate of the query's own cell type is compared with the context that leaves the
        # query out: d_k = s_k + (context_full - context).
        retrieved = torch.bmm(weights.unsqueeze(1), specific).squeeze(1)
        retrieved = retrieved + (weights * same).sum(-1, keepdim=True) * (context_full - context)
        delta = context + self.retrieved_weight * retrieved + self.linear_weight * linear
        members = (relation == RELATION_MEMBER) & same_cell_type & valid
        if members.any():
            members_f = members.to(dtype)
            additive = torch.bmm(members_f.unsqueeze(1), specific).squeeze(1) + members_f.sum(-1, keepdim=True) * context_full
            delta = torch.where(members.any(-1, keepdim=True), additive, delta)
            weights = torch.where(members.any(-1, keepdim=True), members_f, weights)
        return {"delta": delta, "weights": weights}
