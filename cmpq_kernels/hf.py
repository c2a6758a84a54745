"""Load CMPQ (and MixLLM) checkpoints through Hugging Face ``from_pretrained`` (registered transformers quantizers).

MixLLM checkpoints (``quant_method "mixllm"``, :mod:`cmpq_kernels.mixllm_checkpoint`) go through the same hooks
(:class:`MixLLMHfQuantizer`, with MixLLM's tensor names and modules); what follows is written for CMPQ.

``import cmpq_kernels.hf`` registers the quantization method ``"cmpq"`` with transformers, after which::

    model = transformers.AutoModelForCausalLM.from_pretrained(directory)

loads a directory written by :func:`cmpq_kernels.save_quantized` into the same model as
:func:`cmpq_kernels.load_quantized` (same :class:`~cmpq_kernels.nn.CMPQLinear` modules, bit-identical logits).
Registration happens on import because transformers dispatches on ``config.json``'s
``quantization_config.quant_method`` inside ``from_pretrained``, before any user code can run; :func:`register`
is the explicit, idempotent form of the same thing. ``import cmpq_kernels`` alone does not import transformers.

How a load goes (transformers' quantizer hooks, :class:`CMPQHfQuantizer`):

0. ``update_attn_implementation`` (sees the config before ``dtype="auto"`` is settled): a config.json without
   ``dtype`` gets load_quantized's choice (most common dtype of the non-CMPQ floating tensors) instead of
   transformers' "first floating tensor in the file", which can be an fp16 codebook.
1. ``_process_model_before_weight_loading`` (model still on the meta device): checks ``quant_method`` /
   ``format_version`` / ``modules`` (:func:`~cmpq_kernels.checkpoint.read_quantization_config`), the weights
   file's SHA-256 against ``quantization_config.weights_sha256``, and the safetensors *header* (every field of
   every listed module present, no ``.cmpq.`` tensor of an unlisted module, each listed module an ``nn.Linear`` of
   the recorded shape). Each listed linear is replaced by a meta-device placeholder whose buffers carry the
   on-disk names (``<module>.cmpq.<field>``, ``<module>.bias``), shapes and dtypes, so transformers' loader fills
   them like any other tensor: no key renaming, no casts of the packed tensors
   (:meth:`CMPQHfQuantizer.get_new_dtype`; a bias follows the model's dtype), and no missing/unexpected-key warnings.
   Weight ties that involve a quantized module (a quantized ``lm_head`` under ``tie_word_embeddings``) are dropped.
2. ``_process_model_after_weight_loading``: each placeholder becomes a real :class:`CMPQLinear` built by the
   same code as :func:`~cmpq_kernels.checkpoint.load_quantized` (``_layer_from_tensors``, which runs
   :meth:`CMPQLayer.validate`); aliases listed in ``quantization_config.tied`` that transformers did not tie
   itself are filled from their source.

CPU/disk offload (a ``device_map`` mixing ``"cpu"``/``"disk"`` with accelerators) is refused; a multi-GPU map
is untested.

Failures raise ``ValueError`` (``FileNotFoundError`` for missing files) out of ``from_pretrained``. Never pickle:
only the safetensors file is read. ``model.save_pretrained`` raises, pointing at
:func:`cmpq_kernels.save_quantized` (the checkpoint's SHA-256 is computed over the written file, which
``save_pretrained`` cannot record); ``save_quantized`` works on a model loaded this way.
"""
from __future__ import annotations

import os
import re
import weakref
from typing import Any, Optional

import torch
from torch import nn
# transformers is an optional dependency of the package; this module is the only one that needs it at import.
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils import logging as _hf_logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import mixllm_checkpoint
from .checkpoint import (QUANT_METHOD, check_layer_keys, check_no_stray, check_target, fill_tied, layer_from_tensors,
                         model_dtype, read_quantization_config, verify_weights)
from .format import LAYER_FIELDS
from .mixllm_format import LAYER_FIELDS as MIXLLM_FIELDS
from .mixllm_format import QUANT_METHOD as MIXLLM_METHOD
from .mixllm_nn import MixLLMLinear
from .nn import CMPQLinear
from .shards import INDEX_NAME, WEIGHTS_NAME, Header, TensorFiles, weight_files
from .surgery import replace_module

__all__ = ["CMPQConfig", "CMPQHfQuantizer", "MixLLMConfig", "MixLLMHfQuantizer", "register"]

logger = _hf_logging.get_logger(__name__)

_SAVE_HINT = ("a CMPQ model is written with cmpq_kernels.save_quantized(model, directory) (the checkpoint records "
              "the SHA-256 of the written weights file, which save_pretrained cannot do); load it back with "
              "cmpq_kernels.load_quantized(directory) or AutoModelForCausalLM.from_pretrained(directory) after "
              "`import cmpq_kernels.hf` (a MixLLM model: save_mixllm / load_mixllm)")


class CMPQConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a CMPQ checkpoint, held verbatim.

    Every key written by :func:`cmpq_kernels.save_quantized` (``format_version``, ``modules``, ``tied``,
    ``weights_sha256``, ``bits``, ``settings``, ...) becomes an attribute, and :meth:`to_dict` gives the same
    dict back, so ``model.config.to_dict()`` round-trips. Validation happens when a checkpoint is loaded.
    Constructing one for an unquantized model is refused by the quantizer: CMPQ needs calibration
    (:func:`cmpq_kernels.quantize_model`).
    """

    method = QUANT_METHOD

    def __init__(self, **kwargs: Any) -> None:
        quant_method = kwargs.pop("quant_method", self.method)
        if quant_method != self.method:
            raise ValueError(f"{type(self).__name__}: quant_method must be {self.method!r}, got {quant_method!r}")
        self.quant_method = self.method
        self.__dict__.update(kwargs)


class MixLLMConfig(CMPQConfig):
    """The ``quantization_config`` of a MixLLM checkpoint (:mod:`cmpq_kernels.mixllm_checkpoint`), held verbatim."""

    method = MIXLLM_METHOD


class _PendingLinear(nn.Module):
    """Meta-device stand-in for one quantized linear while transformers loads the weights.

    Buffers are named as in the file (``<infix>.<field>``, ``bias``) with the file's shapes and dtypes, so the
    loader assigns them directly. Replaced by a :class:`CMPQLinear` / :class:`MixLLMLinear` after loading; never run.
    """

    def __init__(self, entry: dict, infix: str, fields: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 bias: Optional[tuple[tuple[int, ...], torch.dtype]]) -> None:
        super().__init__()
        self.entry = entry
        self.in_features, self.out_features = int(entry["in_features"]), int(entry["out_features"])
        packed = nn.Module()
        setattr(self, infix, packed)
        for field, (shape, dtype) in fields.items():
            packed.register_buffer(field, torch.empty(shape, dtype=dtype, device="meta"))
        self.register_buffer("bias", None if bias is None else torch.empty(bias[0], dtype=bias[1], device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - replaced before use
        raise RuntimeError("CMPQ layer placeholder: from_pretrained did not finish loading this module")


def _weights_dir(checkpoint_files: Optional[list]) -> str:
    """The checkpoint directory behind the weight files transformers resolved (one file, or the shards)."""
    if not checkpoint_files:
        raise ValueError("CMPQ checkpoints load from a directory holding model.safetensors (or its shards); "
                         "from_pretrained found no checkpoint file (a state_dict= argument is not supported)")
    files = [os.fspath(f) for f in checkpoint_files]
    directories = {os.path.dirname(f) for f in files}
    if len(directories) != 1 or not all(f.endswith(".safetensors") for f in files):
        raise ValueError(f"a CMPQ checkpoint is {WEIGHTS_NAME} or its shards in one directory (written by "
                         f"cmpq_kernels.save_quantized); from_pretrained resolved {files}")
    return directories.pop()


def _header(directory: str) -> Header:
    with TensorFiles(directory) as files:
        return files.header


def _plain_dtype(header: Header, infix: str) -> torch.dtype:
    return model_dtype(dtype for key, (_, dtype) in header.items() if f".{infix}." not in key)


class CMPQHfQuantizer(HfQuantizer):
    """transformers quantizer for pre-quantized CMPQ checkpoints (loading only; see the module docstring)."""

    requires_calibration = True  # from_pretrained(..., quantization_config=CMPQConfig()) on an FP model is refused
    infix = "cmpq"  #: checkpoint tensors are ``<module>.<infix>.<field>``
    fields = LAYER_FIELDS

    # -- what differs between the methods -------------------------------------------------------------------

    def _read_config(self, directory: str) -> dict:
        return read_quantization_config(directory)[1]

    def _check_header(self, model: nn.Module, header: Header, modules: dict) -> None:
        for name, entry in modules.items():
            check_target(model, name, entry)
            check_layer_keys(name, entry, header)
        check_no_stray(header, modules)

    def _build(self, name: str, entry: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
        return CMPQLinear(layer_from_tensors(name, entry, tensors))

    # -- transformers' hooks ----------------------------------------------------------------------------------

    def __init__(self, quantization_config: CMPQConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._qconfig: Optional[dict] = None
        self._model_ref: Optional[weakref.ref] = None
        self._dtype: Optional[torch.dtype] = None
        self._dtype_unresolved = False
        self._checked: Optional[tuple] = None

    def update_attn_implementation(self, config: Any) -> Any:
        # Runs before from_pretrained settles dtype="auto". A config without "dtype" would make transformers read
        # the file's header and take its first floating tensor, which may be a CMPQ fp16 codebook; use
        # load_quantized's rule (the most common dtype of the plain floating tensors) instead, after checking the
        # file (so a damaged header is reported as a SHA-256 mismatch, not as a transformers parse error). Hub ids
        # (no local directory yet) are checked, with a warning, once the file is known.
        if getattr(config, "dtype", None) is None:
            directory = os.fspath(getattr(config, "name_or_path", None) or "")
            if any(os.path.isfile(os.path.join(directory, name)) for name in (WEIGHTS_NAME, INDEX_NAME)):
                self._check_directory(directory)
                config.dtype = _plain_dtype(_header(directory), self.infix)
            else:
                self._dtype_unresolved = True
        return config

    def _check_directory(self, directory: str) -> dict:
        """quant_method / format_version / modules of the directory's config.json, and the files' SHA-256; once."""
        stats = [os.stat(os.path.join(directory, f)) for f in weight_files(directory)]
        key = (os.path.realpath(directory), tuple((st.st_size, st.st_mtime_ns) for st in stats))
        if self._checked is None or self._checked[0] != key:
            qconfig = self._read_config(directory)
            verify_weights(directory, qconfig)
            self._checked = (key, qconfig)
        return self._checked[1]

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self._dtype = dtype  # the model's dtype (from_pretrained's dtype=, or config.json's for "auto")
        return dtype

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        _check_no_offload(device_map)  # an explicit map; one "auto" resolves to is checked after loading

    def get_new_dtype(self, converter: Any, param: Any, dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
        # Packed tensors load exactly as stored: a cast would change codebooks, outlier values or codes, and
        # validate() rather than the loader must judge a wrong on-disk dtype. (A quantized module's bias is an
        # ordinary float tensor: its placeholder has the model's dtype, so it is cast like every other weight.)
        targets = getattr(converter, "_original_target_patterns", None) or getattr(converter, "target_patterns", [])
        if self._qconfig is not None and any(self._is_packed_key(t) for t in targets):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _is_packed_key(self, key: str) -> bool:
        module, _, leaf = key.rpartition(".")
        suffix = f".{self.infix}"
        return leaf in self.fields and module.endswith(suffix) and module[:-len(suffix)] in self._qconfig["modules"]

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: Optional[list] = None,
                                             **kwargs: Any) -> nn.Module:
        directory = _weights_dir(checkpoint_files)
        qconfig = self._check_directory(directory)
        header = _header(directory)
        if self._dtype_unresolved and self._dtype != _plain_dtype(header, self.infix):
            logger.warning(f"{directory}: config.json has no dtype and the model was built as {self._dtype}; "
                           f"cmpq_kernels' loader would use {_plain_dtype(header, self.infix)} (pass dtype=... to match)")
        modules = qconfig["modules"]
        self._check_header(model, header, modules)
        for name, entry in modules.items():
            bias = header.get(f"{name}.bias")
            fields = {f: header[f"{name}.{self.infix}.{f}"] for f in self.fields}
            model_dtype = self._dtype
            if bias is not None and bias[1].is_floating_point and isinstance(model_dtype, torch.dtype) \
                    and model_dtype.is_floating_point:
                bias = (bias[0], model_dtype)  # a bias follows the model dtype (CMPQLinear; load_quantized().to())
            replace_module(model, name, _PendingLinear(entry, self.infix, fields, bias))
        _untie_quantized(model, modules)
        # Aliases save_quantized dropped (tied storage) that transformers does not tie itself are filled from
        # their source after loading; keep them out of the missing-keys report.
        untied = [alias for alias in qconfig.get("tied", {}) if alias not in _hf_tied_keys(model)]
        if untied:
            model._keys_to_ignore_on_load_missing = list(model._keys_to_ignore_on_load_missing or []) + [
                rf"^{re.escape(alias)}$" for alias in untied]
        self._qconfig = qconfig
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        qconfig = self._qconfig
        if qconfig is None:  # pragma: no cover - transformers always runs the before-hook first
            raise RuntimeError("CMPQ quantizer: weights were loaded without _process_model_before_weight_loading")
        _check_no_offload(getattr(model, "hf_device_map", None))  # set by accelerate's dispatch_model
        for name, entry in qconfig["modules"].items():
            pending = model.get_submodule(name)
            if not isinstance(pending, _PendingLinear):  # pragma: no cover
                raise RuntimeError(f"{name}: expected the placeholder, found {type(pending).__name__}")
            packed = getattr(pending, self.infix)
            tensors = {f"{name}.{self.infix}.{f}": getattr(packed, f) for f in self.fields}
            if pending.bias is not None:
                tensors[f"{name}.bias"] = pending.bias
            unloaded = sorted(k for k, t in tensors.items() if t.is_meta)
            if unloaded:
                raise ValueError(f"{name}: from_pretrained did not load {', '.join(unloaded)}")
            module = self._build(name, entry, tensors)
            hook = getattr(pending, "_hf_hook", None)  # accelerate hook of a multi-GPU map naming this module
            if hook is not None:
                from accelerate.hooks import add_hook_to_module

                add_hook_to_module(module, hook)
            replace_module(model, name, module)
        fill_tied(model, qconfig.get("tied", {}))
        self._model_ref = weakref.ref(model)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        model = self._model_ref() if self._model_ref is not None else None
        if model is not None and getattr(model, "_hf_peft_config_loaded", False):
            return False  # save_pretrained then saves only the adapters, which is fine
        raise NotImplementedError(f"save_pretrained cannot write a CMPQ checkpoint: {_SAVE_HINT}")

    @property
    def is_trainable(self) -> bool:
        return False


class MixLLMHfQuantizer(CMPQHfQuantizer):
    """transformers quantizer for MixLLM checkpoints (:mod:`cmpq_kernels.mixllm_checkpoint`): the same hooks, with
    MixLLM's config, tensor names and :class:`MixLLMLinear` (built by the code :func:`load_mixllm` uses)."""

    infix = "mixllm"
    fields = MIXLLM_FIELDS

    def _read_config(self, directory: str) -> dict:
        return mixllm_checkpoint.read_mixllm_config(directory)[1]

    def _check_header(self, model: nn.Module, header: Header, modules: dict) -> None:
        for name, entry in modules.items():
            check_target(model, name, entry)
        mixllm_checkpoint.check_keys(header, modules)

    def _build(self, name: str, entry: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
        return MixLLMLinear(mixllm_checkpoint.layer_from_tensors(name, entry, tensors), entry["act_bits"])


def _check_no_offload(device_map: Any) -> None:
    if isinstance(device_map, dict):
        devices = {str(d) for d in device_map.values()}
        if "disk" in devices or ("cpu" in devices and len(devices) > 1):
            raise ValueError(f"CMPQ checkpoints do not support CPU/disk offload (device_map {device_map}); "
                             "load onto one device (e.g. device_map='cuda', or none) or spread over GPUs only")


def _untie_quantized(model: nn.Module, modules: dict) -> None:
    """Drop transformers' weight ties that involve a quantized module (e.g. a quantized ``lm_head`` of a model whose
    config still says ``tie_word_embeddings``): the module has no ``weight`` to tie, as after load_quantized."""
    for prefix, sub in model.named_modules():
        tied = getattr(sub, "all_tied_weights_keys", None)
        if not isinstance(tied, dict):
            continue
        for target, source in list(tied.items()):
            owners = (f"{prefix}.{key}" if prefix else key for key in (target, source))
            if any(owner.rpartition(".")[0] in modules for owner in owners):
                del tied[target]


def _hf_tied_keys(model: nn.Module) -> set:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) | set(tied.values())


def register() -> None:
    """Register ``quant_method`` ``"cmpq"`` and ``"mixllm"`` (config + quantizer) with transformers. Idempotent; run on
    import."""
    for method, config_cls, quantizer_cls in ((QUANT_METHOD, CMPQConfig, CMPQHfQuantizer),
                                              (MIXLLM_METHOD, MixLLMConfig, MixLLMHfQuantizer)):
        for mapping, registrar, cls in ((AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config, config_cls),
                                        (AUTO_QUANTIZER_MAPPING, register_quantizer, quantizer_cls)):
            existing = mapping.get(method)
            if existing is cls:
                continue
            if existing is None:
                registrar(method)(cls)
            elif getattr(existing, "__module__", None) == __name__:
                mapping[method] = cls  # this module was re-imported (importlib.reload): replace the older copy
            else:
                raise RuntimeError(f"transformers already has a {method!r} quantization method "
                                   f"({existing.__module__}.{existing.__qualname__}); cannot register cmpq_kernels'")


register()
