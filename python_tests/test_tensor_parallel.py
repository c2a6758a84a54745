"""Tensor-parallel shard math (cmpq_kernels.tensor_parallel): device-independent, so checked on the CPU op.

For tp = 1, 2, 4 a column-parallel layer is the concatenation of its row shards and a row-parallel layer the
sum of its column shards, against the unsharded layer and the float64 reference; fused parts stack into one
layer only when they share a permutation. The same for MixLLM layers (whole 128-channel groups per rank).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmpq_kernels import mixllm_reference, ops, reference
from cmpq_kernels.tensor_parallel import (concat_rows, mixllm_concat_rows, mixllm_slice_columns, mixllm_slice_rows,
                                          slice_columns, slice_rows)
from conftest import make_layer, make_mixllm_layer, norm_rel_error, random_x

CASES = {  # name: (n, k, seg_k, codebook_rows, outlier density)
    "even": (64, 256, (96, 96, 64), 4, 0.02),
    "one-width": (48, 128, (0, 128, 0), 2, 0.05),
    "wide-k": (32, 1024, (320, 384, 320), 1, 0.01),
}


def layer_of(case: str, seed: int = 1):
    n, k, seg_k, rows, density = CASES[case]
    return make_layer(n, k, seg_k=seg_k, outlier_density=density, codebook_rows=rows, seed=seed,
                      bias=torch.float32)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_row_shards_concatenate_to_the_layer(case, tp):
    layer = layer_of(case)
    x = random_x(5, layer.k)
    size = layer.n // tp
    shards = [slice_rows(layer, r * size, size) for r in range(tp)]
    y = torch.cat([ops.gemm(x, s) for s in shards], dim=1)
    assert torch.equal(y, ops.gemm(x, layer))  # the same rows see the same decode and the same sums
    assert sum(s.nnz for s in shards) == layer.nnz


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_column_shards_sum_to_the_layer(case, tp):
    layer = layer_of(case, seed=3)
    x = random_x(7, layer.k, seed=1)
    size = layer.k // tp
    y = torch.zeros(7, layer.n)
    kept = 0
    for r in range(tp):
        shard = slice_columns(layer, r * size, size)
        assert shard.layer.k % 32 == 0 and shard.padding < 3 * 32
        y += ops.gemm(F.pad(x[:, r * size:(r + 1) * size], (0, shard.padding)), shard.layer)
        kept += shard.layer.nnz
    y += layer.bias  # the bias is added once, after the all-reduce
    assert kept == layer.nnz
    ref = reference.linear(x.double(), layer)
    assert norm_rel_error(y, ref) < 2e-6
    assert norm_rel_error(y, ops.gemm(x, layer)) < 2e-6


def test_column_shard_padding_columns_are_inert():
    """A padded shard gives the same product whatever sits in the padding channels' codes: they meet zeros."""
    layer = layer_of("even")
    shard = slice_columns(layer, 0, 128)
    assert shard.padding > 0  # the random permutation leaves ragged segments
    x = F.pad(random_x(3, 128), (0, shard.padding))
    assert bool(torch.isfinite(ops.gemm(x, shard.layer)).all())
    x[:, 128:] = 1.0  # a caller that forgot to zero the padding would see the padding codes
    assert not torch.allclose(ops.gemm(x, shard.layer), ops.gemm(F.pad(x[:, :128], (0, shard.padding)), shard.layer))


def test_concat_rows_of_shared_permutation_parts():
    base = layer_of("even")
    parts = [slice_rows(base, 0, 32), slice_rows(base, 32, 16), slice_rows(base, 48, 16)]
    fused = concat_rows(parts)
    x = random_x(4, base.k)
    assert torch.equal(ops.gemm(x, fused), ops.gemm(x, base))
    assert fused.nnz == base.nnz


def test_concat_rows_refuses_parts_with_other_permutations():
    a, b = layer_of("even", seed=1), layer_of("even", seed=5)
    with pytest.raises(ValueError, match="permutation"):
        concat_rows([a, b])
    odd = slice_rows(layer_of("one-width"), 0, 48)
    with pytest.raises(ValueError, match="codebook per"):
        concat_rows([dataclasses.replace(odd, codebook_rows=4), odd])


@pytest.mark.parametrize("start,size,match", [(2, 8, "codebook row"), (0, 6, "codebook row"), (60, 8, "inside")])
def test_slice_rows_refuses_ranges_it_cannot_make(start, size, match):
    with pytest.raises(ValueError, match=match):
        slice_rows(layer_of("even"), start, size)


def test_slice_columns_refuses_ranges_outside_the_layer():
    with pytest.raises(ValueError, match="inside"):
        slice_columns(layer_of("even"), 200, 100)


def test_column_shard_keeps_codes_and_codebooks():
    """The shard is a re-arrangement: each kept channel's decoded weights are the unsharded ones."""
    layer = layer_of("wide-k")
    shard = slice_columns(layer, 256, 512)
    w = reference.dequantize(layer, torch.float64)[:, 256:768]
    ws = reference.dequantize(shard.layer, torch.float64)
    assert torch.equal(ws[:, :512], w)
    np.testing.assert_array_equal(shard.layer.codebooks[0].numpy(), layer.codebooks[0].numpy())


# ---- MixLLM -------------------------------------------------------------------------------------------------

MIXLLM_CASES = {"k512": (48, 512, 9), "partial-group": (40, 576, 0), "all-8bit": (16, 256, 16)}  # (n, k, n8)


def mixllm_layer_of(case: str, seed: int = 1):
    n, k, n8 = MIXLLM_CASES[case]
    return make_mixllm_layer(n, k, n8, bias=torch.float32, seed=seed)


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case", sorted(MIXLLM_CASES))
def test_mixllm_row_shards_concatenate_to_the_layer(case, tp, act_bits):
    layer = mixllm_layer_of(case)
    x = random_x(5, layer.k)
    size = layer.n // tp
    shards = [mixllm_slice_rows(layer, r * size, size) for r in range(tp)]
    assert sum(s.n8 for s in shards) == layer.n8
    y = torch.cat([ops.mixllm_gemm(x, s, act_bits=act_bits) for s in shards], dim=1)
    full = ops.mixllm_gemm(x, layer, act_bits=act_bits)
    if act_bits == 8:  # exact integer group sums: bit-identical
        assert torch.equal(y, full)
    else:  # A16 multiplies the dequantized W with BLAS, whose summation order may depend on n (AVX2 MKL does)
        torch.testing.assert_close(y, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mixllm_column_shards_sum_to_the_layer(tp):
    """Whole groups per rank: each rank quantizes its activations as the unsharded op does, so the shards' sum is
    the unsharded product up to FP32 summation order."""
    layer = mixllm_layer_of("k512", seed=3)
    x = random_x(7, layer.k, seed=1)
    size = layer.k // tp
    y = sum(ops.mixllm_gemm(x[:, r * size:(r + 1) * size].contiguous(), mixllm_slice_columns(layer, r * size, size))
            for r in range(tp)) + layer.bias
    exact = mixllm_reference.linear(x, layer)
    assert norm_rel_error(y, exact) < 2e-6
    assert norm_rel_error(y, ops.mixllm_gemm(x, layer)) < 2e-6


def test_mixllm_column_shard_with_the_partial_group_keeps_the_weights():
    layer = mixllm_layer_of("partial-group")
    shard = mixllm_slice_columns(layer, 512, 64)  # the last, 64-wide group
    assert shard.k == 64 and shard.groups == 1
    assert torch.equal(mixllm_reference.dequantize(shard), mixllm_reference.dequantize(layer)[:, 512:])


def test_mixllm_concat_rows_of_parts_with_one_input():
    base = mixllm_layer_of("k512")
    parts = [mixllm_slice_rows(base, 0, 16), mixllm_slice_rows(base, 16, 24), mixllm_slice_rows(base, 40, 8)]
    fused = mixllm_concat_rows(parts)
    x = random_x(4, base.k)
    assert fused.n8 == base.n8 and torch.equal(ops.mixllm_gemm(x, fused), ops.mixllm_gemm(x, base))


def test_mixllm_shards_refuse_what_they_cannot_make_exactly():
    layer = mixllm_layer_of("k512")
    with pytest.raises(ValueError, match="split a 128-channel group"):
        mixllm_slice_columns(layer, 64, 256)
    with pytest.raises(ValueError, match="split a 128-channel group"):
        mixllm_slice_columns(layer, 0, 192)
    with pytest.raises(ValueError, match="inside"):
        mixllm_slice_rows(layer, 40, 16)
    with pytest.raises(ValueError, match="input channels"):
        mixllm_concat_rows([layer, mixllm_layer_of("partial-group")])
