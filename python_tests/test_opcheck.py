"""torch.library.opcheck on the cmpq ops: schema, fake (meta) impls vs the CPU kernels, AOT dispatch.

No input requires grad, so the default test_utils (including test_autograd_registration) apply.
"""
from __future__ import annotations

import pytest
import torch

from conftest import make_layer, make_mixllm_layer, random_x

CODEBOOK_ROWS = 4


@pytest.fixture(scope="module")
def layer():
    return make_layer(37, 96, outlier_density=0.05, bias=torch.float32, codebook_rows=CODEBOOK_ROWS, seed=11)


def tensor_args(layer):
    return tuple(layer.fields().values())


@pytest.mark.parametrize("m,dtype,with_bias", [(3, torch.float32, True), (20, torch.float16, False),
                                               (1, torch.bfloat16, True)])
def test_opcheck_gemm(layer, m, dtype, with_bias):
    x = random_x(m, layer.k, dtype)
    args = (x, *tensor_args(layer), layer.bias if with_bias else None, CODEBOOK_ROWS, layer.format_version)
    torch.library.opcheck(torch.ops.cmpq.gemm.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_opcheck_dequantize(layer, dtype):
    args = (*tensor_args(layer), CODEBOOK_ROWS, layer.format_version, dtype)
    torch.library.opcheck(torch.ops.cmpq.dequantize.default, args)


@pytest.mark.parametrize("segment,bits", [(0, 4), (1, 3), (2, 2)])
def test_opcheck_unpack_codes(layer, segment, bits):
    torch.library.opcheck(torch.ops.cmpq.unpack_codes.default, (layer.codes[segment], bits))


@pytest.fixture(scope="module")
def mixllm_layer():
    return make_mixllm_layer(37, 576, 5, bias=torch.float32, seed=12)


@pytest.mark.parametrize("m,dtype,with_bias,act_bits", [(3, torch.float32, True, 8), (20, torch.float16, False, 8),
                                                        (1, torch.bfloat16, True, 16)])
def test_opcheck_mixllm_gemm(mixllm_layer, m, dtype, with_bias, act_bits):
    x = random_x(m, mixllm_layer.k, dtype)
    args = (x, *mixllm_layer.fields().values(), mixllm_layer.bias if with_bias else None, act_bits, 1)
    torch.library.opcheck(torch.ops.cmpq.mixllm_gemm.default, args)


def test_opcheck_mixllm_helpers(mixllm_layer):
    torch.library.opcheck(torch.ops.cmpq.mixllm_dequantize.default,
                          (*mixllm_layer.fields().values(), 1, torch.float16))
    torch.library.opcheck(torch.ops.cmpq.mixllm_quantize_activations.default, (random_x(4, 576),))
    torch.library.opcheck(torch.ops.cmpq.mixllm_unpack_nibbles.default, (mixllm_layer.q4, 576))
