"""cmpq_kernels: CMPQ channel-wise mixed-precision non-uniform quantization for LLM linear layers.

Import loads the compiled ops: the CPU extension always, the CUDA extension when it was built.
:func:`backends` says which are usable in this process.
"""
from __future__ import annotations

import importlib

import torch

from . import _C  # noqa: F401  (registers torch.ops.cmpq.* with CPU kernels)


def _load_error(error: ImportError) -> str:
    """Why the CUDA extension is unusable: not built at all, or built but refused by the loader."""
    if isinstance(error, ModuleNotFoundError) and error.name == "cmpq_kernels._C_cuda":
        return "not built (no CUDA torch or toolkit at install time, or CMPQ_FORCE_CUDA=0)"
    return f"{type(error).__name__}: {error}"  # e.g. a missing libcudart or a torch ABI mismatch


try:
    _C_cuda = importlib.import_module("cmpq_kernels._C_cuda")
    _CUDA_LOAD_ERROR: str | None = None
except ImportError as e:
    _C_cuda, _CUDA_LOAD_ERROR = None, _load_error(e)

from . import ops  # noqa: E402  (fake impls for torch.compile)
from .format import FORMAT_VERSION, CMPQLayer  # noqa: E402
from .mixllm_format import MixLLMLayer  # noqa: E402
from .mixllm_nn import MixLLMLinear  # noqa: E402
from .nn import CMPQLinear  # noqa: E402
from .quantize import QuantOptions, QuantReport, quantize_linear, quantize_model, quantize_model_mixllm  # noqa: E402
from .checkpoint import load_quantized, save_quantized  # noqa: E402
from .mixllm_checkpoint import load_mixllm, save_mixllm  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CMPQLayer", "CMPQLinear", "FORMAT_VERSION", "MixLLMLayer", "MixLLMLinear", "QuantOptions", "QuantReport",
           "backends", "load_mixllm", "load_quantized", "ops", "quantize_linear", "quantize_model", "quantize_model_mixllm",
           "save_mixllm", "save_quantized"]


def backends() -> dict[str, str | bool | list[str] | None]:
    """Which kernel backends this process can use.

    Returns a dict: ``cpu`` (always True), ``cpu_isa`` (what the CPU kernels use now: ``"avx512"``, ``"avx2"``
    or ``"scalar"``, or ``"avx512-int8"`` when ``CMPQ_CPU_SIMD`` asks for it; ``CMPQ_CPU_SIMD`` forces one),
    ``cpu_isas`` (every ISA this CPU runs), ``cuda_built``
    (the CUDA extension was compiled and loads), ``cuda`` (built *and* a GPU is visible), ``cuda_error``
    (None when ``cuda`` is True, else why not: the extension's import error, "not built ...", or no
    visible GPU).
    """
    cuda_built = _C_cuda is not None
    gpu = torch.cuda.is_available()
    return {
        "cpu": True,
        "cpu_isa": torch.ops.cmpq.cpu_isa(),
        "cpu_isas": list(torch.ops.cmpq.cpu_isas()),
        "cuda_built": cuda_built,
        "cuda": cuda_built and gpu,
        "cuda_error": _CUDA_LOAD_ERROR if not cuda_built else
        (None if gpu else "no CUDA device visible (torch.cuda.is_available() is False)"),
    }
