"""Python entry points to the ``torch.ops.cmpq`` custom ops, and their fake (meta) implementations.

The schemas and the CPU kernels are registered by ``csrc/cmpq_ops.cpp``; CUDA implementations register
against the same schemas. The fake implementations here repeat the C++ shape/dtype rules so
``torch.compile`` and CUDA-graph capture see the same contract without running a kernel.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import mixllm_format as mix
from .format import FORMAT_VERSION, LAYER_FIELDS, SEGMENT_BITS, CMPQLayer

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _layer_args(layer: CMPQLayer) -> tuple:
    """The layer's packed tensors in the ops' argument order (:data:`LAYER_FIELDS`)."""
    return tuple(layer.fields().values())


def check_activation(x: torch.Tensor, layer: CMPQLayer) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the problem if ``x`` cannot be multiplied by ``layer``."""
    if not isinstance(layer, CMPQLayer):
        raise TypeError(f"layer: expected a CMPQLayer, got {type(layer).__name__} (a CMPQLinear's is .layer)")
    _check_x(x, layer.k, layer.perm.device)


def _check_x(x: torch.Tensor, k: int, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x: dtype must be one of float32/float16/bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: last dimension must be in_features={k}, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"x: is on {x.device} but the layer is on {device}; move one of them")
    if not x.is_contiguous():
        raise ValueError("x: must be contiguous (call .contiguous())")


def gemm(x: torch.Tensor, layer: CMPQLayer, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T + bias`` straight from the packed layer.

    Args:
        x: ``[..., k]`` float32/float16/bfloat16, contiguous, on the layer's device.
        layer: a validated :class:`CMPQLayer`.
        bias: optional ``[n]``; defaults to ``layer.bias``.

    Returns:
        ``[..., n]`` in ``x.dtype``. Accumulation is FP32 on every backend.
    """
    check_activation(x, layer)
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    return gemm_fields(x, _layer_args(layer), n=layer.n, k=layer.k, bias=layer.bias if bias is None else bias,
                       codebook_rows=layer.codebook_rows, format_version=layer.format_version)


def gemm_fields(x: torch.Tensor, fields: tuple, *, n: int, k: int, bias: Optional[torch.Tensor], codebook_rows: int,
                format_version: int) -> torch.Tensor:
    """:func:`gemm` on a layer given as its packed tensors in :data:`LAYER_FIELDS` order (what a module holding
    them passes without building a :class:`CMPQLayer` per call). ``x`` is checked; the tensors are checked by
    the op itself."""
    _check_x(x, k, fields[0].device)
    y = torch.ops.cmpq.gemm(x.reshape(-1, k), *fields, bias, codebook_rows, format_version)
    return y.reshape(*x.shape[:-1], n)


def dequantize(layer: CMPQLayer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``W`` ``[n, k]`` in original channel order, decoded by the compiled kernel of the layer's device."""
    return torch.ops.cmpq.dequantize(*_layer_args(layer), layer.codebook_rows, layer.format_version, dtype)


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[rows, groups * 32]`` from packed int32 words ``[rows, groups * bits]`` (C++ layout)."""
    return torch.ops.cmpq.unpack_codes(words, bits)


def _split_fields(name: str, args: tuple) -> tuple[dict[str, torch.Tensor], tuple]:
    """Op arguments after the activation -> (packed tensors by :data:`LAYER_FIELDS` name, the remaining arguments)."""
    fields = dict(zip(LAYER_FIELDS, args))
    n, k = fields["row_ptr"].shape[0] - 1, fields["perm"].shape[0]
    for bits in SEGMENT_BITS:
        codes = fields[f"codes{bits}"]
        torch._check(codes.dim() == 2 and codes.shape[0] == n,
                     lambda: f"cmpq.{name}: {bits}-bit codes must have n={n} rows, got {tuple(codes.shape)}")
    return {"n": n, "k": k, **fields}, args[len(LAYER_FIELDS):]


def _check_version(name: str, format_version: int) -> None:
    torch._check(format_version == FORMAT_VERSION, lambda: f"cmpq.{name}: unsupported format_version {format_version}")


# The fake (meta) implementations take the schema's arguments positionally: x, then LAYER_FIELDS, then the rest.
@torch.library.register_fake("cmpq::gemm")
def _gemm_fake(x, *args):
    layer, (bias, _codebook_rows, format_version) = _split_fields("gemm", args)
    n, k = layer["n"], layer["k"]
    _check_version("gemm", format_version)
    torch._check(x.dtype in ACTIVATION_DTYPES, lambda: f"cmpq.gemm: x must be float32/float16/bfloat16, got {x.dtype}")
    torch._check(x.dim() == 2, lambda: f"cmpq.gemm: x must be 2-D [m, k], got {tuple(x.shape)}")
    torch._check(x.shape[1] == k, lambda: f"cmpq.gemm: x has {x.shape[1]} features but the layer has k={k}")
    if bias is not None:
        torch._check(bias.shape == (n,), lambda: f"cmpq.gemm: bias must be [{n}], got {tuple(bias.shape)}")
    return x.new_empty((x.shape[0], n))


@torch.library.register_fake("cmpq::dequantize")
def _dequantize_fake(*args):
    layer, (_codebook_rows, format_version, dtype) = _split_fields("dequantize", args)
    _check_version("dequantize", format_version)
    return layer["perm"].new_empty((layer["n"], layer["k"]), dtype=dtype)


@torch.library.register_fake("cmpq::unpack_codes")
def _unpack_codes_fake(words, bits):
    torch._check(bits in SEGMENT_BITS, lambda: f"cmpq.unpack_codes: bits must be 2, 3 or 4, got {bits}")
    return words.new_empty((words.shape[0], words.shape[1] // bits * 32), dtype=torch.uint8)


# ---- MixLLM (torch.ops.cmpq.mixllm_*, csrc/mixllm_ops.cpp) ------------------------------------------------


def mixllm_gemm(x: torch.Tensor, layer: mix.MixLLMLayer, bias: Optional[torch.Tensor] = None,
                act_bits: int = 8) -> torch.Tensor:
    """``x @ W.T + bias`` of a MixLLM layer straight from its packed tensors.

    Args:
        x: ``[..., k]`` float32/float16/bfloat16, contiguous, on the layer's device.
        layer: a validated :class:`~cmpq_kernels.mixllm_format.MixLLMLayer`.
        bias: optional ``[n]``; defaults to ``layer.bias``.
        act_bits: 8 quantizes ``x`` per token and 128-wide group inside the op (W4/W8 x A8, exact integer group
            sums); 16 multiplies ``x`` by the exactly dequantized weights (W x A16).

    Returns:
        ``[..., n]`` in ``x.dtype``; FP32 accumulation (docs/DESIGN.md §9).
    """
    if not isinstance(layer, mix.MixLLMLayer):
        raise TypeError(f"layer: expected a MixLLMLayer, got {type(layer).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    return mixllm_gemm_fields(x, tuple(layer.fields().values()), n=layer.n, k=layer.k,
                              bias=layer.bias if bias is None else bias, act_bits=act_bits,
                              format_version=layer.format_version)


def mixllm_gemm_fields(x: torch.Tensor, fields: tuple, *, n: int, k: int, bias: Optional[torch.Tensor],
                       act_bits: int, format_version: int) -> torch.Tensor:
    """:func:`mixllm_gemm` on a layer given as its tensors in :data:`~cmpq_kernels.mixllm_format.LAYER_FIELDS` order
    (what a module holding them passes); ``x`` is checked here, the tensors by the op."""
    _check_x(x, k, fields[0].device)
    y = torch.ops.cmpq.mixllm_gemm(x.reshape(-1, k), *fields, bias, act_bits, format_version)
    return y.reshape(*x.shape[:-1], n)


def mixllm_dequantize(layer: mix.MixLLMLayer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``W`` ``[n, k]`` in output-row order, decoded by the compiled kernel."""
    return torch.ops.cmpq.mixllm_dequantize(*layer.fields().values(), layer.format_version, dtype)


def mixllm_quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantizer: ``(q int8 [m, k], scale fp16 [m, G])`` of ``x`` ``[m, k]``."""
    return torch.ops.cmpq.mixllm_quantize_activations(x)


def _mixllm_layer_shapes(name: str, args: tuple) -> tuple[int, int, tuple]:
    """``(n, k, remaining arguments)`` from a MixLLM op's layer tensors (``LAYER_FIELDS`` order)."""
    fields = dict(zip(mix.LAYER_FIELDS, args))
    n = fields["idx8"].shape[0] + fields["idx4"].shape[0]
    q8 = fields["q8"]
    torch._check(q8.dim() == 2, lambda: f"cmpq.{name}: q8 must be 2-D, got {tuple(q8.shape)}")
    return n, q8.shape[1], args[len(mix.LAYER_FIELDS):]


@torch.library.register_fake("cmpq::mixllm_gemm")
def _mixllm_gemm_fake(x, *args):
    n, k, (bias, act_bits, format_version) = _mixllm_layer_shapes("mixllm_gemm", args)
    torch._check(format_version == mix.FORMAT_VERSION,
                 lambda: f"cmpq.mixllm_gemm: unsupported format_version {format_version}")
    torch._check(act_bits in (8, 16), lambda: f"cmpq.mixllm_gemm: act_bits must be 8 or 16, got {act_bits}")
    torch._check(x.dtype in ACTIVATION_DTYPES, lambda: f"cmpq.mixllm_gemm: x must be float32/float16/bfloat16")
    torch._check(x.dim() == 2 and x.shape[1] == k, lambda: f"cmpq.mixllm_gemm: x must be [m, {k}], got {tuple(x.shape)}")
    if bias is not None:
        torch._check(bias.shape == (n,), lambda: f"cmpq.mixllm_gemm: bias must be [{n}], got {tuple(bias.shape)}")
    return x.new_empty((x.shape[0], n))


@torch.library.register_fake("cmpq::mixllm_dequantize")
def _mixllm_dequantize_fake(*args):
    n, k, (format_version, dtype) = _mixllm_layer_shapes("mixllm_dequantize", args)
    torch._check(format_version == mix.FORMAT_VERSION,
                 lambda: f"cmpq.mixllm_dequantize: unsupported format_version {format_version}")
    return args[0].new_empty((n, k), dtype=dtype)


@torch.library.register_fake("cmpq::mixllm_quantize_activations")
def _mixllm_quantize_activations_fake(x):
    torch._check(x.dim() == 2, lambda: f"cmpq.mixllm_quantize_activations: x must be 2-D, got {tuple(x.shape)}")
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], mix.groups_of(x.shape[1])),
                                                                dtype=torch.float16)


@torch.library.register_fake("cmpq::mixllm_unpack_nibbles")
def _mixllm_unpack_nibbles_fake(packed, count):
    return packed.new_empty((packed.shape[0], count))
