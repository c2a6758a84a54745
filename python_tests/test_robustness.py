"""Robustness: bad inputs raise a clear exception naming the problem; never a crash, silent garbage or a half-write.

Fuzz-style cases at every entry point a user or a file can reach: activations (``ops.gemm`` /
``CMPQLinear``), hand-built ``CMPQLayer`` objects, the quantizer (``quantize_model`` / ``quantize_weight``), and
checkpoints (``save_quantized`` / ``load_quantized``: truncated, bit-flipped and tampered files, edited
configs, interrupted saves). ``test_errors.py`` holds the basic activation, raw-op and ``validate`` cases;
nothing here repeats them. Every error is matched on its message, not only its type.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import struct
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from cmpq_kernels import CMPQLinear, checkpoint, load_quantized, ops, quantize_model, save_quantized  # noqa: E402
from cmpq_kernels.format import SEGMENT_BITS  # noqa: E402
from cmpq_kernels.quantize import calibration_ids, quantize_weight  # noqa: E402
from conftest import make_layer, random_x  # noqa: E402
from test_quantize_model import VOCAB, tiny_llama  # noqa: E402

N, K = 37, 96
Q = "model.layers.0.self_attn.q_proj"  # the module the checkpoint cases corrupt
F = f"{Q}.cmpq."


@pytest.fixture(scope="module")
def layer():
    """Read-only here: tests corrupt copies (``dataclasses.replace`` / clones), never this layer's tensors."""
    return make_layer(N, K, outlier_density=0.05, bias=torch.float32, seed=3)


# ---- activations: CMPQLinear.forward / ops.gemm -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.int64, torch.complex64, torch.float8_e4m3fn])
def test_forward_rejects_more_dtypes(layer, dtype):
    with pytest.raises(TypeError, match=f"x: dtype must be one of float32/float16/bfloat16, got {dtype}"):
        CMPQLinear(layer)(torch.zeros(2, K).to(dtype))


@pytest.mark.parametrize("x", [[[0.0] * K], np.zeros((2, K), np.float32), None], ids=["list", "numpy", "none"])
def test_forward_rejects_non_tensors(layer, x):
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        CMPQLinear(layer)(x)


@pytest.mark.parametrize("bad", [None, "module", 3], ids=["none", "module", "int"])
def test_gemm_rejects_a_layer_that_is_not_a_cmpq_layer(layer, bad):
    bad = CMPQLinear(layer) if bad == "module" else bad
    with pytest.raises(TypeError, match="layer: expected a CMPQLayer"):
        ops.gemm(random_x(2, K), bad)


def test_gemm_rejects_a_bias_that_is_not_a_tensor(layer):
    with pytest.raises(TypeError, match="bias: expected a torch.Tensor or None, got list"):
        ops.gemm(random_x(2, K), layer, [0.0] * N)


def test_activation_on_another_device_is_refused(layer):
    with pytest.raises(ValueError, match="x: is on meta but the layer is on cpu"):
        CMPQLinear(layer)(torch.zeros(2, K, device="meta"))


@pytest.mark.parametrize("shape", [(0, K), (2, 0, K), (0, 0, K), (0, 3, K)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_empty_batch_gives_an_empty_output(layer, shape, dtype):
    x = torch.zeros(shape, dtype=dtype)
    for y in (ops.gemm(x, layer), CMPQLinear(layer)(x)):
        assert y.shape == (*shape[:-1], N) and y.dtype == dtype


NON_CONTIGUOUS = {
    "strided": lambda: random_x(6, 2 * K)[:, ::2],
    "expanded": lambda: random_x(1, K).expand(5, K),
    "transposed-3d": lambda: random_x(4 * K, 3).reshape(4, K, 3).transpose(1, 2),
    "column-slice": lambda: random_x(5, K + 32)[:, 32:],
}


@pytest.mark.parametrize("name", NON_CONTIGUOUS)
def test_non_contiguous_x_gemm_raises_forward_computes_the_same(layer, name):
    x = NON_CONTIGUOUS[name]()
    assert not x.is_contiguous()
    with pytest.raises(ValueError, match=re.escape("x: must be contiguous (call .contiguous())")):
        ops.gemm(x, layer)
    assert torch.equal(CMPQLinear(layer)(x), ops.gemm(x.contiguous(), layer))


@pytest.mark.parametrize("m", [1, 3, 16, 17, 40])  # <= 16: fused kernel; > 16: decode + BLAS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_and_inf_rows_do_not_leak_into_other_rows(layer, cpu_isa, m, dtype):
    x = random_x(m, K, dtype, seed=m)
    poisoned = {0: float("nan"), m - 1: float("inf")} if m > 1 else {0: float("nan")}
    clean = x.clone()
    for row, value in poisoned.items():
        clean[row] = 0
        x[row, row % K] = value
        x[row, (row + 7) % K] = -value
    y, y_clean = CMPQLinear(layer)(x), CMPQLinear(layer)(clean)
    others = [r for r in range(m) if r not in poisoned]
    assert torch.equal(y[others], y_clean[others]), "a poisoned row changed another row's output"
    assert bool(torch.isfinite(y[others]).all())
    assert not bool(torch.isfinite(y[0]).any()), "a NaN activation must show in its own row, not vanish"


# ---- CMPQLayer built with corrupted fields (beyond test_errors.LAYER_CORRUPTIONS) --------------------------

def _swap_in_row(col: torch.Tensor, row_ptr: torch.Tensor) -> torch.Tensor:
    """``col`` with the first two outliers of the first row holding two or more swapped (unsorted)."""
    counts = row_ptr[1:] - row_ptr[:-1]
    start = int(row_ptr[int(torch.nonzero(counts >= 2)[0])])
    out = col.clone()
    out[start], out[start + 1] = col[start + 1], col[start]
    return out


def _item(items: tuple, index: int, value: Any) -> tuple:
    return tuple(value if i == index else item for i, item in enumerate(items))


FIELD_CORRUPTIONS: dict[str, tuple[Callable, str]] = {
    "perm=list": (lambda l: dict(perm=l.perm.tolist()), "perm: expected a torch.Tensor, got list"),
    "perm=2d": (lambda l: dict(perm=l.perm.reshape(1, -1)), r"perm: shape must be \(96,\)"),
    "perm=strided": (lambda l: dict(perm=torch.stack([l.perm, l.perm], 1)[:, 0]), "perm: must be contiguous"),
    "perm=reversed-dup": (lambda l: dict(perm=torch.cat([l.perm[:48], l.perm[:48]])), "perm: is not a permutation"),
    "bits=str": (lambda l: dict(bits="3"), "bits: must be a real number, got str '3'"),
    "bits=none": (lambda l: dict(bits=None), "bits: must be a real number, got NoneType"),
    "bits=bool": (lambda l: dict(bits=True), "bits: must be a real number, got bool"),
    "bits=inf": (lambda l: dict(bits=float("inf")), r"bits: target must be in \[2.0, 4.0\], got inf"),
    "n=float": (lambda l: dict(n=37.0), "n: must be an int, got float 37.0"),
    "n=str": (lambda l: dict(n="37"), "n: must be an int, got str"),
    "k=negative": (lambda l: dict(k=-96), "n, k: must be positive"),
    "codebook_rows=float": (lambda l: dict(codebook_rows=1.5), "codebook_rows: must be an int, got float 1.5"),
    "format_version=str": (lambda l: dict(format_version="1"), "format_version: must be an int, got str '1'"),
    "format_version=bool": (lambda l: dict(format_version=True), "format_version: must be an int, got bool"),
    "seg_k=none": (lambda l: dict(seg_k=None), "seg_k: need three multiples of 32 summing to k=96, got None"),
    "seg_k=two": (lambda l: dict(seg_k=(64, 32)), r"seg_k: need three multiples of 32 summing to k=96, got \(64, 32\)"),
    "seg_k=negative": (lambda l: dict(seg_k=(128, -32, 0)), "seg_k: need three multiples of 32"),
    "seg_k=float": (lambda l: dict(seg_k=(32.0, 32, 32)), "seg_k: need three multiples of 32"),
    "codes=two": (lambda l: dict(codes=l.codes[:2]), r"codes: need one tensor per segment .* got a tuple of 2"),
    "codes=none": (lambda l: dict(codes=None), "codes: need one tensor per segment"),
    "codes=strided": (lambda l: dict(codes=_item(l.codes, 2, torch.cat([l.codes[2]] * 2, 1)[:, ::2])),
                      r"codes\[2\] \(2-bit\): must be contiguous"),
    "codes=numpy": (lambda l: dict(codes=_item(l.codes, 0, l.codes[0].numpy())),
                    r"codes\[0\] \(4-bit\): expected a torch.Tensor"),
    "codebooks=two": (lambda l: dict(codebooks=l.codebooks[1:]), "codebooks: need one tensor per segment"),
    "codebooks=bf16": (lambda l: dict(codebooks=_item(l.codebooks, 0, l.codebooks[0].bfloat16())),
                       r"codebooks\[0\] \(4-bit\): dtype must be torch.float16, got torch.bfloat16"),
    "codebooks=-inf": (lambda l: dict(codebooks=_item(l.codebooks, 1, torch.full_like(l.codebooks[1], -float("inf")))),
                       r"codebooks\[1\] \(3-bit\): contains NaN or Inf"),
    "row_ptr=none": (lambda l: dict(row_ptr=None), "row_ptr: expected a torch.Tensor, got NoneType"),
    "row_ptr=past-end": (lambda l: dict(row_ptr=torch.full_like(l.row_ptr, 2**31 - 1)), "row_ptr: must start at 0"),
    "col=unsorted": (lambda l: dict(col=_swap_in_row(l.col, l.row_ptr)), "col: outlier columns must be sorted"),
    "val=bf16": (lambda l: dict(val=l.val.bfloat16()), "val: dtype must be torch.float16, got torch.bfloat16"),
    "bias=nan": (lambda l: dict(bias=torch.full((N,), float("nan"))), "bias: contains NaN or Inf"),
    "bias=numpy": (lambda l: dict(bias=np.zeros(N, np.float32)), "bias: expected a torch.Tensor or None, got ndarray"),
}


@pytest.mark.parametrize("name", FIELD_CORRUPTIONS)
def test_validate_rejects_corrupted_fields(layer, name):
    change, message = FIELD_CORRUPTIONS[name]
    corrupted = dataclasses.replace(layer, **change(layer))
    with pytest.raises(ValueError, match="^" + message):
        corrupted.validate()
    with pytest.raises(ValueError, match="^" + message):
        CMPQLinear(corrupted)


# ---- quantize_model / calibration / quantize_weight -------------------------------------------------------

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


@pytest.mark.parametrize("bits", ["3", "abc", None, True, [3.0]], ids=["str3", "str", "none", "bool", "list"])
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


# ---- checkpoints: one saved tiny model, copied per test before it is damaged --------------------------------

def prompt_logits(model: nn.Module) -> torch.Tensor:
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.fixture(scope="module")
def quantized():
    """``(model, reference logits)`` of a tiny Llama quantized to 3 bits."""
    model = tiny_llama()
    calibration = [torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(1))]
    report = quantize_model(model, calibration, 3.0, n_samples=8, seq_len=64, progress=False)
    model.report = report
    return model, prompt_logits(model)


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("saved") / "tiny-cmpq")
    save_quantized(quantized[0], path, report=quantized[0].report)
    return path


@pytest.fixture
def ckpt(saved, tmp_path) -> str:
    """A private copy of the saved checkpoint, free to corrupt."""
    return shutil.copytree(saved, str(tmp_path / "ckpt"))


def weights(directory: str) -> str:
    return os.path.join(directory, "model.safetensors")


def header(directory: str) -> tuple[int, dict]:
    """``(header length, header JSON)`` of the safetensors file; data starts at ``8 + length``."""
    with open(weights(directory), "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        return length, json.loads(f.read(length))


def data_offset(directory: str, tensor: str, byte: int = 0) -> int:
    length, head = header(directory)
    return 8 + length + head[tensor]["data_offsets"][0] + byte


def flip_bit(directory: str, offset: int, bit: int) -> None:
    with open(weights(directory), "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ (1 << bit)]))


def write_byte(directory: str, offset: int, value: int) -> None:
    with open(weights(directory), "r+b") as f:
        f.seek(offset)
        f.write(bytes([value]))


def edit_config(directory: str, change: Callable[[dict], Any]) -> None:
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    change(config)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)


def rewrite_tensors(directory: str, change: Callable[[dict], Any]) -> None:
    """Rewrite model.safetensors with ``change`` applied, as a valid file whose SHA-256 the config records:
    only structural validation can catch what ``change`` did."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights(directory))
    change(tensors)
    save_file(tensors, weights(directory), metadata={"format": "pt"})
    digest = checkpoint.sha256_of(weights(directory))
    edit_config(directory, lambda c: c["quantization_config"].__setitem__("weights_sha256", digest))


def test_round_trip_is_bit_identical(quantized, saved):
    model, expected = quantized
    for verify in (True, False):
        loaded = load_quantized(saved, verify=verify)
        assert torch.equal(prompt_logits(loaded), expected)
    assert {type(m) for m in loaded.modules() if isinstance(m, (nn.Linear, CMPQLinear))} == {nn.Linear, CMPQLinear}


CUTS = {"empty": lambda length, size: 0, "in-length": lambda length, size: 5,
        "in-json": lambda length, size: 8 + length // 2, "after-header": lambda length, size: 8 + length,
        "mid-data": lambda length, size: (8 + length + size) // 2, "last-byte": lambda length, size: size - 1}


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("cut", CUTS)
def test_truncated_weights_are_refused(ckpt, cut, verify):
    length, _ = header(ckpt)
    with open(weights(ckpt), "r+b") as f:
        f.truncate(CUTS[cut](length, os.path.getsize(weights(ckpt))))
    match = "SHA-256 does not match" if verify else "unreadable safetensors file"
    with pytest.raises(ValueError, match=match):
        load_quantized(ckpt, verify=verify)


# (tensor field, byte, bit, what validation says when the checksum is not checked)
BIT_FLIPS = {
    "perm": ("perm", 1, 0, "perm: is not a permutation of range(64)"),
    "perm-sign": ("perm", 3, 7, "perm: is not a permutation of range(64)"),
    "row_ptr": ("row_ptr", 5, 0, "row_ptr: must start at 0, be non-decreasing and end at nnz="),
    "col": ("col", 1, 6, "col: outlier columns must be in [0, 64)"),
    "col-sign": ("col", 1, 7, "col: outlier columns must be in [0, 64)"),
}


@pytest.mark.parametrize("name", BIT_FLIPS)
def test_bit_flip_in_structural_data_is_caught_with_and_without_checksum(ckpt, saved, name):
    field, byte, bit, message = BIT_FLIPS[name]
    _, head = header(ckpt)
    assert head[f"{F}col"]["shape"][0] > 0, "the test layer needs outliers"
    flip_bit(ckpt, data_offset(ckpt, F + field, byte), bit)
    with pytest.raises(ValueError, match="SHA-256 does not match"):
        load_quantized(ckpt)
    with pytest.raises(ValueError, match=re.escape(f"{Q}: {message}")):
        load_quantized(ckpt, verify=False)


@dataclasses.dataclass(frozen=True)
class Segment:
    """A non-empty segment of the checkpoint's layer ``Q`` (which one depends on the quantizer's defaults)."""

    bits: int
    index: int  #: position in SEGMENT_BITS (the ``codes[i]`` / ``codebooks[i]`` that validate() names)
    codes: tuple[int, int]  #: shape of ``codes<bits>``
    codebook: tuple[int, int]  #: shape of ``codebook<bits>``

    @property
    def label(self) -> str:
        return f"[{self.index}] ({self.bits}-bit)"


@pytest.fixture(scope="module")
def segment(saved) -> Segment:
    _, head = header(saved)
    bits = next(b for b in SEGMENT_BITS if head[f"{F}codes{b}"]["shape"][1])
    return Segment(bits, SEGMENT_BITS.index(bits), tuple(head[f"{F}codes{bits}"]["shape"]),
                   tuple(head[f"{F}codebook{bits}"]["shape"]))


def test_bit_flip_in_codes_is_caught_only_by_the_checksum(ckpt, quantized, segment):
    """Every code word is a valid code: only the SHA-256 sees a flip there, which is why verify defaults to True."""
    flip_bit(ckpt, data_offset(ckpt, f"{F}codes{segment.bits}", 2), 4)
    with pytest.raises(ValueError, match="SHA-256 does not match quantization_config.weights_sha256"):
        load_quantized(ckpt)
    assert not torch.equal(prompt_logits(load_quantized(ckpt, verify=False)), quantized[1])


def test_non_finite_codebook_byte_is_caught_without_checksum(ckpt, segment):
    write_byte(ckpt, data_offset(ckpt, f"{F}codebook{segment.bits}", 1), 0x7E)  # high byte of an fp16 NaN
    with pytest.raises(ValueError, match=re.escape(f"{Q}: codebooks{segment.label}: contains NaN or Inf")):
        load_quantized(ckpt, verify=False)


def test_bit_flip_in_the_header_is_caught_without_checksum(ckpt):
    write_byte(ckpt, 8 + 1, ord("!"))  # '{"' -> '{!': not JSON any more
    with pytest.raises(ValueError, match="unreadable safetensors file"):
        load_quantized(ckpt, verify=False)


def _set(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    return lambda tensors: tensors.__setitem__(name, make(tensors[name]))


def _poke(index: Any, value: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        out[index] = value
        return out
    return change


def _codes(seg: Segment, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    return _set(f"{F}codes{seg.bits}", make)


def _codebook(seg: Segment, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    return _set(f"{F}codebook{seg.bits}", make)


# name -> segment -> (change to the tensors, regex the error must start with after "<module>: ")
TAMPERED: dict[str, Callable[[Segment], tuple[Callable[[dict], Any], str]]] = {
    "perm-int64": lambda g: (_set(F + "perm", lambda t: t.long()), "perm: dtype must be torch.int32, got torch.int64"),
    "perm-short": lambda g: (_set(F + "perm", lambda t: t[:32].clone()), r"perm: shape must be \(64,\), got \(32,\)"),
    "perm-duplicate": lambda g: (_set(F + "perm", lambda t: _poke(0, t[1])(t)),
                                 r"perm: is not a permutation of range\(64\)"),
    "row_ptr-decreasing": lambda g: (_set(F + "row_ptr", lambda t: _poke(5, int(t[-1]) + 1)(t)),
                                     "row_ptr: must start at 0, be non-decreasing"),
    "row_ptr-int64": lambda g: (_set(F + "row_ptr", lambda t: t.long()), "row_ptr: dtype must be torch.int32"),
    "codebook-nan": lambda g: (_codebook(g, _poke((0, 0), float("nan"))),
                               re.escape(f"codebooks{g.label}: contains NaN")),
    "codebook-fp32": lambda g: (_codebook(g, lambda t: t.float()),
                                re.escape(f"codebooks{g.label}: dtype must be torch.float16, got torch.float32")),
    "codebook-rows": lambda g: (_codebook(g, lambda t: t[:-1].clone()),
                                re.escape(f"codebooks{g.label}: shape must be {g.codebook}")),
    "col-out-of-range": lambda g: (_set(F + "col", _poke(0, 64)), r"col: outlier columns must be in \[0, 64\), got \["),
    "col-int32": lambda g: (_set(F + "col", lambda t: t.int()), "col: dtype must be torch.int16, got torch.int32"),
    "val-fp32": lambda g: (_set(F + "val", lambda t: t.float()), "val: dtype must be torch.float16, got torch.float32"),
    "val-inf": lambda g: (_set(F + "val", _poke(0, float("inf"))), "val: outlier values contain NaN or Inf"),
    "codes-int64": lambda g: (_codes(g, lambda t: t.long()), re.escape(f"codes{g.label}: dtype must be torch.int32")),
    "codes-rows": lambda g: (_codes(g, lambda t: t[:-1].clone()),
                             re.escape(f"codes{g.label}: shape must be {g.codes}, got {(g.codes[0] - 1, g.codes[1])}")),
    "codes-1d": lambda g: (_codes(g, lambda t: t.reshape(-1).clone()),
                           re.escape(f"codes{g.bits}: shape must be [out_features, groups * {g.bits}]")),
    "codes-0d": lambda g: (_codes(g, lambda t: torch.tensor(7, dtype=torch.int32)),
                           re.escape(f"codes{g.bits}: shape must be [out_features, groups * {g.bits}], got ()")),
    "codes-partial-group": lambda g: (_codes(g, lambda t: t[:, :-1].clone()),
                                      re.escape(f"codes{g.bits}: shape must be [out_features, groups * {g.bits}]")),
    "codes-segment-dropped": lambda g: (_codes(g, lambda t: t[:, :0].clone()),
                                        r"codes4/codes3/codes2: hold \d+ packed channels, in_features is 64"),
    "field-missing": lambda g: (lambda t: t.pop(F + "val"), "tensors missing from the checkpoint: val"),
    "bias-unexpected": lambda g: (lambda t: t.__setitem__(f"{Q}.bias", torch.zeros(64)),
                                  "config says bias=False but the file has"),
}


@pytest.mark.parametrize("name", TAMPERED)
def test_tampered_tensors_with_valid_checksum_are_refused(ckpt, segment, name):
    change, message = TAMPERED[name](segment)
    rewrite_tensors(ckpt, change)
    for verify in (True, False):
        with pytest.raises(ValueError, match="^" + re.escape(f"{Q}: ") + message):
            load_quantized(ckpt, verify=verify)


PLAIN_TAMPERED = {
    "stray-cmpq-tensor": (lambda t: t.__setitem__("model.layers.0.mlp.up_proj2.cmpq.perm",
                                                  torch.zeros(3, dtype=torch.int32)),
                          "tensors of modules not in quantization_config: model.layers.0.mlp.up_proj2.cmpq.perm"),
    "plain-missing": (lambda t: t.pop("model.norm.weight"),
                      "checkpoint does not match the model: missing ['model.norm.weight']"),
    "plain-unexpected": (lambda t: t.__setitem__("extra.weight", torch.zeros(3)),
                         "checkpoint does not match the model: missing [], unexpected ['extra.weight']"),
    "plain-wrong-shape": (lambda t: t.__setitem__("model.norm.weight", torch.ones(3)),
                          "checkpoint does not match the model: Error(s) in loading state_dict"),
}


@pytest.mark.parametrize("name", PLAIN_TAMPERED)
def test_tampered_file_contents_are_refused(ckpt, name):
    change, message = PLAIN_TAMPERED[name]
    rewrite_tensors(ckpt, change)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_quantized(ckpt)


def _qc(change: Callable[[dict], Any]) -> Callable[[dict], Any]:
    return lambda config: change(config["quantization_config"])


def _entry(key: str, value: Any) -> Callable[[dict], Any]:
    return _qc(lambda qc: qc["modules"][Q].__setitem__(key, value))


def _without(mapping_of: Callable[[dict], dict], key: str) -> Callable[[dict], Any]:
    return lambda config: mapping_of(config).pop(key)


LM_HEAD_ENTRY = {"in_features": 64, "out_features": VOCAB, "bits": 3.0, "codebook_rows": 1, "bias": False}
ENTRY = re.escape(f"quantization_config.modules['{Q}']")
CONFIG_EDITS = {
    "no-quantization-config": (_without(lambda c: c, "quantization_config"),
                               "no quantization_config with quant_method 'cmpq'; not a CMPQ checkpoint"),
    "quantization-config-list": (lambda c: c.__setitem__("quantization_config", []), "no quantization_config with"),
    "quant-method-gptq": (_qc(lambda qc: qc.__setitem__("quant_method", "gptq")), "no quantization_config with"),
    "format-version-0": (_qc(lambda qc: qc.__setitem__("format_version", 0)), "format_version 0 is not supported"),
    "format-version-2": (_qc(lambda qc: qc.__setitem__("format_version", 2)), "format_version 2 is not supported"),
    "format-version-str": (_qc(lambda qc: qc.__setitem__("format_version", "1")), "format_version '1' is not"),
    "format-version-float": (_qc(lambda qc: qc.__setitem__("format_version", 1.0)), "format_version 1.0 is not"),
    "format-version-true": (_qc(lambda qc: qc.__setitem__("format_version", True)), "format_version True is not"),
    "format-version-missing": (_without(lambda c: c["quantization_config"], "format_version"), "format_version None"),
    "modules-empty": (_qc(lambda qc: qc.__setitem__("modules", {})), "quantization_config.modules is missing or empty"),
    "modules-list": (_qc(lambda qc: qc.__setitem__("modules", [Q])), "quantization_config.modules is missing or empty"),
    "entry-not-object": (_qc(lambda qc: qc["modules"].__setitem__(Q, 5)), ENTRY + ": must be an object, got 5"),
    "entry-bits-missing": (_without(lambda c: c["quantization_config"]["modules"][Q], "bits"),
                           ENTRY + ": 'bits' is missing"),
    "entry-features-str": (_entry("out_features", "64"), ENTRY + r"\.out_features: must be an integer, got '64'"),
    "entry-codebook-rows-float": (_entry("codebook_rows", 1.5),
                                  ENTRY + r"\.codebook_rows: must be an integer, got 1.5"),
    "entry-bits-str": (_entry("bits", "x"), ENTRY + r"\.bits: must be a number, got 'x'"),
    "entry-bias-str": (_entry("bias", "no"), ENTRY + r"\.bias: must be true or false, got 'no'"),
    "tied-list": (_qc(lambda qc: qc.__setitem__("tied", ["lm_head.weight"])), "quantization_config.tied must map"),
    "sha-missing": (_without(lambda c: c["quantization_config"], "weights_sha256"),
                    r"quantization_config has no weights_sha256"),
    "entry-bits-out-of-range": (_entry("bits", 9), re.escape(f"{Q}: bits: target must be in [2.0, 4.0], got 9.0")),
    "entry-bias-true": (_entry("bias", True), re.escape(f"{Q}: config says bias=True but the file lacks {Q}.bias")),
    "in-features-mismatch": (_entry("in_features", 96), re.escape(f"{Q}: model has 64x64, config says 64x96")),
    "out-features-mismatch": (_entry("out_features", 32), re.escape(f"{Q}: model has 64x64, config says 32x64")),
    "module-missing-in-file": (_qc(lambda qc: qc["modules"].__setitem__("lm_head", LM_HEAD_ENTRY)),
                               "lm_head: tensors missing from the checkpoint: perm, codes4"),
    "module-not-in-model": (_qc(lambda qc: qc["modules"].__setitem__("model.layers.9.mlp.up_proj", LM_HEAD_ENTRY)),
                            "quantization_config names module 'model.layers.9.mlp.up_proj', which this model does"),
    "module-not-linear": (_qc(lambda qc: qc["modules"].__setitem__("model.norm", LM_HEAD_ENTRY)),
                          "model.norm: is a LlamaRMSNorm, expected nn.Linear"),
    "module-dropped": (_without(lambda c: c["quantization_config"]["modules"], Q),
                       re.escape(f"tensors of modules not in quantization_config: {Q}.cmpq.")),
    "model-type-unknown": (lambda c: c.__setitem__("model_type", "no-such-arch"),
                           "config.json: transformers cannot build model_type 'no-such-arch'"),
    "model-type-missing": (_without(lambda c: c, "model_type"), "config.json has no model_type"),
    "hidden-size-changed": (lambda c: c.__setitem__("hidden_size", 128), r"model has 128x128, config says 64x128"),
    "fewer-layers": (lambda c: c.__setitem__("num_hidden_layers", 1), "names module 'model.layers.1"),
    "more-layers": (lambda c: c.__setitem__("num_hidden_layers", 3),
                    re.escape("checkpoint does not match the model: missing ['model.layers.2.")),
    "negative-vocab": (lambda c: c.__setitem__("vocab_size", -1), "config.json: cannot build a 'llama' causal LM"),
}


@pytest.mark.parametrize("name", CONFIG_EDITS)
def test_bad_config_is_refused(ckpt, name):
    change, match = CONFIG_EDITS[name]
    edit_config(ckpt, change)
    with pytest.raises(ValueError, match=match):
        load_quantized(ckpt)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00binary", b"", b"[1, 2]"],
                         ids=["broken", "binary", "empty", "list"])
def test_config_that_is_not_a_json_object_is_refused(ckpt, content):
    with open(os.path.join(ckpt, "config.json"), "wb") as f:
        f.write(content)
    with pytest.raises(ValueError, match="config.json: (not valid JSON|expected a JSON object)"):
        load_quantized(ckpt)


def test_missing_files_are_named(ckpt, tmp_path):
    os.remove(weights(ckpt))
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_quantized(ckpt)
    os.remove(os.path.join(ckpt, "config.json"))
    with pytest.raises(FileNotFoundError, match="no config.json; not a model directory"):
        load_quantized(ckpt)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_quantized(str(tmp_path / "does-not-exist"))


# ---- save_quantized: refusals and interrupted saves leave no trace ----------------------------------------

def snapshot(directory: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def leftovers(parent: str) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n)


def test_existing_target_is_refused_and_left_untouched(quantized, ckpt):
    before = snapshot(ckpt)
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        save_quantized(quantized[0], ckpt)
    assert snapshot(ckpt) == before and leftovers(os.path.dirname(ckpt)) == []


class FailingTokenizer:
    def save_pretrained(self, directory: str) -> None:
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:
            f.write("{")  # half-written
        raise OSError("disk full while writing the tokenizer")


def _failing_save_file(*args: Any, **kwargs: Any) -> None:
    raise OSError("disk full while writing model.safetensors")


@pytest.mark.parametrize("failure", ["weights", "tokenizer"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failed_save_leaves_no_trace(quantized, ckpt, tmp_path, monkeypatch, failure, existing):
    import safetensors.torch

    target = ckpt if existing else str(tmp_path / "new-target")
    before = snapshot(ckpt)
    if failure == "weights":
        monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    with pytest.raises(OSError, match=f"disk full while writing {'model' if failure == 'weights' else 'the tok'}"):
        save_quantized(quantized[0], target, tokenizer=FailingTokenizer() if failure == "tokenizer" else None,
                       overwrite=existing)
    assert leftovers(str(tmp_path)) == []
    assert snapshot(ckpt) == before
    assert existing or not os.path.exists(target)


def test_failed_final_rename_keeps_the_old_checkpoint(quantized, ckpt, tmp_path, monkeypatch):
    before, rename = snapshot(ckpt), os.rename

    def failing_rename(src: str, dst: str) -> None:
        if ".partial-" in os.path.basename(src):
            raise OSError("rename refused")
        rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename refused"):
        save_quantized(quantized[0], ckpt, overwrite=True)
    assert snapshot(ckpt) == before and leftovers(str(tmp_path)) == []


def test_overwrite_replaces_the_whole_directory(quantized, ckpt, tmp_path):
    with open(os.path.join(ckpt, "stale.txt"), "w") as f:
        f.write("from an older save")
    save_quantized(quantized[0], ckpt, overwrite=True)
    assert "stale.txt" not in os.listdir(ckpt) and leftovers(str(tmp_path)) == []
    assert torch.equal(prompt_logits(load_quantized(ckpt)), quantized[1])


def test_save_refuses_models_it_cannot_describe(quantized, fp_model, tmp_path):
    with pytest.raises(ValueError, match="model has no CMPQLinear layers: quantize it first"):
        save_quantized(fp_model, str(tmp_path / "fp"))
    with pytest.raises(TypeError, match="Sequential has no .config: save_quantized needs a Hugging Face model"):
        save_quantized(nn.Sequential(quantized[0].model.layers[0].self_attn.q_proj), str(tmp_path / "bare"))
    assert os.listdir(tmp_path) == []
