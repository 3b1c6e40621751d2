"""Unit tests of the torch module: losses, the fused stage-2 algebra, set equivariance."""

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


def test_selector_sampling_is_hard_and_differentiable():
    torch.manual_seed(0)
    selector = TwoStageSelector(8)
    h_cand = torch.randn(2, 4, 8, requires_grad=True)
    out = selector(torch.randn(2, 3, 8), torch.randn(2, 8), h_cand, torch.ones(2, 4, dtype=torch.bool), sample=True)
    assert set(out["keep"].detach().unique().tolist()) <= {0.0, 1.0}
    (out["keep"].sum() + out["context"].sum()).backward()
    assert h_cand.grad is not None
    assert h_cand.grad.abs().sum() > 0


def _batch(n_sets=2, s=6, g=10, d=4, k=3, m=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        TENSORS.X_CTRL: torch.rand(n_sets, s, g, generator=gen),
        TENSORS.X_PERT: torch.rand(n_sets, s, g, generator=gen),
        TENSORS.PERT_EMBEDDING: torch.randn(n_sets, d, generator=gen),
        TENSORS.CANDIDATES: torch.randint(0, m, (n_sets, k), generator=gen),
        TENSORS.CANDIDATE_SAME_CELL_TYPE: torch.rand(n_sets, k, generator=gen) > 0.5,
        TENSORS.CANDIDATE_RELATION: torch.randint(0, 3, (n_sets, k), generator=gen),
        TENSORS.CONTEXT_RESPONSE: torch.randn(n_sets, g, generator=gen) * 0.1,
        TENSORS.CONTEXT_VALID: torch.tensor([True] + [False] * (n_sets - 1)),
        TENSORS.BATCH: torch.full((n_sets,), -1),
    }


@pytest.mark.parametrize("backbone", ["pooled", "full"])
@pytest.mark.parametrize("retrieval", ["none", "vanilla", "ptrag"])
@pytest.mark.parametrize("decoder_rank", [None, 3])
def test_prediction_is_equivariant_to_cell_order(backbone, retrieval, decoder_rank):
    torch.manual_seed(0)
    module = PTRAGModule(10, 4, n_hidden=16, n_layers=2, n_heads=2, backbone=backbone, retrieval=retrieval, decoder_rank=decoder_rank)
    module.set_memory(torch.randn(7, 4), torch.randn(7, 10) * 0.1, torch.randn(7, 5), torch.randn(10, 5))
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


def test_loss_reports_energy_and_sparsity():
    torch.manual_seed(0)
    module = PTRAGModule(10, 4, n_hidden=16, n_layers=1, n_heads=2, retrieval="ptrag", sparsity_weight=0.5)
    module.set_memory(torch.randn(7, 4), torch.randn(7, 10), torch.randn(7, 5))
    module.train()
    batch = _batch()
    _, gen, loss = module(batch)
    energy = energy_distance(gen["prediction"], batch[TENSORS.X_PERT]).mean()
    assert loss.extra_metrics["energy"].item() == pytest.approx(energy.item(), rel=1e-5)
    expected = energy + 0.5 * loss.extra_metrics["active_ratio"]
    assert loss.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_paper_context_mode_replaces_encodings():
    torch.manual_seed(0)
    module = PTRAGModule(10, 4, n_hidden=16, n_layers=1, n_heads=2, retrieval="vanilla", context_mode="replace", memory="embedding")
    module.set_memory(torch.randn(7, 4))
    module.eval()
    batch = _batch()
    with torch.no_grad():
        inference = module.inference(**module._get_inference_input(batch))
        h_cand = module._encode_candidates(batch[TENSORS.CANDIDATES], relation=batch[TENSORS.CANDIDATE_RELATION])[0]
        attended = module.cross_attention(inference["h_ctrl"] + inference["h_pert"][:, None], h_cand, batch[TENSORS.CANDIDATES] >= 0)
    torch.testing.assert_close(inference["x0"], attended["context"])
    assert inference["delta"] is None  # embedding memories carry no measured responses


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="retrieval"):
        PTRAGModule(10, 4, retrieval="rag")
    with pytest.raises(ValueError, match="backbone"):
        PTRAGModule(10, 4, backbone="lstm")
    with pytest.raises(ValueError, match="context_mode"):
        PTRAGModule(10, 4, context_mode="concat")


def test_apply_shift_moves_the_set_mean_exactly():
    from ptrag_sc.module._module import apply_shift

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
    from ptrag_sc.module._module import MAX_SCALE, apply_shift

    x = torch.full((1, 10, 1), 0.1)
    scaled, offset = apply_shift(x, torch.tensor([[[5.0]]]), torch.tensor([[0.1]]))
    assert torch.allclose(scaled, x * MAX_SCALE)
    torch.testing.assert_close((scaled + offset).mean(1), torch.tensor([[5.1]]))


def test_combination_members_add_up_in_the_retrieved_shift():
    torch.manual_seed(0)
    module = PTRAGModule(10, 4, n_hidden=16, n_layers=1, n_heads=2, retrieval="ptrag")
    responses = torch.randn(7, 10)
    module.set_memory(torch.randn(7, 4), responses, torch.randn(7, 5), torch.randn(10, 5))
    module.eval()
    batch = _batch(n_sets=2, k=3)
    batch[TENSORS.CANDIDATES] = torch.tensor([[2, 5, 6], [2, 5, 6]])
    # Set 0 is a combination whose single genes (entries 2 and 5) were measured in its cell type.
    batch[TENSORS.CANDIDATE_RELATION] = torch.tensor([[2, 2, 0], [0, 0, 0]])
    batch[TENSORS.CANDIDATE_SAME_CELL_TYPE] = torch.tensor([[True, True, True], [True, True, True]])
    with torch.no_grad():
        inference = module.inference(**module._get_inference_input(batch))
    torch.testing.assert_close(inference["delta"][0, 0], responses[2] + responses[5])
    assert not torch.allclose(inference["delta"][1, 0], responses[2] + responses[5])
