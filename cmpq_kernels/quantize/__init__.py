"""The CMPQ quantizer: calibration -> allocation -> permutation -> codebooks -> outliers -> packed layers.

One module per stage: :mod:`.options` (every setting, once), :mod:`.allocate` (bit widths per channel),
:mod:`.codebook` (weighted k-means), :mod:`.outliers` (the two outlier kinds), :mod:`.gptq` (error feedback),
:mod:`.mixllm` (the MixLLM quantizer, sharing the calibration pipeline), :mod:`.layer` (one weight -> :class:`~cmpq_kernels.format.CMPQLayer`), :mod:`.standin` (the calibration-free
stand-in), :mod:`.linear` (one ``nn.Linear`` -> :class:`~cmpq_kernels.nn.CMPQLinear`), :mod:`.calibrate`
(activation statistics, block by block) and :mod:`.model` (a whole Hugging Face causal LM).
"""
from __future__ import annotations

from .allocate import allocate
from .calibrate import LayerStats, calibrate, calibration_ids, find_blocks
from .layer import quantize_weight
from .linear import quantize_linear
from .mixllm import quantize_model_mixllm
from .model import QuantReport, quantize_model
from .options import ALLOCATORS, QuantOptions
from .standin import quantize_standin

__all__ = ["ALLOCATORS", "LayerStats", "QuantOptions", "QuantReport", "allocate", "calibrate", "calibration_ids",
           "find_blocks", "quantize_linear", "quantize_model", "quantize_model_mixllm", "quantize_standin", "quantize_weight"]
