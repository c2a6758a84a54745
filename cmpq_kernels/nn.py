"""``CMPQLinear``: a drop-in ``nn.Linear`` replacement holding one packed CMPQ layer."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from . import ops
from .format import FORMAT_VERSION, GROUP_CODES, SEGMENT_BITS, CMPQLayer

#: the packed tensors of a layer, by the names CMPQLinear buffers and checkpoint tensors (``<module>.cmpq.<field>``) use.
LAYER_FIELDS = ("perm", "codes4", "codes3", "codes2", "codebook4", "codebook3", "codebook2", "row_ptr", "col", "val")


def layer_fields(layer: CMPQLayer) -> dict[str, torch.Tensor]:
    """The packed tensors of ``layer`` by :data:`LAYER_FIELDS` name (no copy)."""
    return dict(zip(LAYER_FIELDS, (layer.perm, *layer.codes, *layer.codebooks, layer.row_ptr, layer.col, layer.val)))


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``name`` inside ``root`` (e.g. ``model.layers.0.mlp.up_proj``)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


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
        for name, tensor in layer_fields(layer).items():  # fp16 codebooks / values as their int16 bit patterns
            self.register_buffer(name, tensor.view(torch.int16) if tensor.dtype == torch.float16 else tensor)
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
    def from_linear(cls, linear: nn.Linear, bits: float = 3.0, inputs: Optional[torch.Tensor] = None, *,
                    outlier_fraction: float = 0.005, **options: Any) -> "CMPQLinear":
        """Quantize one ``nn.Linear`` (for engines that manage their own layers).

        Args:
            linear: the layer; its bias is kept (in its dtype) and the result is placed on its device.
            bits: average code bits per weight in [2, 4].
            inputs: sample activations ``[..., in_features]`` of this layer (a few hundred tokens or more).
                With them the full CMPQ quantizer runs (:func:`~cmpq_kernels.quantize.quantize_weight`:
                salience from ``mean(x^2)``, greedy allocation, weighted k-means, both outlier kinds, error
                feedback from ``X^T X``); ``options`` go to it (``allocator``, ``codebook_rows``, ``p_act``,
                ``p_err``, ``error_feedback``, ...). Without them the calibration-free *stand-in* quantizer
                runs (:mod:`cmpq_kernels.standin`: fine for tests and kernels, worse for real models).
            outlier_fraction: stand-in only: share of weights kept as outliers.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        bias = None if linear.bias is None else linear.bias.detach().cpu().contiguous()
        if inputs is None:
            from .standin import quantize_standin

            if options:
                raise TypeError(f"options {sorted(options)} need calibration inputs (inputs=...)")
            layer = quantize_standin(linear.weight, bits=bits, outlier_fraction=outlier_fraction, bias=bias)
        else:
            layer = _calibrated_layer(linear, bits, inputs, bias, options)
        return cls(layer).to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Non-tensors go through unchanged so ops.gemm raises its TypeError rather than an AttributeError here.
        return ops.gemm(x.contiguous() if isinstance(x, torch.Tensor) else x, self.layer)

    def extra_repr(self) -> str:
        layer = self.layer
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits:g}, "
                f"effective_bits={layer.effective_bits:.3f}, outliers={layer.nnz}, bias={self.bias is not None}, "
                f"format_version={FORMAT_VERSION}")


def _calibrated_layer(linear: nn.Linear, bits: float, inputs: torch.Tensor, bias: Optional[torch.Tensor],
                      options: dict) -> CMPQLayer:
    from .quantize.calibrate import StatsAccumulator
    from .quantize.layer import quantize_weight

    if not isinstance(inputs, torch.Tensor) or inputs.shape[-1] != linear.in_features or inputs.numel() == 0:
        raise ValueError(f"inputs: need a non-empty tensor [..., {linear.in_features}], got "
                         f"{tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}")
    if not bool(torch.isfinite(inputs).all()):
        raise ValueError("inputs: contain NaN or Inf")
    feedback = options.get("error_feedback", True)
    stats = StatsAccumulator(linear.in_features, hessian=feedback)
    stats.add(inputs)
    found = stats.finish()
    return quantize_weight(linear.weight, found.s2, bits, hessian=found.hessian, bias=bias,
                           **{"error_feedback": feedback, **options})
