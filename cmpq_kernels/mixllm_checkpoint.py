"""Save and load MixLLM-quantized Hugging Face causal LMs (docs/DESIGN.md §9), with the discipline of the CMPQ
checkpoints (:mod:`.checkpoint`): safetensors only, SHA-256 of every weights file, staged writes, a skeleton on
``meta``, every header and every layer checked before use.

A checkpoint is a directory::

    config.json          the model's config plus quantization_config: quant_method "mixllm", format_version, p,
                         code_bits, effective_bits, one entry per module (in/out features, rows_8bit, act_bits,
                         bias), tied aliases, settings, weights_sha256
    model.safetensors    "<module>.mixllm.<field>" per MixLLMLinear (idx8, q8, s8, idx4, q4, s4, z4),
                         "<module>.bias", every other tensor under its own name (or shards + index)

A checkpoint of another method (or a MixLLM one given to :func:`cmpq_kernels.load_quantized`) is refused with a
``ValueError`` naming the loader to use. ``import cmpq_kernels.hf`` also lets transformers' ``from_pretrained``
load it (:mod:`.hf`).
"""
from __future__ import annotations

import os
from typing import Any, Container, Optional

import torch
from torch import nn

from .checkpoint import (CONFIG_NAME, check_method_config, check_plain_header, check_target, digest_record, fill_tied,
                         assign_tensor, build_skeleton, model_dtype, plain_tensors, read_method_config,
                         staged_directory, unique_state, verify_weights, write_config)
from .mixllm_format import FORMAT_VERSION, LAYER_FIELDS, QUANT_METHOD, MixLLMLayer
from .mixllm_nn import MixLLMLinear
from .shards import DEFAULT_SHARD_BYTES, ShardWriter, TensorFiles
from .surgery import replace_module

INFIX = ".mixllm."
#: what save_mixllm writes per module, by JSON type (bool excluded from the integers: true == 1 in Python)
ENTRY_TYPES = {"in_features": ((int,), "an integer"), "out_features": ((int,), "an integer"),
               "rows_8bit": ((int,), "an integer"), "act_bits": ((int,), "an integer"),
               "bias": ((bool,), "true or false")}


def mixllm_modules(model: nn.Module) -> dict[str, MixLLMLinear]:
    """Every :class:`MixLLMLinear` in ``model`` by dotted name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MixLLMLinear)}


def _quantization_config(modules: dict[str, MixLLMLinear], settings: Optional[dict], aliases: dict[str, str]) -> dict:
    layers = {name: m.layer for name, m in modules.items()}
    weights = sum(layer.n * layer.k for layer in layers.values())
    config = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "code_bits": sum(layer.code_bits * layer.n * layer.k for layer in layers.values()) / weights,
        "effective_bits": sum(sum(layer.storage_bits().values()) for layer in layers.values()) / weights,
        "quantized_weights": weights,
        "modules": {name: {"in_features": layer.k, "out_features": layer.n, "rows_8bit": layer.n8,
                           "act_bits": modules[name].act_bits, "bias": layer.bias is not None}
                    for name, layer in layers.items()},
        "tied": aliases,
    }
    if settings is not None:
        config["settings"] = settings
        config["p"] = settings.get("p")
    return config


def save_mixllm(model: nn.Module, directory: str, tokenizer: Any = None, report: Any = None, *,
                overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write ``model`` (with its :class:`MixLLMLinear` layers) as a MixLLM checkpoint directory.

    Args:
        model: a Hugging Face causal LM quantized by :func:`cmpq_kernels.quantize_model_mixllm`.
        directory: target; must not exist unless ``overwrite``.
        tokenizer: saved alongside when given.
        report: the :class:`~cmpq_kernels.quantize.QuantReport`; its settings go into ``quantization_config``.
        overwrite: replace an existing directory (only after the new one is complete).
        max_shard_bytes: largest weights file.

    Returns the ``quantization_config`` written.
    """
    modules = mixllm_modules(model)
    if not modules:
        raise ValueError("model has no MixLLMLinear layers: quantize it first (cmpq_kernels.quantize_model_mixllm)")
    if not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} has no .config: save_mixllm needs a Hugging Face model")
    plain, aliases = unique_state(model, tuple(f"{name}." for name in modules))
    tensors = dict(plain)
    for name, module in modules.items():
        layer = module.layer
        tensors.update({f"{name}{INFIX}{field}": t for field, t in layer.fields().items()})
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias
    qconfig = _quantization_config(modules, None if report is None else report.settings, aliases)
    with staged_directory(directory, overwrite) as staging:
        writer = ShardWriter(staging, max_shard_bytes, {"quant_method": QUANT_METHOD,
                                                        "format_version": str(FORMAT_VERSION)})
        for key, tensor in tensors.items():
            writer.add(key, tensor)
        qconfig["weights_sha256"] = digest_record(writer.finish())
        write_config(staging, model.config.to_dict(), qconfig, model_dtype(t.dtype for k, t in plain.items()))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return qconfig


def read_mixllm_config(directory: str) -> tuple[dict, dict]:
    """``(model config, quantization_config)`` of a MixLLM checkpoint, its entries type-checked."""
    config, qconfig = read_method_config(directory, QUANT_METHOD, FORMAT_VERSION, ENTRY_TYPES)
    _check_act_bits(qconfig, os.path.join(directory, CONFIG_NAME))
    return config, qconfig


def check_mixllm_config(qconfig: Any, path: str) -> None:
    """Raise ``ValueError`` (prefixed by ``path``) unless ``qconfig`` is a MixLLM ``quantization_config`` this build
    reads (what a loader that gets the dict, not the directory, checks: the vLLM plugin)."""
    check_method_config(qconfig, path, QUANT_METHOD, FORMAT_VERSION, ENTRY_TYPES)
    _check_act_bits(qconfig, path)


def _check_act_bits(qconfig: dict, path: str) -> None:
    for name, entry in qconfig["modules"].items():
        if entry["act_bits"] not in (8, 16):
            raise ValueError(f"{path}: modules[{name!r}].act_bits must be 8 or 16, got {entry['act_bits']}")


def check_keys(header: Container[str], modules: dict) -> None:
    """The file's tensor names hold every field (and a bias exactly when the config says so) of every listed module,
    and no quantized tensor of an unlisted one."""
    stray = sorted(k for k in header if (INFIX in k and k.rpartition(INFIX)[0] not in modules) or ".cmpq." in k)
    if stray:
        raise ValueError(f"tensors of modules not in quantization_config: {', '.join(stray[:5])}")
    for name, entry in modules.items():
        missing = [f for f in LAYER_FIELDS if f"{name}{INFIX}{f}" not in header]
        if missing:
            raise ValueError(f"{name}: tensors missing from the checkpoint: {', '.join(missing)}")
        if entry["bias"] != (f"{name}.bias" in header):
            raise ValueError(f"{name}: config says bias={entry['bias']} but the file "
                             f"{'lacks' if entry['bias'] else 'has'} {name}.bias")


def _load_layer(files: TensorFiles, name: str, entry: dict) -> MixLLMLayer:
    keys = [f"{name}{INFIX}{f}" for f in LAYER_FIELDS] + ([f"{name}.bias"] if entry["bias"] else [])
    return layer_from_tensors(name, entry, {key: files.get(key) for key in keys})


def layer_from_tensors(name: str, entry: dict, tensors: dict[str, torch.Tensor]) -> MixLLMLayer:
    """The validated layer of module ``name`` from its checkpoint tensors (``<name>.mixllm.<field>``, and
    ``<name>.bias`` when ``entry`` says so); ``ValueError`` naming the module and the problem otherwise."""
    fields = {f: tensors[f"{name}{INFIX}{f}"] for f in LAYER_FIELDS}
    bias = tensors[f"{name}.bias"] if entry["bias"] else None
    try:
        layer = MixLLMLayer.from_fields(fields, n=entry["out_features"], k=entry["in_features"], bias=bias).validate()
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if layer.n8 != entry["rows_8bit"]:
        raise ValueError(f"{name}: config says {entry['rows_8bit']} 8-bit rows, the file holds {layer.n8}")
    return layer


def read_mixllm_layers(directory: str, verify: bool = True) -> tuple[dict, dict[str, MixLLMLayer]]:
    """``(quantization_config, {module: MixLLMLayer})``, every layer validated; no model is built."""
    _, qconfig = read_mixllm_config(directory)
    if verify:
        verify_weights(directory, qconfig)
    with TensorFiles(directory) as files:
        check_keys(files.header, qconfig["modules"])
        return qconfig, {name: _load_layer(files, name, entry) for name, entry in qconfig["modules"].items()}


def load_mixllm(directory: str, *, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Load a checkpoint written by :func:`save_mixllm`: the model in eval mode on ``device``.

    Checks, each failure a ``ValueError`` naming the problem: quant_method (another method's checkpoint names its
    loader), format_version and the module entries; every file's SHA-256 (``verify``); every quantized module is an
    ``nn.Linear`` of the recorded shape; no tensor missing, stray or of another shape; every layer passes
    :meth:`MixLLMLayer.validate` and holds the recorded number of 8-bit rows.
    """
    directory = os.fspath(directory)
    config, qconfig = read_mixllm_config(directory)
    if verify:
        verify_weights(directory, qconfig)
    modules, tied = qconfig["modules"], qconfig.get("tied", {})
    with TensorFiles(directory) as files:
        model = build_skeleton(config, model_dtype(d for k, (_, d) in files.header.items() if INFIX not in k))
        check_keys(files.header, modules)
        for name, entry in modules.items():
            check_target(model, name, entry)
        plain = plain_tensors(model, modules, tied)
        check_plain_header(plain, files.header, modules, INFIX)  # before any tensor data is read
        for name, entry in modules.items():
            replace_module(model, name, MixLLMLinear(_load_layer(files, name, entry), entry["act_bits"]))
        for key in plain:
            assign_tensor(model, key, files.get(key))
    fill_tied(model, tied)
    return model.eval().to(device)
