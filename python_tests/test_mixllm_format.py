"""MixLLM format (validation, packing, effective bits) and its pure-torch reference arithmetic."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_mixllm_layer
from cmpq_kernels import mixllm_reference as ref
from cmpq_kernels.mixllm_format import (GROUP, MixLLMLayer, check_in_features, group_sizes, groups_of, pack_nibbles,
                                        unpack_nibbles)


def test_groups_end_with_a_partial_group():
    assert group_sizes(576) == [128, 128, 128, 128, 64]
    assert group_sizes(256) == [128, 128] and groups_of(32) == 1
    for bad in (0, -32, 48, 100):
        with pytest.raises(ValueError, match="multiple of 32"):
            check_in_features(bad)


def test_nibbles_low_nibble_is_the_even_element():
    assert pack_nibbles([[1, 2, 3]]).tolist() == [[0x21, 0x03]]
    values = torch.randint(0, 16, (5, 37), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_nibbles(pack_nibbles(values), 37), values.to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_nibbles([[16]])


def test_from_codes_round_trips_the_parts():
    layer = make_mixllm_layer(9, 576, n8=3, seed=1)
    assert (layer.n, layer.k, layer.n8, layer.groups) == (9, 576, 3, 5)
    assert layer.q4.shape == (6, 288) and layer.z4.shape == (6, 3)
    assert bool((layer.z4[:, -1] >> 4 == 0).all())  # odd G: the spare nibble stays 0
    assert layer.codes4().shape == (6, 576) and int(layer.codes4().max()) <= 15


def test_effective_bits_count_every_stored_buffer():
    n, k, n8 = 10, 576, 1
    layer = make_mixllm_layer(n, k, n8=n8)
    g = groups_of(k)
    expected = (8 * n8 * k + 4 * (n - n8) * k + 16 * n * g + 8 * (n - n8) * -(-g // 2) + 32 * n) / (n * k)
    assert layer.effective_bits == pytest.approx(expected)
    assert layer.storage_bits()["zeros"] == 8 * (n - n8) * 3
    assert layer.code_bits == pytest.approx(4.4)


def _replace(layer, **changes):
    return dataclasses.replace(layer, **changes)


BAD_LAYERS = {
    "idx8 dtype": (lambda l: _replace(l, idx8=l.idx8.long()), "idx8: dtype"),
    "duplicate row": (lambda l: _replace(l, idx4=torch.cat([l.idx4[:-1], l.idx8[:1]])), "exactly once"),
    "row out of range": (lambda l: _replace(l, idx8=l.idx8 + 100), "exactly once"),
    "row count": (lambda l: _replace(l, n=l.n + 1), "hold"),
    "q8 shape": (lambda l: _replace(l, q8=l.q8[:, :-32].contiguous()), "q8: shape"),
    "q8 -128": (lambda l: _replace(l, q8=torch.full_like(l.q8, -128)), "-128"),
    "q4 dtype": (lambda l: _replace(l, q4=l.q4.to(torch.int8)), "q4: dtype"),
    "s8 NaN": (lambda l: _replace(l, s8=torch.full_like(l.s8, float("nan"))), "s8: scales"),
    "s4 negative": (lambda l: _replace(l, s4=-l.s4.abs() - 1), "s4: scales"),
    "z4 shape": (lambda l: _replace(l, z4=l.z4[:, :1].contiguous()), "z4: shape"),
    "z4 spare nibble": (lambda l: _replace(l, z4=l.z4 | 0xF0), "z4: the unused"),
    "non-contiguous q8": (lambda l: _replace(l, q8=l.q8.t().contiguous().t()), "q8: must be contiguous"),
    "k not aligned": (lambda l: _replace(l, k=100), "k: in_features 100"),
    "bias NaN": (lambda l: _replace(l, bias=torch.full((l.n,), float("nan"))), "bias: contains"),
    "version": (lambda l: _replace(l, format_version=2), "format_version"),
    "n type": (lambda l: _replace(l, n=float(l.n)), "n: must be an int"),
    "tensor type": (lambda l: _replace(l, s4=l.s4.tolist()), "s4: expected a torch.Tensor"),
}


@pytest.mark.parametrize("case", BAD_LAYERS)
def test_validate_names_the_bad_field(case):
    layer = make_mixllm_layer(7, 320, n8=2, seed=3)
    mutate, message = BAD_LAYERS[case]
    with pytest.raises(ValueError, match=message):
        mutate(layer).validate()


# ---- the reference arithmetic ----------------------------------------------------------------------------


def test_activation_quantizer_follows_the_rule():
    x = torch.zeros(3, 160)
    x[0, :128] = torch.linspace(-2.0, 2.0, 128)
    x[0, 128:] = 0.5  # partial group: scale from its own 32 values
    x[1, 5] = float("nan")  # poisons group 0 of token 1 only
    q, s = ref.quantize_activations(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (3, 2)
    assert s[0, 0] == torch.tensor(2.0 / 127).half() and s[0, 1] == torch.tensor(0.5 / 127).half()
    expected = torch.round(x[0, :128] / s[0, 0].float()).clamp(-127, 127)
    assert torch.equal(q[0, :128].float(), expected)
    assert int(q[0].abs().max()) == 127 and bool((q[0, 128:] == 127).all())
    assert torch.isnan(s[1, 0]) and not torch.isnan(s[1, 1]) and bool((q[1] == 0).all())
    assert bool((s[2] == 0).all()) and bool((q[2] == 0).all())  # all-zero groups: scale 0, codes 0


def test_activation_rounding_is_half_to_even():
    s = torch.tensor(1.0 / 127).half().float()
    x = torch.zeros(1, 32)
    x[0, 0] = 127 * s  # sets scale_x = s exactly
    x[0, 1], x[0, 2] = 2.5 * s, 3.5 * s
    q, scale = ref.quantize_activations(x)
    assert scale.float()[0, 0] == s
    assert q[0, :3].tolist() == [127, 2, 4]


def test_linear_a8_equals_the_integer_formula():
    layer = make_mixllm_layer(11, 320, n8=4, bias=torch.float32, seed=5)
    x = torch.randn(3, 320, generator=torch.Generator().manual_seed(6))
    q_x, s_x = ref.quantize_activations(x)
    w_codes = torch.zeros(11, 320, dtype=torch.float64)
    w_scale = torch.zeros(11, 320, dtype=torch.float64)
    zeros = layer.zeros().double().repeat_interleave(GROUP, 1)[:, :320]
    w_codes[layer.idx8.long()] = layer.q8.double()
    w_codes[layer.idx4.long()] = layer.codes4().double() - zeros
    w_scale[layer.idx8.long()] = layer.s8.double().repeat_interleave(GROUP, 1)[:, :320]
    w_scale[layer.idx4.long()] = layer.s4.double().repeat_interleave(GROUP, 1)[:, :320]
    for g, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 320)]):
        acc = q_x[:, lo:hi].double() @ w_codes[:, lo:hi].T
        assert torch.equal(ref.group_accumulators(q_x, layer)[:, :, g].double(), acc)
    y64 = sum((q_x[:, lo:hi].double() @ (w_codes * w_scale)[:, lo:hi].T) * s_x[:, g:g + 1].double()
              for g, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 320)])) + layer.bias.double()
    y = ref.linear(x, layer)
    assert torch.allclose(y.double(), y64, rtol=0, atol=1e-6 * float(ref.term_magnitude(x, layer).max()))
    # W*A16 multiplies by the exactly dequantized weights.
    assert torch.allclose(ref.dequantize(layer).double(), w_codes * w_scale, rtol=0, atol=0)
    assert torch.allclose(ref.linear(x, layer, act_bits=16).double(), x.double() @ (w_codes * w_scale).T
                          + layer.bias.double(), rtol=1e-6, atol=1e-6)


def test_nan_activations_poison_only_their_token():
    layer = make_mixllm_layer(5, 256, n8=1)
    x = torch.randn(3, 256)
    x[1, 200] = float("inf")
    y = ref.linear(x, layer)
    assert bool(torch.isnan(y[1]).all()) and bool(torch.isfinite(y[[0, 2]]).all())


def test_reference_rejects_bad_arguments():
    layer = make_mixllm_layer(5, 256, n8=1)
    with pytest.raises(ValueError, match="act_bits"):
        ref.linear(torch.randn(1, 256), layer, act_bits=4)
    with pytest.raises(ValueError, match="in_features=256"):
        ref.linear(torch.randn(1, 128), layer)


def test_layer_moves_and_rebuilds_from_fields():
    layer = make_mixllm_layer(6, 128, n8=6, bias=torch.float16)  # all rows 8-bit: empty 4-bit part
    assert layer.q4.shape == (0, 64) and layer.code_bits == 8
    rebuilt = MixLLMLayer.from_fields(layer.to("cpu").fields(), n=6, k=128, bias=layer.bias).validate()
    assert torch.equal(ref.dequantize(rebuilt), ref.dequantize(layer))
