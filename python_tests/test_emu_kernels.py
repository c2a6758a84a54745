"""The CUDA kernels (gemv.cu, gemm_tc.cu, dequant.cu), exact sources, run on the CPU under the SIMT emulation.

``torch.ops.cmpq_emu.*`` has the schemas of ``torch.ops.cmpq.*`` and the GPU dispatch of ``csrc/gpu_ops.h``
(m <= 8 GEMV, m <= 128 tensor-core GEMM, larger m decode + matmul), so every path is exercised here on
small, awkward shapes. Outputs and workspaces are poisoned with NaN before each emulated launch, so an
element a kernel fails to write shows up as NaN.

Tolerances (on top of conftest's FP32-accumulation + one output rounding bound): the GEMV multiplies FP32
codebook values, so it needs nothing more; the GEMM and decode paths round decoded weights to the
activation type first — exact for FP16 codebook values, 2**-8 relative for BF16, and 2**-11 for FP16
codebook+outlier sums on the decode path. The emulation sums in a different order from a GPU, so GPU
results agree with these to the same tolerances, not bit for bit.
"""
from __future__ import annotations

import pytest
import torch

import cmpq_kernels._C_emu  # noqa: F401  (registers torch.ops.cmpq_emu)
from cmpq_kernels import reference
from cmpq_kernels.format import CMPQLayer

from conftest import assert_matches_reference, make_layer, random_x

GEMV_MAX_M, GEMM_MAX_M = 8, 128
SCHEDULES = ("forward", "reverse", "random")
DTYPES = (torch.float16, torch.bfloat16)
SEGMENT_MIXES = [(96, 0, 0), (0, 96, 0), (0, 0, 96), (32, 32, 32), (0, 64, 32), (64, 0, 32), (32, 64, 0)]


def emu_gemm(x: torch.Tensor, layer: CMPQLayer, bias=None, schedule: str = "forward") -> torch.Tensor:
    torch.ops.cmpq_emu.set_schedule(schedule, 7)
    return torch.ops.cmpq_emu.gemm(x, layer.perm, *layer.codes, *layer.codebooks, layer.row_ptr, layer.col,
                                   layer.val, layer.bias if bias is None else bias, layer.codebook_rows,
                                   layer.format_version)


def weight_round(m: int, dtype: torch.dtype) -> float:
    """Unit roundoff of the decoded weights on the path that batch size m takes (see module doc)."""
    if m <= GEMV_MAX_M:
        return 0.0
    if dtype == torch.bfloat16:
        return 2.0**-8
    return 0.0 if m <= GEMM_MAX_M else 2.0**-11


def check(layer: CMPQLayer, m: int, dtype: torch.dtype, schedule: str = "forward", seed: int = 0) -> torch.Tensor:
    x = random_x(m, layer.k, dtype, seed)
    y = emu_gemm(x, layer, schedule=schedule)
    assert_matches_reference(y, x, layer, weight_round=weight_round(m, dtype))
    return y


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 16, 17, 33, 64, 100, 128, 129, 150])
def test_every_path_matches_reference(m, dtype, schedule):
    layer = make_layer(37, 160, (64, 32, 64), outlier_density=0.02, bias=torch.float16, seed=m)
    check(layer, m, dtype, schedule, seed=m)


@pytest.mark.parametrize("seg_k", SEGMENT_MIXES)
@pytest.mark.parametrize("m", [1, 7, 20, 140])
def test_segment_mixes(seg_k, m):
    layer = make_layer(70, sum(seg_k), seg_k, outlier_density=0.01, seed=sum(seg_k) + m)
    check(layer, m, torch.float16, "reverse")


@pytest.mark.parametrize("n,k", [(1, 32), (3, 64), (65, 32), (130, 1088), (200, 2080)])
@pytest.mark.parametrize("m", [1, 4, 24])
def test_awkward_shapes(n, k, m):
    """n around the 8-row GEMV and 64-row GEMM blocks; k spanning 1024-column GEMV chunks and 64-column GEMM steps."""
    check(make_layer(n, k, outlier_density=0.005, seed=n + k), m, torch.bfloat16, "random")


OUTLIER_PATTERNS = {
    "none": lambda n, k: ([], []),
    "first_last_rows": lambda n, k: ([0] * k + [n - 1] * k, list(range(k)) * 2),
    "first_last_cols": lambda n, k: (list(range(n)) * 2, [0] * n + [k - 1] * n),
    "duplicates": lambda n, k: ([1, 1, 1, n - 1, n - 1], [5, 5, 5, k - 1, k - 1]),
}


@pytest.mark.parametrize("pattern", sorted(OUTLIER_PATTERNS))
@pytest.mark.parametrize("m", [1, 8, 20, 130])
def test_outlier_patterns(pattern, m):
    n, k = 45, 96
    layer = make_layer(n, k, outliers=OUTLIER_PATTERNS[pattern](n, k), seed=3)
    check(layer, m, torch.float16, "reverse")


@pytest.mark.parametrize("m", [1, 20, 130])
def test_dense_outliers_codebook_rows_and_bias(m):
    layer = make_layer(37, 96, outlier_density=0.2, codebook_rows=4, bias=torch.float32, seed=11)
    check(layer, m, torch.float16, "random")
    bias = torch.randn(37, dtype=torch.bfloat16)
    x = random_x(m, 96, torch.bfloat16)
    assert_matches_reference(emu_gemm(x, layer, bias=bias), x, layer, bias=bias,
                             weight_round=weight_round(m, torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [3, 40])
def test_schedules_give_identical_bits(m, dtype):
    """Each thread sums in a fixed order whatever the fiber order, so results are bit-identical."""
    layer = make_layer(50, 128, outlier_density=0.05, seed=5)
    x = random_x(m, 128, dtype)
    outputs = [emu_gemm(x, layer, schedule=s) for s in SCHEDULES]
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])


def test_identity_reproduces_weights():
    """x = I through the tensor-core GEMM (and GEMV slices) gives W.T exactly in fp16 (one product per sum)."""
    layer = make_layer(40, 96, outlier_density=0.05, seed=9)
    eye = torch.eye(96, dtype=torch.float16)
    w_t = reference.dequantize(layer, torch.float64).T.half()
    assert torch.equal(emu_gemm(eye, layer), w_t)
    assert torch.equal(emu_gemm(eye[:8], layer), w_t[:8])


@pytest.mark.parametrize("m", [1, 20, 130])
def test_nan_stays_in_its_row(m):
    layer = make_layer(33, 64, outlier_density=0.02, seed=2)
    x = random_x(m, 64, torch.float16)
    x[m // 2, 17] = float("nan")
    y = emu_gemm(x, layer)
    nan_rows = torch.isnan(y).any(dim=1).nonzero().flatten().tolist()
    assert nan_rows == [m // 2]


@pytest.mark.parametrize("pattern", ["duplicates", "first_last_rows"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_reference(dtype, pattern):
    layer = make_layer(37, 160, outliers=OUTLIER_PATTERNS[pattern](37, 160), codebook_rows=3, seed=4)
    w = torch.ops.cmpq_emu.dequantize(layer.perm, *layer.codes, *layer.codebooks, layer.row_ptr, layer.col,
                                      layer.val, layer.codebook_rows, layer.format_version, dtype)
    # codebook value + residual is exact in FP32 and rounded once to dtype
    assert torch.equal(w, reference.dequantize(layer, torch.float64).to(dtype))


def test_bad_inputs():
    layer = make_layer(8, 64, seed=1)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        emu_gemm(random_x(2, 64, torch.float32), layer)
    with pytest.raises(ValueError, match="features but the layer has k=64"):
        emu_gemm(random_x(2, 96, torch.float16), layer)
    with pytest.raises(ValueError, match="format_version"):
        torch.ops.cmpq_emu.gemm(random_x(1, 64, torch.float16), layer.perm, *layer.codes, *layer.codebooks,
                                layer.row_ptr, layer.col, layer.val, None, 1, 2)
    with pytest.raises(ValueError, match="order must be"):
        torch.ops.cmpq_emu.set_schedule("sideways", 0)
