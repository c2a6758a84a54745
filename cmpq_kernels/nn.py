"""``CMPQLinear``: a drop-in ``nn.Linear`` replacement holding one packed CMPQ layer.

Quantizing an ``nn.Linear`` into one is the quantizer's job (:func:`cmpq_kernels.quantize_linear`); this module
only holds and runs the packed layer.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .format import FORMAT_VERSION, LAYER_FIELDS, CMPQLayer


class CMPQLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` stored in the CMPQ packed format.

    The packed tensors are buffers named by :data:`~cmpq_kernels.format.LAYER_FIELDS`, so ``state_dict()`` and
    ``.to(device)`` work as for any module. FP16 codebooks and outlier values are held as their int16 bit
    patterns: ``model.half()`` / ``model.to(torch.bfloat16)`` must not re-round them, and integer buffers are
    left alone by those calls. The bias (if any) is an ordinary floating-point buffer and follows the module's
    dtype.

    ``forward`` accepts ``[..., in_features]`` float32/float16/bfloat16 and returns ``x.dtype``.
    """

    def __init__(self, layer: CMPQLayer) -> None:
        super().__init__()
        layer.validate()
        self.in_features = layer.k
        self.out_features = layer.n
        self.bits = layer.bits
        self.codebook_rows = layer.codebook_rows
        self.format_version = layer.format_version
        fields = layer.fields()
        self._fp16_fields = tuple(name for name, t in fields.items() if t.dtype == torch.float16)
        for name, tensor in fields.items():  # fp16 codebooks / values as their int16 bit patterns
            self.register_buffer(name, tensor.view(torch.int16) if name in self._fp16_fields else tensor)
        self.register_buffer("bias", layer.bias)
        self._op_fields: tuple = ((), ())  # (buffers, op arguments) cached by _fields()

    @property
    def layer(self) -> CMPQLayer:
        """The packed layer as a :class:`CMPQLayer` view of this module's buffers (no copy)."""
        return CMPQLayer.from_fields(dict(zip(LAYER_FIELDS, self._as_fields(self._layer_buffers()))),
                                     n=self.out_features, k=self.in_features, bits=self.bits,
                                     codebook_rows=self.codebook_rows, bias=self.bias)

    def _layer_buffers(self) -> tuple:
        return tuple(self._buffers[name] for name in LAYER_FIELDS)

    def _as_fields(self, buffers: tuple) -> tuple:
        """The packed buffers as op arguments: the fp16 ones viewed back from their int16 bit patterns."""
        return tuple(t.view(torch.float16) if name in self._fp16_fields else t for name, t in zip(LAYER_FIELDS, buffers))

    def _fields(self) -> tuple:
        """:meth:`_as_fields`, cached while the buffers are the same tensor objects: rebuilding it per call costs
        more than a small layer's kernel. Whatever replaces a buffer (assignment, ``.to()``,
        ``load_state_dict(assign=True)``) changes its identity, so the check catches it."""
        buffers = self._layer_buffers()
        cached, fields = self._op_fields
        if len(cached) != len(buffers) or any(a is not b for a, b in zip(cached, buffers)):
            fields = self._as_fields(buffers)
            self._op_fields = (buffers, fields)
        return fields

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or torch.compiler.is_compiling():
            # Non-tensors reach ops.gemm's TypeError; traced graphs take the plain path, without the cache.
            return ops.gemm(x.contiguous() if isinstance(x, torch.Tensor) else x, self.layer)
        return ops.gemm_fields(x.contiguous(), self._fields(), n=self.out_features, k=self.in_features, bias=self.bias,
                               codebook_rows=self.codebook_rows, format_version=self.format_version)

    def extra_repr(self) -> str:
        layer = self.layer
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits:g}, "
                f"effective_bits={layer.effective_bits:.3f}, outliers={layer.nnz}, bias={self.bias is not None}, "
                f"format_version={FORMAT_VERSION}")
