"""Effective-bit budgets: planned storage equals built storage, budgets are met within 0.01 bit, impossible ones refused."""
from __future__ import annotations

import pytest
import torch

from cmpq_kernels.format import layout_effective_bits, tensor_bits
from cmpq_kernels.quantize import QuantOptions, allocate, quantize_weight
from cmpq_kernels.quantize.auto import choose
from cmpq_kernels.quantize.budget import UpgradeLadder, budget_range, plan_widths, segments_of, stored_bits


def _layer_data(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (1 + 3 * torch.rand(k, generator=g))  # uneven columns: allocators differ
    return w, torch.rand(k, generator=g) * 2 + 0.05


@pytest.mark.parametrize("allocator", ["greedy", "cmpq"])
def test_ladder_steps_are_the_allocators_widths(allocator):
    w, s2 = _layer_data(96, 320)
    ladder = UpgradeLadder(s2, w, allocator)
    assert ladder.steps == 20
    for u in (0, 3, 10, 11, 17, 20):
        expected = allocate(s2, w, 2 + 32 * u / 320, allocator)
        assert torch.equal(ladder.widths(u), expected)
        assert ladder.segments(u) == segments_of(expected)


@pytest.mark.parametrize("allocator,rows,target", [("greedy", 4, 3.0), ("cmpq", 1, 3.0), ("greedy", 1, 2.6),
                                                   ("cmpq", 8, 3.9), ("greedy", 2, 4.15)])
def test_layer_budget_is_met_and_planned_storage_is_built_storage(allocator, rows, target):
    w, s2 = _layer_data(160, 384, seed=1)
    opts = QuantOptions(allocator=allocator, codebook_rows=rows, kmeans_iters=4, effective_bits=target)
    layer = quantize_weight(w, s2, options=opts)
    built = sum(tensor_bits(t) for t in layer.fields().values())
    assert built == sum(layer.storage_bits().values())  # the formula counts exactly the stored tensors
    assert layout_effective_bits(layer.n, layer.k, layer.seg_k, rows, layer.nnz) == layer.effective_bits
    assert target - 0.01 <= layer.effective_bits <= target
    # The most code bits that fit: no allocation with more upgrades fits with the options' outliers.
    ladder = UpgradeLadder(s2, w, allocator)
    chosen = round((layer.code_bits - 2) * 384 / 32)
    assert all(stored_bits(160, 384, ladder.segments(u), opts) > target * 160 * 384
               for u in range(chosen + 1, ladder.steps + 1))
    assert layer.nnz >= round((opts.p_act + opts.p_err) * w.numel())


def test_shared_plan_fits_every_member():
    (wq, s2), (wk, _) = _layer_data(256, 512), _layer_data(64, 512, seed=3)
    opts = QuantOptions(effective_bits=3.3)
    seg = segments_of(plan_widths(s2, [wq, wk], 3.3, opts))
    spare = {n: 3.3 - stored_bits(n, 512, seg, opts) / (n * 512) for n in (256, 64)}
    # Both fit; the small member has the larger per-weight overhead (perm, row pointers) and so binds.
    assert 0 <= spare[64] < spare[256]
    assert spare[64] < 32 * 64 / (64 * 512) + 64 * 16 * 4 / (64 * 512)  # within one upgrade + a new codebook


def test_impossible_layer_budgets_name_the_problem():
    w, s2 = _layer_data(64, 128)
    low, high = budget_range(64, 128, QuantOptions())
    with pytest.raises(ValueError, match="below the minimum"):
        quantize_weight(w, s2, effective_bits=low - 0.05)
    with pytest.raises(ValueError, match="above the maximum"):
        quantize_weight(w, s2, effective_bits=high + 0.05)
    with pytest.raises(ValueError, match="exactly one of bits"):
        quantize_weight(w, s2, 3.0, effective_bits=3.5)
    with pytest.raises(ValueError, match="exactly one of bits"):
        quantize_weight(w, s2)
    for bad in (1.5, float("nan"), "3", True):
        with pytest.raises(ValueError, match="effective_bits"):
            QuantOptions(effective_bits=bad)


def test_budget_range_widens_with_the_options():
    # More rows per codebook and fewer outliers store less per weight, so the minimum drops.
    assert budget_range(64, 128, QuantOptions(codebook_rows=8, p_act=0, p_err=0))[0] < \
        budget_range(64, 128, QuantOptions())[0]


def test_auto_keeps_the_least_error_candidate_and_follows_the_data():
    g = torch.Generator().manual_seed(5)
    k = 256
    x = torch.randn(2048, k, generator=g) * (0.3 + torch.rand(k, generator=g))
    hessian = x.T @ x / x.shape[0]
    s2 = torch.diagonal(hessian).clone()
    opts = QuantOptions(effective_bits=3.0, allocator="auto", codebook_rows="auto")
    iid = torch.randn(256, k, generator=g)
    # Rows centred far apart: one codebook shared by several rows spreads its entries over all their ranges.
    shifted = iid + 8 * torch.randn(256, 1, generator=g)
    picks = {}
    for name, w in (("iid", iid), ("shifted", shifted)):
        best, widths, scores = choose([w], s2, hessian, opts)
        assert len(scores) == 8 and scores[f"{best.allocator}/r{best.codebook_rows}"] == min(scores.values())
        assert torch.equal(widths, plan_widths(s2, [w], 3.0, best))
        picks[name] = best.codebook_rows
    assert picks == {"iid": 8, "shifted": 1}  # sharing is free for alike rows and costly for unlike ones


def test_auto_settings_need_a_budget_and_a_hessian():
    with pytest.raises(ValueError, match="need effective_bits"):
        QuantOptions(codebook_rows="auto")
    with pytest.raises(ValueError, match="needs allocator='greedy'"):
        QuantOptions(allocator="auto", effective_bits=3.0, budget="global")
    with pytest.raises(ValueError, match="need effective_bits and budget='layer'"):
        QuantOptions(codebook_rows="auto", effective_bits=3.0, budget="global", allocator="greedy")
    w, s2 = _layer_data(64, 128)
    with pytest.raises(ValueError, match="chosen by quantize_model"):
        quantize_weight(w, s2, effective_bits=4.0, codebook_rows="auto")
    with pytest.raises(ValueError, match="Hessian"):
        choose([w], s2, None, QuantOptions(effective_bits=4.0, codebook_rows="auto"))
