"""Pure-PyTorch ground truth for a :class:`~cmpq_kernels.format.CMPQLayer`.

Every kernel (CPU, CUDA, emulated) is tested against these two functions. They favour obviousness over
speed and read nothing but the format.
"""
from __future__ import annotations

from typing import Optional

import torch

from .format import SEGMENT_BITS, CMPQLayer, unpack_codes


def dequantize_packed(layer: CMPQLayer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense weights ``[n, k]`` in *packed* column order (codebook values plus outlier residuals)."""
    row_codebook = torch.arange(layer.n, device=layer.perm.device) // layer.codebook_rows
    segments = []
    for s, bits in enumerate(SEGMENT_BITS):
        codes = torch.from_numpy(unpack_codes(layer.codes[s].cpu().numpy(), bits)).long().to(layer.perm.device)
        codebook = layer.codebooks[s].to(dtype)[row_codebook]  # [n, 2**bits]
        segments.append(torch.gather(codebook, 1, codes))
    w = torch.cat(segments, dim=1)
    counts = layer.row_ptr[1:].long() - layer.row_ptr[:-1].long()
    rows = torch.repeat_interleave(torch.arange(layer.n, device=w.device), counts)
    w.index_put_((rows, layer.col.long()), layer.val.to(dtype), accumulate=True)
    return w


def dequantize(layer: CMPQLayer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense weights ``W`` ``[n, k]`` in the original channel order, as ``dtype``."""
    w_packed = dequantize_packed(layer, dtype)
    w = torch.empty_like(w_packed)
    w[:, layer.perm.long()] = w_packed
    return w


def linear(x: torch.Tensor, layer: CMPQLayer, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T + bias`` computed in float64 and returned in ``x.dtype``; ``x`` is ``[..., k]``.

    ``bias`` defaults to ``layer.bias``; pass a tensor to override it.
    """
    if x.shape[-1] != layer.k:
        raise ValueError(f"x: last dimension must be in_features={layer.k}, got shape {tuple(x.shape)}")
    bias = layer.bias if bias is None else bias
    y = x.double() @ dequantize(layer, torch.float64).T
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)
