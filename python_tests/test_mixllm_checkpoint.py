"""MixLLM checkpoints: round trip, and corrupted / edited / other-method checkpoints refused with clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cmpq_kernels import MixLLMLinear, load_mixllm, load_quantized, save_mixllm
from cmpq_kernels.mixllm_checkpoint import read_mixllm_layers
from cmpq_kernels.quantize import quantize_model_mixllm

pytest.importorskip("transformers")
from test_mixllm_quantize import calibration, logits, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_llama()
    report = quantize_model_mixllm(model, calibration(), 10, n_samples=4, seq_len=64, progress=False)
    next(m for m in model.modules() if isinstance(m, MixLLMLinear)).act_bits = 16  # a per-module setting survives
    directory = tmp_path_factory.mktemp("ckpt") / "tiny-mixllm"
    qconfig = save_mixllm(model, str(directory), report=report)
    return model, directory, qconfig


def copy_of(saved, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(saved[1], target)
    return target


def edit_config(directory, change):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config["quantization_config"])
    path.write_text(json.dumps(config))


def test_round_trip(saved):
    model, directory, qconfig = saved
    loaded = load_mixllm(str(directory))
    assert torch.equal(logits(loaded), logits(model))
    assert qconfig["quant_method"] == "mixllm" and qconfig["p"] == 10
    acts = [m.act_bits for m in loaded.modules() if isinstance(m, MixLLMLinear)]
    assert acts.count(16) == 1 and len(acts) == 14
    _, layers = read_mixllm_layers(str(directory))
    assert sum(l.n8 for l in layers.values()) == sum(e["rows_8bit"] for e in qconfig["modules"].values())
    assert qconfig["effective_bits"] == pytest.approx(
        sum(sum(l.storage_bits().values()) for l in layers.values()) / sum(l.n * l.k for l in layers.values()))


def test_the_other_loader_names_the_right_one(saved, tmp_path):
    with pytest.raises(ValueError, match="load_mixllm"):
        load_quantized(str(saved[1]))
    directory = copy_of(saved, tmp_path)
    edit_config(directory, lambda q: q.update(quant_method="cmpq"))
    with pytest.raises(ValueError, match="load_quantized"):
        load_mixllm(str(directory))


def test_flipped_byte_fails_the_digest(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    data = bytearray((directory / "model.safetensors").read_bytes())
    data[-100] ^= 0x10
    (directory / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256|sha256"):
        load_mixllm(str(directory))


EDITS = {
    "duplicate row": (lambda t, n: t[f"{n}.mixllm.idx8"].__setitem__(0, t[f"{n}.mixllm.idx4"][0]), "exactly once"),
    "nan scale": (lambda t, n: t[f"{n}.mixllm.s4"].fill_(float("nan")), "s4: scales"),
    "missing field": (lambda t, n: t.pop(f"{n}.mixllm.z4"), "missing"),
    "stray tensor": (lambda t, n: t.__setitem__("model.norm.mixllm.q8", torch.zeros(1, dtype=torch.int8)), "not in quantization"),
}


@pytest.mark.parametrize("case", EDITS)
def test_edited_tensors_are_refused(saved, tmp_path, case):
    directory = copy_of(saved, tmp_path)
    name = next(n for n, e in saved[2]["modules"].items() if e["rows_8bit"])
    tensors = load_file(str(directory / "model.safetensors"))
    edit, message = EDITS[case]
    edit(tensors, name)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"quant_method": "mixllm", "format_version": "1"})
    with pytest.raises(ValueError, match=message):
        load_mixllm(str(directory), verify=False)


@pytest.mark.parametrize("change,message", [
    (lambda q: q.update(format_version=2), "format_version"),
    (lambda q: next(iter(q["modules"].values())).update(rows_8bit=10**6), "8-bit rows"),
    (lambda q: next(iter(q["modules"].values())).update(act_bits=4), "act_bits"),
    (lambda q: next(iter(q["modules"].values())).update(bias=True), "bias"),
    (lambda q: next(iter(q["modules"].values())).update(out_features=7), "model has"),
])
def test_edited_config_is_refused(saved, tmp_path, change, message):
    directory = copy_of(saved, tmp_path)
    edit_config(directory, change)
    with pytest.raises(ValueError, match=message):
        load_mixllm(str(directory), verify=False)


def test_from_pretrained_gives_the_load_mixllm_model(saved, tmp_path):
    import transformers

    import cmpq_kernels.hf  # noqa: F401  (registers "mixllm" with transformers)

    directory = saved[1]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory))
    reference = load_mixllm(str(directory))
    assert torch.equal(logits(model), logits(reference))
    assert [m.act_bits for m in model.modules() if isinstance(m, MixLLMLinear)] == \
        [m.act_bits for m in reference.modules() if isinstance(m, MixLLMLinear)]
    broken = copy_of(saved, tmp_path)
    edit_config(broken, lambda q: next(iter(q["modules"].values())).update(rows_8bit=10**6))
    with pytest.raises(ValueError):
        transformers.AutoModelForCausalLM.from_pretrained(str(broken))


def test_effective_bits_agree_with_bytes_on_disk(saved):
    from cmpq_kernels.checkpoint import checkpoint_bytes

    _, directory, qconfig = saved
    on_disk = checkpoint_bytes(str(directory))["quantized"] * 8  # the <module>.mixllm.<field> tensors
    assert on_disk == pytest.approx(qconfig["effective_bits"] * qconfig["quantized_weights"], abs=0.5)
