"""The two outlier kinds of docs/DESIGN.md §1.5, as boolean masks over a weight matrix.

* activation-based: the top ``p_act`` of all weights by ``|W| * sqrt(s2)`` (large weights meeting large
  activations), chosen *before* fitting and excluded from the k-means fit;
* error-based: after fitting, the top ``p_err`` by weighted error ``|W - Q(W)| * sqrt(s2)`` among the
  remaining weights; the codebooks are then refitted once without them.

Both end up stored exactly (as fp16 residuals ``W - Q(W)``) in the layer's CSR.
"""
from __future__ import annotations

import math

import torch


def outlier_count(fraction: float, weights: int) -> int:
    """Outliers a fraction of ``weights`` stands for: what the quantizer stores and the budget planner counts."""
    return int(round(fraction * weights))


def top_mask(score: torch.Tensor, count: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the ``count`` largest scores (excluded entries never chosen).

    ``topk`` is deterministic on CPU for a given input (ties are rare for float scores and resolved
    the same way every run).
    """
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count == 0:
        return mask
    flat = score.flatten().float()
    if exclude is not None:
        flat = flat.masked_fill(exclude.flatten(), -math.inf)
    mask.view(-1)[torch.topk(flat, count, sorted=False).indices] = True
    if exclude is not None:
        mask &= ~exclude
    return mask


def activation_outliers(weight: torch.Tensor, s2: torch.Tensor, count: int) -> torch.Tensor:
    """Mask ``[N, K]`` of the top ``count`` weights by ``|W| * sqrt(s2)``; ``s2`` ``[K]`` matches W's columns."""
    return top_mask(weight.abs() * s2.sqrt(), count)


def error_outliers(weight: torch.Tensor, dequant: torch.Tensor, s2: torch.Tensor, count: int,
                   exclude: torch.Tensor) -> torch.Tensor:
    """Mask ``[N, K]`` of the top ``count`` weights by ``|W - Q(W)| * sqrt(s2)``, never re-picking ``exclude``."""
    return top_mask((weight - dequant).abs() * s2.sqrt(), count, exclude)
