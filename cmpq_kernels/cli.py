"""``cmpq``: quantize, evaluate, run, inspect and benchmark CMPQ models from the command line.

    cmpq quantize --model smollm2-135m --bits 3 --calib lee-train --out smollm2-cmpq3 [--eval lee-test --prompt ...]
    cmpq quantize --model smollm2-135m --method mixllm --p 10 --calib lee-train --out smollm2-mixllm
    cmpq eval     --model smollm2-cmpq3 --text lee-test
    cmpq generate --model smollm2-cmpq3 --prompt "The weather today" [--temperature 0.7]
    cmpq inspect  smollm2-cmpq3 [--png bits.png]
    cmpq bench    [--device cpu|cuda] [benchmark arguments ...]

``--model`` takes a CMPQ or MixLLM checkpoint directory (written by ``cmpq quantize`` / :func:`save_quantized`), a
plain Hugging Face model directory or hub id (no network here: local files only), a ``.gguf`` file, or
one of the offline models of docs/DESIGN.md §5 (``smollm2-135m``, ``gemma3-270m``). Text arguments take a
UTF-8 file or ``lee-train`` / ``lee-test`` (disjoint English prose shipped with ``gensim``, see
:func:`cmpq_kernels.corpora.lee_split`). Errors in the input end the command with a one-line message.

This module only parses arguments and prints; the work is done by the library modules it calls.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import checkpoint, mixllm_checkpoint
from .corpora import BUILTIN_TEXTS, read_text
from .generation import generate
from .inspection import layer_rows, mixllm_markdown, mixllm_rows, natural_key, plot_bits, rows_markdown
from .from_disk import quantize_checkpoint
from .models import MODELS, checkpoint_method, is_model_directory, load_model, load_tokenizer, source_bytes
from .perplexity import perplexity
from .quantize import QuantOptions, quantize_model, quantize_model_mixllm
from .quantize.options import ALLOCATORS, BUDGETS

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError)


class UsageError(Exception):
    """A problem with the command line or its inputs, reported as one line (exit status 2)."""


def default_device() -> str:
    """``cuda`` when the CUDA kernels are built and a GPU is visible, else ``cpu``."""
    from . import backends

    return "cuda" if backends()["cuda"] else "cpu"


def pick_dtype(name: Optional[str], device: str) -> Optional[torch.dtype]:
    """``--dtype``; the CUDA kernels take fp16/bf16 activations, so a GPU run defaults to fp16."""
    if name is None:
        return torch.float16 if device.startswith("cuda") else None
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# ---- commands -------------------------------------------------------------------------------------------


def cmd_quantize(args: argparse.Namespace) -> dict:
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists; pass --overwrite to replace it")
    calibration = read_text(args.calib)
    eval_text = read_text(args.eval) if args.eval else None
    torch.set_num_threads(args.threads or torch.get_num_threads())
    options = QuantOptions(allocator=args.allocator, budget=args.budget, codebook_rows=args.codebook_rows,
                           effective_bits=args.effective_bits, error_feedback=not args.no_error_feedback,
                           codebook_refit=args.codebook_refit, share_input_widths=not args.no_share_input_widths)
    if args.bits is not None and args.effective_bits is not None:
        raise UsageError("give --bits (code bits) or --effective-bits (stored bits), not both")
    code_bits = None if args.effective_bits is not None else 3.0 if args.bits is None else args.bits
    calib = dict(n_samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    summary: dict[str, Any] = {"model": args.model, "method": args.method, "budget": (
        "effective bits" if args.effective_bits is not None else "code bits")}
    if args.method == "mixllm":  # the salience pass needs the whole model: loaded whole, also from a directory
        model, tokenizer = load_model(args.model)
        summary["fp_bytes"] = checkpoint.state_bytes(model)
        if eval_text is not None:
            print("evaluating the FP model ...", file=sys.stderr)
            summary["fp_perplexity"] = perplexity(model, tokenizer, eval_text, args.eval_seq_len, args.eval_tokens)
        report = quantize_model_mixllm(model, [calibration], args.p, tokenizer=tokenizer, act_bits=args.act_bits,
                                       **calib)
        mixllm_checkpoint.save_mixllm(model, args.out, tokenizer, report, overwrite=args.overwrite)
    elif is_model_directory(args.model):  # block by block from its files: the FP model is never loaded whole
        tokenizer = load_tokenizer(args.model)
        if eval_text is not None:
            _fp_perplexity(summary, args, eval_text)
        report = quantize_checkpoint(args.model, args.out, [calibration], code_bits, options, tokenizer=tokenizer,
                                     overwrite=args.overwrite, **calib)
        summary["fp_bytes"] = source_bytes(args.model)
        summary["memory_estimate"] = report.settings.pop("memory_estimate")
        model = checkpoint.load_quantized(args.out)
    else:
        model, tokenizer = load_model(args.model)
        summary["fp_bytes"] = checkpoint.state_bytes(model)
        if eval_text is not None:
            print("evaluating the FP model ...", file=sys.stderr)
            summary["fp_perplexity"] = perplexity(model, tokenizer, eval_text, args.eval_seq_len, args.eval_tokens)
        report = quantize_model(model, [calibration], code_bits, options, tokenizer=tokenizer, **calib)
        checkpoint.save_quantized(model, args.out, tokenizer, report, overwrite=args.overwrite)
    sizes = checkpoint.checkpoint_bytes(args.out)
    summary.update({"out": args.out, "bits": report.bits, "effective_bits": report.effective_bits,
                    "code_bits": report.code_bits, "bytes_on_disk": sizes,
                    "quantize_seconds": report.stage_seconds["total"], "stage_seconds": report.stage_seconds})
    if eval_text is not None:
        summary["perplexity"] = perplexity(model, tokenizer, eval_text, args.eval_seq_len, args.eval_tokens)
    if args.verbose:
        print(report.to_markdown(), file=sys.stderr)
    _print_quantize_summary(summary, sizes["weights"])
    if args.prompt:
        print(f"\n{args.prompt}", end="", flush=True)
        summary["generate"] = generate(model, tokenizer, args.prompt, args.max_new_tokens)
        print(f"[{summary['generate']['new_tokens']} tokens, {summary['generate']['tokens_per_s']:.1f} tokens/s]")
    return summary


def _fp_perplexity(summary: dict, args: argparse.Namespace, text: str) -> None:
    """FP perplexity for the comparison: this alone loads the FP model whole (then frees it)."""
    print("evaluating the FP model (loads it whole; omit --eval to avoid that) ...", file=sys.stderr)
    model, tokenizer = load_model(args.model)
    summary["fp_perplexity"] = perplexity(model, tokenizer, text, args.eval_seq_len, args.eval_tokens)


def _print_quantize_summary(s: dict, file_bytes: int) -> None:
    print(f"\nquantized {s['model']} -> {s['out']}: {s['bits']:g} {s.get('budget', 'bits')} requested, "
          f"code bits {s['code_bits']:.3f}, "
          f"effective bits {s['effective_bits']:.3f} (quantized layers), {s['quantize_seconds']:.0f} s")
    print("| model | weights (MB) | perplexity |\n|---|---|---|")
    fp_ppl = f"{s['fp_perplexity']:.2f}" if "fp_perplexity" in s else "-"
    q_ppl = f"{s['perplexity']:.2f} ({s['perplexity'] / s['fp_perplexity']:.2f}x)" if "perplexity" in s else "-"
    print(f"| FP ({s['model']}) | {s['fp_bytes'] / 1e6:.1f} | {fp_ppl} |")
    label = f"MixLLM W{s['bits']:g}A8" if s["method"] == "mixllm" else f"CMPQ {s['bits']:g} bits"
    print(f"| {label} | {file_bytes / 1e6:.1f} (quantized layers {s['bytes_on_disk']['quantized'] / 1e6:.1f}) "
          f"| {q_ppl} |")


def cmd_eval(args: argparse.Namespace) -> dict:
    text = read_text(args.text)
    device = args.device or default_device()
    model, tokenizer = load_model(args.model, device, pick_dtype(args.dtype, device))
    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, text, args.seq_len, args.max_tokens)
    result = {"model": args.model, "text": args.text, "perplexity": ppl, "seq_len": args.seq_len,
              "max_tokens": args.max_tokens, "seconds": time.perf_counter() - start, "device": device}
    print(f"{args.model}: perplexity {ppl:.3f} on {args.text} (windows of {args.seq_len} tokens, "
          f"{result['seconds']:.1f} s on {device})")
    return result


def cmd_generate(args: argparse.Namespace) -> dict:
    device = args.device or default_device()
    model, tokenizer = load_model(args.model, device, pick_dtype(args.dtype, device))
    print(args.prompt, end="", flush=True)
    result = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    decode = result["decode_tokens_per_s"]
    print(f"\n[{result['new_tokens']} new tokens in {result['seconds']:.2f} s: {result['tokens_per_s']:.1f} tokens/s"
          + (f", {decode:.1f} tokens/s after the first" if decode else "") + f", {device}]")
    return result


def cmd_inspect(args: argparse.Namespace) -> dict:
    mixllm = checkpoint_method(args.directory) == "mixllm"
    read = mixllm_checkpoint.read_mixllm_layers if mixllm else checkpoint.read_layers
    qconfig, layers = read(args.directory, verify=not args.no_verify)
    layers = {name: layers[name] for name in sorted(layers, key=natural_key)}  # config.json keys are sorted as text
    if mixllm and args.png:
        raise UsageError("--png plots CMPQ's per-channel bit widths; a MixLLM checkpoint has none")
    rows = mixllm_rows(layers) if mixllm else layer_rows(layers)
    print(mixllm_markdown(rows) if mixllm else rows_markdown(rows))
    sizes = checkpoint.checkpoint_bytes(args.directory)
    print(f"on disk: {sizes['weights']:,} bytes model.safetensors ({sizes['quantized']:,} in quantized layers), "
          f"{sizes['total']:,} bytes in the directory")
    settings = qconfig.get("settings")
    if settings:
        print("settings: " + json.dumps(settings, sort_keys=True))
    if args.png:
        plot_bits(layers, args.png)
        print(f"wrote {args.png}")
    return {"layers": rows, "bytes": sizes, "quantization_config": {k: v for k, v in qconfig.items() if k != "modules"}}


def cmd_bench(args: argparse.Namespace) -> dict:
    device = args.device or default_device()
    script = Path(__file__).resolve().parent.parent / "bench" / ("bench_gpu.py" if device == "cuda" else "bench_cpu.py")
    if not script.is_file():
        raise UsageError(f"{script} not found: `cmpq bench` runs the benchmark scripts of a source checkout "
                         "(git clone, then pip install -e . --no-build-isolation); a wheel install has none")
    passed = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    saved, sys.argv = sys.argv, [str(script), *passed]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved
    return {"script": str(script), "args": passed}


# ---- parser ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmpq", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = f"checkpoint dir, HF model dir, .gguf file, or one of: {', '.join(MODELS)}"

    q = sub.add_parser("quantize", help="quantize a causal LM and save a CMPQ (or MixLLM) checkpoint")
    q.add_argument("--model", required=True, help=model_help)
    q.add_argument("--method", choices=("cmpq", "mixllm"), default="cmpq",
                   help="cmpq (default) or mixllm: 8-bit for the top --p %% output channels, 4-bit for the rest")
    q.add_argument("--bits", type=float,
                   help="cmpq: average code bits per weight, 2.0-4.0 (default 3 unless --effective-bits is given)")
    q.add_argument("--effective-bits", type=float, help="cmpq: " + _option_help("effective_bits"))
    q.add_argument("--p", type=float, default=10.0,
                   help="mixllm: percentage of output channels at 8 bits (0 = W4A8, 10 = W4.4A8 default, 100 = W8A8)")
    q.add_argument("--act-bits", type=int, choices=(8, 16), default=8,
                   help="mixllm: 8 quantizes activations per token and 128 channels (default), 16 = weight-only")
    q.add_argument("--calib", required=True, help=f"calibration text file or {'/'.join(BUILTIN_TEXTS)}")
    q.add_argument("--out", required=True, help="output directory (written atomically)")
    q.add_argument("--allocator", choices=ALLOCATORS, default=QuantOptions.allocator, help=_option_help("allocator"))
    q.add_argument("--budget", choices=BUDGETS, default=QuantOptions.budget, help=_option_help("budget"))
    q.add_argument("--codebook-rows", type=_codebook_rows, default=QuantOptions.codebook_rows,
                   help=_option_help("codebook_rows"))
    q.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    q.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--no-error-feedback", action="store_true", help="skip GPTQ-style error feedback (on by default)")
    q.add_argument("--codebook-refit", action="store_true", help=_option_help("codebook_refit"))
    q.add_argument("--no-share-input-widths", action="store_true",
                   help="allocate q/k/v and gate/up each alone (they then cannot be fused by vLLM; sharing is on by "
                        "default)")
    q.add_argument("--eval", help="also report FP vs quantized perplexity on this text")
    q.add_argument("--eval-seq-len", type=int, default=512)
    q.add_argument("--eval-tokens", type=int, default=16384, help="evaluation token budget (default 16384)")
    q.add_argument("--prompt", help="generate a continuation of this prompt with the quantized model")
    q.add_argument("--max-new-tokens", type=int, default=24)
    q.add_argument("--threads", type=int, help="torch CPU threads")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--verbose", action="store_true", help="print the per-layer report")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model on a text")
    e.add_argument("--model", required=True, help=model_help)
    e.add_argument("--text", required=True, help=f"text file or {'/'.join(BUILTIN_TEXTS)}")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=16384)
    _device_args(e)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text; prints tokens/s")
    g.add_argument("--model", required=True, help=model_help)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    _device_args(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="per-layer bit allocation, outliers, effective bits; optional PNG")
    i.add_argument("directory")
    i.add_argument("--png", help="write a plot of bits per layer and per channel slice")
    i.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="kernel microbenchmarks (source checkout only: runs bench/bench_cpu.py or "
                                     "bench/bench_gpu.py of the tree this package was installed from with pip -e)")
    b.add_argument("--device", choices=("cpu", "cuda"))
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the benchmark script (e.g. --quick)")
    b.set_defaults(func=cmd_bench)

    for p in (q, e, g, i):
        p.add_argument("--json", help="also write the result as JSON to this file")
    return parser


def _codebook_rows(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _option_help(name: str) -> str:
    return f"{QuantOptions.help(name)} (default {getattr(QuantOptions, name)})"


def _device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu or cuda (default: cuda when usable)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="activation/model dtype (default: as stored on CPU, float16 on CUDA)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``cmpq`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (UsageError, *_USER_ERRORS) as err:
        print(f"cmpq {args.command}: error: {err}", file=sys.stderr)
        return 2
    if getattr(args, "json", None):
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
