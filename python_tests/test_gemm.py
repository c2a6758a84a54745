"""CPU ``cmpq.gemm`` / ``cmpq.dequantize`` against the float64 reference, on every ISA path.

M <= 16 runs the direct fused kernel (scalar, AVX2 or AVX-512, chosen by CMPQ_CPU_SIMD via the ``cpu_isa``
fixture; tiles of 8 activation rows for scalar/AVX2, 16 for AVX-512); M > 16 decodes blocks of 256 weight
rows with the same ISA and calls BLAS, so shapes straddle both.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np
import pytest
import torch

from cmpq_kernels import ops, reference
from cmpq_kernels.format import CMPQLayer
from conftest import assert_matches_reference, make_layer, random_x, with_threads


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer + batch configuration (hashable, so its layer and decoded weights are built once)."""

    m: int
    n: int
    k: int
    seg_k: Optional[tuple[int, int, int]] = None
    density: float = 0.01
    outliers: Optional[str] = None  # a named pattern from OUTLIER_PATTERNS
    codebook_rows: int = 1
    bias: Optional[torch.dtype] = None
    seed: int = 0

    def __str__(self) -> str:
        extras = ["seg" + "-".join(map(str, self.seg_k)) if self.seg_k else "", self.outliers or f"d{self.density:g}",
                  f"cbr{self.codebook_rows}" if self.codebook_rows > 1 else "",
                  f"bias-{str(self.bias).split('.')[-1]}" if self.bias else ""]
        batch = f"m{self.m}" if self.m else ""  # m=0: a layer-only case, the test picks m
        return "-".join([f"{batch}n{self.n}k{self.k}", *filter(None, extras)])


def _full_row(n, k, row):
    return np.full(k, row), np.arange(k)


def _full_col(n, k, col):
    return np.arange(n), np.full(n, col)


def _edges(n, k):
    """Whole first and last rows and columns (corners repeated: duplicates are legal and must add)."""
    parts = [_full_row(n, k, 0), _full_row(n, k, n - 1), _full_col(n, k, 0), _full_col(n, k, k - 1)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


OUTLIER_PATTERNS = {
    "none": lambda n, k: (np.zeros(0), np.zeros(0)),
    "row0": lambda n, k: _full_row(n, k, 0),
    "last-row": lambda n, k: _full_row(n, k, n - 1),
    "col0": lambda n, k: _full_col(n, k, 0),
    "edges": _edges,
    "duplicates": lambda n, k: (np.array([0, 0, 0, n - 1]), np.array([5, 5, 5, k - 1])),
}


@functools.lru_cache(maxsize=None)
def layer_for(case: Case):
    outliers = None if case.outliers is None else OUTLIER_PATTERNS[case.outliers](case.n, case.k)
    return make_layer(case.n, case.k, case.seg_k, case.density, case.codebook_rows, case.bias, case.seed, outliers)


@functools.lru_cache(maxsize=None)
def w64_for(case: Case) -> torch.Tensor:
    return reference.dequantize(layer_for(case), torch.float64)


def check_case(case: Case, dtype: torch.dtype = torch.float32) -> None:
    layer = layer_for(case)
    x = random_x(case.m, case.k, dtype, seed=case.seed + 1)
    assert_matches_reference(ops.gemm(x, layer), x, layer, w64=w64_for(case))


# ---- shapes -----------------------------------------------------------------------------------------

SHAPES = [
    # Seed 1 for the single-output case: with seed 0 that one dot product cancels to 0.05 from terms of
    # total magnitude 19, so the norm criterion would measure conditioning, not the kernel.
    Case(1, 1, 32, seed=1), Case(2, 3, 64), Case(3, 37, 96), Case(8, 301, 256), Case(5, 1001, 352, seed=3),
    Case(15, 37, 160), Case(16, 37, 160), Case(17, 37, 160),  # around the direct/BLAS switch at M=16
    Case(64, 301, 512, seed=1), Case(20, 1, 32), Case(17, 2, 64),  # odd seeds: sorted codebooks
    Case(300, 301, 1024),  # BLAS path with N > 256: two decode blocks
    Case(2, 3, 32768, outliers="edges"), Case(17, 3, 32768, outliers="edges"),  # K > 32767: int32 col
    Case(1, 4096, 4096, density=0.002), Case(3, 3001, 4096, density=0.002),  # the two big ones
]


@pytest.mark.parametrize("case", SHAPES, ids=str)
def test_gemm_shapes(case, cpu_isa):
    check_case(case)


def _random_cases(count: int, seed: int) -> list[tuple[Case, torch.dtype]]:
    """Seeded random configurations: any batch (both paths), N and K up to ~1000, any segment split."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        groups = int(rng.integers(1, 33))
        cuts = np.sort(rng.integers(0, groups + 1, 2))
        seg_k = tuple(int(32 * g) for g in (cuts[0], cuts[1] - cuts[0], groups - cuts[1]))
        case = Case(m=int(rng.choice([1, 2, 4, 7, 8, 9, 13, 16, 17, 33, 64])), n=int(rng.integers(1, 1000)),
                    k=32 * groups, seg_k=seg_k, density=float(rng.choice([0.0, 0.002, 0.05])),
                    codebook_rows=int(rng.choice([1, 1, 2, 3, 8])),
                    bias=[None, torch.float32, torch.float16, torch.bfloat16][int(rng.integers(4))], seed=i)
        cases.append((case, [torch.float32, torch.float16, torch.bfloat16][int(rng.integers(3))]))
    return cases


@pytest.mark.parametrize("case,dtype", _random_cases(16, seed=2024), ids=lambda v: str(v).removeprefix("torch."))
def test_gemm_random_configurations(case, dtype, cpu_isa):
    check_case(case, dtype)


@pytest.mark.parametrize("m", [1, 3, 16])
def test_isa_paths_agree_and_the_switch_reaches_the_kernel(m, monkeypatch):
    """Every ISA computes the same products in a different summation order: outputs agree to rounding, and
    for a long row some differ in the last bits, which proves CMPQ_CPU_SIMD really changes the kernel."""
    isas = [isa for isa in torch.ops.cmpq.cpu_isas() if isa != "avx512-int8"]  # the exact ones
    if len(isas) == 1:
        pytest.skip("only one CPU kernel on this machine")
    layer, x = layer_for(Case(m, 301, 1024)), random_x(m, 1024)
    outputs = {}
    for isa in isas:
        monkeypatch.setenv("CMPQ_CPU_SIMD", isa)
        outputs[isa] = ops.gemm(x, layer)
    for isa, y in outputs.items():
        err = float((y - outputs["scalar"]).norm() / outputs["scalar"].norm())
        assert err < 1e-6, f"{isa} vs scalar: norm-relative difference {err:.3g}"
        assert isa == "scalar" or not torch.equal(y, outputs["scalar"]), f"{isa} ran the scalar kernel"


@pytest.mark.parametrize("value,message", [("bogus", "is not one of"), ("AVX2", "is not one of"),
                                           ("neon", "is not one of")])
def test_unknown_simd_name_is_an_error(value, message, monkeypatch):
    layer, x = layer_for(Case(1, 3, 64)), random_x(1, 64)
    monkeypatch.setenv("CMPQ_CPU_SIMD", value)
    with pytest.raises(ValueError, match=message):
        ops.gemm(x, layer)


def test_simd_name_this_cpu_cannot_run_is_an_error(monkeypatch):
    missing = [isa for isa in ("avx2", "avx512", "avx512-int8") if isa not in torch.ops.cmpq.cpu_isas()]
    if not missing:
        pytest.skip("this CPU runs every ISA")
    monkeypatch.setenv("CMPQ_CPU_SIMD", missing[-1])
    with pytest.raises(ValueError, match="this CPU cannot run"):
        ops.gemm(random_x(1, 64), layer_for(Case(1, 3, 64)))


@pytest.mark.parametrize("value", ["", "auto", "1"])
def test_simd_auto_picks_the_best_exact_isa(value, monkeypatch):
    monkeypatch.setenv("CMPQ_CPU_SIMD", value)
    exact = [isa for isa in torch.ops.cmpq.cpu_isas() if isa != "avx512-int8"]
    assert torch.ops.cmpq.cpu_isa() == exact[-1]


# ---- segment mixes: each width alone, all three, one segment empty each way -------------------------

SEGMENT_MIXES = [(192, 0, 0), (0, 192, 0), (0, 0, 192), (64, 64, 64), (0, 96, 96), (96, 0, 96), (96, 96, 0)]


@pytest.mark.parametrize("m", [1, 8, 17])
@pytest.mark.parametrize("seg_k", SEGMENT_MIXES, ids=lambda s: "seg" + "-".join(map(str, s)))
def test_gemm_segment_mixes(seg_k, m, cpu_isa):
    check_case(Case(m, 37, 192, seg_k=seg_k, density=0.02))


# ---- outliers ---------------------------------------------------------------------------------------

OUTLIER_CASES = [Case(0, 37, 128, density=0.0), Case(0, 37, 128, density=0.2),
                 *(Case(0, 37, 128, outliers=name) for name in OUTLIER_PATTERNS)]


@pytest.mark.parametrize("m", [1, 9, 20])
@pytest.mark.parametrize("case", OUTLIER_CASES, ids=str)
def test_gemm_outliers(case, m, cpu_isa):
    check_case(dataclasses.replace(case, m=m))


def test_edge_outliers_store_duplicates():
    """The 'edges' pattern really has repeated (row, col) entries, so the duplicate-summing path runs."""
    layer = layer_for(Case(1, 37, 128, outliers="edges"))
    assert layer.nnz == 2 * 128 + 2 * 37
    counts = np.diff(layer.row_ptr.numpy())
    assert counts[0] == counts[-1] == 128 + 2 and counts[1] == 2


def test_wide_layer_uses_int32_columns():
    """K > 32767 switches col to int32; the K=32768 shape cases above run that kernel branch."""
    assert layer_for(Case(2, 3, 32768, outliers="edges")).col.dtype == torch.int32
    assert layer_for(Case(1, 3, 32736, outliers="edges")).col.dtype == torch.int16


# ---- codebook sharing and bias ----------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 17])
@pytest.mark.parametrize("codebook_rows", [4, 37, 64])  # 37 = n (one shared row), 64 > n
def test_gemm_codebook_rows(codebook_rows, m, cpu_isa):
    check_case(Case(m, 37, 96, codebook_rows=codebook_rows, density=0.05))


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("bias", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gemm_layer_bias(bias, m, cpu_isa):
    check_case(Case(m, 101, 128, bias=bias))


def test_gemm_bias_argument_overrides_layer_bias(cpu_isa):
    layer = layer_for(Case(4, 37, 96, bias=torch.float32))
    x = random_x(4, 96)
    override = torch.linspace(-3, 3, 37, dtype=torch.float16)
    assert_matches_reference(ops.gemm(x, layer, override), x, layer, bias=override)


# ---- reduced-precision activations ------------------------------------------------------------------
# The reference is computed in float64 from the very same fp16/bf16 x; the only extra error is the single
# rounding of the FP32 result to x.dtype (tolerances in conftest.TOLERANCES: fp16 2e-3, bf16 1e-2).

DTYPE_CASES = [Case(1, 37, 96), Case(8, 301, 256, bias=torch.float32), Case(17, 101, 256, bias=torch.float16),
               Case(64, 301, 512, bias=torch.bfloat16)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=str)
def test_gemm_half_precision_activations(case, dtype, cpu_isa):
    check_case(case, dtype)


# ---- batch shapes -----------------------------------------------------------------------------------


def test_gemm_leading_batch_dims(cpu_isa):
    layer = layer_for(Case(6, 37, 96))
    x = random_x(6, 96).reshape(2, 3, 96)
    y = ops.gemm(x, layer)
    assert y.shape == (2, 3, 37)
    assert_matches_reference(y, x, layer)


def test_gemm_empty_batch():
    layer = layer_for(Case(0, 37, 96))
    y = ops.gemm(torch.zeros(0, 96), layer)
    assert y.shape == (0, 37) and y.dtype == torch.float32


def _offset_copy(t: torch.Tensor) -> torch.Tensor:
    """An equal contiguous tensor that starts 3 elements into its storage (kernels must use data_ptr)."""
    return torch.cat([torch.zeros(3, dtype=t.dtype), t.flatten()])[3:].view(t.shape)


def test_inputs_with_storage_offsets(cpu_isa):
    case = Case(0, 37, 96, codebook_rows=4, density=0.1, bias=torch.float16)
    layer = layer_for(case)
    shifted = dataclasses.replace(
        layer, perm=_offset_copy(layer.perm), codes=tuple(map(_offset_copy, layer.codes)),
        codebooks=tuple(map(_offset_copy, layer.codebooks)), row_ptr=_offset_copy(layer.row_ptr),
        col=_offset_copy(layer.col), val=_offset_copy(layer.val), bias=_offset_copy(layer.bias)).validate()
    assert shifted.codes[0].storage_offset() == 3
    assert torch.equal(ops.dequantize(shifted), ops.dequantize(layer))
    for m in (5, 17):
        x = random_x(m + 1, 96)[1:]  # a contiguous view with an offset
        assert x.storage_offset() == 96
        assert torch.equal(ops.gemm(x, shifted), ops.gemm(x.clone(), layer))
        assert_matches_reference(ops.gemm(x, shifted), x, layer, w64=w64_for(case))


# ---- outputs are really computed --------------------------------------------------------------------


@pytest.mark.parametrize("m", [3, 8, 9, 17])
def test_nan_in_x_poisons_exactly_its_row(m, cpu_isa):
    """A NaN activation must reach every output of its row and no other row (tiles share decodes)."""
    case = Case(m, 37, 128, density=0.05)
    layer = layer_for(case)
    x = random_x(m, 128)
    x[1, 77] = float("nan")
    y = ops.gemm(x, layer)
    assert bool(torch.isnan(y[1]).all())
    keep = torch.arange(m) != 1
    assert_matches_reference(y[keep], x[keep], layer, w64=w64_for(case))


# ---- every finite fp16 value ------------------------------------------------------------------------


def all_finite_fp16() -> torch.Tensor:
    """The 63488 finite fp16 values (zeros, subnormals, normals up to +-65504), in bit-pattern order."""
    values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    return values[torch.isfinite(values)]


def fp16_table_layer(as_outliers: bool):
    """A [3968, 32] 4-bit-only layer whose weights are all finite fp16 values, each twice.

    Either as codebook entries (row r holds values 16r..16r+15, codes 0..15 twice, no outliers) or as
    outlier residuals on an all-zero codebook: both decode paths convert fp16 bits to float in C++.
    """
    values = all_finite_fp16()
    n = values.numel() // 16
    codes = np.tile(np.arange(16, dtype=np.uint8), (n, 2))
    zeros = lambda width: torch.zeros(n, width, dtype=torch.float16)  # noqa: E731
    codebook4 = zeros(16) if as_outliers else values.reshape(n, 16)
    outliers = {}
    if as_outliers:
        rows = np.repeat(np.arange(n), 32)
        cols = np.tile(np.arange(32), n)
        outliers = dict(outlier_rows=rows, outlier_cols=cols, outlier_vals=values.reshape(n, 16).repeat(1, 2))
    layer = CMPQLayer.from_codes(bits=4.0, perm=np.arange(32), codes=(codes, codes[:, :0], codes[:, :0]),
                                 codebooks=(codebook4, zeros(8), zeros(4)), **outliers)
    return layer, values.reshape(n, 16).repeat(1, 2).float()


@pytest.mark.parametrize("as_outliers", [False, True], ids=["codebook", "outliers"])
def test_every_finite_fp16_value_decodes_exactly(as_outliers, cpu_isa):
    layer, expected = fp16_table_layer(as_outliers)
    assert torch.equal(reference.dequantize(layer), expected)
    assert torch.equal(ops.dequantize(layer), expected)
    eye = torch.eye(32)
    for rows in (slice(0, 16), slice(16, 32)):  # direct kernel (M = 16): y = W[:, rows].T
        assert torch.equal(ops.gemm(eye[rows].contiguous(), layer), expected[:, rows].T)


# ---- dequantize -------------------------------------------------------------------------------------

DEQUANT_CASES = [Case(0, 37, 192, seg_k=mix, density=0.05) for mix in SEGMENT_MIXES] + [
    Case(0, 37, 96, codebook_rows=4, outliers="edges"), Case(0, 301, 512, density=0.2),
    Case(0, 2, 32, outliers="duplicates")]


@pytest.mark.parametrize("case", DEQUANT_CASES, ids=str)
def test_dequantize_matches_reference_exactly(case, cpu_isa):
    layer = layer_for(case)
    w = ops.dequantize(layer)
    assert w.dtype == torch.float32 and w.shape == (layer.n, layer.k)
    assert torch.equal(w, reference.dequantize(layer))
    for dtype in (torch.float16, torch.bfloat16):  # the op decodes in FP32, then casts once
        assert torch.equal(ops.dequantize(layer, dtype), w.to(dtype))


@pytest.mark.parametrize("case", [Case(0, 37, 96, codebook_rows=4, outliers="edges"),
                                  Case(0, 301, 256, seg_k=(0, 96, 160), density=0.1)], ids=str)
def test_identity_input_gives_transposed_weights(case, cpu_isa):
    """x = I_K makes y = W.T; run whole (BLAS path) and in 16-row slices (direct path)."""
    layer = layer_for(case)
    eye = torch.eye(layer.k)
    w_t = ops.dequantize(layer).T
    for y in (ops.gemm(eye, layer), torch.cat([ops.gemm(chunk.contiguous(), layer) for chunk in eye.split(16)])):
        torch.testing.assert_close(y, w_t, rtol=0, atol=1e-6)


# ---- determinism ------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 8, 64])
def test_repeated_calls_are_bit_identical(m, cpu_isa):
    layer = layer_for(Case(m, 1001, 512, density=0.02))
    x = random_x(m, 512)
    assert torch.equal(ops.gemm(x, layer), ops.gemm(x, layer))


@pytest.mark.parametrize("m", [1, 8, 16])
def test_direct_path_is_independent_of_thread_count(m, cpu_isa):
    """Each output row is computed by one thread in a fixed order, so the thread count cannot matter."""
    layer = layer_for(Case(m, 1001, 512, density=0.02))
    x = random_x(m, 512)
    one, two = with_threads([1, 2], lambda: ops.gemm(x, layer))
    assert torch.equal(one, two)
