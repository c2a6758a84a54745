"""The GPU benchmark's correctness gate: a layer's decode and GEMM at every benchmarked M are checked against
the pure-torch reference before any timing, so a wrong kernel is never timed (see ``bench_gpu.py``'s doc).

Imports: stdlib, torch and cmpq_kernels only.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from cmpq_kernels import ops, reference
from cmpq_kernels.format import CMPQLayer
from gpu_results import GEMM_MAX_M, fmt, path_for
from random_layers import slice_rows

GATE_ROWS = 128  # rows per gate slice (three slices: first, middle, last)
MAX_DECODE_ERR = 1e-3
MAX_GEMM_ERR = 5e-3

#: Per M: (relative error or None, 'ok' | 'gate_failed').
GateResult = tuple[Optional[float], str]
#: Records a failed case: (case, what went wrong).
FailFn = Callable[[str, str], None]
#: None while the device still works, else the error text (a sticky CUDA error).
DeviceErrorFn = Callable[[], Optional[str]]


def gate_slices(n: int, rows: int = GATE_ROWS) -> list[tuple[int, int]]:
    """First, middle and last ``rows`` rows of ``n`` (merged where they overlap), as [r0, r1) pairs."""
    if n <= 3 * rows:
        return [(0, n)]
    mid = (n // 2) // rows * rows
    return [(0, rows), (mid, mid + rows), (n - rows, n)]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64 (NaN/Inf in y propagate, so ``not err < limit`` catches them)."""
    y, ref = y.double(), ref.double()
    den = float(ref.norm())
    num = float((y - ref).norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def first_line(e: BaseException) -> str:
    """The first line of an error's text, capped: enough to name a failure in a results row."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def gate_layer(layer_dev: CMPQLayer, layer_cpu: CMPQLayer, batches: Sequence[int], label: str, fail: FailFn,
               device_error: DeviceErrorFn) -> dict[int, GateResult]:
    """Gate one layer at every M of ``batches``. An op that raises fails its M only, unless it broke the device
    (then the exception goes up and the run stops)."""
    slices = gate_slices(layer_cpu.n)
    rows = torch.cat([torch.arange(a, b) for a, b in slices]).to(layer_dev.perm.device)
    ref_rows = torch.cat([reference.dequantize(slice_rows(layer_cpu, a, b), torch.float32) for a, b in slices])
    w, decode_problem = _gate_decode(layer_dev, rows, ref_rows, slices, device_error)
    if decode_problem:
        fail(label, f"GATE FAILED (decode): ops.dequantize vs reference.dequantize: {decode_problem}; the "
                    f"decode+cublas path (M > {GEMM_MAX_M}) is not timed, smaller M are gated on the "
                    f"reference rows only")
    result: dict[int, GateResult] = {}
    gen = torch.Generator().manual_seed(1234)
    for m in batches:
        x = torch.randn(m, layer_cpu.k, generator=gen).to(torch.float16)
        if decode_problem and path_for(m) == "decode+cublas":
            result[m] = (None, "gate_failed")
            continue
        err, ok, what = _gate_gemm(x, layer_dev, rows, ref_rows, w, device_error)
        if not ok:
            fail(f"{label} M={m}", f"GATE FAILED ({path_for(m)}): ops.gemm {what}; not timed")
        result[m] = (err, "ok" if ok else "gate_failed")
    return result


def _gate_decode(layer_dev: CMPQLayer, rows: torch.Tensor, ref_rows: torch.Tensor, slices: list[tuple[int, int]],
                 device_error: DeviceErrorFn) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """(the device's FP32 decode of the layer, None) if its ``rows`` (on the device) match the CPU reference
    rows, else (None, what is wrong)."""
    try:
        w = ops.dequantize(layer_dev, torch.float32)
        decode_err = rel_err(w[rows].cpu(), ref_rows)
        finite = bool(torch.isfinite(w).all())
    except Exception as e:  # noqa: BLE001
        if device_error() is not None:
            raise
        return None, f"raised {type(e).__name__}: {first_line(e)}"
    if decode_err < MAX_DECODE_ERR and finite:
        return w, None
    return None, f"relative error {decode_err:.3g} (limit {MAX_DECODE_ERR:g}) on rows {slices}, all finite: {finite}"


def _gate_gemm(x: torch.Tensor, layer_dev: CMPQLayer, rows: torch.Tensor, ref_rows: torch.Tensor,
               w: Optional[torch.Tensor], device_error: DeviceErrorFn) -> tuple[Optional[float], bool, str]:
    """(relative error, passed, what was measured) of ``ops.gemm(x)`` on the device: against ``x @ w.T`` for all
    rows when the decode ``w`` passed, and against the CPU reference on the slice rows always."""
    m, n = x.shape[0], layer_dev.n
    try:
        x_dev = x.to(rows.device)
        y = ops.gemm(x_dev, layer_dev)
        if tuple(y.shape) != (m, n) or y.dtype != torch.float16:
            raise ValueError(f"output shape {tuple(y.shape)} dtype {y.dtype}, expected ({m}, {n}) float16")
        err_rows = rel_err(y[:, rows].cpu().float(), x.float() @ ref_rows.T)
        err_full = rel_err(y.float(), x_dev.float() @ w.T) if w is not None else None
        err = err_rows if err_full is None else (
            max(err_rows, err_full) if not (math.isnan(err_full) or math.isnan(err_rows)) else math.nan)
        ok = err < MAX_GEMM_ERR and bool(torch.isfinite(y).all())
        return err, ok, (f"relative error {fmt(err_full, '.3g')} (all rows vs x @ W.T), {err_rows:.3g} (CPU "
                         f"reference rows), limit {MAX_GEMM_ERR:g}")
    except Exception as e:  # noqa: BLE001
        if device_error() is not None:
            raise
        return None, False, f"raised {type(e).__name__}: {first_line(e)}"
