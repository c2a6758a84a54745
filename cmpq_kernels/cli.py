"""``cmpq``: quantize, evaluate, run, inspect and benchmark CMPQ models from the command line.

    cmpq quantize --model smollm2-135m --bits 3 --calib lee-train --out smollm2-cmpq3 [--eval lee-test --prompt ...]
    cmpq eval     --model smollm2-cmpq3 --text lee-test
    cmpq generate --model smollm2-cmpq3 --prompt "The weather today" [--temperature 0.7]
    cmpq inspect  smollm2-cmpq3 [--png bits.png]
    cmpq bench    [--device cpu|cuda] [benchmark arguments ...]

``--model`` takes a CMPQ checkpoint directory (written by ``cmpq quantize`` / :func:`save_quantized`), a
plain Hugging Face model directory or hub id (no network here: local files only), a ``.gguf`` file, or
one of the offline models of DESIGN §5 (``smollm2-135m``, ``gemma3-270m``). Text arguments take a UTF-8
file or ``lee-train`` / ``lee-test`` (disjoint English prose shipped with ``gensim``, see
:func:`cmpq_kernels.eval.lee_split`). Errors in the input end the command with a one-line message.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import runpy
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from . import checkpoint
from .eval import MODELS, lee_split, load_gguf_model, perplexity
from .format import SEGMENT_BITS, CMPQLayer

BUILTIN_TEXTS = ("lee-train", "lee-test")
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError)


class UsageError(Exception):
    """A problem with the command line or its inputs, reported as one line (exit status 2)."""


# ---- inputs ---------------------------------------------------------------------------------------------


def read_text(spec: str) -> str:
    """Text of a file, or of a built-in corpus (``lee-train`` / ``lee-test``)."""
    if spec in BUILTIN_TEXTS:
        return lee_split()[BUILTIN_TEXTS.index(spec)]
    if not os.path.isfile(spec):
        raise UsageError(f"text {spec!r} is neither a file nor one of {', '.join(BUILTIN_TEXTS)}")
    with open(spec, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise UsageError(f"text file {spec!r} is empty")
    return text


def is_cmpq_checkpoint(path: str) -> bool:
    """True when ``path`` is a directory whose config.json names quant_method "cmpq"."""
    config = os.path.join(path, checkpoint.CONFIG_NAME)
    if not os.path.isfile(config):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            quant = json.load(f).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(quant, dict) and quant.get("quant_method") == checkpoint.QUANT_METHOD


def load_model(spec: str, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for any ``--model`` spec (see the module docstring), eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec in MODELS:
        model, tokenizer = load_gguf_model(spec)
    elif is_cmpq_checkpoint(spec):
        model, tokenizer = checkpoint.load_quantized(spec), AutoTokenizer.from_pretrained(spec)
    elif spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise UsageError(f"GGUF file {spec!r} does not exist")
        directory, name = os.path.split(os.path.abspath(spec))
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        except OSError as err:
            raise UsageError(f"cannot load model {spec!r}: not a local model directory, .gguf file or one of "
                             f"{', '.join(MODELS)} (no network access: hub ids only work when cached) [{err}]")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval().to(device), tokenizer


def default_device() -> str:
    """``cuda`` when the CUDA kernels are built and a GPU is visible, else ``cpu``."""
    from . import backends

    return "cuda" if backends()["cuda"] else "cpu"


def pick_dtype(name: Optional[str], device: str) -> Optional[torch.dtype]:
    """``--dtype``; the CUDA kernels take fp16/bf16 activations, so a GPU run defaults to fp16."""
    if name is None:
        return torch.float16 if device.startswith("cuda") else None
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# ---- generate -------------------------------------------------------------------------------------------


class _TimedStreamer:
    """Prints tokens as they arrive and records when each new token came (for decode tokens/s)."""

    def __init__(self, tokenizer: Any, echo: bool) -> None:
        from transformers import TextStreamer

        self.text = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if echo else None
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True
        if self.text is not None:
            self.text.put(value)

    def end(self) -> None:
        if self.text is not None:
            self.text.end()


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, echo: bool = True) -> dict:
    """Greedy (``temperature == 0``) or sampled continuation of ``prompt``; returns text and timings.

    ``decode_tokens_per_s`` counts tokens after the first (the first includes the prompt's prefill);
    ``tokens_per_s`` is all new tokens over the whole call.
    """
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not (temperature >= 0 and math.isfinite(temperature)) or not 0 < top_p <= 1:
        raise UsageError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    torch.manual_seed(seed)
    streamer = _TimedStreamer(tokenizer, echo)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    decode = (len(streamer.times) - 1) / (streamer.times[-1] - streamer.times[0]) if len(streamer.times) > 1 else None
    return {"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": int(new.numel()),
            "seconds": seconds, "tokens_per_s": new.numel() / seconds, "decode_tokens_per_s": decode}


# ---- inspect --------------------------------------------------------------------------------------------


def layer_rows(layers: dict[str, CMPQLayer]) -> list[dict]:
    """One summary dict per layer: shape, bit mix, outliers, effective bits, stored bytes."""
    rows = []
    for name, layer in layers.items():
        stored = layer.storage_bits()
        rows.append({"name": name, "shape": [layer.n, layer.k], "bits": layer.bits, "code_bits": layer.code_bits,
                     "channels": dict(zip((f"{b}bit" for b in SEGMENT_BITS), layer.seg_k)), "nnz": layer.nnz,
                     "outlier_pct": 100.0 * layer.nnz / (layer.n * layer.k), "codebook_rows": layer.codebook_rows,
                     "effective_bits": layer.effective_bits, "bytes": sum(stored.values()) // 8})
    return rows


def rows_markdown(rows: Sequence[dict]) -> str:
    """The per-layer table of ``cmpq inspect`` plus a model-wide line."""
    lines = ["| layer | shape | bits | code bits | 4/3/2-bit channels | outliers (%) | rows/codebook | eff. bits | bytes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mix = "/".join(str(r["channels"][f"{b}bit"]) for b in SEGMENT_BITS)
        lines.append(f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {r['bits']:g} | {r['code_bits']:.3f} | {mix} "
                     f"| {r['nnz']} ({r['outlier_pct']:.2f}) | {r['codebook_rows']} | {r['effective_bits']:.3f} "
                     f"| {r['bytes']:,} |")
    weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    mean = lambda key: sum(r[key] * r["shape"][0] * r["shape"][1] for r in rows) / weights  # noqa: E731
    lines.append(f"\n{len(rows)} layers, {weights:,} weights: code bits {mean('code_bits'):.3f}, effective bits "
                 f"{mean('effective_bits'):.3f}, {sum(r['bytes'] for r in rows):,} bytes")
    return "\n".join(lines)


def channel_bits(layer: CMPQLayer, bins: int) -> torch.Tensor:
    """Mean code width over ``bins`` equal slices of the *original* input-channel order."""
    widths = torch.cat([torch.full((s,), float(b)) for b, s in zip(SEGMENT_BITS, layer.seg_k)])
    original = torch.empty(layer.k)
    original[layer.perm.long().cpu()] = widths
    return torch.stack([part.mean() for part in original.tensor_split(bins)])


def plot_bits(layers: dict[str, CMPQLayer], path: str, bins: int = 64) -> None:
    """PNG: channel mix and effective bits per layer (top), code width per input-channel slice (bottom)."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--png needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(layers)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(min(16, max(8, 0.18 * len(names))), 9), constrained_layout=True)
    x = range(len(names))
    base = [0.0] * len(names)
    for s, (b, color) in enumerate(zip(SEGMENT_BITS, ("tab:green", "tab:orange", "tab:red"))):
        share = [layers[n].seg_k[s] / layers[n].k for n in names]
        top.bar(x, share, bottom=base, color=color, label=f"{b}-bit channels")
        base = [u + v for u, v in zip(base, share)]
    top.set_ylabel("share of input channels")
    twin = top.twinx()
    twin.plot(x, [layers[n].effective_bits for n in names], "k.-", label="effective bits")
    twin.set_ylabel("effective bits")
    step = -(-len(names) // 70)  # at most ~70 readable labels
    top.set_xticks(list(x)[::step], [n.rsplit(".", 3)[-3] + "." + n.rsplit(".", 1)[-1] if n.count(".") >= 3 else n
                                     for n in names][::step], rotation=90, fontsize=6)
    top.legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    image = torch.stack([channel_bits(layers[n], bins) for n in names]).numpy()
    shown = bottom.imshow(image, aspect="auto", cmap="viridis", vmin=2, vmax=4, interpolation="nearest")
    bottom.set_xlabel(f"input channel (original order, {bins} slices)")
    bottom.set_ylabel("layer (index as above)")
    fig.colorbar(shown, ax=bottom, label="mean code bits")
    fig.suptitle("CMPQ bit allocation")
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- commands -------------------------------------------------------------------------------------------


def cmd_quantize(args: argparse.Namespace) -> dict:
    from .quantize import quantize_model

    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists; pass --overwrite to replace it")
    calibration = read_text(args.calib)
    eval_text = read_text(args.eval) if args.eval else None
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, tokenizer = load_model(args.model)
    summary: dict[str, Any] = {"model": args.model, "fp_bytes": checkpoint.state_bytes(model)}
    if eval_text is not None:
        print("evaluating the FP model ...", file=sys.stderr)
        summary["fp_perplexity"] = perplexity(model, tokenizer, eval_text, args.eval_seq_len, args.eval_tokens)
    report = quantize_model(model, [calibration], args.bits, tokenizer=tokenizer, allocator=args.allocator,
                            budget=args.budget, codebook_rows=args.codebook_rows, n_samples=args.samples,
                            seq_len=args.seq_len, seed=args.seed, error_feedback=not args.no_error_feedback)
    saved = checkpoint.save_quantized(model, args.out, tokenizer, report, overwrite=args.overwrite)
    summary.update({"out": args.out, "bits": args.bits, "effective_bits": report.effective_bits,
                    "code_bits": report.code_bits, "bytes_on_disk": checkpoint.checkpoint_bytes(args.out),
                    "quantize_seconds": report.stage_seconds["total"], "stage_seconds": report.stage_seconds})
    if eval_text is not None:
        summary["perplexity"] = perplexity(model, tokenizer, eval_text, args.eval_seq_len, args.eval_tokens)
    if args.verbose:
        print(report.to_markdown(), file=sys.stderr)
    _print_quantize_summary(summary, saved["file_bytes"])
    if args.prompt:
        print(f"\n{args.prompt}", end="", flush=True)
        summary["generate"] = generate(model, tokenizer, args.prompt, args.max_new_tokens)
        print(f"[{summary['generate']['new_tokens']} tokens, {summary['generate']['tokens_per_s']:.1f} tokens/s]")
    return summary


def _print_quantize_summary(s: dict, file_bytes: int) -> None:
    print(f"\nquantized {s['model']} -> {s['out']}: {s['bits']:g} bits requested, code bits {s['code_bits']:.3f}, "
          f"effective bits {s['effective_bits']:.3f} (quantized layers), {s['quantize_seconds']:.0f} s")
    print("| model | weights (MB) | perplexity |\n|---|---|---|")
    fp_ppl = f"{s['fp_perplexity']:.2f}" if "fp_perplexity" in s else "-"
    q_ppl = f"{s['perplexity']:.2f} ({s['perplexity'] / s['fp_perplexity']:.2f}x)" if "perplexity" in s else "-"
    print(f"| FP ({s['model']}) | {s['fp_bytes'] / 1e6:.1f} | {fp_ppl} |")
    print(f"| CMPQ {s['bits']:g} bits | {file_bytes / 1e6:.1f} (CMPQ layers {s['bytes_on_disk']['quantized'] / 1e6:.1f}) "
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
    qconfig, layers = checkpoint.read_layers(args.directory, verify=not args.no_verify)
    layers = {name: layers[name] for name in sorted(layers, key=_natural_key)}  # config.json keys are sorted as text
    rows = layer_rows(layers)
    print(rows_markdown(rows))
    sizes = checkpoint.checkpoint_bytes(args.directory)
    print(f"on disk: {sizes['weights']:,} bytes model.safetensors ({sizes['quantized']:,} in CMPQ layers), "
          f"{sizes['total']:,} bytes in the directory")
    settings = qconfig.get("settings")
    if settings:
        print("settings: " + json.dumps(settings, sort_keys=True))
    if args.png:
        plot_bits(layers, args.png)
        print(f"wrote {args.png}")
    return {"layers": rows, "bytes": sizes, "quantization_config": {k: v for k, v in qconfig.items() if k != "modules"}}


def _natural_key(name: str) -> list:
    """``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def cmd_bench(args: argparse.Namespace) -> dict:
    device = args.device or default_device()
    script = Path(__file__).resolve().parent.parent / "bench" / ("bench_gpu.py" if device == "cuda" else "bench_cpu.py")
    if not script.is_file():
        raise UsageError(f"{script} not found: the benchmarks ship with the source tree (git clone + pip install -e .)")
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

    q = sub.add_parser("quantize", help="quantize a causal LM and save a CMPQ checkpoint")
    q.add_argument("--model", required=True, help=model_help)
    q.add_argument("--bits", type=float, default=3.0, help="average code bits per weight, 2.0-4.0 (default 3)")
    q.add_argument("--calib", required=True, help=f"calibration text file or {'/'.join(BUILTIN_TEXTS)}")
    q.add_argument("--out", required=True, help="output directory (written atomically)")
    q.add_argument("--allocator", choices=("greedy", "cmpq"), default="greedy",
                   help="greedy: estimated error (default, measured better); cmpq: the paper's salience rule")
    q.add_argument("--budget", choices=("layer", "global"), default="layer")
    q.add_argument("--codebook-rows", type=int, default=4, help="output rows sharing a codebook (default 4)")
    q.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    q.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--no-error-feedback", action="store_true", help="skip GPTQ-style error feedback")
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

    b = sub.add_parser("bench", help="kernel microbenchmarks (bench/bench_cpu.py or bench/bench_gpu.py)")
    b.add_argument("--device", choices=("cpu", "cuda"))
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the benchmark script (e.g. --quick)")
    b.set_defaults(func=cmd_bench)

    for p in (q, e, g, i):
        p.add_argument("--json", help="also write the result as JSON to this file")
    return parser


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
