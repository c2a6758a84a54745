"""End-to-end CPU generation speed per CMPQ kernel ISA, and where the time of a generated token goes.

Per ``--model`` (the offline GGUF models of docs/DESIGN.md §5):
    * FP32: the model as loaded; greedy generation of ``--new-tokens`` tokens after ``--prompt`` with the KV
      cache (``cmpq_kernels.generation.generate``, as ``cmpq generate`` runs it), ``--reps`` runs after a
      warm-up, median tokens/s after the first token (``decode tok/s``: batch 1, one token per step).
    * CMPQ: every linear of the decoder blocks quantized at ``--bits``: by default with ``quantize_model``
      and the library defaults, calibrated on ``--samples`` windows of ``--calib-len`` tokens of ``lee-train``;
      with ``--standin``, by the calibration-free stand-in (seconds instead of minutes; the same stored
      tensors, so the same speed, but a much worse model). The embeddings and the tied ``lm_head`` stay
      FP32. Generation is timed once per CPU kernel ISA (``CMPQ_CPU_SIMD``): AVX2 was the kernel before the
      AVX-512 path.
    * Profile: one more generation per ISA under ``torch.profiler`` (CPU): the share of self CPU time in
      ``cmpq::gemm`` (the CMPQ layers), ``aten::linear``/``aten::addmm``/``aten::mm`` (the FP32 lm_head) and
      everything else (attention, norms, sampling, Python), plus the top operators.
    * Step-by-step perplexity: the first ``--ppl-tokens`` tokens of ``lee-test`` fed one token at a time
      with the KV cache, so every CMPQ call has m = 1 and runs the ISA's direct kernel (the perplexity tool
      feeds whole windows, m > 16, which never reaches it). Compared across ISAs of the same weights it
      measures what a kernel's arithmetic costs in accuracy (the approximate ``avx512-int8`` mode); the
      stand-in quantizer makes the absolute value worse than a calibrated checkpoint's.

Output: a table on stdout, ``<out>.json`` and ``<out>.md`` (default ``bench/results/cpu_profile``). Run it
alone (CPU timings are distorted by other load). Example:
``python bench/cpu_profile.py --model smollm2-135m gemma3-270m --bits 3``
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
import cmpq_kernels
from bench_common import cpu_model, markdown_table, write_json_and_markdown
from cmpq_kernels.corpora import read_text
from cmpq_kernels.generation import generate
from cmpq_kernels.models import load_gguf_model
from cmpq_kernels.quantize import quantize_linear, quantize_model
from cmpq_kernels.quantize.calibrate import find_blocks, linear_layers
from cmpq_kernels.surgery import quantized_modules, replace_module

DEFAULT_OUT = BENCH / "results" / "cpu_profile"
LM_HEAD_OPS = ("aten::linear", "aten::addmm", "aten::mm", "aten::matmul")


def decode_tokens_per_s(model, tokenizer, args: argparse.Namespace) -> float:
    generate(model, tokenizer, args.prompt, 4, echo=False)  # warm-up
    runs = [generate(model, tokenizer, args.prompt, args.new_tokens, echo=False) for _ in range(args.reps)]
    return statistics.median(r["decode_tokens_per_s"] for r in runs)


def time_shares(model, tokenizer, args: argparse.Namespace) -> dict:
    """Self CPU time by operator over one generation: shares of CMPQ layers, FP32 matmuls, the rest."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, tokenizer, args.prompt, args.new_tokens, echo=False)
    by_op: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by_op[event.key] += event.self_cpu_time_total
    total = sum(by_op.values())
    cmpq = sum(t for op, t in by_op.items() if op.startswith("cmpq::"))
    dense = sum(by_op[op] for op in LM_HEAD_OPS if op in by_op)
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
    return {"cmpq_share": cmpq / total, "fp32_matmul_share": dense / total, "rest_share": 1 - (cmpq + dense) / total,
            "top_ops": [{"op": op, "share": t / total} for op, t in top]}


def stepwise_perplexity(model, tokenizer, text: str, tokens: int) -> float:
    """exp(mean NLL) of ``tokens`` tokens of ``text`` predicted one step at a time with the KV cache."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens + 1]
    past, nll = None, 0.0
    for t in range(ids.shape[1] - 1):
        out = model(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        nll -= float(torch.log_softmax(out.logits[0, -1].float(), -1)[ids[0, t + 1]])
    return math.exp(nll / (ids.shape[1] - 1))


def quantize_blocks(model: torch.nn.Module, tokenizer, args: argparse.Namespace) -> int:
    if args.standin:
        path, blocks = find_blocks(model)
        for name, linear in linear_layers(blocks, f"{path}.").items():
            replace_module(model, name, quantize_linear(linear, args.bits))
    else:
        quantize_model(model, [read_text("lee-train")], args.bits, tokenizer=tokenizer, n_samples=args.samples,
                       seq_len=args.calib_len)
    return len(quantized_modules(model))


def run_model(name: str, args: argparse.Namespace) -> list[dict]:
    model, tokenizer = load_gguf_model(name)
    model.eval()
    rows = []
    text = read_text("lee-test")
    with torch.inference_mode():
        fp32 = decode_tokens_per_s(model, tokenizer, args)
        rows.append({"model": name, "weights": "fp32", "isa": None, "decode_tokens_per_s": fp32,
                     "stepwise_ppl": stepwise_perplexity(model, tokenizer, text, args.ppl_tokens),
                     **time_shares(model, tokenizer, args)})
        print(f"  {name} fp32: {fp32:.1f} tok/s", flush=True)
        layers = quantize_blocks(model, tokenizer, args)
        saved = os.environ.get("CMPQ_CPU_SIMD")
        try:
            for isa in args.isas:
                os.environ["CMPQ_CPU_SIMD"] = isa
                speed = decode_tokens_per_s(model, tokenizer, args)
                kind = "stand-in" if args.standin else "calibrated"
                rows.append({"model": name, "weights": f"cmpq {args.bits:g} bits, {kind} ({layers} layers)", "isa": isa,
                             "decode_tokens_per_s": speed,
                             "stepwise_ppl": stepwise_perplexity(model, tokenizer, text, args.ppl_tokens),
                             **time_shares(model, tokenizer, args)})
                print(f"  {name} cmpq {isa}: {speed:.1f} tok/s", flush=True)
        finally:
            os.environ.pop("CMPQ_CPU_SIMD", None) if saved is None else os.environ.update(CMPQ_CPU_SIMD=saved)
    for row in rows:
        row["vs_fp32"] = row["decode_tokens_per_s"] / fp32
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    head = (f"CPU: {meta['cpu_model']}, {meta['threads']} threads, torch {meta['torch']}, {meta['date']}; greedy, "
            f"{meta['new_tokens']} new tokens after {meta['prompt']!r}, median of {meta['reps']}; shares = self CPU "
            f"time of one profiled generation; step-by-step ppl over the first {meta['ppl_tokens']} tokens of lee-test, "
            "one token per call.\n\n")
    header = ("model", "weights", "ISA", "decode tok/s", "vs fp32", "step-by-step ppl", "CMPQ layers", "FP32 matmuls",
              "rest", "top ops")
    cells = [(r["model"], r["weights"], r["isa"] or "—", f"{r['decode_tokens_per_s']:.1f}", f"{r['vs_fp32']:.2f}",
              f"{r['stepwise_ppl']:.3f}",
              f"{100 * r['cmpq_share']:.0f} %", f"{100 * r['fp32_matmul_share']:.0f} %", f"{100 * r['rest_share']:.0f} %",
              ", ".join(f"{t['op']} {100 * t['share']:.0f} %" for t in r["top_ops"][:4])) for r in rows]
    return head + "\n".join(markdown_table(header, cells, text_columns=(0, 1, 2, 9))) + "\n"


def main() -> None:
    isas = tuple(i for i in torch.ops.cmpq.cpu_isas() if i != "scalar")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--bits", type=float, default=3.0)
    p.add_argument("--prompt", default="The weather in Sydney today is")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ppl-tokens", type=int, default=256, help="tokens of lee-test for the step-by-step perplexity")
    p.add_argument("--standin", action="store_true", help="stand-in quantizer instead of the calibrated one")
    p.add_argument("--samples", type=int, default=32, help="calibration windows")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--isas", nargs="+", default=list(isas), choices=torch.ops.cmpq.cpu_isas())
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="path without extension")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cmpq_kernels": cmpq_kernels.__version__, "python": platform.python_version(),
            "cpu_model": cpu_model(),
            "threads": torch.get_num_threads(), "bits": args.bits, "new_tokens": args.new_tokens, "reps": args.reps,
            "prompt": args.prompt, "ppl_tokens": args.ppl_tokens, "standin": args.standin,
            "calibration": None if args.standin else f"lee-train, {args.samples} x {args.calib_len} tokens", "load_avg_at_start": os.getloadavg()}
    rows = [r for name in args.model for r in run_model(name, args)]
    table = markdown(rows, meta)
    print("\n" + table)
    write_json_and_markdown({"meta": meta, "rows": rows}, table, args.out)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
