"""The MixLLM quantizer (arXiv 2412.14590; docs/DESIGN.md §9): global output-channel salience -> 8-bit / 4-bit rows
-> per-group clipping search -> GPTQ per part -> :class:`~cmpq_kernels.mixllm_nn.MixLLMLinear`.

1. **Salience** (:func:`channel_salience`), one forward + backward pass of the *unquantized* model per calibration
   batch on the LM loss (each sequence's mean token loss, summed over the batch, so a sequence's gradient does
   not depend on the batch size). For output channel ``c`` of a linear with input ``X`` and output gradient
   ``g``, ``s = sum_t g[t, c] * (X[t] . delta_c)`` with ``delta = RTN4(W) - W`` (which equals
   ``sum (g^T X) * delta`` over row ``c``), and ``S_c = mean over sequences of |s + s^2 / 2|`` (the paper's
   first-order + second-order estimate of the loss change; ``first_order=False`` keeps only ``|s^2 / 2|``, an
   ablation). This pass holds the whole model and its autograd graph for one batch (the models here are small).
2. **Allocation**: every output channel of every decoder linear is ranked together by ``S_c``; the top ``p`` % of
   all channels become 8-bit (``salience_scope="global"``, the paper's choice: layers that matter more get more
   8-bit rows), or, as an ablation, each layer's own top ``p`` % of its rows (``salience_scope="layer"``).
   Linears with ``min(n, k) <= min_dim`` (64) stay in floating point.
3. **Per layer**, block by block through the shared pipeline (:func:`~.model.quantize_blocks`, with ``X^T X``):
   each part (8-bit rows, 4-bit rows) gets per-row, per-group grids; a clipping search picks per row and group the
   range ratio in 0.80..1.00 (step 0.02) with the lowest ``|| X delta_g^T ||^2``; GPTQ
   (:func:`~.gptq.quantize_with_feedback`, 1 % damping, 128-column blocks) then quantizes the part with whole
   groups in descending ``mean(diag H)`` order. Unclipped grids + GPTQ are tried too, and the lower
   ``tr(dW H dW^T)`` wins (the fall-back when clipping makes the layer worse).

4-bit grids include zero in the range (``min <= 0 <= max``), so a group of constant sign or a constant group is
represented, and the zero point ``round(-min / scale)`` lands in [0, 15].
"""
from __future__ import annotations

import time
from typing import Any, Literal, Optional

import torch
from torch import nn

from ..mixllm_format import GROUP, MixLLMLayer, check_in_features, group_sizes
from ..mixllm_nn import MixLLMLinear
from ..progress import progress as progress_iter
from .calibrate import Calibration, LayerStats, calibration_ids, find_blocks, linear_layers
from .gptq import DEFAULT_DAMP, quantize_with_feedback
from .model import LayerQuantizer, QuantReport, check_finite, check_token_ids, quantize_blocks

DEFAULT_P = 10.0
MIN_DIM = 64
CLIP_RATIOS = tuple(round(1.0 - 0.02 * i, 2) for i in range(11))  # 1.00 first: ties keep the unclipped range
_FP16_MAX = 65504.0
SALIENCE_SCOPES = ("global", "layer")
SalienceScope = Literal["global", "layer"]


# ---- grids ------------------------------------------------------------------------------------------------


def _bounds(k: int) -> list[tuple[int, int]]:
    starts = [g * GROUP for g in range(len(group_sizes(k)))]
    return [(s, s + w) for s, w in zip(starts, group_sizes(k))]


def _fp16(values: torch.Tensor, what: str) -> torch.Tensor:
    if bool((values > _FP16_MAX).any()):
        raise ValueError(f"{what} above the fp16 range ({float(values.max()):.3g}): weights too large for MixLLM")
    return values.half().float()


def group_params(w: torch.Tensor, bits: int, ratio: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale [n, G] (fp16 values as float32), zero int64 [n, G])`` of ``w`` ``[n, k]`` with each group's range
    scaled by ``ratio`` (a number or ``[n, G]``). 8-bit: symmetric, ``absmax / 127``, zero 0. 4-bit: asymmetric
    over ``[min(min, 0), max(max, 0)]``, ``(max - min) / 15``, zero ``round(-min / scale)``."""
    ratio = torch.as_tensor(ratio, dtype=torch.float32).expand(w.shape[0], len(_bounds(w.shape[1])))
    scales, zeros = [], []
    for g, (lo, hi) in enumerate(_bounds(w.shape[1])):
        part, r = w[:, lo:hi], ratio[:, g]
        if bits == 8:
            scale = _fp16(part.abs().amax(1) * r / 127, "8-bit scale")
            zero = torch.zeros_like(scale, dtype=torch.int64)
        else:
            low, high = part.amin(1).clamp(max=0) * r, part.amax(1).clamp(min=0) * r
            scale = _fp16((high - low) / 15, "4-bit scale")
            zero = torch.where(scale > 0, torch.round(-low / scale.clamp(min=1e-30)), torch.zeros_like(scale))
            zero = zero.clamp(0, 15).long()
        scales.append(scale)
        zeros.append(zero)
    return torch.stack(scales, 1), torch.stack(zeros, 1)


def _per_column(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.repeat_interleave(GROUP, dim=1)[:, :k]


def rtn_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest codes (int64 ``[n, k]``) on the given grids; a zero scale gives the code of 0."""
    s, z = _per_column(scale, w.shape[1]), _per_column(zero, w.shape[1])
    q = torch.where(s > 0, torch.round(w / s.clamp(min=1e-30)), torch.zeros_like(w)).long() + z
    return q.clamp(-127, 127) if bits == 8 else q.clamp(0, 15)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - z) * s`` per column, float32."""
    k = q.shape[1]
    return (q - _per_column(zero, k)).float() * _per_column(scale, k)


def rtn4_delta(weight: torch.Tensor) -> torch.Tensor:
    """``RTN4(W) - W``: the 4-bit round-to-nearest error that the salience of each output channel is measured on."""
    w = weight.detach().float()
    scale, zero = group_params(w, 4)
    return dequantize_codes(rtn_codes(w, scale, zero, 4), scale, zero) - w


# ---- one layer ----------------------------------------------------------------------------------------------


def _group_errors(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``delta_g H_gg delta_g^T`` per row and group, ``[n, G]``."""
    return torch.stack([((delta[:, lo:hi] @ hessian[lo:hi, lo:hi]) * delta[:, lo:hi]).sum(1)
                        for lo, hi in _bounds(delta.shape[1])], 1)


def clipped_params(w: torch.Tensor, hessian: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and group, the grid among the :data:`CLIP_RATIOS` ranges whose round-to-nearest error
    ``|| X delta_g^T ||^2`` is lowest."""
    best_err = best_scale = best_zero = None
    for ratio in CLIP_RATIOS:
        scale, zero = group_params(w, bits, ratio)
        err = _group_errors(dequantize_codes(rtn_codes(w, scale, zero, bits), scale, zero) - w, hessian)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def gptq_codes(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """Codes of ``w`` on fixed per-group grids by GPTQ error feedback, whole groups in descending ``mean(diag H)``
    order (act order within groups)."""
    bounds = _bounds(w.shape[1])
    diag = torch.diagonal(hessian)
    order = sorted(range(len(bounds)), key=lambda g: -float(diag[bounds[g][0]:bounds[g][1]].mean()))
    cols = torch.cat([torch.arange(*bounds[g]) for g in order])
    group_of_column = torch.cat([torch.full((bounds[g][1] - bounds[g][0],), i) for i, g in enumerate(order)])
    levels = torch.arange(-127, 128) if bits == 8 else torch.arange(16)
    grids = [(levels[None, :] - zero[:, g:g + 1]).float() * scale[:, g:g + 1] for g in order]
    index, _ = quantize_with_feedback(w[:, cols], hessian[cols][:, cols], grids, group_of_column, damp=damp)
    codes = torch.empty_like(index)
    codes[:, cols] = index + int(levels[0])
    return codes


def quantize_part(w: torch.Tensor, hessian: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero)`` of the rows ``w`` at ``bits`` (8 or 4): GPTQ on clipped grids, or on plain grids
    when that gives a lower ``tr(dW H dW^T)``."""
    best = None
    for scale, zero in (clipped_params(w, hessian, bits), group_params(w, bits)):
        codes = gptq_codes(w, hessian, scale, zero, bits)
        delta = dequantize_codes(codes, scale, zero) - w
        err = float(((delta @ hessian) * delta).sum())
        if best is None or err < best[0]:
            best = (err, codes, scale, zero)
    return best[1], best[2], best[3]


def quantize_mixllm_weight(weight: torch.Tensor, hessian: torch.Tensor, eight_bit: torch.Tensor,
                           bias: Optional[torch.Tensor] = None) -> MixLLMLayer:
    """One linear's packed :class:`MixLLMLayer`.

    Args:
        weight: ``[n, k]`` (``k % 32 == 0``).
        hessian: ``X^T X / tokens`` ``[k, k]`` of the layer's calibration inputs.
        eight_bit: bool ``[n]``, the output rows to keep at 8 bits.
        bias: optional ``[n]``, stored as given.
    """
    w = weight.detach().float().cpu()
    n, k = w.shape
    check_in_features(k)
    if eight_bit.shape != (n,) or eight_bit.dtype != torch.bool:
        raise ValueError(f"eight_bit: need a bool mask of {n} rows, got {eight_bit.dtype} {tuple(eight_bit.shape)}")
    h = hessian.float().cpu()
    rows8, rows4 = eight_bit.nonzero().reshape(-1), (~eight_bit).nonzero().reshape(-1)
    g = len(_bounds(k))
    parts = {}
    for bits, rows in ((8, rows8), (4, rows4)):
        if rows.numel():
            parts[bits] = quantize_part(w[rows], h, bits)
        else:
            parts[bits] = (torch.zeros(0, k, dtype=torch.int64), torch.zeros(0, g), torch.zeros(0, g, dtype=torch.int64))
    (q8, s8, _), (q4, s4, z4) = parts[8], parts[4]
    return MixLLMLayer.from_codes(idx8=rows8, q8=q8, s8=s8, idx4=rows4, q4=q4, s4=s4, z4=z4, bias=bias)


# ---- the model ----------------------------------------------------------------------------------------------


def eligible(linear: nn.Linear, min_dim: int = MIN_DIM) -> bool:
    """Whether MixLLM quantizes this linear (``min(n, k) > min_dim``); smaller ones stay in floating point."""
    return min(linear.in_features, linear.out_features) > min_dim


def _check_first_order(first_order: bool) -> None:
    if not isinstance(first_order, bool):  # a truthy string or 0/1 would silently pick a formula
        raise TypeError(f"first_order must be a bool, got {type(first_order).__name__} {first_order!r}")


def channel_salience(model: nn.Module, linears: dict[str, nn.Linear], ids: torch.Tensor, batch_size: int = 4,
                     progress: bool = True, first_order: bool = True) -> dict[str, torch.Tensor]:
    """``S_c`` (float64 ``[n]``) per linear by name, from one forward + backward pass per batch of ``ids`` through
    the unquantized ``model`` (see the module docstring): ``|s + s^2 / 2|`` per sequence, or ``|s^2 / 2|`` without
    the first-order term (``first_order=False``). Holds the whole model and one batch's autograd graph;
    parameters get no gradients (their ``requires_grad`` flags are restored)."""
    _check_first_order(first_order)
    deltas = {name: rtn4_delta(lin.weight) for name, lin in linears.items()}
    totals = {name: torch.zeros(lin.out_features, dtype=torch.float64) for name, lin in linears.items()}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            if not output.requires_grad:  # a branch the loss does not reach
                return

            def on_grad(grad: torch.Tensor) -> None:
                d = x.float() @ deltas[name].to(x.device).T  # [batch, tokens, n]
                s = (grad.float() * d).sum(1).double().cpu()  # per sequence and channel
                totals[name] += ((s if first_order else 0.0) + 0.5 * s * s).abs().sum(0)
            output.register_hook(on_grad)
        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [lin.register_forward_hook(record(name)) for name, lin in linears.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_()))
    device = model.get_input_embeddings().weight.device
    try:
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for start in progress_iter(range(0, ids.shape[0], batch_size), "salience", enabled=progress):
                batch = ids[start:start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits.float()
                loss = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")
                loss.mean(1).sum().backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {name: t / ids.shape[0] for name, t in totals.items()}


def check_p(p: float) -> float:
    """``p`` as a float, or ``ValueError`` unless it is a percentage."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 100:
        raise ValueError(f"p: percentage of 8-bit output channels must be a number in [0, 100], got {p!r}")
    return float(p)


def check_scope(scope: str) -> SalienceScope:
    """``scope`` unchanged, or ``ValueError`` unless it is one of :data:`SALIENCE_SCOPES`."""
    if scope not in SALIENCE_SCOPES:
        raise ValueError(f"salience_scope must be one of {SALIENCE_SCOPES}, got {scope!r}")
    return scope


def _top(values: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask of the ``round(p / 100 * len)`` largest ``values``."""
    chosen = torch.zeros(values.numel(), dtype=torch.bool)
    chosen[torch.topk(values, round(p / 100 * values.numel())).indices] = True
    return chosen


def select_eight_bit(salience: dict[str, torch.Tensor], p: float,
                     scope: SalienceScope = "global") -> dict[str, torch.Tensor]:
    """Bool masks of the output channels kept at 8 bits, by salience: the top ``p`` % of all channels of all layers
    (``round(p / 100 * channels)`` of them) for ``scope="global"``, or each layer's own top ``p`` %
    (``round(p / 100 * n)`` rows of every layer) for ``scope="layer"``."""
    p, scope = check_p(p), check_scope(scope)
    if scope == "layer":
        return {name: _top(s, p) for name, s in salience.items()}
    names = list(salience)
    chosen = _top(torch.cat([salience[n] for n in names]), p)
    return dict(zip(names, chosen.split([salience[n].numel() for n in names])))


def mixllm_layer_quantizer(eight_bit: dict[str, torch.Tensor], act_bits: int = 8) -> LayerQuantizer:
    """The :data:`~.model.LayerQuantizer` of MixLLM: layers named in ``eight_bit`` become :class:`MixLLMLinear`,
    the rest stay as they are."""

    def quantize(name: str, linear: nn.Linear, stats: LayerStats, _widths: Any) -> tuple[Optional[nn.Module], dict]:
        if name not in eight_bit:
            return None, {}
        if stats.hessian is None:
            raise ValueError("MixLLM needs the layer's X^T X (calibration with hessian=True)")
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        layer = quantize_mixllm_weight(linear.weight, stats.hessian, eight_bit[name], bias)
        info = {"bits": layer.code_bits, "code_bits": layer.code_bits, "effective_bits": layer.effective_bits,
                "nnz": 0, "rows_8bit": layer.n8}
        return MixLLMLinear(layer, act_bits).to(linear.weight.device), info

    return quantize


@torch.no_grad()
def quantize_model_mixllm(model: nn.Module, calibration: Calibration, p: float = DEFAULT_P, *, tokenizer: Any = None,
                          n_samples: int = 128, seq_len: int = 512, seed: int = 0, act_bits: int = 8,
                          min_dim: int = MIN_DIM, batch_size: int = 8, salience_batch_size: int = 4,
                          salience_scope: SalienceScope = "global", first_order: bool = True,
                          progress: bool = True) -> QuantReport:
    """Quantize the decoder-block linears of ``model`` with MixLLM in place; return a :class:`~.model.QuantReport`.

    Holds the whole model in memory, and during the salience pass its autograd graph for one batch of
    ``salience_batch_size`` windows (fine for the small models this package evaluates).

    Args:
        model: a Hugging Face causal LM in eval mode (float32 recommended: the salience pass backpropagates).
        calibration: list of strings, a text-file path, or ``input_ids`` (:func:`~.calibrate.calibration_ids`).
        p: percentage of all eligible output channels kept at 8 bits (0 = W4A8, 10 = W4.4A8, 100 = W8A8).
        tokenizer, n_samples, seq_len, seed: as for :func:`~.model.quantize_model`.
        act_bits: 8 (activations quantized in the op) or 16 (weight-only) for the returned modules.
        min_dim: linears with ``min(n, k) <= min_dim`` stay in floating point.
        batch_size: windows per forward pass of the block-by-block calibration.
        salience_batch_size: windows per forward + backward pass of the salience pass.
        salience_scope: ``"global"`` ranks all channels of all layers together (the paper); ``"layer"`` keeps each
            layer's own top ``p`` % of rows at 8 bits (an ablation).
        first_order: include the first-order term in the salience, ``|s + s^2 / 2|`` (the paper); ``False`` ranks by
            ``|s^2 / 2|`` alone (an ablation).
        progress: show progress bars.
    """
    if act_bits not in (8, 16):
        raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
    check_scope(salience_scope)
    _check_first_order(first_order)
    times: dict[str, float] = {}
    start = time.perf_counter()
    ids = calibration_ids(calibration, tokenizer, n_samples, seq_len, seed)
    path, blocks = find_blocks(model)
    linears = {name: lin for name, lin in linear_layers(blocks, f"{path}.").items() if eligible(lin, min_dim)}
    if not linears:
        raise ValueError(f"no decoder linear has min(out_features, in_features) > {min_dim}: nothing to quantize")
    for name, lin in linears.items():  # every check runs before the first layer is replaced
        try:
            check_in_features(lin.in_features)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    check_finite(model)
    check_token_ids(model, ids)
    p = check_p(p)
    salience = channel_salience(model, linears, ids, salience_batch_size, progress, first_order)
    eight_bit = select_eight_bit(salience, p, salience_scope)
    times["salience"] = time.perf_counter() - start
    records = quantize_blocks(model, ids, mixllm_layer_quantizer(eight_bit, act_bits), 4 + 4 * p / 100, times,
                              hessian=True, batch_size=batch_size, progress=progress)
    times["total"] = time.perf_counter() - start
    settings = {"method": "mixllm", "p": p, "act_bits": act_bits, "min_dim": min_dim, "group": GROUP,
                "salience_scope": salience_scope, "first_order": first_order,
                "clip_ratios": list(CLIP_RATIOS), "damp": DEFAULT_DAMP,
                "calibration": {"samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "seed": seed}}
    return QuantReport(4 + 4 * p / 100, records, times, settings)
