"""The MixLLM CPU ops (torch.ops.cmpq.mixllm_*) against the pure-torch reference, on every CPU ISA.

Tolerance (docs/DESIGN.md §9): the integer group sums are exact on every path, so the only differences are FP32
roundings of the per-group products and of their sum over G groups. Per element the kernels must satisfy
``|y - ref| <= (G + 2) * 2^-23 * sum_g |float(acc_g) * s_w * s_x| (+ |bias|)`` (the standard bound of a G-term FP32
sum, doubled for a fused multiply-add), about 1e-6 of that magnitude at these sizes. An integer sum off by one
breaks it (tested by mutating the packed nibbles), and with power-of-two scales every product and sum is exact,
so there the outputs must be bit-identical to the reference.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_mixllm_layer, with_threads
from cmpq_kernels import mixllm_reference as ref
from cmpq_kernels import ops
from cmpq_kernels.mixllm_format import groups_of, pack_nibbles, unpack_nibbles

SHAPES = [(37, 576, 5), (1, 32, 0), (16, 256, 16), (33, 160, 1), (64, 1024, 7)]


def fp32_bound(x, layer, act_bits=8):
    g = layer.groups if act_bits == 8 else layer.k
    return (g + 2) * 2.0**-23 * ref.term_magnitude(x, layer, act_bits=act_bits) + 1e-30


def run_poisoned(x, layer, **kwargs):
    """The op's output after memory of the same size was filled with NaN and freed, so an output element the op
    forgets to write is likely NaN (the op allocates its own output)."""
    poison = torch.full((x.shape[0], layer.n), float("nan"))
    del poison
    return ops.mixllm_gemm(x, layer, **kwargs)


def test_python_packed_nibbles_unpack_in_cpp():
    values = torch.randint(0, 16, (7, 41), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_nibbles(values)
    assert torch.equal(torch.ops.cmpq.mixllm_unpack_nibbles(packed, 41), values)
    swapped = (packed >> 4) | (packed << 4)  # the other nibble order must not agree
    assert not torch.equal(torch.ops.cmpq.mixllm_unpack_nibbles(swapped, 41), values)
    assert torch.equal(unpack_nibbles(packed, 41), values)


def activation_cases():
    gen = torch.Generator().manual_seed(3)
    k = 576
    x = torch.randn(12, k, generator=gen)
    exponents = torch.randint(-30, 24, (12, groups_of(k)), generator=gen).float()
    x = x * (2.0 ** exponents).repeat_interleave(128, 1)[:, :k]  # scales from subnormal fp16 to overflow
    x[0] = 0.0
    x[1, 3] = float("nan")
    x[2, 600 - 100] = float("-inf")
    x[3, :128] = 127 * 2.0**-6  # exact scale
    x[4, 130] = 2.5 * (1.0 / 127)  # a tie below the group maximum
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_activation_quantizer_matches_reference_bit_for_bit(dtype):
    x = activation_cases().to(dtype)
    q, s = ops.mixllm_quantize_activations(x)
    q_ref, s_ref = ref.quantize_activations(x)
    assert torch.equal(q, q_ref)
    assert torch.equal(s.view(torch.int16), s_ref.view(torch.int16))  # NaN scales too


@pytest.mark.parametrize("n,k,n8", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 3, 16, 64])
def test_gemm_matches_reference(cpu_isa, n, k, n8, m):
    layer = make_mixllm_layer(n, k, n8, bias=torch.float32, seed=n + k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    y = run_poisoned(x, layer)
    expected = ref.linear(x, layer)
    assert y.shape == (m, n) and y.dtype == torch.float32 and bool(torch.isfinite(y).all())
    assert float(expected.abs().min()) > 0  # a layer of zero scales would pass vacuously
    bad = (y - expected).abs() > fp32_bound(x, layer)
    assert not bool(bad.any()), f"{int(bad.sum())} elements off, first {bad.nonzero()[0].tolist()}"


@pytest.mark.parametrize("n,k,n8", [(9, 576, 4), (24, 256, 0), (5, 128, 5)], ids=lambda v: str(v))
def test_power_of_two_scales_are_bit_exact(cpu_isa, n, k, n8):
    layer = make_mixllm_layer(n, k, n8, seed=7)
    layer = dataclasses.replace(layer, s8=torch.full_like(layer.s8, 2.0**-8), s4=torch.full_like(layer.s4, 2.0**-5))
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(8)).clamp(-1, 1) * (127 * 2.0**-6)
    x[:, ::32] = 127 * 2.0**-6  # every group's absmax: scale_x = 2^-6 exactly
    y = ops.mixllm_gemm(x, layer)
    assert torch.equal(y, ref.linear(x, layer))
    q_x, _ = ref.quantize_activations(x)
    row_scale = torch.empty(n)
    row_scale[layer.idx8.long()], row_scale[layer.idx4.long()] = 2.0**-14, 2.0**-11
    assert torch.equal(y, ref.group_accumulators(q_x, layer).sum(2).float() * row_scale)


def test_mutated_nibble_order_fails_the_comparison(cpu_isa):
    layer = make_mixllm_layer(16, 256, 2, seed=9)
    mutated = dataclasses.replace(layer, q4=((layer.q4 >> 4) | (layer.q4 << 4)).contiguous())
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    bad = (ops.mixllm_gemm(x, mutated) - ref.linear(x, layer)).abs() > fp32_bound(x, layer)
    assert bool(bad[:, layer.idx4.long()].all()) and not bool(bad[:, layer.idx8.long()].any())


def test_isas_agree_and_threads_do_not_matter(monkeypatch):
    layer = make_mixllm_layer(70, 576, 9, seed=4)
    x = torch.randn(19, 576, generator=torch.Generator().manual_seed(5))
    outputs = {}
    for isa in torch.ops.cmpq.cpu_isas():
        monkeypatch.setenv("CMPQ_CPU_SIMD", isa)
        one, two = with_threads([1, 2], lambda: ops.mixllm_gemm(x, layer))
        assert torch.equal(one, two), isa
        outputs[isa] = one
    expected = ref.linear(x, layer)
    for isa, y in outputs.items():
        assert bool(((y - expected).abs() <= fp32_bound(x, layer)).all()), isa


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_activations_round_once(dtype):
    layer = make_mixllm_layer(20, 320, 3, bias=torch.float16, seed=2)
    x = torch.randn(4, 320, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = ops.mixllm_gemm(x, layer)
    assert y.dtype == dtype
    unit = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    expected = ref.linear(x.float(), layer)
    assert bool(((y.float() - expected).abs() <= unit * expected.abs() + fp32_bound(x.float(), layer)).all())


def test_nan_activations_poison_only_their_token():
    layer = make_mixllm_layer(8, 256, 2)
    x = torch.randn(3, 256)
    x[1, 7] = float("nan")
    y = ops.mixllm_gemm(x, layer)
    assert bool(torch.isnan(y[1]).all()) and bool(torch.isfinite(y[[0, 2]]).all())


@pytest.mark.parametrize("m", [1, 5, 300])
def test_weight_only_mode_and_dequantize(m):
    layer = make_mixllm_layer(300, 576, 30, bias=torch.float32, seed=6)  # two dequantization blocks
    assert torch.equal(ops.mixllm_dequantize(layer), ref.dequantize(layer))
    assert ops.mixllm_dequantize(layer, torch.float16).dtype == torch.float16
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m))
    y = run_poisoned(x, layer, act_bits=16)
    expected = ref.linear(x, layer, act_bits=16)
    assert bool(((y - expected).abs() <= 1e-5 * ref.term_magnitude(x, layer, act_bits=16)).all())


def test_batched_input_shapes():
    layer = make_mixllm_layer(10, 128, 1)
    x = torch.randn(2, 3, 128)
    y = ops.mixllm_gemm(x, layer)
    assert y.shape == (2, 3, 10) and torch.equal(y.reshape(6, 10), ops.mixllm_gemm(x.reshape(6, 128), layer))
    assert ops.mixllm_gemm(torch.randn(0, 128), layer).shape == (0, 10)


def _op_args(layer, **changes):
    fields = {**layer.fields(), **changes}
    return tuple(fields.values())


BAD_OP_INPUTS = {
    "x int": (lambda l, x: (x.long(), *_op_args(l), None, 8, 1), TypeError, "x must be float32"),
    "x 1-D": (lambda l, x: (x[0], *_op_args(l), None, 8, 1), ValueError, "2-D"),
    "x width": (lambda l, x: (x[:, :128].contiguous(), *_op_args(l), None, 8, 1), ValueError, "features"),
    "x strided": (lambda l, x: (x.t().contiguous().t(), *_op_args(l), None, 8, 1), ValueError, "contiguous"),
    "q8 strided": (lambda l, x: (x, *_op_args(l, q8=l.q8.t().contiguous().t()), None, 8, 1), ValueError, "q8 must be contiguous"),
    "s8 dtype": (lambda l, x: (x, *_op_args(l, s8=l.s8.float()), None, 8, 1), TypeError, "s8 must be"),
    "s4 NaN": (lambda l, x: (x, *_op_args(l, s4=torch.full_like(l.s4, float("nan"))), None, 8, 1), ValueError, "NaN"),
    "s8 negative": (lambda l, x: (x, *_op_args(l, s8=-l.s8 - 1), None, 8, 1), ValueError, "negative"),
    "idx duplicate": (lambda l, x: (x, *_op_args(l, idx8=l.idx4[:2].contiguous()), None, 8, 1), ValueError, "exactly once"),
    "idx out of range": (lambda l, x: (x, *_op_args(l, idx8=l.idx8 + 1000), None, 8, 1), ValueError, "exactly once"),
    "z4 shape": (lambda l, x: (x, *_op_args(l, z4=l.z4[:, :1].contiguous()), None, 8, 1), ValueError, "z4 must be"),
    "q4 width": (lambda l, x: (x, *_op_args(l, q4=l.q4[:, :-16].contiguous()), None, 8, 1), ValueError, "q4 must be"),
    "bias shape": (lambda l, x: (x, *_op_args(l), torch.zeros(3), 8, 1), ValueError, "bias must be"),
    "bias int": (lambda l, x: (x, *_op_args(l), torch.zeros(l.n, dtype=torch.int32), 8, 1), TypeError, "bias must be"),
    "act_bits": (lambda l, x: (x, *_op_args(l), None, 4, 1), ValueError, "act_bits"),
    "version": (lambda l, x: (x, *_op_args(l), None, 8, 2), ValueError, "format_version"),
}


@pytest.mark.parametrize("case", BAD_OP_INPUTS)
def test_bad_op_inputs_raise_python_errors(case):
    layer = make_mixllm_layer(12, 576, 2, seed=1)
    build, error, message = BAD_OP_INPUTS[case]
    with pytest.raises(error, match=message):
        torch.ops.cmpq.mixllm_gemm(*build(layer, torch.randn(2, 576)))


def test_python_wrapper_checks():
    layer = make_mixllm_layer(12, 256, 2)
    with pytest.raises(TypeError, match="MixLLMLayer"):
        ops.mixllm_gemm(torch.randn(1, 256), object())
    with pytest.raises(ValueError, match="is on"):
        ops.mixllm_gemm(torch.randn(1, 256), layer.to("meta"))
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.mixllm_quantize_activations(torch.randn(2, 40))
