"""Stage 2 of the retrieval: per-cell differentiable selection (PT-RAG) or cross-attention
(vanilla RAG) over the candidates stage 1 returned."""

from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F
from torch import nn

from ._fused import (
    keep_logit,
    keep_logit_backward,
    kernels_take,
    norm_statistics,
    norm_statistics_backward,
    select_and_context,
    select_and_context_backward,
)


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


def logistic_noise(like: torch.Tensor) -> torch.Tensor:
    """Standard logistic noise shaped like ``like`` (the difference of two Gumbel variables)."""
    return torch.rand_like(like).clamp_(1e-6, 1 - 1e-6).logit_()


def hard_binary_concrete(logit: torch.Tensor, tau: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hard two-class Gumbel-Softmax sample of "keep" with a straight-through gradient.

    Equal in distribution to ``F.gumbel_softmax(stack([0, logit]), tau, hard=True)[..., 1]``:
    the difference of two Gumbel variables is logistic. ``mask`` (broadcast against ``logit``)
    multiplies the sample and its gradient.
    """
    noise = logistic_noise(logit)
    if torch.is_grad_enabled() and logit.requires_grad:
        return _HardConcrete.apply(logit, noise, tau, mask)
    hard = ((logit + noise) > 0).to(logit.dtype)
    return hard if mask is None else hard * mask


class _KeepLogit(torch.autograd.Function):
    """Stage 2's keep logit per (cell, candidate), with a hand-written backward.

    ``logit = v . gelu(rstd * (A_s + C_k - mean * w) + bias) + v0`` over ``[B, S, K, Hs]``,
    where ``A`` is the cell (and query) part of the scorer's first layer, ``C`` the candidate
    part, and ``mean``/``rstd`` the statistics of the concatenated layer norm (see
    :class:`ConcatLayerNorm`). This is the retrieval's hot path where stage 2 does not run as CPU
    kernels (:class:`_StageTwo`, whose scorer kernels compute the same logits without storing
    the ``[B, S, K, Hs]`` layer): the forward is the sequence of operations autograd would
    record, and the backward gives the same gradients with fewer passes over the
    ``[B, S, K, Hs]`` tensors and matrix-vector products where autograd would run an
    ``[N, 1] x [1, Hs]`` matrix product.
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
        activated = F.gelu(_KeepLogit.first_layer(cell_part, cand_part, mean, rstd, w_sum, bias)[0])
        n_hidden = activated.shape[-1]
        return torch.mv(activated.view(-1, n_hidden), v).add_(v0).view(activated.shape[:-1])

    @staticmethod
    def forward(ctx, cell_part, cand_part, mean, rstd, w_sum, bias, v, v0):
        pre, hidden = _KeepLogit.first_layer(cell_part, cand_part, mean, rstd, w_sum, bias)
        activated = F.gelu(pre)
        n_hidden = activated.shape[-1]
        logit = torch.mv(activated.view(-1, n_hidden), v).add_(v0).view(activated.shape[:-1])
        ctx.save_for_backward(hidden, pre, activated, mean, rstd, w_sum, v)
        return logit

    @staticmethod
    def backward(ctx, grad):
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


class _StageTwo(torch.autograd.Function):
    """Stage 2 from the first layers' parts to the selected context, on the CPU.

    The same computation as :meth:`TwoStageSelector.forward`'s PyTorch operations (the
    concatenated layer norm's statistics, the keep logits, the offsets, the keep probability,
    the hard sample and the context) in a few kernels each way instead of about a hundred
    operations on ``[B, S, K]`` and ``[B, S, H]`` tensors, which on a CPU cost more in
    per-operation overhead than in arithmetic. The scorer's first layer and the context's
    projection share their matrix products: ``cell``/``cand`` hold both, scorer units first
    (``n_scorer`` of them), as do ``weight_sum`` and ``bias``.
    """

    @staticmethod
    def forward(ctx, h_ctrl, h_pert, h_cand, cell, cand, weight_sum, bias, v, v0, offset, mask, noise, tau, n_scorer, eps):
        sums = tuple(t for h in (h_ctrl, h_pert, h_cand) for t in (h.sum(-1), torch.linalg.vecdot(h, h)))
        n_in = h_ctrl.shape[-1] * 3
        mean, rstd = norm_statistics(sums, n_in, eps)
        cell_part, cell_proj = cell[..., :n_scorer].contiguous(), cell[..., n_scorer:].contiguous()
        cand_part, cand_proj = cand[..., :n_scorer].contiguous(), cand[..., n_scorer:].contiguous()
        w_sum, p_sum, w_bias, p_bias = weight_sum[:n_scorer], weight_sum[n_scorer:], bias[:n_scorer], bias[n_scorer:]
        logit = keep_logit(cell_part, cand_part, mean, rstd, w_sum, w_bias, v, v0)
        keep, probability, soft, scaled, set_sums, context = select_and_context(
            logit, offset, mask, noise, tau, cell_proj, cand_proj, p_sum, p_bias, mean, rstd
        )
        ctx.save_for_backward(
            h_ctrl, h_pert, h_cand, cell_part, cand_part, cell_proj, cand_proj, weight_sum, bias, v, mask,
            mean, rstd, keep, probability, soft, scaled, set_sums, *sums,
        )
        ctx.tau, ctx.n_scorer, ctx.n_in, ctx.eps = tau, n_scorer, n_in, eps
        ctx.set_materialize_grads(False)
        if noise is None:
            ctx.mark_non_differentiable(keep)
        return context, keep, probability

    @staticmethod
    def backward(ctx, grad_context, grad_keep, grad_probability):
        (h_ctrl, h_pert, h_cand, cell_part, cand_part, cell_proj, cand_proj, weight_sum, bias, v, mask,
         mean, rstd, keep, probability, soft, scaled, set_sums, *sums) = ctx.saved_tensors
        n = ctx.n_scorer
        w_sum, p_sum, w_bias, p_bias = weight_sum[:n], weight_sum[n:], bias[:n], bias[n:]
        grad_logit, grad_offset, grad_mean, grad_rstd, grad_cell_proj, grad_cand_proj, grad_p_sum, grad_p_bias = (
            select_and_context_backward(
                grad_context, grad_keep if soft.numel() else None, grad_probability, keep, probability, soft, scaled, set_sums,
                mask, ctx.tau, cell_proj, cand_proj, p_sum, p_bias, mean, rstd,
            )
        )
        grad_cell, grad_cand, grad_mean_scorer, grad_rstd_scorer, grad_w_sum, grad_w_bias, grad_v, grad_v0 = keep_logit_backward(
            grad_logit, cell_part, cand_part, mean, rstd, w_sum, w_bias, v
        )
        grad_sum = norm_statistics_backward(grad_mean.add_(grad_mean_scorer), grad_rstd.add_(grad_rstd_scorer), sums, ctx.n_in, ctx.eps)
        # d/dh of (sum(h), h . h) is (1, 2 h).
        grad_h = [
            (2.0 * grad_sum[2 * i + 1]).unsqueeze(-1).mul(h).add_(grad_sum[2 * i].unsqueeze(-1))
            for i, h in enumerate((h_ctrl, h_pert, h_cand))
        ]
        return (
            *grad_h,
            torch.cat([grad_cell, grad_cell_proj], dim=-1),
            torch.cat([grad_cand, grad_cand_proj], dim=-1),
            torch.cat([grad_w_sum, grad_p_sum]),
            torch.cat([grad_w_bias, grad_p_bias]),
            grad_v,
            grad_v0,
            grad_offset,
            None, None, None, None, None,
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

    def folded(self, *linears: nn.Linear) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-part weights, row sums and bias of ``linears`` applied after the norm, their
        outputs stacked in order."""
        weight = torch.cat([linear.weight for linear in linears])
        bias = torch.addmv(torch.cat([linear.bias for linear in linears]), weight, self.bias)
        weight = weight * self.weight
        return list(weight.split(self.part_size, dim=1)), weight.sum(dim=1), bias


class TwoStageSelector(nn.Module):
    """PT-RAG stage 2: for each cell and candidate, keep or drop with a hard Gumbel-Softmax.

    ``c_k = LayerNorm([h_ctrl, h_pert, h_cand_k])``, keep/drop logits from an MLP
    ``3H -> n_scorer_hidden -> 2`` of ``c_k``, ``w_k`` in {0, 1} (straight-through during
    training; ``p_keep > 0.5`` at inference unless sampling is asked for), and the context
    ``z = sum_k w_k * Projection(c_k)``.

    The logits are not normalised across the batch (one set's selection never depends on
    another set); the temperature is fixed. ``z`` is computed from per-part projections and
    ``[B,S,K]`` weights, so no ``[B,S,K,H]`` tensor is built for it. On the CPU the steps
    after the matrix products run as kernels (:class:`_StageTwo`), with the same values,
    random draws and gradients up to rounding.
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
        if kernels_take(h_ctrl, h_pert, h_cand, n_dims=3):
            return self._fused_forward(h_ctrl, h_pert, h_cand, valid, sample=sample, logit_offset=logit_offset)
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

    def _fused_forward(self, h_ctrl, h_pert, h_cand, valid, *, sample, logit_offset):
        """:meth:`forward` through :class:`_StageTwo` (CPU kernels): same values and gradients."""
        # The scorer's first layer and the context's projection folded together: one matrix
        # product per part for both.
        (w_cell, w_pert, w_cand), weight_sum, bias = self.norm.folded(self.scorer_hidden, self.projection)
        cell = h_ctrl @ w_cell.T + (h_pert @ w_pert.T)[:, None, :]
        keep_shape = (h_ctrl.shape[0], h_ctrl.shape[1], h_cand.shape[1])
        offset = logit_offset if logit_offset is not None else h_ctrl.new_zeros(keep_shape[0], keep_shape[2])
        # As `hard_binary_concrete` draws it: the same random numbers for the same seed.
        noise = logistic_noise(h_ctrl.new_empty(keep_shape)) if sample else None
        context, keep, keep_probability = _StageTwo.apply(
            h_ctrl,
            h_pert,
            h_cand,
            cell,
            h_cand @ w_cand.T,
            weight_sum,
            bias,
            self.scorer_out.weight[0],
            self.scorer_out.bias[0],
            offset,
            valid.to(h_ctrl.dtype),
            noise,
            self.tau,
            self.scorer_hidden.out_features,
            self.norm.eps,
        )
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
