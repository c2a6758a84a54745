"""Bad inputs raise the documented exception type with a message naming the problem.

C++ ``TORCH_CHECK_VALUE`` / ``TORCH_CHECK_TYPE`` surface in Python as ``ValueError`` / ``TypeError``.
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from cmpq_kernels import CMPQLinear, ops
from conftest import assert_matches_reference, make_layer, random_x

N, K = 37, 96


@pytest.fixture
def layer():
    """A fresh layer per test (tests corrupt copies of its tensors), with outliers and a bias."""
    return make_layer(N, K, outlier_density=0.05, bias=torch.float32, seed=3)


# ---- ops.gemm and CMPQLinear.forward ----------------------------------------------------------------

BAD_ACTIVATIONS = [
    (lambda: torch.zeros(2, K + 32), ValueError, "last dimension must be in_features=96"),
    (lambda: torch.zeros(2, K - 1), ValueError, "last dimension must be in_features=96"),
    (lambda: torch.tensor(1.0), ValueError, "last dimension must be in_features=96"),
    (lambda: torch.zeros(2, K, dtype=torch.int32), TypeError, "dtype must be one of"),
    (lambda: torch.zeros(2, K, dtype=torch.float64), TypeError, "dtype must be one of"),
    (lambda: [[0.0] * K], TypeError, "expected a torch.Tensor"),
]


@pytest.mark.parametrize("make_x,error,match", BAD_ACTIVATIONS)
def test_gemm_rejects_bad_activations(layer, make_x, error, match):
    with pytest.raises(error, match=match):
        ops.gemm(make_x(), layer)


@pytest.mark.parametrize("make_x,error,match", BAD_ACTIVATIONS[:5])  # forward calls x.contiguous() first
def test_linear_forward_rejects_bad_activations(layer, make_x, error, match):
    with pytest.raises(error, match=match):
        CMPQLinear(layer)(make_x())


def test_gemm_rejects_non_contiguous_x_but_forward_accepts_it(layer):
    x = random_x(K, 5).T  # [5, K], column-major
    assert not x.is_contiguous()
    with pytest.raises(ValueError, match="x: must be contiguous"):
        ops.gemm(x, layer)
    assert_matches_reference(CMPQLinear(layer)(x), x, layer)


@pytest.mark.parametrize("bias", [torch.zeros(N + 1), torch.zeros(1, N), torch.zeros(())], ids=["n+1", "1xn", "0d"])
def test_gemm_rejects_bias_of_wrong_shape(layer, bias):
    with pytest.raises(ValueError, match=rf"bias must be \[{N}\]"):
        ops.gemm(random_x(2, K), layer, bias)


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


# ---- CMPQLayer.validate -----------------------------------------------------------------------------


def _set(tensor, index, value):
    """A modified copy (layer tensors are never touched in place)."""
    out = tensor.clone()
    out[index] = value
    return out


def _replace_item(items, index, value):
    return tuple(value if i == index else item for i, item in enumerate(items))


LAYER_CORRUPTIONS = {
    "format_version": lambda l: dict(format_version=2),
    "n, k": lambda l: dict(n=0),
    "k": lambda l: dict(k=100),
    "bits=1.5": lambda l: dict(bits=1.5),
    "bits=4.5": lambda l: dict(bits=4.5),
    "bits=nan": lambda l: dict(bits=float("nan")),
    "codebook_rows": lambda l: dict(codebook_rows=0),
    "seg_k=sum": lambda l: dict(seg_k=(32, 32, 0)),
    "seg_k=granule": lambda l: dict(seg_k=(16, 48, 32)),
    "perm=duplicate": lambda l: dict(perm=_set(l.perm, 0, l.perm[1])),
    "perm=range": lambda l: dict(perm=_set(l.perm, l.perm.argmax(), K)),
    "perm=dtype": lambda l: dict(perm=l.perm.long()),
    "codes[1]": lambda l: dict(codes=_replace_item(l.codes, 1, l.codes[1][:, :-1].contiguous())),
    "codes[2]": lambda l: dict(codes=_replace_item(l.codes, 2, l.codes[2].long())),
    "codebooks[0]=nan": lambda l: dict(codebooks=_replace_item(l.codebooks, 0, _set(l.codebooks[0], (3, 5), float("nan")))),
    "codebooks[2]=inf": lambda l: dict(codebooks=_replace_item(l.codebooks, 2, _set(l.codebooks[2], (0, 0), float("inf")))),
    "codebooks[1]=shape": lambda l: dict(codebooks=_replace_item(l.codebooks, 1, l.codebooks[1][:-1])),
    "row_ptr=monotone": lambda l: dict(row_ptr=_set(l.row_ptr, 1, l.nnz)),
    "row_ptr=end": lambda l: dict(row_ptr=_set(l.row_ptr, -1, l.nnz - 1)),
    "row_ptr=start": lambda l: dict(row_ptr=_set(l.row_ptr, 0, 1)),
    "col=high": lambda l: dict(col=_set(l.col, 0, K)),
    "col=negative": lambda l: dict(col=_set(l.col, -1, -1)),
    "col=dtype": lambda l: dict(col=l.col.int()),
    "val=inf": lambda l: dict(val=_set(l.val, 0, float("inf"))),
    "val=nan": lambda l: dict(val=_set(l.val, -1, float("nan"))),
    "val=length": lambda l: dict(val=l.val[:-1]),
    "bias=shape": lambda l: dict(bias=torch.zeros(N + 1)),
    "bias=dtype": lambda l: dict(bias=torch.zeros(N, dtype=torch.int32)),
}


@pytest.mark.parametrize("name", LAYER_CORRUPTIONS)
def test_validate_names_the_bad_field(layer, name):
    corrupted = dataclasses.replace(layer, **LAYER_CORRUPTIONS[name](layer))
    field = name.split("=")[0]
    with pytest.raises(ValueError, match="^" + re.escape(field) + r"[:\[ ]"):
        corrupted.validate()


def test_validate_accepts_and_returns_the_good_layer(layer):
    assert layer.validate() is layer


def test_module_refuses_an_invalid_layer(layer):
    with pytest.raises(ValueError, match="^format_version"):
        CMPQLinear(dataclasses.replace(layer, format_version=2))
