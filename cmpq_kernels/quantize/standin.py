"""A calibration-free stand-in quantizer: weight -> :class:`CMPQLayer`.

Quick packed layers without calibration data (:func:`~.linear.quantize_linear` without inputs, kernel tests,
benchmarks); real
models go through :mod:`cmpq_kernels.quantize`. It uses the ``cmpq`` allocator with weight-column energy in
place of activation salience, fits equal-frequency (quantile) codebooks instead of weighted k-means, and
keeps the largest residuals as outliers.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..format import SEGMENT_BITS, CMPQLayer
from .allocate import allocate_cmpq, permutation
from .layer import check_weight


def _codebook_and_codes(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row quantile codebooks (fp16, sorted) and nearest-entry codes for ``w`` ``[n, c]``."""
    levels = 1 << bits
    q = (torch.arange(levels, dtype=torch.float32) + 0.5) / levels
    codebook = torch.quantile(w, q, dim=1).T.contiguous().half()  # [n, levels], sorted
    cb = codebook.float()
    midpoints = ((cb[:, 1:] + cb[:, :-1]) / 2).contiguous()
    codes = torch.searchsorted(midpoints, w.contiguous())
    return codebook, codes


def quantize_standin(weight: torch.Tensor, bits: float = 3.0, outlier_fraction: float = 0.005,
                     bias: Optional[torch.Tensor] = None) -> CMPQLayer:
    """Quantize ``weight`` ``[n, k]`` to a :class:`CMPQLayer` with the stand-in method (see module doc).

    Args:
        weight: float tensor ``[out_features, in_features]``; in_features a multiple of 32; finite.
        bits: average code bits per weight, 2.0 ..4.0.
        outlier_fraction: fraction of weights kept exactly as FP16 residual outliers (0 allowed).
        bias: optional ``[out_features]`` stored with the layer.
    """
    if not (0.0 <= outlier_fraction < 1.0):
        raise ValueError(f"outlier_fraction must be in [0, 1), got {outlier_fraction}")
    w = check_weight(weight)
    n, k = w.shape
    perm, seg_k = permutation(allocate_cmpq(w.pow(2).sum(0), bits))  # weight energy stands in for salience
    w_packed = w[:, perm]
    codes, codebooks, dense = [], [], []
    for part, b in zip(torch.split(w_packed, list(seg_k), dim=1), SEGMENT_BITS):
        if part.shape[1] == 0:
            codebooks.append(torch.zeros(n, 1 << b, dtype=torch.float16))
            codes.append(np.zeros((n, 0), dtype=np.uint8))
            dense.append(part)
            continue
        codebook, c = _codebook_and_codes(part, b)
        codebooks.append(codebook)
        codes.append(c.to(torch.uint8).numpy())
        dense.append(torch.gather(codebook.float(), 1, c))
    residual = w_packed - torch.cat(dense, dim=1)
    count = int(round(outlier_fraction * n * k))
    top = torch.topk(residual.abs().flatten(), count).indices if count else torch.zeros(0, dtype=torch.long)
    rows, cols = top // k, top % k
    return CMPQLayer.from_codes(bits=bits, perm=perm.numpy(), codes=tuple(codes), codebooks=tuple(codebooks),
                                outlier_rows=rows.numpy(), outlier_cols=cols.numpy(),
                                outlier_vals=residual[rows, cols].half(), bias=bias)
