"""Bad inputs to the kernels raise the documented exception with a message naming the problem; odd but valid
inputs (empty batches, non-contiguous activations, NaN rows) compute correctly.

Entry points: ``ops.gemm`` and ``CMPQLinear.forward`` (checked the same way, since a user reaches both), and the
raw ``torch.ops.cmpq`` ops. C++ ``TORCH_CHECK_VALUE`` / ``TORCH_CHECK_TYPE`` surface in Python as ``ValueError``
/ ``TypeError``. Hand-built layers with bad fields are in ``test_layer_validation.py``.
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np
import pytest
import torch

from cmpq_kernels import CMPQLayer, CMPQLinear, ops
from conftest import make_layer, random_x

N, K = 37, 96


@pytest.fixture(scope="module")
def layer() -> CMPQLayer:
    """Read-only here: tests corrupt copies of its tensors, never the tensors themselves."""
    return make_layer(N, K, outlier_density=0.05, bias=torch.float32, seed=3)


# ---- activations, through ops.gemm and CMPQLinear.forward alike --------------------------------------------

ENTRY_POINTS: dict[str, Callable[[CMPQLayer, object], torch.Tensor]] = {
    "gemm": lambda layer, x: ops.gemm(x, layer),
    "forward": lambda layer, x: CMPQLinear(layer)(x),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("shape", [(2, K + 32), (2, K - 1), ()], ids=["k+32", "k-1", "0d"])
def test_activation_of_wrong_width_is_refused(layer, entry, shape):
    with pytest.raises(ValueError, match=re.escape(f"x: last dimension must be in_features={K}, got shape {shape}")):
        ENTRY_POINTS[entry](layer, torch.zeros(shape))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.bool, torch.int8, torch.int64, torch.complex64,
                                   torch.float8_e4m3fn])
def test_activation_of_unsupported_dtype_is_refused(layer, entry, dtype):
    with pytest.raises(TypeError, match=f"x: dtype must be one of float32/float16/bfloat16, got {dtype}"):
        ENTRY_POINTS[entry](layer, torch.zeros(2, K).to(dtype))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("x", [[[0.0] * K], np.zeros((2, K), np.float32), None], ids=["list", "numpy", "none"])
def test_activation_that_is_not_a_tensor_is_refused(layer, entry, x):
    with pytest.raises(TypeError, match=f"x: expected a torch.Tensor, got {type(x).__name__}"):
        ENTRY_POINTS[entry](layer, x)


def test_activation_on_another_device_is_refused(layer):
    with pytest.raises(ValueError, match="x: is on meta but the layer is on cpu"):
        CMPQLinear(layer)(torch.zeros(2, K, device="meta"))


@pytest.mark.parametrize("shape", [(0, K), (2, 0, K), (0, 0, K), (0, 3, K)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_empty_batch_gives_an_empty_output(layer, shape, dtype):
    x = torch.zeros(shape, dtype=dtype)
    for y in (ops.gemm(x, layer), CMPQLinear(layer)(x)):
        assert y.shape == (*shape[:-1], N) and y.dtype == dtype


NON_CONTIGUOUS = {
    "transposed": lambda: random_x(K, 5).T,
    "strided": lambda: random_x(6, 2 * K)[:, ::2],
    "expanded": lambda: random_x(1, K).expand(5, K),
    "transposed-3d": lambda: random_x(4 * K, 3).reshape(4, K, 3).transpose(1, 2),
    "column-slice": lambda: random_x(5, K + 32)[:, 32:],
}


@pytest.mark.parametrize("name", NON_CONTIGUOUS)
def test_non_contiguous_x_gemm_raises_forward_computes_the_same(layer, name):
    x = NON_CONTIGUOUS[name]()
    assert not x.is_contiguous()
    with pytest.raises(ValueError, match=re.escape("x: must be contiguous (call .contiguous())")):
        ops.gemm(x, layer)
    assert torch.equal(CMPQLinear(layer)(x), ops.gemm(x.contiguous(), layer))


@pytest.mark.parametrize("m", [1, 3, 16, 17, 40])  # <= 16: fused kernel; > 16: decode + BLAS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_and_inf_rows_do_not_leak_into_other_rows(layer, cpu_isa, m, dtype):
    x = random_x(m, K, dtype, seed=m)
    poisoned = {0: float("nan"), m - 1: float("inf")} if m > 1 else {0: float("nan")}
    clean = x.clone()
    for row, value in poisoned.items():
        clean[row] = 0
        x[row, row % K] = value
        x[row, (row + 7) % K] = -value
    y, y_clean = CMPQLinear(layer)(x), CMPQLinear(layer)(clean)
    others = [r for r in range(m) if r not in poisoned]
    assert torch.equal(y[others], y_clean[others]), "a poisoned row changed another row's output"
    assert bool(torch.isfinite(y[others]).all())
    assert not bool(torch.isfinite(y[0]).any()), "a NaN activation must show in its own row, not vanish"


# ---- the other arguments of ops.gemm ------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [torch.zeros(N + 1), torch.zeros(1, N), torch.zeros(())], ids=["n+1", "1xn", "0d"])
def test_gemm_rejects_bias_of_wrong_shape(layer, bias):
    with pytest.raises(ValueError, match=rf"bias must be \[{N}\]"):
        ops.gemm(random_x(2, K), layer, bias)


def test_gemm_rejects_a_bias_that_is_not_a_tensor(layer):
    with pytest.raises(TypeError, match="bias: expected a torch.Tensor or None, got list"):
        ops.gemm(random_x(2, K), layer, [0.0] * N)


@pytest.mark.parametrize("bad", [None, "module", 3], ids=["none", "module", "int"])
def test_gemm_rejects_a_layer_that_is_not_a_cmpq_layer(layer, bad):
    bad = CMPQLinear(layer) if bad == "module" else bad
    with pytest.raises(TypeError, match="layer: expected a CMPQLayer"):
        ops.gemm(random_x(2, K), bad)


# ---- torch.ops.cmpq.gemm / dequantize called directly -----------------------------------------------


def op_args(layer, **changes):
    """Positional tensor args of cmpq.gemm/dequantize after x, with named ones replaced."""
    fields = dict(perm=layer.perm, codes4=layer.codes[0], codes3=layer.codes[1], codes2=layer.codes[2],
                  codebook4=layer.codebooks[0], codebook3=layer.codebooks[1], codebook2=layer.codebooks[2],
                  row_ptr=layer.row_ptr, col=layer.col, val=layer.val)
    assert set(changes) <= set(fields) | {"x", "bias", "codebook_rows", "format_version"}
    fields.update((name, value) for name, value in changes.items() if name in fields)
    return list(fields.values())


def call_gemm(layer, **changes):
    x = changes.get("x", random_x(2, K))
    return torch.ops.cmpq.gemm(x, *op_args(layer, **changes), changes.get("bias"),
                               changes.get("codebook_rows", 1), changes.get("format_version", 1))


RAW_GEMM_ERRORS = [
    (dict(format_version=2), ValueError, "format_version 2 is not supported by this build"),
    (dict(codebook_rows=0), ValueError, "codebook_rows must be >= 1"),
    (lambda l: dict(codes4=l.codes[0].long()), TypeError, "codes4 must be Int"),
    (lambda l: dict(codebook2=l.codebooks[2].float()), TypeError, "codebook2 must be Half"),
    (lambda l: dict(codebook3=l.codebooks[1][:, :4].contiguous()), ValueError, r"3-bit codebook must be \[37, 8\]"),
    (lambda l: dict(codebook4=l.codebooks[0][:-1]), ValueError, r"4-bit codebook must be \[37, 16\]"),
    (lambda l: dict(val=l.val[:-1]), ValueError, r"col has \d+ entries but val has"),
    (lambda l: dict(col=l.col.float()), TypeError, "col must be int16 or int32"),
    (lambda l: dict(codes3=l.codes[1][:-1]), ValueError, r"3-bit codes must be \[n=37"),
    (lambda l: dict(perm=l.perm[:-32]), ValueError, "segments hold 96 channels but perm has k=64"),
    (lambda l: dict(row_ptr=l.row_ptr.long()), TypeError, "row_ptr must be Int"),
    (lambda l: dict(x=random_x(2, K).double()), TypeError, "x must be float32, float16 or bfloat16"),
    (lambda l: dict(x=random_x(2 * K, 1).reshape(2, 1, K)), ValueError, "x must be 2-D"),
    (lambda l: dict(x=random_x(2, K + 32)), ValueError, "x has 128 features but the layer has k=96"),
    (lambda l: dict(x=random_x(K, 2).T), ValueError, "x must be contiguous"),
]


@pytest.mark.parametrize("changes,error,match", RAW_GEMM_ERRORS)
def test_raw_gemm_op_checks(layer, changes, error, match):
    with pytest.raises(error, match=match):
        call_gemm(layer, **(changes(layer) if callable(changes) else changes))


def test_raw_dequantize_op_checks(layer):
    with pytest.raises(ValueError, match="format_version 2 is not supported"):
        torch.ops.cmpq.dequantize(*op_args(layer), 1, 2, torch.float32)
    with pytest.raises(ValueError, match=r"col has \d+ entries but val has"):
        torch.ops.cmpq.dequantize(*op_args(layer, val=layer.val[:-1]), 1, 1, torch.float32)
