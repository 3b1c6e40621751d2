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
    """Apply a mean shift to sets of control cells so that each set's mean moves exactly by it.

    Adding a mean shift to every cell of sparse log-normalised data and clipping at zero loses
    most of a negative shift (a cell at zero cannot go lower) and turns zeros into small
    positive values for a positive one. Instead, each expressed gene is scaled so that the
    set's mean becomes ``control_mean + delta`` (zeros stay zeros, values stay non-negative);
    genes expressed in too few cells, and what bounding the scale leaves over, are shifted
    additively. The scale is bounded by ``MAX_SCALE`` and, with ``ceiling``, so that no scaled
    cell exceeds the gene's ceiling (the largest value the data reach): a gene expressed in a
    few cells of a set cannot be scaled into values no cell ever had. ``control_mean`` is the
    context's mean control profile, so the generated mean does not inherit the sampling noise
    of the set's own controls.

    Parameters
    ----------
    x_ctrl
        ``[B, S, G]`` control cells.
    delta
        ``[B, 1, G]`` shift.
    control_mean
        ``[B, G]`` mean control profile of each set's context.
    ceiling
        ``[G]`` largest value each gene may take, or ``None``.

    Returns
    -------
    ``(scaled cells [B, S, G], additive offset [B, 1, G])``; ``scaled + offset`` has set mean
    ``control_mean + delta``.
    """
    scale, offset = shift_scale(x_ctrl, delta, control_mean, ceiling)
    return x_ctrl * scale, offset


def shift_scale(
    x_ctrl: torch.Tensor,
    delta: torch.Tensor,
    control_mean: torch.Tensor,
    ceiling: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-gene factors of :func:`apply_shift`: ``(scale [B, 1, G], offset [B, 1, G])``.

    ``x_ctrl * scale + offset`` is what :func:`apply_shift` describes, for callers that add
    more to the cells (the model's decoder).
    """
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
