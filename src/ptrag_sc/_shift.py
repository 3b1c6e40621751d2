"""How a mean shift is applied to a set of control cells (shared by the model and the
baselines)."""

from __future__ import annotations

import torch

#: Genes whose mean in a set of control cells is below this are shifted additively, not scaled.
EXPRESSED_THRESHOLD = 0.05
#: Largest factor by which a shift scales a gene's expression.
MAX_SCALE = 10.0


def apply_shift(
    x_ctrl: torch.Tensor,
    delta: torch.Tensor,
    control_mean: torch.Tensor,
    ceiling: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the mean of sets of control cells ``[B, S, G]`` by ``delta`` ``[B, 1, G]``:
    ``(scaled cells, additive offset [B, 1, G])``, whose sum has set mean
    ``control_mean + delta`` (``control_mean`` ``[B, G]``: the context's mean control profile,
    so the result does not inherit the sampling noise of the set's own controls).

    Adding a shift to every cell of sparse log-normalised data and clipping at zero loses most
    of a negative shift and turns zeros positive for a positive one. Instead each expressed gene
    is scaled (zeros stay zeros, values stay non-negative); genes expressed in too few cells, and
    what bounding the scale leaves over, are shifted additively. The scale is at most
    ``MAX_SCALE`` and, with ``ceiling`` ``[G]``, keeps every cell at or below the gene's largest
    value in the data.
    """
    scale, offset = shift_scale(x_ctrl, delta, control_mean, ceiling)
    return x_ctrl * scale, offset


def shift_scale(
    x_ctrl: torch.Tensor,
    delta: torch.Tensor,
    control_mean: torch.Tensor,
    ceiling: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-gene ``(scale, offset)`` ``[B, 1, G]`` of :func:`apply_shift`, for callers that
    add more to the cells (the model's decoder)."""
    set_mean = x_ctrl.mean(dim=1, keepdim=True)
    target = control_mean.unsqueeze(1) + delta
    expressed = set_mean > EXPRESSED_THRESHOLD
    limit = torch.full_like(set_mean, MAX_SCALE)
    if ceiling is not None:
        set_max = x_ctrl.amax(dim=1, keepdim=True)
        limit = torch.minimum(limit, ceiling / set_max.clamp_min(1e-6))
    ratio = target / set_mean.clamp_min(EXPRESSED_THRESHOLD)
    scale = torch.where(expressed, torch.minimum(ratio.clamp_min(0.0), limit.clamp_min(1.0)), 1.0)
    return scale, target - set_mean * scale
