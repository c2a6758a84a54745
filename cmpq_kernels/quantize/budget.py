"""Effective-bit budgets (docs/DESIGN.md §1.8): widths and outlier counts whose *stored* size meets a target.

A layer's storage is fixed by its layout alone -- segment sizes, rows per codebook, outlier count
(:func:`~cmpq_kernels.format.layout_storage_bits`, the formula :attr:`CMPQLayer.effective_bits` uses) -- so a
budget is planned exactly before any k-means runs: take the allocation with the most code bits whose storage
(with the options' ``p_act``/``p_err`` outliers) fits, then spend the bits left over (less than one
32-channel upgrade: 0.056 bit per weight at K = 576) on extra error outliers, 32 bits each. The stored size
then lands at most one outlier below the target.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..format import GROUP_CODES, SEGMENT_BITS, field_dtype, layout_storage_bits
from .allocate import (allocate_cmpq, channel_scores, group_upgrade_gains, segment_sizes, select_upgrades,
                       widths_from_upgrades)
from .options import QuantOptions
from .outliers import outlier_count

Segments = tuple[int, int, int]


def outlier_bits(k: int) -> int:
    """Bits one stored outlier costs in a layer with ``k`` input channels (column index + fp16 value)."""
    return (field_dtype("col", k).itemsize + field_dtype("val", k).itemsize) * 8


def base_outliers(n: int, k: int, options: QuantOptions) -> tuple[int, int]:
    """(activation, error) outlier counts the options' ``p_act`` / ``p_err`` give an ``[n, k]`` layer."""
    return outlier_count(options.p_act, n * k), outlier_count(options.p_err, n * k)


def segments_of(widths: torch.Tensor) -> Segments:
    """Channels per segment (4, 3, 2-bit) of per-channel ``widths``."""
    return tuple(int((widths == b).sum()) for b in SEGMENT_BITS)  # type: ignore[return-value]


def stored_bits(n: int, k: int, seg_k: Segments, options: QuantOptions, extra_outliers: int = 0) -> int:
    """Bits an ``[n, k]`` layer with segments ``seg_k`` stores under ``options`` (plus ``extra_outliers``)."""
    nnz = sum(base_outliers(n, k, options)) + extra_outliers
    return sum(layout_storage_bits(n, k, seg_k, options.codebook_rows, nnz).values())


def budget_range(n: int, k: int, options: QuantOptions) -> tuple[float, float]:
    """Lowest and highest effective bits an ``[n, k]`` layer can be planned at: every channel at 2 bits, and
    every channel at 4 bits, both with the options' outliers."""
    return tuple(stored_bits(n, k, seg, options) / (n * k) for seg in ((0, 0, k), (k, 0, 0)))  # type: ignore[return-value]


def check_budget(name: str, n: int, k: int, target: float, options: QuantOptions) -> None:
    """``ValueError`` naming layer ``name`` when ``target`` effective bits cannot be stored by its shape (by any of
    the settings ``"auto"`` options choose from)."""
    ranges = [budget_range(n, k, cand) for cand in options.candidates()]
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    # One outlier of slack: the plan lands at most that far below the target.
    if target < low:
        raise ValueError(f"{name}: effective_bits {target:g} is below the minimum {low:.4f} this {n}x{k} layer can "
                         f"store (every channel at 2 bits, codebook_rows={options.codebook_rows}, "
                         f"p_act={options.p_act:g}, p_err={options.p_err:g}; more rows per codebook or fewer "
                         "outliers go lower)")
    if target > high + outlier_bits(k) / (n * k):
        raise ValueError(f"{name}: effective_bits {target:g} is above the maximum {high:.4f} this {n}x{k} layer can "
                         f"use (every channel at 4 bits, codebook_rows={options.codebook_rows}, "
                         f"p_act={options.p_act:g}, p_err={options.p_err:g})")


class UpgradeLadder:
    """An allocator's widths as a function of ``u``, the number of one-bit 32-channel upgrades above all-2-bit
    (code bits ``2 + 32 u / K``, ``u`` in ``0 .. 2 K / 32``): exactly what :func:`~.allocate.allocate` returns at
    those code bits, with the channel scores computed once so every step is cheap."""

    def __init__(self, s2: torch.Tensor, weight: torch.Tensor, allocator: str) -> None:
        self.k = weight.shape[1]
        self.steps = 2 * self.k // GROUP_CODES
        self.allocator = allocator
        self.s2 = s2
        if allocator == "greedy":
            self.order, self.gains = group_upgrade_gains(channel_scores(s2, weight))
            self.cost = float(GROUP_CODES * weight.shape[0])

    def _bits(self, u: int) -> float:
        return 2.0 + GROUP_CODES * u / self.k

    def _upgrades(self, u: int) -> torch.Tensor:
        # An exact multiple of one upgrade's cost buys exactly u upgrades (select_upgrades has half a cost of slack).
        return select_upgrades([self.gains], [self.cost], u * self.cost)[0]

    def segments(self, u: int) -> Segments:
        """Segment sizes (4, 3, 2-bit) after ``u`` upgrades."""
        if self.allocator == "cmpq":
            return segment_sizes(self.k, self._bits(u))
        counts = torch.bincount(self._upgrades(u), minlength=3) * GROUP_CODES
        return int(counts[2]), int(counts[1]), int(counts[0])

    def widths(self, u: int) -> torch.Tensor:
        """Per-channel widths ``[K]`` after ``u`` upgrades."""
        if self.allocator == "cmpq":
            return allocate_cmpq(self.s2, self._bits(u))
        return widths_from_upgrades(self.order, self._upgrades(u))


def plan_widths(s2: torch.Tensor, weights: Sequence[torch.Tensor], target: float, options: QuantOptions) -> torch.Tensor:
    """Widths ``[K]`` with the most code bits at which every layer of ``weights`` (layers reading one input, which
    share one allocation; a single layer is a 1-list) stores at most ``target`` effective bits with the options'
    outliers. All allocations are scanned: storage is not monotone in code bits (a segment that empties drops its
    codebook), and a step is only a sort of at most 2 K / 32 upgrade candidates."""
    k = weights[0].shape[1]
    ladder = UpgradeLadder(s2, torch.cat([w.float() for w in weights]), options.allocator)
    rows = [w.shape[0] for w in weights]
    fits = [u for u, seg_k in ((u, ladder.segments(u)) for u in range(ladder.steps + 1))
            if all(stored_bits(n, k, seg_k, options) <= target * n * k for n in rows)]
    if not fits:
        raise ValueError(f"effective_bits {target:g} is below what every-channel-2-bit stores for layers of "
                         f"{rows} x {k}")
    return ladder.widths(fits[-1])


def fill_outliers(n: int, k: int, seg_k: Segments, target: float, options: QuantOptions) -> int:
    """Error outliers to store so that an ``[n, k]`` layer with segments ``seg_k`` lands within one outlier below
    ``target`` effective bits: the options' ``p_err`` count plus what the spare bits buy."""
    spare = math.floor(target * n * k) - stored_bits(n, k, seg_k, options)
    if spare < 0:
        raise ValueError(f"segments {seg_k} of a {n}x{k} layer store {stored_bits(n, k, seg_k, options) / (n * k):.4f} "
                         f"effective bits, above the budget {target:g}")
    return base_outliers(n, k, options)[1] + spare // outlier_bits(k)


def plan_global(allocation: Callable[[float], dict[str, torch.Tensor]], shapes: dict[str, tuple[int, int]],
                target: float, options: QuantOptions, iters: int = 40) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A model-wide budget: widths from ``allocation(code_bits)`` (the global greedy allocator) at the highest
    code-bit target whose total storage, with the options' outliers, fits ``target`` effective bits over all
    layers of ``shapes`` (name -> (n, k)); returns the widths and each layer's own effective-bit target, which
    spends the spare bits as extra outliers spread evenly per weight.

    Bisection on the code-bit target (storage grows with it but for codebooks of emptied segments, so the result
    is a fitting allocation near the largest one, always a fitting one).
    """
    weights = sum(n * k for n, k in shapes.values())

    def total(widths: dict[str, torch.Tensor]) -> int:
        return sum(stored_bits(n, k, segments_of(widths[name]), options) for name, (n, k) in shapes.items())

    low, high = 2.0, 4.0
    best = allocation(low)
    if total(best) > target * weights:
        raise ValueError(f"effective_bits {target:g} is below the model-wide minimum {total(best) / weights:.4f} "
                         "(every channel at 2 bits with the options' outliers)")
    top = allocation(high)
    if total(top) + sum(outlier_bits(k) for _, k in shapes.values()) < target * weights:  # one outlier of slack per layer
        raise ValueError(f"effective_bits {target:g} is above the model-wide maximum {total(top) / weights:.4f} "
                         "(every channel at 4 bits with the options' outliers)")
    if total(top) <= target * weights:
        best, low = top, high
    for _ in range(iters if low < high else 0):
        mid = 0.5 * (low + high)
        widths = allocation(mid)
        if total(widths) <= target * weights:
            best, low = widths, mid
        else:
            high = mid
    spare = (target * weights - total(best)) / weights
    targets = {name: stored_bits(n, k, segments_of(best[name]), options) / (n * k) + spare
               for name, (n, k) in shapes.items()}
    return best, targets
