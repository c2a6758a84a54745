"""bench/accuracy.py's MixLLM rows and 8-bit GPTQ on a tiny Llama: what is evaluated and how bits are counted."""
from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from cmpq_kernels import MixLLMLinear
from conftest import import_bench

transformers = pytest.importorskip("transformers")
acc = import_bench("accuracy")

VOCAB = 96
ARGS = argparse.Namespace(calib_samples=4, calib_len=64)


def tiny_llama() -> nn.Module:
    """hidden 160 (a multiple of 32, above MixLLM's min_dim 64 in every linear, k/v 80 wide)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=160, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1024,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("spec,act_bits", [("mixllm:p10", 8), ("mixllm-a16:p10", 16)])
def test_mixllm_rows_run_the_op_and_count_every_stored_bit(spec: str, act_bits: int) -> None:
    model = tiny_llama()
    info = acc.run_method(spec, model, None, calibration(), ARGS)
    modules = [m for m in model.model.layers.modules() if isinstance(m, MixLLMLinear)]
    assert len(modules) == 14 and not any(type(m) is nn.Linear for m in model.model.layers.modules())
    assert all(m.act_bits == act_bits for m in modules) and info["act_bits"] == act_bits
    weights = sum(m.in_features * m.out_features for m in modules)
    stored = sum(sum(m.layer.storage_bits().values()) for m in modules)
    assert info["effective_bits"] == pytest.approx(stored / weights)
    assert info["rows"] == sum(m.out_features for m in modules)
    assert info["rows_8bit"] == round(0.1 * info["rows"])


def test_mixllm_spec_must_name_a_percentage() -> None:
    with pytest.raises(SystemExit, match="mixllm:p<percent"):
        acc.run_method("mixllm:10", tiny_llama(), None, calibration(), ARGS)


def test_gptq_takes_eight_bits() -> None:
    model = tiny_llama()
    before = {n: m.weight.detach().clone() for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}
    info = acc.run_method("gptq:b8:g32", model, None, calibration(), ARGS)
    assert info["effective_bits"] == 8 + 24 / 32 and info["code_bits"] == 8.0
    for name, w in before.items():
        new = model.model.layers.get_submodule(name).weight.detach()
        err = float((new - w).norm() / w.norm())
        assert 0 < err < 0.01, (name, err)  # quantized (changed), but on a 255-step grid
    with pytest.raises(SystemExit, match="bits must be in 2..8"):
        acc.run_method("gptq:b9:g32", tiny_llama(), None, calibration(), ARGS)
