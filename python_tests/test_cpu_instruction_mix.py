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

# Vector ALU instructions per weight, AVX-512 loops at one activation row (the counts when this was
# written: 0.188 / 0.281 / 0.250, i.e. 3, 4.5 and 4 per 16 weights).
AVX512_BUDGET = {2: 0.19, 3: 0.29, 4: 0.26}


@pytest.fixture(scope="module")
def mix() -> dict[tuple[str, int], dict]:
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) not installed")
    library = next(Path(cmpq_kernels.__file__).parent.glob("_C.*.so"))
    return {(r["isa"], r["bits"]): r for r in import_bench("cpu_instruction_mix").analyse(library)}


def test_every_simd_decode_loop_is_found(mix):
    assert {(isa, bits) for isa in ("avx2", "avx512") for bits in (2, 3, 4)} <= set(mix)
    for row in mix.values():
        assert row["fma_per_weight"] == pytest.approx(1 / (16 if row["isa"] == "avx512" else 8))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_avx512_loops_stay_within_the_instruction_budget(mix, bits):
    row = mix["avx512", bits]
    assert row["vector_alu_per_weight"] <= AVX512_BUDGET[bits], row
    assert row["shuffle_per_weight"] <= 1 / 16 + 1e-9, row  # one table lookup per 16 weights, nothing more
