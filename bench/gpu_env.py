"""What ran the GPU benchmark: versions, device properties, nvidia-smi clocks and the run's settings, recorded
in the results' ``meta`` so a number can be traced to the machine and code that produced it.

Imports: stdlib, numpy, torch and cmpq_kernels only.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

import cmpq_kernels
from gpu_gate import GATE_ROWS, MAX_DECODE_ERR, MAX_GEMM_ERR
from gpu_results import GEMM_MAX_M, GEMV_MAX_M, SCHEMA_VERSION
from random_layers import OUTLIER_FRACTION

if TYPE_CHECKING:  # bench_gpu imports this module
    from bench_gpu import Device

ROOT = Path(__file__).resolve().parent.parent
SMI_FIELDS = ("name", "driver_version", "pci.bus_id", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
              "clocks.applications.graphics", "power.draw", "power.limit", "temperature.gpu", "pstate",
              "persistence_mode", "compute_mode", "ecc.mode.current", "memory.total", "memory.used",
              "mig.mode.current")


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


def metadata(args: argparse.Namespace, dev: Device, shapes: Sequence[tuple[int, int]], batches: Sequence[int],
             bits_list: Sequence[float]) -> dict:
    """The results' ``meta`` (``gpu_results.META_KEYS`` and more) for a run of ``args`` on ``dev``;
    ``copy_bandwidth`` is filled in once measured."""
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
        "max_seconds": args.max_seconds, "quick": args.quick, "priority": args.priority,
        "gate": {"rows_per_slice": GATE_ROWS, "max_decode_rel_err": MAX_DECODE_ERR, "max_gemm_rel_err": MAX_GEMM_ERR},
        "baseline": "torch.nn.functional.linear(x, W16), W16 float16 [N, K] contiguous (cuBLAS)" if dev.cuda else
                    "torch.nn.functional.linear(x, W16) on the CPU (--device cpu logic check; timings meaningless)",
        "layers": "random_layers.make_random_layer: random code words/codebooks/perm, 0.5% random outliers, "
                  "quantize.allocate.segment_sizes split",
    }
    meta.update(_cuda_properties(dev.torch_device) if dev.cuda else _cpu_properties())
    meta["copy_bandwidth"] = None
    return meta


def _cuda_properties(device: torch.device) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(device)
    smi = nvidia_smi_info(smi_index())
    try:
        driver_api = torch._C._cuda_getDriverVersion()
    except Exception:  # noqa: BLE001 — private API, optional
        driver_api = None
    mem_clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    return {
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
        "allow_fp16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
    }


def _cpu_properties() -> dict[str, Any]:
    return {"device_name": f"cpu ({platform.machine()})", "driver_version": None, "sm_count": None, "l2_bytes": None,
            "total_memory_bytes": None, "nvidia_smi_start": {}, "clocks_start_text": None}
