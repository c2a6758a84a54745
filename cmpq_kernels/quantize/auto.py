"""Settings that choose themselves per layer (docs/DESIGN.md §1.8): ``allocator="auto"`` / ``codebook_rows="auto"``.

Under an effective-bit budget every candidate setting stores the same bits, so they compare on error alone.
For each group of layers reading one input (they share one allocation), every candidate -- allocator x rows
per codebook -- is planned to the budget on the whole layers, fitted by a cheap proxy and scored by the output
error ``tr(dW H dW^T)`` summed over the group (``H = X^T X / n``, the calibration Hessian the group shares); the
best is kept and the caller quantizes it in full. The proxy skips error feedback, caps k-means at
:data:`PROXY_KMEANS_ITERS` iterations and fits a sample of :data:`PROXY_ROWS` output rows: a full fit per
candidate would multiply the quantizer's time by the number of candidates (8), the proxy adds about 0.5x.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..reference import dequantize
from .budget import budget_range, plan_widths
from .layer import quantize_weight
from .options import AUTO_CODEBOOK_ROWS, QuantOptions

#: Lloyd iterations of a candidate's proxy fit: enough to rank settings whose errors differ by several per cent.
PROXY_KMEANS_ITERS = 4
#: Output rows per layer a candidate is scored on (the error is a sum over rows; a sample ranks the candidates).
PROXY_ROWS = 256


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T)`` with ``dW = weight - approx`` ``[N, K]`` and ``H`` ``[K, K]``: the mean squared output error
    over the calibration inputs, summed over output rows."""
    dw = (weight.double() - approx.double())
    return float(((dw @ hessian.double()) * dw).sum())


def proxy_rows(n: int) -> torch.Tensor:
    """Output rows a candidate is scored on: all of them up to :data:`PROXY_ROWS`, else evenly spaced blocks of
    ``max(AUTO_CODEBOOK_ROWS)`` consecutive rows (so every candidate's codebooks cover whole blocks) adding up to
    about that many."""
    block = max(AUTO_CODEBOOK_ROWS)
    if n <= PROXY_ROWS:
        return torch.arange(n)
    starts = torch.linspace(0, n // block - 1, PROXY_ROWS // block).round().long().unique() * block
    return (starts[:, None] + torch.arange(block)).reshape(-1)


def choose(weights: Sequence[torch.Tensor], s2: torch.Tensor, hessian: Optional[torch.Tensor],
           options: QuantOptions) -> tuple[QuantOptions, torch.Tensor, dict[str, float]]:
    """The candidate of ``options`` with the least proxy error for ``weights`` (float ``[N_i, K]``, layers reading
    one input with salience ``s2`` and Hessian ``hessian``); returns it, its widths shared by the layers, and every
    candidate's summed error keyed ``"<allocator>/r<rows>"``.

    Each candidate's widths are planned on the whole layers; the proxy fit (no error feedback, at most
    :data:`PROXY_KMEANS_ITERS` Lloyd iterations, the options' outlier fractions without the budget's filler) runs
    on the :func:`proxy_rows` of each layer.
    """
    if hessian is None:
        raise ValueError("automatic settings score candidates with the calibration Hessian (X^T X / n); none given")
    samples = [w[proxy_rows(w.shape[0])] for w in weights]
    best, scores = None, {}
    for cand in options.candidates():
        if any(budget_range(*w.shape, cand)[0] > options.effective_bits for w in weights):
            continue  # e.g. one row per codebook cannot go as low as the budget: the others can
        widths = plan_widths(s2, weights, options.effective_bits, cand)
        code_bits = float(widths.double().mean())
        proxy = cand.with_overrides(effective_bits=None, error_feedback=False,
                                    kmeans_iters=min(cand.kmeans_iters, PROXY_KMEANS_ITERS))
        err = sum(output_error(w, dequantize(quantize_weight(w, s2, code_bits, proxy, widths=widths)), hessian)
                  for w in samples)
        scores[f"{cand.allocator}/r{cand.codebook_rows}"] = err
        if best is None or err < best[0]:
            best = (err, cand, widths)
    return best[1], best[2], scores
