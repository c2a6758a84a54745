"""The opt-in int8 CPU kernel (``CMPQ_CPU_SIMD=avx512-int8``, csrc/cpu/avx512_int8.cpp).

It rounds activations (per token and 128 packed columns) and codebooks (per row and segment) to int8, so
it is compared with the FP64 reference by a looser norm bound. Its layout logic is checked exactly: when
every codebook and every activation block already lies on the int8 grid with scale 1 (integer values,
one of them ±127), rounding changes nothing and every product and partial sum is an integer below 2^24,
so the kernel must reproduce the reference bit for bit. Any misplaced code, column, block scale or
offset correction breaks that equality.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cmpq_kernels import ops, reference
from conftest import make_layer, norm_rel_error, random_x, with_threads

pytestmark = pytest.mark.skipif("avx512-int8" not in torch.ops.cmpq.cpu_isas(),
                                reason="this CPU lacks avx512vnni/avx512vbmi")

INT8_TOL = 2e-2  # measured ~0.5-1 % (bench/results/cpu_bench.md, rel err column)
SEGMENT_MIXES = [  # channels in the 4-, 3- and 2-bit segments
    (96, 0, 0), (0, 96, 0), (0, 0, 96), (128, 224, 96), (0, 352, 320), (288, 0, 64), (32, 32, 32),
                 (512, 0, 0), (0, 0, 1024), (0, 1056, 0)]


@pytest.fixture
def int8(monkeypatch):
    monkeypatch.setenv("CMPQ_CPU_SIMD", "avx512-int8")


def on_grid(layer, seed: int):
    """The layer with integer codebooks in [-20, 20] and one ±127 per codebook row, integer outliers."""
    rng = np.random.default_rng(seed)

    def integer_codebook(cb: torch.Tensor) -> torch.Tensor:
        values = rng.integers(-20, 21, size=tuple(cb.shape)).astype(np.float16)
        if cb.shape[1]:
            values[np.arange(cb.shape[0]), rng.integers(0, cb.shape[1], cb.shape[0])] = \
                rng.choice([-127, 127], cb.shape[0])
        return torch.from_numpy(values)
    val = torch.from_numpy(rng.integers(-50, 51, size=layer.nnz).astype(np.float16))
    return dataclasses.replace(layer, codebooks=tuple(integer_codebook(c) for c in layer.codebooks), val=val)


def grid_x(layer, m: int, seed: int) -> torch.Tensor:
    """Integer activations in [-20, 20] with one ±127 in every 128-column block of every segment (packed
    order), returned in original column order."""
    rng = np.random.default_rng(seed)
    packed = rng.integers(-20, 21, size=(m, layer.k)).astype(np.float32)
    begin = 0
    for width in layer.seg_k:
        for block in range(begin, begin + width, 128):
            packed[np.arange(m), block + rng.integers(0, min(128, begin + width - block), m)] = \
                rng.choice([-127, 127], m)
        begin += width
    x = np.empty_like(packed)
    x[:, layer.perm.numpy()] = packed
    return torch.from_numpy(x)


@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 16])
@pytest.mark.parametrize("seg_k", SEGMENT_MIXES, ids=str)
def test_exact_on_the_int8_grid(seg_k, m, int8):
    layer = on_grid(make_layer(37, sum(seg_k), seg_k=seg_k, outlier_density=0.02, codebook_rows=2, seed=m), m)
    x = grid_x(layer, m, seed=m)
    y = ops.gemm(x, layer)
    assert torch.equal(y, reference.linear(x, layer).float())


@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("seg_k", SEGMENT_MIXES, ids=str)
def test_close_to_the_reference_on_random_layers(seg_k, m, int8):
    layer = make_layer(53, sum(seg_k), seg_k=seg_k, outlier_density=0.01, seed=3)
    x = random_x(m, layer.k, seed=m)
    err = norm_rel_error(ops.gemm(x, layer), reference.linear(x, layer))
    assert err < INT8_TOL


def test_batches_above_16_run_the_exact_kernel(int8):
    layer = make_layer(40, 256, outlier_density=0.01)
    x = random_x(17, 256)
    assert norm_rel_error(ops.gemm(x, layer), reference.linear(x, layer)) < 1e-5


def test_repeatable_and_independent_of_thread_count(int8):
    layer = make_layer(301, 512, outlier_density=0.02, seed=1)
    x = random_x(5, 512)
    one, two = with_threads([1, 2], lambda: ops.gemm(x, layer))
    assert torch.equal(one, two) and torch.equal(one, ops.gemm(x, layer))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_activation_poisons_only_its_token(bad, int8):
    layer = make_layer(20, 192, outlier_density=0.02)
    x = random_x(4, 192)
    clean = ops.gemm(x, layer)
    x[2, 7] = bad
    y = ops.gemm(x, layer)
    assert torch.isnan(y[2]).all()
    assert torch.equal(y[[0, 1, 3]], clean[[0, 1, 3]])


def test_zero_codebooks_leave_the_exact_outliers(int8):
    layer = make_layer(9, 160, outlier_density=0.05, seed=2)
    layer = dataclasses.replace(layer, codebooks=tuple(torch.zeros_like(c) for c in layer.codebooks))
    x = random_x(3, 160)
    torch.testing.assert_close(ops.gemm(x, layer), reference.linear(x, layer).float(), rtol=1e-6, atol=1e-6)

