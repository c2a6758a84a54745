"""The single-layer CMPQ quantizer: allocation, permutation, weighted k-means, outliers, error feedback."""
from __future__ import annotations

import math

import pytest
import torch

from cmpq_kernels import ops, reference
from cmpq_kernels.quantize import allocate, quantize_weight
from cmpq_kernels.quantize.allocate import permutation
from cmpq_kernels.quantize import codebook
from cmpq_kernels.quantize.codebook import assign, weighted_error, weighted_kmeans, weighted_quantile_init
from conftest import assert_matches_reference


def synthetic(n: int, k: int, m: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [n, k], activations [m, k]): correlated channels with log-normal scales, like LLM inputs."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / math.sqrt(k) * 2 + torch.eye(k)
    x = (torch.randn(m, k, generator=gen) @ mix) * torch.exp(torch.randn(k, generator=gen))
    return torch.randn(n, k, generator=gen) * 0.02, x


def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.pow(2).mean(0), x.T @ x / x.shape[0]


def output_error(x: torch.Tensor, w: torch.Tensor, layer) -> float:
    ref = x @ w.T
    return float((ref - x @ reference.dequantize(layer).T).norm() / ref.norm())


def weighted_weight_error(w: torch.Tensor, s2: torch.Tensor, layer) -> float:
    return float((s2 * (w - reference.dequantize(layer)).pow(2)).sum())


@pytest.mark.parametrize("allocator", ["cmpq", "greedy"])
@pytest.mark.parametrize("k", [32, 96, 576, 1536])
@pytest.mark.parametrize("bits", [2.0, 2.1, 2.5, 2.99, 3.0, 3.3, 3.5, 3.97, 4.0])
def test_allocation_meets_the_budget_in_whole_groups(allocator, k, bits):
    w, x = synthetic(16, k, m=64, seed=k)
    widths = allocate(x.pow(2).mean(0), w, bits, allocator)
    perm, seg_k = permutation(widths)
    assert sum(seg_k) == k and all(s % 32 == 0 for s in seg_k)
    code_bits = float(widths.double().mean())
    assert abs(code_bits - bits) <= 32 / k / 2 + 1e-12  # nearest whole group
    if allocator == "cmpq":
        assert seg_k[0] == 0 or seg_k[2] == 0, "the paper allocator mixes two adjacent widths only"
    # Segments [4|3|2] with original order inside each.
    assert torch.equal(torch.sort(perm).values, torch.arange(k))
    for part, b in zip(perm.split(seg_k), (4, 3, 2)):
        assert bool((widths[part] == b).all()) and bool((part[1:] > part[:-1]).all())


def test_cmpq_allocator_gives_salient_channels_more_bits():
    s2 = torch.arange(128, dtype=torch.float32)
    widths = allocate(s2, torch.ones(4, 128), 2.5, "cmpq")
    assert bool((widths[64:] == 3).all()) and bool((widths[:64] == 2).all())


def test_greedy_allocator_spends_bits_where_the_error_is():
    s2 = torch.ones(256)
    w = torch.ones(8, 256)
    w[:, :32] = 100.0  # one group dominates the estimated error: it gets both upgrades first
    widths = allocate(s2, w, 2.0 + 2 / 8, "greedy")  # budget: two group-upgrades
    assert bool((widths[:32] == 4).all()) and bool((widths[32:] == 2).all())


@pytest.mark.parametrize("bits", [1.5, 4.5, float("nan"), float("inf"), -2.0])
@pytest.mark.parametrize("allocator", ["cmpq", "greedy"])
def test_bad_budgets_raise(bits, allocator):
    w, x = synthetic(8, 64, m=32)
    with pytest.raises(ValueError, match="bits must be"):
        quantize_weight(w, x.pow(2).mean(0), bits, allocator=allocator)


def test_bad_inputs_raise():
    w, x = synthetic(8, 64, m=32)
    s2 = x.pow(2).mean(0)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        quantize_weight(w[:, :48], s2[:48], 3.0)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight(bad, s2, 3.0)
    with pytest.raises(ValueError, match="one entry per input channel"):
        quantize_weight(w, s2[:32], 3.0)
    with pytest.raises(ValueError, match="needs hessian"):
        quantize_weight(w, s2, 3.0, error_feedback=True)
    with pytest.raises(ValueError, match="allocator"):
        quantize_weight(w, s2, 3.0, allocator="random")
    with pytest.raises(ValueError, match="p_err"):
        quantize_weight(w, s2, 3.0, p_err=1.5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kmeans_is_deterministic_and_never_worse_than_its_init(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(64, 200, generator=gen) * torch.rand(64, 1, generator=gen)
    w = torch.rand(64, 200, generator=gen) ** 4
    cb1, codes1 = weighted_kmeans(x, w, bits, iters=20)
    cb2, codes2 = weighted_kmeans(x, w, bits, iters=20)
    assert torch.equal(cb1, cb2) and torch.equal(codes1, codes2)
    assert torch.equal(cb1, cb1.half().float()), "codebooks are fp16-representable"
    assert bool((cb1[:, 1:] >= cb1[:, :-1]).all())
    init = weighted_quantile_init(x, w, 1 << bits).half().float()
    init_err = weighted_error(x, w, init, assign(x, init))
    err = weighted_error(x, w, cb1, codes1)
    assert bool((err <= init_err).all()) and float(err.sum()) < 0.9 * float(init_err.sum())
    assert torch.equal(codes1, assign(x, cb1)), "codes are nearest entries of the rounded codebook"


def test_kmeans_in_row_chunks_equals_one_fit(monkeypatch):
    """Rows are independent, so the bounded-memory chunking (3 rows of 200 per chunk here) changes nothing."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 200, generator=gen) * torch.rand(64, 1, generator=gen)
    w = torch.rand(64, 200, generator=gen) ** 4
    whole = weighted_kmeans(x, w, 3, iters=20)
    monkeypatch.setattr(codebook, "KMEANS_CHUNK_ELEMENTS", 600)
    chunked = weighted_kmeans(x, w, 3, iters=20)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_outliers_reduce_the_weighted_error_and_are_exact():
    w, x = synthetic(128, 256)
    s2 = x.pow(2).mean(0)
    # One codebook per row: with 4 rows per codebook, dropping the 16 activation outliers from the fit moves
    # Lloyd's local optimum by more than they save on this tiny matrix (7.55 -> 7.95; both kinds: 5.63).
    settings = {"allocator": "cmpq", "codebook_rows": 1}
    plain = quantize_weight(w, s2, 2.5, p_act=0.0, p_err=0.0, **settings)
    act_only = quantize_weight(w, s2, 2.5, p_err=0.0, **settings)
    both = quantize_weight(w, s2, 2.5, **settings)
    assert plain.nnz == 0 and act_only.nnz == round(0.0005 * w.numel())
    assert both.nnz == round(0.0005 * w.numel()) + round(0.004 * w.numel())
    errors = [weighted_weight_error(w, s2, layer) for layer in (plain, act_only, both)]
    assert errors[2] < errors[1] < errors[0]
    # Outlier positions reproduce W up to the fp16 rounding of the stored residual.
    rows = torch.repeat_interleave(torch.arange(both.n), both.row_ptr.diff().long())
    cols = both.perm.long()[both.col.long()]
    diff = (reference.dequantize(both) - w)[rows, cols].abs()
    assert bool((diff <= 2.0**-11 * both.val.float().abs() + 1e-8).all())


def test_effective_bits_count_the_overheads():
    w, x = synthetic(64, 256)
    layer = quantize_weight(w, x.pow(2).mean(0), 3.0)
    storage = layer.storage_bits()
    assert layer.code_bits == 3.0
    assert layer.effective_bits == pytest.approx(sum(storage.values()) / w.numel())
    assert storage["outliers"] > 0 and layer.effective_bits > layer.code_bits


@pytest.mark.parametrize("bits", [2.0, 2.5, 3.0, 4.0])
@pytest.mark.parametrize("allocator", ["cmpq", "greedy"])
def test_error_feedback_reduces_the_output_error(bits, allocator):
    w, x = synthetic(96, 256, seed=1)
    s2, h = stats(x)
    without = quantize_weight(w, s2, bits, allocator=allocator, hessian=h, error_feedback=False)
    with_ef = quantize_weight(w, s2, bits, allocator=allocator, hessian=h)
    assert output_error(x, w, with_ef) < 0.95 * output_error(x, w, without)
    assert with_ef.seg_k == without.seg_k and with_ef.nnz == without.nnz


@pytest.mark.parametrize("bits", [2.5, 3.0, 4.0])
def test_act_order_feedback_beats_packed_order(bits):
    """Measured on seeds 0-2 (256 x 512): act order cut the output error 4-20 % below packed order."""
    w, x = synthetic(128, 256, seed=2)
    s2, h = stats(x)
    packed = quantize_weight(w, s2, bits, hessian=h, feedback_order="packed")
    act = quantize_weight(w, s2, bits, hessian=h)
    assert output_error(x, w, act) < output_error(x, w, packed)
    with pytest.raises(ValueError, match="feedback_order"):
        quantize_weight(w, s2, bits, hessian=h, feedback_order="random")


def test_error_feedback_handles_dead_channels():
    w, x = synthetic(32, 64, m=256)
    x[:, :5] = 0.0  # channels that never see activation: zero Hessian rows
    s2, h = stats(x)
    layer = quantize_weight(w, s2, 3.0, hessian=h)
    assert bool(torch.isfinite(reference.dequantize(layer)).all())


@pytest.mark.parametrize("bits,allocator,codebook_rows,ef", [
    (2.5, "cmpq", 1, True), (3.3, "greedy", 1, True), (3.7, "cmpq", 4, False), (2.0, "greedy", 3, True),
])
def test_layer_validates_and_the_kernel_matches_the_reference(bits, allocator, codebook_rows, ef):
    w, x = synthetic(70, 192, seed=3)
    s2, h = stats(x)
    bias = torch.randn(70)
    layer = quantize_weight(w, s2, bits, allocator=allocator, hessian=h, error_feedback=ef,
                            codebook_rows=codebook_rows, bias=bias)
    layer.validate()
    assert layer.codebook_rows == codebook_rows and layer.bits == bits
    assert output_error(x, w, layer) < 0.25
    xs = x[:9].contiguous()
    assert_matches_reference(ops.gemm(xs, layer), xs, layer)


def test_quantize_weight_is_deterministic():
    w, x = synthetic(48, 128, seed=4)
    s2, h = stats(x)
    a = quantize_weight(w, s2, 2.7, allocator="greedy", hessian=h)
    b = quantize_weight(w, s2, 2.7, allocator="greedy", hessian=h)
    assert torch.equal(reference.dequantize(a), reference.dequantize(b)) and torch.equal(a.perm, b.perm)
