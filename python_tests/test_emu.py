"""The SIMT emulation (csrc/emu) that runs the CUDA kernel sources on the CPU.

Builds csrc/emu/selftest.cpp (its kernels instrumented for the hazard checker) with emu.cpp and hazards.cpp
into a temporary directory and runs it in every fiber schedule: forward order hides a missing __syncthreads,
the others expose it — lane-level orders between threads that meet at the same switch points, warp-serial
orders between warps — so the kernel tests that build on the emulation are only as good as all of them
passing. Needs a C++17 compiler (GCC: the instrumentation flag), not torch.
"""
import os
import subprocess
from pathlib import Path

import pytest

from emu_build import CSRC, INSTRUMENT, compile_emu

SCHEDULES = ["forward", "reverse", "random", "random:20240607", "warp-forward", "warp-reverse", "warp-random",
             "warp-random:99"]


def _build(out_dir: Path, name: str, extra: list[str]) -> Path:
    """The kernels' translation unit instrumented, the emulation not; -rdynamic exports the race kernels'
    symbols so hazard reports name them."""
    exe, obj = out_dir / name, out_dir / f"{name}.o"
    compile_emu([*extra, *INSTRUMENT, "-c", str(CSRC / "emu" / "selftest.cpp"), "-o", str(obj)])
    compile_emu([*extra, "-rdynamic", str(obj), str(CSRC / "emu" / "emu.cpp"), str(CSRC / "emu" / "hazards.cpp"),
                 "-pthread", "-o", str(exe)])
    return exe


def _run(exe: Path, schedule: str) -> str:
    env = dict(os.environ, CMPQ_EMU_SCHEDULE=schedule)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ", 0 failures" in proc.stdout, proc.stdout
    return proc.stdout


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("emu"), "selftest", [])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_selftest(selftest, schedule):
    out = _run(selftest, schedule)
    print(next(line for line in out.splitlines() if line.startswith("timing (")))


@pytest.mark.parametrize("value", ["sideways", "forward:3"])
def test_schedule_env_is_validated(selftest, value):
    proc = subprocess.run([str(selftest)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, CMPQ_EMU_SCHEDULE=value))
    assert proc.returncode != 0
    assert ("CMPQ_EMU_SCHEDULE must be forward, reverse, random, warp-forward, warp-reverse or warp-random "
            f"(random ones optionally :<seed>), got '{value}'") in proc.stdout


def test_ucontext_fallback(tmp_path):
    """The portable context switch (used off x86-64) passes the same checks."""
    _run(_build(tmp_path, "selftest_ucontext", ["-DCMPQ_EMU_UCONTEXT=1"]), "reverse")
