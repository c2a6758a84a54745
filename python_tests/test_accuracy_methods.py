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


def test_validation_windows_are_calibration_text_calibration_did_not_use() -> None:
    ids = calibration()
    val = acc.validation_ids(ids, None, ARGS.calib_samples, ARGS.calib_len, 6)
    used = acc.calibration_ids([ids], None, ARGS.calib_samples, ARGS.calib_len, 0)
    windows = ids.reshape(-1, ARGS.calib_len)  # 16 non-overlapping windows, 4 of them calibration
    assert val.shape == (6, ARGS.calib_len)
    starts = [next(i for i, w in enumerate(windows) if torch.equal(w, v)) for v in val]
    assert starts == sorted(set(starts))  # distinct, in text order
    assert not any(torch.equal(v, u) for v in val for u in used)
    # Calibration is what it was: validation does not change which windows calibration draws.
    assert torch.equal(acc.calibration_ids([ids], None, ARGS.calib_samples, ARGS.calib_len, 0), used)
    with pytest.raises(SystemExit, match="only 12 calibration windows"):
        acc.validation_ids(ids, None, ARGS.calib_samples, ARGS.calib_len, 13)


def test_windows_perplexity_scores_each_window_after_the_prefix() -> None:
    model = tiny_llama()
    windows = calibration()[:128].reshape(2, 64)
    ppl = acc.windows_perplexity(model, windows, [])
    with torch.no_grad():
        nll = sum(float(nn.functional.cross_entropy(model(input_ids=w[None]).logits[0, :-1], w[1:], reduction="sum"))
                  for w in windows)
    assert ppl == pytest.approx(torch.tensor(nll / 126).exp().item(), rel=1e-5)
    # With a prefix every window token is predicted: 64 per window.
    with torch.no_grad():
        seqs = [torch.cat([torch.tensor([5]), w]) for w in windows]
        nll = sum(float(nn.functional.cross_entropy(model(input_ids=s[None]).logits[0, :-1], s[1:], reduction="sum"))
                  for s in seqs)
    assert acc.windows_perplexity(model, windows, [5]) == pytest.approx(torch.tensor(nll / 128).exp().item(), rel=1e-5)


@pytest.mark.parametrize("spec,allocator,rows", [("cmpq-eff-greedy-r1:3.0", "greedy", 1),
                                                  ("cmpq-eff-greedy-r2:3.0", "greedy", 2),
                                                  ("cmpq-eff-paper-r4:3.0", "cmpq", 4)])
def test_budget_sweep_specs(monkeypatch: pytest.MonkeyPatch, spec: str, allocator: str, rows: int) -> None:
    seen = {}

    def fake_quantize_model(model, calib, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")
    monkeypatch.setattr(acc, "quantize_model", fake_quantize_model)
    with pytest.raises(RuntimeError, match="stop"):
        acc.run_method(spec, tiny_llama(), None, calibration(), ARGS)
    assert seen["effective_bits"] == 3.0 and "bits" not in seen
    assert seen["allocator"] == allocator and seen["codebook_rows"] == rows


def test_markdown_shows_val_ppl_blank_for_old_rows(tmp_path) -> None:
    rows = {"fp32": {"method": "fp32", "ppl": 10.0, "code_bits": 32.0, "effective_bits": 32.0, "quantize_seconds": 0},
            "cmpq-eff:3.0": {"method": "cmpq-eff:3.0", "ppl": 12.0, "val_ppl": 11.5, "code_bits": 2.5,
                             "effective_bits": 3.0, "quantize_seconds": 200}}
    acc.write_outputs(rows, str(tmp_path / "acc"), {"model": "m", "note": "n"})
    md = (tmp_path / "acc.md").read_text()
    assert "| val ppl |" in md
    assert "| cmpq-eff:3.0 | 2.500 | 3.000 | 12.000 | 1.200 | 11.500 | 200 |" in md
    assert "| fp32 | 32.000 | 32.000 | 10.000 | 1.000 |  | 0 |" in md
