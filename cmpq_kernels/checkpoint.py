"""Save and load CMPQ-quantized Hugging Face causal LMs: safetensors + ``quantization_config`` (docs/DESIGN.md §2).

A checkpoint is a directory::

    config.json          the model's config plus "quantization_config" (quant_method "cmpq", format_version,
                         bits, effective bits, settings, one entry per quantized module, SHA-256 of the weights)
    model.safetensors    "<module>.cmpq.<field>" for every CMPQLinear (perm, codes4/3/2, codebook4/3/2 fp16,
                         row_ptr, col, val fp16), "<module>.bias", and every other tensor under its own name;
                         or shards model-0000i-of-0000n.safetensors + model.safetensors.index.json
                         (:mod:`.shards`), each with its SHA-256
    tokenizer files, generation_config.json (when given / present)

Never pickle. Writes go to a temporary sibling directory that is renamed into place at the end, so an
interrupted save leaves nothing half-written under the target name. Loading builds the model skeleton on the
``meta`` device (no memory for the floating-point weights), checks every tensor's name, shape and dtype from
the safetensors headers against it before reading any data, then reads tensors one at a time into the final
modules. Everything the format promises (:meth:`CMPQLayer.validate`) and every file's SHA-256 are checked, so
a truncated, bit-flipped or edited file raises ``ValueError`` naming the problem instead of producing wrong
logits.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Container, Iterable, Iterator, Optional

import torch
from torch import nn

from .format import FORMAT_VERSION, LAYER_FIELDS, CMPQLayer
from .nn import CMPQLinear
from .shards import DEFAULT_SHARD_BYTES, ShardWriter, TensorFiles, verify_files, weight_files
from .surgery import quantized_modules, replace_module

CONFIG_NAME = "config.json"
QUANT_METHOD = "cmpq"
#: how each method's packed tensors are named in a file: ``<module><infix><field>``
QUANTIZED_INFIXES = (".cmpq.", ".mixllm.")


def unique_state(model: nn.Module, skip: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
    return sum(t.numel() * t.element_size() for t in unique_state(model)[0].values())


def layer_entry(layer: CMPQLayer) -> dict:
    """What ``quantization_config.modules`` records of one layer, plus its stored and code bits (summed into the
    model-wide figures by :func:`quantization_config`, then dropped)."""
    return {"in_features": layer.k, "out_features": layer.n, "bits": layer.bits, "codebook_rows": layer.codebook_rows,
            "bias": layer.bias is not None, "stored_bits": sum(layer.storage_bits().values()),
            "code_bits": layer.code_bits * layer.n * layer.k}


def quantization_config(entries: dict[str, dict], settings: Optional[dict], aliases: dict[str, str]) -> dict:
    """The ``quantization_config`` of a checkpoint whose layers :func:`layer_entry` described (without the
    weights' SHA-256)."""
    weights = sum(e["in_features"] * e["out_features"] for e in entries.values())
    bits = sorted({e["bits"] for e in entries.values()})
    config = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": bits[0] if len(bits) == 1 else bits,
        "code_bits": sum(e["code_bits"] for e in entries.values()) / weights,
        "effective_bits": sum(e["stored_bits"] for e in entries.values()) / weights,
        "quantized_weights": weights,
        "modules": {name: {k: v for k, v in e.items() if k not in ("stored_bits", "code_bits")}
                    for name, e in entries.items()},
        "tied": aliases,
    }
    if settings is not None:
        config["settings"] = settings
    return config


def layer_tensors(name: str, layer: CMPQLayer) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of module ``name``: ``<name>.cmpq.<field>`` and ``<name>.bias``."""
    tensors = {f"{name}.cmpq.{field}": t for field, t in layer.fields().items()}
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias
    return tensors


def checkpoint_tensors(module: nn.Module, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors by checkpoint name, aliases)`` of ``module`` (names get ``prefix``): plain state tensors with each
    storage once (``aliases`` maps a dropped tied name to the kept one) and every CMPQLinear's packed fields."""
    quantized = quantized_modules(module)
    plain, aliases = unique_state(module, tuple(f"{name}." for name in quantized))
    tensors = {f"{prefix}{k}": t for k, t in plain.items()}
    for name, m in quantized.items():
        tensors.update(layer_tensors(f"{prefix}{name}", m.layer))
    return tensors, {f"{prefix}{a}": f"{prefix}{b}" for a, b in aliases.items()}


def new_writer(staging: str, max_shard_bytes: int) -> ShardWriter:
    """A shard writer whose files say what they hold."""
    return ShardWriter(staging, max_shard_bytes, {"quant_method": QUANT_METHOD, "format_version": str(FORMAT_VERSION)})


def digest_record(digests: dict[str, str]) -> str | dict[str, str]:
    """``weights_sha256`` as stored: one digest for a single ``model.safetensors``, else ``{shard: digest}``."""
    return next(iter(digests.values())) if len(digests) == 1 else digests


def write_config(staging: str, config: dict, qconfig: dict, dtype: torch.dtype) -> None:
    """``config.json``: the model's ``config`` plus ``quantization_config`` and the dtype to build the model in.

    Without ``"dtype"``, transformers' ``from_pretrained(dtype="auto")`` takes the file's first floating tensor,
    which can be a CMPQ fp16 codebook.
    """
    config = {**config, "dtype": str(dtype).split(".")[-1], "quantization_config": qconfig}
    with open(os.path.join(staging, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


@contextlib.contextmanager
def staged_directory(directory: str, overwrite: bool) -> Iterator[str]:
    """A temporary sibling of ``directory`` to write into; renamed into place when the ``with`` block ends
    without error, removed otherwise. An existing ``directory`` is replaced only by a complete new one."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial-", dir=parent)
    try:
        yield staging
        _move_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_quantized(model: nn.Module, directory: str, tokenizer: Any = None, report: Any = None, *,
                   overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write ``model`` (with its :class:`CMPQLinear` layers) as a CMPQ checkpoint directory.

    Args:
        model: a Hugging Face causal LM quantized by :func:`cmpq_kernels.quantize_model` (needs ``.config``).
        directory: target; must not exist unless ``overwrite``.
        tokenizer: saved alongside (``save_pretrained``) when given.
        report: the :class:`~cmpq_kernels.quantize.QuantReport`; its settings (quantizer options,
            calibration) go into ``quantization_config``.
        overwrite: replace an existing directory (only after the new one is complete).
        max_shard_bytes: largest weights file; more tensors than that are written as shards plus an index.

    Returns the ``quantization_config`` written, plus ``file_bytes`` (bytes of the weights files).
    """
    quantized = quantized_modules(model)
    if not quantized:
        raise ValueError("model has no CMPQLinear layers: quantize it first (cmpq_kernels.quantize_model)")
    if not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} has no .config: save_quantized needs a Hugging Face model")
    tensors, aliases = checkpoint_tensors(model)
    entries = {name: layer_entry(module.layer) for name, module in quantized.items()}
    qconfig = quantization_config(entries, None if report is None else report.settings, aliases)
    with staged_directory(directory, overwrite) as staging:
        writer = new_writer(staging, max_shard_bytes)
        for key, tensor in tensors.items():
            writer.add(key, tensor)
        qconfig["weights_sha256"] = digest_record(writer.finish())
        write_config(staging, model.config.to_dict(), qconfig,
                     model_dtype(t.dtype for k, t in tensors.items() if ".cmpq." not in k))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return {**qconfig, "file_bytes": checkpoint_bytes(directory)["weights"]}


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
    return read_method_config(directory, QUANT_METHOD, FORMAT_VERSION, _ENTRY_TYPES)


#: the loader of each quant_method this package writes, named in the error for a checkpoint of another method
LOADERS = {"cmpq": "cmpq_kernels.load_quantized", "mixllm": "cmpq_kernels.load_mixllm"}
_LABELS = {"cmpq": "CMPQ", "mixllm": "MixLLM"}


def read_method_config(directory: str, method: str, format_version: int,
                       entry_types: dict[str, tuple[tuple[type, ...], str]]) -> tuple[dict, dict]:
    """``(model config dict without quantization_config, quantization_config)`` of a checkpoint of ``method`` whose
    ``modules`` entries hold ``entry_types``; ``ValueError`` naming the problem (another method's checkpoint
    included) otherwise."""
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
    check_method_config(qconfig, path, method, format_version, entry_types)
    return config, qconfig


def check_quantization_config(qconfig: Any, path: str) -> None:
    """Raise ``ValueError`` (prefixed by ``path``) unless ``qconfig`` is a CMPQ ``quantization_config`` this build
    reads (what a loader that gets the dict, not the directory, checks: the vLLM plugin)."""
    check_method_config(qconfig, path, QUANT_METHOD, FORMAT_VERSION, _ENTRY_TYPES)


def check_method_config(qconfig: Any, path: str, method: str, format_version: int,
                        entry_types: dict[str, tuple[tuple[type, ...], str]]) -> None:
    """Raise ``ValueError`` (prefixed by ``path``) unless ``qconfig`` is a ``quantization_config`` of ``method``:
    quant_method, format_version, one entry of ``entry_types`` per module, the ``tied`` map."""
    found = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    if found != method:
        other = f"; load it with {LOADERS[found]}" if isinstance(found, str) and found in LOADERS else ""
        raise ValueError(f"{path}: no quantization_config with quant_method '{method}'; not a {_LABELS[method]} "
                         f"checkpoint (quant_method is {found!r}{other})")
    version = qconfig.get("format_version")
    if type(version) is not int or version != format_version:  # type(): JSON true and 1.0 compare equal to 1
        raise ValueError(f"{path}: format_version {version!r} is not supported by this build "
                         f"(reads version {format_version})")
    if not isinstance(qconfig.get("modules"), dict) or not qconfig["modules"]:
        raise ValueError(f"{path}: quantization_config.modules is missing or empty")
    for name, entry in qconfig["modules"].items():
        _check_module_entry(path, name, entry, entry_types)
    tied = qconfig.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(v, str) for v in tied.values()):
        raise ValueError(f"{path}: quantization_config.tied must map tensor names to tensor names, got {tied!r:.80}")


#: what save_quantized writes per module, by JSON type (bool is excluded from the numbers: true == 1 in Python).
_ENTRY_TYPES = {"in_features": ((int,), "an integer"), "out_features": ((int,), "an integer"),
                "codebook_rows": ((int,), "an integer"), "bits": ((int, float), "a number"),
                "bias": ((bool,), "true or false")}


def _check_module_entry(path: str, name: str, entry: Any, entry_types: dict) -> None:
    where = f"{path}: quantization_config.modules[{name!r}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be an object, got {entry!r:.80}")
    for key, (types, meaning) in entry_types.items():
        if key not in entry:
            raise ValueError(f"{where}: '{key}' is missing")
        if type(entry[key]) not in types:
            raise ValueError(f"{where}.{key}: must be {meaning}, got {entry[key]!r:.80}")


def model_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype a checkpoint's model is built in: the most common of the non-CMPQ floating tensors' ``dtypes``."""
    floats = [d for d in dtypes if d.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def verify_weights(directory: str, qconfig: dict) -> None:
    """Raise ``ValueError`` unless every weights file's SHA-256 equals ``quantization_config.weights_sha256``."""
    expected = qconfig.get("weights_sha256")
    if expected is None:
        raise ValueError(f"{directory}: quantization_config has no weights_sha256 "
                         "(load_quantized(..., verify=False) skips the check)")
    verify_files(directory, weight_files(directory), expected)


def open_checkpoint(directory: str, verify: bool) -> tuple[dict, dict, TensorFiles]:
    """``(model config, quantization_config, tensor files)`` of a CMPQ checkpoint, the files verified."""
    config, qconfig = read_quantization_config(directory)
    if verify:
        verify_weights(directory, qconfig)
    return config, qconfig, TensorFiles(directory)


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


def load_layer(files: TensorFiles, name: str, entry: dict) -> CMPQLayer:
    """Read and validate the layer of module ``name`` (see :func:`layer_from_tensors`)."""
    check_layer_keys(name, entry, files.header)
    keys = [k for k in (*(f"{name}.cmpq.{f}" for f in LAYER_FIELDS), f"{name}.bias") if k in files.header]
    return layer_from_tensors(name, entry, {k: files.get(k) for k in keys})


def read_layers(directory: str, verify: bool = True) -> tuple[dict, dict[str, CMPQLayer]]:
    """``(quantization_config, {module: CMPQLayer})`` of a checkpoint, every layer validated; no model is built."""
    _, qconfig, files = open_checkpoint(directory, verify)
    with files:
        return qconfig, {name: load_layer(files, name, entry) for name, entry in qconfig["modules"].items()}


def build_skeleton(config: dict, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` with its parameters and stored buffers on the ``meta`` device; computed buffers are
    real (see :func:`_compute_buffers`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config.get("model_type")
    if not model_type:
        raise ValueError("config.json has no model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    except (ValueError, KeyError) as err:
        raise ValueError(f"config.json: transformers cannot build model_type {model_type!r} ({err})") from None
    try:
        with torch.device("meta"):  # nothing is allocated, whatever sizes config.json claims
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:  # e.g. a negative size in an edited config
        raise ValueError(f"config.json: cannot build a {model_type!r} causal LM from it ({err})") from None
    _compute_buffers(model)
    return model


def _compute_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary tables, embedding scales) are computed, never stored: recreate them on the
    CPU with the model's own initialisation, as transformers' meta-device loading does."""
    owners = {}
    for key, buffer in model.named_non_persistent_buffers():
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._buffers[leaf] = torch.empty_like(buffer, device="cpu")
        owners[id(owner)] = owner
    for owner in owners.values():
        model._init_weights(owner)


def load_quantized(directory: str, *, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized`: the model in eval mode on ``device``.

    The floating-point model is never materialised: the skeleton is built on ``meta``, every tensor is checked
    against it from the file headers, then read once into its final module (peak memory about the checkpoint's
    size). Checks, each failure a ``ValueError`` (``FileNotFoundError`` for missing files) naming the problem:
    ``quant_method`` and ``format_version``; every file's SHA-256 against the config (``verify``); that the
    safetensors files parse; every quantized module exists as an ``nn.Linear`` of the recorded shape; every
    layer passes :meth:`CMPQLayer.validate` (dtypes, shapes, permutation, CSR, finite codebooks); no tensor
    is missing, left over or of another shape. The tokenizer is loaded separately
    (``AutoTokenizer.from_pretrained(directory)``).
    """
    directory = os.fspath(directory)
    config, qconfig, files = open_checkpoint(directory, verify)
    modules, tied = qconfig["modules"], qconfig.get("tied", {})
    with files:
        model = build_skeleton(config, model_dtype(d for k, (_, d) in files.header.items() if ".cmpq." not in k))
        check_no_stray(files.header, modules)
        for name, entry in modules.items():
            check_target(model, name, entry)
            check_layer_keys(name, entry, files.header)
        plain = plain_tensors(model, modules, tied)
        check_plain_header(plain, files.header, modules)  # before any tensor data is read
        for name, entry in modules.items():
            replace_module(model, name, CMPQLinear(load_layer(files, name, entry)))
        for key in plain:
            assign_tensor(model, key, files.get(key))
    fill_tied(model, tied)
    return model.eval().to(device)


def plain_tensors(model: nn.Module, modules: Container[str], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """The skeleton's state tensors that the file must hold: all but quantized modules' and dropped aliases."""
    return {k: t for k, t in model.state_dict().items() if k.rpartition(".")[0] not in modules and k not in tied}


def check_plain_header(plain: dict[str, torch.Tensor], header: dict, modules: Container[str],
                       infix: str = ".cmpq.") -> None:
    """The file holds exactly the skeleton's ``plain`` tensors (besides the quantized modules' ``<module><infix>``
    tensors and biases), each of the skeleton's shape."""
    missing = sorted(k for k in plain if k not in header)
    unexpected = sorted(k for k in header if k not in plain and infix not in k
                        and not (k.endswith(".bias") and k[:-len(".bias")] in modules))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in plain.items():
        if tuple(header[key][0]) != tuple(tensor.shape):
            raise ValueError(f"checkpoint does not match the model: {key} is {list(header[key][0])} in the file, "
                             f"{list(tensor.shape)} in the model built from config.json")


def assign_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the skeleton's ``key``, cast to the model's dtype as ``load_state_dict`` would."""
    owner_name, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, leaf)
    if old.is_floating_point() and tensor.is_floating_point():
        tensor = tensor.to(old.dtype)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = tensor


@torch.no_grad()
def fill_tied(model: nn.Module, tied: dict[str, str]) -> None:
    """Give every alias that :func:`save_quantized` dropped (``quantization_config.tied``: alias -> kept name) its
    source's values: shared again where the alias is still an empty (``meta``) skeleton tensor, copied where it
    was allocated, left alone where the model already ties the two."""
    for alias, source in tied.items():
        try:
            dst, src = model.get_parameter_or_buffer(alias), model.get_parameter_or_buffer(source)
        except AttributeError:
            raise ValueError(f"quantization_config.tied: {alias} -> {source} names a tensor this model lacks") from None
        if dst.is_meta:
            if dst.shape != src.shape:
                raise ValueError(f"tied {alias} -> {source}: shapes {tuple(dst.shape)} and {tuple(src.shape)}")
            owner_name, _, leaf = alias.rpartition(".")
            owner = model.get_submodule(owner_name)
            (owner._parameters if leaf in owner._parameters else owner._buffers)[leaf] = src
        elif dst is not src and dst.data_ptr() != src.data_ptr():
            if dst.shape != src.shape:
                raise ValueError(f"tied {alias} -> {source}: shapes {tuple(dst.shape)} and {tuple(src.shape)}")
            dst.copy_(src)


def checkpoint_bytes(directory: str) -> dict[str, int]:
    """Bytes on disk: ``weights`` (the safetensors files), ``quantized`` (the packed tensors only), ``total`` (all
    files in the directory)."""
    with TensorFiles(directory) as files:
        quantized = files.bytes_of(k for k in files.header if any(i in k for i in QUANTIZED_INFIXES))
        weights = sum(os.path.getsize(os.path.join(directory, f)) for f in files.files)
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    return {"weights": weights, "quantized": quantized, "total": total}
