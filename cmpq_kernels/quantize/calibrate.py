"""Calibration: text -> token windows -> per-block inputs -> per-linear activation statistics.

The model is processed block by block (docs/DESIGN.md §1.1): the inputs of block 0 (and the keyword arguments
every block receives: attention masks, position embeddings, which may differ per block, e.g. Gemma3's
sliding/full layers) are captured once by temporarily replacing the blocks with recording stubs; a block
is then run on its own over the stored hidden states, with hooks on its ``nn.Linear`` modules recording
``s2`` (mean x^2 per input channel), ``amax`` and optionally ``X^T X / n``. Only one block's activations
are alive at a time.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..progress import progress

Calibration = Union[str, os.PathLike, Sequence[str], Iterable[Any]]
_BLOCK_PATHS = ("model.layers", "model.language_model.layers", "model.decoder.layers", "transformer.h",
                "gpt_neox.layers", "language_model.model.layers")


@dataclasses.dataclass
class LayerStats:
    """Activation statistics of one linear layer's input over the calibration set (float64, CPU)."""

    s2: torch.Tensor  #: ``[K]`` mean of x^2 per input channel
    amax: torch.Tensor  #: ``[K]`` max |x| per input channel
    hessian: Optional[torch.Tensor]  #: ``[K, K]`` X^T X / n, when requested
    tokens: int  #: number of rows of X seen


class StatsAccumulator:
    """Running sums over one linear layer's inputs (``add`` per batch); ``finish`` gives :class:`LayerStats`."""

    def __init__(self, k: int, hessian: bool) -> None:
        self.sq = torch.zeros(k, dtype=torch.float64)
        self.amax = torch.zeros(k, dtype=torch.float64)
        self.xtx = torch.zeros(k, k, dtype=torch.float64) if hessian else None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        self.sq += x.pow(2).sum(0).double()
        self.amax = torch.maximum(self.amax, x.abs().amax(0).double())
        if self.xtx is not None:
            self.xtx += (x.T @ x).double()  # fp32 product per batch, fp64 running sum
        self.tokens += x.shape[0]

    def finish(self) -> LayerStats:
        n = max(self.tokens, 1)
        return LayerStats(self.sq / n, self.amax, None if self.xtx is None else self.xtx / n, self.tokens)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of a causal LM: ``(dotted path, ModuleList)``.

    Known paths first (Llama/Qwen2/Mistral/Gemma3: ``model.layers``), else the longest ``nn.ModuleList``
    whose entries contain ``nn.Linear`` modules. Raises ``ValueError`` when there is none.
    """
    for path in _BLOCK_PATHS:
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList) and len(module):
            return path, module
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)
             and any(isinstance(sub, nn.Linear) for sub in m[0].modules())]
    if not found:
        raise ValueError(f"unsupported model {type(model).__name__}: no list of decoder blocks with nn.Linear "
                         f"layers found (looked for {', '.join(_BLOCK_PATHS)})")
    return max(found, key=lambda item: len(item[1]))


def calibration_ids(calibration: Calibration, tokenizer: Any = None, n_samples: int = 128, seq_len: int = 512,
                    seed: int = 0) -> torch.Tensor:
    """Token windows ``[n, seq_len]`` (int64) for calibration.

    Args:
        calibration: a list of strings, a path to a UTF-8 text file, or an iterable (e.g. a DataLoader)
            of ``input_ids`` tensors / dicts holding ``"input_ids"``.
        tokenizer: a Hugging Face tokenizer; needed for text.
        n_samples: windows wanted; fewer are returned when the text is too short for that many
            non-overlapping windows. At least one full window of ``seq_len`` tokens is required.
        seq_len: tokens per window.
        seed: picks which non-overlapping windows are used when there are more than ``n_samples``.
    """
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples}, {seq_len}")
    if isinstance(calibration, (str, os.PathLike)):
        if not os.path.isfile(calibration):
            raise ValueError(f"calibration path {str(calibration)!r} is not a file "
                             "(pass a list of strings for raw text)")
        with open(calibration, encoding="utf-8") as f:
            calibration = [f.read()]
    try:
        items = list(calibration)
    except TypeError:
        raise TypeError(f"calibration must be a list of strings, a text-file path or an iterable of input_ids, "
                        f"got {type(calibration).__name__}") from None
    texts = [isinstance(t, str) for t in items]
    if items and all(texts):
        if tokenizer is None:
            raise ValueError("calibration is text: pass the model's tokenizer")
        ids = tokenizer("\n\n".join(items), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    elif any(texts):
        raise TypeError("calibration mixes text and token ids: pass one kind")
    else:
        ids = torch.cat([_token_ids(b) for b in items]) if items else torch.zeros(0, dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("calibration data is empty (0 tokens)")
    if int(ids.min()) < 0:
        raise ValueError(f"calibration token ids must be >= 0, got {int(ids.min())}")
    windows = ids.numel() // seq_len
    if windows == 0:  # a shorter window would silently calibrate on fewer positions than asked for
        raise ValueError(f"calibration data has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}: "
                         "give more text or a smaller seq_len")
    chosen = torch.randperm(windows, generator=torch.Generator().manual_seed(seed))[:n_samples].sort().values
    return ids[: windows * seq_len].reshape(windows, seq_len)[chosen].long()


def _token_ids(item: Any) -> torch.Tensor:
    """Flat ``input_ids`` of one calibration item (a tensor, a list of ints, or a mapping holding ``input_ids``)."""
    try:
        ids = torch.as_tensor(item["input_ids"] if isinstance(item, Mapping) else item)
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise TypeError(f"calibration item of type {type(item).__name__} is neither text nor input_ids") from None
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"calibration input_ids must be integers, got {ids.dtype}")  # .long() would truncate floats
    return ids.reshape(-1)


class _Stop(Exception):
    """Raised by the last recording stub: the rest of the model (norm, lm_head) is not needed."""


class _Recorder(nn.Module):
    """Stands in for block ``index``: records its inputs, passes hidden states through unchanged."""

    def __init__(self, inner: nn.Module, index: int, last: bool, sink: list) -> None:
        super().__init__()
        self.inner, self.index, self.last, self.sink = inner, index, last, sink

    def __getattr__(self, name: str) -> Any:
        # Model loops may read block attributes (e.g. Gemma3's attention_type); answer from the real block.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink.append((hidden.detach(), args[1:], kwargs) if self.index == 0 else (None, args[1:], kwargs))
        if self.last:
            raise _Stop
        return hidden


@dataclasses.dataclass
class BlockInputs:
    """Hidden states per calibration batch, and the extra (args, kwargs) each block gets per batch."""

    states: list[torch.Tensor]
    extras: list[list[tuple[tuple, dict]]]  # [block][batch] -> (args, kwargs)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                         batch_size: int = 8) -> BlockInputs:
    """Run the model's embedding/prologue once per batch with recording stubs in place of the blocks."""
    device = model.get_input_embeddings().weight.device  # the blocks' weights may not be loaded yet
    originals = list(blocks)
    states: list[torch.Tensor] = []
    extras: list[list[tuple[tuple, dict]]] = [[] for _ in originals]
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            sink: list = []
            for i, block in enumerate(originals):
                blocks[i] = _Recorder(block, i, i == len(originals) - 1, sink)
            try:
                model(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
            states.append(sink[0][0])
            for i, (_, args, kwargs) in enumerate(sink):
                extras[i].append((args, kwargs))
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return BlockInputs(states, extras)


def run_block(block: nn.Module, inputs: BlockInputs, index: int) -> list[torch.Tensor]:
    """Outputs of ``block`` (number ``index``) for every stored batch."""
    outs = []
    with torch.no_grad():
        for hidden, (args, kwargs) in zip(inputs.states, inputs.extras[index]):
            out = block(hidden, *args, **kwargs)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


def linear_layers(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside ``module`` by dotted name (``prefix`` prepended)."""
    return {f"{prefix}{name}": m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def block_stats(block: nn.Module, inputs: BlockInputs, index: int, prefix: str = "",
                hessian: bool = False) -> tuple[dict[str, LayerStats], list[torch.Tensor]]:
    """Statistics of every linear in ``block`` over the stored batches, and the block's outputs."""
    accs, handles = {}, []
    for name, lin in linear_layers(block, prefix).items():
        accs[name] = acc = StatsAccumulator(lin.in_features, hessian)
        handles.append(lin.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
    try:
        outs = run_block(block, inputs, index)
    finally:
        for h in handles:
            h.remove()
    return {name: acc.finish() for name, acc in accs.items()}, outs


def calibrate(model: nn.Module, calibration: Calibration, *, tokenizer: Any = None, n_samples: int = 128,
              seq_len: int = 512, seed: int = 0, hessian: bool = False, batch_size: int = 8,
              show_progress: bool = True) -> dict[str, LayerStats]:
    """Statistics of every linear in the decoder blocks of the (unmodified, FP) model, by module name."""
    ids = calibration_ids(calibration, tokenizer, n_samples, seq_len, seed)
    path, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, ids, batch_size)
    result: dict[str, LayerStats] = {}
    for i, block in enumerate(progress(blocks, "calibrate", enabled=show_progress)):
        stats, inputs.states = block_stats(block, inputs, i, f"{path}.{i}.", hessian)
        result.update(stats)
    return result
