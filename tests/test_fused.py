"""The CPU kernels of the per-cell hot path equal the PyTorch operations they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptrag_sc.module import _fused
from ptrag_sc.module._fused import generate_cells, recentre, set_mean_max


@pytest.fixture
def torch_only(monkeypatch):
    """Run the PyTorch operations instead of the kernels inside the ``with`` block of a test."""

    class Switch:
        def __enter__(self):
            monkeypatch.setattr(_fused, "enabled", False)

        def __exit__(self, *args):
            monkeypatch.setattr(_fused, "enabled", True)

    return Switch()


def _inputs(dtype, with_cells=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 5, 40, generator=gen, dtype=dtype)
    x = torch.rand(3, 5, 40, generator=gen, dtype=dtype) if with_cells else None
    scale = (torch.rand(3, 1, 40, generator=gen, dtype=dtype) * 2) if with_cells else None
    ceiling = torch.rand(40, generator=gen, dtype=dtype) + 0.6
    ceiling[::7] = float("inf")  # genes without a ceiling
    return base, x, scale, ceiling


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cells_added", ["scaled", "as they are", "none"])
@pytest.mark.parametrize("with_offset", [True, False])
@pytest.mark.parametrize("outputs_used", ["both", "cells", "mean"])
def test_generate_cells_forward_and_gradients_equal_torch(
    dtype, cells_added, with_offset, outputs_used, torch_only
):
    base, x, scale, ceiling = _inputs(dtype, cells_added != "none")
    if cells_added == "as they are":
        scale = None
    gen = torch.Generator().manual_seed(1)
    w_cells = torch.randn(base.shape, generator=gen, dtype=dtype)
    w_mean = torch.randn(base.shape[0], base.shape[2], generator=gen, dtype=dtype)
    offset = torch.randn(base.shape[0], 1, base.shape[2], generator=gen, dtype=dtype) * 0.5 if with_offset else None
    results = []
    for fused in (True, False):
        b = base.clone().requires_grad_(True)
        s = scale.clone().requires_grad_(True) if scale is not None else None
        o = offset.clone().requires_grad_(True) if offset is not None else None
        if fused:
            cells, mean = generate_cells(b * 1.0, x, s, ceiling, o)
        else:
            with torch_only:
                cells, mean = generate_cells(b * 1.0, x, s, ceiling, o)
        loss = 0.0
        if outputs_used in ("both", "cells"):
            loss = loss + (cells * w_cells).sum()
        if outputs_used in ("both", "mean"):
            loss = loss + (mean * w_mean).sum()
        grads = torch.autograd.grad(loss, [t for t in (b, s, o) if t is not None])
        results.append((cells.detach(), mean.detach(), *grads))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, rtol=tol, atol=tol)
    cells = results[0][0]
    assert (cells >= 0).all()
    assert (cells <= ceiling).all()
    # The mask is not trivial: some values were clipped at zero and some at the ceiling.
    raw = base + (x * (scale if scale is not None else 1) if x is not None else 0) + (offset if offset is not None else 0)
    assert (raw < 0).any()
    assert (raw > ceiling).any()
    # The result is what it says: clip(base + x * scale + offset, 0, ceiling).
    torch.testing.assert_close(cells, raw.clamp(min=torch.zeros(()), max=ceiling), rtol=tol, atol=tol)


def test_generate_cells_matches_torch_clamp_on_nan_and_writes_in_place():
    base, x, scale, ceiling = _inputs(torch.float32)
    base[0, 0, 0] = float("nan")
    out = base.clone()
    cells, mean = generate_cells(out, x, scale, ceiling)
    assert cells.data_ptr() == out.data_ptr()
    assert torch.isnan(cells[0, 0, 0])
    assert torch.isnan(mean[0, 0])
    expected = torch.clamp(base + x * scale, min=torch.zeros(()), max=ceiling)
    torch.testing.assert_close(cells, expected, equal_nan=True)


def test_generate_cells_gives_no_gradient_at_the_ceiling_or_zero():
    """Where the clip is active (``y == 0`` or ``y == ceiling``) the gradient is zero."""
    ceiling = torch.tensor([1.0, 2.0, 3.0])
    base = torch.tensor([[[-0.5, 2.0, 3.5], [0.5, 1.0, 3.0]]], requires_grad=True)
    cells, _ = generate_cells(base * 1.0, None, None, ceiling)
    (grad,) = torch.autograd.grad(cells.sum(), base)
    assert grad.tolist() == [[[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]]


def test_kernels_split_over_threads_give_the_same_result():
    base, x, scale, ceiling = _inputs(torch.float32)
    base, x, scale = base.repeat(5, 1, 1), x.repeat(5, 1, 1), scale.repeat(5, 1, 1)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        b = base.clone().requires_grad_(True)
        s = scale.clone().requires_grad_(True)
        o = (scale * 0.3).requires_grad_(True)
        cells, mean = generate_cells(b * 1.0, x, s, ceiling, o)
        grads = torch.autograd.grad(cells.square().sum() + mean.sum(), [b, s, o])
        results.append(
            (cells.detach(), mean.detach(), *grads, *set_mean_max(x), recentre(x, mean.detach()))
        )
    torch.set_num_threads(1)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_set_mean_max_and_recentre_equal_torch(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4, 9, 33, generator=gen, dtype=dtype)
    centre = torch.randn(4, 33, generator=gen, dtype=dtype)
    mean, largest = set_mean_max(x)
    torch.testing.assert_close(mean, x.mean(dim=1, keepdim=True))
    assert torch.equal(largest, x.amax(dim=1, keepdim=True))
    moved = recentre(x, centre)
    torch.testing.assert_close(moved, x + (centre.unsqueeze(1) - x.mean(dim=1, keepdim=True)))
    torch.testing.assert_close(moved.mean(dim=1), centre)
    assert moved.data_ptr() != x.data_ptr()


def test_module_training_step_is_the_same_with_and_without_kernels(torch_only):
    """The default module's loss and every parameter gradient agree between both paths."""
    from ptrag_sc.module import TENSORS as T
    from ptrag_sc.module import PTRAGModule

    gen = np.random.default_rng(0)
    n_sets, n_cells, n_genes, n_dims, n_memory, k = 3, 8, 30, 12, 10, 4
    batch = {
        T.X_CTRL: torch.from_numpy(gen.random((n_sets, n_cells, n_genes)).astype(np.float32)),
        T.X_PERT: torch.from_numpy(gen.random((n_sets, n_cells, n_genes)).astype(np.float32)),
        T.PERT_EMBEDDING: torch.from_numpy(gen.normal(size=(n_sets, n_dims)).astype(np.float32)),
        T.CANDIDATES: torch.from_numpy(gen.integers(0, n_memory, (n_sets, k))),
        T.CANDIDATE_RELATION: torch.zeros(n_sets, k, dtype=torch.long),
        T.CANDIDATE_SAME_CELL_TYPE: torch.ones(n_sets, k, dtype=torch.bool),
        T.CONTEXT_RESPONSE: torch.from_numpy(
            0.1 * gen.normal(size=(n_sets, n_genes)).astype(np.float32)
        ),
        T.CONTEXT_FULL: torch.from_numpy(
            0.1 * gen.normal(size=(n_sets, n_genes)).astype(np.float32)
        ),
        T.STACKED_SHIFT: torch.from_numpy(
            0.1 * gen.normal(size=(n_sets, n_genes)).astype(np.float32)
        ),
        T.CONTROL_MEAN: torch.from_numpy(gen.random((n_sets, n_genes)).astype(np.float32) + 0.2),
        T.TARGET_SHIFT: torch.from_numpy(
            0.1 * gen.normal(size=(n_sets, n_genes)).astype(np.float32)
        ),
    }
    memory = (
        gen.normal(size=(n_memory, n_dims)),
        0.1 * gen.normal(size=(n_memory, n_genes)),
        gen.normal(size=(n_memory, 8)),
    )
    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        module = PTRAGModule(
            n_genes, n_dims, n_hidden=16, n_layers=1, n_heads=2, n_response_components=8
        )
        module.set_memory(*memory)
        module.set_data_constants(np.full(n_genes, 0.9, dtype=np.float32), 0.1)
        module.train()
        torch.manual_seed(1)  # the same Gumbel noise
        if fused:
            loss = module(batch)[2].loss
        else:
            with torch_only:
                loss = module(batch)[2].loss
        loss.backward()
        runs.append(
            (
                loss.detach(),
                {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None},
            )
        )
    (loss_a, grads_a), (loss_b, grads_b) = runs
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    assert len(grads_a) > 20
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


class _KernelKeepLogit(torch.autograd.Function):
    """The scorer kernels as an autograd function, for ``gradcheck``."""

    @staticmethod
    def forward(ctx, *inputs):
        ctx.save_for_backward(*inputs)
        return _fused.keep_logit(*inputs)

    @staticmethod
    def backward(ctx, grad):
        cell_part, cand_part, mean, rstd, w_sum, bias, v, _ = ctx.saved_tensors
        grads = _fused.keep_logit_backward(grad, cell_part, cand_part, mean, rstd, w_sum, bias, v)
        return (*grads[:2], grads[2].view(mean.shape), grads[3].view(rstd.shape), *grads[4:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stage2_scorer_kernels_equal_torch(dtype):
    """The scorer kernels' keep logits and the gradients of all eight inputs agree with the
    PyTorch path (:class:`_KeepLogit`)."""
    from ptrag_sc.module._retriever import _KeepLogit

    gen = torch.Generator().manual_seed(4)
    n_sets, n_cells, k, n_hidden = 3, 5, 4, 6
    inputs = [
        torch.randn(n_sets, n_cells, n_hidden, generator=gen, dtype=dtype),
        torch.randn(n_sets, k, n_hidden, generator=gen, dtype=dtype),
        torch.randn(n_sets, n_cells, k, 1, generator=gen, dtype=dtype),
        torch.rand(n_sets, n_cells, k, 1, generator=gen, dtype=dtype) + 0.5,
        torch.randn(n_hidden, generator=gen, dtype=dtype),
        torch.randn(n_hidden, generator=gen, dtype=dtype),
        torch.randn(n_hidden, generator=gen, dtype=dtype),
        torch.randn((), generator=gen, dtype=dtype),
    ]
    weights = torch.randn(n_sets, n_cells, k, generator=gen, dtype=dtype)
    results = []
    for function in (_KernelKeepLogit, _KeepLogit):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        logit = function.apply(*leaves)
        evaluated = _fused.keep_logit(*inputs) if function is _KernelKeepLogit else _KeepLogit.evaluate(*inputs)
        grads = torch.autograd.grad((logit * weights).sum(), leaves)
        results.append((logit.detach(), evaluated, *grads))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, rtol=tol, atol=tol)
    if dtype == torch.float64:
        for function in (_KernelKeepLogit, _KeepLogit):
            leaves = [t.clone().requires_grad_(True) for t in inputs]
            assert torch.autograd.gradcheck(function.apply, leaves)


def test_float32_scorer_gelu_and_its_slope_are_as_accurate_as_torch():
    """The float32 kernels approximate erf and exp without libm calls; they stay within float32
    rounding of the exact GELU and its derivative, as PyTorch's own float32 GELU does."""
    from ptrag_sc.module._fused import keep_logit, keep_logit_backward

    x = torch.linspace(-12, 12, 24001, dtype=torch.float64)
    n = x.numel()
    # One hidden unit, v = 1, rstd = 1 and nothing else: the logit is gelu(cell_part).
    inputs = [x.view(1, n, 1), torch.zeros(1, 1, 1), torch.zeros(1, n, 1, 1), torch.ones(1, n, 1, 1)]
    inputs += [torch.zeros(1), torch.zeros(1), torch.ones(1), torch.zeros(())]
    single = [t.to(torch.float32) for t in inputs]
    value = keep_logit(*single).view(-1).double()
    slope = keep_logit_backward(torch.ones(1, n, 1), *single[:7])[0].view(-1).double()
    exact = torch.nn.functional.gelu(x)
    exact_slope = torch.ops.aten.gelu_backward(torch.ones_like(x), x)
    torch_value = torch.nn.functional.gelu(x.float()).double()
    torch_slope = torch.ops.aten.gelu_backward(torch.ones(n), x.float()).double()
    for ours, reference, pytorch in ((value, exact, torch_value), (slope, exact_slope, torch_slope)):
        error = (ours - reference).abs() / reference.abs().clamp_min(1.0)
        assert error.max() < 2e-6, error.max()
        assert error.max() < 2 * ((pytorch - reference).abs() / reference.abs().clamp_min(1.0)).max()
    # float64 takes the exact functions.
    value64 = keep_logit(*inputs).view(-1)
    torch.testing.assert_close(value64, exact, rtol=1e-13, atol=1e-13)


def test_generate_cells_on_a_view_gives_the_same_values_and_gradients():
    """A view (what a dispatch mode such as FlopCounterMode can make of the decoder's output) is
    not overwritten, and nothing else changes."""
    base, x, scale, ceiling = _inputs(torch.float32)
    offset = scale * 0.2
    results = []
    for as_view in (False, True):
        b = base.clone().requires_grad_(True)
        s = scale.clone().requires_grad_(True)
        o = offset.clone().requires_grad_(True)
        source = (b * 1.0).view(3, 5, 4, 10).view(3, 5, 40) if as_view else b * 1.0
        assert source._is_view() == as_view
        kept = source.detach().clone()
        cells, mean = generate_cells(source, x, s, ceiling, o)
        assert (cells.data_ptr() == source.data_ptr()) != as_view
        if as_view:
            assert torch.equal(source, kept)
        grads = torch.autograd.grad(cells.square().sum() + mean.sum(), [b, s, o])
        results.append((cells.detach(), mean.detach(), *grads))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_default_module_step_runs_under_a_flop_counter():
    from test_module import _batch
    from torch.utils.flop_counter import FlopCounterMode

    from ptrag_sc.module import PTRAGModule

    torch.manual_seed(0)
    module = PTRAGModule(10, 4, n_hidden=16, n_layers=1, n_heads=2)
    module.set_memory(torch.randn(7, 4), torch.randn(7, 10) * 0.1, torch.randn(7, 5))
    module.train()
    counter = FlopCounterMode(display=False)
    with counter:
        module(_batch())[2].loss.backward()
    assert counter.get_total_flops() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sample", [True, False])
@pytest.mark.parametrize("with_offset", [True, False])
def test_stage2_selection_kernels_equal_torch(dtype, sample, with_offset, torch_only):
    """Stage 2 through its kernels (statistics, scorer, selection and context) gives the same
    context, keep decisions, keep probabilities and gradients as the PyTorch operations, with
    the same random draws; padding candidates stay dropped."""
    from ptrag_sc.module._retriever import TwoStageSelector

    torch.manual_seed(0)
    selector = TwoStageSelector(12, n_scorer_hidden=5).to(dtype)
    with torch.no_grad():
        for parameter in selector.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    gen = torch.Generator().manual_seed(1)
    n_sets, n_cells, k = 3, 6, 5
    inputs = [
        torch.randn(n_sets, n_cells, 12, generator=gen, dtype=dtype),
        torch.randn(n_sets, 12, generator=gen, dtype=dtype),
        torch.randn(n_sets, k, 12, generator=gen, dtype=dtype),
        torch.randn(n_sets, k, generator=gen, dtype=dtype) if with_offset else None,
    ]
    valid = torch.ones(n_sets, k, dtype=torch.bool)
    valid[0, -2:] = False
    weights = [torch.randn(n_sets, n_cells, 12, generator=gen, dtype=dtype)] + [
        torch.randn(n_sets, n_cells, k, generator=gen, dtype=dtype) for _ in range(2)
    ]
    results = []
    for fused in (True, False):
        leaves = [None if t is None else t.clone().requires_grad_(True) for t in inputs]
        torch.manual_seed(7)
        if fused:
            out = selector(*leaves[:3], valid, sample=sample, logit_offset=leaves[3])
        else:
            with torch_only:
                out = selector(*leaves[:3], valid, sample=sample, logit_offset=leaves[3])
        outputs = [out["context"], out["keep"], out["keep_probability"]]
        loss = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
        wrt = [t for t in leaves if t is not None] + list(selector.parameters())
        grads = torch.autograd.grad(loss, wrt)
        results.append([o.detach() for o in outputs] + list(grads))
    assert torch.equal(results[0][1], results[1][1])  # the same keep decisions
    assert not results[0][1][0, :, -2:].any()
    assert 0 < results[0][1].mean() < 1
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, rtol=tol, atol=tol)
    if dtype == torch.float64 and not sample:
        from ptrag_sc.module._retriever import _StageTwo  # noqa: F401 - the path under test

        def context_and_probability(*tensors):
            out = selector(*tensors[:3], valid, sample=False, logit_offset=tensors[3] if with_offset else None)
            return out["context"], out["keep_probability"]

        leaves = [t.clone().requires_grad_(True) for t in inputs if t is not None]
        if not with_offset:
            leaves.append(torch.zeros(n_sets, k, dtype=dtype))
        assert torch.autograd.gradcheck(context_and_probability, leaves)
