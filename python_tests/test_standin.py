"""The stand-in quantizer: segment allocation and weight -> CMPQLayer."""
from __future__ import annotations

import pytest
import torch

from cmpq_kernels import reference
from cmpq_kernels.quantize import standin
from cmpq_kernels.quantize.allocate import segment_sizes


@pytest.mark.parametrize("k", [32, 96, 256, 4096, 11008])
@pytest.mark.parametrize("bits", [2.0, 2.1, 2.5, 2.99, 3.0, 3.01, 3.3, 3.5, 3.97, 4.0])
def test_segment_sizes_hit_the_target(k, bits):
    seg_k = segment_sizes(k, bits)
    assert sum(seg_k) == k and all(s >= 0 and s % 32 == 0 for s in seg_k)
    code_bits = (4 * seg_k[0] + 3 * seg_k[1] + 2 * seg_k[2]) / k
    # Moving one 32-channel group one width up or down changes code_bits by 32 / k.
    assert abs(code_bits - bits) <= 32 / k + 1e-12
    assert seg_k[0] == 0 or seg_k[2] == 0, "only two adjacent widths are mixed"


@pytest.mark.parametrize("bits,expected", [(2.0, (0, 0, 256)), (2.5, (0, 128, 128)), (3.0, (0, 256, 0)),
                                           (3.25, (64, 192, 0)), (4.0, (256, 0, 0))])
def test_segment_sizes_exact_splits(bits, expected):
    assert segment_sizes(256, bits) == expected


@pytest.mark.parametrize("bits", [1.99, 4.01, 0.0, -3.0, float("nan"), float("inf")])
def test_segment_sizes_rejects_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits must be in"):
        segment_sizes(256, bits)


def test_segment_sizes_rejects_k_off_the_granule():
    with pytest.raises(ValueError, match="not a multiple of 32"):
        segment_sizes(100, 3.0)


@pytest.mark.parametrize("bits", [2.0, 2.5, 3.0, 3.5, 4.0])
def test_quantize_standin_layer(bits):
    """Allocation as segment_sizes says, sorted codebooks, the requested outliers, and exact outlier weights."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 128, generator=gen)
    layer = standin.quantize_standin(weight, bits=bits, outlier_fraction=0.02)
    assert layer.seg_k == segment_sizes(128, bits)
    assert layer.nnz == round(0.02 * 48 * 128)
    for s, width in enumerate(layer.seg_k):
        if width:
            cb = layer.codebooks[s].float()
            assert bool((cb[:, 1:] >= cb[:, :-1]).all())
    error = (reference.dequantize(layer) - weight).abs()
    # Each outlier stores the residual in fp16, so its weight is exact up to one fp16 rounding of it.
    rows = torch.repeat_interleave(torch.arange(48), layer.row_ptr.diff().long())
    outlier_error = error[rows, layer.perm.long()[layer.col.long()]]
    assert bool((outlier_error <= 2.0**-11 * layer.val.float().abs() + 1e-7).all())
    # ...and they were the largest residuals: every other weight is closer than the smallest outlier.
    mask = torch.ones_like(error, dtype=torch.bool)
    mask[rows, layer.perm.long()[layer.col.long()]] = False
    assert float(error[mask].max()) <= float(layer.val.float().abs().min()) * (1 + 2.0**-10)


@pytest.mark.parametrize("weight,kwargs,match", [
    (torch.zeros(4, 32, 1), {}, "must be 2-D"),
    (torch.zeros(4, 40), {}, "not a multiple of 32"),
    (torch.full((4, 32), float("nan")), {}, "NaN or Inf"),
    (torch.zeros(4, 32), dict(outlier_fraction=1.0), "outlier_fraction"),
    (torch.zeros(4, 32), dict(bits=4.5), "bits must be in"),
])
def test_quantize_standin_rejects_bad_input(weight, kwargs, match):
    with pytest.raises(ValueError, match=match):
        standin.quantize_standin(weight, **kwargs)
