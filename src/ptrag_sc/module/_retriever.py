"""Stage 2 of the retrieval: per-cell selection (PT-RAG) or cross-attention (vanilla RAG)."""

from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F
from torch import nn


def hard_binary_concrete(
    logit: torch.Tensor, tau: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Hard two-class Gumbel-Softmax sample of "keep" with a straight-through gradient.

    Equal in distribution to ``F.gumbel_softmax(stack([0, logit]), tau, hard=True)[..., 1]``
    (the difference of two Gumbel variables is logistic). ``mask`` multiplies the sample and its
    gradient.
    """
    perturbed = logit + torch.rand_like(logit).clamp_(1e-6, 1 - 1e-6).logit_()
    hard = (perturbed > 0).to(logit.dtype)
    soft = torch.sigmoid(perturbed / tau)
    # Straight through: the value is `hard`, the gradient the soft sample's. In this order (not
    # `hard + soft - soft.detach()`) the value is exactly 0 or 1: `hard` is 1 only where
    # `soft >= 1/2`, and there `1 - soft` is exact.
    sample = soft + (hard - soft).detach()
    return sample if mask is None else sample * mask


class ConcatLayerNorm(nn.Module):
    """``LayerNorm(concat(parts))`` followed by linear maps, without building the concatenation.

    The parts broadcast against each other (cell ``[B,S,1,H]``, set ``[B,1,1,H]``, candidate
    ``[B,1,K,H]``): the norm's statistics are sums of per-part sums, and a linear map of the
    normalised concatenation is a sum of per-part projections, each at its part's own size (the
    hot path of stage 2: ``[B,S,K,3H]`` would cost ``S*K*3H*n_out`` multiply-adds per set).
    """

    def __init__(self, part_size: int, n_parts: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.part_size, self.n_parts, self.eps = part_size, n_parts, eps
        self.weight = nn.Parameter(torch.ones(part_size * n_parts))
        self.bias = nn.Parameter(torch.zeros(part_size * n_parts))

    def statistics(self, parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and reciprocal standard deviation of the concatenation, shape ``[..., 1]``."""
        n_in = self.part_size * self.n_parts
        total = functools.reduce(operator.add, [p.sum(-1, keepdim=True) for p in parts])
        total_sq = functools.reduce(
            operator.add, [torch.linalg.vecdot(p, p).unsqueeze(-1) for p in parts]
        )
        mean = total / n_in
        return mean, torch.rsqrt((total_sq / n_in - mean.pow(2)).clamp_min(0) + self.eps)

    def folded(self, linear: nn.Linear) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-part weights, row sums and bias of ``linear`` applied after the norm."""
        bias = torch.addmv(linear.bias, linear.weight, self.bias)
        weight = linear.weight * self.weight
        return list(weight.split(self.part_size, dim=1)), weight.sum(dim=1), bias


class TwoStageSelector(nn.Module):
    """PT-RAG stage 2: for each cell and candidate, keep or drop with a hard Gumbel-Softmax.

    ``c_k = LayerNorm([h_ctrl, h_pert, h_cand_k])``, a keep logit from an MLP of ``c_k``,
    ``w_k`` in {0, 1} and the context ``z = sum_k w_k * Projection(c_k)``, computed from
    per-part projections so that no ``[B,S,K,H]`` tensor is built. One set's selection never
    depends on another set's.
    """

    def __init__(
        self, n_hidden: int, *, n_scorer_hidden: int | None = None, tau: float = 0.5
    ) -> None:
        super().__init__()
        self.tau = tau
        self.norm = ConcatLayerNorm(n_hidden, 3)
        self.scorer_hidden = nn.Linear(3 * n_hidden, n_scorer_hidden or n_hidden)
        # One logit, keep versus drop: a two-class softmax over (drop, keep) logits only depends
        # on their difference, and the two-class Gumbel-Softmax is the binary concrete
        # distribution (logistic noise), which needs half the work on the [B,S,K] hot path.
        self.scorer_out = nn.Linear(n_scorer_hidden or n_hidden, 1)
        self.projection = nn.Linear(3 * n_hidden, n_hidden)

    def forward(
        self,
        h_ctrl: torch.Tensor,
        h_pert: torch.Tensor,
        h_cand: torch.Tensor,
        valid: torch.Tensor,
        *,
        sample: bool,
        logit_offset: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``context`` ``[B,S,H]``, ``keep`` ``[B,S,K]`` (0/1, straight-through when
        ``sample``: else ``p_keep > 0.5``) and ``keep_probability`` ``[B,S,K]``, zero where not
        ``valid``. ``logit_offset`` ``[B,K]`` is added to every cell's keep logit."""
        cell, pert, cand = h_ctrl.unsqueeze(2), h_pert[:, None, None, :], h_cand.unsqueeze(1)
        mean, rstd = self.norm.statistics([cell, pert, cand])  # [B,S,K,1]

        # The scorer's first layer on the normalised concatenation, one projection per part:
        # rstd * (W_cell h_ctrl + W_pert h_pert + W_cand h_cand - mean * w_sum) + bias.
        (w_cell, w_pert, w_cand), w_sum, bias = self.norm.folded(self.scorer_hidden)
        cell_part = h_ctrl @ w_cell.T + (h_pert @ w_pert.T)[:, None, :]  # [B,S,Hs]
        cand_part = h_cand @ w_cand.T  # [B,K,Hs]
        hidden = rstd * (cell_part.unsqueeze(2) + cand_part.unsqueeze(1) - mean * w_sum) + bias
        logit = self.scorer_out(F.gelu(hidden)).squeeze(-1)  # [B,S,K], keep minus drop
        if logit_offset is not None:
            logit = logit + logit_offset[:, None, :]
        mask = valid[:, None, :].to(logit.dtype)
        keep_probability = torch.sigmoid(logit) * mask
        if sample:
            keep = hard_binary_concrete(logit, self.tau, mask)
        else:
            keep = (logit > 0).to(logit.dtype) * mask

        # z = sum_k keep_k * rstd_k * (P_cell + P_pert + P_cand_k - mean_k * p_sum)
        #     + p_bias * sum_k keep_k
        (p_cell, p_pert, p_cand), p_sum, p_bias = self.norm.folded(self.projection)
        scaled = keep * rstd.squeeze(-1)  # [B,S,K]
        context = scaled.sum(-1, keepdim=True) * (
            h_ctrl @ p_cell.T + (h_pert @ p_pert.T)[:, None, :]
        )
        context = context + scaled @ (h_cand @ p_cand.T)
        context = context - (scaled * mean.squeeze(-1)).sum(-1, keepdim=True) * p_sum
        context = context + keep.sum(-1, keepdim=True) * p_bias
        return {"context": context, "keep": keep, "keep_probability": keep_probability}


class CrossAttentionContext(nn.Module):
    """Vanilla RAG: single-head cross-attention from each cell to the candidates."""

    def __init__(self, n_hidden: int) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(n_hidden)
        self.norm_cand = nn.LayerNorm(n_hidden)
        self.query = nn.Linear(n_hidden, n_hidden)
        self.key_value = nn.Linear(n_hidden, 2 * n_hidden)
        self.out = nn.Linear(n_hidden, n_hidden)
        self.scale = n_hidden**-0.5

    def forward(
        self, x0: torch.Tensor, h_cand: torch.Tensor, valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``x0`` ``[B,S,H]`` attends to ``h_cand`` ``[B,K,H]``; returns context and weights."""
        q = self.query(self.norm_query(x0))
        k, v = self.key_value(self.norm_cand(h_cand)).chunk(2, dim=-1)
        scores = torch.einsum("bsh,bkh->bsk", q, k) * self.scale
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        # A query without any valid candidate attends to nothing.
        weights = torch.nan_to_num(weights, nan=0.0)
        return {"context": self.out(weights @ v), "attention": weights}
