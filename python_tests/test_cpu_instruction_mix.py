"""The CPU kernels' static instruction budget: bench/cpu_instruction_mix.py reads the steady-state decode
loops out of the compiled extension; their vector work per weight must stay within the budget that keeps
batch 1 near the port-bound throughput measured in bench/results/cpu_bench.md. A change that adds an
instruction per 16 weights to a loop fails here, before anyone times it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import cmpq_kernels
from conftest import import_bench

# Vector ALU instructions per weight at one activation row, with the counts when this was written:
# AVX-512 0.188 / 0.281 / 0.250 (3, 4.5 and 4 per 16 weights); int8 0.062 / 0.133 / 0.070 (4, 8.5 and 4.5
# per 64 weights, the 3-bit spare-field pre-pass not counted).
BUDGET = {"avx512": {2: 0.19, 3: 0.29, 4: 0.26}, "avx512-int8": {2: 0.065, 3: 0.14, 4: 0.075}}


@pytest.fixture(scope="module")
def mix() -> dict[tuple[str, int], dict]:
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) not installed")
    library = next(Path(cmpq_kernels.__file__).parent.glob("_C.*.so"))
    return {(r["isa"], r["bits"]): r for r in import_bench("cpu_instruction_mix").analyse(library)}


def test_every_simd_decode_loop_is_found(mix):
    assert {(isa, bits) for isa in ("avx2", "avx512", "avx512-int8") for bits in (2, 3, 4)} <= set(mix)
    for (isa, _), row in mix.items():
        if isa == "avx512-int8":
            assert row["dot_per_weight"] == pytest.approx(1 / 64)
        else:
            assert row["fma_per_weight"] == pytest.approx(1 / (16 if isa == "avx512" else 8))


@pytest.mark.parametrize("isa", ["avx512", "avx512-int8"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_avx512_loops_stay_within_the_instruction_budget(mix, isa, bits):
    row = mix[isa, bits]
    assert row["vector_alu_per_weight"] <= BUDGET[isa][bits], row
    # the lookups: one vpermps per 16 weights, or (int8) one vpermb per 64 plus the 3-bit spread
    assert row["shuffle_per_weight"] <= (1 / 16 if isa == "avx512" else 1 / 32) + 1e-9, row
