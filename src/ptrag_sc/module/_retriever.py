"""Stage 2 of the retrieval: per-cell differentiable selection (PT-RAG) or cross-attention
(vanilla RAG) over the candidates stage 1 returned."""

from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F
from torch import nn

from ._fused import keep_logit, keep_logit_backward, kernels_take


class _HardConcrete(torch.autograd.Function):
    """Hard sample with the soft sample's gradient, masked, in two passes instead of a dozen."""

    @staticmethod
    def forward(ctx, logit, noise, tau, mask):
        perturbed = logit + noise
        hard = (perturbed > 0).to(logit.dtype)
        soft = torch.sigmoid_(perturbed.div_(tau))
        ctx.tau = tau
        ctx.save_for_backward(soft, mask)
        return hard if mask is None else hard.mul_(mask)

    @staticmethod
    def backward(ctx, grad):
        soft, mask = ctx.saved_tensors
        # d sigmoid(z / tau) / dlogit = soft * (1 - soft) / tau
        slope = soft * (1.0 - soft)
        slope.mul_(grad).div_(ctx.tau)
        if mask is not None:
            slope.mul_(mask)
        return slope, None, None, None


def hard_binary_concrete(logit: torch.Tensor, tau: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hard two-class Gumbel-Softmax sample of "keep" with a straight-through gradient.

    Equal in distribution to ``F.gumbel_softmax(stack([0, logit]), tau, hard=True)[..., 1]``:
    the difference of two Gumbel variables is logistic. ``mask`` (broadcast against ``logit``)
    multiplies the sample and its gradient.
    """
    noise = torch.rand_like(logit).clamp_(1e-6, 1 - 1e-6).logit_()
    if torch.is_grad_enabled() and logit.requires_grad:
        return _HardConcrete.apply(logit, noise, tau, mask)
    hard = ((logit + noise) > 0).to(logit.dtype)
    return hard if mask is None else hard * mask


class _KeepLogit(torch.autograd.Function):
    """Stage 2's keep logit per (cell, candidate), with a hand-written backward.

    ``logit = v . gelu(rstd * (A_s + C_k - mean * w) + bias) + v0`` over ``[B, S, K, Hs]``,
    where ``A`` is the cell (and query) part of the scorer's first layer, ``C`` the candidate
    part, and ``mean``/``rstd`` the statistics of the concatenated layer norm (see
    :class:`ConcatLayerNorm`). This is the retrieval's hot path. On the CPU one kernel computes
    the logits without storing the ``[B, S, K, Hs]`` layer, and one recomputes it for the
    gradients (:func:`~ptrag_sc.module._fused.keep_logit`). Elsewhere the forward is the
    sequence of operations autograd would record, and the backward gives the same gradients
    with fewer passes over the ``[B, S, K, Hs]`` tensors and matrix-vector products where
    autograd would run an ``[N, 1] x [1, Hs]`` matrix product.
    """

    @staticmethod
    def first_layer(cell_part, cand_part, mean, rstd, w_sum, bias):
        """``(pre, hidden)`` of the scorer's first layer, ``[B, S, K, Hs]``."""
        hidden = cell_part.unsqueeze(2) + cand_part.unsqueeze(1)
        hidden.addcmul_(mean, w_sum, value=-1.0)
        return torch.addcmul(bias, rstd, hidden), hidden

    @staticmethod
    def evaluate(cell_part, cand_part, mean, rstd, w_sum, bias, v, v0):
        """The same logits without a gradient (prediction)."""
        if kernels_take(cell_part, cand_part, mean, rstd, w_sum, bias, v, v0):
            return keep_logit(cell_part, cand_part, mean, rstd, w_sum, bias, v, v0)
        activated = F.gelu(_KeepLogit.first_layer(cell_part, cand_part, mean, rstd, w_sum, bias)[0])
        n_hidden = activated.shape[-1]
        return torch.mv(activated.view(-1, n_hidden), v).add_(v0).view(activated.shape[:-1])

    @staticmethod
    def forward(ctx, cell_part, cand_part, mean, rstd, w_sum, bias, v, v0):
        ctx.fused = kernels_take(cell_part, cand_part, mean, rstd, w_sum, bias, v, v0)
        if ctx.fused:
            ctx.save_for_backward(cell_part, cand_part, mean, rstd, w_sum, bias, v)
            return keep_logit(cell_part, cand_part, mean, rstd, w_sum, bias, v, v0)
        pre, hidden = _KeepLogit.first_layer(cell_part, cand_part, mean, rstd, w_sum, bias)
        activated = F.gelu(pre)
        n_hidden = activated.shape[-1]
        logit = torch.mv(activated.view(-1, n_hidden), v).add_(v0).view(activated.shape[:-1])
        ctx.save_for_backward(hidden, pre, activated, mean, rstd, w_sum, v)
        return logit

    @staticmethod
    def backward(ctx, grad):
        if ctx.fused:
            cell_part, cand_part, mean, rstd, w_sum, bias, v = ctx.saved_tensors
            grad_cell, grad_cand, grad_mean, grad_rstd, grad_w_sum, grad_bias, grad_v, grad_v0 = (
                keep_logit_backward(grad, cell_part, cand_part, mean, rstd, w_sum, bias, v)
            )
            return (
                grad_cell,
                grad_cand,
                grad_mean.view(mean.shape),
                grad_rstd.view(rstd.shape),
                grad_w_sum,
                grad_bias,
                grad_v,
                grad_v0,
            )
        hidden, pre, activated, mean, rstd, w_sum, v = ctx.saved_tensors
        n_hidden = v.shape[0]
        flat_grad = grad.reshape(-1)
        grad_v = torch.mv(activated.view(-1, n_hidden).T, flat_grad)
        grad_v0 = flat_grad.sum()
        grad_pre = grad.unsqueeze(-1) * v
        torch.ops.aten.gelu_backward.grad_input(grad_pre, pre, grad_input=grad_pre)
        flat = grad_pre.view(-1, n_hidden)
        grad_bias = flat.sum(0)
        grad_rstd = torch.linalg.vecdot(grad_pre, hidden).unsqueeze(-1)
        grad_hidden = grad_pre.mul_(rstd)
        flat = grad_hidden.view(-1, n_hidden)
        grad_mean = torch.mv(flat, w_sum).neg_().view(mean.shape)
        grad_w_sum = torch.mv(flat.T, mean.reshape(-1)).neg_()
        return (
            grad_hidden.sum(2),
            grad_hidden.sum(1),
            grad_mean,
            grad_rstd,
            grad_w_sum,
            grad_bias,
            grad_v,
            grad_v0,
        )


class ConcatLayerNorm(nn.Module):
    """``LayerNorm(concat(parts))`` followed by linear maps, without building the concatenation.

    The parts broadcast against each other (cell ``[B,S,1,H]``, set ``[B,1,1,H]``, candidate
    ``[B,1,K,H]``). The norm's statistics are sums of per-part sums, and a linear map of the
    normalised concatenation is a sum of per-part projections, so each part is projected once at
    its own size. This is the hot path of stage 2: materialising ``[B,S,K,3H]`` and projecting
    it would cost ``S*K*3H*n_out`` multiply-adds per set.
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
        total_sq = functools.reduce(operator.add, [torch.linalg.vecdot(p, p).unsqueeze(-1) for p in parts])
        mean = total / n_in
        return mean, torch.rsqrt((total_sq / n_in - mean.pow(2)).clamp_min(0) + self.eps)

    def folded(self, linear: nn.Linear) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-part weights, row sums and bias of ``linear`` applied after the norm."""
        weight = linear.weight * self.weight
        bias = linear.bias + linear.weight @ self.bias
        return list(weight.split(self.part_size, dim=1)), weight.sum(dim=1), bias


class TwoStageSelector(nn.Module):
    """PT-RAG stage 2: for each cell and candidate, keep or drop with a hard Gumbel-Softmax.

    ``c_k = LayerNorm([h_ctrl, h_pert, h_cand_k])``, keep/drop logits from an MLP
    ``3H -> n_scorer_hidden -> 2`` of ``c_k``, ``w_k`` in {0, 1} (straight-through during
    training; ``p_keep > 0.5`` at inference unless sampling is asked for), and the context
    ``z = sum_k w_k * Projection(c_k)``.

    The logits are not normalised across the batch (one set's selection never depends on
    another set); the temperature is fixed. ``z`` is computed from per-part projections and
    ``[B,S,K]`` weights, so no ``[B,S,K,H]`` tensor is built for it.
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
        """Select candidates.

        Parameters
        ----------
        h_ctrl
            ``[B, S, H]`` encoded control cells.
        h_pert
            ``[B, H]`` encoded query perturbation.
        h_cand
            ``[B, K, H]`` encoded candidates.
        valid
            ``[B, K]`` bool, False for padding slots.
        sample
            Draw hard Gumbel-Softmax samples (training) instead of thresholding ``p_keep``.
        logit_offset
            ``[B, K]`` offset added to every cell's keep logit (what stage 1 knows about the
            candidate), or ``None``.

        Returns
        -------
        dict with ``context`` ``[B,S,H]``, ``keep`` ``[B,S,K]`` (0/1, straight-through when
        sampling), ``keep_probability`` ``[B,S,K]``.
        """
        cell, pert, cand = h_ctrl.unsqueeze(2), h_pert[:, None, None, :], h_cand.unsqueeze(1)
        mean, rstd = self.norm.statistics([cell, pert, cand])  # [B,S,K,1]

        (w_cell, w_pert, w_cand), w_sum, bias = self.norm.folded(self.scorer_hidden)
        cell_part = h_ctrl @ w_cell.T + (h_pert @ w_pert.T)[:, None, :]  # [B,S,Hs]
        cand_part = h_cand @ w_cand.T  # [B,K,Hs]
        # [B,S,K], keep minus drop
        inputs = (
            cell_part,
            cand_part,
            mean,
            rstd,
            w_sum,
            bias,
            self.scorer_out.weight[0],
            self.scorer_out.bias[0],
        )
        if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
            logit = _KeepLogit.apply(*inputs)
        else:
            logit = _KeepLogit.evaluate(*inputs)
        if logit_offset is not None:
            logit = logit + logit_offset[:, None, :]
        mask = valid[:, None, :].to(logit.dtype)
        keep_probability = torch.sigmoid(logit) * mask
        if sample:
            keep = hard_binary_concrete(logit, self.tau, mask)
        else:
            keep = (logit > 0).to(logit.dtype) * mask

        # z = sum_k keep_k * rstd_k * (P_cell + P_pert + P_cand_k - mean_k * w_sum) + bias * sum_k keep_k
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
