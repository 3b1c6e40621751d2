"""Distributional losses between sets of cells."""

from __future__ import annotations

import torch

#: Squared distances are clamped at this value before the square root (as geomloss does), so
#: that identical rows get a zero, finite gradient.
_MIN_SQUARED_DISTANCE = 1e-8


def _distances(gram: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """Euclidean distances from ``<x, y>`` and the squared norms."""
    squared = x2.unsqueeze(-1) + y2.unsqueeze(-2) - 2.0 * gram
    return squared.clamp_min(_MIN_SQUARED_DISTANCE).sqrt()


def _gram_and_norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Norms read off the diagonal make a row's distance to itself exactly zero, at no extra pass.
    gram = x @ x.mT
    return gram, torch.diagonal(gram, dim1=-2, dim2=-1)


def pairwise_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of two batches of sets, ``[B, N, M]``."""
    return _distances(x @ y.mT, torch.linalg.vecdot(x, x), torch.linalg.vecdot(y, y))


def energy_distance(
    prediction: torch.Tensor, target: torch.Tensor, *, include_target_term: bool = True
) -> torch.Tensor:
    """Energy distance between each predicted set and its target set.

    Uses geomloss' convention, ``E|X-Y| - E|X-X'|/2 - E|Y-Y'|/2`` (V-statistics over all
    pairs), so values equal ``geomloss.SamplesLoss("energy")`` set by set.

    Parameters
    ----------
    prediction
        ``[B, N, G]`` predicted cells.
    target
        ``[B, M, G]`` observed cells.
    include_target_term
        Whether to add ``-E|Y-Y'|/2``. It does not depend on the prediction: leaving it out
        saves a third of the matrix products and leaves the gradient unchanged.

    Returns
    -------
    ``[B]`` energy distance of each set.
    """
    gram_xx, x2 = _gram_and_norms(prediction)
    cross = _distances(prediction @ target.mT, x2, torch.linalg.vecdot(target, target))
    value = cross.mean((-1, -2)) - 0.5 * _distances(gram_xx, x2, x2).mean((-1, -2))
    if include_target_term:
        gram_yy, y2 = _gram_and_norms(target)
        value = value - 0.5 * _distances(gram_yy, y2, y2).mean((-1, -2))
    return value
