"""Perplexity of a causal LM on a text: the quality measure of every accuracy table (docs/DESIGN.md §5)."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from .progress import progress as progress_iter


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, text: str, seq_len: int = 512, max_tokens: Optional[int] = None,
               progress: bool = True) -> float:
    """Perplexity of ``model`` on ``text`` over non-overlapping windows of ``seq_len`` tokens.

    The text is tokenized once (with the tokenizer's special tokens); windows are scored independently
    and every token after the first of its window is predicted, so the number is deterministic and
    comparable across FP, CMPQ and other quantized versions of the same model. ``max_tokens`` caps the
    tokens used (from the start of the text).
    """
    if not text.strip():
        raise ValueError("evaluation text is empty")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    device = next(model.parameters()).device
    windows = [ids[s:s + seq_len] for s in range(0, ids.numel(), seq_len) if ids[s:s + seq_len].numel() >= 2]
    nll, count = 0.0, 0
    for window in progress_iter(windows, "perplexity", enabled=progress):
        logits = model(input_ids=window[None].to(device), use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, window[1:].to(device), reduction="sum"))
        count += window.numel() - 1
    return math.exp(nll / count)
