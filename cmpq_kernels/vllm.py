"""Serve CMPQ and MixLLM checkpoints with vLLM: quantization plugins registered as ``"cmpq"`` and ``"mixllm"``
(docs/DESIGN.md §10).

Installed with the package, the ``vllm.general_plugins`` entry point calls :func:`register` in every vLLM
process, so a checkpoint written by :func:`cmpq_kernels.save_quantized` or :func:`cmpq_kernels.save_mixllm` serves
with no import::

    vllm serve ./smollm2-cmpq                  # or LLM(model="./smollm2-cmpq")

vLLM reads ``quantization_config.quant_method`` from config.json and asks :class:`CMPQVllmConfig` or
:class:`MixLLMVllmConfig` for a method per linear layer. The two formats differ only in what :class:`PackedMethod`
lists (fields, validation, shard and fusion math, the module that runs a layer); how a layer loads
(:class:`PackedLinearMethod`) is shared:

1. ``create_weights`` gives the layer a child module named after the method (``cmpq`` / ``mixllm``) with one empty
   parameter per packed field, so the checkpoint's ``<module>.<method>.<field>`` tensors (``q_proj``/``k_proj``/
   ``v_proj`` renamed by vLLM to the fused ``qkv_proj`` with a shard id) reach the field loader, which keeps them
   per part.
2. ``process_weights_after_loading`` builds each part's layer (validated as on any load), cuts this rank's shard
   (:mod:`cmpq_kernels.tensor_parallel`: rows for column-parallel layers; for row-parallel ones a zero-padded
   repack of the rank's input channels (CMPQ) or the rank's whole 128-channel groups (MixLLM)), stacks the parts
   of a fused layer into one matrix when they can be one (CMPQ: one shared input permutation, which
   ``share_input_widths`` gives; MixLLM: the same act_bits) and keeps them as separate products otherwise, then
   holds the result as :class:`~cmpq_kernels.nn.CMPQLinear` / :class:`~cmpq_kernels.mixllm_nn.MixLLMLinear` modules.
3. ``apply`` runs the method's op (fake impls exist, so vLLM's compiled graphs trace it).

The whole checkpoint of one part is held until its shard is cut; a rank ends up with its shard only.
Limits: decoder linears only (a quantized ``lm_head`` is refused), dtypes float32/float16/bfloat16, any
tensor-parallel size whose shards fall on codebook-row boundaries (CMPQ) or 128-channel groups (MixLLM
row-parallel layers); pipeline parallelism and LoRA are untested.
"""
from __future__ import annotations

import os
import dataclasses
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
# vLLM is an optional dependency; only this module needs it, and nothing in the package imports this module.
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.logger import init_logger
from vllm.model_executor.utils import set_weight_attrs

from . import mixllm_format, tensor_parallel as tp
from .checkpoint import QUANT_METHOD, check_quantization_config, layer_from_tensors, verify_weights
from .format import LAYER_FIELDS, field_dtype
from .mixllm_checkpoint import check_mixllm_config, layer_from_tensors as mixllm_layer_from_tensors
from .mixllm_nn import MixLLMLinear
from .nn import CMPQLinear

__all__ = ["PackedMethod", "CMPQ", "MIXLLM", "CMPQVllmConfig", "MixLLMVllmConfig", "PackedLinearMethod", "register"]

logger = init_logger(__name__)

#: vLLM's shard ids of the parts of a fused layer, in output order (a plain layer has the single id None).
_PART_INDEX = {"q": 0, "k": 1, "v": 2, None: 0, 0: 0, 1: 1}


@dataclasses.dataclass(frozen=True)
class PackedMethod:
    """What the vLLM glue needs to know of one packed format (the rest is shared)."""

    name: str                                             #: quant_method, and the child module holding the fields
    fields: tuple[str, ...]                               #: packed tensors, as named in the checkpoint
    field_dtype: Callable[[str, int], torch.dtype]        #: (field, in_features) -> dtype
    check_config: Callable[[Any, str], None]              #: (quantization_config, where) -> raises ValueError
    layer_from_tensors: Callable[[str, dict, dict], Any]  #: (module, entry, {"<module>.<name>.<field>": t}) -> layer
    slice_rows: Callable[[Any, int, int], Any]            #: output rows [start, start + size)
    slice_columns: Callable[[Any, int, int], Any]         #: input channels [start, start + size); k may be padded
    fusion_problem: Callable[[Sequence[Any]], Optional[str]]
    concat_rows: Callable[[Sequence[Any]], Any]
    module: Callable[[Any, dict], nn.Module]              #: (layer, checkpoint entry) -> the module that runs it


CMPQ = PackedMethod(QUANT_METHOD, LAYER_FIELDS, field_dtype, check_quantization_config, layer_from_tensors, tp.slice_rows,
                    lambda layer, start, size: tp.slice_columns(layer, start, size).layer, tp.fusion_problem,
                    tp.concat_rows, lambda layer, entry: CMPQLinear(layer))
MIXLLM = PackedMethod(mixllm_format.QUANT_METHOD, mixllm_format.LAYER_FIELDS,
                      lambda field, k: mixllm_format.FIELD_DTYPES[field], check_mixllm_config, mixllm_layer_from_tensors,
                      tp.mixllm_slice_rows, tp.mixllm_slice_columns, tp.mixllm_fusion_problem, tp.mixllm_concat_rows,
                      lambda layer, entry: MixLLMLinear(layer, entry["act_bits"]))


class PackedVllmConfig(QuantizationConfig):
    """The ``quantization_config`` of a checkpoint of :attr:`method`, as vLLM sees it (validated on construction)."""

    method: PackedMethod

    def __init__(self, qconfig: dict[str, Any]) -> None:
        super().__init__()
        self.method.check_config(qconfig, "quantization_config")
        self.qconfig = qconfig
        self.modules: dict[str, dict] = qconfig["modules"]

    def get_name(self) -> str:
        return self.method.name

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the CUDA kernels are built for sm_80 and newer; the CPU build ignores this

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PackedVllmConfig":
        return cls(config)

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: Optional[str] = None) -> None:
        """Check the weights files' SHA-256 against the checkpoint's record, as every loader here does."""
        if os.path.isdir(model_name):
            verify_weights(model_name, self.qconfig)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> Optional[QuantizeMethodBase]:
        if isinstance(layer, VocabParallelEmbedding):
            if prefix in self.modules:
                raise ValueError(f"{prefix}: a quantized lm_head is not supported by the vLLM plugin; quantize "
                                 "without quantize_lm_head")
            return None
        if not isinstance(layer, LinearBase):
            return None
        parts = self.part_names(prefix)
        listed = [p in self.modules for p in parts]
        if not any(listed):
            return UnquantizedLinearMethod()
        if not all(listed):
            raise ValueError(f"{prefix}: vLLM fuses {parts}, but the checkpoint quantized only "
                             f"{[p for p, q in zip(parts, listed) if q]}; quantize all of them or none")
        return PackedLinearMethod(self.method, [self.modules[p] for p in parts], parts)

    def part_names(self, prefix: str) -> list[str]:
        """Checkpoint module names of vLLM layer ``prefix`` (``...qkv_proj`` -> ``...q_proj``, ``k_proj``, ``v_proj``)."""
        parent, _, leaf = prefix.rpartition(".")
        fused = self.packed_modules_mapping.get(leaf)
        return [f"{parent}.{p}" if parent else p for p in fused] if fused else [prefix]


class CMPQVllmConfig(PackedVllmConfig):
    """vLLM's ``"cmpq"`` quantization: checkpoints of :func:`cmpq_kernels.save_quantized`."""

    method = CMPQ


class MixLLMVllmConfig(PackedVllmConfig):
    """vLLM's ``"mixllm"`` quantization: checkpoints of :func:`cmpq_kernels.save_mixllm`."""

    method = MIXLLM


class PackedLinearMethod(LinearMethodBase):
    """Loads, shards and runs one vLLM linear layer whose parts are packed layers of ``method``."""

    def __init__(self, method: PackedMethod, entries: list[dict], names: list[str]) -> None:
        self.method = method
        self.entries = entries
        self.names = names

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        if len(output_partition_sizes) != len(self.entries):
            raise ValueError(f"{self.names}: vLLM expects {len(output_partition_sizes)} parts, the checkpoint has "
                             f"{len(self.entries)}")
        for name, entry, rows in zip(self.names, self.entries, output_partition_sizes):
            if entry["in_features"] != input_size or not 0 < rows <= entry["out_features"]:
                raise ValueError(f"{name}: the model wants {rows} of {input_size}-wide rows on this rank, the "
                                 f"checkpoint has {entry['out_features']}x{entry['in_features']}")
        holder = nn.Module()
        for field in self.method.fields:
            param = nn.Parameter(torch.empty(0, dtype=self.method.field_dtype(field, input_size)), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": self._field_loader(layer, field)})
            holder.register_parameter(field, param)
        setattr(layer, self.method.name, holder)
        layer.packed_parts = [{} for _ in self.entries]  # part -> field -> tensor, as loaded
        layer.packed_input = (input_size_per_partition, input_size)
        layer.packed_rows = list(output_partition_sizes)

    def _field_loader(self, layer: nn.Module, field: str):
        def load(param: nn.Parameter, tensor: torch.Tensor, shard_id: Any = None) -> None:
            shard_id = getattr(tensor, "shard_id", shard_id)
            if shard_id not in _PART_INDEX or _PART_INDEX[shard_id] >= len(layer.packed_parts):
                raise ValueError(f"{self.names}: unexpected part {shard_id!r} for field {field}")
            layer.packed_parts[_PART_INDEX[shard_id]][field] = tensor
        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        shards = [self._shard(layer, i) for i in range(len(self.entries))]
        entries = self.entries
        if len(shards) > 1:
            problem = self.method.fusion_problem(shards)
            if problem is None and len({entry.get("act_bits") for entry in entries}) > 1:
                problem = "the parts quantize their activations differently (act_bits)"
            if problem is None:
                shards, entries = [self.method.concat_rows(shards)], entries[:1]
            else:  # still exact: one product per part, outputs concatenated
                logger.warning_once("%s: %s are run as %d separate products (%s)", self.method.name,
                                    ", ".join(self.names), len(shards), problem)
        del layer.packed_parts
        setattr(layer, self.method.name, nn.ModuleList(self.method.module(s, e) for s, e in zip(shards, entries)))

    def _shard(self, layer: nn.Module, part: int) -> Any:
        name, entry, tensors = self.names[part], self.entries[part], layer.packed_parts[part]
        missing = [f for f in self.method.fields if f not in tensors]
        if missing:
            raise ValueError(f"{name}: the checkpoint lacks {', '.join(missing)}")
        full = self.method.layer_from_tensors(name, {**entry, "bias": False},
                                              {f"{name}.{self.method.name}.{f}": t for f, t in tensors.items()})
        local_k, k = layer.packed_input
        if local_k != k:  # row-parallel: this rank's input channels
            return self.method.slice_columns(full, layer.tp_rank * local_k, local_k)
        rows = layer.packed_rows[part]
        if rows == full.n:
            return full
        return self.method.slice_rows(full, self._row_shard(layer, part) * rows, rows)

    def _row_shard(self, layer: nn.Module, part: int) -> int:
        """Which block of ``rows`` this rank holds: k/v heads are replicated over ``num_kv_head_replicas`` ranks."""
        if len(self.entries) == 3 and part > 0:
            return layer.tp_rank // getattr(layer, "num_kv_head_replicas", 1)
        return layer.tp_rank

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        parts = [module(_padded(x, module.in_features)) for module in getattr(layer, self.method.name)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y if bias is None else y + bias


def _padded(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` with zero columns up to ``k``: a row-parallel shard's padding channels (:func:`slice_columns`)."""
    return x if x.shape[-1] == k else F.pad(x, (0, k - x.shape[-1]))


def register() -> None:
    """Register the ``"cmpq"`` and ``"mixllm"`` methods with vLLM (the ``vllm.general_plugins`` entry point;
    idempotent)."""
    for config in (CMPQVllmConfig, MixLLMVllmConfig):
        register_quantization_config(config.method.name)(config)
