"""Perplexity evaluation (cmpq_kernels.perplexity) on tiny models: deterministic, FP and CMPQ alike."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from cmpq_kernels.models import find_gguf  # noqa: E402
from cmpq_kernels.perplexity import perplexity  # noqa: E402
from cmpq_kernels.quantize import quantize_model  # noqa: E402
from test_quantize_model import VOCAB, calibration_tokens, tiny_llama  # noqa: E402


class ByteTokenizer:
    """Characters -> ids below VOCAB; enough for windowing tests."""

    def __call__(self, text, return_tensors="pt", add_special_tokens=True):
        return {"input_ids": torch.tensor([[ord(c) % VOCAB for c in text]])}


TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def test_perplexity_is_deterministic_and_finite():
    model = tiny_llama()
    a = perplexity(model, ByteTokenizer(), TEXT, seq_len=64, progress=False)
    b = perplexity(model, ByteTokenizer(), TEXT, seq_len=64, progress=False)
    assert a == b and math.isfinite(a)
    # A random-init model is close to uniform over the vocabulary.
    assert 0.5 * VOCAB < a < 2 * VOCAB


def test_perplexity_of_a_cmpq_model_is_close_to_fp():
    model = tiny_llama()
    fp = perplexity(model, ByteTokenizer(), TEXT, seq_len=64, max_tokens=512, progress=False)
    quantize_model(model, calibration_tokens(), 4.0, n_samples=4, seq_len=64, progress=False)
    q = perplexity(model, ByteTokenizer(), TEXT, seq_len=64, max_tokens=512, progress=False)
    assert abs(q / fp - 1) < 0.05


def test_bad_inputs_raise():
    model = tiny_llama()
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, ByteTokenizer(), "   ", progress=False)
    with pytest.raises(ValueError, match="unknown model"):
        find_gguf("no-such-model")
