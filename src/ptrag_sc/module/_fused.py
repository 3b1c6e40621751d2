"""One pass over the generated cells, forward and backward, on the CPU (numba kernels).

The last steps of generation touch every value of the ``[B, S, G]`` output: the control
cells scaled by the evidence (``x * scale``) and each set's offset join the decoder's output,
the result is clipped to ``[0, ceiling]``, and the set's mean is taken for the pseudobulk loss.
Backward, the energy's gradient and the mean's broadcast gradient are summed, masked where the
clip was active, and reduced against the control cells and over the cells for the gradients of
``scale`` and the offset. As PyTorch operations that is four passes over memory forward and
eight backward; on a CPU those passes, not the arithmetic, bound the training step (an
``[16, 64, 2000]`` pass costs 2-4 ms on the development machine). The kernels here do each
direction in one pass, split over the sets between ``torch.get_num_threads()`` threads (numba
releases the GIL). Stage 2's scorer (:func:`keep_logit`) is the other hot path: one kernel per
direction over ``[B, S, K, Hs]`` without storing it. Around it, the concatenated layer norm's
statistics (:func:`norm_statistics`) and the keep decisions with their per-cell sums and the
selected context (:func:`select_and_context`) take a kernel or two each way, replacing about a
hundred PyTorch operations on ``[B, S, K]`` tensors whose per-operation overhead outweighed
their arithmetic. Elsewhere (GPU, half precision) :func:`generate_cells` and stage 2 run the
same computation as PyTorch operations.

The gradient passes where ``0 < y < ceiling`` for the clipped output ``y``, so a value exactly
at its ceiling gets none (``torch.minimum`` would give it half); everywhere else it equals
autograd's.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from numba.extending import overload

from ._components import add_scaled_, cell_mean, relu_ceiling

#: Whether CPU tensors take the kernels (``PTRAG_SC_FUSED_KERNELS=0`` starts with the PyTorch
#: operations everywhere; tests and benchmarks flip it to compare both).
enabled = os.environ.get("PTRAG_SC_FUSED_KERNELS", "1") != "0"
#: ``error_model="numpy"``: a division by zero gives inf/NaN as in NumPy and PyTorch instead of
#: raising, which spares the check that keeps a loop with a division from vectorising.
_KERNEL = {"nogil": True, "cache": True, "boundscheck": False, "error_model": "numpy"}
#: The scorer's kernels sum over the hidden units: reassociating those sums lets them vectorise
#: (results differ from a sequential sum by rounding only; NaN and infinities keep their meaning).
_SUMS = {**_KERNEL, "fastmath": {"reassoc", "contract", "nsz", "arcp"}}


@numba.njit(**_KERNEL)
def _forward(
    source, x, scale, offset, ceiling, out, set_sum, first, last
):  # pragma: no cover - compiled
    copy_source = out.ctypes.data != source.ctypes.data
    n_cells, n_genes = out.shape[1], out.shape[2]
    has_x, has_scale, has_offset = x.shape[0] > 0, scale.shape[0] > 0, offset.shape[0] > 0
    for b in range(first, last):
        total = set_sum[b]
        total[:] = 0
        for s in range(n_cells):
            row = out[b, s]
            if copy_source:
                row[:] = source[b, s]
            if has_x and has_scale:
                cells, factor = x[b, s], scale[b]
                for g in range(n_genes):
                    row[g] += cells[g] * factor[g]
            elif has_x:
                cells = x[b, s]
                for g in range(n_genes):
                    row[g] += cells[g]
            if has_offset:
                shift = offset[b]
                for g in range(n_genes):
                    row[g] += shift[g]
            for g in range(n_genes):
                # Written so that NaN passes through, as torch.clamp lets it.
                value = row[g]
                value = 0.0 if value < 0.0 else value
                value = ceiling[g] if value > ceiling[g] else value
                row[g] = value
                total[g] += value


@numba.njit(**_KERNEL)
def _backward(
    grad, grad_sum, prediction, ceiling, x, grad_in, grad_scale, grad_offset, first, last
):  # pragma: no cover - compiled
    n_cells, n_genes = prediction.shape[1], prediction.shape[2]
    has_grad, has_x, has_offset = grad.shape[0] > 0, x.shape[0] > 0, grad_offset.shape[0] > 0
    for b in range(first, last):
        from_mean = grad_sum[b]
        if has_x:
            grad_scale[b, :] = 0
        if has_offset:
            grad_offset[b, :] = 0
        for s in range(n_cells):
            y, out = prediction[b, s], grad_in[b, s]
            if has_grad:
                incoming = grad[b, s]
                for g in range(n_genes):
                    out[g] = incoming[g] + from_mean[g]
            else:
                out[:] = from_mean
            for g in range(n_genes):
                out[g] = out[g] if (y[g] > 0.0 and y[g] < ceiling[g]) else 0.0
            if has_x:
                cells, total = x[b, s], grad_scale[b]
                for g in range(n_genes):
                    total[g] += out[g] * cells[g]
            if has_offset:
                total = grad_offset[b]
                for g in range(n_genes):
                    total[g] += out[g]


@numba.njit(**_KERNEL)
def _set_mean_max(x, mean, largest, first, last):  # pragma: no cover - compiled
    n_cells, n_genes = x.shape[1], x.shape[2]
    for b in range(first, last):
        total, top = mean[b], largest[b]
        total[:] = 0
        top[:] = x[b, 0]
        for s in range(n_cells):
            row = x[b, s]
            for g in range(n_genes):
                total[g] += row[g]
                top[g] = row[g] if row[g] > top[g] else top[g]
        for g in range(n_genes):
            total[g] /= n_cells


@numba.njit(**_KERNEL)
def _recentre(x, centre, out, first, last):  # pragma: no cover - compiled
    n_cells, n_genes = x.shape[1], x.shape[2]
    shift = np.empty(n_genes, dtype=x.dtype)
    for b in range(first, last):
        # A set is small enough to stay in the cache between the two passes.
        shift[:] = 0
        for s in range(n_cells):
            row = x[b, s]
            for g in range(n_genes):
                shift[g] += row[g]
        for g in range(n_genes):
            shift[g] = centre[b, g] - shift[g] / n_cells
        for s in range(n_cells):
            row, moved = x[b, s], out[b, s]
            for g in range(n_genes):
                moved[g] = row[g] + shift[g]


def _gelu_and_slope(x):  # pragma: no cover - replaced by the overload in kernels
    """``(gelu(x), gelu'(x))`` (exact GELU, ``x * Phi(x)``)."""
    raise NotImplementedError("compiled only")


@overload(_gelu_and_slope, inline="always")
def _gelu_and_slope_for(x):  # pragma: no cover - compiled
    # float64: libm's erf and exp. float32: the vectorisable rational erf of Eigen/XLA (max error
    # 4e-7 here) and exp(-x^2/2) as a degree-10 polynomial raised to the 16th power; both as
    # accurate as PyTorch's own float32 GELU (its erf is Abramowitz-Stegun 7.1.26 with exp), and
    # without a call per value, which numba cannot vectorise without Intel's SVML.
    if x == numba.types.float64:

        def exact(x):
            cdf = 0.5 * (1.0 + math.erf(x * _SQRT_HALF))
            return x * cdf, cdf + x * math.exp(-0.5 * x * x) * _INV_SQRT_2PI

        return exact
    f = np.float32
    erf_numerator = [f(c) for c in _ERF_NUMERATOR]
    erf_denominator = [f(c) for c in _ERF_DENOMINATOR]
    exp_coefficients = [f(1.0 / math.factorial(n)) for n in range(10, -1, -1)]
    a0, a1, a2, a3, a4, a5, a6 = erf_numerator
    b0, b1, b2, b3, b4 = erf_denominator
    e10, e9, e8, e7, e6, e5, e4, e3, e2, e1, e0 = exp_coefficients
    half, one, erf_clip, tail, sqrt_half, inv_sqrt_2pi, minus_1_32 = (
        f(0.5), f(1.0), f(4.0), f(6.0), f(_SQRT_HALF), f(_INV_SQRT_2PI), f(-1.0 / 32.0)
    )

    def fast(x):
        z = x * sqrt_half
        z = -erf_clip if z < -erf_clip else z
        z = erf_clip if z > erf_clip else z
        z2 = z * z
        p = ((((((a6 * z2 + a5) * z2 + a4) * z2 + a3) * z2 + a2) * z2 + a1) * z2 + a0) * z
        q = (((b4 * z2 + b3) * z2 + b2) * z2 + b1) * z2 + b0
        cdf = half * (one + p / q)
        # phi(x) * sqrt(2 pi) = exp(-x^2 / 2) = exp(-x^2 / 32)^16, |x| <= 6 (beyond it is < 2e-8)
        c = -tail if x < -tail else x
        c = tail if c > tail else c
        u = c * c * minus_1_32
        e = ((((((((((e10 * u + e9) * u + e8) * u + e7) * u + e6) * u + e5) * u + e4) * u + e3) * u + e2) * u + e1) * u + e0)
        e = e * e
        e = e * e
        e = e * e
        e = e * e
        return x * cdf, cdf + c * e * inv_sqrt_2pi

    return fast


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
#: erf(z) = z * P(z^2) / Q(z^2) on [-4, 4] (odd and even monomial coefficients, lowest first).
_ERF_NUMERATOR = (
    -1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04, -5.69250639462346e-05,
    -2.10102402082508e-06, 2.77068142495902e-08, -2.72614225801306e-10,
)
_ERF_DENOMINATOR = (
    -1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03, -2.13374055278905e-04,
    -1.45660718464996e-05,
)


@numba.njit(**_SUMS)
def _keep_logit(
    cell_part, cand_part, mean, rstd, w_sum, bias, v, v0, logit, first, last
):  # pragma: no cover - compiled
    n_cells, n_candidates, n_hidden = cell_part.shape[1], cand_part.shape[1], cell_part.shape[2]
    for b in range(first, last):
        for s in range(n_cells):
            cell = cell_part[b, s]
            for k in range(n_candidates):
                cand, m, r = cand_part[b, k], mean[b, s, k], rstd[b, s, k]
                total = v0[0]
                for h in range(n_hidden):
                    activated, _ = _gelu_and_slope(r * (cell[h] + cand[h] - m * w_sum[h]) + bias[h])
                    total += v[h] * activated
                logit[b, s, k] = total


@numba.njit(**_SUMS)
def _keep_logit_backward(
    grad,
    cell_part,
    cand_part,
    mean,
    rstd,
    w_sum,
    bias,
    v,
    zero,
    grad_cell,
    grad_cand,
    grad_mean,
    grad_rstd,
    grad_w_sum,
    grad_bias,
    grad_v,
    first,
    last,
):  # pragma: no cover - compiled
    n_cells, n_candidates, n_hidden = cell_part.shape[1], cand_part.shape[1], cell_part.shape[2]
    for b in range(first, last):
        grad_cell[b] = 0
        grad_cand[b] = 0
        grad_w_sum[b] = 0
        grad_bias[b] = 0
        grad_v[b] = 0
        for s in range(n_cells):
            cell, g_cell = cell_part[b, s], grad_cell[b, s]
            for k in range(n_candidates):
                cand, g_cand = cand_part[b, k], grad_cand[b, k]
                g, m, r = grad[b, s, k], mean[b, s, k], rstd[b, s, k]
                dot_hidden = zero[0]
                dot_w = zero[0]
                for h in range(n_hidden):
                    # The first layer and GELU are recomputed: cheaper than storing [B, S, K, Hs].
                    hidden = cell[h] + cand[h] - m * w_sum[h]
                    activated, slope = _gelu_and_slope(r * hidden + bias[h])
                    g_pre = g * v[h] * slope
                    dot_hidden += g_pre * hidden
                    g_hidden = g_pre * r
                    dot_w += g_hidden * w_sum[h]
                    g_cell[h] += g_hidden
                    g_cand[h] += g_hidden
                    grad_w_sum[b, h] -= g_hidden * m
                    grad_bias[b, h] += g_pre
                    grad_v[b, h] += activated * g
                grad_rstd[b, s, k] = dot_hidden
                grad_mean[b, s, k] = -dot_w


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _over_sets(kernel, n_sets: int, *arrays) -> None:
    """Run ``kernel(*arrays, first, last)`` over ranges of the sets, one per torch thread."""
    global _pool
    n_parts = min(torch.get_num_threads(), n_sets)
    if n_parts <= 1:
        kernel(*arrays, 0, n_sets)
        return
    with _pool_lock:
        if _pool is None or _pool._max_workers < n_parts:
            _pool = ThreadPoolExecutor(
                max_workers=max(n_parts, os.cpu_count() or 1), thread_name_prefix="ptrag_sc"
            )
        pool = _pool
    bounds = np.linspace(0, n_sets, n_parts + 1).astype(np.int64)
    futures = [pool.submit(kernel, *arrays, bounds[i], bounds[i + 1]) for i in range(n_parts)]
    for future in futures:
        future.result()


def _numpy(
    tensor: torch.Tensor | None, like: torch.Tensor | None = None, n_dims: int = 3
) -> np.ndarray:
    """A numpy view of ``tensor``; ``None`` becomes an empty array of ``like``'s dtype (the
    kernels' "absent")."""
    if tensor is None:
        return np.zeros((0,) * n_dims, dtype=like.detach().numpy().dtype)
    return tensor.detach().contiguous().numpy()


class _GenerateCells(torch.autograd.Function):
    """``y = clip(base + x * scale + offset, 0, ceiling)`` in place of ``base``, and ``y``'s set mean."""

    @staticmethod
    def forward(ctx, base, x, scale, offset, ceiling):
        n_sets, n_cells, n_genes = base.shape
        # In place, unless `base` is a view (autograd cannot let a function that overwrites a
        # view return two tensors; a dispatch mode such as FlopCounterMode can make it one).
        in_place = not base._is_view()
        out = base.detach() if in_place else torch.empty_like(base)
        set_sum = base.new_empty(n_sets, n_genes)
        per_set = lambda t: _numpy(None if t is None else t.reshape(n_sets, n_genes), out, n_dims=2)  # noqa: E731
        _over_sets(
            _forward,
            n_sets,
            base.detach().numpy(),
            _numpy(x, out),
            per_set(scale),
            per_set(offset),
            _numpy(ceiling),
            out.numpy(),
            set_sum.numpy(),
        )
        if in_place:
            ctx.mark_dirty(base)
            out = base
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(out, x, ceiling)
        ctx.scale_shape = None if scale is None else scale.shape
        ctx.offset_shape = None if offset is None else offset.shape
        return out, set_sum.div_(n_cells)

    @staticmethod
    def backward(ctx, grad_prediction, grad_mean):
        prediction, x, ceiling = ctx.saved_tensors
        n_sets, n_cells, n_genes = prediction.shape
        want_scale = ctx.scale_shape is not None and ctx.needs_input_grad[2]
        want_offset = ctx.offset_shape is not None and ctx.needs_input_grad[3]
        if grad_prediction is None and grad_mean is None:
            return None, None, None, None, None
        grad_sum = (
            grad_mean / n_cells if grad_mean is not None else prediction.new_zeros(n_sets, n_genes)
        )
        grad_in = torch.empty_like(prediction)
        per_set = lambda wanted: prediction.new_empty(n_sets, n_genes) if wanted else prediction.new_empty(0, 0)  # noqa: E731
        grad_scale, grad_offset = per_set(want_scale), per_set(want_offset)
        _over_sets(
            _backward,
            n_sets,
            _numpy(grad_prediction, prediction),
            _numpy(grad_sum),
            _numpy(prediction),
            _numpy(ceiling),
            _numpy(x if want_scale else None, prediction),
            grad_in.numpy(),
            grad_scale.numpy(),
            grad_offset.numpy(),
        )
        return (
            grad_in,
            None,
            grad_scale.reshape(ctx.scale_shape) if want_scale else None,
            grad_offset.reshape(ctx.offset_shape) if want_offset else None,
            None,
        )


def generate_cells(
    base: torch.Tensor,
    x: torch.Tensor | None,
    scale: torch.Tensor | None,
    ceiling: torch.Tensor,
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The generated cells and their set means: ``clip(base + x * scale + offset, 0, ceiling)``.

    Parameters
    ----------
    base
        ``[B, S, G]`` decoder output; overwritten with the result (unless it is a view).
    x
        ``[B, S, G]`` control cells (no gradient), or ``None`` (nothing added).
    scale
        ``[B, 1, G]`` per-set gene factors for ``x``, or ``None`` (``x`` added as it is).
    ceiling
        ``[G]`` largest value of each gene (no gradient).
    offset
        ``[B, 1, G]`` per-set vector added to every cell, or ``None``.

    Returns
    -------
    ``(cells [B, S, G], set means [B, G])``.
    """
    if x is None and scale is not None:
        raise ValueError("`scale` needs `x`.")
    given = [t for t in (x, scale, offset) if t is not None]
    if (
        kernels_take(base, *given, ceiling, n_dims=3)
        and base.is_contiguous()
        and not (ceiling.requires_grad or (x is not None and x.requires_grad))
    ):
        return _GenerateCells.apply(base, x, scale, offset, ceiling)
    out = base
    if x is not None:
        out = add_scaled_(out, x, scale) if scale is not None else out.add_(x)
    if offset is not None:
        out = out.add_(offset)
    prediction = relu_ceiling(out, ceiling)
    return prediction, cell_mean(prediction)


def kernels_take(
    *tensors: torch.Tensor, n_dims: int | None = None, without_gradient: bool = False
) -> bool:
    """Whether the kernels take these tensors: CPU, one float dtype (``n_dims`` for the first;
    with ``without_gradient``, none of them needing a gradient)."""
    first = tensors[0]
    return (
        enabled
        and first.device.type == "cpu"
        and first.dtype in (torch.float32, torch.float64)
        and (n_dims is None or first.dim() == n_dims)
        and all(
            t.device.type == "cpu"
            and t.dtype == first.dtype
            and not (without_gradient and t.requires_grad and torch.is_grad_enabled())
            for t in tensors
        )
    )


def set_mean_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and maximum over the cells of each set, ``[B, S, G] -> ([B, 1, G], [B, 1, G])``, in one pass."""
    if not kernels_take(x, n_dims=3, without_gradient=True) or x.shape[1] == 0:
        return x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    x = x.contiguous()
    mean, largest = x.new_empty(x.shape[0], x.shape[2]), x.new_empty(x.shape[0], x.shape[2])
    _over_sets(_set_mean_max, x.shape[0], x.numpy(), mean.numpy(), largest.numpy())
    return mean.unsqueeze(1), largest.unsqueeze(1)


def recentre(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``x`` moved so that each set's mean is ``centre`` (``[B, S, G]``, ``[B, G]``), in one pass."""
    if not kernels_take(x, centre, n_dims=3, without_gradient=True):
        return x + (centre.unsqueeze(1) - x.mean(dim=1, keepdim=True))
    x, centre = x.contiguous(), centre.contiguous()
    out = torch.empty_like(x)
    _over_sets(
        _recentre,
        x.shape[0],
        x.numpy(),
        centre.reshape(x.shape[0], x.shape[2]).numpy(),
        out.numpy(),
    )
    return out


def keep_logit(cell_part, cand_part, mean, rstd, w_sum, bias, v, v0) -> torch.Tensor:
    """Stage 2's keep logits ``v . gelu(rstd * (cell_part_s + cand_part_k - mean * w_sum) + bias) + v0``,
    ``[B, S, K]``, in one pass without the ``[B, S, K, Hs]`` intermediates."""
    n_sets, n_cells, _ = cell_part.shape
    logit = cell_part.new_empty(n_sets, n_cells, cand_part.shape[1])
    _over_sets(
        _keep_logit,
        n_sets,
        _numpy(cell_part),
        _numpy(cand_part),
        _numpy(mean.reshape(logit.shape)),
        _numpy(rstd.reshape(logit.shape)),
        _numpy(w_sum),
        _numpy(bias),
        _numpy(v),
        _numpy(v0.reshape(1)),
        logit.numpy(),
    )
    return logit


def keep_logit_backward(grad, cell_part, cand_part, mean, rstd, w_sum, bias, v):
    """Gradients of :func:`keep_logit`'s inputs from ``grad`` ``[B, S, K]``.

    Returns the gradients of ``cell_part``, ``cand_part``, ``mean`` and ``rstd`` (``[B, S, K]``),
    ``w_sum``, ``bias``, ``v`` (summed over the sets) and ``v0``.
    """
    n_sets, n_cells, n_hidden = cell_part.shape
    n_candidates = cand_part.shape[1]
    new = cell_part.new_empty
    grad_cell, grad_cand = new(n_sets, n_cells, n_hidden), new(n_sets, n_candidates, n_hidden)
    grad_mean, grad_rstd = new(n_sets, n_cells, n_candidates), new(n_sets, n_cells, n_candidates)
    per_set = [new(n_sets, n_hidden) for _ in range(3)]  # w_sum, bias, v: summed over sets below
    _over_sets(
        _keep_logit_backward,
        n_sets,
        _numpy(grad),
        _numpy(cell_part),
        _numpy(cand_part),
        _numpy(mean.reshape(grad.shape)),
        _numpy(rstd.reshape(grad.shape)),
        _numpy(w_sum),
        _numpy(bias),
        _numpy(v),
        np.zeros(1, dtype=grad_cell.numpy().dtype),
        grad_cell.numpy(),
        grad_cand.numpy(),
        grad_mean.numpy(),
        grad_rstd.numpy(),
        *(t.numpy() for t in per_set),
    )
    return grad_cell, grad_cand, grad_mean, grad_rstd, *(t.sum(0) for t in per_set), grad.sum()


# ------------------------------------------------------------------------ stage 2 around the scorer
@numba.njit(**_SUMS)
def _norm_statistics(
    cell_sum, cell_sq, pert_sum, pert_sq, cand_sum, cand_sq, constants, mean, rstd, first, last
):  # pragma: no cover - compiled
    n_cells, n_candidates = mean.shape[1], mean.shape[2]
    inv_n, eps, one = constants[0], constants[1], constants[2]
    for b in range(first, last):
        for s in range(n_cells):
            for k in range(n_candidates):
                m = (cell_sum[b, s] + pert_sum[b] + cand_sum[b, k]) * inv_n
                var = (cell_sq[b, s] + pert_sq[b] + cand_sq[b, k]) * inv_n - m * m
                mean[b, s, k] = m
                rstd[b, s, k] = one / np.sqrt(max(var, one * 0) + eps)


@numba.njit(**_SUMS)
def _norm_statistics_backward(
    grad_mean, grad_rstd, cell_sum, cell_sq, pert_sum, pert_sq, cand_sum, cand_sq, constants,
    grad_cell_sum, grad_cell_sq, grad_pert_sum, grad_pert_sq, grad_cand_sum, grad_cand_sq, first, last,
):  # pragma: no cover - compiled
    n_cells, n_candidates = grad_mean.shape[1], grad_mean.shape[2]
    inv_n, eps, one = constants[0], constants[1], constants[2]
    zero, half, two = one * 0, one * 0.5, one + one
    for b in range(first, last):
        grad_pert_sum[b] = 0
        grad_pert_sq[b] = 0
        grad_cand_sum[b] = 0
        grad_cand_sq[b] = 0
        for s in range(n_cells):
            total_sum, total_sq = zero, zero
            for k in range(n_candidates):
                m = (cell_sum[b, s] + pert_sum[b] + cand_sum[b, k]) * inv_n
                var = (cell_sq[b, s] + pert_sq[b] + cand_sq[b, k]) * inv_n - m * m
                # rstd = (max(var, 0) + eps)^(-1/2); the clamp passes the gradient where var >= 0.
                r = one / np.sqrt(max(var, zero) + eps)
                grad_var = -half * r * r * r * grad_rstd[b, s, k] if var >= zero else zero
                d_sum = (grad_mean[b, s, k] - two * m * grad_var) * inv_n
                d_sq = grad_var * inv_n
                total_sum += d_sum
                total_sq += d_sq
                grad_cand_sum[b, k] += d_sum
                grad_cand_sq[b, k] += d_sq
            grad_cell_sum[b, s] = total_sum
            grad_cell_sq[b, s] = total_sq
            grad_pert_sum[b] += total_sum
            grad_pert_sq[b] += total_sq


@numba.njit(**_SUMS)
def _select(decision, mask, mean, rstd, keep, scaled, set_sums, first, last):  # pragma: no cover - compiled
    n_cells, n_candidates = decision.shape[1], decision.shape[2]
    zero = decision[0, 0, 0] * 0
    for b in range(first, last):
        for s in range(n_cells):
            kept, kept_mean, n_kept = zero, zero, zero
            for k in range(n_candidates):
                chosen = mask[b, k] if decision[b, s, k] > 0 else zero
                keep[b, s, k] = chosen
                weight = chosen * rstd[b, s, k]
                scaled[b, s, k] = weight
                kept += weight
                kept_mean += weight * mean[b, s, k]
                n_kept += chosen
            set_sums[b, s, 0] = kept
            set_sums[b, s, 1] = kept_mean
            set_sums[b, s, 2] = n_kept


@numba.njit(**_SUMS)
def _context_rest(context, set_sums, cell_proj, p_sum, p_bias, first, last):  # pragma: no cover - compiled
    n_cells, n_out = context.shape[1], context.shape[2]
    for b in range(first, last):
        for s in range(n_cells):
            out, cell = context[b, s], cell_proj[b, s]
            kept, kept_mean, n_kept = set_sums[b, s, 0], set_sums[b, s, 1], set_sums[b, s, 2]
            for h in range(n_out):
                out[h] += kept * cell[h] - kept_mean * p_sum[h] + n_kept * p_bias[h]


@numba.njit(**_SUMS)
def _select_backward(
    grad_context, grad_dot, grad_keep, grad_probability, keep, probability, soft, mask, constants,
    set_sums, cell_proj, p_sum, p_bias, mean, rstd,
    grad_logit, grad_offset, grad_mean, grad_rstd, grad_cell_proj, grad_p_sum, grad_p_bias,
    first, last,
):  # pragma: no cover - compiled
    n_cells, n_candidates, n_out = keep.shape[1], keep.shape[2], cell_proj.shape[2]
    straight_through = soft.shape[0] > 0
    has_keep, has_probability = grad_keep.shape[0] > 0, grad_probability.shape[0] > 0
    inv_tau, one = constants[0], constants[1]
    zero = one * 0
    for b in range(first, last):
        grad_offset[b] = 0
        grad_p_sum[b] = 0
        grad_p_bias[b] = 0
        for s in range(n_cells):
            g, cell, g_cell = grad_context[b, s], cell_proj[b, s], grad_cell_proj[b, s]
            kept, kept_mean, n_kept = set_sums[b, s, 0], set_sums[b, s, 1], set_sums[b, s, 2]
            d_kept, d_kept_mean, d_n_kept = zero, zero, zero
            for h in range(n_out):
                d_kept += g[h] * cell[h]
                d_kept_mean -= g[h] * p_sum[h]
                d_n_kept += g[h] * p_bias[h]
                g_cell[h] = kept * g[h]
                grad_p_sum[b, h] -= kept_mean * g[h]
                grad_p_bias[b, h] += n_kept * g[h]
            for k in range(n_candidates):
                chosen, r, m = keep[b, s, k], rstd[b, s, k], mean[b, s, k]
                d_scaled = grad_dot[b, s, k] + d_kept + d_kept_mean * m
                grad_mean[b, s, k] = d_kept_mean * chosen * r
                grad_rstd[b, s, k] = d_scaled * chosen
                d_logit = zero
                if straight_through:
                    d_keep = d_scaled * r + d_n_kept
                    if has_keep:
                        d_keep += grad_keep[b, s, k]
                    q = soft[b, s, k]
                    d_logit += d_keep * mask[b, k] * q * (one - q) * inv_tau
                if has_probability:
                    p = probability[b, s, k]
                    d_logit += grad_probability[b, s, k] * p * (one - p)
                grad_logit[b, s, k] = d_logit
                grad_offset[b, k] += d_logit


def norm_statistics(sums, n_in: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and reciprocal standard deviation ``[B, S, K]`` of the concatenation ``[cell_s, pert,
    cand_k]`` from each part's sum and sum of squares (``sums``: cell ``[B, S]`` x2, query ``[B]``
    x2, candidate ``[B, K]`` x2)."""
    cell_sum = sums[0]
    n_sets, n_cells, n_candidates = cell_sum.shape[0], cell_sum.shape[1], sums[4].shape[1]
    mean = cell_sum.new_empty(n_sets, n_cells, n_candidates)
    rstd = torch.empty_like(mean)
    constants = np.array([1.0 / n_in, eps, 1.0], dtype=mean.numpy().dtype)
    _over_sets(_norm_statistics, n_sets, *(_numpy(t) for t in sums), constants, mean.numpy(), rstd.numpy())
    return mean, rstd


def norm_statistics_backward(grad_mean, grad_rstd, sums, n_in: int, eps: float) -> list[torch.Tensor]:
    """Gradients of :func:`norm_statistics`' six sums."""
    grads = [torch.empty_like(t) for t in sums]
    _over_sets(
        _norm_statistics_backward,
        grad_mean.shape[0],
        _numpy(grad_mean),
        _numpy(grad_rstd),
        *(_numpy(t) for t in sums),
        np.array([1.0 / n_in, eps, 1.0], dtype=grad_mean.numpy().dtype),
        *(g.numpy() for g in grads),
    )
    return grads


def select_and_context(logit, offset, mask, noise, tau, cell_proj, cand_proj, p_sum, p_bias, mean, rstd):
    """Keep decisions, keep probabilities and the selected context of stage 2.

    ``logit`` ``[B, S, K]`` (the scorer's, without ``offset`` ``[B, K]``), ``mask`` ``[B, K]`` (1 for
    a valid candidate), ``noise`` ``[B, S, K]`` logistic noise or ``None`` (threshold at 0).
    Returns ``(keep, probability, soft, scaled, set_sums, context)``: ``soft`` is the relaxed
    sample (empty without noise), ``scaled = keep * rstd``, ``set_sums`` ``[B, S, 3]`` holds
    ``sum_k scaled``, ``sum_k scaled * mean`` and ``sum_k keep``, and ``context`` ``[B, S, H]`` is
    ``sum_k scaled_k * (cell_proj + cand_proj_k - mean_k * p_sum) + p_bias * sum_k keep_k``.
    """
    # The sigmoids stay in PyTorch: vectorised there, a call per value in numba.
    decision = logit + offset.unsqueeze(1)
    probability = torch.sigmoid(decision).mul_(mask.unsqueeze(1))
    if noise is not None:
        decision.add_(noise)
        soft = torch.sigmoid(decision / tau)
    else:
        soft = logit.new_empty(0, 0, 0)
    keep, scaled = torch.empty_like(logit), torch.empty_like(logit)
    set_sums = logit.new_empty(logit.shape[0], logit.shape[1], 3)
    _over_sets(
        _select,
        logit.shape[0],
        decision.numpy(),
        _numpy(mask),
        _numpy(mean),
        _numpy(rstd),
        keep.numpy(),
        scaled.numpy(),
        set_sums.numpy(),
    )
    context = torch.bmm(scaled, cand_proj.contiguous())
    _over_sets(_context_rest, logit.shape[0], context.numpy(), set_sums.numpy(), _numpy(cell_proj), _numpy(p_sum), _numpy(p_bias))
    return keep, probability, soft, scaled, set_sums, context


def select_and_context_backward(
    grad_context, grad_keep, grad_probability, keep, probability, soft, scaled, set_sums, mask, tau, cell_proj, cand_proj, p_sum, p_bias, mean, rstd
):
    """Gradients of :func:`select_and_context` (straight-through for ``keep`` when ``soft`` is
    not empty): ``logit``, ``offset``, ``mean``, ``rstd``, ``cell_proj``, ``cand_proj``,
    ``p_sum``, ``p_bias``."""
    n_sets, n_candidates, n_out = keep.shape[0], keep.shape[2], cell_proj.shape[2]
    new = keep.new_empty
    grad_logit, grad_mean, grad_rstd = torch.empty_like(keep), torch.empty_like(keep), torch.empty_like(keep)
    grad_offset = new(n_sets, n_candidates)
    grad_cell_proj = torch.empty_like(cell_proj)
    grad_p_sum, grad_p_bias = new(n_sets, n_out), new(n_sets, n_out)
    if grad_context is None:
        grad_context = torch.zeros_like(cell_proj)
    grad_context = grad_context.contiguous()
    grad_dot = torch.bmm(grad_context, cand_proj.transpose(1, 2))  # [B, S, K]
    grad_cand_proj = torch.bmm(scaled.transpose(1, 2), grad_context)  # [B, K, H]
    _over_sets(
        _select_backward,
        n_sets,
        grad_context.numpy(),
        grad_dot.numpy(),
        _numpy(grad_keep, keep),
        _numpy(grad_probability, keep),
        _numpy(keep),
        _numpy(probability),
        _numpy(soft),
        _numpy(mask),
        np.array([1.0 / tau, 1.0], dtype=keep.numpy().dtype),
        _numpy(set_sums),
        _numpy(cell_proj),
        _numpy(p_sum),
        _numpy(p_bias),
        _numpy(mean),
        _numpy(rstd),
        grad_logit.numpy(),
        grad_offset.numpy(),
        grad_mean.numpy(),
        grad_rstd.numpy(),
        grad_cell_proj.numpy(),
        grad_p_sum.numpy(),
        grad_p_bias.numpy(),
    )
    return grad_logit, grad_offset, grad_mean, grad_rstd, grad_cell_proj, grad_cand_proj, grad_p_sum.sum(0), grad_p_bias.sum(0)
