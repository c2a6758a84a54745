"""The layer ops' signature as Python sees it: written once in C++ (``CMPQ_LAYER_TENSORS`` and
``CMPQ_LAYER_INTS`` in csrc/torch_view.h) and expanded into every schema."""
import pytest
import torch

import cmpq_kernels  # noqa: F401  (registers torch.ops.cmpq)
from cmpq_kernels.format import LAYER_FIELDS

from conftest import needs_emu


def test_layer_fields_is_the_python_field_order():
    assert tuple(torch.ops.cmpq.layer_fields()) == LAYER_FIELDS


@pytest.mark.parametrize("namespace", ["cmpq", pytest.param("cmpq_emu", marks=needs_emu)])
def test_layer_op_schemas(namespace):
    layer = ", ".join(f"Tensor {name}" for name in torch.ops.cmpq.layer_fields())
    ops = getattr(torch.ops, namespace)
    assert str(ops.gemm.default._schema) == (
        f"{namespace}::gemm(Tensor x, {layer}, Tensor? bias, int codebook_rows, int format_version) -> Tensor")
    assert str(ops.dequantize.default._schema) == (
        f"{namespace}::dequantize({layer}, int codebook_rows, int format_version, ScalarType dtype) -> Tensor")
