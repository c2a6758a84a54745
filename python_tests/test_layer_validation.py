"""``CMPQLayer.validate`` (which ``CMPQLinear`` calls) refuses a hand-built layer with a bad field: a
``ValueError`` whose message starts with the field's name and says what is wrong, never a crash or garbage
later in a kernel.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import numpy as np
import pytest
import torch

from cmpq_kernels import CMPQLayer, CMPQLinear
from conftest import make_layer

N, K = 37, 96


@pytest.fixture(scope="module")
def layer() -> CMPQLayer:
    """Read-only here: tests corrupt copies (``dataclasses.replace`` / clones), never this layer's tensors."""
    return make_layer(N, K, outlier_density=0.05, bias=torch.float32, seed=3)


def _set(tensor: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """A modified copy (layer tensors are never touched in place)."""
    out = tensor.clone()
    out[index] = value
    return out


def _item(items: tuple, index: int, value: Any) -> tuple:
    return tuple(value if i == index else item for i, item in enumerate(items))


def _swap_in_row(col: torch.Tensor, row_ptr: torch.Tensor) -> torch.Tensor:
    """``col`` with the first two outliers of the first row holding two or more swapped (unsorted)."""
    counts = row_ptr[1:] - row_ptr[:-1]
    start = int(row_ptr[int(torch.nonzero(counts >= 2)[0])])
    out = col.clone()
    out[start], out[start + 1] = col[start + 1], col[start]
    return out


# name -> (fields to replace, regex the message must start with)
CORRUPTIONS: dict[str, tuple[Callable[[CMPQLayer], dict], str]] = {
    "format_version=2": (lambda l: dict(format_version=2), "format_version: this build reads version 1, got 2"),
    "format_version=str": (lambda l: dict(format_version="1"), "format_version: must be an int, got str '1'"),
    "format_version=bool": (lambda l: dict(format_version=True), "format_version: must be an int, got bool"),
    "n=0": (lambda l: dict(n=0), "n, k: must be positive, got n=0, k=96"),
    "n=float": (lambda l: dict(n=37.0), "n: must be an int, got float 37.0"),
    "n=str": (lambda l: dict(n="37"), "n: must be an int, got str"),
    "k=100": (lambda l: dict(k=100), "k: in_features 100 is not a multiple of 32"),
    "k=negative": (lambda l: dict(k=-96), "n, k: must be positive"),
    "bits=1.5": (lambda l: dict(bits=1.5), re.escape("bits: target must be in [2.0, 4.0], got 1.5")),
    "bits=4.5": (lambda l: dict(bits=4.5), re.escape("bits: target must be in [2.0, 4.0], got 4.5")),
    "bits=nan": (lambda l: dict(bits=float("nan")), re.escape("bits: target must be in [2.0, 4.0], got nan")),
    "bits=inf": (lambda l: dict(bits=float("inf")), re.escape("bits: target must be in [2.0, 4.0], got inf")),
    "bits=str": (lambda l: dict(bits="3"), "bits: must be a real number, got str '3'"),
    "bits=none": (lambda l: dict(bits=None), "bits: must be a real number, got NoneType"),
    "bits=bool": (lambda l: dict(bits=True), "bits: must be a real number, got bool"),
    "codebook_rows=0": (lambda l: dict(codebook_rows=0), "codebook_rows: must be >= 1, got 0"),
    "codebook_rows=float": (lambda l: dict(codebook_rows=1.5), "codebook_rows: must be an int, got float 1.5"),
    "seg_k=sum": (lambda l: dict(seg_k=(32, 32, 0)),
                  re.escape("seg_k: need three multiples of 32 summing to k=96, got (32, 32, 0)")),
    "seg_k=granule": (lambda l: dict(seg_k=(16, 48, 32)),
                      re.escape("seg_k: need three multiples of 32 summing to k=96, got (16, 48, 32)")),
    "seg_k=none": (lambda l: dict(seg_k=None), "seg_k: need three multiples of 32 summing to k=96, got None"),
    "seg_k=two": (lambda l: dict(seg_k=(64, 32)),
                  re.escape("seg_k: need three multiples of 32 summing to k=96, got (64, 32)")),
    "seg_k=negative": (lambda l: dict(seg_k=(128, -32, 0)), "seg_k: need three multiples of 32"),
    "seg_k=float": (lambda l: dict(seg_k=(32.0, 32, 32)), "seg_k: need three multiples of 32"),
    "perm=duplicate": (lambda l: dict(perm=_set(l.perm, 0, l.perm[1])),
                       re.escape("perm: is not a permutation of range(96)")),
    "perm=range": (lambda l: dict(perm=_set(l.perm, l.perm.argmax(), K)),
                   re.escape("perm: is not a permutation of range(96)")),
    "perm=dtype": (lambda l: dict(perm=l.perm.long()), "perm: dtype must be torch.int32, got torch.int64"),
    "perm=list": (lambda l: dict(perm=l.perm.tolist()), "perm: expected a torch.Tensor, got list"),
    "perm=2d": (lambda l: dict(perm=l.perm.reshape(1, -1)), re.escape("perm: shape must be (96,)")),
    "perm=strided": (lambda l: dict(perm=torch.stack([l.perm, l.perm], 1)[:, 0]), "perm: must be contiguous"),
    "codes=shape": (lambda l: dict(codes=_item(l.codes, 1, l.codes[1][:, :-1].contiguous())),
                    re.escape("codes[1] (3-bit): shape must be (37, 3), got (37, 2)")),
    "codes=dtype": (lambda l: dict(codes=_item(l.codes, 2, l.codes[2].long())),
                    re.escape("codes[2] (2-bit): dtype must be torch.int32, got torch.int64")),
    "codes=two": (lambda l: dict(codes=l.codes[:2]), r"codes: need one tensor per segment .* got a tuple of 2"),
    "codes=none": (lambda l: dict(codes=None), "codes: need one tensor per segment"),
    "codes=strided": (lambda l: dict(codes=_item(l.codes, 2, torch.cat([l.codes[2]] * 2, 1)[:, ::2])),
                      re.escape("codes[2] (2-bit): must be contiguous")),
    "codes=numpy": (lambda l: dict(codes=_item(l.codes, 0, l.codes[0].numpy())),
                    re.escape("codes[0] (4-bit): expected a torch.Tensor")),
    "codebooks=nan": (lambda l: dict(codebooks=_item(l.codebooks, 0, _set(l.codebooks[0], (3, 5), float("nan")))),
                      re.escape("codebooks[0] (4-bit): contains NaN or Inf")),
    "codebooks=inf": (lambda l: dict(codebooks=_item(l.codebooks, 2, _set(l.codebooks[2], (0, 0), float("inf")))),
                      re.escape("codebooks[2] (2-bit): contains NaN or Inf")),
    "codebooks=-inf": (lambda l: dict(codebooks=_item(l.codebooks, 1, torch.full_like(l.codebooks[1], -float("inf")))),
                       re.escape("codebooks[1] (3-bit): contains NaN or Inf")),
    "codebooks=shape": (lambda l: dict(codebooks=_item(l.codebooks, 1, l.codebooks[1][:-1])),
                        re.escape("codebooks[1] (3-bit): shape must be (37, 8), got (36, 8)")),
    "codebooks=two": (lambda l: dict(codebooks=l.codebooks[1:]), "codebooks: need one tensor per segment"),
    "codebooks=bf16": (lambda l: dict(codebooks=_item(l.codebooks, 0, l.codebooks[0].bfloat16())),
                       re.escape("codebooks[0] (4-bit): dtype must be torch.float16, got torch.bfloat16")),
    "row_ptr=monotone": (lambda l: dict(row_ptr=_set(l.row_ptr, 1, l.nnz)),
                         "row_ptr: must start at 0, be non-decreasing and end at nnz=178"),
    "row_ptr=end": (lambda l: dict(row_ptr=_set(l.row_ptr, -1, l.nnz - 1)), "row_ptr: must start at 0"),
    "row_ptr=start": (lambda l: dict(row_ptr=_set(l.row_ptr, 0, 1)), "row_ptr: must start at 0"),
    "row_ptr=past-end": (lambda l: dict(row_ptr=torch.full_like(l.row_ptr, 2**31 - 1)), "row_ptr: must start at 0"),
    "row_ptr=none": (lambda l: dict(row_ptr=None), "row_ptr: expected a torch.Tensor, got NoneType"),
    "col=high": (lambda l: dict(col=_set(l.col, 0, K)),
                 re.escape("col: outlier columns must be in [0, 96), got [0, 96]")),
    "col=negative": (lambda l: dict(col=_set(l.col, -1, -1)),
                     re.escape("col: outlier columns must be in [0, 96), got [-1, 95]")),
    "col=dtype": (lambda l: dict(col=l.col.int()), "col: dtype must be torch.int16, got torch.int32"),
    "col=unsorted": (lambda l: dict(col=_swap_in_row(l.col, l.row_ptr)), "col: outlier columns must be sorted"),
    "val=inf": (lambda l: dict(val=_set(l.val, 0, float("inf"))), "val: outlier values contain NaN or Inf"),
    "val=nan": (lambda l: dict(val=_set(l.val, -1, float("nan"))), "val: outlier values contain NaN or Inf"),
    "val=length": (lambda l: dict(val=l.val[:-1]), re.escape("val: shape must be (178,), got (177,)")),
    "val=bf16": (lambda l: dict(val=l.val.bfloat16()), "val: dtype must be torch.float16, got torch.bfloat16"),
    "bias=shape": (lambda l: dict(bias=torch.zeros(N + 1)), re.escape("bias: shape must be (37,), got (38,)")),
    "bias=dtype": (lambda l: dict(bias=torch.zeros(N, dtype=torch.int32)),
                   "bias: dtype must be a floating-point type, got torch.int32"),
    "bias=nan": (lambda l: dict(bias=torch.full((N,), float("nan"))), "bias: contains NaN or Inf"),
    "bias=numpy": (lambda l: dict(bias=np.zeros(N, np.float32)), "bias: expected a torch.Tensor or None, got ndarray"),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_validate_and_the_module_name_the_bad_field(layer, name):
    change, message = CORRUPTIONS[name]
    corrupted = dataclasses.replace(layer, **change(layer))
    with pytest.raises(ValueError, match="^" + message):
        corrupted.validate()
    with pytest.raises(ValueError, match="^" + message):
        CMPQLinear(corrupted)


def test_validate_accepts_and_returns_the_good_layer(layer):
    assert layer.validate() is layer
