"""``MixLLMLinear``: a drop-in ``nn.Linear`` replacement holding one packed MixLLM layer (docs/DESIGN.md §9).

Quantizing an ``nn.Linear`` into one is the quantizer's job (:func:`cmpq_kernels.quantize_model_mixllm`); this
module only holds and runs the packed layer.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .mixllm_format import FORMAT_VERSION, LAYER_FIELDS, MixLLMLayer

#: the fp16 scale tensors, held as int16 bit patterns so ``.half()`` / ``.bfloat16()`` cannot re-round them
_FP16_FIELDS = ("s8", "s4")


class MixLLMLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` in the MixLLM packed format (8-bit and 4-bit output rows).

    The packed tensors are buffers named by :data:`~cmpq_kernels.mixllm_format.LAYER_FIELDS`, so ``state_dict()``
    and ``.to(device)`` work as for any module; the bias is an ordinary floating-point buffer.

    Args:
        layer: the packed layer (validated here).
        act_bits: 8 quantizes activations per token and 128-wide group inside the op (W4.4A8 and friends);
            16 multiplies unquantized activations by the exactly dequantized weights (W*A16). An attribute, so
            it can be changed on a loaded model.
    """

    def __init__(self, layer: MixLLMLayer, act_bits: int = 8) -> None:
        super().__init__()
        layer.validate()
        if act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
        self.in_features, self.out_features = layer.k, layer.n
        self.act_bits = act_bits
        self.format_version = layer.format_version
        for name, tensor in layer.fields().items():
            self.register_buffer(name, tensor.view(torch.int16) if name in _FP16_FIELDS else tensor)
        self.register_buffer("bias", layer.bias)

    def _fields(self) -> tuple:
        return tuple(self._buffers[name].view(torch.float16) if name in _FP16_FIELDS else self._buffers[name]
                     for name in LAYER_FIELDS)

    @property
    def layer(self) -> MixLLMLayer:
        """The packed layer as a :class:`MixLLMLayer` view of this module's buffers (no copy)."""
        return MixLLMLayer.from_fields(dict(zip(LAYER_FIELDS, self._fields())), n=self.out_features,
                                       k=self.in_features, bias=self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        return ops.mixllm_gemm_fields(x.contiguous(), self._fields(), n=self.out_features, k=self.in_features,
                                      bias=self.bias, act_bits=self.act_bits, format_version=self.format_version)

    def extra_repr(self) -> str:
        layer = self.layer
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows_8bit={layer.n8}, "
                f"act_bits={self.act_bits}, effective_bits={layer.effective_bits:.3f}, bias={self.bias is not None}, "
                f"format_version={FORMAT_VERSION}")
