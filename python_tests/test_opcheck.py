"""torch.library.opcheck on the cmpq ops: schema, fake (meta) impls vs the CPU kernels, AOT dispatch.

No input requires grad, so the default test_utils (including test_autograd_registration) apply.
"""
from __future__ import annotations

import pytest
import torch

from conftest import make_layer, random_x

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
