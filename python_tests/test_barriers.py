"""Every __syncthreads in the CUDA kernels is needed, and the kernel suite proves it by failing without it.

For each barrier, a mutant copy of csrc/ without that line is built the way the emulation is
(csrc/emu/kernels.cpp, emu.cpp, hazards.cpp; torch-free, a few seconds) into a shared library, and the
test of test_gpu_kernels.py named in BARRIERS runs against it in a child process with the library preloaded
(LD_PRELOAD): its kernels and emulation interpose on the same symbols of cmpq_kernels._C_emu, whose torch
bindings call them. Nothing in the kernel sources knows about mutants.

The test must fail the way BARRIERS says: a shared-memory hazard report naming the kernel and the array (or
dynamic shared memory; the child runs with the hazard checker on, as test_gpu_kernels.py always does), or
wrong values where the barrier orders global memory. WARP_SERIAL_CATCHES then builds two mutants without
instrumentation, so the checker is blind, and the test must still fail from wrong values under a warp-serial
schedule alone — including the issue's mutation, which lane-level schedules never expose. The same build without a mutation passes every
test used here, so the failures come from the mutations.
"""
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import needs_emu
from emu_build import CSRC, INSTRUMENT, compile_emu

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="mutants interpose through LD_PRELOAD (ELF)"),
              needs_emu]  # the mutants replace _C_emu's kernels, so the suite they run needs it

ROOT = CSRC.parent
BARRIER_LINE = re.compile(r"^\s*__syncthreads\(\);")
WRONG_VALUES = r"AssertionError: (output has NaN/Inf|norm-relative error|\d+ of \d+ elements out of bound)|assert False"


@dataclass(frozen=True)
class Barrier:
    file: str        # in csrc/cuda
    index: int       # 1 = the file's first __syncthreads(); statement
    orders: str      # what the barrier orders
    node: str        # the test of test_gpu_kernels.py that fails without it
    fails_with: str  # regex of that failure


def dynamic_hazard(kernel: str) -> str:
    """A hazard in the kernel's dynamic shared memory (which has no symbol to name)."""
    return re.escape(f"shared-memory hazard in cmpq::cuda::{kernel}") + ".*" + re.escape("dynamic shared memory + ")


# m = 17 takes the tensor-core GEMM with two m16 batch tiles per block (MT = 2).
GEMM_NODE = "test_every_path_matches_reference[emu-forward-17-dtype0]"
GEMM_HAZARD = dynamic_hazard("gemm_detail::cmpq_gemm_kernel<__half, 2>")
BARRIERS = [
    Barrier("gemm_tc.cu", 1, "the tile's pair tables are written before any warp looks them up", GEMM_NODE,
            GEMM_HAZARD),
    Barrier("gemm_tc.cu", 2, "every warp is done with the tables before the partial sums overwrite them",
            GEMM_NODE, GEMM_HAZARD),
    Barrier("gemm_tc.cu", 3, "every warp's partial sums are written before the row epilogue adds them", GEMM_NODE,
            GEMM_HAZARD),
    Barrier("gemv.cu", 1, "the tile's pair tables are written before any warp looks them up",
            "test_every_path_matches_reference[emu-forward-1-dtype0]",
            dynamic_hazard("gemv_detail::cmpq_gemv_kernel<__half, 1>")),
    Barrier("gemv.cu", 2, "every warp is done with the 3-bit table before the partial sums overwrite it",
            "test_awkward_shapes[emu-forward-4-130-1088]",
            dynamic_hazard("gemv_detail::cmpq_gemv_kernel<__nv_bfloat16, 4>")),
    Barrier("gemv.cu", 3, "every warp's partial sums are written before the row epilogue adds them",
            "test_every_path_matches_reference[emu-forward-1-dtype0]",
            dynamic_hazard("gemv_detail::cmpq_gemv_kernel<__half, 1>")),
    Barrier("dequant.cu", 1, "the tile's pair tables are written before any warp looks them up",
            "test_dequantize_matches_reference[emu-forward-dtype0-duplicates]",
            dynamic_hazard("decode_detail::cmpq_decode_kernel<__half>")),
    Barrier("dequant.cu", 2, "the block's dense rows (global memory) are written before outliers overwrite "
            "positions in them (the reverse schedule runs the outlier warps before warp 0, which decodes every "
            "group of this narrow layer)", "test_dequantize_matches_reference[emu-reverse-dtype0-duplicates]",
            WRONG_VALUES),
]
# (file, index) -> a warp-serial test that must fail from wrong values with the hazard checker blind.
WARP_SERIAL_CATCHES = {
    ("gemm_tc.cu", 1): "test_every_path_matches_reference[emu-warp-forward-17-dtype0]",
    ("gemv.cu", 1): "test_every_path_matches_reference[emu-warp-forward-1-dtype0]",
}


def barriers_in_sources() -> list[tuple[str, int]]:
    found = []
    for path in sorted((CSRC / "cuda").glob("*.cu")):
        lines = [line for line in path.read_text().splitlines() if BARRIER_LINE.match(line)]
        found += [(path.name, i + 1) for i in range(len(lines))]
    return found


def test_every_barrier_is_listed():
    assert barriers_in_sources() == [(b.file, b.index) for b in sorted(BARRIERS, key=lambda b: (b.file, b.index))]


@pytest.fixture(scope="module")
def emulation_objects(tmp_path_factory) -> list[str]:
    """emu.cpp and hazards.cpp, unchanged in every mutant: built once."""
    out = tmp_path_factory.mktemp("emu")
    objects = [str(out / f"{name}.o") for name in ("emu", "hazards")]
    for name, obj in zip(("emu", "hazards"), objects):
        compile_emu(["-fPIC", "-c", str(CSRC / "emu" / f"{name}.cpp"), "-o", obj])
    return objects


def drop_barrier(csrc: Path, file: str, index: int) -> None:
    source = csrc / "cuda" / file
    lines = source.read_text().splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if BARRIER_LINE.match(line)][index - 1]
    source.write_text("".join(lines[:at] + lines[at + 1:]))


def build(out: Path, objects: list[str], instrument: bool, drop: tuple[str, int] | None) -> Path:
    """A copy of csrc/ without barrier `drop` (file, index), its kernels linked with `objects` into a library."""
    csrc = out / "csrc"
    shutil.copytree(CSRC, csrc)
    if drop:
        drop_barrier(csrc, *drop)
    kernels = out / "kernels.o"
    compile_emu(["-fPIC", *(INSTRUMENT if instrument else []), "-c", str(csrc / "emu" / "kernels.cpp"), "-o",
                 str(kernels)], csrc=csrc)
    library = out / "kernels.so"
    compile_emu(["-shared", str(kernels), *objects, "-o", str(library)], csrc=csrc)
    return library


def run_against(library: Path, *nodes: str) -> subprocess.CompletedProcess:
    """test_gpu_kernels.py's `nodes` in a child process with `library` preloaded."""
    env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, [str(library), os.environ.get("LD_PRELOAD")])))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           *(f"python_tests/test_gpu_kernels.py::{node}" for node in nodes)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def assert_fails(library: Path, node: str, fails_with: str) -> None:
    proc = run_against(library, node)
    assert proc.returncode == 1 and re.search(fails_with, proc.stdout), (
        f"{node} against the mutant: exit {proc.returncode}, expected a failure matching {fails_with!r}\n"
        f"{proc.stdout[-3000:]}{proc.stderr[-2000:]}")


@pytest.mark.parametrize("barrier", BARRIERS, ids=lambda b: f"{b.file}#{b.index}")
def test_suite_fails_without(barrier, emulation_objects, tmp_path):
    library = build(tmp_path, emulation_objects, instrument=True, drop=(barrier.file, barrier.index))
    assert_fails(library, barrier.node, barrier.fails_with)


@pytest.mark.parametrize("key", sorted(WARP_SERIAL_CATCHES), ids=lambda k: f"{k[0]}#{k[1]}")
def test_warp_serial_order_fails_without(key, emulation_objects, tmp_path):
    library = build(tmp_path, emulation_objects, instrument=False, drop=key)
    assert_fails(library, WARP_SERIAL_CATCHES[key], WRONG_VALUES)


def test_unmutated_build_passes(emulation_objects, tmp_path):
    """The control: built the same way (uninstrumented, where only values can fail) with every barrier."""
    library = build(tmp_path, emulation_objects, instrument=False, drop=None)
    nodes = sorted({b.node for b in BARRIERS} | set(WARP_SERIAL_CATCHES.values()))
    proc = run_against(library, *nodes)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
