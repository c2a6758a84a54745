"""The CUDA kernels (gemv.cu, gemm_tc.cu, dequant.cu) against the reference, on two backends.

* ``emu-<schedule>``: the exact kernel sources on the CPU under the SIMT emulation (``torch.ops.cmpq_emu.*``,
  same schemas and the same GPU dispatch of ``csrc/gpu_ops.h``: m <= 8 GEMV, m <= 128 tensor-core GEMM,
  larger m decode + matmul), in each fiber schedule of ``csrc/emu/emu.h`` — lane-level (a missing barrier
  between threads that meet at the same switch points changes results) and warp-serial (each warp runs
  alone from barrier to barrier, so any missing barrier between warps does) — with the shared-memory hazard
  checker on (a race is an error even where the schedule happens to give the right values). Runs
  everywhere, CI included. Outputs and workspaces are poisoned with NaN inside the emulated op, so an
  element a kernel fails to write shows up as NaN.
* ``cuda``: ``torch.ops.cmpq.*`` on a real GPU (skipped without one). The caching allocator is filled
  with NaN before each call, so the op's fresh output very likely lands on poisoned memory.

Tolerances (on top of conftest's FP32-accumulation + one output rounding bound): the GEMV and the GEMM
multiply exact FP16 codebook values (with bf16 activations scaled into fp16 range by a power of two per
row), so they need nothing more; the decode path (m > 128) rounds decoded weights to the activation type
first — 2**-8 relative for BF16 and 2**-11 for FP16 codebook+outlier sums. The emulation sums in a different order from a GPU, so GPU
results agree with these to the same tolerances, not bit for bit.
"""
from __future__ import annotations

import pytest
import torch

import cmpq_kernels
from cmpq_kernels import reference
from cmpq_kernels.format import CMPQLayer

from conftest import assert_matches_reference, make_layer, needs_emu, random_x

GEMM_MAX_M = 128  # m <= 8 takes the GEMV, 9..128 the GEMM, larger m decode + matmul
SCHEDULES = ("forward", "reverse", "random", "warp-forward", "warp-reverse", "warp-random")
DTYPES = (torch.float16, torch.bfloat16)
SEGMENT_MIXES = [(96, 0, 0), (0, 96, 0), (0, 0, 96), (32, 32, 32), (0, 64, 32), (64, 0, 32), (32, 64, 0)]


HAS_CUDA = torch.cuda.is_available() and cmpq_kernels.backends()["cuda"]
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU / CUDA build"))


def run_emulated(schedule: str, seed: int = 7) -> None:
    """Later emulated launches run in this fiber schedule, with shared-memory hazard checking on."""
    torch.ops.cmpq_emu.set_schedule(schedule, seed)
    torch.ops.cmpq_emu.set_hazard_check(True)


@pytest.fixture(params=[*(pytest.param(f"emu-{s}", marks=needs_emu) for s in SCHEDULES), CUDA])
def backend(request):
    """Yields "cuda" or "emu"; an emu-<schedule> parameter sets the schedule and checks hazards (off after)."""
    if request.param == "cuda":
        yield "cuda"
        return
    run_emulated(request.param.removeprefix("emu-"))
    yield "emu"
    torch.ops.cmpq_emu.set_hazard_check(False)


def poison_cuda_allocator() -> None:
    """Fill free cached blocks with NaN so a kernel that skips an output element is caught on the GPU too."""
    torch.full((1 << 24,), float("nan"), device="cuda")  # freed at once, back in the cache


def emu_gemm(x: torch.Tensor, layer: CMPQLayer, bias=None, backend: str = "emu") -> torch.Tensor:
    """``gemm`` on the chosen backend; inputs and result on the CPU."""
    bias = layer.bias if bias is None else bias
    if backend == "cuda":
        poison_cuda_allocator()
        layer = layer.to("cuda")
        bias = None if bias is None else bias.cuda()
        return torch.ops.cmpq.gemm(x.cuda(), layer.perm, *layer.codes, *layer.codebooks, layer.row_ptr, layer.col,
                                   layer.val, bias, layer.codebook_rows, layer.format_version).cpu()
    return torch.ops.cmpq_emu.gemm(x, layer.perm, *layer.codes, *layer.codebooks, layer.row_ptr, layer.col,
                                   layer.val, bias, layer.codebook_rows, layer.format_version)


def emu_dequantize(layer: CMPQLayer, dtype: torch.dtype, backend: str = "emu", codes=None) -> torch.Tensor:
    """``dequantize`` on the chosen backend (``codes`` in place of the layer's, already there); result on the CPU."""
    on_device = layer.to("cuda") if backend == "cuda" else layer
    op = torch.ops.cmpq.dequantize if backend == "cuda" else torch.ops.cmpq_emu.dequantize
    return op(on_device.perm, *(codes or on_device.codes), *on_device.codebooks, on_device.row_ptr, on_device.col,
              on_device.val, layer.codebook_rows, layer.format_version, dtype).cpu()


def weight_round(m: int, dtype: torch.dtype) -> float:
    """Unit roundoff of the decoded weights on the path that batch size m takes (see module doc)."""
    if m <= GEMM_MAX_M:
        return 0.0
    return 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11


def check(layer: CMPQLayer, m: int, dtype: torch.dtype, seed: int = 0, backend: str = "emu") -> torch.Tensor:
    x = random_x(m, layer.k, dtype, seed)
    y = emu_gemm(x, layer, backend=backend)
    assert_matches_reference(y, x, layer, weight_round=weight_round(m, dtype))
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 16, 17, 33, 64, 100, 128, 129, 150])
def test_every_path_matches_reference(m, dtype, backend):
    layer = make_layer(37, 160, (64, 32, 64), outlier_density=0.02, bias=torch.float16, seed=m)
    check(layer, m, dtype, seed=m, backend=backend)


@pytest.mark.parametrize("seg_k", SEGMENT_MIXES)
@pytest.mark.parametrize("m", [1, 7, 20, 140])
def test_segment_mixes(seg_k, m, backend):
    layer = make_layer(70, sum(seg_k), seg_k, outlier_density=0.01, seed=sum(seg_k) + m)
    check(layer, m, torch.float16, backend=backend)


@pytest.mark.parametrize("n,k", [(1, 32), (3, 64), (65, 32), (130, 1088), (200, 2080)])
@pytest.mark.parametrize("m", [1, 4, 24])
def test_awkward_shapes(n, k, m, backend):
    """n around the 16-row tiles; k spanning whole and partial iterations (512 columns for the GEMV and the
    GEMM at m <= 16, 256 at m <= 32, 128 above)."""
    check(make_layer(n, k, outlier_density=0.005, seed=n + k), m, torch.bfloat16, backend=backend)


LONG_SEGMENTS = (4608, 4128, 4160)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 12, 24, 40, 130])
def test_long_segments(m, dtype, backend):
    """Segments of 8-9 whole iterations of 16 groups (GEMV, GEMM at m <= 16; 8 groups at m <= 32, 4 above)
    plus a partial one, or more: every warp of a block runs several iterations of each segment (its
    pointers step over the other warps' iterations). m = 130 decodes in tiles of 16 rows (the emulated
    build's 16 KiB workspace) and splits K into 6 parts of 68 groups, whose bounds fall inside segments."""
    layer = make_layer(20, sum(LONG_SEGMENTS), LONG_SEGMENTS, outlier_density=0.002, seed=m)
    check(layer, m, dtype, seed=m, backend=backend)


def test_gemv_bf16_rows_beyond_fp16_range(backend):
    """The GEMV multiplies in fp16 and scales each bf16 row by a power of two first: rows far above fp16's
    maximum or below its normal range, a row spanning both, and a zero row all keep their accuracy."""
    layer = make_layer(24, 96, outlier_density=0.02, bias=torch.float32, seed=6)
    x = random_x(5, 96, torch.float32, seed=6)
    x[0] *= 1e7
    x[1] *= 1e-9
    x[2, ::2] *= 1e5
    x[2, 1::2] *= 1e-4
    x[3] = 0
    x = x.to(torch.bfloat16)
    assert_matches_reference(emu_gemm(x, layer, backend=backend), x, layer, weight_round=weight_round(5, x.dtype))


OUTLIER_PATTERNS = {
    "none": lambda n, k: ([], []),
    "first_last_rows": lambda n, k: ([0] * k + [n - 1] * k, list(range(k)) * 2),
    "first_last_cols": lambda n, k: (list(range(n)) * 2, [0] * n + [k - 1] * n),
    "duplicates": lambda n, k: ([1, 1, 1, n - 1, n - 1], [5, 5, 5, k - 1, k - 1]),
}


@pytest.mark.parametrize("pattern", sorted(OUTLIER_PATTERNS))
@pytest.mark.parametrize("m", [1, 8, 20, 130])
def test_outlier_patterns(pattern, m, backend):
    n, k = 45, 96
    layer = make_layer(n, k, outliers=OUTLIER_PATTERNS[pattern](n, k), seed=3)
    check(layer, m, torch.float16, backend=backend)


@pytest.mark.parametrize("m", [1, 20, 130])
def test_dense_outliers_codebook_rows_and_bias(m, backend):
    layer = make_layer(37, 96, outlier_density=0.2, codebook_rows=4, bias=torch.float32, seed=11)
    check(layer, m, torch.float16, backend=backend)
    bias = torch.randn(37, dtype=torch.bfloat16)
    x = random_x(m, 96, torch.bfloat16)
    assert_matches_reference(emu_gemm(x, layer, bias=bias, backend=backend), x, layer, bias=bias,
                             weight_round=weight_round(m, torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [3, 40])
@needs_emu
def test_schedules_give_identical_bits(m, dtype):
    """Each thread sums in a fixed order whatever the fiber order, so results are bit-identical."""
    layer = make_layer(50, 128, outlier_density=0.05, seed=5)
    x = random_x(m, 128, dtype)
    outputs = []
    for schedule in SCHEDULES:
        run_emulated(schedule)
        outputs.append(emu_gemm(x, layer))
    torch.ops.cmpq_emu.set_hazard_check(False)
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])


def test_identity_reproduces_weights(backend):
    """x = I through the tensor-core GEMM (and GEMV slices) gives W.T exactly in fp16 (one product per sum)."""
    layer = make_layer(40, 96, outlier_density=0.05, seed=9)
    eye = torch.eye(96, dtype=torch.float16)
    w_t = reference.dequantize(layer, torch.float64).T.half()
    assert torch.equal(emu_gemm(eye, layer, backend=backend), w_t)
    assert torch.equal(emu_gemm(eye[:8], layer, backend=backend), w_t[:8])


@pytest.mark.parametrize("m", [1, 20, 130])
def test_nan_stays_in_its_row(m, backend):
    layer = make_layer(33, 64, outlier_density=0.02, seed=2)
    x = random_x(m, 64, torch.float16)
    x[m // 2, 17] = float("nan")
    y = emu_gemm(x, layer, backend=backend)
    nan_rows = torch.isnan(y).any(dim=1).nonzero().flatten().tolist()
    assert nan_rows == [m // 2]


@pytest.mark.parametrize("pattern", ["duplicates", "first_last_rows"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_reference(dtype, pattern, backend):
    layer = make_layer(37, 160, outliers=OUTLIER_PATTERNS[pattern](37, 160), codebook_rows=3, seed=4)
    # codebook value + residual is exact in FP32 and rounded once to dtype
    assert torch.equal(emu_dequantize(layer, dtype, backend), reference.dequantize(layer, torch.float64).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_across_k_parts(dtype, backend):
    """The decode splits K into parts when a tile has few rows: outliers (repeated ones too) on both sides of
    every part boundary and at the ends are written once, by the part that decoded their column."""
    n, k = 20, sum(LONG_SEGMENTS)
    part = 68 * 32  # columns per part for this shape (6 parts; see test_long_segments)
    cols = [c for b in range(part, k, part) for c in (b - 1, b)] + [0, k - 1]
    rows = [r % n for r in range(len(cols))]
    outliers = (rows + [3, 3, 3], cols + [part, part, part])
    layer = make_layer(n, k, LONG_SEGMENTS, outliers=outliers, seed=8)
    assert torch.equal(emu_dequantize(layer, dtype, backend), reference.dequantize(layer, torch.float64).to(dtype))


@pytest.mark.parametrize("backend", [pytest.param("emu-forward", marks=needs_emu), CUDA], indirect=True)
def test_bad_inputs(backend):
    layer = make_layer(8, 64, seed=1)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        emu_gemm(random_x(2, 64, torch.float32), layer, backend=backend)
    with pytest.raises(ValueError, match="features but the layer has k=64"):
        emu_gemm(random_x(2, 96, torch.float16), layer, backend=backend)
    device = "cuda" if backend == "cuda" else "cpu"
    op = torch.ops.cmpq.gemm if backend == "cuda" else torch.ops.cmpq_emu.gemm
    layer = layer.to(device)
    with pytest.raises(ValueError, match="format_version"):
        op(random_x(1, 64, torch.float16).to(device), layer.perm, *layer.codes, *layer.codebooks, layer.row_ptr,
           layer.col, layer.val, None, 1, 2)
    if backend == "emu":
        with pytest.raises(ValueError, match="order must be"):
            torch.ops.cmpq_emu.set_schedule("sideways", 0)


@pytest.mark.parametrize("segment", [0, 2])
@pytest.mark.parametrize("m", [1, 20, 130])
@pytest.mark.parametrize("backend", [pytest.param("emu-forward", marks=needs_emu), CUDA], indirect=True)
def test_misaligned_codes_are_refused(segment, m, backend):
    """A contiguous codes tensor one word past an aligned start (a view at a storage offset) is refused by name
    on every GPU path, never read with a misaligned vector load."""
    layer = make_layer(8, 96, (32, 32, 32), seed=1)
    device = "cuda" if backend == "cuda" else "cpu"
    layer = layer.to(device)
    codes = list(layer.codes)
    storage = torch.empty(codes[segment].numel() + 1, dtype=codes[segment].dtype, device=device)
    codes[segment] = storage[1:].view_as(codes[segment]).copy_(codes[segment])
    op = torch.ops.cmpq if backend == "cuda" else torch.ops.cmpq_emu
    bits = (4, 3, 2)[segment]
    with pytest.raises(ValueError, match=f"codes{bits} must be {16 if bits == 4 else 8}-byte aligned"):
        op.gemm(random_x(m, 96, torch.float16).to(device), layer.perm, *codes, *layer.codebooks, layer.row_ptr,
                layer.col, layer.val, None, 1, 1)
    with pytest.raises(ValueError, match=f"codes{bits} must be"):
        emu_dequantize(layer, torch.float16, backend, codes=codes)


# ---- real GPU only: large shapes, CUDA graphs, torch.compile ------------------------------------------------

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU / CUDA build")


@cuda_only
@pytest.mark.parametrize("m", [1, 8, 16, 128, 300, 600])
def test_cuda_large_layer(m):
    """m = 300 and 600 decode 4096 x 4096 in two 16 MiB tiles (2048 rows each)."""
    layer = make_layer(4096, 4096, outlier_density=0.005, seed=m)
    check(layer, m, torch.float16, backend="cuda")


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_long_rows_decode_in_k_parts(dtype):
    """k = 28672: 16 MiB tiles of 288 rows (18 blocks), so the decode splits K to fill the GPU."""
    layer = make_layer(600, 28672, (8192, 12288, 8192), outlier_density=0.002, seed=5)
    check(layer, 520, dtype, backend="cuda")


@cuda_only
def test_cuda_graph_capture_replays_the_op():
    """No host sync inside the op: it captures into a CUDA graph and replays with new inputs."""
    layer = make_layer(300, 512, outlier_density=0.01, seed=3).to("cuda")
    x = random_x(4, 512, torch.float16).cuda()
    args = (layer.perm, *layer.codes, *layer.codebooks, layer.row_ptr, layer.col, layer.val, None, 1, 1)
    torch.ops.cmpq.gemm(x, *args)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.cmpq.gemm(x, *args)
    x.copy_(random_x(4, 512, torch.float16, seed=9).cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.ops.cmpq.gemm(x, *args))


@cuda_only
def test_cuda_torch_compile_matches_eager():
    module = cmpq_kernels.CMPQLinear(make_layer(128, 256, outlier_density=0.01, seed=4)).cuda()
    x = random_x(3, 256, torch.float16).cuda()
    compiled = torch.compile(module, fullgraph=True)
    assert torch.equal(compiled(x), module(x))
