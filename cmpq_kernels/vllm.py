"""Serve CMPQ checkpoints with vLLM: a quantization plugin registered as ``"cmpq"`` (docs/DESIGN.md §10).

Installed with the package, the ``vllm.general_plugins`` entry point calls :func:`register` in every vLLM
process, so a checkpoint written by :func:`cmpq_kernels.save_quantized` serves with no import::

    vllm serve ./smollm2-cmpq                  # or LLM(model="./smollm2-cmpq")

vLLM reads ``quantization_config.quant_method == "cmpq"`` from config.json and asks
:class:`CMPQVllmConfig` for a method per linear layer. How a layer loads (:class:`CMPQLinearMethod`):

1. ``create_weights`` gives the layer a child module ``cmpq`` with one empty parameter per packed field, so the
   checkpoint's ``<module>.cmpq.<field>`` tensors (``q_proj``/``k_proj``/``v_proj`` renamed by vLLM to the fused
   ``qkv_proj`` with a shard id) reach :meth:`CMPQLinearMethod.load_field`, which keeps them per part.
2. ``process_weights_after_loading`` builds each part's :class:`~cmpq_kernels.format.CMPQLayer` (validated as
   on any load), cuts this rank's shard (:mod:`cmpq_kernels.tensor_parallel`: rows for column-parallel layers,
   a zero-padded repack of the rank's input channels for row-parallel ones), stacks the parts of a fused layer
   into one matrix when they share one input permutation (checkpoints quantized with ``share_input_widths``,
   the default) and keeps them as separate products otherwise, then holds the result as
   :class:`~cmpq_kernels.nn.CMPQLinear` modules.
3. ``apply`` runs ``torch.ops.cmpq.gemm`` (fake impls exist, so vLLM's compiled graphs trace it).

The whole checkpoint of one part is held until its shard is cut; a rank ends up with its shard only.
Limits: decoder linears only (a quantized ``lm_head`` is refused), dtypes float32/float16/bfloat16, any
tensor-parallel size whose row ranges fall on codebook-row boundaries; pipeline parallelism and LoRA are untested.
"""
from __future__ import annotations

import os
from typing import Any, Optional

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

from .checkpoint import QUANT_METHOD, check_quantization_config, layer_from_tensors, verify_weights
from .format import LAYER_FIELDS, CMPQLayer, field_dtype
from .nn import CMPQLinear
from .tensor_parallel import concat_rows, fusion_problem, slice_columns, slice_rows

__all__ = ["CMPQVllmConfig", "CMPQLinearMethod", "register"]

logger = init_logger(__name__)

#: vLLM's shard ids of the parts of a fused layer, in output order (a plain layer has the single id None).
_PART_INDEX = {"q": 0, "k": 1, "v": 2, None: 0, 0: 0, 1: 1}


class CMPQVllmConfig(QuantizationConfig):
    """The ``quantization_config`` of a CMPQ checkpoint, as vLLM sees it (validated on construction)."""

    def __init__(self, qconfig: dict[str, Any]) -> None:
        super().__init__()
        check_quantization_config(qconfig, "quantization_config")
        self.qconfig = qconfig
        self.modules: dict[str, dict] = qconfig["modules"]

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the CUDA kernels are built for sm_80 and newer; the CPU build ignores this

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CMPQVllmConfig":
        return cls(config)

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: Optional[str] = None) -> None:
        """Check the weights files' SHA-256 against the checkpoint's record, as every CMPQ loader does."""
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
        return CMPQLinearMethod([self.modules[p] for p in parts], parts)

    def part_names(self, prefix: str) -> list[str]:
        """Checkpoint module names of vLLM layer ``prefix`` (``...qkv_proj`` -> ``...q_proj``, ``k_proj``, ``v_proj``)."""
        parent, _, leaf = prefix.rpartition(".")
        fused = self.packed_modules_mapping.get(leaf)
        return [f"{parent}.{p}" if parent else p for p in fused] if fused else [prefix]


class CMPQLinearMethod(LinearMethodBase):
    """Loads, shards and runs one vLLM linear layer whose parts are CMPQ layers."""

    def __init__(self, entries: list[dict], names: list[str]) -> None:
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
        layer.cmpq = nn.Module()
        for field in LAYER_FIELDS:
            param = nn.Parameter(torch.empty(0, dtype=field_dtype(field, input_size)), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": self._field_loader(layer, field)})
            layer.cmpq.register_parameter(field, param)
        layer.cmpq_parts = [{} for _ in self.entries]  # part -> field -> tensor, as loaded
        layer.cmpq_input = (input_size_per_partition, input_size)
        layer.cmpq_rows = list(output_partition_sizes)

    def _field_loader(self, layer: nn.Module, field: str):
        def load(param: nn.Parameter, tensor: torch.Tensor, shard_id: Any = None) -> None:
            shard_id = getattr(tensor, "shard_id", shard_id)
            if shard_id not in _PART_INDEX or _PART_INDEX[shard_id] >= len(layer.cmpq_parts):
                raise ValueError(f"{self.names}: unexpected part {shard_id!r} for field {field}")
            layer.cmpq_parts[_PART_INDEX[shard_id]][field] = tensor
        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        shards = [self._shard(layer, i) for i in range(len(self.entries))]
        if len(shards) > 1:
            problem = fusion_problem(shards)
            if problem is None:
                shards = [concat_rows(shards)]
            else:  # still exact: one product per part, outputs concatenated
                logger.warning_once("cmpq: %s are run as %d separate products (%s); quantize with "
                                    "share_input_widths=True to fuse them", ", ".join(self.names), len(shards), problem)
        del layer.cmpq, layer.cmpq_parts
        layer.cmpq = nn.ModuleList(CMPQLinear(s) for s in shards)

    def _shard(self, layer: nn.Module, part: int) -> CMPQLayer:
        name, entry, tensors = self.names[part], self.entries[part], layer.cmpq_parts[part]
        missing = [f for f in LAYER_FIELDS if f not in tensors]
        if missing:
            raise ValueError(f"{name}: the checkpoint lacks {', '.join(missing)}")
        full = layer_from_tensors(name, {**entry, "bias": False}, {f"{name}.cmpq.{f}": t for f, t in tensors.items()})
        local_k, k = layer.cmpq_input
        if local_k != k:  # row-parallel: this rank's input channels
            return slice_columns(full, layer.tp_rank * local_k, local_k).layer
        rows = layer.cmpq_rows[part]
        if rows == full.n:
            return full
        return slice_rows(full, self._row_shard(layer, part) * rows, rows)

    def _row_shard(self, layer: nn.Module, part: int) -> int:
        """Which block of ``rows`` this rank holds: k/v heads are replicated over ``num_kv_head_replicas`` ranks."""
        if len(self.entries) == 3 and part > 0:
            return layer.tp_rank // getattr(layer, "num_kv_head_replicas", 1)
        return layer.tp_rank

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        parts = [module(_padded(x, module.in_features)) for module in layer.cmpq]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y if bias is None else y + bias


def _padded(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` with zero columns up to ``k``: a row-parallel shard's padding channels (:func:`slice_columns`)."""
    return x if x.shape[-1] == k else F.pad(x, (0, k - x.shape[-1]))


def register() -> None:
    """Register the ``"cmpq"`` method with vLLM (the ``vllm.general_plugins`` entry point; idempotent)."""
    register_quantization_config(QUANT_METHOD)(CMPQVllmConfig)
