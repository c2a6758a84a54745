"""The MixLLM CUDA kernels (csrc/cuda/mixllm_gemm.cu) against the exact-integer reference (mixllm_reference.py).

* ``emu-<schedule>``: the exact kernel sources on the CPU under the SIMT emulation (``torch.ops.cmpq_emu.mixllm_*``,
  the same dispatch as the CUDA ops: csrc/mixllm_gpu_ops.h), in every fiber schedule of csrc/emu/emu.h with the
  shared-memory hazard checker on. The emulated op fills its outputs and workspaces with NaN (codes with -128)
  before the launches, so an element a kernel forgets to write fails the comparison.
* ``cuda``: ``torch.ops.cmpq.mixllm_*`` on a real GPU (skipped without one); the caching allocator is filled with
  NaN first.

Tolerance (docs/DESIGN.md §9.6): the group sums are exact int32, converted exactly (magic number), and the FP32
part sums the G groups in order with one fused multiply-add each, so outputs match the reference within the CPU
kernels' bound ``(G + 2) 2^-23 sum_g |term|`` (test_mixllm_gemm.fp32_bound), plus one rounding to x's dtype.
Shapes stay small: every CUDA thread is a fiber.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess

import pytest
import torch

import cmpq_kernels
from cmpq_kernels import mixllm_reference as ref
from cmpq_kernels.mixllm_format import MixLLMLayer, groups_of
from cmpq_kernels.quantize.mixllm import quantize_mixllm_weight

from conftest import make_mixllm_layer, needs_emu
from emu_build import CSRC, compile_emu
from test_mixllm_gemm import BAD_OP_INPUTS, activation_cases, fp32_bound

SCHEDULES = ("forward", "reverse", "random", "warp-forward", "warp-reverse", "warp-random")
HAS_CUDA = torch.cuda.is_available() and cmpq_kernels.backends()["cuda"]
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU / CUDA build"))
UNIT = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.fixture(params=[*(pytest.param(f"emu-{s}", marks=needs_emu) for s in SCHEDULES), CUDA])
def backend(request):
    """"cuda" or "emu"; an emu-<schedule> parameter sets the schedule and checks hazards (off after)."""
    if request.param == "cuda":
        yield "cuda"
        return
    torch.ops.cmpq_emu.set_schedule(request.param.removeprefix("emu-"), 7)
    torch.ops.cmpq_emu.set_hazard_check(True)
    yield "emu"
    torch.ops.cmpq_emu.set_hazard_check(False)


def gemm(backend: str, x: torch.Tensor, layer: MixLLMLayer, bias=None, act_bits: int = 8) -> torch.Tensor:
    """mixllm_gemm on the backend; inputs and result on the CPU."""
    fields = tuple(layer.fields().values())
    if backend == "cuda":
        torch.full((1 << 24,), float("nan"), device="cuda")  # freed at once: the output lands on NaN
        fields = tuple(f.cuda() for f in fields)
        bias = None if bias is None else bias.cuda()
        return torch.ops.cmpq.mixllm_gemm(x.cuda(), *fields, bias, act_bits, layer.format_version).cpu()
    return torch.ops.cmpq_emu.mixllm_gemm(x, *fields, bias, act_bits, layer.format_version)


def quantize_activations(backend: str, x: torch.Tensor):
    if backend == "cuda":
        return tuple(t.cpu() for t in torch.ops.cmpq.mixllm_quantize_activations(x.cuda()))
    return torch.ops.cmpq_emu.mixllm_quantize_activations(x)


def assert_matches(y: torch.Tensor, x: torch.Tensor, layer: MixLLMLayer, bias=None, act_bits: int = 8) -> None:
    """y within the FP32 bound of the exact reference, plus one rounding to x.dtype; every element finite."""
    assert y.dtype == x.dtype and y.shape == (x.shape[0], layer.n)
    assert bool(torch.isfinite(y).all()), "output has NaN/Inf (an unwritten, NaN-poisoned element?)"
    xf = x.float()
    expected = ref.linear(xf, layer, bias=bias, act_bits=act_bits)
    g = layer.groups if act_bits == 8 else layer.k
    bound = (g + 2) * 2.0**-23 * ref.term_magnitude(xf, layer, bias=bias, act_bits=act_bits) + 1e-30
    bound = bound + UNIT[x.dtype] * (expected.double().abs() + bound)
    err = (y.double() - expected.double()).abs()
    bad = err > bound
    assert not bool(bad.any()), f"{int(bad.sum())} of {bad.numel()} elements out of bound, first at " \
                                f"{bad.nonzero()[0].tolist()}: error {float(err[bad][0]):.3g}"


# (n, k, n8, m): K = 576 (a 64-wide last group) and 32 (one partial group), n = 1, 7, 33, 70 (two 64-row blocks
# in total, one of them partial), no 4-bit rows, no 8-bit rows, m from decode (1) to two token blocks (40).
CASES = [(33, 576, 9, 1), (33, 576, 9, 40), (7, 32, 0, 3), (7, 32, 7, 17), (1, 576, 0, 3), (1, 32, 1, 1),
         (70, 160, 40, 17)]


@pytest.mark.parametrize("n,k,n8,m", CASES, ids=lambda v: str(v))
def test_random_layers_match_reference(n, k, n8, m, backend):
    layer = make_mixllm_layer(n, k, n8, bias=torch.float32, seed=n + k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    assert_matches(gemm(backend, x, layer, bias=layer.bias), x, layer, bias=layer.bias)


@pytest.fixture(scope="module")
def quantized_layer() -> MixLLMLayer:
    """A layer from the MixLLM quantizer itself: random weights and calibration inputs, a quarter of the rows 8-bit."""
    gen = torch.Generator().manual_seed(11)
    n, k = 40, 576
    weight = torch.randn(n, k, generator=gen) * 0.05
    calib = torch.randn(256, k, generator=gen) * (1 + 3 * torch.rand(k, generator=gen))
    eight_bit = torch.zeros(n, dtype=torch.bool)
    eight_bit[torch.randperm(n, generator=gen)[: n // 4]] = True
    return quantize_mixllm_weight(weight, calib.T @ calib / calib.shape[0], eight_bit, bias=torch.randn(n, generator=gen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_quantized_layer_matches_reference(quantized_layer, dtype, backend):
    layer = quantized_layer
    for m in (1, 17):
        x = torch.randn(m, layer.k, generator=torch.Generator().manual_seed(m)).to(dtype)
        bias = layer.bias.to(dtype)
        assert_matches(gemm(backend, x, layer, bias=bias), x, layer, bias=bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_activation_quantizer_is_bit_identical_to_the_cpu_op(dtype, backend):
    """Scales from subnormal fp16 to overflow, NaN and -inf groups, an exact scale and a rounding tie."""
    x = activation_cases().to(dtype)
    q, s = quantize_activations(backend, x)
    q_cpu, s_cpu = torch.ops.cmpq.mixllm_quantize_activations(x)
    assert torch.equal(q, q_cpu)
    assert torch.equal(s.view(torch.int16), s_cpu.view(torch.int16))  # NaN scales included
    q_ref, s_ref = ref.quantize_activations(x)
    assert torch.equal(q, q_ref) and torch.equal(s.view(torch.int16), s_ref.view(torch.int16))


def test_nan_and_inf_stay_in_their_rows(backend):
    layer = make_mixllm_layer(33, 576, 9, seed=4)
    x = torch.randn(17, 576, generator=torch.Generator().manual_seed(4))
    x[5, 300] = float("nan")
    x[9, 3] = float("inf")
    y = gemm(backend, x, layer)
    assert torch.isnan(y).any(dim=1).nonzero().flatten().tolist() == [5, 9]
    assert bool(torch.isnan(y[[5, 9]]).all())
    assert torch.equal(torch.isnan(y), torch.isnan(torch.ops.cmpq.mixllm_gemm(x, *layer.fields().values(), None, 8, 1)))


@needs_emu
@pytest.mark.parametrize("n,k,n8", [(9, 576, 4), (24, 256, 0)], ids=lambda v: str(v))
def test_power_of_two_scales_are_bit_exact(n, k, n8):
    """With power-of-two scales every product and sum is exact: the integer path and the magic-number conversion
    must reproduce the reference bit for bit (an off-by-one group sum cannot hide in a tolerance)."""
    torch.ops.cmpq_emu.set_schedule("random", 3)
    layer = make_mixllm_layer(n, k, n8, seed=7)
    layer = dataclasses.replace(layer, s8=torch.full_like(layer.s8, 2.0**-8), s4=torch.full_like(layer.s4, 2.0**-5))
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(8)).clamp(-1, 1) * (127 * 2.0**-6)
    x[:, ::32] = 127 * 2.0**-6  # every group's absmax: scale_x = 2^-6 exactly
    assert torch.equal(gemm("emu", x, layer), ref.linear(x, layer))


@needs_emu
def test_schedules_give_identical_bits():
    """Each output element is summed by one lane in a fixed order whatever the fiber order."""
    layer = make_mixllm_layer(70, 160, 40, bias=torch.float32, seed=5)
    x = torch.randn(17, 160, generator=torch.Generator().manual_seed(5)).half()
    outputs = []
    for schedule in SCHEDULES:
        torch.ops.cmpq_emu.set_schedule(schedule, 1)
        outputs.append(gemm("emu", x, layer, bias=layer.bias))
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dequantize_and_weight_only_mode(dtype, backend):
    layer = make_mixllm_layer(33, 576, 9, bias=torch.float32, seed=6)
    fields = tuple(layer.fields().values())
    if backend == "cuda":
        w = torch.ops.cmpq.mixllm_dequantize(*(f.cuda() for f in fields), 1, dtype).cpu()
    else:
        w = torch.ops.cmpq_emu.mixllm_dequantize(*fields, 1, dtype)
    assert torch.equal(w, ref.dequantize(layer).to(dtype))  # exact in FP32, rounded once
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(6)).to(dtype)
    assert_matches(gemm(backend, x, layer, bias=layer.bias, act_bits=16), x, layer, bias=layer.bias, act_bits=16)


@needs_emu
def test_misaligned_weight_views_are_handled():
    """q8/q4 viewed at an odd byte offset (the kernels' vector loads need alignment): same result."""
    torch.ops.cmpq_emu.set_schedule("forward", 0)
    layer = make_mixllm_layer(20, 160, 8, seed=8)
    shifted = dataclasses.replace(layer, q8=torch.cat([torch.zeros(1, dtype=torch.int8), layer.q8.flatten()])[1:]
                                  .view_as(layer.q8), q4=torch.cat([torch.zeros(1, dtype=torch.uint8),
                                                                    layer.q4.flatten()])[1:].view_as(layer.q4))
    assert shifted.q8.data_ptr() % 2 == 1 and shifted.q4.data_ptr() % 2 == 1
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(8))
    assert torch.equal(gemm("emu", x, shifted), gemm("emu", x, layer))


@needs_emu
@pytest.mark.parametrize("case", BAD_OP_INPUTS)
def test_bad_inputs_raise_like_the_cpu_op(case):
    layer = make_mixllm_layer(12, 576, 2, seed=1)
    build, error, _ = BAD_OP_INPUTS[case]
    args = build(layer, torch.randn(2, 576))
    with pytest.raises(error) as cpu:
        torch.ops.cmpq.mixllm_gemm(*args)
    with pytest.raises(error) as emu:
        torch.ops.cmpq_emu.mixllm_gemm(*args)
    assert str(emu.value).splitlines()[0] == str(cpu.value).splitlines()[0]


@needs_emu
def test_bad_quantizer_and_dequantizer_inputs_raise_like_the_cpu_op():
    layer = make_mixllm_layer(12, 256, 2, seed=1)
    fields = tuple(layer.fields().values())
    cases = [(torch.ops.cmpq.mixllm_quantize_activations, torch.ops.cmpq_emu.mixllm_quantize_activations,
              (torch.randn(2, 40),), ValueError),
             (torch.ops.cmpq.mixllm_quantize_activations, torch.ops.cmpq_emu.mixllm_quantize_activations,
              (torch.randn(2, 64).long(),), TypeError),
             (torch.ops.cmpq.mixllm_dequantize, torch.ops.cmpq_emu.mixllm_dequantize, (*fields, 3, torch.float32),
              ValueError),
             (torch.ops.cmpq.mixllm_dequantize, torch.ops.cmpq_emu.mixllm_dequantize,
              (*fields[:2], -fields[2] - 1, *fields[3:], 1, torch.float32), ValueError)]
    for cpu_op, emu_op, args, error in cases:
        with pytest.raises(error) as cpu:
            cpu_op(*args)
        with pytest.raises(error) as emu:
            emu_op(*args)
        assert str(emu.value).splitlines()[0] == str(cpu.value).splitlines()[0]


# ---- real GPU only (skipped without one): a large layer, CUDA graph capture ---------------------------------------

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU / CUDA build")


@cuda_only
@pytest.mark.parametrize("m", [1, 16, 300])
def test_cuda_large_layer(m):
    layer = make_mixllm_layer(4096, 4096, 410, bias=torch.float32, seed=m)
    x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(m)).half()
    assert_matches(gemm("cuda", x, layer, bias=layer.bias), x, layer, bias=layer.bias)


@cuda_only
def test_cuda_graph_capture_replays_the_op():
    """The CUDA op makes no host synchronisation (no per-call value checks): it captures and replays."""
    layer = make_mixllm_layer(300, 576, 40, seed=3)
    fields = tuple(f.cuda() for f in layer.fields().values())
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(3)).half().cuda()
    torch.ops.cmpq.mixllm_gemm(x, *fields, None, 8, 1)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.cmpq.mixllm_gemm(x, *fields, None, 8, 1)
    x.copy_(torch.randn(4, 576, generator=torch.Generator().manual_seed(9)).half().cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.ops.cmpq.mixllm_gemm(x, *fields, None, 8, 1))


# ---- mutants: the comparison above must reject a kernel with a plausible bug ---------------------------------------

# A torch-free driver of the two W*A8 launches: reads a layer and x (float32 bits) as text, prints y's bits.
HARNESS = r"""
#include "cuda/mixllm_gemm.cu"
#include <cstdio>
#include <vector>
int main() {
  int n, k, n8, m;
  if (std::scanf("%d %d %d %d", &n, &k, &n8, &m) != 4) return 2;
  const int n4 = n - n8, groups = static_cast<int>(cmpq::mixllm::groups_of(k));
  auto read = [](auto& v, long count) { v.resize(count); for (auto& e : v) { long long t; std::scanf("%lld", &t); e = t; } };
  std::vector<int32_t> idx8, idx4; std::vector<int8_t> q8; std::vector<uint8_t> q4, z4;
  std::vector<uint16_t> s8, s4; std::vector<uint32_t> x;
  read(idx8, n8); read(q8, 1L * n8 * k); read(s8, 1L * n8 * groups);
  read(idx4, n4); read(q4, 1L * n4 * k / 2); read(s4, 1L * n4 * groups); read(z4, 1L * n4 * ((groups + 1) / 2));
  read(x, 1L * m * k);
  cmpq::mixllm::View view;
  view.n = n, view.k = k, view.n8 = n8, view.groups = groups;
  view.idx8 = idx8.data(), view.q8 = q8.data(), view.s8 = s8.data();
  view.idx4 = idx4.data(), view.q4 = q4.data(), view.s4 = s4.data(), view.z4 = z4.data();
  std::vector<int8_t> q(1L * m * k); std::vector<uint16_t> scale(1L * m * groups); std::vector<uint32_t> y(1L * m * n, 0x7fc00000u);
  using cmpq::cuda::ActDtype; using cmpq::cuda::Status;
  if (cmpq::cuda::launch_mixllm_quantize(x.data(), m, k, ActDtype::kFloat, q.data(), scale.data(), nullptr) != Status::kOk ||
      cmpq::cuda::launch_mixllm_gemm(view, q.data(), scale.data(), nullptr, y.data(), m, ActDtype::kFloat, nullptr) != Status::kOk)
    return 3;
  for (uint32_t v : y) std::printf("%u\n", v);
  return 0;
}
"""

# name -> (original text in mixllm_gemm.cu, replacement)
MUTANTS = {
    # the zero point is never subtracted: 4-bit rows multiply q instead of q - z
    "no_zero_subtraction": ("+ bias4) ^ 0x80808080u", ")"),
    # B's two registers swapped against A's: a wrong fragment map (8-bit and 4-bit rows alike)
    "swapped_b_fragment": ("const uint32_t b[2] = {xb.x, xb.y};", "const uint32_t b[2] = {xb.y, xb.x};"),
}


@pytest.fixture(scope="module")
def emu_objects(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("mixllm_emu")
    objects = [str(out / f"{name}.o") for name in ("emu", "hazards")]
    for name, obj in zip(("emu", "hazards"), objects):
        compile_emu(["-O0", "-c", str(CSRC / "emu" / f"{name}.cpp"), "-o", obj])  # tiny runs: compile fast
    return objects


def run_harness(tmp_path, objects, layer: MixLLMLayer, x: torch.Tensor, mutant: str | None) -> torch.Tensor:
    """y float32 [m, n] from the harness built against csrc with the mutation applied (None: unmutated)."""
    source = (CSRC / "cuda" / "mixllm_gemm.cu").read_text()
    if mutant is not None:
        original, replacement = MUTANTS[mutant]
        assert original in source, f"mutant {mutant}: {original!r} is gone from mixllm_gemm.cu"
        source = source.replace(original, replacement)
    kernel = tmp_path / "mixllm_gemm.cu"
    kernel.write_text(source)
    driver = tmp_path / "harness.cpp"
    driver.write_text(HARNESS.replace('"cuda/mixllm_gemm.cu"', f'"{kernel}"'))
    exe = tmp_path / "harness"
    compile_emu(["-O0", f"-I{CSRC / 'cuda'}", str(driver), *objects, "-pthread", "-o", str(exe)])
    f = layer.fields()
    numbers = [layer.n, layer.k, layer.n8, x.shape[0]]
    for name in ("idx8", "q8", "s8", "idx4", "q4", "s4", "z4"):
        t = f[name]
        numbers += (t.view(torch.int16).to(torch.int32) & 0xFFFF if t.dtype == torch.float16 else t).flatten().tolist()
    numbers += (x.float().view(torch.int32).long() & 0xFFFFFFFF).flatten().tolist()
    proc = subprocess.run([str(exe)], input=" ".join(map(str, numbers)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    bits = torch.tensor([int(v) for v in proc.stdout.split()], dtype=torch.int64)
    return bits.to(torch.int32).view(torch.float32).reshape(x.shape[0], layer.n)


def out_of_bound_columns(y: torch.Tensor, x: torch.Tensor, layer: MixLLMLayer) -> set[int]:
    try:
        assert_matches(y, x, layer)
    except AssertionError as err:
        assert re.search(r"out of bound|NaN/Inf", str(err))
        expected = ref.linear(x, layer)
        bad = ~((y - expected).abs() <= fp32_bound(x, layer))
        return set(bad.any(dim=0).nonzero().flatten().tolist())
    return set()


def test_mutants_fail_the_comparison(emu_objects, tmp_path):
    layer = make_mixllm_layer(33, 160, 9, seed=12)
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(12))
    rows8, rows4 = set(layer.idx8.tolist()), set(layer.idx4.tolist())
    (tmp_path / "control").mkdir()
    assert out_of_bound_columns(run_harness(tmp_path / "control", emu_objects, layer, x, None), x, layer) == set()
    (tmp_path / "zero").mkdir()
    # only the 4-bit rows depend on the zero points
    assert out_of_bound_columns(run_harness(tmp_path / "zero", emu_objects, layer, x, "no_zero_subtraction"), x,
                                layer) == rows4
    (tmp_path / "swap").mkdir()
    assert out_of_bound_columns(run_harness(tmp_path / "swap", emu_objects, layer, x, "swapped_b_fragment"), x,
                                layer) == rows8 | rows4
    assert groups_of(160) == 2  # a full and a partial group: both took the mutated code
