"""Quantize one ``nn.Linear`` into a :class:`~cmpq_kernels.nn.CMPQLinear` (for engines that manage their own layers)."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..nn import CMPQLinear
from .calibrate import StatsAccumulator
from .layer import quantize_weight
from .options import QuantOptions
from .standin import quantize_standin


def quantize_linear(linear: nn.Linear, bits: float = 3.0, inputs: Optional[torch.Tensor] = None,
                    options: Optional[QuantOptions] = None, *, outlier_fraction: float = 0.005,
                    **overrides: Any) -> CMPQLinear:
    """Quantize ``linear`` and return the packed module, on the linear's device.

    Args:
        linear: the layer; its bias is kept (in its dtype).
        bits: average code bits per weight in [2, 4].
        inputs: sample activations ``[..., in_features]`` of this layer (a few hundred tokens or more). With
            them the full CMPQ quantizer runs (:func:`~.layer.quantize_weight`: salience from ``mean(x^2)``,
            allocation, weighted k-means, both outlier kinds, error feedback from ``X^T X``). Without them the
            calibration-free stand-in runs (:mod:`.standin`: fine for tests and kernels, worse for real models).
        options, overrides: quantizer settings (:class:`QuantOptions` and/or its fields as keywords); need
            ``inputs``.
        outlier_fraction: stand-in only: share of weights kept as outliers.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
    bias = None if linear.bias is None else linear.bias.detach().cpu().contiguous()
    if inputs is None:
        if options is not None or overrides:
            raise TypeError(f"quantizer options {sorted(overrides) or 'options='} need calibration inputs (inputs=...)")
        layer = quantize_standin(linear.weight, bits=bits, outlier_fraction=outlier_fraction, bias=bias)
    else:
        opts = QuantOptions.resolve(options, overrides)
        _check_inputs(inputs, linear.in_features)
        stats = StatsAccumulator(linear.in_features, hessian=opts.error_feedback)
        stats.add(inputs)
        found = stats.finish()
        layer = quantize_weight(linear.weight, found.s2, bits, opts, hessian=found.hessian, bias=bias)
    return CMPQLinear(layer).to(linear.weight.device)


def _check_inputs(inputs: Any, in_features: int) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.shape[-1] != in_features or inputs.numel() == 0:
        raise ValueError(f"inputs: need a non-empty tensor [..., {in_features}], got "
                         f"{tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}")
    if not bool(torch.isfinite(inputs).all()):
        raise ValueError("inputs: contain NaN or Inf")
