"""Tensor-parallel shards of a CMPQ layer, and fused layers, computed from the packed format (docs/DESIGN.md §10).

Serving stacks split a linear two ways; both are exact re-arrangements of the stored codes, done once at load
time, so one checkpoint serves every tensor-parallel size:

* **column-parallel** (split ``n``: q/k/v, gate/up): a rank keeps a range of output rows. Codes, codebook rows
  and CSR rows are sliced; the range must start on a codebook-row boundary (:func:`slice_rows`).
* **row-parallel** (split ``k``: o_proj, down_proj): a rank sees only a range of *original* input channels,
  but the packed order mixes all channels into ``[4 | 3 | 2]``-bit segments. :func:`slice_columns` keeps the
  rank's channels in their segments (same codes, same codebooks) and pads each segment to a multiple of 32
  with zero-code columns fed by zero activations (:attr:`ColumnShard.padding`), so the rank's partial
  product is exact and the all-reduce of the ranks' outputs is the unsharded product up to FP32 summation order.

A fused layer (qkv, gate_up) is one matrix only if its parts share one input-channel permutation;
:func:`concat_rows` stacks such parts (the quantizer writes them with ``share_input_widths``).

MixLLM layers (``mixllm_*`` below) keep input channels in their original order, so their shards are plain slices:
rows by output index (:func:`mixllm_slice_rows`), and whole 128-channel groups of input channels
(:func:`mixllm_slice_columns`), since activations are quantized per group: a rank holding whole groups quantizes
its activations exactly as the unsharded op does. Any parts with one input fuse (:func:`mixllm_concat_rows`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch

from .format import GROUP_CODES, SEGMENT_BITS, CMPQLayer, outlier_col_dtype, pack_codes
from .mixllm_format import GROUP, MixLLMLayer, groups_of, pack_nibbles, unpack_nibbles


def _check_range(start: int, size: int, total: int, what: str) -> None:
    if not (0 <= start and size > 0 and start + size <= total):
        raise ValueError(f"{what} [{start}, {start + size}) are not inside the layer's {total} {what}")


def _check_row_range(layer: CMPQLayer, start: int, size: int) -> None:
    _check_range(start, size, layer.n, "output rows")
    if start % layer.codebook_rows or (size % layer.codebook_rows and start + size != layer.n):
        raise ValueError(f"rows [{start}, {start + size}) split a codebook row (the layer shares one codebook per "
                         f"{layer.codebook_rows} rows); this tensor-parallel size cannot shard it")


def slice_rows(layer: CMPQLayer, start: int, size: int) -> CMPQLayer:
    """Output rows ``[start, start + size)`` of ``layer`` as a layer of their own (column-parallel shard)."""
    _check_row_range(layer, start, size)
    stop = start + size
    cb = slice(start // layer.codebook_rows, -(-stop // layer.codebook_rows))
    row_ptr = layer.row_ptr[start:stop + 1]
    nz = slice(int(row_ptr[0]), int(row_ptr[-1]))
    return dataclasses.replace(
        layer, n=size,
        codes=tuple(c[start:stop].contiguous() for c in layer.codes),
        codebooks=tuple(c[cb].contiguous() for c in layer.codebooks),
        row_ptr=(row_ptr - row_ptr[0]).contiguous(), col=layer.col[nz].contiguous(), val=layer.val[nz].contiguous(),
        bias=None if layer.bias is None else layer.bias[start:stop].contiguous(),
    ).validate()


def fusion_problem(parts: Sequence[CMPQLayer]) -> Optional[str]:
    """Why ``parts`` cannot be stacked into one layer by :func:`concat_rows`, or None when they can."""
    first = parts[0]
    for i, part in enumerate(parts[1:], 1):
        if part.k != first.k or part.seg_k != first.seg_k or not torch.equal(part.perm, first.perm):
            return (f"part {i} has another input permutation than part 0 (seg_k {part.seg_k} vs {first.seg_k}): "
                    "only layers quantized with one shared permutation can be fused")
        if part.codebook_rows != first.codebook_rows:
            return f"part {i} shares a codebook per {part.codebook_rows} rows, part 0 per {first.codebook_rows}"
    for i, part in enumerate(parts[:-1]):
        if part.n % part.codebook_rows:
            return (f"part {i} has {part.n} rows, not a multiple of codebook_rows={part.codebook_rows}: stacking it "
                    "would shift the codebook rows of the parts after it")
    if len({p.bias is None for p in parts}) > 1:
        return "either every part has a bias or none has"
    return None


def concat_rows(parts: Sequence[CMPQLayer]) -> CMPQLayer:
    """Stack layers that share one input (same ``perm``, segments and codebook grouping) along ``n``; raises
    ``ValueError`` saying why (:func:`fusion_problem`) when they cannot be one matrix."""
    problem = fusion_problem(parts)
    if problem:
        raise ValueError(problem)
    first = parts[0]
    offsets = np.cumsum([0] + [p.nnz for p in parts[:-1]])
    n = sum(p.n for p in parts)
    return dataclasses.replace(
        first, n=n, bits=sum(p.bits * p.n for p in parts) / n,
        codes=tuple(torch.cat([p.codes[s] for p in parts]) for s in range(3)),
        codebooks=tuple(torch.cat([p.codebooks[s] for p in parts]) for s in range(3)),
        row_ptr=torch.cat([parts[0].row_ptr[:1]] + [p.row_ptr[1:] + int(o) for p, o in zip(parts, offsets)]),
        col=torch.cat([p.col for p in parts]), val=torch.cat([p.val for p in parts]),
        bias=None if first.bias is None else torch.cat([p.bias for p in parts]),
    ).validate()


@dataclasses.dataclass(frozen=True)
class ColumnShard:
    """One rank's part of a row-parallel layer: ``layer`` reads ``x[:, start:start + size]`` followed by
    ``padding`` zero columns (``layer.k == size + padding``)."""

    layer: CMPQLayer
    start: int
    size: int

    @property
    def padding(self) -> int:
        return self.layer.k - self.size


def slice_columns(layer: CMPQLayer, start: int, size: int) -> ColumnShard:
    """Original input channels ``[start, start + size)`` of ``layer`` (row-parallel shard), exactly.

    Each segment keeps the rank's channels in their packed order, with their codes and the layer's codebooks;
    a segment is padded to a multiple of 32 columns whose codes are 0 and whose channels are the padding
    channels ``size, size + 1, ...`` that the caller feeds with zeros. Outliers in the rank's channels move to
    their new packed columns. The bias stays with rank 0's caller (it is added once, after the all-reduce).
    """
    _check_range(start, size, layer.k, "input channels")
    perm = layer.perm.cpu().long()
    mine = (perm >= start) & (perm < start + size)
    new_perm, new_codes, seg_k = [], [], []
    new_col = torch.full((layer.k,), -1, dtype=torch.long)  # old packed column -> new packed column
    next_pad, begin = size, 0
    for s, bits in enumerate(SEGMENT_BITS):
        stop = begin + layer.seg_k[s]
        keep = torch.nonzero(mine[begin:stop]).flatten()
        pad = -len(keep) % GROUP_CODES
        new_col[begin + keep] = sum(seg_k) + torch.arange(len(keep))
        codes = np.zeros((layer.n, len(keep) + pad), dtype=np.uint8)
        if len(keep):
            codes[:, :len(keep)] = layer.unpacked_codes(s)[:, keep.numpy()]
        new_codes.append(torch.from_numpy(pack_codes(codes, bits).view(np.int32)).to(layer.perm.device))
        new_perm.append(torch.cat([perm[begin + keep] - start, torch.arange(next_pad, next_pad + pad)]))
        next_pad += pad
        seg_k.append(len(keep) + pad)
        begin = stop
    k = sum(seg_k)
    rows = torch.repeat_interleave(torch.arange(layer.n), (layer.row_ptr[1:] - layer.row_ptr[:-1]).cpu().long())
    col = new_col[layer.col.cpu().long()]
    kept = col >= 0
    row_ptr = torch.zeros(layer.n + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows[kept], minlength=layer.n), 0)
    device = layer.perm.device
    shard = dataclasses.replace(
        layer, k=k, seg_k=tuple(seg_k), perm=torch.cat(new_perm).to(torch.int32).to(device), codes=tuple(new_codes),
        codebooks=tuple(cb if s else cb[:, :0].contiguous() for cb, s in zip(layer.codebooks, seg_k)),
        row_ptr=row_ptr.to(device), col=col[kept].to(outlier_col_dtype(k)).to(device),
        val=layer.val[kept.to(device)].contiguous(), bias=None,
    )
    return ColumnShard(shard.validate(), start, size)


# ---- MixLLM -------------------------------------------------------------------------------------------------


def mixllm_slice_rows(layer: MixLLMLayer, start: int, size: int) -> MixLLMLayer:
    """Output rows ``[start, start + size)`` of a MixLLM layer (column-parallel shard): each part keeps its stored
    rows whose output index falls in the range, renumbered from 0."""
    _check_range(start, size, layer.n, "output rows")
    stop = start + size
    mine8 = (layer.idx8 >= start) & (layer.idx8 < stop)
    mine4 = (layer.idx4 >= start) & (layer.idx4 < stop)
    return dataclasses.replace(
        layer, n=size,
        idx8=(layer.idx8[mine8] - start).contiguous(), q8=layer.q8[mine8].contiguous(), s8=layer.s8[mine8].contiguous(),
        idx4=(layer.idx4[mine4] - start).contiguous(), q4=layer.q4[mine4].contiguous(), s4=layer.s4[mine4].contiguous(),
        z4=layer.z4[mine4].contiguous(), bias=None if layer.bias is None else layer.bias[start:stop].contiguous(),
    ).validate()


def mixllm_slice_columns(layer: MixLLMLayer, start: int, size: int) -> MixLLMLayer:
    """Input channels ``[start, start + size)`` of a MixLLM layer (row-parallel shard), exactly: the range must hold
    whole 128-channel groups (the last one may be the layer's partial group), so every weight and activation scale
    covers the same channels as in the unsharded layer. The bias stays with the caller (added once)."""
    _check_range(start, size, layer.k, "input channels")
    stop = start + size
    if start % GROUP or (size % GROUP and stop != layer.k):
        raise ValueError(f"input channels [{start}, {stop}) split a {GROUP}-channel group, whose activations are "
                         "quantized together; this tensor-parallel size cannot shard the layer exactly")
    groups = slice(start // GROUP, groups_of(stop))
    zeros = unpack_nibbles(layer.z4.cpu(), layer.groups)[:, groups]
    return dataclasses.replace(
        layer, k=size, q8=layer.q8[:, start:stop].contiguous(), s8=layer.s8[:, groups].contiguous(),
        q4=layer.q4[:, start // 2:stop // 2].contiguous(), s4=layer.s4[:, groups].contiguous(),
        z4=pack_nibbles(zeros).to(layer.z4.device), bias=None,
    ).validate()


def mixllm_fusion_problem(parts: Sequence[MixLLMLayer]) -> Optional[str]:
    """Why ``parts`` cannot be stacked by :func:`mixllm_concat_rows`, or None when they can."""
    if len({p.k for p in parts}) > 1:
        return f"the parts read {sorted({p.k for p in parts})} input channels"
    if len({p.bias is None for p in parts}) > 1:
        return "either every part has a bias or none has"
    return None


def mixllm_concat_rows(parts: Sequence[MixLLMLayer]) -> MixLLMLayer:
    """Stack MixLLM layers with one input along ``n`` (each part's row indices shifted past the parts before it)."""
    problem = mixllm_fusion_problem(parts)
    if problem:
        raise ValueError(problem)
    offsets = np.cumsum([0] + [p.n for p in parts[:-1]])
    first = parts[0]
    return dataclasses.replace(
        first, n=sum(p.n for p in parts),
        idx8=torch.cat([p.idx8 + int(o) for p, o in zip(parts, offsets)]),
        idx4=torch.cat([p.idx4 + int(o) for p, o in zip(parts, offsets)]),
        **{f: torch.cat([getattr(p, f) for p in parts]) for f in ("q8", "s8", "q4", "s4", "z4")},
        bias=None if first.bias is None else torch.cat([p.bias for p in parts]),
    ).validate()
