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


def top_mask(score: torch.Tensor, fraction: float, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the ``round(fraction * score.numel())`` largest scores (excluded entries never chosen).

    ``topk`` is deterministic on CPU for a given input (ties are rare for float scores and resolved
    the same way every run).
    """
    count = int(round(fraction * score.numel()))
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


def activation_outliers(weight: torch.Tensor, s2: torch.Tensor, p_act: float) -> torch.Tensor:
    """Mask ``[N, K]`` of the top ``p_act`` weights by ``|W| * sqrt(s2)``; ``s2`` ``[K]`` matches W's columns."""
    return top_mask(weight.abs() * s2.sqrt(), p_act)


def error_outliers(weight: torch.Tensor, dequant: torch.Tensor, s2: torch.Tensor, p_err: float,
                   exclude: torch.Tensor) -> torch.Tensor:
    """Mask ``[N, K]`` of the top ``p_err`` weights by ``|W - Q(W)| * sqrt(s2)``, never re-picking ``exclude``."""
    return top_mask((weight - dequant).abs() * s2.sqrt(), p_err, exclude)
