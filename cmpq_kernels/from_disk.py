"""Quantize a model that need not fit in memory: a Hugging Face checkpoint directory in, a CMPQ checkpoint out.

:func:`quantize_checkpoint` builds the model's skeleton on the ``meta`` device, checks every tensor of the
source files against it from their headers, and materialises only the embeddings, the final norm / output
head and one decoder block at a time: each block is loaded from its shards, calibrated, quantized, run to
make the next block's inputs, written to the output shards and freed (:class:`~.quantize.model.BlockHooks`).
Resident memory is therefore about one FP32 block, its linears' ``X^T X`` accumulators, the calibration
activations and the non-block tensors (see :func:`memory_estimate`), whatever the model's size.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
from typing import Any, Optional

import torch
from torch import nn

from .checkpoint import (CONFIG_NAME, QUANT_METHOD, assign_tensor, build_skeleton, checkpoint_tensors, digest_record,
                         fill_tied, layer_entry, model_dtype, new_writer, quantization_config, staged_directory,
                         write_config)
from .quantize import QuantOptions, QuantReport, quantize_model
from .quantize.calibrate import Calibration, find_blocks, linear_layers
from .quantize.model import BlockHooks
from .shards import DEFAULT_SHARD_BYTES, Header, TensorFiles
from .surgery import quantized_modules

#: peak temporary memory of quantize_weight in multiples of the layer's FP32 weight (measured: +240-270 MB for a
#: 16 MB 4096x1024 or 1024x4096 weight at 3 bits; int64 codes, masks and sort temporaries across its stages).
QUANTIZER_WORKING_SET = 17

#: files of a model directory that travel with the weights unchanged (tokenizer, generation settings).
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def read_source_config(directory: str) -> dict:
    """``config.json`` of an unquantized Hugging Face model directory."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; not a model directory")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    quant = config.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ValueError(f"{path}: the model is already quantized (quant_method {method!r}); "
                         f"{'it is a CMPQ checkpoint' if method == QUANT_METHOD else 'start from the FP model'}")
    return config


def _ties(model: nn.Module) -> dict[str, str]:
    """transformers' tied weights of ``model``: ``{target: source}`` (e.g. ``lm_head.weight`` -> the embeddings)."""
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def _expected_tensors(model: nn.Module, header: Header, ties: dict[str, str]) -> dict[str, torch.Tensor]:
    """The skeleton's state tensors the source files must hold (a tied target may be left out), checked against
    the headers for presence and shape before anything is read."""
    state = model.state_dict()
    expected = {k: t for k, t in state.items() if not (k in ties and k not in header)}
    missing = sorted(k for k in expected if k not in header)
    unexpected = sorted(k for k in header if k not in state)
    if missing or unexpected:
        raise ValueError(f"model files do not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in expected.items():
        if tuple(header[key][0]) != tuple(tensor.shape):
            raise ValueError(f"model files do not match config.json: {key} is {list(header[key][0])} in the file, "
                             f"{list(tensor.shape)} in the model built from config.json")
    return expected


def memory_estimate(model: nn.Module, expected: dict[str, torch.Tensor], block_path: str, n_samples: int,
                    seq_len: int, error_feedback: bool) -> dict[str, int]:
    """Predicted resident bytes of :func:`quantize_checkpoint` by part (FP32 compute copies)."""
    _, blocks = find_blocks(model)
    block_bytes = max(sum(p.numel() * 4 for p in block.parameters()) for block in blocks)
    linears = [lin for block in blocks for lin in linear_layers(block).values()]
    hessian_bytes = max(sum(lin.in_features ** 2 * 8 for lin in linear_layers(block).values()) for block in blocks)
    hidden = model.get_input_embeddings().weight.shape[1]
    resident = sum(t.numel() * 4 for k, t in expected.items() if not k.startswith(block_path))
    parts = {"one_block_fp32": block_bytes, "xtx_accumulators": hessian_bytes if error_feedback else 0,
             "quantizer_working_set": QUANTIZER_WORKING_SET * max(lin.weight.numel() * 4 for lin in linears),
             "activations": 3 * n_samples * seq_len * hidden * 4,  # states, block outputs, one layer's input copy
             "embeddings_and_head_fp32": resident}
    return {**parts, "total": sum(parts.values())}


def quantize_checkpoint(source: str, out: str, calibration: Calibration, bits: Optional[float] = None,
                        options: Optional[QuantOptions] = None, *, tokenizer: Any = None, n_samples: int = 128,
                        seq_len: int = 512, seed: int = 0, batch_size: int = 8, progress: bool = True,
                        overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                        max_memory_bytes: Optional[int] = None, **overrides: Any) -> QuantReport:
    """Quantize the Hugging Face model in directory ``source`` (``model.safetensors`` or shards + index) into the
    CMPQ checkpoint directory ``out``, one decoder block in memory at a time.

    Args:
        source: a local model directory (config.json + safetensors); BF16/FP16/FP32 weights.
        out: the checkpoint directory to write (staged, renamed into place when complete).
        calibration, bits, options, tokenizer, n_samples, seq_len, seed, batch_size, progress, **overrides:
            as for :func:`~cmpq_kernels.quantize.quantize_model` (``budget="global"`` is not available here).
        overwrite: replace an existing ``out``.
        max_shard_bytes: largest output weights file.
        max_memory_bytes: refuse to start (``MemoryError`` naming the parts) when :func:`memory_estimate` says
            more would be resident.

    Returns the :class:`QuantReport`; its ``memory_estimate`` entry in ``settings`` is not written to the file.
    Fixes glibc's mmap threshold for the rest of the process (:func:`bound_heap_growth`).
    """
    source = os.fspath(source)
    config = read_source_config(source)
    opts = QuantOptions.resolve(options, overrides)
    bound_heap_growth()
    with TensorFiles(source) as files:
        model = build_skeleton(config, torch.float32)  # weights are computed on in FP32, stored as in the source
        path, _ = find_blocks(model)
        block_path = f"{path}."
        ties = _ties(model)
        expected = _expected_tensors(model, files.header, ties)
        estimate = memory_estimate(model, expected, block_path, n_samples, seq_len, opts.error_feedback)
        if max_memory_bytes is not None and estimate["total"] > max_memory_bytes:
            raise MemoryError(f"quantizing {source} block by block needs about {estimate['total'] / 1e9:.2f} GB "
                              f"({', '.join(f'{k} {v / 1e9:.2f}' for k, v in estimate.items() if k != 'total')}), "
                              f"more than max_memory_bytes={max_memory_bytes / 1e9:.2f} GB: lower n_samples/seq_len")
        resident = [k for k in expected if not k.startswith(block_path)]
        for key in resident:
            assign_tensor(model, key, _finite(files, key))
        aliases = {target: src for target, src in ties.items() if target not in files.header}
        fill_tied(model, aliases)
        with staged_directory(out, overwrite) as staging:
            writer = new_writer(staging, max_shard_bytes)
            entries: dict[str, dict] = {}

            def load(index: int, block: nn.Module) -> None:
                prefix = f"{block_path}{index}."
                for key in (k for k in expected if k.startswith(prefix)):
                    assign_tensor(model, key, _finite(files, key))

            def done(index: int, block: nn.Module) -> None:
                prefix = f"{block_path}{index}."
                tensors, _ = checkpoint_tensors(block, prefix)
                for name, module in quantized_modules(block).items():
                    entries[f"{prefix}{name}"] = layer_entry(module.layer)
                for key, tensor in tensors.items():
                    writer.add(key, _as_stored(tensor, files.header.get(key)))
                block.to("meta")  # frees the block: its packed tensors are in the writer now
                return_freed_heap()

            report = quantize_model(model, calibration, bits, opts, tokenizer=tokenizer, n_samples=n_samples,
                                    seq_len=seq_len, seed=seed, batch_size=batch_size, progress=progress,
                                    hooks=BlockHooks(load, done))
            for key in resident:
                writer.add(key, files.get(key))
            qconfig = quantization_config(entries, report.settings, aliases)
            qconfig["weights_sha256"] = digest_record(writer.finish())
            write_config(staging, config, qconfig, model_dtype(d for _, d in files.header.values()))
            _copy_side_files(source, staging, tokenizer)
    report.settings["memory_estimate"] = estimate
    return report


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): its heap is left as it is
        return None


#: glibc's ``mallopt`` parameter number for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3
#: Allocations from this size up are mapped and unmapped on their own (a fixed threshold).
HEAP_MMAP_THRESHOLD_BYTES = 1 << 20


def bound_heap_growth() -> None:
    """Keep the quantizer's large temporaries out of the heap, so its peak memory does not grow block by block.

    glibc raises its mmap threshold each time a mapped chunk is freed (up to 32 MiB), after which a block's
    temporaries (statistics, codebook fits, codes, of sizes that vary per layer) come from the heap and fragment it:
    on a 512-wide Llama the peak resident size of an 8-block model grew 40-150 MB over a 2-block one with the
    paper allocator. A fixed 1 MiB threshold maps every large temporary on its own and returns it to the OS when
    freed (measured: +9-14 MB). This is a process-wide setting that stays after the call (glibc cannot go back to
    its adaptive threshold); its cost is a page fault per page of a fresh large tensor.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD_BYTES)


def return_freed_heap() -> None:
    """Hand the heap memory a finished block freed back to the OS (``malloc_trim``; a few milliseconds)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _finite(files: TensorFiles, key: str) -> torch.Tensor:
    tensor = files.get(key)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{key}: contains NaN or Inf; cannot quantize a model with non-finite weights")
    return tensor


def _as_stored(tensor: torch.Tensor, source: Optional[tuple]) -> torch.Tensor:
    """Plain tensors go back in the source file's dtype (they were computed on in FP32)."""
    if source is not None and tensor.is_floating_point() and source[1].is_floating_point:
        return tensor.to(source[1])
    return tensor


def _copy_side_files(source: str, staging: str, tokenizer: Any) -> None:
    for name in _SIDE_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(staging, name))
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
