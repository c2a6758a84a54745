"""Valid CMPQ layers with random contents, built in a second instead of by the (slow, CPU) quantizer.

Kernel timing does not depend on weight values, only on the stored tensors (dtypes, shapes, nnz), so the GPU
benchmark and the GPU session's check time and test layers made here. Generic: they belong in the package
(a ``cmpq_kernels.testing`` module) once someone may edit it.

Imports: stdlib, numpy, torch and cmpq_kernels only.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from cmpq_kernels.format import GROUP_CODES, SEGMENT_BITS, CMPQLayer
from cmpq_kernels.quantize.allocate import segment_sizes

# The stand-in quantizer's default (standin.quantize_standin), so random layers store what it stores.
OUTLIER_FRACTION = 0.005


def make_random_layer(n: int, k: int, bits: float, outlier_fraction: float = OUTLIER_FRACTION, seed: int = 0,
                      bias: Optional[torch.dtype] = None) -> CMPQLayer:
    """A valid CPU layer with the tensors ``quantize_standin`` would store for ``[n, k]`` at ``bits``, but
    random contents: random code words, sorted random FP16 codebooks, random perm, random distinct outliers.

    Vectorised NumPy; ~1 s for 28672x8192 (no per-code packing: any 32-bit word is a valid code group).
    """
    rng = np.random.default_rng(seed)
    seg_k = segment_sizes(k, bits)
    codes, codebooks = [], []
    for width, b in zip(seg_k, SEGMENT_BITS):
        words = rng.integers(0, 1 << 32, size=(n, width // GROUP_CODES * b), dtype=np.uint32)
        codes.append(torch.from_numpy(words.view(np.int32)))
        cb = np.sort(rng.standard_normal((n, (1 << b) if width else 0), dtype=np.float32), axis=1) * 0.02
        codebooks.append(torch.from_numpy(cb.astype(np.float16)))
    nnz = int(round(outlier_fraction * n * k))
    flat = np.sort(rng.choice(n * k, size=nnz, replace=False)) if nnz else np.zeros(0, dtype=np.int64)
    rows, cols = flat // k, flat % k  # row-major sorted = CSR order, columns sorted within each row
    row_ptr = np.zeros(n + 1, dtype=np.int64)
    row_ptr[1:] = np.cumsum(np.bincount(rows, minlength=n))
    col_dtype = np.int16 if k <= 32767 else np.int32  # same rule as CMPQLayer.validate
    vals = (rng.standard_normal(nnz, dtype=np.float32) * 0.02).astype(np.float16)
    bias_t = None if bias is None else torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 0.02).to(bias)
    layer = CMPQLayer(
        n=n, k=k, bits=float(bits), seg_k=seg_k, perm=torch.from_numpy(rng.permutation(k).astype(np.int32)),
        codes=tuple(codes), codebooks=tuple(codebooks), row_ptr=torch.from_numpy(row_ptr.astype(np.int32)),
        col=torch.from_numpy(cols.astype(col_dtype)), val=torch.from_numpy(vals), bias=bias_t, codebook_rows=1)
    return layer.validate()


def slice_rows(layer: CMPQLayer, r0: int, r1: int) -> CMPQLayer:
    """Rows ``[r0, r1)`` of a layer as a layer of its own (bias dropped); ``r0`` must start a codebook block."""
    cr = layer.codebook_rows
    if not (0 <= r0 < r1 <= layer.n) or r0 % cr:
        raise ValueError(f"bad row slice [{r0}, {r1}) of n={layer.n} (codebook_rows={cr})")
    rp = layer.row_ptr
    a, b = int(rp[r0]), int(rp[r1])
    return CMPQLayer(
        n=r1 - r0, k=layer.k, bits=layer.bits, seg_k=layer.seg_k, perm=layer.perm,
        codes=tuple(c[r0:r1].contiguous() for c in layer.codes),
        codebooks=tuple(c[r0 // cr:-(-r1 // cr)].contiguous() for c in layer.codebooks),
        row_ptr=(rp[r0:r1 + 1] - a).contiguous(), col=layer.col[a:b].contiguous(), val=layer.val[a:b].contiguous(),
        bias=None, codebook_rows=cr).validate()
