"""Quantize every decoder-block linear of a Hugging Face causal LM with CMPQ, block by block (GPTQ-style).

For each block: record activation statistics of its linears over the calibration batch (inputs come
from the already-quantized previous blocks), quantize each linear and replace it in place with a
:class:`~cmpq_kernels.nn.CMPQLinear`, then run the quantized block to make the next block's inputs.
The model is held in memory whole (it is modified in place); the calibration activations are held for one
block at a time. :class:`BlockHooks` let a caller bring each block in from disk and write it out again
(:mod:`cmpq_kernels.from_disk`), so that only one block is ever resident.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from ..format import GROUP_CODES, check_in_features
from ..nn import CMPQLinear
from ..progress import progress as progress_iter
from ..surgery import replace_module
from .allocate import (allocate, channel_scores, check_bits, group_upgrade_gains, select_upgrades,
                       widths_from_upgrades)
from .auto import choose
from .budget import check_budget, plan_global, plan_widths
from .calibrate import (Calibration, LayerStats, StatsAccumulator, block_stats, calibrate, calibration_ids,
                        capture_block_inputs, find_blocks, linear_layers, run_block)
from .layer import quantize_weight
from .options import QuantOptions

#: ``(name, linear, stats, widths or None) -> (replacement module, report fields)``; the fields must
#: include ``code_bits``, ``effective_bits`` and ``nnz`` (and may override ``bits``). A ``None`` module leaves the
#: layer in floating point, unreported. Lets baselines and MixLLM share the calibration pipeline.
LayerQuantizer = Callable[[str, nn.Linear, LayerStats, Optional[torch.Tensor]], tuple[nn.Module, dict]]


def _nothing(index: int, block: nn.Module) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class BlockHooks:
    """Where a block's weights come from and go to, for models that are not held in memory whole.

    ``load(i, block)`` runs before block ``i`` is calibrated (e.g. materialise its weights from disk);
    ``done(i, block)`` after it is quantized and has produced the next block's inputs (e.g. write its packed
    tensors and free it). Whole-model budgets (``budget="global"``) and ``quantize_lm_head`` need every block
    at once and are refused with hooks.
    """

    load: Callable[[int, nn.Module], None] = _nothing
    done: Callable[[int, nn.Module], None] = _nothing


@dataclasses.dataclass
class QuantReport:
    """What :func:`quantize_model` did: one entry per layer, model-wide averages, seconds per stage."""

    bits: float
    layers: list[dict]
    stage_seconds: dict[str, float]
    settings: dict

    @property
    def weights(self) -> int:
        """Quantized weights in total."""
        return sum(l["shape"][0] * l["shape"][1] for l in self.layers)

    def average(self, field: str) -> float:
        """Weight-count weighted average of a per-layer field (``effective_bits``, ``code_bits``)."""
        return sum(l[field] * l["shape"][0] * l["shape"][1] for l in self.layers) / max(self.weights, 1)

    @property
    def effective_bits(self) -> float:
        """Model-wide stored bits per quantized weight (codes, codebooks, outliers, perm)."""
        return self.average("effective_bits")

    @property
    def code_bits(self) -> float:
        """Model-wide average code width."""
        return self.average("code_bits")

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {"bits": self.bits, "effective_bits": self.effective_bits, "code_bits": self.code_bits,
                "weights": self.weights, "stage_seconds": self.stage_seconds, "settings": self.settings,
                "layers": self.layers}

    def to_markdown(self) -> str:
        """A per-layer table plus the model-wide line."""
        lines = ["| layer | shape | bits | code bits | effective bits | outliers | s |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {l['name']} | {l['shape'][0]}x{l['shape'][1]} | {l['bits']:g} | {l['code_bits']:.3f} | "
                  f"{l['effective_bits']:.3f} | {l['nnz']} | {l['seconds']:.2f} |" for l in self.layers]
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items())
        lines.append(f"\nmodel: {self.weights} weights, code bits {self.code_bits:.3f}, "
                     f"effective bits {self.effective_bits:.3f}; {stages}")
        return "\n".join(lines)


def input_groups(names: Iterable[str], stats: dict[str, LayerStats], share: bool) -> list[list[str]]:
    """``names`` grouped by shared input (q/k/v, gate/up): layers whose input statistics are equal bit for bit were
    fed the same tensor. Each layer alone when ``share`` is False."""
    groups: list[list[str]] = []
    for name in names:
        group = next((g for g in groups if share and torch.equal(stats[g[0]].s2, stats[name].s2)), None)
        if group is None:
            groups.append([name])
        else:
            group.append(name)
    return groups


def _stacked_weight(linears: dict[str, nn.Linear], group: list[str]) -> torch.Tensor:
    return torch.cat([linears[name].weight.detach().float().cpu() for name in group])


def shared_widths(linears: dict[str, nn.Linear], stats: dict[str, LayerStats], bits: Optional[float],
                  options: QuantOptions) -> dict[str, torch.Tensor]:
    """One allocation per group of layers reading the same input, from their stacked weights (so the group shares
    one permutation and can be served as one fused matrix); single layers are left to the layer quantizer.
    Under ``options.effective_bits`` (``bits`` None) the allocation is the largest at which every layer of the
    group fits the budget; each layer's outliers then fill its own remainder."""
    widths = {}
    for group in input_groups(linears, stats, share=True):
        if len(group) < 2:
            continue
        s2 = stats[group[0]].s2
        if options.effective_bits is None:
            shared = allocate(s2, _stacked_weight(linears, group), bits, options.allocator)
        else:
            shared = plan_widths(s2, [linears[name].weight.detach().float().cpu() for name in group],
                                 options.effective_bits, options)
        widths.update(dict.fromkeys(group, shared))
    return widths


def auto_widths(linears: dict[str, nn.Linear], stats: dict[str, LayerStats], options: QuantOptions,
                chosen: dict[str, QuantOptions]) -> dict[str, torch.Tensor]:
    """Settings chosen by measured error (:func:`.auto.choose`) per group of layers reading one input (each layer
    alone unless ``options.share_input_widths``): their widths are returned, their settings written to ``chosen``."""
    widths = {}
    for group in input_groups(linears, stats, options.share_input_widths):
        st = stats[group[0]]
        best, shared, _ = choose([linears[name].weight.detach().float().cpu() for name in group], st.s2, st.hessian,
                                 options)
        widths.update(dict.fromkeys(group, shared))
        chosen.update(dict.fromkeys(group, best))
    return widths


def global_widths(linears: dict[str, nn.Linear], stats: dict[str, LayerStats], bits: float,
                  share: bool) -> dict[str, torch.Tensor]:
    """Greedy widths for all layers at once so the model-wide average code width meets ``bits``.

    Upgrade candidates of every layer compete on estimated output error saved
    (``s2 * ||W[:, k]||^2 * 4^-b``, comparable across layers) per stored bit. With ``share``, layers reading
    the same input compete as one stacked layer and get one allocation.
    """
    return global_allocation(linears, stats, share)(check_bits(bits))


def global_allocation(linears: dict[str, nn.Linear], stats: dict[str, LayerStats],
                      share: bool) -> Callable[[float], dict[str, torch.Tensor]]:
    """:func:`global_widths` as a function of the code-bit target, with the upgrade gains computed once (the
    effective-bit budget evaluates it at many targets)."""
    groups = input_groups(linears, stats, share)
    orders, gains, costs = [], [], []
    for group in groups:
        w = _stacked_weight(linears, group)
        order, g = group_upgrade_gains(channel_scores(stats[group[0]].s2, w))
        orders.append(order)
        gains.append(g)
        costs.append(float(GROUP_CODES * w.shape[0]))
    weights = sum(lin.weight.numel() for lin in linears.values())

    def widths(bits: float) -> dict[str, torch.Tensor]:
        upgrades = select_upgrades(gains, costs, (bits - 2.0) * weights)
        return {name: widths_from_upgrades(order, u) for group, order, u in zip(groups, orders, upgrades)
                for name in group}

    return widths


def cmpq_layer_quantizer(bits: Optional[float], options: QuantOptions,
                         per_layer: Optional[Mapping[str, QuantOptions]] = None) -> LayerQuantizer:
    """The default :data:`LayerQuantizer`: :func:`quantize_weight` -> :class:`CMPQLinear`. ``bits`` is None under
    ``options.effective_bits``; ``per_layer`` (layer name -> settings) replaces ``options`` for the layers it names
    (a model-wide budget's share of each layer, or the settings chosen for it by measured error)."""

    def quantize(name: str, linear: nn.Linear, stats: LayerStats,
                 widths: Optional[torch.Tensor]) -> tuple[nn.Module, dict]:
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        opts = (per_layer or {}).get(name, options)
        layer = quantize_weight(linear.weight, stats.s2, bits, opts, hessian=stats.hessian, widths=widths,
                                bias=bias)
        module = CMPQLinear(layer).to(linear.weight.device)
        return module, {"code_bits": layer.code_bits, "effective_bits": layer.effective_bits, "nnz": layer.nnz,
                        "allocator": opts.allocator, "codebook_rows": layer.codebook_rows}

    return quantize


def _check_linears(linears: dict[str, nn.Linear]) -> None:
    for name, lin in linears.items():
        try:
            check_in_features(lin.in_features)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None


def check_finite(model: nn.Module) -> None:
    """Refuse NaN/Inf parameters up front, by name: later they surface only as NaN statistics, mid-way."""
    for name, param in model.named_parameters():
        if not param.is_floating_point() or param.is_meta:
            continue
        if not all(bool(torch.isfinite(chunk).all()) for chunk in param.detach().reshape(-1).split(1 << 24)):
            raise ValueError(f"{name}: contains NaN or Inf; cannot quantize a model with non-finite weights")


def check_token_ids(model: nn.Module, ids: torch.Tensor) -> None:
    """Calibration ids past the embedding table (a tokenizer of another model) would fail with a bare IndexError."""
    try:
        vocab = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):  # no plain embedding table to check against
        return
    if int(ids.max()) >= vocab:
        raise ValueError(f"calibration token id {int(ids.max())} is outside the model's vocabulary of {vocab} "
                         "(a tokenizer of another model?)")


def _quantize_linears(root: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, LayerStats], bits: float,
                      quantizer: LayerQuantizer, widths: dict[str, torch.Tensor], records: list[dict]) -> None:
    for name, lin in linears.items():
        start = time.perf_counter()
        try:
            module, info = quantizer(name, lin, stats[name], widths.get(name))
        except ValueError as err:  # say which layer: the quantizer sees only a weight and its statistics
            raise ValueError(f"{name}: {err}") from err
        if module is None:  # the quantizer leaves this layer in floating point
            continue
        replace_module(root, name, module)
        records.append({"name": name, "shape": [lin.out_features, lin.in_features], "bits": bits, **info,
                        "seconds": time.perf_counter() - start})


@torch.no_grad()
def quantize_model(model: nn.Module, calibration: Calibration, bits: Optional[float] = None,
                   options: Optional[QuantOptions] = None,
                   *, tokenizer: Any = None, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                   quantize_lm_head: bool = False, batch_size: int = 8, progress: bool = True,
                   layer_quantizer: Optional[LayerQuantizer] = None, hooks: Optional[BlockHooks] = None,
                   **overrides: Any) -> QuantReport:
    """Quantize every ``nn.Linear`` in the decoder blocks of ``model`` in place; return a :class:`QuantReport`.

    Holds the whole model in memory (it is modified in place); the calibration activations are kept for one
    block at a time.

    Args:
        model: a Hugging Face causal LM (Llama, Qwen2, Mistral, Gemma3, ...) in eval mode.
        calibration: list of strings, a text-file path, or an iterable of ``input_ids`` (see
            :func:`~.calibrate.calibration_ids`).
        bits: average code bits per weight in [2, 4] (default 2.5); ``effective_bits`` in the report adds the
            overheads. Leave it None when ``options.effective_bits`` sets the budget in stored bits instead (per
            layer, or model-wide with ``budget="global"``; the report's ``bits`` is then that budget).
        options: quantizer settings (:class:`QuantOptions`; defaults when None). ``budget="global"`` allocates
            from the FP model's statistics in one extra pass; ``error_feedback`` records ``X^T X`` per layer.
        tokenizer: needed when ``calibration`` is text.
        n_samples, seq_len, seed: calibration windows (count, length, which ones).
        quantize_lm_head: also quantize the output projection (off by default; unties tied embeddings).
        batch_size: calibration sequences per forward pass.
        progress: show progress bars.
        layer_quantizer: replaces the CMPQ layer quantizer (baselines sharing this pipeline).
        hooks: per-block load / done callbacks (:class:`BlockHooks`) for a model whose blocks are not in memory
            (used by :func:`cmpq_kernels.from_disk.quantize_checkpoint`).
        **overrides: fields of :class:`QuantOptions` (``allocator="cmpq"``, ``codebook_rows=1``, ...).
    """
    opts = QuantOptions.resolve(options, overrides)
    target = opts.effective_bits
    if target is not None and bits is not None:
        raise ValueError("give bits (code bits) or effective_bits (stored bits), not both")
    if target is not None and layer_quantizer is not None:
        raise ValueError("effective_bits budgets CMPQ layers; a custom layer_quantizer takes bits")
    if target is None:
        bits = check_bits(2.5 if bits is None else bits)
    quantizer = layer_quantizer or cmpq_layer_quantizer(bits, opts)
    if hooks is not None and (opts.budget == "global" or quantize_lm_head):
        raise ValueError("budget='global' and quantize_lm_head need the whole model in memory; they are not "
                         "available block by block (from a checkpoint directory)")
    times = {"capture": 0.0, "allocate": 0.0, "statistics": 0.0, "quantize": 0.0, "propagate": 0.0}
    start = time.perf_counter()
    ids = calibration_ids(calibration, tokenizer, n_samples, seq_len, seed)
    path, blocks = find_blocks(model)
    # Every check that can fail runs before the first layer is replaced: no half-quantized model on error.
    _check_linears(linear_layers(blocks, f"{path}."))
    if quantize_lm_head:
        _output_projection(model)
    if target is not None and opts.budget == "layer":
        checked = dict(linear_layers(blocks, f"{path}."))
        if quantize_lm_head:
            checked.update([_output_projection(model)])
        for name, lin in checked.items():
            check_budget(name, lin.out_features, lin.in_features, target, opts)
    check_finite(model)
    check_token_ids(model, ids)
    widths: dict[str, torch.Tensor] = {}
    if opts.budget == "global":
        fp_stats = calibrate(model, [ids], n_samples=n_samples, seq_len=seq_len, seed=seed, batch_size=batch_size,
                             show_progress=progress)
        linears = linear_layers(blocks, f"{path}.")
        if target is None:
            widths = global_widths(linears, fp_stats, bits, opts.share_input_widths)
        else:
            shapes = {name: (lin.out_features, lin.in_features) for name, lin in linears.items()}
            widths, targets = plan_global(global_allocation(linears, fp_stats, opts.share_input_widths), shapes,
                                          target, opts)
            # The output projection is outside the model-wide plan: it gets the budget itself.
            quantizer = cmpq_layer_quantizer(None, opts, {name: opts.with_overrides(effective_bits=t)
                                                          for name, t in targets.items()})
        times["allocate"] = time.perf_counter() - start
    block_widths = None
    if opts.automatic:
        chosen: dict[str, QuantOptions] = {}
        quantizer = cmpq_layer_quantizer(None, opts, chosen)
        block_widths = lambda linears, stats: auto_widths(linears, stats, opts, chosen)  # noqa: E731
    elif opts.share_input_widths and opts.budget == "layer":
        block_widths = lambda linears, stats: shared_widths(linears, stats, bits, opts)  # noqa: E731
    records = quantize_blocks(model, ids, quantizer, target or bits, times, widths=widths, block_widths=block_widths,
                              hessian=opts.error_feedback or opts.automatic, batch_size=batch_size,
                              progress=progress, hooks=hooks)
    if quantize_lm_head:
        t = time.perf_counter()
        _quantize_lm_head(model, ids, target or bits, quantizer, opts.error_feedback or opts.automatic, batch_size,
                          records)
        times["lm_head"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - start
    settings = {**opts.to_json(),
                "calibration": {"samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "seed": seed},
                "quantize_lm_head": quantize_lm_head, "custom_layer_quantizer": layer_quantizer is not None}
    return QuantReport(target or bits, records, times, settings)


def quantize_blocks(model: nn.Module, ids: torch.Tensor, quantizer: LayerQuantizer, bits: float,
                    times: dict[str, float], *, widths: Optional[dict[str, torch.Tensor]] = None,
                    block_widths: Optional[Callable[[dict, dict], dict[str, torch.Tensor]]] = None,
                    hessian: bool = True, batch_size: int = 8, progress: bool = True,
                    hooks: Optional[BlockHooks] = None) -> list[dict]:
    """The block-by-block pipeline every method shares (docs/DESIGN.md §1.1): per decoder block, activation
    statistics of its linears (``X^T X`` too when ``hessian``) over the calibration windows ``ids``, each linear
    through ``quantizer``, then the quantized block run to make the next block's inputs. Adds its stage times to
    ``times``; returns one report record per replaced layer. Widths come from ``widths`` (by layer name), or per
    block from ``block_widths(linears, stats)`` when given (shared allocations of layers reading one input)."""
    hooks = hooks or BlockHooks()
    path, blocks = find_blocks(model)
    t = time.perf_counter()
    inputs = capture_block_inputs(model, blocks, ids, batch_size)
    times["capture"] = times.get("capture", 0.0) + time.perf_counter() - t
    records: list[dict] = []
    for i, block in enumerate(progress_iter(blocks, "quantize blocks", total=len(blocks), enabled=progress)):
        t = time.perf_counter()
        hooks.load(i, block)
        stats, _ = block_stats(block, inputs, i, f"{path}.{i}.", hessian=hessian)
        times["statistics"] = times.get("statistics", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        linears = linear_layers(block, f"{path}.{i}.")
        layer_widths = block_widths(linears, stats) if block_widths else widths or {}
        _quantize_linears(model, linears, stats, bits, quantizer, layer_widths, records)
        times["quantize"] = times.get("quantize", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        inputs.states = run_block(block, inputs, i)
        hooks.done(i, block)
        times["propagate"] = times.get("propagate", 0.0) + time.perf_counter() - t
    return records


def _output_projection(model: nn.Module) -> tuple[str, nn.Linear]:
    """``(name, module)`` of the output projection, or ``ValueError`` when CMPQ cannot quantize it."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"quantize_lm_head: output projection is {type(head).__name__}, not nn.Linear")
    name = next(n for n, m in model.named_modules() if m is head)
    _check_linears({name: head})
    return name, head


def _quantize_lm_head(model: nn.Module, ids: torch.Tensor, bits: float, quantizer: LayerQuantizer,
                      hessian: bool, batch_size: int, records: list[dict]) -> None:
    """Quantize the output projection from its inputs under the already-quantized blocks (a full forward)."""
    name, head = _output_projection(model)
    acc = StatsAccumulator(head.in_features, hessian)
    handle = head.register_forward_pre_hook(lambda _m, args: acc.add(args[0]))
    device = head.weight.device
    try:
        for s in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[s:s + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    _quantize_linears(model, {name: head}, {name: acc.finish()}, bits, quantizer, {}, records)
