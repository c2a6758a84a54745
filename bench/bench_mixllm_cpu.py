"""CPU benchmark: the MixLLM W4A8 op side by side with torch's dense and weight-only quantized CPU kernels.

What is compared, per shape N x K (``nn.Linear`` convention: out_features x in_features) and batch M, all in
one run so every ratio is measured under the same machine load:
    * ``fp32``: ``torch.nn.functional.linear(x, W)``, W float32 [N, K] contiguous, x float32 -- the baseline.
    * ``int8``: ``aten._weight_int8pack_mm`` (int8 weight-only: int8 W, one bf16 scale per output row, bf16 x).
    * ``int4-g128``: ``aten._convert_weight_to_int4pack_for_cpu`` + ``aten._weight_int4pack_mm_for_cpu``
      (int4 weight-only, bf16 scale and zero per group of 128 inputs, bf16 x).
      Both peers are ``bench_cpu.py``'s (plain min/max quantization). A peer whose op this torch lacks or
      refuses is listed under ``unavailable`` in the JSON instead of failing the run.
    * ``mixllm-p0`` / ``mixllm-p10``: ``ops.mixllm_gemm(x, layer, act_bits=8)`` (W4A8 / W4.4A8: activations
      quantized to int8 per token and 128-wide group inside the op, integer dot products), x float32, on a
      layer in the real packed format (``MixLLMLayer.from_codes``) with 0 % / 10 % of its rows at 8 bits. The
      8-bit rows are a seeded random 10 % (their positions, not their values, matter for speed), the codes
      round-to-nearest on ``quantize.mixllm.group_params`` grids (GPTQ would change values, not the work).
      The kernel ISA follows ``CMPQ_CPU_SIMD`` (automatic when unset), recorded as ``mixllm_isa``
      (``torch.ops.cmpq.cpu_isa()``, the rule both CPU ops share).
W is ``torch.randn(N, K) * 0.02`` (seed 0) for every method. ``rel err`` is each method's output error
against fp32's ``x @ W.T`` (quantization error included, a sanity check, not an accuracy result).

Method
    * Weights are read cold, as in a model where each layer is read once per token: every method cycles through
      as many distinct copies of its weights as fill ``--cold-mb`` (default twice the LLC size from sysfs),
      as ``bench_cpu.py`` does.
    * ``torch.set_num_threads(--threads)`` (default 1: the MixLLM kernels use the same ATen pool).
    * Interleaved timing, because the machine may be shared and its load changes within seconds: per shape and
      M, every method gets ``--warmup`` untimed calls (default 5), then ``--reps`` rounds (default 30) each time
      one call of every method in turn; a method's time is its median. Activations cycle through 8 pre-made
      tensors, weight copies through the cold set.
    * Two clocks per call: wall (``time.perf_counter``, ``ms``) and the calling thread's CPU time
      (``time.thread_time``, ``cpu_ms``). With one thread the op runs on the calling thread, so ``cpu_ms`` is
      the call's work without the time the scheduler gives other processes: on a loaded machine (load average
      far above the core count) a wall median can be a scheduler time slice, so the ratios use ``cpu_ms`` when
      ``--threads 1`` and wall time otherwise (``ratio_clock`` in the JSON). CPU time still includes memory
      stalls and caches disturbed by other processes.
    * Correctness gate before timing: the op's output at M = 4 must match ``mixllm_reference.linear`` (the exact
      A8 arithmetic) to 1e-4 relative, else the run aborts: a wrong kernel is never timed.
    * Weight bytes: everything stored (MixLLM: codes, fp16 scales, packed zeros, int32 row indices;
      int4: packed codes + bf16 scales and zeros; int8: codes + scales); effective bits = 8 * bytes / (N * K).
    * ``speedup`` = fp32 time / method time; the summary also gives int8 / mixllm and int4-g128 / mixllm.
    * The machine may be shared: ``os.getloadavg()`` is recorded before and after the run (and per shape).

Output: tables on stdout, ``<out>.json`` and ``<out>.md`` (default ``bench/results/mixllm_cpu``). ``--quick``
(smoke test, seconds): tiny shapes, M = 1 and 4, 3 reps, 8 MiB of cold copies, output in a temp dir unless
``--out`` is given. Example: ``python bench/bench_mixllm_cpu.py --threads 1``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
from bench_common import markdown_table, parse_batches, parse_shapes, write_json_and_markdown
from bench_cpu import Method, cpu_flags, llc_bytes, machine_metadata, make_peer, n_copies, rel_err
from cmpq_kernels import mixllm_reference, ops
from cmpq_kernels.mixllm_format import MixLLMLayer
from cmpq_kernels.quantize.mixllm import group_params, rtn_codes

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
BATCHES = (1, 4, 16, 64)
QUICK_SHAPES = ((256, 512), (512, 256))
QUICK_BATCHES = (1, 4)
PEERS = ("fp32", "int8", "int4-g128")
PERCENTS = (0, 10)
ROTATE = 8
GATE_M = 4
MAX_REL_ERR = 1e-4
DEFAULT_OUT = BENCH / "results" / "mixllm_cpu"


def random_mixllm_layer(weight: torch.Tensor, p: float, seed: int = 0) -> MixLLMLayer:
    """``weight`` in the packed MixLLM format with a seeded random ``round(p / 100 * N)`` rows at 8 bits
    (round-to-nearest codes on the quantizer's grids)."""
    n = weight.shape[0]
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n8 = round(p / 100 * n)
    idx8, idx4 = rows[:n8].sort().values, rows[n8:].sort().values
    s8, _ = group_params(weight[idx8], 8)
    s4, z4 = group_params(weight[idx4], 4)
    return MixLLMLayer.from_codes(idx8=idx8, q8=rtn_codes(weight[idx8], s8, torch.zeros_like(s8, dtype=torch.int64), 8),
                                  s8=s8, idx4=idx4, q4=rtn_codes(weight[idx4], s4, z4, 4), s4=s4, z4=z4)


def mixllm_method(layer: MixLLMLayer, p: float, cold: int) -> Method:
    """``mixllm-p<p>``: the A8 op on cold copies of ``layer``; aborts unless it matches the reference."""
    probe = torch.randn(GATE_M, layer.k, generator=torch.Generator().manual_seed(1))
    err = rel_err(ops.mixllm_gemm(probe, layer, act_bits=8), mixllm_reference.linear(probe, layer, act_bits=8).float())
    if not err < MAX_REL_ERR:  # also catches NaN
        raise SystemExit(f"ABORT: mixllm_gemm p{p:g} {layer.n}x{layer.k} differs from mixllm_reference.linear by "
                         f"{err:.3g} (limit {MAX_REL_ERR:g}); not benchmarking a wrong kernel")
    nbytes = sum(layer.storage_bits().values()) // 8
    copies = [layer] + [MixLLMLayer.from_fields({k: t.clone() for k, t in layer.fields().items()}, n=layer.n, k=layer.k)
                        for _ in range(n_copies(nbytes, cold) - 1)]
    method = Method(f"mixllm-p{p:g}", nbytes, torch.float32, len(copies),
                    lambda x, i: ops.mixllm_gemm(x, copies[i], act_bits=8))
    method.code_bits = layer.code_bits
    return method


def time_interleaved(methods: list[Method], xs: list[torch.Tensor], warmup: int,
                     reps: int) -> list[tuple[float, float]]:
    """``(wall ms, thread CPU ms)`` medians of one call per method, the methods called in turn within every
    round (see the docstring)."""
    inputs = [[x.to(method.x_dtype) for x in xs] for method in methods]
    wall: list[list[float]] = [[] for _ in methods]
    cpu: list[list[float]] = [[] for _ in methods]
    for i in range(warmup + reps):
        for j, method in enumerate(methods):
            x = inputs[j][i % len(xs)]
            c0, t0 = time.thread_time(), time.perf_counter()
            method.call(x, i % method.copies)
            t1, c1 = time.perf_counter(), time.thread_time()
            if i >= warmup:
                wall[j].append(t1 - t0)
                cpu[j].append(c1 - c0)
    return [(statistics.median(w) * 1e3, statistics.median(c) * 1e3) for w, c in zip(wall, cpu)]


def run_shape(n: int, k: int, args: argparse.Namespace, unavailable: dict[str, str]) -> list[dict]:
    torch.manual_seed(0)
    weight = torch.randn(n, k) * 0.02
    xs = {m: [torch.randn(m, k) for _ in range(ROTATE)] for m in args.batch}
    probe = torch.randn(GATE_M, k)
    ref = F.linear(probe, weight)
    methods: list[Method] = []
    for name in args.peers:
        try:
            peer = make_peer(name, weight, args.cold_bytes)
            peer.rel_err = rel_err(peer.call(probe.to(peer.x_dtype), 0), ref)
        except (RuntimeError, NotImplementedError, AttributeError) as err:  # op missing or refusing this shape
            unavailable[f"{name} {n}x{k}"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            continue
        methods.append(peer)
    for p in PERCENTS:
        method = mixllm_method(random_mixllm_layer(weight, p), p, args.cold_bytes)
        method.rel_err = rel_err(method.call(probe, 0), ref)
        methods.append(method)
    rows = []
    for m in args.batch:
        measured = time_interleaved(methods, xs[m], args.warmup, args.reps)
        ms = {method.name: t for method, t in zip(methods, measured)}
        clock = 1 if args.threads == 1 else 0  # which of (wall, CPU) the ratios use
        for method in methods:
            wall, cpu = ms[method.name]
            rows.append({"n": n, "k": k, "m": m, "method": method.name,
                         "effective_bits": 8 * method.weight_bytes / (n * k), "code_bits": method.code_bits,
                         "ms": wall, "cpu_ms": cpu, "weight_bytes": method.weight_bytes,
                         "gbps": method.weight_bytes / ms[method.name][clock] / 1e6,
                         "speedup": ms["fp32"][clock] / ms[method.name][clock],
                         "rel_err": method.rel_err, "copies": method.copies})
        print(f"  {n}x{k} M={m}: " + ", ".join(f"{name} {w:.3f} ms (cpu {c:.3f})" for name, (w, c) in ms.items()),
              flush=True)
    return rows


def summarize(rows: list[dict], clock: str) -> list[dict]:
    """Per shape, M and MixLLM variant: its time and the ratios to each peer on the ``clock`` field (``ms`` or
    ``cpu_ms``): peer time / MixLLM time, > 1: MixLLM faster."""
    by = {(r["n"], r["k"], r["m"], r["method"]): r for r in rows}
    out = []
    for r in rows:
        if not r["method"].startswith("mixllm"):
            continue
        entry = {"n": r["n"], "k": r["k"], "m": r["m"], "method": r["method"], "effective_bits": r["effective_bits"],
                 "ms": r["ms"], "cpu_ms": r["cpu_ms"]}
        for peer in PEERS:
            other = by.get((r["n"], r["k"], r["m"], peer))
            entry[f"{peer}_over_mixllm"] = other[clock] / r[clock] if other else None
        out.append(entry)
    return out


def mixllm_isa() -> str:
    """The kernel the MixLLM op runs: ``CMPQ_CPU_SIMD``'s choice, except that an automatic avx512 on a CPU
    without VNNI runs avx2 (``mixllm_isa`` in csrc/mixllm_ops.cpp)."""
    isa = torch.ops.cmpq.cpu_isa()
    return "avx2" if isa.startswith("avx512") and "avx512_vnni" not in cpu_flags() else isa


def metadata(args: argparse.Namespace) -> dict:
    return {**machine_metadata(args), "mixllm_isa": mixllm_isa(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "ratio_clock": "thread CPU time (cpu_ms)" if args.threads == 1 else "wall time (ms)",
            "load_avg_before": list(os.getloadavg())}


def markdown(rows: list[dict], summary: list[dict], meta: dict) -> str:
    head = (f"CPU: {meta['cpu_model']} (MixLLM kernel {meta['mixllm_isa']}), {meta['threads']} thread(s), torch "
            f"{meta['torch']}, {meta['date']}; median of {meta['reps']} reps after {meta['warmup']} warm-up; weights "
            f"cold (copies cycled over {meta['cold_bytes'] / 2**20:.0f} MiB); load average (1, 5, 15 min) before "
            f"{', '.join(f'{v:.2f}' for v in meta['load_avg_before'])}, after "
            f"{', '.join(f'{v:.2f}' for v in meta['load_avg_after'])} (shared machine). Command: "
            f"`{meta['command']}`. Ratios (speedup = fp32 time / time, GB/s) on {meta['ratio_clock']}; rel err = "
            "output error vs fp32 `x @ W.T`.\n\n")
    if meta["unavailable"]:
        head += "Unavailable: " + "; ".join(f"{k}: {v}" for k, v in meta["unavailable"].items()) + "\n\n"
    header = ("shape (N×K)", "M", "method", "effective bits", "wall ms", "CPU ms", "GB/s", "speedup", "rel err")
    cells = [(f"{r['n']}×{r['k']}", f"{r['m']}", r["method"], f"{r['effective_bits']:.3f}", f"{r['ms']:.3f}",
              f"{r['cpu_ms']:.3f}", f"{r['gbps']:.1f}", f"{r['speedup']:.2f}", f"{r['rel_err']:.1e}") for r in rows]
    lines = [head, *markdown_table(header, cells, text_columns=(0, 2)), "",
             f"Ratios on {meta['ratio_clock']} (peer time / MixLLM time; > 1: MixLLM faster):", ""]

    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}"
    header = ("shape (N×K)", "M", "method", "wall ms", "CPU ms", "fp32 / it", "int8 / it", "int4-g128 / it")
    cells = [(f"{s['n']}×{s['k']}", f"{s['m']}", s["method"], f"{s['ms']:.3f}", f"{s['cpu_ms']:.3f}",
              fmt(s["fp32_over_mixllm"]), fmt(s["int8_over_mixllm"]), fmt(s["int4-g128_over_mixllm"]))
             for s in summary]
    lines += markdown_table(header, cells, text_columns=(0, 2))
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, M = 1 and 4, 3 reps, output to a temp dir")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per case (default 30; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 5; 1 with --quick)")
    p.add_argument("--cold-mb", type=int, default=None,
                   help="MiB of distinct weight copies cycled per method (default: 2 x LLC; 8 with --quick)")
    p.add_argument("--out", type=Path, default=None, help=f"output path without extension (default {DEFAULT_OUT})")
    p.add_argument("--shapes", type=parse_shapes, default=None, help="comma list of NxK (out x in)")
    p.add_argument("--batch", type=parse_batches, default=None, help="comma list of M")
    args = p.parse_args()
    if args.threads < 1:
        p.error("--threads must be >= 1")
    args.reps = args.reps or (3 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.cold_bytes = (args.cold_mb if args.cold_mb is not None else (8 if args.quick else 0)) * 2**20 \
        or 2 * llc_bytes()
    args.batch = args.batch or (QUICK_BATCHES if args.quick else BATCHES)
    args.peers = PEERS
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    out = args.out or (Path(tempfile.gettempdir()) / "mixllm_cpu_quick" if args.quick else DEFAULT_OUT)

    torch.set_num_threads(args.threads)
    meta = metadata(args)
    print(f"MixLLM CPU benchmark: {meta['cpu_model']} ({meta['mixllm_isa']}), {meta['threads']} thread(s), "
          f"load avg {meta['load_avg_before']}", flush=True)
    unavailable: dict[str, str] = {}
    rows, load_by_shape = [], {}
    with torch.inference_mode():
        for n, k in shapes:
            rows += run_shape(n, k, args, unavailable)
            load_by_shape[f"{n}x{k}"] = list(os.getloadavg())
    meta.update(load_avg_after=list(os.getloadavg()), load_avg_after_each_shape=load_by_shape, unavailable=unavailable)
    summary = summarize(rows, "cpu_ms" if args.threads == 1 else "ms")
    table = markdown(rows, summary, meta)
    print("\n" + table)
    write_json_and_markdown({"meta": meta, "rows": rows, "summary": summary}, table, out)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
