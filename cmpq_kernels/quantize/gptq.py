"""GPTQ-style error feedback onto fixed per-row grids (codebooks or uniform grids).

Columns are quantized one at a time in the given order, each to the nearest entry of its row's grid,
and the error is pushed onto the not-yet-quantized columns through the upper Cholesky factor of the
inverse Hessian (Frantar et al., GPTQ), in blocks so most of the update is one matrix product. The
grids are fixed beforehand (fitted on the original weights), so this only changes which entry each
weight takes. Shared by the CMPQ quantizer (one codebook per segment per row) and the uniform GPTQ
baseline of ``bench/accuracy.py`` (one uniform grid per column group per row).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

DEFAULT_BLOCK = 128
DEFAULT_DAMP = 0.01


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float32 ``[K, K]``).

    Channels that never saw activation (zero diagonal) get a unit diagonal so the factorisation exists;
    their weights then quantize independently, which is all a dead channel needs.
    """
    h = hessian.double().clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    h[dead, dead] = 1.0
    mean = float(diag.mean())
    diag += damp * (mean if mean > 0 else 1.0)
    chol = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float()


def quantize_with_feedback(weight: torch.Tensor, hessian: torch.Tensor, grids: Sequence[torch.Tensor],
                           grid_of_column: torch.Tensor, keep: Optional[torch.Tensor] = None,
                           block: int = DEFAULT_BLOCK, damp: float = DEFAULT_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` ``[N, K]`` column by column with error feedback.

    Args:
        weight: float ``[N, K]``, columns in processing order.
        hessian: ``[K, K]`` ``X^T X / n`` in the same column order.
        grids: sorted per-row grids, each ``[N, L_i]`` (float32).
        grid_of_column: int64 ``[K]``, index into ``grids`` for each column.
        keep: optional bool ``[N, K]``: positions stored exactly (outliers); their error is 0.
        block: columns per lazy-update block.
        damp: Hessian dampening, relative to the mean diagonal.

    Returns:
        ``(codes, target)``: int64 ``[N, K]`` grid indices, and float32 ``[N, K]`` the updated weights each
        column was quantized from (at ``keep`` positions this is the exact value to store).
    """
    w = weight.float().clone()
    n, k = w.shape
    u = inverse_hessian_factor(hessian, damp)
    codes = torch.empty(n, k, dtype=torch.int64)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            g = int(grid_of_column[col])
            target = w1[:, i].clone()
            # One column: argmin over the <= 16 grid entries is fewer ops than the midpoint count.
            code = (grids[g] - target[:, None]).abs_().argmin(1)
            q = grids[g].gather(1, code[:, None]).squeeze(1)
            if keep is not None:
                q = torch.where(keep[:, col], target, q)
            codes[:, col] = code
            w[:, col] = target
            err = (target - q) / u[col, col]
            w1[:, i:] -= err[:, None] * u[col, col:i2][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return codes, w
