"""Distributional losses between sets of cells."""

from __future__ import annotations

import torch


def _distances_from_gram(gram: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    # |x - y|^2 = |x|^2 + |y|^2 - 2 <x, y>, clamped away from zero before the square root (as
    # geomloss does) so that identical rows get a zero, finite gradient.
    return (x2.unsqueeze(-1) + y2.unsqueeze(-2) - 2.0 * gram).clamp_min(1e-8).sqrt()


def pairwise_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of two batches of sets, ``[B, N, M]``."""
    x2 = torch.linalg.vecdot(x, x)
    y2 = torch.linalg.vecdot(y, y)
    return _distances_from_gram(x @ y.transpose(-1, -2), x2, y2)


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
    # Squared norms are read off the Gram matrices' diagonals: no extra pass over [B, N, G].
    gram_xx = prediction @ prediction.transpose(-1, -2)
    x2 = torch.diagonal(gram_xx, dim1=-2, dim2=-1)
    with torch.no_grad():
        if include_target_term:
            gram_yy = target @ target.transpose(-1, -2)
            y2 = torch.diagonal(gram_yy, dim1=-2, dim2=-1)
            target_term = 0.5 * _distances_from_gram(gram_yy, y2, y2).mean((-1, -2))
        else:
            y2 = torch.linalg.vecdot(target, target)
    value = _distances_from_gram(prediction @ target.transpose(-1, -2), x2, y2).mean((-1, -2))
    value = value - 0.5 * _distances_from_gram(gram_xx, x2, x2).mean((-1, -2))
    if include_target_term:
        value = value - target_term
    return value
