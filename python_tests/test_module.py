"""CMPQLinear: quantizing an nn.Linear, state_dict, dtype casts, torch.compile, batch dims."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from cmpq_kernels import CMPQLinear, quantize_linear, reference
from conftest import TOLERANCES, assert_matches_reference, make_layer, norm_rel_error, random_x

K, N = 256, 100


def make_linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(K, N)


@pytest.fixture(scope="module")
def modules() -> dict[float, CMPQLinear]:
    """The same nn.Linear quantized at 2.5 and 4 bits (quantizing is the slow part, so once per module)."""
    linear = make_linear()
    return {bits: quantize_linear(linear, bits=bits) for bits in (2.5, 4.0)}


@pytest.mark.parametrize("bits", [2.5, 4.0])
def test_quantize_linear_matches_reference(modules, bits):
    module = modules[bits]
    assert (module.in_features, module.out_features, module.bits) == (K, N, bits)
    assert module.layer.code_bits == pytest.approx(bits, abs=32 / K)
    x = random_x(7, K)
    assert_matches_reference(module(x), x, module.layer)


def test_more_bits_approximate_the_linear_better(modules):
    linear, x = make_linear(), random_x(32, K)
    with torch.no_grad():
        exact = linear(x)
    errors = {bits: norm_rel_error(module(x), exact) for bits, module in modules.items()}
    assert errors[4.0] < errors[2.5] < 0.5, errors


def test_quantize_linear_keeps_bias_and_rejects_other_modules():
    linear = make_linear()
    assert torch.equal(quantize_linear(linear).bias, linear.bias.detach())
    assert quantize_linear(nn.Linear(K, N, bias=False)).bias is None
    with pytest.raises(TypeError, match="expected nn.Linear"):
        quantize_linear(nn.Conv1d(K, N, 1))


def test_state_dict_round_trip(modules):
    """Loading into a module built from a *different* layer of the same shapes reproduces the outputs."""
    source = modules[2.5]
    target = quantize_linear(make_linear(seed=1), bits=2.5)
    x = random_x(5, K)
    assert not torch.equal(target(x), source(x))
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer))
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16)], ids=["half", "bf16"])
def test_dtype_casts_leave_packed_tensors_bit_identical(cast):
    layer = make_layer(N, K, outlier_density=0.02, bias=torch.float32, seed=5)
    module = CMPQLinear(layer)
    before = {name: t.clone() for name, t in module.state_dict().items() if name != "bias"}
    cast(module)
    after = module.state_dict()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    for ours, theirs in zip(module.layer.codebooks, layer.codebooks):  # fp16 views, bit for bit
        assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
    module.layer.validate()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cast_module_runs_reduced_precision_input(dtype):
    layer = make_layer(N, K, outlier_density=0.02, bias=torch.float32, seed=5)
    module = CMPQLinear(layer).to(dtype)
    assert module.bias.dtype == dtype  # the bias follows the module dtype
    for m in (3, 20):  # direct and BLAS paths
        x = random_x(m, K, dtype)
        y = module(x)
        assert y.dtype == dtype
        assert_matches_reference(y, x, module.layer)
        assert norm_rel_error(y, reference.linear(x.double(), layer)) <= TOLERANCES[dtype][0]


def test_leading_batch_dims(modules):
    module = modules[4.0]
    x = random_x(6, K).reshape(2, 3, K)
    y = module(x)
    assert y.shape == (2, 3, N)
    assert torch.equal(y, module(x.reshape(6, K)).reshape(2, 3, N))
    assert_matches_reference(y, x, module.layer)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch internals
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_torch_compile_matches_eager(modules, backend):
    """fullgraph + dynamic: the fake impls must describe the op for symbolic batch sizes."""
    module = modules[2.5]
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=backend, fullgraph=True, dynamic=True)
    for shape in [(2, 3, K), (5, K), (40, K)]:
        x = random_x(40, K)[: shape[0] * (shape[1] if len(shape) == 3 else 1)].reshape(shape)
        try:
            y = compiled(x)
        except (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError) as error:
            if backend == "inductor":
                pytest.skip(f"inductor toolchain unavailable: {type(error).__name__}")
            raise
        assert torch.equal(y, module(x))


def test_quantize_linear_with_calibration_inputs_beats_the_standin():
    """Activations with a few loud channels: the calibrated quantizer must weight them and do better on them."""
    linear = make_linear(1)
    gen = torch.Generator().manual_seed(2)
    scale = torch.ones(K)
    scale[torch.randperm(K, generator=gen)[:16]] = 8.0
    x = torch.randn(1024, K, generator=gen) * scale
    with torch.no_grad():
        ref = linear(x)
        standin = quantize_linear(linear, bits=2.5)
        calibrated = quantize_linear(linear, bits=2.5, inputs=x[:512])
        err = {name: float((m(x[512:]) - ref[512:]).norm() / ref[512:].norm())
               for name, m in (("standin", standin), ("calibrated", calibrated))}
    assert err["calibrated"] < 0.8 * err["standin"], err
    assert calibrated.layer.code_bits == pytest.approx(2.5, abs=0.07)
    assert calibrated.bias is not None and torch.equal(calibrated.bias, linear.bias.detach())


def test_quantize_linear_passes_options_and_rejects_bad_inputs():
    linear = make_linear(3)
    x = torch.randn(256, K, generator=torch.Generator().manual_seed(4))
    assert quantize_linear(linear, 3.0, x, codebook_rows=2, error_feedback=False).codebook_rows == 2
    with pytest.raises(ValueError, match="inputs"):
        quantize_linear(linear, 3.0, torch.randn(10, K + 1))
    with pytest.raises(ValueError, match="NaN"):
        quantize_linear(linear, 3.0, torch.full((10, K), float("nan")))
    with pytest.raises(TypeError, match="inputs="):
        quantize_linear(linear, 3.0, codebook_rows=2)


def test_forward_follows_replaced_buffers():
    """forward caches its op arguments while the buffers are the same objects; replacing them (assignment,
    load_state_dict(assign=True), .to()) must be seen on the next call."""
    first, second = (CMPQLinear(make_layer(N, K, outlier_density=0.01, seed=s)) for s in (1, 2))
    x = random_x(3, K)
    assert torch.equal(first(x), torch.ops.cmpq.gemm(x, *first._fields(), first.bias, first.codebook_rows,
                                                     first.format_version))
    first.load_state_dict(second.state_dict(), assign=True)
    assert torch.equal(first(x), second(x))
    first.codebook3 = torch.zeros_like(first.codebook3)  # plain assignment of a buffer
    assert norm_rel_error(first(x), reference.linear(x, first.layer)) < 1e-5
    before = first(x)
    first.codebook3.copy_(second.codebook3)  # in place: the cached view sees it
    assert not torch.equal(first(x), before) and torch.equal(first(x), second(x))
