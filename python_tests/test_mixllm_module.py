"""MixLLMLinear: buffers, dtype moves, forward in both activation modes."""
from __future__ import annotations

import pytest
import torch

from conftest import make_mixllm_layer
from cmpq_kernels import MixLLMLinear, ops
from cmpq_kernels import mixllm_reference as ref


def test_forward_matches_the_op_in_both_modes():
    layer = make_mixllm_layer(24, 576, 3, bias=torch.float32, seed=2)
    module = MixLLMLinear(layer)
    x = torch.randn(2, 5, 576)
    assert torch.equal(module(x), ops.mixllm_gemm(x, layer))
    module.act_bits = 16
    assert torch.equal(module(x), ops.mixllm_gemm(x, layer, act_bits=16))
    assert "rows_8bit=3" in repr(module) and module.layer.effective_bits == layer.effective_bits


def test_dtype_moves_keep_the_packed_scales_exact():
    layer = make_mixllm_layer(16, 256, 2, bias=torch.float32, seed=3)
    module = MixLLMLinear(layer).to(torch.bfloat16)
    assert module.bias.dtype == torch.bfloat16
    assert torch.equal(module.layer.s4, layer.s4) and torch.equal(module.layer.s8, layer.s8)
    x = torch.randn(3, 256).to(torch.bfloat16)
    y = module(x)
    assert y.dtype == torch.bfloat16
    expected = ref.linear(x.float(), layer, bias=module.bias.float())
    assert torch.allclose(y.float(), expected, rtol=2**-7, atol=1e-3)


def test_state_dict_round_trip_and_bad_arguments():
    layer = make_mixllm_layer(16, 256, 2, seed=4)
    module = MixLLMLinear(layer)
    assert set(module.state_dict()) == {"idx8", "q8", "s8", "idx4", "q4", "s4", "z4"}
    other = MixLLMLinear(make_mixllm_layer(16, 256, 2, seed=5))
    other.load_state_dict(module.state_dict())
    x = torch.randn(1, 256)
    assert torch.equal(other(x), module(x))
    with pytest.raises(ValueError, match="act_bits"):
        MixLLMLinear(layer, act_bits=4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        module([1.0] * 256)
