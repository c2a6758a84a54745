"""The SIMT emulation (csrc/emu) that runs the CUDA kernel sources on the CPU.

Builds csrc/emu/selftest.cpp + emu.cpp with g++ into a temporary directory and runs it in every fiber
schedule: forward order hides a missing __syncthreads, reverse and random orders expose it, so the kernel
tests that build on the emulation are only as good as all three passing. Needs a C++17 compiler, not torch.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CXX = os.environ.get("CXX", "g++")


def _build(out_dir: Path, name: str, extra: list[str]) -> Path:
    if shutil.which(CXX) is None:
        pytest.skip(f"no C++ compiler ({CXX}) on PATH")
    exe = out_dir / name
    cmd = [CXX, "-O2", "-std=c++17", "-Wall", "-Wextra", *extra, f"-I{CSRC}",
           str(CSRC / "emu" / "selftest.cpp"), str(CSRC / "emu" / "emu.cpp"), "-pthread", "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
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


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random", "random:20240607"])
def test_selftest(selftest, schedule):
    out = _run(selftest, schedule)
    print(next(line for line in out.splitlines() if line.startswith("timing (")))


def test_schedule_env_is_validated(selftest):
    proc = subprocess.run([str(selftest)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, CMPQ_EMU_SCHEDULE="sideways"))
    assert proc.returncode != 0
    assert "CMPQ_EMU_SCHEDULE must be forward, reverse, random or random:<seed>" in proc.stdout


def test_ucontext_fallback(tmp_path):
    """The portable context switch (used off x86-64) passes the same checks."""
    _run(_build(tmp_path, "selftest_ucontext", ["-DCMPQ_EMU_UCONTEXT=1"]), "reverse")
