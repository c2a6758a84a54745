"""Shared helpers for the cmpq_kernels tests.

Layers are built from random codes, codebooks and outliers through ``CMPQLayer.from_codes`` (not only
through the stand-in quantizer), so every code value, unsorted codebooks and arbitrary outlier patterns
reach the kernels. Everything is seeded: a failure reproduces from its test id.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence

import numpy as np
import pytest
import torch

import cmpq_kernels  # noqa: F401  (registers torch.ops.cmpq)
from cmpq_kernels import reference
from cmpq_kernels.format import SEGMENT_BITS, CMPQLayer
from cmpq_kernels.mixllm_format import MixLLMLayer, groups_of

try:  # the emulated kernels (torch.ops.cmpq_emu); a GPU session builds without them (setup.py CMPQ_BUILD_EMU=0)
    import cmpq_kernels._C_emu  # noqa: F401
    HAS_EMU = True
except ImportError:
    HAS_EMU = False
needs_emu = pytest.mark.skipif(not HAS_EMU, reason="built without the emulated kernels (CMPQ_BUILD_EMU=0)")

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"

# Per activation dtype: (norm-relative tolerance, unit roundoff of the output dtype).
# The op accumulates in FP32 and rounds the result to x.dtype once, so the error against the float64
# reference is the FP32 accumulation error plus one output rounding: ~1e-7 for fp32, 2**-11 for fp16 and
# 2**-8 for bf16 per element; the norm tolerances leave a few-x margin over that.
TOLERANCES = {
    torch.float32: (1e-5, 0.0),
    torch.float16: (2e-3, 2.0**-11),
    torch.bfloat16: (1e-2, 2.0**-8),
}
# Per-element FP32 accumulation tolerance, relative to sum_j |x_j * W_nj| (+ |bias|): the standard
# forward-error bound of a dot product, which stays meaningful where y itself cancels to ~0.
ACCUMULATION_TOL = 1e-5


def default_seg_k(k: int) -> tuple[int, int, int]:
    """Split k (multiple of 32) over the three segments as evenly as whole groups allow."""
    groups = k // 32
    sizes = [groups // 3 + (1 if s < groups % 3 else 0) for s in range(3)]
    return tuple(32 * g for g in sizes)  # type: ignore[return-value]


def make_layer(
    n: int,
    k: int,
    seg_k: Optional[Sequence[int]] = None,
    outlier_density: float = 0.0,
    codebook_rows: int = 1,
    bias: Optional[torch.dtype] = None,
    seed: int = 0,
    outliers: Optional[tuple[np.ndarray, np.ndarray]] = None,
) -> CMPQLayer:
    """A random valid layer ``[n, k]``.

    Args:
        seg_k: channels per segment (4, 3, 2-bit); default: an even split.
        outlier_density: fraction of the n*k weights given an outlier residual (exact count, distinct
            positions). Ignored when ``outliers`` gives explicit (rows, cols) COO positions.
        bias: dtype of a random bias, or None for no bias.
        seed: also picks sorted codebook rows (odd seeds, as a real quantizer makes them) or unsorted ones
            (even seeds), so kernels cannot rely on sorted tables.
    """
    rng = np.random.default_rng(seed)
    seg_k = default_seg_k(k) if seg_k is None else tuple(seg_k)
    assert sum(seg_k) == k, (seg_k, k)
    codes = tuple(rng.integers(0, 1 << b, size=(n, s), dtype=np.uint8) for b, s in zip(SEGMENT_BITS, seg_k))
    sort = seed % 2 == 1
    cb_count = -(-n // codebook_rows)
    codebooks = []
    for b in SEGMENT_BITS:
        cb = rng.standard_normal((cb_count, 1 << b)).astype(np.float16)
        codebooks.append(torch.from_numpy(np.sort(cb, axis=1) if sort else cb))
    if outliers is None:
        flat = rng.choice(n * k, size=int(round(outlier_density * n * k)), replace=False)
        rows, cols = flat // k, flat % k
    else:
        rows, cols = (np.asarray(a, dtype=np.int64) for a in outliers)
    vals = torch.from_numpy(rng.standard_normal(rows.shape).astype(np.float16))
    bias_t = None if bias is None else torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(bias)
    return CMPQLayer.from_codes(bits=3.0, perm=rng.permutation(k), codes=codes, codebooks=tuple(codebooks),
                                outlier_rows=rows, outlier_cols=cols, outlier_vals=vals, bias=bias_t,
                                codebook_rows=codebook_rows)


def make_mixllm_layer(n: int, k: int, n8: int, bias: Optional[torch.dtype] = None, seed: int = 0) -> MixLLMLayer:
    """A random valid MixLLM layer ``[n, k]`` with ``n8`` 8-bit rows at random output positions: every code value
    (8-bit codes over [-127, 127], all 16 nibbles and zero points) and scales spanning a few octaves."""
    gen = torch.Generator().manual_seed(seed)
    g = groups_of(k)
    rows = torch.randperm(n, generator=gen)
    scale = lambda count: (torch.rand(count, g, generator=gen) * 2.0 ** torch.randint(-12, -4, (count, g), generator=gen).float())  # noqa: E731
    bias_t = None if bias is None else torch.randn(n, generator=gen).to(bias)
    return MixLLMLayer.from_codes(idx8=rows[:n8], q8=torch.randint(-127, 128, (n8, k), generator=gen), s8=scale(n8),
                                  idx4=rows[n8:], q4=torch.randint(0, 16, (n - n8, k), generator=gen),
                                  s4=scale(n - n8), z4=torch.randint(0, 16, (n - n8, g), generator=gen), bias=bias_t)


def random_x(m: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Activations ``[m, k]`` ~ N(0, 1), generated in fp32 then cast (so every dtype sees the same values)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(dtype)


def with_threads(counts: Sequence[int], fn: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    """``fn()`` once per torch thread count in ``counts``; the caller's count is restored."""
    threads = torch.get_num_threads()
    try:
        outputs = []
        for count in counts:
            torch.set_num_threads(count)
            outputs.append(fn())
        return outputs
    finally:
        torch.set_num_threads(threads)


def norm_rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64."""
    y, ref = y.double(), ref.double()
    return ((y - ref).norm() / ref.norm()).item()


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, layer: CMPQLayer,
                             bias: Optional[torch.Tensor] = None, w64: Optional[torch.Tensor] = None,
                             weight_round: float = 0.0) -> None:
    """Check ``y = gemm(x, layer, bias)`` against the float64 ``reference.linear`` of the same ``x``.

    Two checks: the norm-relative error (the acceptance criterion), and a per-element bound so a single
    wrong element cannot hide in the norm of a large output. ``w64`` (float64 dequantized W) may be passed
    to avoid decoding a big layer again for the element bound. ``weight_round`` is the unit roundoff of a
    kernel that rounds decoded weights to a 16-bit type before multiplying (tensor-core and decode paths).
    """
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], layer.n)
    assert bool(torch.isfinite(y).all()), "output has NaN/Inf"
    ref = reference.linear(x.double(), layer, bias)  # float64, no output rounding
    norm_tol, out_round = TOLERANCES[x.dtype]
    err = norm_rel_error(y, ref)
    assert err <= norm_tol, f"norm-relative error {err:.3g} > {norm_tol:g}"

    w64 = reference.dequantize(layer, torch.float64) if w64 is None else w64
    bias = layer.bias if bias is None else bias
    absdot = x.double().abs() @ w64.abs().T
    if bias is not None:
        absdot = absdot + bias.double().abs()
    acc = (ACCUMULATION_TOL + weight_round) * absdot
    bound = out_round * (ref.abs() + acc) + acc + 1e-30
    bad = (y.double() - ref).abs() > bound
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {bad.numel()} elements out of bound, first at {bad.nonzero()[0].tolist()}")


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def cpu_isa(request, monkeypatch) -> str:
    """Run the test once per CPU kernel ISA this CPU runs; CMPQ_CPU_SIMD is read by the op on every call."""
    if request.param not in torch.ops.cmpq.cpu_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    monkeypatch.setenv("CMPQ_CPU_SIMD", request.param)
    assert torch.ops.cmpq.cpu_isa() == request.param
    return request.param


def import_bench(name: str) -> ModuleType:
    """A module of ``bench/`` (scripts, not a package), imported with ``bench/`` on sys.path as the scripts
    themselves import their sibling modules."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(name)


def strict_json(path: Path) -> dict:
    """A results file parsed as standard JSON: NaN / Infinity (which ``json`` writes by default) fail."""
    def bad(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(path.read_text(), parse_constant=bad)
