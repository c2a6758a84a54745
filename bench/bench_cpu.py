"""CPU benchmark: ``cmpq_kernels.ops.gemm(x, layer)`` vs dense FP32 ``torch.nn.functional.linear(x, W)``.

What is compared
    CMPQ: ``ops.gemm(x, layer)`` on a packed layer from
    ``standin.quantize_standin(torch.randn(N, K) * 0.02, bits, outlier_fraction=0.005)``.
    FP32: ``torch.nn.functional.linear(x, W)`` (= ``x @ W.T``, no bias) with ``W`` float32 ``[N, K]``
    contiguous, i.e. the same weight before quantization. ``x`` is float32 ``[M, K]`` for both.

Shapes use the ``nn.Linear`` convention N x K = out_features x in_features. The defaults are the
LLaMA-7B projections: 4096x4096 (q/k/v/o), 11008x4096 (gate/up: N=11008, K=4096) and 4096x11008
(down: N=4096, K=11008); M = 1, 4, 16, 64; bits = 2.5, 3.0, 4.0. M <= 16 runs the fused direct
kernel, M > 16 decodes 256-row blocks and calls BLAS (``kCpuDirectMaxM`` in ``csrc/cmpq_ops.cpp``);
the ``path`` column says which. One random weight is drawn per shape (seed 0) and each (shape, bits)
layer is quantized once and reused for every M; the FP32 time does not depend on bits and is
measured once per (shape, M).

Method
    * Threads: ``torch.set_num_threads(--threads)`` (default ``os.cpu_count()``); the CMPQ kernel uses
      the same ATen pool. Other busy processes distort CPU timings badly: run the benchmark alone.
    * ``--warmup`` untimed calls (default 5), then the median of ``--reps`` (default 30) single calls
      each timed with ``time.perf_counter``. Calls cycle through 8 pre-made activation tensors.
    * Cache: before every call (warmup and timed, outside the timed region) a ``--flush-mb`` MiB
      buffer (default 64, 0 = off) is read to evict the last-level cache. Without it a CMPQ layer
      (4-15 MB for 4096x4096 .. 11008x4096) stays resident in a 32 MiB L3 across repetitions while the
      FP32 weight (64-180 MB) cannot, which flatters CMPQ; in a real model each layer is read cold.
    * Bytes per call = weight bytes + activations in (M*K*4) + outputs (M*N*4). Weight bytes: FP32
      N*K*4; CMPQ all stored bytes of the layer, ``sum(layer.storage_bits().values()) / 8`` (codes,
      codebooks, outlier CSR, perm). Effective GB/s = bytes / median time (1 GB = 1e9 B). For M > 16
      both methods are compute-bound, so GB/s there is only a normalisation, not a bandwidth.
    * speedup = torch_ms / cmpq_ms (> 1 means CMPQ is faster).
    * Correctness gate, once per (shape, bits) before timing, at every benchmarked M (so both kernel
      paths; includes M=4): ``||gemm(x) - x @ dequantize(layer).T|| / ||x @ dequantize(layer).T||``
      (Frobenius) must be < 1e-4, else the run aborts: a wrong kernel is never timed.

Output: a markdown table on stdout, and ``<out>.json`` (metadata + rows) and ``<out>.md`` (metadata +
table); ``--out`` is the path without extension, default ``bench/results/cpu_bench``. ``--quick``
(CI smoke test, well under 30 s) uses tiny shapes, 3 reps and a temp-dir output unless ``--out`` is
given. ``--shapes``, ``--batch`` and ``--bits`` override the case lists, e.g.
``python bench/bench_cpu.py --shapes 4096x4096 --batch 1 --bits 3``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # `cmpq bench` runs this file through runpy, which does not add its folder
    sys.path.insert(0, str(BENCH))
import cmpq_kernels
from bench_common import (layer_bytes, markdown_table, parse_batches, parse_bits, parse_shapes,
                          write_json_and_markdown)
from cmpq_kernels import ops
from cmpq_kernels.format import CMPQLayer
from cmpq_kernels.quantize import quantize_standin
from random_layers import OUTLIER_FRACTION

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
BATCHES = (1, 4, 16, 64)
BITS = (2.5, 3.0, 4.0)
QUICK_SHAPES = ((256, 512), (512, 256))
CPU_DIRECT_MAX_M = 16  # mirrors kCpuDirectMaxM in csrc/cmpq_ops.cpp (only labels the path column)
ROTATE = 8  # activation tensors cycled through per case
MAX_REL_ERR = 1e-4
DEFAULT_OUT = BENCH / "results" / "cpu_bench"


def time_ms(fn: Callable[[torch.Tensor], torch.Tensor], xs: list[torch.Tensor], warmup: int, reps: int,
            flush: torch.Tensor | None) -> float:
    """Median wall time in ms of ``fn(x)`` over ``reps`` calls, cycling through ``xs``."""
    times = []
    for i in range(warmup + reps):
        x = xs[i % len(xs)]
        if flush is not None:
            flush.sum()
        t0 = time.perf_counter()
        fn(x)
        t1 = time.perf_counter()
        if i >= warmup:
            times.append(t1 - t0)
    return statistics.median(times) * 1e3


def check_layer(layer: CMPQLayer, batches: tuple[int, ...], label: str) -> float:
    """Worst relative error of ``ops.gemm`` vs ``x @ dequantize(layer).T``; raises SystemExit above the limit."""
    w = ops.dequantize(layer)
    worst = 0.0
    for m in batches:
        x = torch.randn(m, layer.k)
        ref = x @ w.T
        err = float((ops.gemm(x, layer) - ref).norm() / ref.norm())
        if not err < MAX_REL_ERR:  # also catches NaN
            raise SystemExit(f"ABORT: ops.gemm is wrong for {label}, M={m}: relative error {err:.3g} vs "
                             f"x @ dequantize(layer).T (limit {MAX_REL_ERR:g}); not benchmarking a wrong kernel")
        worst = max(worst, err)
    return worst


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metadata(args: argparse.Namespace) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cmpq_kernels": cmpq_kernels.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_isa": cmpq_kernels.backends()["cpu_isa"],
        "CMPQ_CPU_SIMD": os.environ.get("CMPQ_CPU_SIMD"),
        "python": platform.python_version(),
        "warmup": args.warmup,
        "reps": args.reps,
        "flush_mb": args.flush_mb,
        "quick": args.quick,
        "baseline": "torch.nn.functional.linear(x, W), W float32 [N, K] contiguous",
        "load_avg_at_start": os.getloadavg(),
    }


def run(shapes: tuple[tuple[int, int], ...], batches: tuple[int, ...], bits_list: tuple[float, ...], warmup: int,
        reps: int, flush_mb: int) -> list[dict]:
    flush = torch.ones(flush_mb * 2**18) if flush_mb else None  # float32: 2**18 per MiB
    rows = []
    with torch.inference_mode():
        for n, k in shapes:
            torch.manual_seed(0)
            weight = torch.randn(n, k) * 0.02
            xs = {m: [torch.randn(m, k) for _ in range(ROTATE)] for m in batches}
            torch_ms = {m: time_ms(lambda x: F.linear(x, weight), xs[m], warmup, reps, flush) for m in batches}
            for bits in bits_list:
                t0 = time.perf_counter()
                layer = quantize_standin(weight, bits, outlier_fraction=OUTLIER_FRACTION)
                quant_s = time.perf_counter() - t0
                err = check_layer(layer, batches, f"{n}x{k} bits={bits:g}")
                stored = layer_bytes(layer)
                for m in batches:
                    cmpq_ms = time_ms(lambda x: ops.gemm(x, layer), xs[m], warmup, reps, flush)
                    io_bytes = 4 * m * (k + n)
                    rows.append({
                        "n": n, "k": k, "m": m, "bits": bits,
                        "code_bits": layer.code_bits, "effective_bits": layer.effective_bits,
                        "path": "direct" if m <= CPU_DIRECT_MAX_M else "decode+BLAS",
                        "cmpq_ms": cmpq_ms, "torch_ms": torch_ms[m], "speedup": torch_ms[m] / cmpq_ms,
                        "cmpq_bytes": stored + io_bytes, "torch_bytes": 4 * n * k + io_bytes,
                        "cmpq_gbps": (stored + io_bytes) / cmpq_ms / 1e6,
                        "torch_gbps": (4 * n * k + io_bytes) / torch_ms[m] / 1e6,
                        "max_rel_err": err, "quantize_s": quant_s,
                    })
                    print(f"  {n}x{k} M={m} bits={bits:g}: cmpq {cmpq_ms:.3f} ms, torch {torch_ms[m]:.3f} ms",
                          flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    head = (f"CPU: {meta['cpu_model']} ({meta['cpu_isa']}), {meta['threads']} threads, torch {meta['torch']}, "
            f"{meta['date']}; median of {meta['reps']} reps after {meta['warmup']} warmup, LLC flush "
            f"{meta['flush_mb']} MiB; speedup = torch_ms / cmpq_ms.\n\n")
    header = ("shape (N×K)", "M", "bits", "effective_bits", "path", "cmpq ms", "torch ms", "speedup", "cmpq GB/s",
              "torch GB/s")
    cells = [(f"{r['n']}×{r['k']}", f"{r['m']}", f"{r['bits']:g}", f"{r['effective_bits']:.3f}", r["path"],
              f"{r['cmpq_ms']:.3f}", f"{r['torch_ms']:.3f}", f"{r['speedup']:.2f}", f"{r['cmpq_gbps']:.1f}",
              f"{r['torch_gbps']:.1f}") for r in rows]
    return head + "\n".join(markdown_table(header, cells, text_columns=(0, 4))) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 reps, output to a temp dir (CI smoke)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: os.cpu_count())")
    p.add_argument("--reps", type=int, default=None, help="timed calls per case (default 30; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 5; 1 with --quick)")
    p.add_argument("--flush-mb", type=int, default=64, help="MiB read before each call to evict the LLC; 0 = off")
    p.add_argument("--out", type=Path, default=None, help=f"output path without extension (default {DEFAULT_OUT})")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="comma list of NxK (out x in), e.g. 4096x4096,11008x4096")
    p.add_argument("--batch", type=parse_batches, default=BATCHES, help="comma list of M")
    p.add_argument("--bits", type=parse_bits, default=BITS, help="comma list of bits")
    args = p.parse_args()
    args.reps = args.reps or (3 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    out = args.out or (Path(tempfile.gettempdir()) / "cmpq_cpu_bench_quick" if args.quick else DEFAULT_OUT)

    torch.set_num_threads(args.threads)
    meta = metadata(args)
    print(f"cmpq CPU benchmark: {meta['cpu_model']} ({meta['cpu_isa']}), {meta['threads']} threads, "
          f"load avg {meta['load_avg_at_start']}", flush=True)
    rows = run(shapes, args.batch, args.bits, args.warmup, args.reps, args.flush_mb)
    table = markdown(rows, meta)
    print("\n" + table)
    write_json_and_markdown({"meta": meta, "rows": rows}, table, out)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
