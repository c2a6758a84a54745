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
column says which (``GEMV_MAX_M``/``GEMM_MAX_M`` in ``gpu_results.py`` mirror the C++ table and only label
rows).

Layers
    Timing does not depend on weight values, so layers are built fast instead of by the (slow, CPU)
    stand-in quantizer: ``random_layers.make_random_layer`` draws random packed code words (every 32-bit word is a
    valid group of 2-, 3- or 4-bit codes), sorted random FP16 codebooks (one row per output row), a random
    channel permutation and 0.5 % random outliers (distinct positions, CSR), with the segment split of
    ``quantize.allocate.segment_sizes(k, bits)``; NumPy on the CPU, then ``.to(device)``. It has exactly the tensors
    (dtypes, shapes, nnz, hence ``storage_bits``/``effective_bits``) that
    ``standin.quantize_standin(weight, bits, outlier_fraction=0.005)`` produces for the same shape
    (checked by ``python_tests/test_bench_helpers.py``). One (shape, bits) layer lives on the GPU at a time.

Correctness gate (``gpu_gate.py``; per (shape, bits), before any timing; a wrong kernel is never timed)
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
``--quick`` (smoke run, ~1 min): 2 shapes, M = 1, 8, 16, 128, 512, bits 2.5 and 4, 10 reps. ``--priority``
(what ``gpu_session.sh`` runs): 8192x28672, 4096x4096, 28672x8192, M = 1, 4, 16, 64, 512, bits 2.5, 3, 4. ``--shapes``,
``--batch``, ``--bits`` override the lists, e.g.
``python bench/bench_gpu.py --shapes 4096x4096 --batch 1,16 --bits 3``.
``--device cpu`` runs every step on the CPU with wall-clock timing (a logic check for machines without
a GPU; its numbers mean nothing).

Modules: this script holds the argument parsing, the timing (``Device``) and the benchmark loop (``Runner``);
``gpu_results.py`` the results schema, numbers, report and budget, ``gpu_gate.py`` the correctness gate,
``gpu_env.py`` the recorded environment, ``random_layers.py`` the layers, ``bench_common.py`` what the CPU
benchmark shares. Imports: stdlib, numpy, torch, cmpq_kernels and those modules only.
"""
from __future__ import annotations

import argparse
import math
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # `cmpq bench` runs this file through runpy, which does not add its folder
    sys.path.insert(0, str(BENCH))
try:
    import cmpq_kernels
except ImportError:  # not installed: run from a source checkout with in-place built extensions
    sys.path.insert(0, str(BENCH.parent))
    import cmpq_kernels
from bench_common import layer_bytes, parse_batches, parse_bits, parse_shapes
from cmpq_kernels import ops
from gpu_env import clocks_text, metadata, nvidia_smi_info, smi_index
from gpu_gate import first_line, gate_layer, rel_err
from gpu_results import (DEFAULT_DIR, GEMV_MAX_M, Budget, copy_gbps, device_slug, fmt, make_cublas_row, make_row,
                         markdown, resolve_out, results_doc, write_results)
from random_layers import OUTLIER_FRACTION, make_random_layer

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (8192, 28672), (151936, 896))
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 512)
BITS = (2.0, 2.5, 3.0, 3.5, 4.0)
QUICK_SHAPES = ((4096, 4096), (151936, 896))
QUICK_BATCHES = (1, 8, 16, 128, 512)
QUICK_BITS = (2.5, 4.0)
# --priority: what a short GPU session (gpu_session.sh) measures first: the two LLaMA-70B MLP shapes and a 7B square,
# the bit widths people deploy, and one M per dispatch regime (GEMV, GEMM, decode + cuBLAS).
PRIORITY_SHAPES = ((8192, 28672), (4096, 4096), (28672, 8192))
PRIORITY_BATCHES = (1, 4, 16, 64, 512)
PRIORITY_BITS = (2.5, 3.0, 4.0)

MIN_REPS = 5
PROBE_CALLS = 3
LAT_REPS = 20  # host-latency samples per measurement (M <= GEMV_MAX_M with --graph)


def plan_reps(per_call_s: float, reps: int, case_seconds: float, min_reps: int = MIN_REPS) -> int:
    """Timed calls for a case whose call (flush included) takes ``per_call_s``: ``reps``, fewer if that exceeds
    ``case_seconds``, never fewer than ``min(min_reps, reps)``."""
    floor = min(min_reps, reps)
    if not (per_call_s > 0) or not math.isfinite(per_call_s):
        return reps
    return max(floor, min(reps, int(case_seconds / per_call_s)))


def layer_seed(n: int, k: int, bits: float) -> int:
    """A distinct, reproducible seed per benchmarked (shape, bits) layer."""
    return (n * 131 + k) * 16 + int(round(bits * 4))


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


class Terminated(Exception):
    pass


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
        self.fail(case, f"error: {type(e).__name__}: {first_line(e)}")
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
            return None, None, f"capture failed: {type(e).__name__}: {first_line(e)}"
        finally:
            del graph, out

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
                         f"{fmt(row['pct_floor'], '.0f')}% of floor)")
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
            gate = gate_layer(layer, layer_cpu, self.batches, label, self.fail, self.dev.healthy)
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
                         f"{fmt(row['cublas_us'], '.2f')} us, speedup {fmt(row['speedup'], '.2f')}, "
                         f"{fmt(row['pct_floor'], '.0f')}% of floor"
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
    p.add_argument("--priority", action="store_true",
                   help="the short-session subset: 8192x28672, 4096x4096, 28672x8192; M=1,4,16,64,512; bits 2.5,3,4")
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
    if args.quick and args.priority:
        raise SystemExit("--quick and --priority choose different default lists: pass one")
    shapes = args.shapes or (QUICK_SHAPES if args.quick else PRIORITY_SHAPES if args.priority else SHAPES)
    batches = args.batch or (QUICK_BATCHES if args.quick else PRIORITY_BATCHES if args.priority else BATCHES)
    bits_list = args.bits or (QUICK_BITS if args.quick else PRIORITY_BITS if args.priority else BITS)

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
        runner.stop_reason = f"internal error: {type(e).__name__}: {first_line(e)}"
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
