"""Bit allocation: which input channels get 4, 3 or 2 code bits, in whole 32-channel groups.

Two allocators (docs/DESIGN.md §1.2):

* ``cmpq`` (the paper's): rank channels by activation salience ``s2``; the top fraction gets one bit
  more than ``floor(bits)``, so only two adjacent widths are mixed (3/2 for bits <= 3, else 4/3).
* ``greedy`` (ours): estimated error of channel ``k`` at width ``b`` is ``s2[k] * ||W[:, k]||^2 * 4^-b``.
  Channels are sorted by that score and cut into 32-channel groups; every group starts at 2 bits and
  one-bit upgrades are bought in order of error saved until the budget is spent (any mix of 2/3/4).

Both return per-channel widths ``[K]`` (int64); :func:`permutation` turns them into the packed order.
"""
from __future__ import annotations

import math

import torch

from ..format import GROUP_CODES, MAX_BITS, MIN_BITS, SEGMENT_BITS, check_in_features
from .options import ALLOCATORS



def check_bits(bits: float) -> float:
    """Return ``bits`` as float; ``TypeError`` unless it is a number, ``ValueError`` unless finite and in [2, 4]."""
    if isinstance(bits, (str, bytes, bool)):  # float() would parse "3" and read True as 1.0
        raise TypeError(f"bits must be a number, got {type(bits).__name__} {bits!r}")
    try:
        bits = float(bits)
    except (TypeError, ValueError):
        raise TypeError(f"bits must be a number, got {type(bits).__name__}") from None
    if not (math.isfinite(bits) and MIN_BITS <= bits <= MAX_BITS):
        raise ValueError(f"bits must be in [{MIN_BITS:g}, {MAX_BITS:g}] and finite, got {bits}")
    return bits


def segment_sizes(k: int, bits: float) -> tuple[int, int, int]:
    """Channels per segment (4, 3, 2-bit) of the two-adjacent-width split that the ``cmpq`` allocator makes.

    ``bits <= 3`` mixes 3- and 2-bit, above that 4- and 3-bit; the upper width gets
    ``round((bits - low) * groups)`` whole 32-channel groups.
    """
    bits = check_bits(bits)
    check_in_features(k)
    low = 2 if bits <= 3 else 3
    upper = int(round((bits - low) * (k // GROUP_CODES))) * GROUP_CODES
    return (upper, k - upper, 0) if low == 3 else (0, upper, k - upper)


def allocate_cmpq(s2: torch.Tensor, bits: float) -> torch.Tensor:
    """Salience-ranked widths ``[K]``: the most salient channels fill the upper width of :func:`segment_sizes`."""
    seg_k = segment_sizes(s2.numel(), bits)
    order = torch.argsort(s2.double(), descending=True, stable=True)  # stable: ties keep channel order
    widths = torch.empty(s2.numel(), dtype=torch.int64)
    widths[order] = torch.repeat_interleave(torch.tensor(SEGMENT_BITS), torch.tensor(seg_k))
    return widths


def channel_scores(s2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Error scale per channel, ``s2[k] * ||W[:, k]||^2`` (float64 ``[K]``): the greedy allocator's input."""
    return s2.double() * weight.double().pow(2).sum(0)


def group_upgrade_gains(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group channels by descending score; return (channel order ``[K]``, gains ``[G, 2]`` of 2->3 and 3->4).

    Going from ``b`` to ``b + 1`` bits cuts the estimated error by ``score * 4^-b * 3/4``.
    """
    check_in_features(scores.numel())
    order = torch.argsort(scores, descending=True, stable=True)
    group_score = scores[order].reshape(-1, GROUP_CODES).sum(1)
    gains = torch.stack([group_score * 4.0**-2, group_score * 4.0**-3], dim=1) * 0.75
    return order, gains


def widths_from_upgrades(order: torch.Tensor, upgrades: torch.Tensor) -> torch.Tensor:
    """Per-channel widths ``[K]`` from per-group upgrade counts ``[G]`` (0..2) over ``order``'s groups."""
    widths = torch.empty(order.numel(), dtype=torch.int64)
    widths[order] = (2 + upgrades).repeat_interleave(GROUP_CODES)
    return widths


def select_upgrades(gains: list[torch.Tensor], costs: list[float], budget: float) -> list[torch.Tensor]:
    """Greedy knapsack over upgrade candidates of several layers; returns upgrade counts per group per layer.

    Args:
        gains: per layer, ``[G_i, 2]`` error saved by the first and second upgrade of each group.
        costs: per layer, bits one upgrade costs (32 channels x out_features).
        budget: total extra bits above 2 per weight that may be spent.

    Candidates are bought in order of gain per bit. A group's second upgrade saves 4x less than its
    first, so (with ties broken first-upgrade-first) the second is never bought before the first.
    """
    ratio = torch.cat([(g / c).T.reshape(-1) for g, c in zip(gains, costs)])  # first upgrades, then seconds
    cost = torch.cat([torch.full((g.numel(),), float(c), dtype=torch.float64) for g, c in zip(gains, costs)])
    order = torch.argsort(ratio, descending=True, stable=True)
    bought = torch.zeros_like(ratio, dtype=torch.bool)
    # Half a group of slack rounds to the nearest affordable prefix, like the cmpq allocator's rounding.
    bought[order] = torch.cumsum(cost[order], 0) <= budget + 0.5 * cost[order]
    out, start = [], 0
    for g in gains:
        sel = bought[start:start + g.numel()].reshape(2, -1).T
        out.append(sel.sum(1))
        start += g.numel()
    return out


def allocate_greedy(s2: torch.Tensor, weight: torch.Tensor, bits: float) -> torch.Tensor:
    """Greedy widths ``[K]`` (any mix of 2/3/4) for one layer; average within one 32-channel group of ``bits``."""
    bits = check_bits(bits)
    n, k = weight.shape
    order, gains = group_upgrade_gains(channel_scores(s2, weight))
    upgrades = select_upgrades([gains], [float(GROUP_CODES * n)], (bits - 2.0) * n * k)[0]
    return widths_from_upgrades(order, upgrades)


def allocate(s2: torch.Tensor, weight: torch.Tensor, bits: float, allocator: str) -> torch.Tensor:
    """Per-channel widths ``[K]`` in {2, 3, 4} for ``weight`` ``[N, K]`` with salience ``s2`` ``[K]``."""
    if allocator == "cmpq":
        return allocate_cmpq(s2, bits)
    if allocator == "greedy":
        return allocate_greedy(s2, weight, bits)
    raise ValueError(f"allocator must be one of {ALLOCATORS}, got {allocator!r}")  # callers outside QuantOptions


def permutation(widths: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Packed order ``perm`` ``[K]`` (segments [4|3|2], original order inside) and the segment sizes."""
    if widths.numel() % GROUP_CODES or not bool(torch.isin(widths, torch.tensor(SEGMENT_BITS)).all()):
        raise ValueError(f"widths must be {SEGMENT_BITS} values over a multiple of {GROUP_CODES} channels")
    parts = [torch.nonzero(widths == b).flatten() for b in SEGMENT_BITS]  # nonzero is sorted: original order
    seg_k = tuple(int(p.numel()) for p in parts)
    if any(s % GROUP_CODES for s in seg_k):
        raise ValueError(f"segment sizes {seg_k} are not multiples of {GROUP_CODES}")
    return torch.cat(parts), seg_k  # type: ignore[return-value]
