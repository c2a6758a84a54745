"""Checkpoints refuse damage with a clear exception: truncated, bit-flipped and tampered ``model.safetensors``,
edited or broken ``config.json``, missing files; and ``save_quantized`` refusals and interrupted saves leave no
trace. One tiny model is quantized and saved once; each test damages its own copy.

Every error is matched on its message, not only its type.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
from typing import Any, Callable

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="checkpoints are Hugging Face models: needs transformers "
                                           "(pip install transformers)")

from cmpq_kernels import CMPQLinear, checkpoint, load_quantized, quantize_model, save_quantized, shards  # noqa: E402
from cmpq_kernels.format import SEGMENT_BITS  # noqa: E402
from test_quantize_model import VOCAB, tiny_llama  # noqa: E402

Q = "model.layers.0.self_attn.q_proj"  # the module the checkpoint cases corrupt
F = f"{Q}.cmpq."


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
    digest = shards.sha256_of(weights(directory))
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
                          "checkpoint does not match the model: model.norm.weight is [3] in the file"),
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


def _failing_close_shard(*args: Any, **kwargs: Any) -> None:
    raise OSError("disk full while writing model.safetensors")


@pytest.mark.parametrize("failure", ["weights", "tokenizer"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failed_save_leaves_no_trace(quantized, ckpt, tmp_path, monkeypatch, failure, existing):
    target = ckpt if existing else str(tmp_path / "new-target")
    before = snapshot(ckpt)
    if failure == "weights":
        monkeypatch.setattr(shards.ShardWriter, "_close_shard", _failing_close_shard)
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


def test_save_refuses_models_it_cannot_describe(quantized, tmp_path):
    with pytest.raises(ValueError, match="model has no CMPQLinear layers: quantize it first"):
        save_quantized(tiny_llama(), str(tmp_path / "fp"))
    with pytest.raises(TypeError, match="Sequential has no .config: save_quantized needs a Hugging Face model"):
        save_quantized(nn.Sequential(quantized[0].model.layers[0].self_attn.q_proj), str(tmp_path / "bare"))
    assert os.listdir(tmp_path) == []
