"""GPU benchmark: ``cmpq_kernels.ops.gemm(x, layer)`` vs cuBLAS FP16 and vs the memory-bandwidth floor.

What is compared
    CMPQ: ``ops.gemm(x, layer)``, ``x`` float16 ``[M, K]`` on the GPU, on a packed layer ``[N, K]``.
    cuBLAS: ``torch.nn.functional.linear(x, W16)`` (= ``x @ W16.T``, no bias), ``W16`` dense float16
    ``[N, K]`` contiguous, same ``x``. It does not depend on bits, so it is timed once per (shape, M).
    Floor: the time to move the bytes CMPQ must move at the measured device-to-device copy bandwidth.

Shapes use the ``nn.Linear`` convention N x K = out_features x in_features. Defaults: 4096x4096
(LLaMA-7B q/k/v/o), 11008x4096 and 4096x11008 (LLaMA-7B gate/up and down), 28672x8192 and 8192x28672
(LLaMA-70B gate/up and down), 151936x896 (Qwen2-0.5B lm_head); M = 1, 2, 4, 8, 16, 32, 64, 128, 512;
bits = 2, 2.5, 3, 3.5, 4. The GPU op dispatches on M (``csrc/gpu_ops.h``, ``csrc/cuda/launchers.h``):
M <= 8 fused GEMV, M <= 128 tensor-core GEMM, larger M decode to an FP16 workspace + cuBLAS; the ``path``
column says which (``GEMV_MAX_M``/``GEMM_MAX_M`` below mirror the C++ table and only label rows).

Layers
    Timing does not depend on weight values, so layers are built fast instead of by the (slow, CPU)
    stand-in quantizer: :func:`make_random_layer` draws random packed code words (every 32-bit word is a
    valid group of 2-, 3- or 4-bit codes), sorted random FP16 codebooks (one row per output row), a random
    channel permutation and 0.5 % random outliers (distinct positions, CSR), with the segment split of
    ``standin.segment_sizes(k, bits)``; NumPy on the CPU, then ``.to(device)``. It has exactly the tensors
    (dtypes, shapes, nnz, hence ``storage_bits``/``effective_bits``) that
    ``standin.quantize_standin(weight, bits, outlier_fraction=0.005)`` produces for the same shape
    (checked by ``python_tests/test_bench_gpu_logic.py``). One (shape, bits) layer lives on the GPU at a time.

Correctness gate (per (shape, bits), before any timing; a wrong kernel is never timed)
    1. Decode: ``ops.dequantize(layer)`` on the GPU, compared on three row slices (first, middle and last
       ``GATE_ROWS`` rows) with the pure-torch ``reference.dequantize`` of the same rows computed on the
       CPU; norm-relative error < ``MAX_DECODE_ERR``.
    2. GEMM, at every benchmarked M (so all three paths): ``y = ops.gemm(x, layer)`` (fp16) against
       ``x.float() @ W.T`` with ``W`` the decode of step 1 (FP32, TF32 off), and ``y`` on the slice rows
       against the CPU reference rows; norm-relative error < ``MAX_GEMM_ERR`` and finite.
    A failed M (wrong, non-finite, or the op raised) is recorded (status ``gate_failed``) and not timed. A
    failed decode fails the decode+cuBLAS M of the layer; smaller M are then gated on the reference rows
    only. The run goes on with the other cases and exits with status 2 (``--stop-on-fail``: stop at once).
    An error that leaves the device unusable (sticky CUDA error) stops the run with partial results
    (status 3).

Timing method
    * CUDA events around each single call. Before every call (warmup and timed) a ``--flush-mb`` MiB
      buffer (default 256, at least 2x L2) is written with ``zero_()`` outside the event pair, so each
      call reads its weights from DRAM as in a real model (``--flush-mode read`` reads it instead).
      The flush keeps the GPU busy longer than the host needs to launch the next call, so the events
      time GPU execution, not Python/launch overhead.
    * ``--warmup`` untimed calls (default 5), then ``--reps`` timed calls (default 50) reduced so that
      one case takes about ``--case-seconds`` (default 2 s; at least 5 reps); median reported (min too).
      A first call slower than 1/20 of that skips the rest of the warmup.
    * M <= 8 (unless ``--no-graph``): the op is also captured in a CUDA graph (one call) and its replay
      timed the same way (``graph_us``, GPU time); and host latency call -> ``synchronize()`` is measured for
      eager and graph replay, for CMPQ and cuBLAS (``lat_*_us`` in the JSON: what launch overhead costs).
    * Copy bandwidth, once at start: ``dst.copy_(src)`` of a ``--copy-mb`` MiB buffer (default 1024,
      a cudaMemcpy D2D), median of 20 event-timed copies; a copy of B bytes moves 2B (read + write), so
      ``copy_GBps = 2B / t``.
    * Bytes per call: CMPQ = all stored bytes of the layer, ``sum(layer.storage_bits().values()) / 8``
      (codes, codebooks, outlier CSR, perm) + ``x`` (2MK) + ``y`` (2MN); cuBLAS = 2NK + 2MK + 2MN.
      ``floor_us = cmpq_bytes / copy_GBps``; ``pct_floor = 100 * floor_us / cmpq_us`` (100 % = at the
      bandwidth floor). GB/s = bytes / median time (1 GB = 1e9 B). For M > 128 the decode path moves more
      than these bytes (it writes and re-reads an FP16 W), and at large M every method is compute-bound:
      the floor is then only a normalisation. ``speedup = cublas_us / cmpq_us`` (> 1: CMPQ faster).
    * Crossover: per (shape, bits), the smallest benchmarked M where cuBLAS is faster than CMPQ.

Budget: ``--max-seconds`` bounds the whole run (setup included, the torch import not). When it runs out the benchmark stops
between cases and writes what it has, marked ``"partial": true``. Results are also rewritten after every
(shape, bits) layer (marked partial), so even a killed run leaves its finished cases on disk.

Output: progress lines, then markdown tables on stdout; ``<out>.json`` (``meta``, ``rows``, ``cublas``,
``crossover``, ``failures``, ``partial``) and ``<out>.md``. ``--out`` is a path without extension, or a
directory (existing, or ending in ``/``) that receives ``gpu_<device-slug>.{json,md}``; default
``bench/results/gpu_<device-slug>`` (``..._quick`` with ``--quick``; a temp dir with ``--device cpu``).
``--quick`` (smoke run, ~1 min): 2 shapes, M = 1, 8, 16, 128, 512, bits 2.5 and 4, 10 reps. ``--shapes``,
``--batch``, ``--bits`` override the lists, e.g.
``python bench/bench_gpu.py --shapes 4096x4096 --batch 1,16 --bits 3``.
``--device cpu`` runs every step on the CPU with wall-clock timing (a logic check for machines without
a GPU; its numbers mean nothing).

Imports: stdlib, numpy, torch and cmpq_kernels only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
try:
    import cmpq_kernels
except ImportError:  # not installed: run from a source checkout with in-place built extensions
    sys.path.insert(0, str(ROOT))
    import cmpq_kernels
from cmpq_kernels import ops, reference
from cmpq_kernels.format import GROUP_CODES, SEGMENT_BITS, CMPQLayer
from cmpq_kernels.standin import segment_sizes

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (8192, 28672), (151936, 896))
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 512)
BITS = (2.0, 2.5, 3.0, 3.5, 4.0)
QUICK_SHAPES = ((4096, 4096), (151936, 896))
QUICK_BATCHES = (1, 8, 16, 128, 512)
QUICK_BITS = (2.5, 4.0)

GEMV_MAX_M = 8    # mirrors cuda::kGemvMaxM (csrc/cuda/launchers.h); labels the path column only
GEMM_MAX_M = 128  # mirrors cuda::kGemmMaxM
OUTLIER_FRACTION = 0.005
ACT_BYTES = 2  # fp16 activations and outputs
GATE_ROWS = 128  # rows per gate slice (three slices: first, middle, last)
MAX_DECODE_ERR = 1e-3
MAX_GEMM_ERR = 5e-3
MIN_REPS = 5
PROBE_CALLS = 3
LAT_REPS = 20  # host-latency samples per measurement (M <= GEMV_MAX_M with --graph)
DEFAULT_DIR = ROOT / "bench" / "results"
SCHEMA_VERSION = 1

META_KEYS = ("schema_version", "date", "device", "device_name", "driver_version", "torch", "torch_cuda", "python",
             "numpy", "cmpq_kernels", "backends", "sm_count", "l2_bytes", "total_memory_bytes", "copy_bandwidth",
             "nvidia_smi_start", "warmup", "reps", "case_seconds", "flush_bytes", "flush_mode", "graph",
             "outlier_fraction", "shapes", "batches", "bits", "gemv_max_m", "gemm_max_m", "max_seconds",
             "quick", "baseline")
ROW_KEYS = ("n", "k", "m", "bits", "code_bits", "effective_bits", "nnz", "path", "status", "layer_bytes",
            "cmpq_bytes", "cmpq_us", "cmpq_us_min", "reps", "cublas_us", "speedup", "floor_us", "pct_floor",
            "cmpq_gbps", "graph_us", "lat_eager_us", "lat_graph_us", "gate_rel_err")
CUBLAS_KEYS = ("n", "k", "m", "cublas_bytes", "cublas_us", "cublas_us_min", "reps", "cublas_gbps", "floor_us",
               "pct_floor", "lat_eager_us", "lat_graph_us")


# ---- pure helpers (tested on the CPU by python_tests/test_bench_gpu_logic.py) -------------------------


def path_for(m: int) -> str:
    """Kernel path the GPU op takes for batch rows ``m`` (mirror of the C++ dispatch table)."""
    if m <= GEMV_MAX_M:
        return "gemv"
    if m <= GEMM_MAX_M:
        return "gemm_tc"
    return "decode+cublas"


def cmpq_bytes(layer_bytes: int, n: int, k: int, m: int, act_bytes: int = ACT_BYTES) -> int:
    """Bytes one CMPQ call must move: every stored byte of the layer, x [m, k] in, y [m, n] out."""
    return int(layer_bytes) + act_bytes * m * (k + n)


def dense_bytes(n: int, k: int, m: int, act_bytes: int = ACT_BYTES) -> int:
    """Bytes one dense FP16 call moves: W [n, k], x [m, k], y [m, n]."""
    return act_bytes * (n * k + m * (k + n))


def layer_bytes(layer: CMPQLayer) -> int:
    """All stored bytes of a layer (bias excluded, as in ``storage_bits``)."""
    bits = sum(layer.storage_bits().values())
    assert bits % 8 == 0, bits
    return bits // 8


def copy_gbps(copied_bytes: int, seconds: float) -> float:
    """Bandwidth of a copy of ``copied_bytes``: it reads and writes them, so 2 * bytes / time (GB = 1e9 B)."""
    return 2.0 * copied_bytes / seconds / 1e9


def floor_us(nbytes: int, gbps: float) -> float:
    """Time in microseconds to move ``nbytes`` at ``gbps`` GB/s."""
    return nbytes / (gbps * 1e9) * 1e6


def gbps(nbytes: int, us: float) -> float:
    return nbytes / us / 1e3


def plan_reps(per_call_s: float, reps: int, case_seconds: float, min_reps: int = MIN_REPS) -> int:
    """Timed calls for a case whose call (flush included) takes ``per_call_s``: ``reps``, fewer if that exceeds
    ``case_seconds``, never fewer than ``min(min_reps, reps)``."""
    floor = min(min_reps, reps)
    if not (per_call_s > 0) or not math.isfinite(per_call_s):
        return reps
    return max(floor, min(reps, int(case_seconds / per_call_s)))


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def resolve_out(out: Optional[str], slug: str, quick: bool, default_dir: Path = DEFAULT_DIR) -> Path:
    """Output path without extension (see module doc)."""
    stem = f"gpu_{slug}" + ("_quick" if quick else "")
    if out is None:
        return default_dir / stem
    p = Path(out)
    if out.endswith(("/", os.sep)) or p.is_dir():
        return p / stem
    return p.with_suffix("") if p.suffix in (".json", ".md") else p


def parse_shape(text: str) -> tuple[int, int]:
    parts = text.strip().lower().replace("×", "x").split("x")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected NxK (out x in), e.g. 4096x11008")
    try:
        n, k = int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: N and K must be integers") from None
    if n <= 0 or k <= 0 or k % GROUP_CODES:
        raise argparse.ArgumentTypeError(f"shape {text!r}: need N > 0 and K > 0 a multiple of {GROUP_CODES}")
    return n, k


def _split(text: str) -> list[str]:
    items = [t for t in (s.strip() for s in text.split(",")) if t]
    if not items:
        raise argparse.ArgumentTypeError("empty list")
    return items


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(parse_shape(t) for t in _split(text))


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        ms = tuple(int(t) for t in _split(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch list {text!r}: expected comma-separated integers") from None
    if any(m < 1 for m in ms):
        raise argparse.ArgumentTypeError(f"batch list {text!r}: every M must be >= 1")
    return ms


def parse_bits(text: str) -> tuple[float, ...]:
    try:
        bits = tuple(float(t) for t in _split(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits list {text!r}: expected comma-separated numbers") from None
    if any(not (2.0 <= b <= 4.0) for b in bits):
        raise argparse.ArgumentTypeError(f"bits list {text!r}: every value must be in [2, 4]")
    return bits


def layer_seed(n: int, k: int, bits: float) -> int:
    return (n * 131 + k) * 16 + int(round(bits * 4))


def make_random_layer(n: int, k: int, bits: float, outlier_fraction: float = OUTLIER_FRACTION, seed: int = 0,
                      bias: Optional[torch.dtype] = None) -> CMPQLayer:
    """A valid CPU layer with the tensors ``quantize_standin`` would store for ``[n, k]`` at ``bits``, but
    random contents: random code words, sorted random FP16 codebooks, random perm, random distinct outliers.

    Vectorised NumPy; ~1 s for 28672x8192 (no per-code packing: any 32-bit word is a valid code group).
    """
    rng = np.random.default_rng(seed)
    seg_k = segment_sizes(k, bits)
    codes, codebooks = [], []
    for width, b in zip(seg_k, SEGMENT_BITS):
        words = rng.integers(0, 1 << 32, size=(n, width // GROUP_CODES * b), dtype=np.uint32)
        codes.append(torch.from_numpy(words.view(np.int32)))
        cb = np.sort(rng.standard_normal((n, (1 << b) if width else 0), dtype=np.float32), axis=1) * 0.02
        codebooks.append(torch.from_numpy(cb.astype(np.float16)))
    nnz = int(round(outlier_fraction * n * k))
    flat = np.sort(rng.choice(n * k, size=nnz, replace=False)) if nnz else np.zeros(0, dtype=np.int64)
    rows, cols = flat // k, flat % k  # row-major sorted = CSR order, columns sorted within each row
    row_ptr = np.zeros(n + 1, dtype=np.int64)
    row_ptr[1:] = np.cumsum(np.bincount(rows, minlength=n))
    col_dtype = np.int16 if k <= 32767 else np.int32  # same rule as CMPQLayer.validate
    vals = (rng.standard_normal(nnz, dtype=np.float32) * 0.02).astype(np.float16)
    bias_t = None if bias is None else torch.from_numpy(rng.standard_normal(n, dtype=np.float32) * 0.02).to(bias)
    layer = CMPQLayer(
        n=n, k=k, bits=float(bits), seg_k=seg_k, perm=torch.from_numpy(rng.permutation(k).astype(np.int32)),
        codes=tuple(codes), codebooks=tuple(codebooks), row_ptr=torch.from_numpy(row_ptr.astype(np.int32)),
        col=torch.from_numpy(cols.astype(col_dtype)), val=torch.from_numpy(vals), bias=bias_t, codebook_rows=1)
    return layer.validate()


def slice_rows(layer: CMPQLayer, r0: int, r1: int) -> CMPQLayer:
    """Rows ``[r0, r1)`` of a layer as a layer of its own (bias dropped); ``r0`` must start a codebook block."""
    cr = layer.codebook_rows
    if not (0 <= r0 < r1 <= layer.n) or r0 % cr:
        raise ValueError(f"bad row slice [{r0}, {r1}) of n={layer.n} (codebook_rows={cr})")
    rp = layer.row_ptr
    a, b = int(rp[r0]), int(rp[r1])
    return CMPQLayer(
        n=r1 - r0, k=layer.k, bits=layer.bits, seg_k=layer.seg_k, perm=layer.perm,
        codes=tuple(c[r0:r1].contiguous() for c in layer.codes),
        codebooks=tuple(c[r0 // cr:-(-r1 // cr)].contiguous() for c in layer.codebooks),
        row_ptr=(rp[r0:r1 + 1] - a).contiguous(), col=layer.col[a:b].contiguous(), val=layer.val[a:b].contiguous(),
        bias=None, codebook_rows=cr).validate()


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


def make_row(*, n: int, k: int, m: int, bits: float, info: dict, status: str, gate_err: Optional[float],
             cmpq: Optional[dict], cublas_us: Optional[float], copy_bw_gbps: Optional[float],
             graph_us: Optional[float] = None, lat_eager_us: Optional[float] = None,
             lat_graph_us: Optional[float] = None, graph_status: Optional[str] = None) -> dict:
    """One result row (``ROW_KEYS`` plus extras); derived numbers are None where an input is missing."""
    nbytes = cmpq_bytes(info["layer_bytes"], n, k, m)
    cmpq_us = cmpq["median_us"] if cmpq else None
    fl = floor_us(nbytes, copy_bw_gbps) if copy_bw_gbps else None
    return {
        "n": n, "k": k, "m": m, "bits": bits, "code_bits": info["code_bits"],
        "effective_bits": info["effective_bits"], "nnz": info["nnz"], "path": path_for(m), "status": status,
        "layer_bytes": info["layer_bytes"], "cmpq_bytes": nbytes,
        "cmpq_us": cmpq_us, "cmpq_us_min": cmpq["min_us"] if cmpq else None, "reps": cmpq["reps"] if cmpq else 0,
        "cublas_us": cublas_us,
        "speedup": cublas_us / cmpq_us if (cmpq_us and cublas_us) else None,
        "floor_us": fl, "pct_floor": 100.0 * fl / cmpq_us if (fl and cmpq_us) else None,
        "cmpq_gbps": gbps(nbytes, cmpq_us) if cmpq_us else None,
        "graph_us": graph_us, "graph_status": graph_status, "lat_eager_us": lat_eager_us,
        "lat_graph_us": lat_graph_us, "gate_rel_err": gate_err,
    }


def make_cublas_row(*, n: int, k: int, m: int, timing: dict, copy_bw_gbps: Optional[float],
                    lat_eager_us: Optional[float] = None, lat_graph_us: Optional[float] = None,
                    graph_us: Optional[float] = None) -> dict:
    nbytes = dense_bytes(n, k, m)
    us = timing["median_us"]
    fl = floor_us(nbytes, copy_bw_gbps) if copy_bw_gbps else None
    return {"n": n, "k": k, "m": m, "cublas_bytes": nbytes, "cublas_us": us, "cublas_us_min": timing["min_us"],
            "reps": timing["reps"], "cublas_gbps": gbps(nbytes, us), "floor_us": fl,
            "pct_floor": 100.0 * fl / us if fl else None, "graph_us": graph_us, "lat_eager_us": lat_eager_us,
            "lat_graph_us": lat_graph_us}


def crossover(rows: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Per shape ('NxK') and bits ('2.5'): the smallest M with cuBLAS faster than CMPQ (speedup < 1), the
    string 'none' if CMPQ was faster at every timed M, or None if no M of that pair was timed against cuBLAS."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        shape, bits = f"{r['n']}x{r['k']}", f"{r['bits']:g}"
        cell = out.setdefault(shape, {})
        if r.get("speedup") is None:
            cell.setdefault(bits, None)
            continue
        cur = cell.get(bits)
        if r["speedup"] < 1.0:
            cell[bits] = r["m"] if not isinstance(cur, int) else min(cur, r["m"])
        elif cur is None:
            cell[bits] = "none"
    return out


def clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/Inf -> None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def results_doc(meta: dict, rows: list[dict], cublas_rows: list[dict], failures: list[dict], partial: bool,
                stop_reason: Optional[str]) -> dict:
    return clean({"meta": meta, "partial": partial, "stop_reason": stop_reason, "rows": rows, "cublas": cublas_rows,
                  "crossover": crossover(rows), "failures": failures})


def check_doc(doc: dict) -> None:
    """Raise ValueError if ``doc`` lacks a key of the documented schema (used by the tests)."""
    for key in ("meta", "partial", "stop_reason", "rows", "cublas", "crossover", "failures"):
        if key not in doc:
            raise ValueError(f"results: missing top-level key {key!r}")
    missing = [k for k in META_KEYS if k not in doc["meta"]]
    if missing:
        raise ValueError(f"results.meta: missing {missing}")
    for i, r in enumerate(doc["rows"]):
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            raise ValueError(f"results.rows[{i}]: missing {missing}")
    for i, r in enumerate(doc["cublas"]):
        missing = [k for k in CUBLAS_KEYS if k not in r]
        if missing:
            raise ValueError(f"results.cublas[{i}]: missing {missing}")
    if not isinstance(doc["partial"], bool):
        raise ValueError("results.partial must be a bool")


def _f(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def table_rows_md(rows: Sequence[dict]) -> list[str]:
    lines = ["| shape (N×K) | M | bits | eff. bits | path | cmpq µs | cuBLAS µs | speedup | % BW floor | cmpq GB/s "
             "| graph µs |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cmpq = _f(r["cmpq_us"], ".2f") if r["status"] == "ok" else r["status"].upper()
        lines.append(f"| {r['n']}×{r['k']} | {r['m']} | {r['bits']:g} | {_f(r['effective_bits'], '.3f')} | "
                     f"{r['path']} | {cmpq} | {_f(r['cublas_us'], '.2f')} | {_f(r['speedup'], '.2f')} | "
                     f"{_f(r['pct_floor'], '.0f')} | {_f(r['cmpq_gbps'], '.0f')} | {_f(r.get('graph_us'), '.2f')} |")
    return lines


def cublas_md(rows: Sequence[dict]) -> list[str]:
    lines = ["| shape (N×K) | M | cuBLAS µs | GB/s | % BW floor | graph µs | host latency eager µs "
             "| host latency graph µs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']}×{r['k']} | {r['m']} | {_f(r['cublas_us'], '.2f')} | {_f(r['cublas_gbps'], '.0f')} | "
                     f"{_f(r['pct_floor'], '.0f')} | {_f(r.get('graph_us'), '.2f')} | {_f(r['lat_eager_us'], '.1f')} | "
                     f"{_f(r['lat_graph_us'], '.1f')} |")
    return lines


def crossover_md(cross: dict[str, dict[str, Any]], bits_list: Sequence[float]) -> list[str]:
    cols = [f"{b:g}" for b in bits_list]
    lines = ["| shape (N×K) | " + " | ".join(f"{c} bits" for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for shape, cell in cross.items():
        vals = []
        for c in cols:
            v = cell.get(c)
            vals.append("–" if v is None else ("never" if v == "none" else f"M={v}"))
        lines.append(f"| {shape.replace('x', '×')} | " + " | ".join(vals) + " |")
    return lines


def latency_md(rows: Sequence[dict]) -> list[str]:
    sel = [r for r in rows if r.get("lat_eager_us") is not None or r.get("lat_graph_us") is not None]
    if not sel:
        return []
    lines = ["| shape (N×K) | M | bits | cmpq eager µs | cmpq graph µs | GPU-time µs (events) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in sel:
        lines.append(f"| {r['n']}×{r['k']} | {r['m']} | {r['bits']:g} | {_f(r['lat_eager_us'], '.1f')} | "
                     f"{_f(r['lat_graph_us'], '.1f')} | {_f(r['cmpq_us'], '.2f')} |")
    return lines


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    bw = meta.get("copy_bandwidth") or {}
    head = [f"# CMPQ GPU benchmark — {meta['device_name']}", ""]
    if doc["partial"]:
        head += [f"**PARTIAL RESULTS** (stopped: {doc['stop_reason']}).", ""]
    head += [
        f"Device: {meta['device_name']}, {meta['sm_count']} SMs, L2 {_f((meta['l2_bytes'] or 0) / 2**20, '.0f')} MiB, "
        f"driver {meta['driver_version']}; torch {meta['torch']} (CUDA {meta['torch_cuda']}); {meta['date']}.",
        f"Measured D2D copy bandwidth: {_f(bw.get('gbps'), '.0f')} GB/s "
        f"(copy of {_f(bw.get('bytes', 0) / 2**20, '.0f')} "
        f"MiB, read + write counted). Clocks at start: {meta.get('clocks_start_text') or 'n/a'}.",
        f"Median of up to {meta['reps']} CUDA-event-timed calls after {meta['warmup']} warmup, L2 flushed before each "
        f"call ({meta['flush_mode']} {meta['flush_bytes'] >> 20} MiB); x, y float16. speedup = cuBLAS µs / cmpq µs; "
        f"% BW floor = (cmpq bytes / copy bandwidth) / cmpq µs; graph µs = GPU time of a CUDA-graph replay "
        f"(M ≤ 8).",
        "",
    ]
    body = table_rows_md(doc["rows"])
    body += ["", "cuBLAS FP16 (`F.linear`, dense W), once per (shape, M):", ""] + cublas_md(doc["cublas"])
    body += ["", "Crossover: smallest benchmarked M where cuBLAS FP16 is faster than CMPQ:", ""]
    body += crossover_md(doc["crossover"], meta["bits"])
    lat = latency_md(doc["rows"])
    if lat:
        body += ["", "Host latency, call → synchronize (includes launch overhead; L2 flushed):", ""] + lat
    if doc["failures"]:
        body += ["", "**Correctness-gate failures / errors (not timed):**", ""]
        body += [f"- {f['case']}: {f['what']}" for f in doc["failures"]]
    return "\n".join(head + body) + "\n"


def write_results(doc: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    tmp.replace(out.with_suffix(".json"))
    out.with_suffix(".md").write_text(markdown(doc))


class Budget:
    """Wall-clock budget for the whole run (``seconds`` None or <= 0: unlimited)."""

    def __init__(self, seconds: Optional[float], clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.t0 = clock()
        self.seconds = seconds if seconds and seconds > 0 else None

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def remaining(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def exceeded(self, reserve: float = 0.0) -> bool:
        return self.remaining() <= reserve


# ---- device side ----------------------------------------------------------------------------------------


class Device:
    """Timing primitives for one device: CUDA events on a GPU, wall clock on the CPU (logic check only)."""

    def __init__(self, kind: str, flush_bytes: int, flush_mode: str):
        self.kind = kind
        self.cuda = kind == "cuda"
        self.torch_device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.flush_bytes = flush_bytes
        self.flush_mode = flush_mode
        self.flush_buf = torch.empty(flush_bytes // 4, dtype=torch.float32, device=self.torch_device) \
            if flush_bytes else None
        if self.flush_buf is not None:
            self.flush_buf.zero_()

    def flush(self) -> None:
        if self.flush_buf is None:
            return
        if self.flush_mode == "read":
            self.flush_buf.sum()
        else:
            self.flush_buf.zero_()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_calls(self, fn: Callable[[], Any], warmup: int, reps: int, case_seconds: float) -> dict:
        """Median/min GPU time in µs of single calls of ``fn``, each after an L2 flush (see module doc)."""
        per_call = self.probe(fn, warmup, case_seconds)
        n = plan_reps(per_call, reps, case_seconds)
        times: list[float] = []
        if self.cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            for i in range(n):
                self.flush()
                starts[i].record()
                fn()
                ends[i].record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
        else:
            for _ in range(n):
                self.flush()
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e6)
        return {"median_us": statistics.median(times), "min_us": min(times), "reps": n}

    def probe(self, fn: Callable[[], Any], warmup: int, case_seconds: float) -> float:
        """Warm up, then return the seconds one flush + call takes. A first call slower than 1/20 of the case
        budget cuts warmup and probing short, so a pathologically slow kernel cannot eat the run's budget."""
        t0 = time.perf_counter()
        self.flush()
        fn()
        self.sync()
        first = time.perf_counter() - t0
        if first > case_seconds / 20:
            return first
        for _ in range(max(warmup - 1, 0)):
            self.flush()
            fn()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(PROBE_CALLS):
            self.flush()
            fn()
        self.sync()
        return (time.perf_counter() - t0) / PROBE_CALLS

    def latency_us(self, fn: Callable[[], Any], case_seconds: float, reps: Optional[int] = None) -> float:
        """Median host latency of ``fn(); synchronize()`` after an L2 flush, in µs (launch overhead included)."""
        per_call = self.probe(fn, 1, case_seconds)
        reps = plan_reps(per_call, reps or (LAT_REPS if self.cuda else 3), case_seconds / 2, min_reps=3)
        times = []
        for _ in range(reps):
            self.flush()
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)

    def copy_bandwidth(self, mib: int, reps: int = 20) -> dict:
        """Device-to-device copy bandwidth (read + write bytes) of a ``mib`` MiB buffer, median of ``reps``."""
        nbytes = mib << 20
        src = torch.ones(nbytes, dtype=torch.uint8, device=self.torch_device)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        self.sync()
        times = []
        if self.cuda:
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for s, e in evs:
                s.record()
                dst.copy_(src)
                e.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) / 1e3 for s, e in evs]
        else:
            for _ in range(reps):
                t = time.perf_counter()
                dst.copy_(src)
                times.append(time.perf_counter() - t)
        t_med = statistics.median(times)
        del src, dst
        self.empty_cache()
        return {"bytes": nbytes, "reps": reps, "median_s": t_med, "min_s": min(times),
                "gbps": copy_gbps(nbytes, t_med), "gbps_best": copy_gbps(nbytes, min(times)),
                "method": "dst.copy_(src), uint8 contiguous (cudaMemcpy D2D); 2*bytes/time"}

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """A CUDA graph of one ``fn()`` call and its static output (warmed up on a side stream first)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        torch.cuda.synchronize()
        return graph, out

    def empty_cache(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    def healthy(self) -> Optional[str]:
        """None if the device still works after an error, else the error text (a sticky CUDA error)."""
        try:
            self.sync()
            torch.ones(1, device=self.torch_device).add_(1)
            self.sync()
            return None
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}"


def _smi(fields: Sequence[str], index: Optional[int]) -> Optional[list[str]]:
    cmd = ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"]
    if index is not None:
        cmd += ["-i", str(index)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0 or not res.stdout.strip():
        return None
    values = [v.strip() for v in res.stdout.strip().splitlines()[0].split(", ")]
    return values if len(values) == len(fields) else None


def nvidia_smi_query(fields: Sequence[str], index: Optional[int] = None) -> dict[str, str]:
    """``nvidia-smi --query-gpu`` of ``fields``: one call, or one per field if the batch fails (an unsupported
    field must not lose the others); {} without nvidia-smi."""
    values = _smi(fields, index)
    if values is not None:
        return dict(zip(fields, values))
    out: dict[str, str] = {}
    for field in fields:
        if shutil.which("nvidia-smi") is None:
            break
        v = _smi([field], index)
        if v is not None:
            out[field] = v[0]
    return out


def nvidia_smi_info(index: Optional[int]) -> dict[str, str]:
    info = nvidia_smi_query(SMI_FIELDS, index)
    for field in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):  # renamed in newer drivers
        v = _smi([field], index) if info else None
        if v is not None:
            info[field] = v[0]
            break
    return info


SMI_FIELDS = ("name", "driver_version", "pci.bus_id", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
              "clocks.applications.graphics", "power.draw", "power.limit", "temperature.gpu", "pstate",
              "persistence_mode", "compute_mode", "ecc.mode.current", "memory.total", "memory.used",
              "mig.mode.current")


def smi_index() -> Optional[int]:
    """nvidia-smi index of the torch device, when CUDA_VISIBLE_DEVICES does not renumber devices."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return None
    return torch.cuda.current_device()


def clocks_text(smi: dict[str, str]) -> Optional[str]:
    if "clocks.sm" not in smi:
        return None
    return (f"SM {smi.get('clocks.sm')} (max {smi.get('clocks.max.sm', '?')}), mem {smi.get('clocks.mem', '?')}, "
            f"{smi.get('temperature.gpu', '?')} C, {smi.get('power.draw', '?')} of {smi.get('power.limit', '?')}")


def git_commit() -> Optional[str]:
    try:
        res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if res.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return res.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def metadata(args: argparse.Namespace, dev: Device, shapes, batches, bits_list) -> dict:
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev.kind,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cmpq_kernels": getattr(cmpq_kernels, "__version__", None),
        "git_commit": git_commit(),
        "backends": cmpq_kernels.backends(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "CUDA_LAUNCH_BLOCKING": os.environ.get("CUDA_LAUNCH_BLOCKING"),
        "warmup": args.warmup, "reps": args.reps, "case_seconds": args.case_seconds,
        "flush_bytes": dev.flush_bytes, "flush_mode": dev.flush_mode, "graph": args.graph,
        "outlier_fraction": OUTLIER_FRACTION, "shapes": [f"{n}x{k}" for n, k in shapes], "batches": list(batches),
        "bits": list(bits_list), "gemv_max_m": GEMV_MAX_M, "gemm_max_m": GEMM_MAX_M,
        "max_seconds": args.max_seconds, "quick": args.quick,
        "gate": {"rows_per_slice": GATE_ROWS, "max_decode_rel_err": MAX_DECODE_ERR, "max_gemm_rel_err": MAX_GEMM_ERR},
        "baseline": "torch.nn.functional.linear(x, W16), W16 float16 [N, K] contiguous (cuBLAS)" if dev.cuda else
                    "torch.nn.functional.linear(x, W16) on the CPU (--device cpu logic check; timings meaningless)",
        "layers": "bench_gpu.make_random_layer: random code words/codebooks/perm, 0.5% random outliers, "
                  "standin.segment_sizes split",
    }
    if dev.cuda:
        props = torch.cuda.get_device_properties(dev.torch_device)
        smi = nvidia_smi_info(smi_index())
        try:
            driver_api = torch._C._cuda_getDriverVersion()
        except Exception:  # noqa: BLE001 — private API, optional
            driver_api = None
        mem_clock_khz = getattr(props, "memory_clock_rate", None)
        bus_bits = getattr(props, "memory_bus_width", None)
        meta.update({
            "device_name": props.name,
            "driver_version": smi.get("driver_version") or (f"CUDA driver API {driver_api}" if driver_api else None),
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "total_memory_bytes": props.total_memory,
            "memory_clock_khz": mem_clock_khz, "memory_bus_width_bits": bus_bits,
            "theoretical_dram_gbps": (2 * mem_clock_khz * 1e3 * bus_bits / 8 / 1e9) if (mem_clock_khz and bus_bits)
            else None,
            "nvidia_smi_start": smi,
            "clocks_start_text": clocks_text(smi),
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "allow_fp16_reduced_precision_reduction":
                torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        })
    else:
        meta.update({"device_name": f"cpu ({platform.machine()})", "driver_version": None, "sm_count": None,
                     "l2_bytes": None, "total_memory_bytes": None, "nvidia_smi_start": {}, "clocks_start_text": None})
    meta["copy_bandwidth"] = None
    return meta


class Terminated(Exception):
    pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise Terminated(f"signal {signum}")


class Runner:
    """The benchmark loop; keeps results and rewrites the output files after every layer."""

    def __init__(self, args: argparse.Namespace, dev: Device, budget: Budget, out: Path, meta: dict,
                 shapes, batches, bits_list, log: Callable[[str], None] = print):
        self.args, self.dev, self.budget, self.out, self.meta = args, dev, budget, out, meta
        self.shapes, self.batches, self.bits_list = shapes, batches, bits_list
        self.log = log
        self.rows: list[dict] = []
        self.cublas_rows: list[dict] = []
        self.failures: list[dict] = []
        self.stop_reason: Optional[str] = None
        self.bw: Optional[float] = None

    # -- output ----------------------------------------------------------------------------------------

    def doc(self, partial: bool) -> dict:
        return results_doc(self.meta, self.rows, self.cublas_rows, self.failures, partial,
                           self.stop_reason if partial else None)

    def write(self, partial: bool) -> dict:
        doc = self.doc(partial)
        if partial and doc["stop_reason"] is None:
            doc["stop_reason"] = "in progress (snapshot)"
        write_results(doc, self.out)
        return doc

    def out_of_time(self, reserve: float = 0.0) -> bool:
        if self.budget.exceeded(reserve):
            self.stop_reason = self.stop_reason or f"--max-seconds {self.args.max_seconds:g} reached"
            return True
        return False

    def fail(self, case: str, what: str) -> None:
        self.failures.append({"case": case, "what": what})
        self.log(f"  !! {case}: {what}")

    def guard(self, case: str, e: BaseException) -> bool:
        """Record an exception; True if the device is still usable."""
        self.fail(case, f"error: {type(e).__name__}: {_first_line(e)}")
        bad = self.dev.healthy()
        if bad:
            self.stop_reason = f"device unusable after an error in {case}: {bad}"
            return False
        return True

    # -- steps -----------------------------------------------------------------------------------------

    def case_seconds(self) -> float:
        return max(0.05, min(self.args.case_seconds, self.budget.remaining()))

    def time_fn(self, fn: Callable[[], Any]) -> dict:
        return self.dev.time_calls(fn, self.args.warmup, self.args.reps, self.case_seconds())

    def graph_timing(self, fn: Callable[[], torch.Tensor]) -> tuple[Optional[float], Optional[float], Optional[str]]:
        """(graph GPU µs, graph host-latency µs, status) of a one-call CUDA graph of ``fn``."""
        if not (self.dev.cuda and self.args.graph):
            return None, None, None
        graph = out = None
        try:
            graph, out = self.dev.capture(fn)
            graph.replay()
            ref = fn()
            torch.cuda.synchronize()
            status = "ok"
            if not torch.equal(out, ref):  # cuBLAS may pick another algorithm under capture: allow rounding
                err = rel_err(out.float(), ref.float())
                if not err < 1e-2:
                    return None, None, f"graph replay differs from eager (relative error {err:.3g}); not timed"
                status = f"ok (replay not bit-identical to eager: relative error {err:.2g})"
            t = self.dev.time_calls(graph.replay, self.args.warmup, self.args.reps, self.case_seconds())
            lat = self.dev.latency_us(graph.replay, self.case_seconds())
            return t["median_us"], lat, status
        except Exception as e:  # noqa: BLE001 — a capture failure must not end the benchmark...
            if self.dev.healthy() is not None:
                raise  # ...unless it broke the device: the caller records it and stops
            return None, None, f"capture failed: {type(e).__name__}: {_first_line(e)}"
        finally:
            del graph, out

    def gate(self, layer_dev: CMPQLayer, layer_cpu: CMPQLayer, label: str) -> dict[int, tuple[Optional[float], str]]:
        """Per M: (relative error, 'ok' | 'gate_failed'); see module doc. An op that raises fails its M only,
        unless it broke the device (then the exception goes up and the run stops)."""
        dev, n, k = self.dev.torch_device, layer_cpu.n, layer_cpu.k
        slices = gate_slices(n)
        idx = torch.cat([torch.arange(a, b) for a, b in slices])
        idx_dev = idx.to(dev)
        ref_rows = torch.cat([reference.dequantize(slice_rows(layer_cpu, a, b), torch.float32) for a, b in slices])
        w: Optional[torch.Tensor] = None
        try:
            w = ops.dequantize(layer_dev, torch.float32)
            decode_err = rel_err(w[idx_dev].cpu(), ref_rows)
            finite = bool(torch.isfinite(w).all())
            decode_problem = None if (decode_err < MAX_DECODE_ERR and finite) else (
                f"relative error {decode_err:.3g} (limit {MAX_DECODE_ERR:g}) on rows {slices}, all finite: {finite}")
        except Exception as e:  # noqa: BLE001
            if self.dev.healthy() is not None:
                raise
            decode_problem = f"raised {type(e).__name__}: {_first_line(e)}"
        if decode_problem:
            w = None
            self.fail(label, f"GATE FAILED (decode): ops.dequantize vs reference.dequantize: {decode_problem}; the "
                             f"decode+cublas path (M > {GEMM_MAX_M}) is not timed, smaller M are gated on the "
                             f"reference rows only")
        result: dict[int, tuple[Optional[float], str]] = {}
        gen = torch.Generator().manual_seed(1234)
        for m in self.batches:
            x = torch.randn(m, k, generator=gen).to(torch.float16)
            if decode_problem and path_for(m) == "decode+cublas":
                result[m] = (None, "gate_failed")
                continue
            try:
                x_dev = x.to(dev)
                y = ops.gemm(x_dev, layer_dev)
                if tuple(y.shape) != (m, n) or y.dtype != torch.float16:
                    raise ValueError(f"output shape {tuple(y.shape)} dtype {y.dtype}, expected ({m}, {n}) float16")
                err_rows = rel_err(y[:, idx_dev].cpu().float(), x.float() @ ref_rows.T)
                err_full = rel_err(y.float(), x_dev.float() @ w.T) if w is not None else None
                err = err_rows if err_full is None else (
                    max(err_rows, err_full) if not (math.isnan(err_full) or math.isnan(err_rows)) else math.nan)
                ok = err < MAX_GEMM_ERR and bool(torch.isfinite(y).all())
                what = (f"relative error {_f(err_full, '.3g')} (all rows vs x @ W.T), {err_rows:.3g} (CPU reference "
                        f"rows), limit {MAX_GEMM_ERR:g}")
                del x_dev, y
            except Exception as e:  # noqa: BLE001
                if self.dev.healthy() is not None:
                    raise
                err, ok, what = None, False, f"raised {type(e).__name__}: {_first_line(e)}"
            if not ok:
                self.fail(f"{label} M={m}", f"GATE FAILED ({path_for(m)}): ops.gemm {what}; not timed")
            result[m] = (err, "ok" if ok else "gate_failed")
        del w
        return result

    def bench_cublas(self, n: int, k: int) -> dict[int, dict]:
        """cuBLAS FP16 timings per M for one shape (a random dense W16)."""
        torch.manual_seed(n * 7 + k)
        w16 = (torch.randn(n, k, device=self.dev.torch_device, dtype=torch.float16) * 0.02).contiguous()
        res: dict[int, dict] = {}
        try:
            for m in self.batches:
                if self.out_of_time():
                    break
                x = torch.randn(m, k, device=self.dev.torch_device, dtype=torch.float16)
                fn = lambda: F.linear(x, w16)  # noqa: E731
                try:
                    t = self.time_fn(fn)
                    lat_e = lat_g = graph_us = None
                    if m <= GEMV_MAX_M and self.args.graph:
                        lat_e = self.dev.latency_us(fn, self.case_seconds())
                        graph_us, lat_g, _ = self.graph_timing(fn)
                except Exception as e:  # noqa: BLE001
                    if not self.guard(f"cuBLAS {n}x{k} M={m}", e):
                        break
                    continue
                row = make_cublas_row(n=n, k=k, m=m, timing=t, copy_bw_gbps=self.bw, lat_eager_us=lat_e,
                                      lat_graph_us=lat_g, graph_us=graph_us)
                self.cublas_rows.append(row)
                res[m] = row
                self.log(f"  cuBLAS {n}x{k} M={m}: {t['median_us']:.2f} us ({row['cublas_gbps']:.0f} GB/s, "
                         f"{_f(row['pct_floor'], '.0f')}% of floor)")
        finally:
            w16 = None  # noqa: F841  (free the weight before the next shape)
            self.dev.empty_cache()
        return res

    def bench_layer(self, n: int, k: int, bits: float, cublas: dict[int, dict]) -> None:
        label = f"{n}x{k} bits={bits:g}"
        t0 = time.perf_counter()
        layer_cpu = make_random_layer(n, k, bits, OUTLIER_FRACTION, seed=layer_seed(n, k, bits))
        layer = layer_cpu.to(self.dev.torch_device)
        build_s = time.perf_counter() - t0
        info = {"code_bits": layer_cpu.code_bits, "effective_bits": layer_cpu.effective_bits, "nnz": layer_cpu.nnz,
                "layer_bytes": layer_bytes(layer_cpu)}
        self.log(f"  layer {label}: {info['layer_bytes'] / 2**20:.1f} MiB, effective bits "
                 f"{info['effective_bits']:.3f}, nnz {info['nnz']}, built in {build_s:.1f} s")
        try:
            t0 = time.perf_counter()
            gate = self.gate(layer, layer_cpu, label)
            self.dev.sync()
            self.dev.empty_cache()
            errs = ", ".join(f"M={m} {e:.2g}" if e is not None else f"M={m} FAIL" for m, (e, _) in gate.items())
            self.log(f"  gate {label}: {errs} ({time.perf_counter() - t0:.1f} s)")
            if self.args.stop_on_fail and any(s != "ok" for _, s in gate.values()):
                self.stop_reason = f"correctness gate failed for {label} (--stop-on-fail)"
                return
            for m in self.batches:
                if self.out_of_time():
                    return
                err, status = gate[m]
                cub = cublas.get(m)
                if status != "ok":
                    self.rows.append(make_row(n=n, k=k, m=m, bits=bits, info=info, status=status, gate_err=err,
                                              cmpq=None, cublas_us=cub["cublas_us"] if cub else None,
                                              copy_bw_gbps=self.bw))
                    continue
                x = torch.randn(m, k, device=self.dev.torch_device, dtype=torch.float16)
                fn = lambda: ops.gemm(x, layer)  # noqa: E731
                try:
                    t = self.time_fn(fn)
                    graph_us = lat_e = lat_g = graph_status = None
                    if m <= GEMV_MAX_M and self.args.graph:
                        lat_e = self.dev.latency_us(fn, self.case_seconds())
                        graph_us, lat_g, graph_status = self.graph_timing(fn)
                        if graph_status is not None and not graph_status.startswith("ok"):
                            self.fail(f"{label} M={m}", f"CUDA graph: {graph_status}")
                except Exception as e:  # noqa: BLE001
                    self.rows.append(make_row(n=n, k=k, m=m, bits=bits, info=info, status="error", gate_err=err,
                                              cmpq=None, cublas_us=None, copy_bw_gbps=self.bw))
                    if not self.guard(f"{label} M={m}", e):
                        return
                    continue
                row = make_row(n=n, k=k, m=m, bits=bits, info=info, status="ok", gate_err=err, cmpq=t,
                               cublas_us=cub["cublas_us"] if cub else None, copy_bw_gbps=self.bw, graph_us=graph_us,
                               lat_eager_us=lat_e, lat_graph_us=lat_g, graph_status=graph_status)
                self.rows.append(row)
                self.log(f"  {label} M={m} [{row['path']}]: cmpq {t['median_us']:.2f} us, cuBLAS "
                         f"{_f(row['cublas_us'], '.2f')} us, speedup {_f(row['speedup'], '.2f')}, "
                         f"{_f(row['pct_floor'], '.0f')}% of floor"
                         + (f", graph {graph_us:.2f} us" if graph_us else ""))
        finally:
            layer = None  # noqa: F841  (one layer on the device at a time)
            self.dev.empty_cache()

    def run(self) -> None:
        self.log(f"measuring copy bandwidth ({self.args.copy_mb} MiB) ...")
        try:
            bw = self.dev.copy_bandwidth(self.args.copy_mb)
            self.bw = bw["gbps"]
            self.meta["copy_bandwidth"] = bw
            self.log(f"  copy bandwidth {bw['gbps']:.0f} GB/s (best {bw['gbps_best']:.0f})")
        except Exception as e:  # noqa: BLE001 — without it only the floor columns are lost
            if not self.guard("copy bandwidth", e):
                return
        for n, k in self.shapes:
            if self.out_of_time():
                return
            self.log(f"shape {n}x{k}")
            try:
                cublas = self.bench_cublas(n, k)
            except Exception as e:  # noqa: BLE001
                if not self.guard(f"cuBLAS {n}x{k}", e):
                    return
                cublas = {}
            self.write(partial=True)
            for bits in self.bits_list:
                if self.out_of_time():
                    return
                try:
                    self.bench_layer(n, k, bits, cublas)
                except Exception as e:  # noqa: BLE001
                    if not self.guard(f"{n}x{k} bits={bits:g}", e):
                        return
                if self.stop_reason:
                    return
                self.write(partial=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 shapes, M=1,8,16,128,512, bits 2.5,4, 10 reps")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="comma list of NxK (out x in), e.g. 4096x4096,151936x896")
    p.add_argument("--batch", type=parse_batches, default=None,
                   help="comma list of M (default 1,2,4,8,16,32,64,128,512)")
    p.add_argument("--bits", type=parse_bits, default=None, help="comma list of bits in [2, 4] (default 2,2.5,3,3.5,4)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per case (default 50; 10 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 5; 2 with --quick)")
    p.add_argument("--case-seconds", type=float, default=2.0, help="cap on timed seconds per case (default 2)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="budget for the whole run; stops cleanly and writes partial results when exceeded")
    p.add_argument("--out", default=None, help="output path without extension, or a directory (see doc)")
    p.add_argument("--flush-mb", type=int, default=256, help="MiB written before each call to flush L2 (0 = off)")
    p.add_argument("--flush-mode", choices=("zero", "read"), default="zero", help="flush by zero_() (default) or sum()")
    p.add_argument("--copy-mb", type=int, default=1024, help="MiB copied to measure copy bandwidth (default 1024)")
    p.add_argument("--no-graph", dest="graph", action="store_false", help="skip CUDA-graph/latency timings (M <= 8)")
    p.add_argument("--stop-on-fail", action="store_true", help="stop the run at the first correctness-gate failure")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: logic check on a machine without a GPU (wall clock; numbers meaningless)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    budget = Budget(args.max_seconds)
    args.reps = args.reps or (10 if args.quick else 50)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    if args.reps < 1 or args.warmup < 0:
        raise SystemExit("--reps must be >= 1 and --warmup >= 0")
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    batches = args.batch or (QUICK_BATCHES if args.quick else BATCHES)
    bits_list = args.bits or (QUICK_BITS if args.quick else BITS)

    if args.device == "cuda":
        info = cmpq_kernels.backends()
        if not torch.cuda.is_available():
            raise SystemExit(f"bench_gpu: no CUDA device visible to torch {torch.__version__} (torch.version.cuda="
                             f"{torch.version.cuda}); backends={info}. Use --device cpu for a logic check only.")
        if not info.get("cuda"):
            raise SystemExit(f"bench_gpu: cmpq_kernels was built without its CUDA extension (backends={info}); "
                             "rebuild: CMPQ_FORCE_CUDA=1 CMPQ_CUDA_ARCHS=90a pip install -e . "
                             "--no-build-isolation --no-deps")
        torch.backends.cuda.matmul.allow_tf32 = False  # the gate's FP32 reference must be FP32
        torch.backends.cudnn.allow_tf32 = False
    else:
        args.copy_mb = min(args.copy_mb, 64)
        args.flush_mb = min(args.flush_mb, 16)
    flush_bytes = args.flush_mb << 20
    if args.device == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or 0
        if flush_bytes and flush_bytes < 2 * l2:
            flush_bytes = 2 * l2
    dev = Device(args.device, flush_bytes, args.flush_mode)
    meta = metadata(args, dev, shapes, batches, bits_list)
    out = resolve_out(args.out, device_slug(meta["device_name"]) if dev.cuda else "cpu-dryrun", args.quick,
                      DEFAULT_DIR if dev.cuda else Path(tempfile.gettempdir()) / "cmpq_gpu_bench_dryrun")
    print(f"cmpq GPU benchmark on {meta['device_name']} (torch {meta['torch']}, CUDA {meta['torch_cuda']}, driver "
          f"{meta['driver_version']}); {len(shapes)} shapes x {len(batches)} M x {len(bits_list)} bits; budget "
          f"{args.max_seconds or 'unlimited'} s; output {out}.{{json,md}}", flush=True)

    log = lambda s: print(s, flush=True)  # noqa: E731
    runner = Runner(args, dev, budget, out, meta, shapes, batches, bits_list, log)
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    threads = torch.get_num_threads()
    if not dev.cuda:
        torch.set_num_threads(1)  # the CPU logic check: avoid OpenMP oversubscription on a shared machine
    try:
        with torch.no_grad():
            runner.run()
    except (KeyboardInterrupt, Terminated) as e:
        runner.stop_reason = f"interrupted ({type(e).__name__} {e})"
    except Exception as e:  # noqa: BLE001 — a bug here must still leave the finished cases on disk
        traceback.print_exc()
        runner.stop_reason = f"internal error: {type(e).__name__}: {_first_line(e)}"
        runner.failures.append({"case": "bench_gpu", "what": f"error: {runner.stop_reason}"})
    finally:
        signal.signal(signal.SIGTERM, old)
        torch.set_num_threads(threads)
    if dev.cuda:
        meta["nvidia_smi_end"] = nvidia_smi_info(smi_index())
        meta["clocks_end_text"] = clocks_text(meta["nvidia_smi_end"])
    meta["elapsed_s"] = budget.elapsed()
    partial = runner.stop_reason is not None
    doc = runner.write(partial=partial)
    print("\n" + markdown(doc), flush=True)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({meta['elapsed_s']:.0f} s"
          f"{', PARTIAL: ' + str(runner.stop_reason) if partial else ''})", flush=True)
    if runner.stop_reason and runner.stop_reason.startswith(("device unusable", "internal error")):
        print(f"STOPPED: {runner.stop_reason}", flush=True)
        return 3
    if any(f["what"].startswith(("GATE FAILED", "error")) for f in runner.failures):
        print(f"FAILURES: {len(runner.failures)} (see above / 'failures' in the JSON)", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
