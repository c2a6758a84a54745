"""Save and load CMPQ-quantized Hugging Face causal LMs: safetensors + ``quantization_config`` (docs/DESIGN.md §2).

A checkpoint is a directory::

    config.json          the model's config plus "quantization_config" (quant_method "cmpq", format_version,
                         bits, effective bits, settings, one entry per quantized module, weights sha256)
    model.safetensors    "<module>.cmpq.<field>" for every CMPQLinear (perm, codes4/3/2, codebook4/3/2 fp16,
                         row_ptr, col, val fp16), "<module>.bias", and every other tensor under its own name
    tokenizer files, generation_config.json (when given / present)

Never pickle. Writes go to a temporary sibling directory that is renamed into place at the end, so an
interrupted save leaves nothing half-written under the target name. Loading validates everything the
format promises (:meth:`CMPQLayer.validate`) plus the file's SHA-256, so a truncated, bit-flipped or edited
file raises ``ValueError`` naming the problem instead of producing wrong logits.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Container, Iterable

import torch
from torch import nn

from .format import FORMAT_VERSION, LAYER_FIELDS, CMPQLayer
from .nn import CMPQLinear
from .surgery import quantized_modules, replace_module

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
QUANT_METHOD = "cmpq"


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unique_state(model: nn.Module, skip: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict (keys not starting with ``skip``) with each storage once; ``aliases`` maps a dropped name to
    the kept one (tied weights)."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(skip):
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        kept[key] = tensor
    return kept, aliases


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors, each storage once (what a safetensors file of it holds, minus the header)."""
    return sum(t.numel() * t.element_size() for t in _unique_state(model)[0].values())


def _quantization_config(quantized: dict[str, CMPQLinear], report: Any, aliases: dict[str, str]) -> dict:
    layers = {name: m.layer for name, m in quantized.items()}
    weights = sum(l.n * l.k for l in layers.values())
    stored = sum(sum(l.storage_bits().values()) for l in layers.values())
    code = sum(l.code_bits * l.n * l.k for l in layers.values())
    bits = sorted({l.bits for l in layers.values()})
    config = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": bits[0] if len(bits) == 1 else bits,
        "code_bits": code / weights,
        "effective_bits": stored / weights,
        "quantized_weights": weights,
        "modules": {name: {"in_features": l.k, "out_features": l.n, "bits": l.bits, "codebook_rows": l.codebook_rows,
                           "bias": l.bias is not None} for name, l in layers.items()},
        "tied": aliases,
    }
    if report is not None:
        config["settings"] = report.settings
    return config


def save_quantized(model: nn.Module, directory: str, tokenizer: Any = None, report: Any = None, *,
                   overwrite: bool = False) -> dict:
    """Write ``model`` (with its :class:`CMPQLinear` layers) as a CMPQ checkpoint directory.

    Args:
        model: a Hugging Face causal LM quantized by :func:`cmpq_kernels.quantize_model` (needs ``.config``).
        directory: target; must not exist unless ``overwrite``.
        tokenizer: saved alongside (``save_pretrained``) when given.
        report: the :class:`~cmpq_kernels.quantize.QuantReport`; its settings (allocator, outlier fractions,
            calibration) go into ``quantization_config``.
        overwrite: replace an existing directory (only after the new one is complete).

    Returns the ``quantization_config`` written, plus ``file_bytes`` (size of ``model.safetensors``).
    """
    from safetensors.torch import save_file

    quantized = quantized_modules(model)
    if not quantized:
        raise ValueError("model has no CMPQLinear layers: quantize it first (cmpq_kernels.quantize_model)")
    if not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} has no .config: save_quantized needs a Hugging Face model")
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True (--overwrite) to replace it")
    plain, aliases = _unique_state(model, tuple(f"{name}." for name in quantized))
    tensors = {key: t.detach().cpu().contiguous() for key, t in plain.items()}
    for name, module in quantized.items():
        tensors.update({f"{name}.cmpq.{field}": t.detach().cpu().contiguous()
                        for field, t in module.layer.fields().items()})
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().cpu().contiguous()
    qconfig = _quantization_config(quantized, report, aliases)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial-", dir=parent)
    try:
        weights_path = os.path.join(staging, WEIGHTS_NAME)
        save_file(tensors, weights_path, metadata={"format": "pt", "quant_method": QUANT_METHOD,
                                                   "format_version": str(FORMAT_VERSION)})
        qconfig["weights_sha256"] = sha256_of(weights_path)
        config = model.config.to_dict()
        # Without "dtype", transformers' from_pretrained(dtype="auto") takes the file's first floating tensor,
        # which can be a CMPQ fp16 codebook: record the dtype load_quantized builds the model in.
        config["dtype"] = str(model_dtype(t.dtype for k, t in tensors.items() if ".cmpq." not in k)).split(".")[-1]
        config["quantization_config"] = qconfig
        with open(os.path.join(staging, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _move_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**qconfig, "file_bytes": os.path.getsize(os.path.join(directory, WEIGHTS_NAME))}


def _move_into_place(staging: str, directory: str) -> None:
    if not os.path.exists(directory):
        os.rename(staging, directory)
        return
    retired = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=os.path.dirname(directory))
    os.rmdir(retired)
    os.rename(directory, retired)
    try:
        os.rename(staging, directory)
    except BaseException:
        os.rename(retired, directory)  # the old checkpoint stays in place when the new one cannot take it
        raise
    shutil.rmtree(retired, ignore_errors=True)


# ---- loading -----------------------------------------------------------------------------------------------


def read_quantization_config(directory: str) -> tuple[dict, dict]:
    """``(model config dict without quantization_config, quantization_config)`` of a CMPQ checkpoint.

    Raises ``ValueError`` when the directory is not a CMPQ checkpoint this build can read.
    """
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
    qconfig = config.pop("quantization_config", None)
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path}: no quantization_config with quant_method '{QUANT_METHOD}'; not a CMPQ checkpoint")
    version = qconfig.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # type(): JSON true and 1.0 compare equal to 1
        raise ValueError(f"{path}: format_version {version!r} is not supported by this build "
                         f"(reads version {FORMAT_VERSION})")
    if not isinstance(qconfig.get("modules"), dict) or not qconfig["modules"]:
        raise ValueError(f"{path}: quantization_config.modules is missing or empty")
    for name, entry in qconfig["modules"].items():
        _check_module_entry(path, name, entry)
    tied = qconfig.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(v, str) for v in tied.values()):
        raise ValueError(f"{path}: quantization_config.tied must map tensor names to tensor names, got {tied!r:.80}")
    return config, qconfig


#: what save_quantized writes per module, by JSON type (bool is excluded from the numbers: true == 1 in Python).
_ENTRY_TYPES = {"in_features": ((int,), "an integer"), "out_features": ((int,), "an integer"),
                "codebook_rows": ((int,), "an integer"), "bits": ((int, float), "a number"),
                "bias": ((bool,), "true or false")}


def _check_module_entry(path: str, name: str, entry: Any) -> None:
    where = f"{path}: quantization_config.modules[{name!r}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be an object, got {entry!r:.80}")
    for key, (types, meaning) in _ENTRY_TYPES.items():
        if key not in entry:
            raise ValueError(f"{where}: '{key}' is missing")
        if type(entry[key]) not in types:
            raise ValueError(f"{where}.{key}: must be {meaning}, got {entry[key]!r:.80}")


def model_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype a checkpoint's model is built in: the most common of the non-CMPQ floating tensors' ``dtypes``."""
    floats = [d for d in dtypes if d.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def verify_weights(path: str, qconfig: dict) -> None:
    """Raise ``ValueError`` unless the SHA-256 of ``path`` equals ``quantization_config.weights_sha256``."""
    expected = qconfig.get("weights_sha256")
    if not isinstance(expected, str):
        raise ValueError(f"{os.path.dirname(path)}: quantization_config has no weights_sha256 "
                         "(load_quantized(..., verify=False) skips the check)")
    if sha256_of(path) != expected:
        raise ValueError(f"{path}: SHA-256 does not match quantization_config.weights_sha256: the file is "
                         "truncated, corrupted or was modified after saving")


def check_target(model: nn.Module, name: str, entry: dict) -> None:
    """``model.<name>`` must be the ``nn.Linear`` that ``quantization_config.modules[name]`` describes."""
    try:
        target = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"quantization_config names module {name!r}, which this model does not have") from None
    if not isinstance(target, nn.Linear):
        raise ValueError(f"{name}: is a {type(target).__name__}, expected nn.Linear")
    if (target.out_features, target.in_features) != (entry.get("out_features"), entry.get("in_features")):
        raise ValueError(f"{name}: model has {target.out_features}x{target.in_features}, config says "
                         f"{entry.get('out_features')}x{entry.get('in_features')}")


def _open_weights(directory: str, qconfig: dict, verify: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: {WEIGHTS_NAME} is missing")
    if verify:
        verify_weights(path, qconfig)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: unreadable safetensors file ({err})") from None


def check_layer_keys(name: str, entry: dict, keys: Container[str]) -> None:
    """The checkpoint's tensor names ``keys`` hold every field of module ``name``, and a bias iff ``entry`` says so."""
    missing = [f for f in LAYER_FIELDS if f"{name}.cmpq.{f}" not in keys]
    if missing:
        raise ValueError(f"{name}: tensors missing from the checkpoint: {', '.join(missing)}")
    has_bias = f"{name}.bias" in keys
    if bool(entry.get("bias")) != has_bias:
        raise ValueError(f"{name}: config says bias={entry.get('bias')} but the file "
                         f"{'has' if has_bias else 'lacks'} {name}.bias")


def check_no_stray(keys: Iterable[str], modules: Container[str]) -> None:
    """No ``<module>.cmpq.<field>`` tensor belongs to a module missing from ``quantization_config.modules``."""
    stray = sorted(k for k in keys if ".cmpq." in k and k.rpartition(".cmpq.")[0] not in modules)
    if stray:
        raise ValueError(f"tensors of modules not in quantization_config: {', '.join(stray[:5])}")


def layer_from_tensors(name: str, entry: dict, tensors: dict[str, torch.Tensor]) -> CMPQLayer:
    """The validated layer of module ``name`` (popped from ``tensors``), as ``quantization_config.modules[name]``
    (``entry``) describes it; ``ValueError`` naming the module and the problem otherwise."""
    check_layer_keys(name, entry, tensors)
    fields = {f: tensors.pop(f"{name}.cmpq.{f}") for f in LAYER_FIELDS}
    bias = tensors.pop(f"{name}.bias", None)
    try:
        return CMPQLayer.from_fields(fields, n=int(entry["out_features"]), k=int(entry["in_features"]),
                                     bits=float(entry["bits"]), codebook_rows=int(entry["codebook_rows"]),
                                     bias=bias).validate()
    except (KeyError, TypeError) as err:
        raise ValueError(f"{name}: bad quantization_config entry {entry!r} ({err})") from None
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def read_layers(directory: str, verify: bool = True) -> tuple[dict, dict[str, CMPQLayer]]:
    """``(quantization_config, {module: CMPQLayer})`` of a checkpoint, every layer validated; no model is built."""
    _, qconfig = read_quantization_config(directory)
    tensors = _open_weights(directory, qconfig, verify)
    return qconfig, {name: layer_from_tensors(name, entry, tensors) for name, entry in qconfig["modules"].items()}


def _build_model(config: dict, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config.get("model_type")
    if not model_type:
        raise ValueError("config.json has no model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    except (ValueError, KeyError) as err:
        raise ValueError(f"config.json: transformers cannot build model_type {model_type!r} ({err})") from None
    try:
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:  # e.g. a negative size in an edited config
        raise ValueError(f"config.json: cannot build a {model_type!r} causal LM from it ({err})") from None


def load_quantized(directory: str, *, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized`: the model in eval mode on ``device``.

    Checks, each failure a ``ValueError`` (``FileNotFoundError`` for missing files) naming the problem:
    ``quant_method`` and ``format_version``; the file's SHA-256 against the config (``verify``); that the
    safetensors file parses; every quantized module exists as an ``nn.Linear`` of the recorded shape; every
    layer passes :meth:`CMPQLayer.validate` (dtypes, shapes, permutation, CSR, finite codebooks); no tensor
    is missing or left over. The tokenizer is loaded separately (``AutoTokenizer.from_pretrained(directory)``).
    """
    directory = os.fspath(directory)
    config, qconfig = read_quantization_config(directory)
    tensors = _open_weights(directory, qconfig, verify)
    model = _build_model(config, model_dtype(t.dtype for k, t in tensors.items() if ".cmpq." not in k))
    check_no_stray(tensors, qconfig["modules"])
    for name, entry in qconfig["modules"].items():
        check_target(model, name, entry)
        replace_module(model, name, CMPQLinear(layer_from_tensors(name, entry, tensors)))
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # a plain tensor of the wrong shape
        raise ValueError(f"checkpoint does not match the model: {err}") from None
    tied = qconfig.get("tied", {})
    missing = sorted(k for k in missing if k.rpartition(".")[0] not in qconfig["modules"] and k not in tied)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fill_tied(model, tied)
    return model.eval().to(device)


@torch.no_grad()
def fill_tied(model: nn.Module, tied: dict[str, str]) -> None:
    """Give every alias that :func:`save_quantized` dropped (``quantization_config.tied``: alias -> kept name) its
    source's values, unless the model already ties the two."""
    for alias, source in tied.items():
        try:
            dst, src = model.get_parameter_or_buffer(alias), model.get_parameter_or_buffer(source)
        except AttributeError:
            raise ValueError(f"quantization_config.tied: {alias} -> {source} names a tensor this model lacks") from None
        if dst is not src and dst.data_ptr() != src.data_ptr():
            if dst.shape != src.shape:
                raise ValueError(f"tied {alias} -> {source}: shapes {tuple(dst.shape)} and {tuple(src.shape)}")
            dst.copy_(src)


#: safetensors header dtype -> torch dtype.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_header(path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``name -> (shape, torch dtype)`` from a safetensors header; no tensor data is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            header = {}
            for key in f.keys():
                info = f.get_slice(key)
                dtype = info.get_dtype()
                if dtype not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"{path}: tensor {key} has unsupported dtype {dtype}")
                header[key] = (tuple(info.get_shape()), _SAFETENSORS_DTYPES[dtype])
            return header
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path}: unreadable safetensors file ({err})") from None


def checkpoint_bytes(directory: str) -> dict[str, int]:
    """Bytes on disk: ``weights`` (model.safetensors), ``quantized`` (the CMPQ tensors only), ``total`` (all files)."""
    weights = os.path.join(directory, WEIGHTS_NAME)
    quantized = sum(math.prod(shape) * dtype.itemsize for key, (shape, dtype) in read_header(weights).items()
                    if ".cmpq." in key)
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    return {"weights": os.path.getsize(weights), "quantized": quantized, "total": total}
