"""The GPU benchmark's results: the JSON schema and its check, the per-row numbers (bytes, bandwidth floor,
speedup, crossover), the markdown report, the output paths, and the wall-clock budget of a run.

Pure functions of their inputs (no device work), so ``python_tests/test_bench_gpu_results.py`` proves them on
the CPU. Imports: stdlib, numpy, torch and cmpq_kernels only.
"""
from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from bench_common import markdown_table, write_json_and_markdown

GEMV_MAX_M = 8    # mirrors cuda::kGemvMaxM (csrc/cuda/launchers.h); labels the path column only
GEMM_MAX_M = 128  # mirrors cuda::kGemmMaxM
ACT_BYTES = 2  # fp16 activations and outputs
DEFAULT_DIR = Path(__file__).resolve().parent / "results"
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


# ---- per-row numbers ------------------------------------------------------------------------------------


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


def copy_gbps(copied_bytes: int, seconds: float) -> float:
    """Bandwidth of a copy of ``copied_bytes``: it reads and writes them, so 2 * bytes / time (GB = 1e9 B)."""
    return 2.0 * copied_bytes / seconds / 1e9


def floor_us(nbytes: int, gbps: float) -> float:
    """Time in microseconds to move ``nbytes`` at ``gbps`` GB/s."""
    return nbytes / (gbps * 1e9) * 1e6


def gbps(nbytes: int, us: float) -> float:
    return nbytes / us / 1e3


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


# ---- the JSON document ------------------------------------------------------------------------------------


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


# ---- the markdown report ------------------------------------------------------------------------------------


def fmt(v: Any, spec: str) -> str:
    """``format(v, spec)``, or a dash for a number that was not measured."""
    return "–" if v is None else format(v, spec)


def table_rows_md(rows: Sequence[dict]) -> list[str]:
    header = ("shape (N×K)", "M", "bits", "eff. bits", "path", "cmpq µs", "cuBLAS µs", "speedup", "% BW floor",
              "cmpq GB/s", "graph µs")
    cells = []
    for r in rows:
        cmpq = fmt(r["cmpq_us"], ".2f") if r["status"] == "ok" else r["status"].upper()
        cells.append((f"{r['n']}×{r['k']}", f"{r['m']}", f"{r['bits']:g}", fmt(r["effective_bits"], ".3f"),
                      r["path"], cmpq, fmt(r["cublas_us"], ".2f"), fmt(r["speedup"], ".2f"),
                      fmt(r["pct_floor"], ".0f"), fmt(r["cmpq_gbps"], ".0f"), fmt(r.get("graph_us"), ".2f")))
    return markdown_table(header, cells, text_columns=(0, 4))


def cublas_md(rows: Sequence[dict]) -> list[str]:
    header = ("shape (N×K)", "M", "cuBLAS µs", "GB/s", "% BW floor", "graph µs", "host latency eager µs",
              "host latency graph µs")
    cells = [(f"{r['n']}×{r['k']}", f"{r['m']}", fmt(r["cublas_us"], ".2f"), fmt(r["cublas_gbps"], ".0f"),
              fmt(r["pct_floor"], ".0f"), fmt(r.get("graph_us"), ".2f"), fmt(r["lat_eager_us"], ".1f"),
              fmt(r["lat_graph_us"], ".1f")) for r in rows]
    return markdown_table(header, cells)


def crossover_md(cross: dict[str, dict[str, Any]], bits_list: Sequence[float]) -> list[str]:
    cols = [f"{b:g}" for b in bits_list]
    cells = []
    for shape, cell in cross.items():
        vals = []
        for c in cols:
            v = cell.get(c)
            vals.append("–" if v is None else ("never" if v == "none" else f"M={v}"))
        cells.append((shape.replace("x", "×"), *vals))
    return markdown_table(("shape (N×K)", *(f"{c} bits" for c in cols)), cells)


def latency_md(rows: Sequence[dict]) -> list[str]:
    sel = [r for r in rows if r.get("lat_eager_us") is not None or r.get("lat_graph_us") is not None]
    if not sel:
        return []
    header = ("shape (N×K)", "M", "bits", "cmpq eager µs", "cmpq graph µs", "GPU-time µs (events)")
    cells = [(f"{r['n']}×{r['k']}", f"{r['m']}", f"{r['bits']:g}", fmt(r["lat_eager_us"], ".1f"),
              fmt(r["lat_graph_us"], ".1f"), fmt(r["cmpq_us"], ".2f")) for r in sel]
    return markdown_table(header, cells)


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    bw = meta.get("copy_bandwidth") or {}
    head = [f"# CMPQ GPU benchmark — {meta['device_name']}", ""]
    if doc["partial"]:
        head += [f"**PARTIAL RESULTS** (stopped: {doc['stop_reason']}).", ""]
    head += [
        f"Device: {meta['device_name']}, {meta['sm_count']} SMs, L2 {fmt((meta['l2_bytes'] or 0) / 2**20, '.0f')} MiB, "
        f"driver {meta['driver_version']}; torch {meta['torch']} (CUDA {meta['torch_cuda']}); {meta['date']}.",
        f"Measured D2D copy bandwidth: {fmt(bw.get('gbps'), '.0f')} GB/s "
        f"(copy of {fmt(bw.get('bytes', 0) / 2**20, '.0f')} "
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


# ---- output files and the run's budget ----------------------------------------------------------------------


def write_results(doc: dict, out: Path) -> None:
    write_json_and_markdown(doc, markdown(doc), out)


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def resolve_out(out: Optional[str], slug: str, quick: bool, default_dir: Path = DEFAULT_DIR) -> Path:
    """Output path without extension: ``out`` itself, or ``gpu_<slug>[_quick]`` inside the directory ``out``
    (existing, or ending in '/'), or inside ``default_dir`` when ``out`` is None."""
    stem = f"gpu_{slug}" + ("_quick" if quick else "")
    if out is None:
        return default_dir / stem
    p = Path(out)
    if out.endswith(("/", os.sep)) or p.is_dir():
        return p / stem
    return p.with_suffix("") if p.suffix in (".json", ".md") else p


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
