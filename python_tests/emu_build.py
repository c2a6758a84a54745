"""Builds of the SIMT emulation (csrc/emu) with the system C++ compiler, for tests that need their own: the
emulation's selftest (test_emu.py) and kernel mutants (test_barriers.py). The translation unit with the
kernels gets INSTRUMENT, whose hooks the hazard checker provides (csrc/emu/emu.h, Build)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CXX = os.environ.get("CXX", "g++")
INSTRUMENT = ["-fsanitize=thread"]


def compile_emu(args: list[str], csrc: Path = CSRC) -> None:
    """Runs the compiler with the emulation's flags and includes from `csrc`; fails the test on an error."""
    if shutil.which(CXX) is None:
        pytest.skip(f"no C++ compiler ({CXX}) on PATH")
    cmd = [CXX, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Wno-unknown-pragmas", f"-I{csrc}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
