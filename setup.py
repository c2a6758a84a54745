"""Build: a CPU CppExtension always; a CUDAExtension when a CUDA torch and a CUDA toolkit are present.

Switches (environment):
  CMPQ_FORCE_CUDA=1|0   build the CUDA extension, or skip it, regardless of detection (1 fails loudly if
                        it cannot be built).
  CMPQ_CUDA_ARCHS       semicolon list of SM targets for explicit -gencode flags, default "80;86;89;90a".
                        Always explicit: without a visible GPU, torch's automatic arch list fails.
  CMPQ_CUDA_PTX         virtual arch also embedded as PTX, which the driver JIT-compiles on GPUs newer than
                        every SM target, default "90" (empty: none). Not "90a": arch-specific PTX runs on
                        that SM only.
  CMPQ_BUILD_EMU=0      skip the emulated-kernel extension (cmpq_kernels._C_emu, a CPU test tool): a GPU session
                        saves its build time; the emulated tests then skip.
"""
import glob
import os
import sys

from setuptools import setup

# cpp_extension reads CUDA_HOME at import time.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wextra"]
EMU_FLAGS = ["-O2", "-g0", "-Wall", "-Wextra", "-Wno-unknown-pragmas"]
# The emulated kernels' translation unit is instrumented for the shared-memory hazard checker (csrc/emu/emu.h).
EMU_KERNELS, EMU_KERNEL_FLAGS = "csrc/emu/kernels.cpp", ["-std=c++17", "-fsanitize=thread", *EMU_FLAGS]
CUDA_SOURCES = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))


def want_cuda() -> bool:
    force = os.environ.get("CMPQ_FORCE_CUDA")
    has_toolkit = cpp_extension.CUDA_HOME is not None
    if force == "0":
        return False
    if force == "1":
        if torch.version.cuda is None or not has_toolkit:
            sys.exit(f"CMPQ_FORCE_CUDA=1 but torch.version.cuda={torch.version.cuda} and "
                     f"CUDA_HOME={cpp_extension.CUDA_HOME}: install a CUDA torch and toolkit or unset it")
        if not CUDA_SOURCES:
            sys.exit("CMPQ_FORCE_CUDA=1 but this checkout has no csrc/cuda sources yet")
        return True
    return torch.version.cuda is not None and has_toolkit and bool(CUDA_SOURCES)


def gencode_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("CMPQ_CUDA_ARCHS", "80;86;89;90a").split(";") if a.strip()]
    ptx = os.environ.get("CMPQ_CUDA_PTX", "90").strip()
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs] + \
        ([f"-gencode=arch=compute_{ptx},code=compute_{ptx}"] if ptx else [])


ext_modules = [
    cpp_extension.CppExtension(
        "cmpq_kernels._C",
        ["csrc/cmpq_ops.cpp", "csrc/mixllm_ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))],
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    ),
]
if os.environ.get("CMPQ_BUILD_EMU", "1") != "0":
    # The CUDA kernels' exact sources built for the host under the SIMT emulation (csrc/emu): this is how
    # the CPU-only test suite checks kernel logic. torch.ops.cmpq_emu.*; not used in inference.
    # The kernels themselves (EMU_KERNELS) are compiled apart, see BuildExtension.
    ext_modules.append(
        cpp_extension.CppExtension(
            "cmpq_kernels._C_emu",
            ["csrc/emu_ops.cpp", "csrc/emu/emu.cpp", "csrc/emu/hazards.cpp"],
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": EMU_FLAGS},
        )
    )
if want_cuda():
    print(f"cmpq_kernels: building the CUDA extension for {gencode_flags()}")
    ext_modules.append(
        cpp_extension.CUDAExtension(
            "cmpq_kernels._C_cuda",
            CUDA_SOURCES,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3", "-Xptxas=-v", *gencode_flags()]},
        )
    )
else:
    print("cmpq_kernels: building the CPU extension only (no CUDA torch/toolkit/sources, or CMPQ_FORCE_CUDA=0)")



class BuildExtension(cpp_extension.BuildExtension):
    """torch's build, plus the emulated kernels compiled with their own flags (an extension has one set)."""

    def build_extension(self, ext):
        if ext.name == "cmpq_kernels._C_emu":
            ext.extra_objects = self.compiler.compile(
                [EMU_KERNELS], output_dir=os.path.join(self.build_temp, "instrumented"),
                include_dirs=ext.include_dirs, extra_postargs=EMU_KERNEL_FLAGS)
        super().build_extension(ext)


setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
