"""The optional peer quantizers of bench/accuracy.py (HQQ, bitsandbytes NF4): error and bit accounting.

Each peer test skips when its package is missing, and the skip reason (``pytest -rs``) gives the command that
installs it; both install and run on a CPU-only machine (about 10 s for this file). The bounds are for a
seeded 256 x 512 Gaussian matrix; they leave ~25 % margin over the measured errors, and the 2 -> 3 -> 4 bit
ordering catches bits that are mis-passed, a wrong dequantize blows the bounds.
"""
from __future__ import annotations

import argparse
import sys

import pytest
import torch
from torch import nn

from conftest import import_bench

acc = import_bench("accuracy")

N, K = 256, 512


def require_peer(kind: str) -> None:
    """Skip unless the optional package of peer ``kind`` ('hqq', 'nf4', 'nf4dq') imports; say how to get it."""
    package, pip = acc.PEERS[kind]
    pytest.importorskip(package, reason=f"optional peer quantizer {package!r} not installed; CI can add it "
                                        f"with: {pip}")


def gaussian() -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(0))


def rel_err(spec: str, w: torch.Tensor) -> float:
    deq, _, _ = acc.peer_quantizer(spec)(w)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    return float((deq - w).norm() / w.norm())


def test_hqq_error_falls_with_bits() -> None:
    require_peer("hqq")
    w = gaussian()
    e2, e3, e4 = (rel_err(f"hqq:b{b}:g64", w) for b in (2, 3, 4))
    assert e2 < 0.55 and e3 < 0.23 and e4 < 0.11, (e2, e3, e4)  # measured 0.43, 0.18, 0.087
    assert e3 < 0.6 * e2 and e4 < 0.6 * e3, (e2, e3, e4)


def test_nf4_error() -> None:
    require_peer("nf4")
    w = gaussian()
    single, double = rel_err("nf4:g64", w), rel_err("nf4dq:g64", w)
    assert single < 0.115, single  # measured 0.092
    assert abs(double - single) < 0.01 * single, (single, double)  # 8-bit absmax barely matters


@pytest.mark.parametrize("spec, code_bits, effective_bits", [
    ("hqq:b2:g64", 2.0, 2.5),
    ("hqq:b3:g64", 3.203125, 3.703125),  # 10 codes per int32; 2048 groups padded to 2050
    ("hqq:b4:g64", 4.0, 4.5),
    ("hqq:b4:g128", 4.0, 4.25),
    ("nf4:g64", 4.0, 4.5),
    ("nf4dq:g64", 4.0, 4 + 8 / 64 + (8 * 32 + 32) / (N * K)),  # uint8 absmax, 8 fp32 absmax2, fp32 offset
])
def test_effective_bits(spec: str, code_bits: float, effective_bits: float) -> None:
    require_peer(spec.split(":")[0])
    _, code, total = acc.peer_quantizer(spec)(gaussian())
    assert code / (N * K) == pytest.approx(code_bits, abs=1e-12)
    assert total / (N * K) == pytest.approx(effective_bits, abs=1e-12)


@pytest.mark.parametrize("spec, package", [("hqq:b4:g64", "hqq"), ("nf4:g64", "bitsandbytes")])
def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch, spec: str, package: str) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # makes the import fail
    with pytest.raises(SystemExit, match=f"pip install .*{package}"):
        acc.peer_quantizer(spec)


def test_run_method_replaces_block_linears() -> None:
    require_peer("nf4")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
        info = acc.run_method("nf4:g64", model, None, "", argparse.Namespace(calib_samples=1, calib_len=8))
        out = model(ids).logits
    assert info == {"effective_bits": 4.5, "code_bits": 4.0}
    assert all(type(m) is nn.Linear for m in model.model.layers.modules() if isinstance(m, nn.Linear))
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.2
