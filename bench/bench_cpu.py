"""CPU benchmark: CMPQ's kernels side by side with torch's dense and quantized CPU kernels, weights read cold.

What is compared, per shape N x K (``nn.Linear`` convention: out_features x in_features) and batch M
    * ``fp32``: ``F.linear(x, W)``, W float32 [N, K] contiguous, x float32 — the baseline of every ratio.
    * ``bf16``: ``F.linear(x, W)`` with W and x bfloat16.
    * ``int8``: torch's int8 weight-only kernel ``aten._weight_int8pack_mm`` (int8 W, one bf16 scale per
      output row, bf16 x).
    * ``int4-g128`` / ``int4-g32``: torch's int4 CPU kernel, ``aten._convert_weight_to_int4pack_for_cpu``
      + ``aten._weight_int4pack_mm_for_cpu`` (uint4 W, bf16 scale and zero per group of 128 / 32 inputs,
      bf16 x): what torchao's int4 weight-only config runs on a CPU.
    * ``cmpq <bits> <isa>``: ``ops.gemm(x, layer)`` on a layer from ``quantize_standin(W, bits,
      outlier_fraction=0.005)``, once per CPU kernel ISA (``--isas``, default: every SIMD ISA this CPU runs),
      x float32. M <= 16 runs the direct fused kernel, M > 16 decodes 256-row blocks and calls BLAS.
      ``avx512-int8`` is the opt-in approximate mode (int8 activations and codebooks on vpdpbusd, M <= 16).
W is ``torch.randn(N, K) * 0.02`` (seed 0); the peers quantize it with plain min/max (int4: asymmetric per
group; int8: symmetric per row); their relative output error vs fp32 is reported as a sanity check.

Method
    * Weights are read cold, as in a model where every layer is read once per token: each method gets as
      many distinct copies of its weights as fill ``--cold-mb`` (default twice the last-level cache read
      from sysfs), and successive calls cycle through them, so no call finds its weights in any cache.
      (A flush buffer is not enough on a CPU with a 260 MiB L3.)
    * Threads: ``torch.set_num_threads(--threads)`` (default ``os.cpu_count()``); the CMPQ kernels use the
      same ATen pool. Other busy processes distort CPU timings badly: run the benchmark alone.
    * ``--warmup`` untimed calls (default 5), then the median of ``--reps`` (default 30) single calls, each
      timed with ``time.perf_counter``; activations cycle through 8 pre-made tensors.
    * Weight bytes: everything the method stores for the layer (CMPQ: codes, codebooks, outlier CSR, perm =
      ``sum(layer.storage_bits().values()) / 8``; int4: packed codes + bf16 scales and zeros; int8: codes +
      scales). effective bits = 8 * weight bytes / (N * K). GB/s = weight bytes / median time (1 GB = 1e9 B):
      at M = 1 the kernels are meant to be bandwidth-bound, and ``bw/fp32`` = GB/s over fp32's GB/s on the
      same layer says how close to the bandwidth fp32 achieves a kernel comes. At M = 64 everything is
      compute-bound; GB/s there is only a normalisation.
    * ``speedup`` = fp32 ms / method ms (> 1: faster than fp32).
    * Correctness gate, once per (shape, bits, ISA) before timing, at every benchmarked M:
      ``||gemm(x) - x @ dequantize(layer).T|| / ||x @ dequantize(layer).T||`` must be < 1e-4 (< 2e-2 for
      the approximate ``avx512-int8`` mode), else the run aborts: a wrong kernel is never timed.

Targets (issue "CPU kernels at the memory-bandwidth limit"), in the summary table, per ISA:
``bw/fp32`` >= 0.85 at M = 1; per-token cost at M = 4 and M = 16 within 1.3x and 3x of M = 1; faster
than ``int4-g128`` at fewer effective bits.

Output: markdown tables on stdout, ``<out>.json`` (metadata + rows + summary) and ``<out>.md``; ``--out`` is
the path without extension, default ``bench/results/cpu_bench``. ``--quick`` (CI smoke test, seconds) uses
tiny shapes, 3 reps, 8 MiB of cold copies and a temp-dir output unless ``--out`` is given. ``--shapes``,
``--batch``, ``--bits``, ``--isas`` and ``--peers`` override the case lists, e.g.
``python bench/bench_cpu.py --shapes 4096x4096 --batch 1 --bits 3 --peers fp32,int4-g128``.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # `cmpq bench` runs this file through runpy, which does not add its folder
    sys.path.insert(0, str(BENCH))
import cmpq_kernels
from bench_common import (cpu_model, layer_bytes, markdown_table, parse_batches, parse_bits, parse_shapes,
                          write_json_and_markdown)
from cmpq_kernels import ops
from cmpq_kernels.format import CMPQLayer
from cmpq_kernels.quantize import quantize_standin
from random_layers import OUTLIER_FRACTION

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))
BATCHES = (1, 4, 16, 64)
BITS = (2.5, 3.0, 4.0)
PEERS = ("fp32", "bf16", "int8", "int4-g128", "int4-g32")
QUICK_SHAPES = ((256, 512), (512, 256))
CPU_DIRECT_MAX_M = 16  # mirrors kCpuDirectMaxM in csrc/cmpq_ops.cpp (only labels the path column)
ROTATE = 8  # activation tensors cycled through per case
MAX_REL_ERR = 1e-4
# The int8 mode rounds activations and codebooks to int8: about 0.7 % relative error (docs/DESIGN.md §3.2).
MAX_REL_ERR_INT8 = 2e-2
DEFAULT_OUT = BENCH / "results" / "cpu_bench"
TARGET_BW = 0.85
TARGET_PER_TOKEN = {4: 1.3, 16: 3.0}


@dataclass
class Method:
    """One kernel on one layer: ``call(x, i)`` runs it on weight copy ``i`` (cycled by the timer)."""
    name: str
    weight_bytes: int
    x_dtype: torch.dtype
    copies: int
    call: Callable[[torch.Tensor, int], torch.Tensor]
    rel_err: float = 0.0  # vs fp32's output (peers) or vs x @ dequantize(layer).T (cmpq)
    isa: str | None = None
    bits: float | None = None
    code_bits: float | None = None


def llc_bytes() -> int:
    """Size of the largest CPU cache sysfs reports (the LLC), or 64 MiB when it says nothing."""
    best = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return best or 64 * 2**20


def n_copies(weight_bytes: int, cold_bytes: int) -> int:
    return max(2, math.ceil(cold_bytes / weight_bytes))


def time_ms(method: Method, xs: list[torch.Tensor], warmup: int, reps: int) -> float:
    """Median wall time in ms of one call, cycling through weight copies and activations."""
    xs = [x.to(method.x_dtype) for x in xs]
    times = []
    for i in range(warmup + reps):
        x = xs[i % len(xs)]
        t0 = time.perf_counter()
        method.call(x, i % method.copies)
        t1 = time.perf_counter()
        if i >= warmup:
            times.append(t1 - t0)
    return statistics.median(times) * 1e3


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


# ---- peers ------------------------------------------------------------------------------------------

def dense(name: str, weight: torch.Tensor, dtype: torch.dtype, cold: int) -> Method:
    w = weight.to(dtype)
    ws = [w] + [w.clone() for _ in range(n_copies(w.numel() * w.element_size(), cold) - 1)]
    return Method(name, w.numel() * w.element_size(), dtype, len(ws), lambda x, i: F.linear(x, ws[i]))


def torch_int8(weight: torch.Tensor, cold: int) -> Method:
    scale = weight.abs().amax(1).clamp(min=1e-12) / 127
    q = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    s = scale.to(torch.bfloat16)
    nbytes = q.numel() + 2 * s.numel()
    copies = [(q, s)] + [(q.clone(), s.clone()) for _ in range(n_copies(nbytes, cold) - 1)]
    return Method("int8", nbytes, torch.bfloat16, len(copies),
                  lambda x, i: torch.ops.aten._weight_int8pack_mm(x, *copies[i]))


def torch_int4(weight: torch.Tensor, group: int, cold: int) -> Method:
    """torch's convention: w = (q - 8) * scale + zero, q in [0, 15], per group of ``group`` inputs."""
    n, k = weight.shape
    wg = weight.reshape(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-12) / 15
    q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    sz = torch.stack([scale.reshape(n, -1), zero.reshape(n, -1)], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    nbytes = packed.numel() * packed.element_size() + 2 * sz.numel()
    copies = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(n_copies(nbytes, cold) - 1)]
    return Method(f"int4-g{group}", nbytes, torch.bfloat16, len(copies),
                  lambda x, i: torch.ops.aten._weight_int4pack_mm_for_cpu(x, copies[i][0], group, copies[i][1]))


def make_peer(name: str, weight: torch.Tensor, cold: int) -> Method:
    if name in ("fp32", "bf16"):
        return dense(name, weight, torch.float32 if name == "fp32" else torch.bfloat16, cold)
    if name == "int8":
        return torch_int8(weight, cold)
    return torch_int4(weight, int(name.removeprefix("int4-g")), cold)


# ---- CMPQ -------------------------------------------------------------------------------------------

def clone_layer(layer: CMPQLayer) -> CMPQLayer:
    return CMPQLayer.from_fields({name: t.clone() for name, t in layer.fields().items()}, n=layer.n, k=layer.k,
                                 bits=layer.bits, codebook_rows=layer.codebook_rows)


def check_layer(layer: CMPQLayer, batches: tuple[int, ...], label: str, limit: float = MAX_REL_ERR) -> float:
    """Worst relative error of ``ops.gemm`` vs ``x @ dequantize(layer).T``; raises SystemExit above ``limit``."""
    w = ops.dequantize(layer)
    worst = 0.0
    for m in batches:
        x = torch.randn(m, layer.k)
        ref = x @ w.T
        err = rel_err(ops.gemm(x, layer), ref)
        if not err < limit:  # also catches NaN
            raise SystemExit(f"ABORT: ops.gemm is wrong for {label}, M={m}: relative error {err:.3g} vs "
                             f"x @ dequantize(layer).T (limit {limit:g}); not benchmarking a wrong kernel")
        worst = max(worst, err)
    return worst


def cmpq_method(layers: list[CMPQLayer], isa: str, err: float) -> Method:
    def call(x: torch.Tensor, i: int) -> torch.Tensor:
        return ops.gemm(x, layers[i])
    layer = layers[0]
    return Method(f"cmpq {layer.bits:g} {isa}", layer_bytes(layer), torch.float32, len(layers), call, err, isa,
                  layer.bits, layer.code_bits)


# ---- run --------------------------------------------------------------------------------------------

def row_for(method: Method, n: int, k: int, m: int, ms: float, fp32_ms: float, fp32_gbps: float) -> dict:
    gbps = method.weight_bytes / ms / 1e6
    return {"n": n, "k": k, "m": m, "method": method.name, "isa": method.isa, "bits": method.bits,
            "code_bits": method.code_bits, "effective_bits": 8 * method.weight_bytes / (n * k),
            "path": ("direct" if m <= CPU_DIRECT_MAX_M else "decode+BLAS") if method.isa else "torch",
            "ms": ms, "weight_bytes": method.weight_bytes, "gbps": gbps, "speedup": fp32_ms / ms,
            "bw_vs_fp32": gbps / fp32_gbps, "rel_err": method.rel_err, "copies": method.copies}


def run_shape(n: int, k: int, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    weight = torch.randn(n, k) * 0.02
    xs = {m: [torch.randn(m, k) for _ in range(ROTATE)] for m in args.batch}
    probe = torch.randn(4, k)
    ref = F.linear(probe, weight)
    times: dict[tuple[str, int], float] = {}
    methods: list[Method] = []

    def measure(method: Method) -> None:
        methods.append(method)
        for m in args.batch:
            times[method.name, m] = time_ms(method, xs[m], args.warmup, args.reps)
            print(f"  {n}x{k} M={m} {method.name}: {times[method.name, m]:.3f} ms ({method.copies} copies)",
                  flush=True)

    for name in ("fp32", *[p for p in args.peers if p != "fp32"]):
        peer = make_peer(name, weight, args.cold_bytes)
        peer.rel_err = rel_err(peer.call(probe.to(peer.x_dtype), 0), ref)
        measure(peer)
        del peer
    saved = os.environ.get("CMPQ_CPU_SIMD")
    try:
        for bits in args.bits:
            layer = quantize_standin(weight, bits, outlier_fraction=OUTLIER_FRACTION)
            layers = [layer] + [clone_layer(layer) for _ in range(n_copies(layer_bytes(layer), args.cold_bytes) - 1)]
            for isa in args.isas:
                os.environ["CMPQ_CPU_SIMD"] = isa
                err = check_layer(layer, args.batch, f"{n}x{k} bits={bits:g} isa={isa}",
                                  MAX_REL_ERR_INT8 if isa.endswith("int8") else MAX_REL_ERR)
                measure(cmpq_method(layers, isa, err))
            del layers, layer
    finally:
        os.environ.pop("CMPQ_CPU_SIMD", None) if saved is None else os.environ.update(CMPQ_CPU_SIMD=saved)
    rows = []
    for method in methods:
        for m in args.batch:
            fp32_ms = times["fp32", m]
            fp32_gbps = 4 * n * k / fp32_ms / 1e6
            rows.append(row_for(method, n, k, m, times[method.name, m], fp32_ms, fp32_gbps))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """The issue's targets per (shape, bits, ISA) at M = 1, with the ratios to fp32 and int4-g128."""
    by = {(r["n"], r["k"], r["m"], r["method"]): r for r in rows}
    out = []
    for r in rows:
        if r["isa"] is None or r["m"] != 1:
            continue
        n, k, name = r["n"], r["k"], r["method"]
        int4 = by.get((n, k, 1, "int4-g128"))
        entry = {"n": n, "k": k, "bits": r["bits"], "isa": r["isa"], "effective_bits": r["effective_bits"],
                 "m1_ms": r["ms"], "bw_vs_fp32": r["bw_vs_fp32"], "bw_target_met": r["bw_vs_fp32"] >= TARGET_BW,
                 "speedup_vs_fp32": r["speedup"], "target_speedup": TARGET_BW * 32 / r["effective_bits"],
                 "vs_int4_g128": int4["ms"] / r["ms"] if int4 else None,
                 "int4_g128_effective_bits": int4["effective_bits"] if int4 else None}
        for m, limit in TARGET_PER_TOKEN.items():
            other = by.get((n, k, m, name))
            ratio = other["ms"] / m / r["ms"] if other else None
            entry[f"per_token_m{m}_vs_m1"] = ratio
            entry[f"per_token_m{m}_target_met"] = None if ratio is None else ratio <= limit
        out.append(entry)
    return out


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "f16c", "amx")))
    except OSError:
        pass
    return []


def machine_metadata(args: argparse.Namespace) -> dict:
    """What every CPU benchmark records: date, versions, the CPU and its ISAs, threads, and the timing settings
    (``args``: ``cold_bytes``, ``warmup``, ``reps``, ``quick``)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cmpq_kernels": cmpq_kernels.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_isas": list(torch.ops.cmpq.cpu_isas()),
        "llc_bytes": llc_bytes(),
        "cold_bytes": args.cold_bytes,
        "python": platform.python_version(),
        "warmup": args.warmup,
        "reps": args.reps,
        "quick": args.quick,
        "baseline": "fp32: torch.nn.functional.linear(x, W), W float32 [N, K] contiguous",
    }


def metadata(args: argparse.Namespace) -> dict:
    return {**machine_metadata(args), "isas_timed": list(args.isas), "load_avg_at_start": os.getloadavg()}


def markdown(rows: list[dict], summary: list[dict], meta: dict) -> str:
    head = (f"CPU: {meta['cpu_model']} ({', '.join(meta['cpu_isas'])}), {meta['threads']} threads, torch "
            f"{meta['torch']}, {meta['date']}; median of {meta['reps']} reps after {meta['warmup']} warmup; weights "
            f"cold (copies cycled over {meta['cold_bytes'] / 2**20:.0f} MiB, LLC {meta['llc_bytes'] / 2**20:.0f} MiB); "
            "GB/s = stored weight bytes / time; speedup = fp32 ms / ms.\n\n")
    header = ("shape (N×K)", "M", "method", "effective bits", "path", "ms", "GB/s", "bw/fp32", "speedup", "rel err")
    cells = [(f"{r['n']}×{r['k']}", f"{r['m']}", r["method"], f"{r['effective_bits']:.3f}", r["path"], f"{r['ms']:.3f}",
              f"{r['gbps']:.1f}", f"{r['bw_vs_fp32']:.2f}", f"{r['speedup']:.2f}", f"{r['rel_err']:.1e}")
             for r in rows]
    lines = [head, *markdown_table(header, cells, text_columns=(0, 2, 4)), ""]
    if summary:
        lines += [f"Targets: bw/fp32 ≥ {TARGET_BW} at M = 1; per-token cost at M = 4 / 16 ≤ "
                  f"{TARGET_PER_TOKEN[4]}× / {TARGET_PER_TOKEN[16]}× of M = 1; int4-g128 ms / cmpq ms > 1.", ""]
        header = ("shape (N×K)", "bits", "ISA", "effective bits", "M=1 ms", "bw/fp32", "speedup (target)",
                  "per-token M=4 / M=1", "per-token M=16 / M=1", "int4-g128 ms / cmpq ms")

        def fmt(v: float | None, spec: str) -> str:
            return "—" if v is None else format(v, spec)
        cells = [(f"{s['n']}×{s['k']}", f"{s['bits']:g}", s["isa"], f"{s['effective_bits']:.3f}", f"{s['m1_ms']:.3f}",
                  f"{s['bw_vs_fp32']:.2f}", f"{s['speedup_vs_fp32']:.2f} ({s['target_speedup']:.2f})",
                  fmt(s["per_token_m4_vs_m1"], ".2f"), fmt(s["per_token_m16_vs_m1"], ".2f"),
                  fmt(s["vs_int4_g128"], ".2f")) for s in summary]
        lines += markdown_table(header, cells, text_columns=(0, 2))
    return "\n".join(lines) + "\n"


def parse_names(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in names if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(bad)}: expected some of {', '.join(allowed)}")
        return names
    return parse


def main() -> None:
    isas = tuple(torch.ops.cmpq.cpu_isas())
    simd = tuple(i for i in isas if i != "scalar") or isas
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 reps, output to a temp dir (CI smoke)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: os.cpu_count())")
    p.add_argument("--reps", type=int, default=None, help="timed calls per case (default 30; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 5; 1 with --quick)")
    p.add_argument("--cold-mb", type=int, default=None,
                   help="MiB of distinct weight copies cycled per method (default: 2 x LLC; 8 with --quick)")
    p.add_argument("--out", type=Path, default=None, help=f"output path without extension (default {DEFAULT_OUT})")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="comma list of NxK (out x in), e.g. 4096x4096,11008x4096")
    p.add_argument("--batch", type=parse_batches, default=BATCHES, help="comma list of M")
    p.add_argument("--bits", type=parse_bits, default=BITS, help="comma list of bits")
    p.add_argument("--isas", type=parse_names(isas), default=simd,
                   help=f"CMPQ kernel ISAs to time (this CPU: {', '.join(isas)}; default {', '.join(simd)})")
    p.add_argument("--peers", type=parse_names(PEERS), default=PEERS, help=f"torch kernels ({', '.join(PEERS)})")
    args = p.parse_args()
    args.reps = args.reps or (3 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.cold_bytes = (args.cold_mb if args.cold_mb is not None else (8 if args.quick else 0)) * 2**20 \
        or 2 * llc_bytes()
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    out = args.out or (Path(tempfile.gettempdir()) / "cmpq_cpu_bench_quick" if args.quick else DEFAULT_OUT)

    torch.set_num_threads(args.threads)
    meta = metadata(args)
    print(f"cmpq CPU benchmark: {meta['cpu_model']} ({', '.join(meta['cpu_isas'])}), {meta['threads']} threads, "
          f"load avg {meta['load_avg_at_start']}", flush=True)
    with torch.inference_mode():
        rows = [r for n, k in shapes for r in run_shape(n, k, args)]
    summary = summarize(rows)
    table = markdown(rows, summary, meta)
    print("\n" + table)
    write_json_and_markdown({"meta": meta, "rows": rows, "summary": summary}, table, out)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
