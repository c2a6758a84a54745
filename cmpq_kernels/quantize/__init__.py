"""The CMPQ quantizer: calibration -> allocation -> permutation -> codebooks -> outliers -> packed layers.

One module per stage: :mod:`.allocate` (bit widths per channel), :mod:`.codebook` (weighted k-means),
:mod:`.outliers` (the two outlier kinds), :mod:`.gptq` (error feedback), :mod:`.layer` (one weight ->
:class:`~cmpq_kernels.format.CMPQLayer`), :mod:`.calibrate` (activation statistics, block by block) and
:mod:`.model` (a whole Hugging Face causal LM).
"""
from __future__ import annotations

from .allocate import ALLOCATORS, allocate
from .calibrate import LayerStats, calibrate, calibration_ids, find_blocks
from .layer import quantize_weight
from .model import QuantReport, quantize_model

__all__ = ["ALLOCATORS", "LayerStats", "QuantReport", "allocate", "calibrate", "calibration_ids", "find_blocks",
           "quantize_model", "quantize_weight"]
