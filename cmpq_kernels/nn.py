"""``CMPQLinear``: a drop-in ``nn.Linear`` replacement holding one packed CMPQ layer."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import ops
from .format import FORMAT_VERSION, GROUP_CODES, SEGMENT_BITS, CMPQLayer

_FIELDS = ("perm", "codes4", "codes3", "codes2", "codebook4", "codebook3", "codebook2", "row_ptr", "col", "val")


class CMPQLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` stored in the CMPQ packed format.

    The packed tensors are buffers, so ``state_dict()`` and ``.to(device)`` work as for any module.
    FP16 codebooks and outlier values are held as their int16 bit patterns: ``model.half()`` /
    ``model.to(torch.bfloat16)`` must not re-round them, and integer buffers are left alone by those
    calls. The bias (if any) is an ordinary floating-point buffer and follows the module's dtype.

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
        tensors = (layer.perm, *layer.codes, *(cb.view(torch.int16) for cb in layer.codebooks), layer.row_ptr,
                   layer.col, layer.val.view(torch.int16))
        for name, tensor in zip(_FIELDS, tensors):
            self.register_buffer(name, tensor)
        self.register_buffer("bias", layer.bias)

    @property
    def layer(self) -> CMPQLayer:
        """The packed layer as a :class:`CMPQLayer` view of this module's buffers (no copy)."""
        return CMPQLayer(
            n=self.out_features,
            k=self.in_features,
            bits=self.bits,
            seg_k=tuple(c.shape[1] // bits * GROUP_CODES
                        for c, bits in zip((self.codes4, self.codes3, self.codes2), SEGMENT_BITS)),
            perm=self.perm,
            codes=(self.codes4, self.codes3, self.codes2),
            codebooks=tuple(cb.view(torch.float16) for cb in (self.codebook4, self.codebook3, self.codebook2)),
            row_ptr=self.row_ptr,
            col=self.col,
            val=self.val.view(torch.float16),
            bias=self.bias,
            codebook_rows=self.codebook_rows,
            format_version=self.format_version,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: float = 3.0, outlier_fraction: float = 0.005) -> "CMPQLinear":
        """Quantize an ``nn.Linear`` with the calibration-free *stand-in* quantizer.

        No activations are seen, so this is for quick experiments and tests; for real models use
        :func:`cmpq_kernels.quantize.quantize_model` (or :func:`~cmpq_kernels.quantize.quantize_weight`
        with calibration statistics). See :mod:`cmpq_kernels.standin` for what it does. The result keeps
        the linear's bias (in its dtype) and is placed on the linear's device.
        """
        from .standin import quantize_standin

        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        bias = None if linear.bias is None else linear.bias.detach().cpu().contiguous()
        layer = quantize_standin(linear.weight, bits=bits, outlier_fraction=outlier_fraction, bias=bias)
        return cls(layer).to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gemm(x.contiguous(), self.layer)

    def extra_repr(self) -> str:
        layer = self.layer
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits:g}, "
                f"effective_bits={layer.effective_bits:.3f}, outliers={layer.nnz}, bias={self.bias is not None}, "
                f"format_version={FORMAT_VERSION}")
