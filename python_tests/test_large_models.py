"""Models that do not fit: sharded checkpoints, loading on ``meta`` with header checks, quantizing a checkpoint
directory block by block, and the memory ceilings those promise (measured in a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cmpq_kernels import CMPQLinear, load_quantized, quantize_model, save_quantized  # noqa: E402
from cmpq_kernels.checkpoint import checkpoint_bytes, read_layers  # noqa: E402
from cmpq_kernels.from_disk import quantize_checkpoint  # noqa: E402
from cmpq_kernels.shards import INDEX_NAME, WEIGHTS_NAME, weight_files  # noqa: E402
from test_quantize_model import VOCAB, calibration_tokens, tiny_llama  # noqa: E402

CALIB = dict(n_samples=8, seq_len=64, progress=False)


def prompt_logits(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.fixture(scope="module")
def quantized():
    model = tiny_llama()
    report = quantize_model(model, calibration_tokens(), 3.0, **CALIB)
    return model, report, prompt_logits(model)


@pytest.fixture(scope="module")
def sharded(quantized, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sharded") / "ckpt")
    save_quantized(quantized[0], path, report=quantized[1], max_shard_bytes=20_000)
    return path


def test_sharded_checkpoint_round_trips(quantized, sharded):
    files = weight_files(sharded)
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(os.path.join(sharded, "config.json"), encoding="utf-8") as f:
        assert sorted(json.load(f)["quantization_config"]["weights_sha256"]) == files
    model = load_quantized(sharded)
    assert torch.equal(prompt_logits(model), quantized[2])
    assert len(read_layers(sharded)[1]) == 14
    sizes = checkpoint_bytes(sharded)
    assert sizes["weights"] == sum(os.path.getsize(os.path.join(sharded, f)) for f in files)


def test_transformers_loads_shards(quantized, sharded):
    import cmpq_kernels.hf  # noqa: F401

    model = transformers.AutoModelForCausalLM.from_pretrained(sharded)
    assert torch.equal(prompt_logits(model.eval()), quantized[2])


def _edit_json(path: str, change) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    change(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _copy(src: str, tmp_path) -> str:
    import shutil

    return shutil.copytree(src, str(tmp_path / "copy"))


@pytest.mark.parametrize("case,error,match", [
    ("index-escapes", ValueError, "is not a .safetensors file name"),
    ("index-moves-tensor", ValueError, "weight_map does not match the tensors the shards hold"),
    ("shard-missing", FileNotFoundError, "named by model.safetensors.index.json is missing"),
    ("shard-edited", ValueError, "SHA-256 does not match"),
    ("digest-list-short", ValueError, "does not list exactly the weight files"),
])
def test_damaged_shards_are_refused(sharded, tmp_path, case, error, match):
    ckpt = _copy(sharded, tmp_path)
    index, files = os.path.join(ckpt, INDEX_NAME), weight_files(ckpt)
    if case == "index-escapes":
        _edit_json(index, lambda d: d["weight_map"].__setitem__("model.norm.weight", "../x.safetensors"))
    elif case == "index-moves-tensor":
        _edit_json(index, lambda d: d["weight_map"].__setitem__("model.norm.weight", files[0] if
                                                                d["weight_map"]["model.norm.weight"] != files[0]
                                                                else files[1]))
    elif case == "shard-missing":
        os.remove(os.path.join(ckpt, files[1]))
    elif case == "shard-edited":
        with open(os.path.join(ckpt, files[1]), "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"\x00\x01\x02")
    else:
        _edit_json(os.path.join(ckpt, "config.json"),
                   lambda c: c["quantization_config"]["weights_sha256"].pop(files[-1]))
    with pytest.raises(error, match=match):
        load_quantized(ckpt)


@pytest.mark.parametrize("hidden", [1 << 14, 1 << 22])  # GBs and TBs of weights, were they allocated
def test_edited_config_is_refused_without_materialising(sharded, tmp_path, hidden):
    """The skeleton's parameters go straight to meta, so an edited size is caught by the header checks, in
    well under a second, instead of by filling memory."""
    ckpt = _copy(sharded, tmp_path)
    _edit_json(os.path.join(ckpt, "config.json"), lambda c: c.update(hidden_size=hidden))
    with pytest.raises(ValueError, match=rf"model has {hidden}x128, config says 64x128"):
        load_quantized(ckpt)


def _hf_directory(tmp_path, dtype=torch.bfloat16, max_shard: str = "60KB") -> str:
    model = tiny_llama().to(dtype)
    path = str(tmp_path / "fp-model")
    model.save_pretrained(path, max_shard_size=max_shard)
    return path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_checkpoint_matches_the_in_memory_quantizer(tmp_path, dtype):
    source = _hf_directory(tmp_path, dtype)
    assert os.path.isfile(os.path.join(source, INDEX_NAME)), "the source should be sharded for this test"
    out = str(tmp_path / "cmpq")
    report = quantize_checkpoint(source, out, calibration_tokens(), 3.0, max_shard_bytes=50_000, **CALIB)
    reference = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    expected = quantize_model(reference, calibration_tokens(), 3.0, **CALIB)
    assert [l["name"] for l in report.layers] == [l["name"] for l in expected.layers]
    assert report.effective_bits == pytest.approx(expected.effective_bits)
    loaded = load_quantized(out)
    assert sum(isinstance(m, CMPQLinear) for m in loaded.modules()) == 14
    assert loaded.model.norm.weight.dtype == dtype  # plain tensors keep the source dtype
    got, want = prompt_logits(loaded.float()), prompt_logits(reference)
    assert float((got - want).norm() / want.norm()) < (1e-5 if dtype == torch.float32 else 2e-2)
    assert len(weight_files(out)) > 1 and os.path.isfile(os.path.join(out, "generation_config.json"))


def test_quantize_checkpoint_refuses_bad_sources(tmp_path):
    source = _hf_directory(tmp_path, max_shard="10GB")
    _edit_json(os.path.join(source, "config.json"), lambda c: c.update(intermediate_size=1 << 30))
    with pytest.raises(ValueError, match="model files do not match config.json: .*mlp"):
        quantize_checkpoint(source, str(tmp_path / "out"), calibration_tokens(), 3.0, **CALIB)
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(_quantized_dir(tmp_path), str(tmp_path / "out2"), calibration_tokens(), 3.0, **CALIB)
    with pytest.raises(ValueError, match="need the whole model in memory"):
        quantize_checkpoint(_hf_directory(tmp_path / "b"), str(tmp_path / "out3"), calibration_tokens(), 3.0,
                            budget="global", allocator="greedy", **CALIB)
    with pytest.raises(MemoryError, match="lower n_samples/seq_len"):
        quantize_checkpoint(_hf_directory(tmp_path / "c"), str(tmp_path / "out4"), calibration_tokens(), 3.0,
                            max_memory_bytes=1000, **CALIB)


def _quantized_dir(tmp_path) -> str:
    model = tiny_llama()
    quantize_model(model, calibration_tokens(), 3.0, **CALIB)
    path = str(tmp_path / "already")
    save_quantized(model, path)
    return path


# The memory ceilings, measured in fresh processes (peak RSS from getrusage, after the torch/transformers imports).
# Quantizing block by block must not hold the blocks it is done with: an 8-block model may peak above a 2-block
# model of the same width by at most a quarter of the 6 extra blocks' FP32 bytes (100 MB if they were kept;
# measured +16 MB, allocator growth); loading must stay
# below 1.5x the quantized checkpoint (no FP copy of the model is ever made).
_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, transformers
    import cmpq_kernels
    from cmpq_kernels.from_disk import quantize_checkpoint
    torch.set_num_threads(1)
    with torch.device("meta"):  # imports the Llama code and builds a model once: not part of what is measured
        transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(num_hidden_layers=1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mode, source, out = sys.argv[1:4]
    if mode == "quantize":
        ids = [torch.randint(0, 512, (4 * 64,), generator=torch.Generator().manual_seed(0))]
        quantize_checkpoint(source, out, ids, 3.0, n_samples=4, seq_len=64, progress=False, error_feedback=False)
    else:
        cmpq_kernels.load_quantized(out)
    print(json.dumps({"used": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base}))
""")
SLACK_BYTES = 16 << 20  # allocator and code pages of the first CMPQ load


def _used(mode: str, source: str, out: str) -> int:
    result = subprocess.run([sys.executable, "-c", _SCRIPT, mode, source, out], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["used"]


def _llama_directory(path: str, blocks: int) -> tuple[str, int]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=blocks,
                                   num_attention_heads=8, num_key_value_heads=8, vocab_size=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, max_shard_size="40MB")
    return path, sum(p.numel() * 4 for p in model.model.layers[0].parameters())


def test_memory_does_not_grow_with_blocks_and_load_builds_no_fp_model(tmp_path):
    small, block_bytes = _llama_directory(str(tmp_path / "fp2"), 2)
    large, _ = _llama_directory(str(tmp_path / "fp8"), 8)
    used_small = _used("quantize", small, str(tmp_path / "q2"))
    used_large = _used("quantize", large, str(tmp_path / "q8"))
    assert used_large - used_small < 0.25 * 6 * block_bytes, (used_small, used_large, block_bytes)
    checkpoint = checkpoint_bytes(str(tmp_path / "q8"))["weights"]
    used_load = _used("load", large, str(tmp_path / "q8"))
    assert used_load < 1.5 * checkpoint + SLACK_BYTES, (used_load, checkpoint)
