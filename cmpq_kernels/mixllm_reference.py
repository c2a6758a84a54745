"""Pure-PyTorch ground truth for a :class:`~cmpq_kernels.mixllm_format.MixLLMLayer` (docs/DESIGN.md §9).

The arithmetic every MixLLM kernel must reproduce, written for obviousness:

* activations (W*A8): per token ``m`` and 128-wide input group ``g`` (the weights' groups, last one partial),
  ``scale_x = fp16(absmax / 127)`` (the division in FP32, then rounded to fp16), and
  ``q_x = clamp(round_half_even(x_f32 / float(scale_x)), -127, 127)``; a group whose scale is 0 gets ``q_x = 0``.
  A group whose scale is not finite (NaN/Inf in ``x``, or ``absmax / 127`` above the fp16 range) gets
  ``scale_x = NaN`` and ``q_x = 0``, so exactly that token's outputs are NaN;
* per group, in int32 (exact): ``acc_g = sum_k q_x[m, k] * (q_w[n, k] - z[n, g])`` (8-bit rows: ``z = 0``);
* ``y[m, n] = sum_g float(acc_g) * (float(s_w[n, g]) * float(s_x[m, g]))`` in FP32, then ``+ bias`` in FP32,
  then rounded once to ``x.dtype``. Kernels may sum over ``g`` in another order: they match to the FP32 rounding
  of that sum (:func:`term_magnitude` gives the scale the tests' bound is relative to).

W*A16 (``act_bits=16``) multiplies ``x`` by the exactly dequantized weights ``(q - z) * s``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .mixllm_format import GROUP, MixLLMLayer, groups_of

ACT_BITS = (8, 16)


def _grouped(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` ``[m, k]`` as float32 ``[m, G, 128]``, the last group zero-padded."""
    g = groups_of(k)
    padded = torch.zeros(x.shape[0], g * GROUP, dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    return padded.reshape(x.shape[0], g, GROUP)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_x int8 [m, k], scale_x fp16 [m, G])`` of ``x`` ``[m, k]`` (any float dtype), as the module docstring says."""
    m, k = x.shape
    xg = _grouped(x, k)
    amax = xg.abs().amax(dim=2)  # NaN propagates
    scale = (amax / 127).to(torch.float16)
    scale = torch.where(torch.isfinite(scale), scale, torch.full_like(scale, float("nan")))
    s = scale.float()[:, :, None]
    usable = torch.isfinite(s) & (s > 0)
    q = torch.where(usable, torch.round(xg / torch.where(usable, s, torch.ones_like(s))), torch.zeros_like(xg))
    q = q.clamp(-127, 127).to(torch.int8).reshape(m, -1)[:, :k]
    return q.contiguous(), scale


def weight_codes(layer: MixLLMLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows int64 [n], q - z int32 [n, k], s_w float32 [n, G])``: every stored row's centred codes and scales,
    8-bit rows first, with the output row each one belongs to."""
    zeros = layer.zeros().to(torch.int32).repeat_interleave(GROUP, dim=1)[:, :layer.k]
    centred = torch.cat([layer.q8.cpu().to(torch.int32), layer.codes4().to(torch.int32) - zeros])
    scales = torch.cat([layer.s8.cpu(), layer.s4.cpu()]).float()
    rows = torch.cat([layer.idx8, layer.idx4]).cpu().long()
    return rows, centred, scales


def group_accumulators(q_x: torch.Tensor, layer: MixLLMLayer) -> torch.Tensor:
    """The exact integer part: int32 ``[m, n, G]``, ``acc[m, n, g] = sum_{k in g} q_x[m, k] (q_w[n, k] - z[n, g])``
    with ``n`` in output-row order."""
    rows, centred, _ = weight_codes(layer)
    qx = _grouped(q_x, layer.k).double()  # integers below 2^22 in magnitude: exact in float64
    qw = _grouped(centred, layer.k).double()
    acc = torch.einsum("mgk,ngk->mng", qx, qw)
    out = torch.empty_like(acc)
    out[:, rows] = acc
    return out.round().to(torch.int32)


def _scales_by_row(layer: MixLLMLayer) -> torch.Tensor:
    rows, _, scales = weight_codes(layer)
    out = torch.empty_like(scales)
    out[rows] = scales
    return out


def scale_products(s_x: torch.Tensor, layer: MixLLMLayer) -> torch.Tensor:
    """``float(s_w[n, g]) * float(s_x[m, g])`` rounded to FP32, ``[m, n, G]``."""
    return s_x.float()[:, None, :] * _scales_by_row(layer)[None, :, :]


def dequantize(layer: MixLLMLayer) -> torch.Tensor:
    """Dense ``W`` float32 ``[n, k]`` in output-row order: ``(q - z) * s`` (exact in FP32)."""
    rows, centred, scales = weight_codes(layer)
    w = centred.float() * scales.repeat_interleave(GROUP, dim=1)[:, :layer.k]
    out = torch.empty_like(w)
    out[rows] = w
    return out


def term_magnitude(x: torch.Tensor, layer: MixLLMLayer, bias: Optional[torch.Tensor] = None,
                   act_bits: int = 8) -> torch.Tensor:
    """``sum_g |float(acc_g) * scale product| + |bias|`` (A8) or ``sum_k |x w| + |bias|`` (A16), float64
    ``[m, n]``: what an FP32 summation error is relative to."""
    x = x.reshape(-1, layer.k)
    if act_bits == 8:
        q_x, s_x = quantize_activations(x)
        mag = (group_accumulators(q_x, layer).double() * scale_products(s_x, layer).double()).abs().sum(2)
    else:
        mag = x.double().abs() @ dequantize(layer).double().abs().T
    bias = layer.bias if bias is None else bias
    return mag if bias is None else mag + bias.double().abs()


def linear(x: torch.Tensor, layer: MixLLMLayer, bias: Optional[torch.Tensor] = None, act_bits: int = 8) -> torch.Tensor:
    """``y`` ``[..., n]`` in ``x.dtype`` by the exact arithmetic of the module docstring (``bias`` defaults to
    ``layer.bias``)."""
    if act_bits not in ACT_BITS:
        raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
    if x.shape[-1] != layer.k:
        raise ValueError(f"x: last dimension must be in_features={layer.k}, got shape {tuple(x.shape)}")
    flat = x.reshape(-1, layer.k)
    if act_bits == 8:
        q_x, s_x = quantize_activations(flat)
        terms = group_accumulators(q_x, layer).float() * scale_products(s_x, layer)
        y = torch.zeros(flat.shape[0], layer.n, dtype=torch.float32)
        for g in range(layer.groups):  # FP32, in group order
            y += terms[:, :, g]
    else:
        y = (flat.double() @ dequantize(layer).double().T).float()
    bias = layer.bias if bias is None else bias
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.n)
