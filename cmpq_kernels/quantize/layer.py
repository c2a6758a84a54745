"""Quantize one weight matrix to a :class:`~cmpq_kernels.format.CMPQLayer` (docs/DESIGN.md §1.2-1.6).

Pipeline: allocate widths -> permute into segments [4|3|2] -> activation outliers -> weighted k-means
per row and segment -> error outliers -> refit -> optional GPTQ error feedback on the fitted codebooks
-> least-squares codebook refit to the output error -> pack, with outliers stored as fp16 residuals in packed column order.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..format import SEGMENT_BITS, CMPQLayer, check_in_features
from .allocate import allocate, check_bits, permutation
from .budget import base_outliers, check_budget, fill_outliers, plan_widths
from .codebook import fit_rows
from .gptq import quantize_with_feedback
from .options import QuantOptions
from .refit import refit_codebooks
from .outliers import activation_outliers, error_outliers

_FP16_MAX = float(torch.finfo(torch.float16).max)


def check_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a float32 CPU tensor, or ``TypeError``/``ValueError`` naming why it cannot be quantized."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be 2-D [out_features, in_features] with out_features >= 1, "
                         f"got shape {tuple(weight.shape)}")
    w = weight.detach().float().cpu()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight contains NaN or Inf")
    check_in_features(w.shape[1])
    largest = float(w.abs().max())
    if largest > _FP16_MAX:  # codebooks and outlier residuals are stored as fp16
        raise ValueError(f"weight has values beyond the fp16 range (max |w| = {largest:g} > {_FP16_MAX:g})")
    return w


def _check_statistics(k: int, s2: torch.Tensor, hessian: Optional[torch.Tensor]) -> torch.Tensor:
    s2 = torch.as_tensor(s2).detach().float().cpu().reshape(-1)
    if s2.numel() != k:
        raise ValueError(f"s2 must have one entry per input channel ({k}), got {s2.numel()}")
    if not bool(torch.isfinite(s2).all()) or bool((s2 < 0).any()):
        raise ValueError("s2 (mean squared activation per channel) must be finite and non-negative")
    if hessian is not None and (tuple(hessian.shape) != (k, k) or not bool(torch.isfinite(hessian).all())):
        raise ValueError(f"hessian must be a finite [{k}, {k}] matrix, got shape {tuple(hessian.shape)}")
    return s2


def _fit_segments(wp: torch.Tensor, s2p: torch.Tensor, keep: torch.Tensor, seg_k: tuple[int, int, int],
                  codebook_rows: int, iters: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Codebooks per segment ``[G, 2**b]``, codes ``[N, K]`` and dequantized ``[N, K]`` (packed order)."""
    n = wp.shape[0]
    weights = torch.where(keep, 0.0, s2p.expand_as(wp))  # outliers do not pull the codebooks
    codebooks, codes, deq = [], [], []
    for part, wpart, bits in zip(wp.split(seg_k, 1), weights.split(seg_k, 1), SEGMENT_BITS):
        if part.shape[1] == 0:
            codebooks.append(torch.zeros(-(-n // codebook_rows), 1 << bits))
            codes.append(torch.zeros(n, 0, dtype=torch.int64))
            deq.append(part)
            continue
        cb, c = fit_rows(part, wpart, bits, codebook_rows, iters)
        codebooks.append(cb)
        codes.append(c)
        deq.append(torch.gather(_row_grids(cb, n, codebook_rows), 1, c))
    return codebooks, torch.cat(codes, 1), torch.cat(deq, 1)


def _row_grids(codebook: torch.Tensor, n: int, codebook_rows: int) -> torch.Tensor:
    """Expand ``[G, L]`` codebooks to one (shared) grid per output row ``[N, L]``."""
    return codebook[torch.arange(n) // codebook_rows]


def _feedback(wp: torch.Tensor, hessian_p: torch.Tensor, codebooks: list[torch.Tensor], seg_k: tuple[int, int, int],
              keep: torch.Tensor, codebook_rows: int, order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Error feedback on the fitted codebooks: codes and target weights ``[N, K]`` (packed order).

    ``order="act"`` processes columns by descending Hessian diagonal (GPTQ's act-order: the most salient
    columns are fixed first and the rest absorb their error); ``"packed"`` uses the packed order. Each
    column keeps its own segment's codebook either way, so the layout is unchanged.
    """
    n = wp.shape[0]
    grids = [_row_grids(cb, n, codebook_rows) for cb in codebooks]
    grid_of_column = torch.repeat_interleave(torch.arange(3), torch.tensor(seg_k))
    if order == "act":
        cols = torch.argsort(torch.diagonal(hessian_p), descending=True, stable=True)
    else:
        cols = torch.arange(wp.shape[1])
    codes, target = quantize_with_feedback(wp[:, cols], hessian_p[cols][:, cols], grids, grid_of_column[cols],
                                           keep[:, cols])
    back = torch.argsort(cols)
    return codes[:, back], target[:, back]


def _dequantize(codebooks: list[torch.Tensor], codes: torch.Tensor, seg_k: tuple[int, int, int],
                codebook_rows: int) -> torch.Tensor:
    n = codes.shape[0]
    return torch.cat([torch.gather(_row_grids(cb, n, codebook_rows), 1, c)
                      for cb, c in zip(codebooks, codes.split(seg_k, 1))], 1)


def quantize_weight(
    weight: torch.Tensor,
    s2: torch.Tensor,
    bits: Optional[float] = None,
    options: Optional[QuantOptions] = None,
    *,
    hessian: Optional[torch.Tensor] = None,
    widths: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    **overrides: Any,
) -> CMPQLayer:
    """Quantize ``weight`` ``[N, K]`` (``y = x @ W.T``) into a validated :class:`CMPQLayer`.

    Args:
        weight: float ``[out_features, in_features]``, finite; ``in_features`` a multiple of 32.
        s2: ``[K]`` mean squared activation per input channel (salience, k-means weights).
        bits: average code bits per weight, any value in [2, 4]; None exactly when ``options.effective_bits`` is
            set (the widths and outlier count are then planned to that stored size, :mod:`.budget`).
        options: quantizer settings (:class:`QuantOptions`; defaults when None). ``budget`` is a model-level
            setting and is ignored here.
        hessian: ``[K, K]`` ``X^T X / n`` of the layer input, original channel order. Error feedback runs when
            it is given and ``options.error_feedback`` is on; asking for ``error_feedback=True`` explicitly
            without it is an error.
        widths: optional precomputed int ``[K]`` widths in {2, 3, 4} (e.g. from a model-wide
            allocation); overrides ``allocator`` and ``bits`` for the allocation (``bits`` is still stored). Under
            ``effective_bits`` the outliers still fill the budget around them.
        bias: optional ``[N]`` stored with the layer.
        **overrides: fields of :class:`QuantOptions` (``allocator="cmpq"``, ``p_err=0.0``, ...); not ``"auto"``
            (:func:`.auto.choose` resolves those).

    Returns:
        The packed layer; ``layer.effective_bits`` is the honest storage cost per weight (within one outlier
        below ``options.effective_bits`` when that is set).
    """
    opts = QuantOptions.resolve(options, overrides)
    target = opts.effective_bits
    if (target is None) == (bits is None):
        raise ValueError("give exactly one of bits (code bits) and effective_bits (stored bits)")
    w = check_weight(weight)
    n, k = w.shape
    s2 = _check_statistics(k, s2, hessian)
    if overrides.get("error_feedback") and hessian is None:
        raise ValueError("error_feedback=True needs hessian ([K, K] X^T X / n of the layer input)")
    if opts.automatic:  # resolved before this function: the chooser runs it on every candidate
        raise ValueError("'auto' settings are chosen by quantize_model, or by quantize.auto.choose given the "
                         "layer's Hessian; quantize_weight takes the concrete settings it returns")
    if widths is None:
        if target is None:
            widths = allocate(s2, w, check_bits(bits), opts.allocator)
        else:
            check_budget(f"{n}x{k} weight", n, k, target, opts)
            widths = plan_widths(s2, [w], target, opts)
    widths = torch.as_tensor(widths).long().reshape(-1)
    if widths.numel() != k:  # else the layer would silently cover only some channels
        raise ValueError(f"widths must have one entry per input channel ({k}), got {widths.numel()}")
    perm, seg_k = permutation(widths)
    wp, s2p = w[:, perm], s2[perm]
    bits = check_bits(sum(b * s for b, s in zip(SEGMENT_BITS, seg_k)) / k if bits is None else bits)
    n_act, n_err = base_outliers(n, k, opts)
    if target is not None:
        n_err = fill_outliers(n, k, seg_k, target, opts)

    rows = opts.codebook_rows
    keep = activation_outliers(wp, s2p, n_act)
    codebooks, codes, deq = _fit_segments(wp, s2p, keep, seg_k, rows, opts.kmeans_iters)
    err_mask = error_outliers(wp, deq, s2p, n_err, keep)
    if bool(err_mask.any()):
        keep |= err_mask
        codebooks, codes, deq = _fit_segments(wp, s2p, keep, seg_k, rows, opts.kmeans_iters)
    target = wp
    if opts.error_feedback and hessian is not None:
        hessian_p = hessian.detach().double().cpu()[perm][:, perm]
        codes, target = _feedback(wp, hessian_p, codebooks, seg_k, keep, rows, opts.feedback_order)
        if opts.codebook_refit:
            codebooks = refit_codebooks(wp, hessian_p, codebooks, codes, seg_k, keep, target, rows)
        deq = _dequantize(codebooks, codes, seg_k, rows)

    out_rows, cols = torch.nonzero(keep, as_tuple=True)
    residual = (target - deq)[out_rows, cols].half()
    return CMPQLayer.from_codes(
        bits=bits, perm=perm.numpy(),
        codes=tuple(c.to(torch.uint8).numpy() for c in codes.split(seg_k, 1)),
        codebooks=tuple(cb.half() for cb in codebooks),
        outlier_rows=out_rows.numpy(), outlier_cols=cols.numpy(), outlier_vals=residual,
        bias=None if bias is None else bias.detach().cpu().contiguous(), codebook_rows=rows)
