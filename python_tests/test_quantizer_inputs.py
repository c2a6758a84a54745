"""Bad inputs to the quantizer (``quantize_model``, its calibration data, ``quantize_weight``) raise a clear
exception naming the problem, before any layer of the model is replaced or changed.

Every error is matched on its message, not only its type.
"""
from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the quantizer's model-level API needs transformers "
                                                          "(pip install transformers)")

from cmpq_kernels import CMPQLinear, quantize_model  # noqa: E402
from cmpq_kernels.quantize import calibration_ids, quantize_weight  # noqa: E402
from test_quantize_model import VOCAB, tiny_llama  # noqa: E402


def tokens(n: int = 4096, seed: int = 1) -> list[torch.Tensor]:
    return [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))]


def quantize(model: nn.Module, bits: Any = 3.0, **options: Any):
    return quantize_model(model, tokens(), bits, n_samples=8, seq_len=64, progress=False, **options)


class ByteTokenizer:
    def __call__(self, text, return_tensors="pt", add_special_tokens=True):
        return {"input_ids": torch.tensor([[ord(c) % VOCAB for c in text]], dtype=torch.long)}


@pytest.fixture(scope="module")
def fp_model() -> nn.Module:
    """An FP tiny Llama shared by the quantizer error cases, each of which must leave it untouched."""
    return tiny_llama()


@pytest.fixture
def untouched(fp_model):
    """A copy of the FP model; afterwards checks that the failed call neither replaced nor changed a layer."""
    model = copy.deepcopy(fp_model)
    yield model
    assert not any(isinstance(m, CMPQLinear) for m in model.modules()), "failed call left a half-quantized model"
    before, after = fp_model.state_dict(), model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("bits", [1.5, 4.5, 1.999, 4.001, float("nan"), float("inf"), -float("inf"), 0, -3])
def test_quantize_model_rejects_bits_out_of_range(untouched, bits):
    with pytest.raises(ValueError, match=r"bits must be in \[2, 4\] and finite"):
        quantize(untouched, bits=bits)


# None is not here: it means "not given" (2.5 code bits, or the effective_bits budget).
@pytest.mark.parametrize("bits", ["3", "abc", True, [3.0]], ids=["str3", "str", "bool", "list"])
def test_quantize_model_rejects_bits_that_are_not_numbers(untouched, bits):
    with pytest.raises(TypeError, match="bits must be a number, got " + type(bits).__name__):
        quantize(untouched, bits=bits)


@pytest.mark.parametrize("param,value", [
    ("model.layers.1.mlp.down_proj.weight", float("nan")),
    ("model.layers.0.self_attn.k_proj.weight", float("inf")),
    ("model.embed_tokens.weight", float("nan")),
    ("model.norm.weight", -float("inf")),
    ("lm_head.weight", float("nan")),
])
def test_non_finite_weights_are_refused_by_name_before_anything_changes(fp_model, param, value):
    model = copy.deepcopy(fp_model)
    with torch.no_grad():
        model.get_parameter(param).view(-1)[5] = value
    with pytest.raises(ValueError, match=re.escape(param) + ": contains NaN or Inf"):
        quantize(model)
    assert not any(isinstance(m, CMPQLinear) for m in model.modules())


CALIBRATION_ERRORS = [
    ([], {}, ValueError, r"calibration data is empty \(0 tokens\)"),
    ([""], {"tokenizer": ByteTokenizer()}, ValueError, r"calibration data is empty \(0 tokens\)"),
    ([""], {}, ValueError, "calibration is text: pass the model's tokenizer"),
    ([torch.arange(10)], {}, ValueError, "calibration data has 10 tokens, fewer than one window of seq_len=64"),
    ([torch.arange(63)], {}, ValueError, "calibration data has 63 tokens, fewer than one window of seq_len=64"),
    (["too short"], {"tokenizer": ByteTokenizer()}, ValueError, "has 9 tokens, fewer than one window of seq_len=64"),
    (None, {}, TypeError, "calibration must be a list of strings, a text-file path or an iterable"),
    (5, {}, TypeError, "calibration must be a list of strings, a text-file path or an iterable"),
    (["text", torch.arange(100)], {}, TypeError, "calibration mixes text and token ids"),
    ([torch.rand(4096)], {}, TypeError, "calibration input_ids must be integers, got torch.float32"),
    ([{"input_ids": torch.ones(4096, dtype=torch.bool)}], {}, TypeError, "input_ids must be integers, got torch.bool"),
    ([{"ids": torch.arange(100)}], {}, TypeError, "calibration item of type dict is neither text nor input_ids"),
    ([object()], {}, TypeError, "calibration item of type object is neither text nor input_ids"),
    ([torch.full((4096,), -1)], {}, ValueError, "calibration token ids must be >= 0, got -1"),
    ([torch.full((4096,), VOCAB)], {}, ValueError, f"token id {VOCAB} is outside the model's vocabulary of {VOCAB}"),
]


@pytest.mark.parametrize("calibration,options,error,match", CALIBRATION_ERRORS, ids=[
    "empty-list", "empty-text", "text-without-tokenizer", "10-ids", "63-ids", "short-text", "none", "int", "mixed",
    "float-ids", "bool-ids", "mapping-without-ids", "object", "negative-ids", "ids-past-vocab"])
def test_bad_calibration_is_refused(untouched, calibration, options, error, match):
    with pytest.raises(error, match=match):
        quantize_model(untouched, calibration, 3.0, n_samples=8, seq_len=64, progress=False, **options)


def test_calibration_of_exactly_one_window_is_enough():
    assert calibration_ids([torch.arange(64)], n_samples=8, seq_len=64).shape == (1, 64)
    assert calibration_ids([torch.arange(64, dtype=torch.int32)], seq_len=64).dtype == torch.int64


class NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)


class BlocksWithoutLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.LayerNorm(32) for _ in range(3)])
        self.head = nn.Linear(32, 32)


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(32, 32), nn.ReLU()), NoBlocks, BlocksWithoutLinears,
                                  lambda: nn.Linear(32, 32)], ids=["sequential", "no-blocks", "no-linears", "linear"])
def test_unsupported_architectures_are_named(make):
    model = make()
    with pytest.raises(ValueError, match=f"unsupported model {type(model).__name__}: no list of decoder blocks"):
        quantize(model)


@pytest.mark.parametrize("dims,name,k", [((48, 128), "model.layers.0.self_attn.q_proj", 48),
                                         ((64, 100), "model.layers.0.mlp.down_proj", 100)])
def test_in_features_not_a_multiple_of_32_names_the_layer(dims, name, k):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=dims[0], intermediate_size=dims[1], num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match=re.escape(name) + f": in_features {k} is not a multiple of 32"):
        quantize(model)
    assert not any(isinstance(m, CMPQLinear) for m in model.modules())


def test_unquantizable_lm_head_fails_before_any_block_is_replaced(fp_model):
    model = copy.deepcopy(fp_model)
    model.lm_head = nn.Identity()
    with pytest.raises(ValueError, match="quantize_lm_head: output projection is Identity, not nn.Linear"):
        quantize(model, quantize_lm_head=True)
    assert not any(isinstance(m, CMPQLinear) for m in model.modules())


def test_layer_errors_from_the_quantizer_name_the_layer(untouched):
    def failing(name, linear, stats, widths):
        raise ValueError("s2 (mean squared activation per channel) must be finite and non-negative")

    with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.q_proj: s2 \(mean squared"):
        quantize(untouched, layer_quantizer=failing)


W, S2 = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), torch.ones(64)
QUANTIZE_WEIGHT_ERRORS = [
    (dict(weight=W.masked_fill(W > 1.5, float("nan"))), ValueError, "weight contains NaN or Inf"),
    (dict(weight=W.masked_fill(W > 1.5, -float("inf"))), ValueError, "weight contains NaN or Inf"),
    (dict(weight=W * 1e5), ValueError, r"weight has values beyond the fp16 range \(max \|w\| = "),
    (dict(weight=W[0]), ValueError, r"weight must be 2-D \[out_features, in_features\]"),
    (dict(weight=W[:0]), ValueError, r"with out_features >= 1, got shape \(0, 64\)"),
    (dict(weight=W.numpy()), TypeError, "weight must be a torch.Tensor, got ndarray"),
    (dict(weight=W[:, :48], s2=S2[:48]), ValueError, "in_features 48 is not a multiple of 32"),
    (dict(s2=S2[:63]), ValueError, r"s2 must have one entry per input channel \(64\), got 63"),
    (dict(s2=torch.ones(65)), ValueError, r"s2 must have one entry per input channel \(64\), got 65"),
    (dict(s2=S2.masked_fill(S2 > 0, float("nan"))), ValueError, "s2 .* must be finite and non-negative"),
    (dict(s2=-S2), ValueError, "s2 .* must be finite and non-negative"),
    (dict(widths=torch.full((32,), 3)), ValueError, r"widths must have one entry per input channel \(64\), got 32"),
    (dict(widths=torch.full((64,), 5)), ValueError, r"widths must be \(4, 3, 2\) values"),
    (dict(hessian=torch.eye(63)), ValueError, r"hessian must be a finite \[64, 64\] matrix"),
    (dict(bits="x"), TypeError, "bits must be a number, got str 'x'"),
    (dict(bits=1.5), ValueError, r"bits must be in \[2, 4\]"),
]


@pytest.mark.parametrize("changes,error,match", QUANTIZE_WEIGHT_ERRORS, ids=[
    "nan", "-inf", "beyond-fp16", "1d", "no-rows", "numpy", "k=48", "s2-short", "s2-long", "s2-nan", "s2-negative",
    "widths-short", "widths-values", "hessian-shape", "bits-str", "bits-1.5"])
def test_quantize_weight_rejects_bad_inputs(changes, error, match):
    args = {"weight": W, "s2": S2, "bits": 3.0, **changes}
    with pytest.raises(error, match=match):
        quantize_weight(args.pop("weight"), args.pop("s2"), args.pop("bits"), **args)
