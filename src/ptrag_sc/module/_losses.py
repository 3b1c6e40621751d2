"""Distributional losses between sets of cells."""

from __future__ import annotations

import torch


def pairwise_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of two batches of sets, ``[B, N, M]``.

    Squared distances are clamped away from zero before the square root, as geomloss does,
    so identical rows give a finite (zero) gradient.
    """
    x2 = x.pow(2).sum(-1, keepdim=True)
    y2 = y.pow(2).sum(-1).unsqueeze(-2)
    d2 = torch.baddbmm(x2 + y2, x, y.transpose(-1, -2), alpha=-2.0)
    return d2.clamp_min(1e-8).sqrt()


def energy_distance(
    prediction: torch.Tensor, target: torch.Tensor, *, include_target_term: bool = True
) -> torch.Tensor:
    """Energy distance between each predicted set and its target set.

    Uses geomloss' convention, ``E|X-Y| - E|X-X'|/2 - E|Y-Y'|/2`` (V-statistics over all
    pairs), so values equal ``geomloss.SamplesLoss("energy")`` set by set. The last term does
    not depend on the model; training drops it (``include_target_term=False``) to save a third
    of the loss' matrix products, which leaves gradients unchanged.

    Parameters
    ----------
    prediction
        ``[B, N, G]`` predicted cells.
    target
        ``[B, M, G]`` observed cells.
    include_target_term
        Whether to add ``-E|Y-Y'|/2``.

    Returns
    -------
    ``[B]`` energy distance of each set.
    """
    value = pairwise_distances(prediction, target).mean((-1, -2))
    value = value - 0.5 * pairwise_distances(prediction, prediction).mean((-1, -2))
    if include_target_term:
        value = value - 0.5 * pairwise_distances(target, target).mean((-1, -2))
    return value
