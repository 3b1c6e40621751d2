"""Distributional losses between sets of cells."""

from __future__ import annotations

import torch

#: Squared distances are clamped at this value before the square root (as geomloss does), so
#: that identical rows get a zero, finite gradient.
_MIN_SQUARED_DISTANCE = 1e-8


def _distances_from_gram(gram: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    # |x - y|^2 = |x|^2 + |y|^2 - 2 <x, y>
    return _squared_from_gram(gram, x2, y2).clamp_min(_MIN_SQUARED_DISTANCE).sqrt()


def _squared_from_gram(gram: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    return x2.unsqueeze(-1) + y2.unsqueeze(-2) - 2.0 * gram


def pairwise_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of two batches of sets, ``[B, N, M]``."""
    x2 = torch.linalg.vecdot(x, x)
    y2 = torch.linalg.vecdot(y, y)
    return _distances_from_gram(x @ y.transpose(-1, -2), x2, y2)


def _energy_terms(prediction, target, include_target_term):
    """Forward pass of the energy distance; also returns what the closed-form gradient needs."""
    gram_xx = prediction @ prediction.transpose(-1, -2)
    # Squared norms are read off the Gram matrices' diagonals: no extra pass over [B, N, G].
    x2 = torch.diagonal(gram_xx, dim1=-2, dim2=-1)
    with torch.no_grad():
        if include_target_term:
            gram_yy = target @ target.transpose(-1, -2)
            y2 = torch.diagonal(gram_yy, dim1=-2, dim2=-1)
            target_term = 0.5 * _distances_from_gram(gram_yy, y2, y2).mean((-1, -2))
        else:
            y2 = torch.linalg.vecdot(target, target)
    sq_xy = _squared_from_gram(prediction @ target.transpose(-1, -2), x2, y2)
    sq_xx = _squared_from_gram(gram_xx, x2, x2)
    d_xy = sq_xy.clamp_min(_MIN_SQUARED_DISTANCE).sqrt()
    d_xx = sq_xx.clamp_min(_MIN_SQUARED_DISTANCE).sqrt()
    value = d_xy.mean((-1, -2)) - 0.5 * d_xx.mean((-1, -2))
    if include_target_term:
        value = value - target_term
    return value, (sq_xy, d_xy, sq_xx, d_xx)


class _EnergyDistance(torch.autograd.Function):
    """Energy distance with a closed-form gradient with respect to the prediction.

    Autograd through the Gram matrices costs three ``[B, N, G]`` matrix products and two
    ``[B, N, G]`` additions; the closed form below costs two matrix products and nothing else:
    with ``a = dE/d|x_i - y_j|^2`` and ``b = dE/d|x_i - x_j|^2``,
    ``dE/dX = (diag(2 a 1 + 4 b 1) - 4 b) X - 2 a Y``. The result equals autograd's up to the
    order of floating-point sums (including the zero gradient where a squared distance is
    clamped).
    """

    @staticmethod
    def forward(ctx, prediction, target, include_target_term):
        value, saved = _energy_terms(prediction, target, include_target_term)
        ctx.save_for_backward(prediction, target, *saved)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        prediction, target, sq_xy, d_xy, sq_xx, d_xx = ctx.saved_tensors
        n, m = prediction.shape[-2], target.shape[-2]
        g = grad_value[:, None, None]
        # d sqrt(clamp_min(s, eps)) / ds = 1 / (2 sqrt(s)) where s >= eps, else 0 (as autograd).
        a = torch.where(sq_xy >= _MIN_SQUARED_DISTANCE, (g / (2.0 * n * m)) / d_xy, 0.0)
        b = torch.where(sq_xx >= _MIN_SQUARED_DISTANCE, (g * (-0.5 / (2.0 * n * n))) / d_xx, 0.0)
        mixing = torch.diag_embed(2.0 * a.sum(-1) + 4.0 * b.sum(-1)) - 4.0 * b
        grad = torch.bmm(mixing, prediction)
        grad.baddbmm_(a, target, alpha=-2.0)
        return grad, None, None


def energy_distance(
    prediction: torch.Tensor, target: torch.Tensor, *, include_target_term: bool = True
) -> torch.Tensor:
    """Energy distance between each predicted set and its target set.

    Uses geomloss' convention, ``E|X-Y| - E|X-X'|/2 - E|Y-Y'|/2`` (V-statistics over all
    pairs), so values equal ``geomloss.SamplesLoss("energy")`` set by set. The last term does
    not depend on the model; ``include_target_term=False`` drops it to save a third of the
    loss' matrix products, which leaves gradients unchanged.

    Gradients flow to ``prediction`` (in closed form, see ``_EnergyDistance``); when ``target``
    also requires a gradient, autograd differentiates the plain computation instead.

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
    if target.requires_grad or prediction.dim() != 3:
        return _energy_terms(prediction, target, include_target_term)[0]
    if prediction.requires_grad and torch.is_grad_enabled():
        return _EnergyDistance.apply(prediction, target, include_target_term)
    with torch.no_grad():
        return _energy_terms(prediction, target, include_target_term)[0]
