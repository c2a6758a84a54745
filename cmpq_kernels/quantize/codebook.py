"""Weighted k-means codebooks, batched over all codebook rows at once.

Every codebook row (one output row, or ``codebook_rows`` output rows together) fits its own sorted
codebook of ``2**bits`` values to its weights in one segment, element weight ``s2[k]`` (the diagonal of
the layer Hessian, docs/DESIGN.md §1.4). Deterministic: weighted-quantile initialisation, fixed iteration cap,
no randomness. In 1-D, k-means clusters are intervals, so assignment counts the midpoints of the sorted
codebook below each value, and the update is a ``scatter_add`` of weighted sums.
"""
from __future__ import annotations

import torch

def weighted_quantile_init(x: torch.Tensor, w: torch.Tensor, levels: int) -> torch.Tensor:
    """Sorted initial codebooks ``[R, levels]``: the weighted ``(i + 0.5) / levels`` quantiles of each row."""
    xs, idx = torch.sort(x, dim=1)
    cw = torch.cumsum(torch.gather(w, 1, idx), dim=1)
    targets = (torch.arange(levels, dtype=x.dtype) + 0.5) / levels * cw[:, -1:]
    pos = torch.searchsorted(cw.contiguous(), targets.contiguous()).clamp_(max=x.shape[1] - 1)
    return torch.gather(xs, 1, pos)


def nearest(x: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """Index ``[R, C]`` of the cell of ``x`` ``[R, C]`` between each row's sorted ``midpoints`` ``[R, L - 1]``.

    Counts the midpoints below each value (what ``searchsorted`` returns): with at most 15 midpoints,
    one comparison pass per midpoint is ~10x faster on CPU than a batched ``searchsorted``.
    """
    codes = torch.zeros(x.shape, dtype=torch.int64)
    for j in range(midpoints.shape[1]):
        codes += x > midpoints[:, j:j + 1]
    return codes


def assign(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index ``[R, C]`` of the nearest entry of each row's *sorted* codebook ``[R, L]`` for ``x`` ``[R, C]``."""
    return nearest(x, (codebook[:, 1:] + codebook[:, :-1]) * 0.5)


def weighted_error(x: torch.Tensor, w: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Per-row weighted squared error ``sum_c w * (x - codebook[codes])^2`` ``[R]``."""
    return (w * (x - torch.gather(codebook, 1, codes)).pow(2)).sum(1)


def _round_fp16(codebook: torch.Tensor) -> torch.Tensor:
    # Sorting again after rounding keeps the midpoint assignment valid when two entries round to the same fp16 value.
    return torch.sort(codebook.half().to(codebook.dtype), dim=1).values


#: Rows are fitted in chunks of at most this many elements: rows are independent, and temporaries of one bounded
#: size are reused by the heap, where whole-segment temporaries (tens of MB, a different size per layer) fragmented
#: it and grew the quantizer's peak memory block after block (docs/DESIGN.md §1.9).
KMEANS_CHUNK_ELEMENTS = 1 << 18


def weighted_kmeans(x: torch.Tensor, w: torch.Tensor, bits: int,
                    iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit fp16-representable sorted codebooks ``[R, 2**bits]`` and codes ``[R, C]`` (int64) to ``x`` ``[R, C]``.

    Args:
        x: values, float32/float64 ``[R, C]``, one codebook per row.
        w: non-negative element weights ``[R, C]``; zero-weight elements (outliers) do not pull the fit.
            A row whose weights are all zero is fitted unweighted.
        bits: codebook size is ``2**bits``.
        iters: Lloyd iteration cap (stops earlier once no code changes).

    The codes are assigned against the fp16-rounded codebook, and per row the result is never worse (in
    weighted error) than the fp16-rounded quantile initialisation: a row keeps its init otherwise.
    """
    if x.shape != w.shape or x.dim() != 2:
        raise ValueError(f"x and w must be the same 2-D shape, got {tuple(x.shape)} and {tuple(w.shape)}")
    step = max(1, KMEANS_CHUNK_ELEMENTS // max(1, x.shape[1]))
    fits = [_kmeans_rows(x[r:r + step], w[r:r + step], bits, iters) for r in range(0, x.shape[0], step)]
    return torch.cat([cb for cb, _ in fits]), torch.cat([codes for _, codes in fits])


def _kmeans_rows(x: torch.Tensor, w: torch.Tensor, bits: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    levels = 1 << bits
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    init = _round_fp16(weighted_quantile_init(x, w, levels))
    codebook = init.clone()
    codes = assign(x, codebook)
    for _ in range(iters):
        sums = torch.zeros_like(codebook).scatter_add_(1, codes, w * x)
        mass = torch.zeros_like(codebook).scatter_add_(1, codes, w)
        # Empty (or zero-weight) clusters keep their previous centroid instead of collapsing to 0.
        codebook = torch.sort(torch.where(mass > 0, sums / mass.clamp_min(1e-30), codebook), dim=1).values
        new_codes = assign(x, codebook)
        if torch.equal(new_codes, codes):
            break
        codes = new_codes
    codebook = _round_fp16(codebook)
    codes = assign(x, codebook)
    init_codes = assign(x, init)
    worse = weighted_error(x, w, codebook, codes) > weighted_error(x, w, init, init_codes)
    codebook = torch.where(worse[:, None], init, codebook)
    codes = torch.where(worse[:, None], init_codes, codes)
    return codebook, codes


def fit_rows(x: torch.Tensor, w: torch.Tensor, bits: int, codebook_rows: int,
             iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`weighted_kmeans` with ``codebook_rows`` consecutive output rows sharing one codebook.

    ``x``, ``w`` are ``[N, C]``; returns codebooks ``[ceil(N / codebook_rows), 2**bits]`` and codes ``[N, C]``.
    """
    n, c = x.shape
    if codebook_rows == 1:
        return weighted_kmeans(x, w, bits, iters)
    groups = -(-n // codebook_rows)
    pad = groups * codebook_rows - n
    # Padding rows carry zero weight, so they do not move the shared codebook.
    xp = torch.cat([x, x.new_zeros(pad, c)]).reshape(groups, codebook_rows * c)
    wp = torch.cat([w, w.new_zeros(pad, c)]).reshape(groups, codebook_rows * c)
    codebook, codes = weighted_kmeans(xp, wp, bits, iters)
    return codebook, codes.reshape(groups * codebook_rows, c)[:n]
