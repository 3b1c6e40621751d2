"""Unit tests of the torch module: losses, the folded stage-2 algebra, set equivariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ptrag_sc.module import TENSORS, PTRAGModule, energy_distance
from ptrag_sc.module._retriever import ConcatLayerNorm, TwoStageSelector


def test_energy_distance_matches_geomloss():
    geomloss = pytest.importorskip("geomloss")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 20, 7, generator=gen, dtype=torch.float64)
    y = torch.rand(3, 15, 7, generator=gen, dtype=torch.float64) + 0.3
    ours = energy_distance(x, y)
    ref = geomloss.SamplesLoss("energy")(x, y)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6, atol=1e-8)


def test_energy_distance_by_hand():
    # One point at 0 vs one point at 3 in 1-D: E|X-Y| = 3, no within-set spread -> 3.
    x = torch.zeros(1, 1, 1, dtype=torch.float64)
    y = torch.full((1, 1, 1), 3.0, dtype=torch.float64)
    assert energy_distance(x, y).item() == pytest.approx(3.0, abs=1e-3)
    # {0, 2} vs {0, 2}: identical sets -> 0.
    z = torch.tensor([[[0.0], [2.0]]], dtype=torch.float64)
    assert energy_distance(z, z).item() == pytest.approx(0.0, abs=1e-3)


def test_energy_gradient_is_finite_with_duplicate_cells():
    x = torch.ones(1, 4, 5, requires_grad=True)
    y = torch.rand(1, 4, 5)
    energy_distance(x, y).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_concat_layer_norm_equals_explicit_concatenation():
    torch.manual_seed(0)
    h = 6
    norm = ConcatLayerNorm(h, 3)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    linear = nn.Linear(3 * h, 5)
    a, b, c = torch.randn(2, 4, 1, h), torch.randn(2, 1, 1, h), torch.randn(2, 1, 3, h)
    mean, rstd = norm.statistics([a, b, c])
    (wa, wb, wc), w_sum, bias = norm.folded(linear)
    fused = rstd * (a @ wa.T + b @ wb.T + c @ wc.T - mean * w_sum) + bias
    full = torch.cat(torch.broadcast_tensors(a, b, c), dim=-1)
    explicit = linear(nn.functional.layer_norm(full, (3 * h,), norm.weight, norm.bias, norm.eps))
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)


def test_selector_context_equals_explicit_sum():
    torch.manual_seed(1)
    h, k = 8, 5
    selector = TwoStageSelector(h, n_scorer_hidden=4)
    h_ctrl, h_pert, h_cand = torch.randn(2, 3, h), torch.randn(2, h), torch.randn(2, k, h)
    valid = torch.tensor([[True] * k, [True, True, False, True, False]])
    out = selector(h_ctrl, h_pert, h_cand, valid, sample=False)
    full = torch.cat(torch.broadcast_tensors(h_ctrl[:, :, None], h_pert[:, None, None], h_cand[:, None]), dim=-1)
    normed = nn.functional.layer_norm(full, (3 * h,), selector.norm.weight, selector.norm.bias, selector.norm.eps)
    logit = selector.scorer_out(nn.functional.gelu(selector.scorer_hidden(normed))).squeeze(-1)
    p_keep = torch.sigmoid(logit) * valid[:, None]
    torch.testing.assert_close(out["keep_probability"], p_keep, rtol=1e-4, atol=1e-5)
    keep = (p_keep > 0.5).float() * valid[:, None]
    expected = (keep[..., None] * selector.projection(normed)).sum(2)
    torch.testing.assert_close(out["context"], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(out["keep"], keep)
    assert not out["keep"][1, :, 2].any()
    assert not out["keep"][1, :, 4].any()


def test_binary_concrete_matches_two_class_gumbel_softmax():
    from ptrag_sc.module._retriever import hard_binary_concrete

    torch.manual_seed(0)
    logit = torch.tensor([-1.5, 0.0, 0.8]).repeat(40000, 1)
    ours = hard_binary_concrete(logit, 0.5).mean(0)
    reference = torch.nn.functional.gumbel_softmax(torch.stack([torch.zeros_like(logit), logit], -1), tau=0.5, hard=True)[..., 1].mean(0)
    # Both keep with probability sigmoid(logit).
    torch.testing.assert_close(ours, torch.sigmoid(logit[0]), atol=0.01, rtol=0)
    torch.testing.assert_close(reference, torch.sigmoid(logit[0]), atol=0.01, rtol=0)


def test_selector_sampling_is_hard_and_differentiable_and_drops_padding():
    torch.manual_seed(0)
    selector = TwoStageSelector(8)
    h_cand = torch.randn(2, 4, 8, requires_grad=True)
    valid = torch.ones(2, 4, dtype=torch.bool)
    valid[0, -1] = False
    out = selector(torch.randn(2, 30, 8), torch.randn(2, 8), h_cand, valid, sample=True)
    assert set(out["keep"].detach().unique().tolist()) == {0.0, 1.0}
    assert not out["keep"][0, :, -1].any()
    assert not out["keep_probability"][0, :, -1].any()
    (out["keep"].sum() + out["context"].sum()).backward()
    assert h_cand.grad.abs().sum() > 0
    assert h_cand.grad[0, -1].abs().sum() == 0  # a padding slot takes no part in the selection


def _batch(n_sets=2, s=6, g=10, d=4, k=3, m=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        TENSORS.X_CTRL: torch.rand(n_sets, s, g, generator=gen),
        TENSORS.X_PERT: torch.rand(n_sets, s, g, generator=gen),
        TENSORS.PERT_EMBEDDING: torch.randn(n_sets, d, generator=gen),
        TENSORS.CANDIDATES: torch.randint(0, m, (n_sets, k), generator=gen),
        TENSORS.CANDIDATE_SAME_CELL_TYPE: torch.rand(n_sets, k, generator=gen) > 0.5,
        TENSORS.CANDIDATE_RELATION: torch.randint(0, 2, (n_sets, k), generator=gen),
        TENSORS.CANDIDATE_SIMILARITY: torch.rand(n_sets, k, generator=gen),
        TENSORS.CANDIDATE_ANNOTATION_SIMILARITY: torch.rand(n_sets, k, generator=gen),
        TENSORS.CONTEXT_RESPONSE: torch.randn(n_sets, g, generator=gen) * 0.1,
        TENSORS.STACKED_SHIFT: torch.randn(n_sets, g, generator=gen) * 0.1,
        TENSORS.CONTROL_MEAN: torch.rand(n_sets, g, generator=gen) + 0.5,
        TENSORS.TARGET_SHIFT: torch.randn(n_sets, g, generator=gen) * 0.1,
        TENSORS.BATCH: torch.full((n_sets,), -1),
    }


@pytest.mark.parametrize("backbone", ["pooled", "full"])
@pytest.mark.parametrize("retrieval", ["none", "vanilla", "ptrag"])
@pytest.mark.parametrize("decoder_rank", [None, 3])
def test_prediction_is_equivariant_to_cell_order(backbone, retrieval, decoder_rank):
    torch.manual_seed(0)
    module = PTRAGModule(10, 4, n_hidden=16, n_layers=2, n_heads=2, backbone=backbone, retrieval=retrieval, decoder_rank=decoder_rank)
    module.set_memory(torch.randn(7, 4), torch.randn(7, 5))
    # Non-zero decoder weights, so the transformer's output matters.
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else None
    module.eval()
    batch = _batch()
    perm = torch.randperm(batch[TENSORS.X_CTRL].shape[1])
    permuted = dict(batch, **{TENSORS.X_CTRL: batch[TENSORS.X_CTRL][:, perm]})
    with torch.no_grad():
        _, gen_a = module(batch, compute_loss=False)
        _, gen_b = module(permuted, compute_loss=False)
    torch.testing.assert_close(gen_a["prediction"][:, perm], gen_b["prediction"], rtol=1e-4, atol=1e-5)


def test_loss_is_energy_to_the_pseudobulk_teacher_plus_mean_error_and_sparsity():
    torch.manual_seed(0)
    module = PTRAGModule(10, 4, n_hidden=16, n_layers=1, n_heads=2, retrieval="ptrag", sparsity_weight=0.5, pseudobulk_weight=2.0)
    module.set_memory(torch.randn(7, 4), torch.randn(7, 5))
    module.set_data_constants(torch.full((10,), 50.0), shift_scale=0.3)
    module.train()
    batch = _batch()
    inference, gen, loss = module(batch)
    target = batch[TENSORS.X_PERT]
    teacher = target - target.mean(1, keepdim=True) + (batch[TENSORS.CONTROL_MEAN] + batch[TENSORS.TARGET_SHIFT])[:, None]
    energy = energy_distance(gen["prediction"], teacher).mean()
    assert loss.extra_metrics["energy"].item() == pytest.approx(energy.item(), rel=1e-5)
    mean_shift = gen["prediction"].mean(1) - batch[TENSORS.CONTROL_MEAN]
    error = ((mean_shift - batch[TENSORS.TARGET_SHIFT]) ** 2).sum(-1).mean() / 0.3
    assert loss.extra_metrics["mean_error"].item() == pytest.approx(error.item(), rel=1e-5)
    expected_rate = inference["keep_probability"][inference["valid"][:, None].expand_as(inference["keep"])].mean()
    assert loss.loss.item() == pytest.approx((energy + 2.0 * error + 0.5 * expected_rate).item(), rel=1e-5)
    # Without the pseudobulk term the energy is to the observed cells as they are.
    plain = PTRAGModule(10, 4, n_hidden=16, n_layers=1, n_heads=2, retrieval="none", pseudobulk_weight=0.0)
    plain.train()
    _, gen, loss = plain(batch)
    assert "mean_error" not in loss.extra_metrics
    assert loss.loss.item() == pytest.approx(energy_distance(gen["prediction"], target).mean().item(), rel=1e-5)


def test_mean_shift_is_the_context_plus_the_evidence_whatever_stage_2_keeps():
    """The data layer's evidence decides a set's mean shift; stage 2 changes the cells' encodings."""
    from ptrag_sc.module import PTRAGModule

    torch.manual_seed(0)
    module = PTRAGModule(6, 4, n_hidden=16, n_layers=1, n_heads=2)
    module.set_memory(torch.randn(5, 4), torch.randn(5, 3))
    batch = {
        TENSORS.X_CTRL: torch.rand(2, 4, 6),
        TENSORS.PERT_EMBEDDING: torch.randn(2, 4),
        TENSORS.CANDIDATES: torch.tensor([[0, 1, 2], [3, 4, -1]]),
        TENSORS.CANDIDATE_SAME_CELL_TYPE: torch.ones(2, 3, dtype=torch.bool),
        TENSORS.CANDIDATE_RELATION: torch.zeros(2, 3, dtype=torch.long),
        TENSORS.CONTEXT_RESPONSE: torch.randn(2, 6),
        TENSORS.STACKED_SHIFT: torch.randn(2, 6),
    }
    module.eval()
    outputs = []
    for offset in (-30.0, 30.0):  # stage 2 keeps nothing, then everything
        with torch.no_grad():
            module.selection_offsets.relation_bias.fill_(offset)
        inference = module.inference(**module._get_inference_input(batch))
        outputs.append(inference)
        torch.testing.assert_close(inference["delta"], batch[TENSORS.CONTEXT_RESPONSE] + batch[TENSORS.STACKED_SHIFT])
    assert outputs[0]["keep"].sum() == 0
    assert outputs[1]["keep"].sum() == 2 * 4 * 3 - 4  # every valid (cell, candidate)
    assert not torch.allclose(outputs[0]["x0"], outputs[1]["x0"])


def test_generated_set_mean_is_the_evidence_after_the_clip():
    """The decoder's per-cell part has zero set mean, but keeping cells in [0, ceiling] moves the
    mean (upwards on sparse genes); the generated set's mean is put back on the evidence."""
    from ptrag_sc.module import PTRAGModule

    torch.manual_seed(0)
    module = PTRAGModule(8, 4, n_hidden=16, n_layers=1, n_heads=2, retrieval="none")
    for p in module.decoder.parameters():
        torch.nn.init.normal_(p, std=0.5)  # large per-cell deviations: many clip at 0
    x_ctrl = torch.rand(3, 32, 8) * (torch.rand(3, 32, 8) > 0.6)  # sparse, like log1p counts
    control_mean = x_ctrl.mean(1) + 0.05
    delta = 0.2 * torch.randn(3, 8)
    module.set_data_constants(torch.full((8,), 10.0), 1.0)
    inference = module.inference(x_ctrl, torch.randn(3, 4))
    out = module.generative(x_ctrl, inference["x0"], inference["h_ctrl"], inference["h_pert"], delta=delta, control_mean=control_mean)
    target = (control_mean + delta).clamp_min(0)
    reachable = (x_ctrl > 0).sum(1) >= 4  # genes expressed in enough cells to be scaled exactly
    torch.testing.assert_close(out["mean_shift"][reachable], (target - control_mean)[reachable], rtol=0, atol=1e-4)
    assert (out["prediction"] >= 0).all()


def test_binary_concrete_sample_and_gradient_are_the_straight_through_soft_sample():
    from ptrag_sc.module._retriever import hard_binary_concrete

    logit = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    mask = (torch.arange(5) < 4).to(torch.float64)[None, None, :]
    torch.manual_seed(3)
    keep = hard_binary_concrete(logit, 0.5, mask)
    weight = torch.randn_like(keep)
    (keep * weight).sum().backward()
    torch.manual_seed(3)
    u = torch.rand_like(logit).clamp_(1e-6, 1 - 1e-6)
    reference_logit = logit.detach().clone().requires_grad_(True)
    soft = torch.sigmoid((reference_logit + torch.log(u) - torch.log1p(-u)) / 0.5)
    hard = (soft > 0.5).to(soft.dtype)
    reference = (hard + soft - soft.detach()) * mask  # 0/1 up to one rounding of `hard + soft`
    (reference * weight).sum().backward()
    assert torch.equal(keep.detach(), hard * mask)
    assert set(keep.detach().unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(logit.grad, reference_logit.grad, rtol=1e-10, atol=1e-12)
    assert (logit.grad[..., 4] == 0).all()
    assert logit.grad[..., :4].abs().sum() > 0
    with torch.no_grad():
        torch.manual_seed(3)
        assert torch.equal(hard_binary_concrete(logit, 0.5, mask), keep.detach())


def test_response_memory_mean_moves_only_by_the_evidence():
    torch.manual_seed(0)
    module = PTRAGModule(10, 4, n_hidden=16, n_layers=1, n_heads=2, retrieval="ptrag", decoder_rank=3)
    module.set_memory(torch.randn(7, 4), torch.randn(7, 5))
    assert module.set_decoder is None
    assert not module.decoder[-1].bias.requires_grad
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else None
    with torch.no_grad():
        module.decoder[-1].weight.mul_(0.05)  # per-cell deviations small enough not to be clipped
    module.eval()
    batch = _batch()
    with torch.no_grad():
        inference, gen = module(batch, compute_loss=False)
    # Before clipping at 0 the set's mean is exactly control mean + delta; the genes here stay positive.
    assert (gen["prediction"] > 0).all()
    torch.testing.assert_close(gen["prediction"].mean(1), batch[TENSORS.CONTROL_MEAN] + inference["delta"], rtol=1e-4, atol=1e-4)


def test_predictions_never_exceed_the_gene_ceiling():
    torch.manual_seed(0)
    module = PTRAGModule(10, 4, n_hidden=16, n_layers=1, n_heads=2, retrieval="ptrag")
    module.set_memory(torch.randn(7, 4), torch.randn(7, 5))
    module.set_data_constants(torch.full((10,), 1.2), shift_scale=1.0)
    module.eval()
    batch = _batch()
    batch[TENSORS.STACKED_SHIFT] = torch.full((2, 10), 4.0)
    with torch.no_grad():
        _, gen = module(batch, compute_loss=False)
    assert gen["prediction"].max() <= 1.2


def test_paper_context_mode_replaces_encodings():
    torch.manual_seed(0)
    module = PTRAGModule(10, 4, n_hidden=16, n_layers=1, n_heads=2, retrieval="vanilla", context_mode="replace", memory="embedding")
    module.set_memory(torch.randn(7, 4))
    module.eval()
    batch = _batch()
    with torch.no_grad():
        inference = module.inference(**module._get_inference_input(batch))
        h_cand = module._encode_candidates(batch[TENSORS.CANDIDATES].clamp_min(0), None, batch[TENSORS.CANDIDATE_RELATION])
        attended = module.cross_attention(inference["h_ctrl"] + inference["h_pert"][:, None], h_cand, batch[TENSORS.CANDIDATES] >= 0)
    torch.testing.assert_close(inference["x0"], attended["context"])
    assert "delta" not in inference  # embedding memories carry no measured responses


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="retrieval"):
        PTRAGModule(10, 4, retrieval="rag")
    with pytest.raises(ValueError, match="backbone"):
        PTRAGModule(10, 4, backbone="lstm")
    with pytest.raises(ValueError, match="context_mode"):
        PTRAGModule(10, 4, context_mode="concat")


def test_apply_shift_moves_the_set_mean_exactly():
    from ptrag_sc.module import apply_shift

    gen = torch.Generator().manual_seed(0)
    # 3 genes: expressed in half the cells, expressed everywhere, almost never expressed.
    x = torch.zeros(1, 200, 3)
    x[0, :100, 0] = torch.rand(100, generator=gen) + 0.5
    x[0, :, 1] = torch.rand(200, generator=gen) + 1.0
    x[0, :2, 2] = 0.5
    control_mean = torch.tensor([[0.4, 1.4, 0.01]])
    delta = torch.tensor([[[-0.2, 0.3, 0.2]]])
    scaled, offset = apply_shift(x, delta, control_mean)
    y = torch.relu(scaled + offset)
    torch.testing.assert_close(y.mean(1), (control_mean + delta[:, 0]), rtol=1e-5, atol=1e-6)
    # Expressed genes are scaled: zeros stay zeros and values stay non-negative.
    assert (y[0, 100:, 0] == 0).all()
    assert (y >= 0).all()
    assert torch.allclose(offset[0, 0, :2], torch.zeros(2), atol=1e-6)
    # The rarely expressed gene is shifted additively.
    assert offset[0, 0, 2] > 0
    # Clipping at zero after an additive shift would have lost most of the negative shift.
    clipped = torch.relu(x + delta).mean(1) - x.mean(1)
    assert clipped[0, 0] > -0.12


def test_apply_shift_clamps_the_scale_and_keeps_the_mean():
    from ptrag_sc._shift import MAX_SCALE
    from ptrag_sc.module import apply_shift

    x = torch.full((1, 10, 1), 0.1)
    scaled, offset = apply_shift(x, torch.tensor([[[5.0]]]), torch.tensor([[0.1]]))
    assert torch.allclose(scaled, x * MAX_SCALE)
    torch.testing.assert_close((scaled + offset).mean(1), torch.tensor([[5.1]]))


def test_apply_shift_respects_the_ceiling_and_keeps_the_mean():
    from ptrag_sc.module import apply_shift

    x = torch.zeros(1, 10, 1)
    x[0, :2, 0] = 1.0  # a sparse gene: two cells at 1.0, set mean 0.2
    ceiling = torch.tensor([3.0])
    scaled, offset = apply_shift(x, torch.tensor([[[1.8]]]), torch.tensor([[0.2]]), ceiling)
    # Scaling to the target mean (2.0) would need a factor of 10; the ceiling allows 3.
    assert scaled.max() <= 3.0 + 1e-6
    torch.testing.assert_close((scaled + offset).mean(1), torch.tensor([[2.0]]))


# ------------------------------------------------------------------ energy distance
def _reference_energy(x, y, include_target_term):
    """The energy distance through plain autograd (the formula, as geomloss' convention)."""

    def dist(a, b):
        return (a.pow(2).sum(-1)[:, :, None] + b.pow(2).sum(-1)[:, None, :] - 2 * a @ b.transpose(1, 2)).clamp_min(1e-8).sqrt().mean((1, 2))

    value = dist(x, y) - 0.5 * dist(x, x)
    if include_target_term:
        value = value - 0.5 * dist(y, y).detach()
    return value


@pytest.mark.parametrize("include_target_term", [True, False])
def test_energy_distance_and_its_gradient_equal_the_formula(include_target_term):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 9, 11, generator=gen, dtype=torch.float64)
    x[0, 1] = x[0, 0]  # identical cells: clamped distances, zero gradient there
    y = torch.rand(3, 7, 11, generator=gen, dtype=torch.float64)
    weights = torch.rand(3, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (energy_distance, _reference_energy):
        xx = x.clone().requires_grad_()
        value = fn(xx, y, include_target_term=include_target_term) if fn is energy_distance else fn(xx, y, include_target_term)
        (value * weights).sum().backward()
        grads.append((value.detach(), xx.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ training step
def test_training_step_is_reproducible_from_a_seed():
    """Two modules built and stepped from the same seeds give the same loss and the same
    gradient for every trainable parameter (the Gumbel draws included)."""
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        module = PTRAGModule(10, 4, n_hidden=16, n_layers=1, n_heads=2)
        module.set_memory(torch.randn(7, 4), torch.randn(7, 5))
        module.set_data_constants(torch.full((10,), 0.9), 0.1)
        module.train()
        torch.manual_seed(1)
        inference, _, loss = module(_batch())
        loss.loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        runs.append((loss.loss.detach(), inference["keep"].detach(), grads))
    (loss_a, keep_a, grads_a), (loss_b, keep_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(keep_a, keep_b)
    assert 0 < keep_a.mean() < 1
    assert grads_a.keys() == grads_b.keys()
    assert len(grads_a) > 20
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name


def test_default_module_step_runs_under_a_flop_counter():
    """`benchmarks/speed.py` counts the training step's operations this way."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    module = PTRAGModule(10, 4, n_hidden=16, n_layers=1, n_heads=2)
    module.set_memory(torch.randn(7, 4), torch.randn(7, 5))
    module.train()
    counter = FlopCounterMode(display=False)
    with counter:
        module(_batch())[2].loss.backward()
    assert counter.get_total_flops() > 0
