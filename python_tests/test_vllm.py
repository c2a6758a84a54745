"""CMPQ and MixLLM checkpoints served by the real vLLM engine (CPU build), no mock (cmpq_kernels/vllm.py).

vLLM lives in its own virtual environment (``scripts/vllm_venv.sh``); ``CMPQ_VLLM_PYTHON`` names its Python, and
``.ci/run`` sets it. Each case quantizes a model here, serves it with ``bench/vllm_serve.py`` in a subprocess
(one engine per process, as vLLM wants) and compares vLLM's greedy tokens with this package's own
:func:`~cmpq_kernels.generation.generate` (what ``cmpq generate`` runs) on the same checkpoint, both in float32.
Without ``CMPQ_VLLM_PYTHON`` the module is skipped, saying how to enable it.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import cmpq_kernels
from cmpq_kernels.checkpoint import load_quantized
from cmpq_kernels.generation import generate
from cmpq_kernels.corpora import read_text
from cmpq_kernels.models import load_model, load_tokenizer
from conftest import import_bench

transformers = pytest.importorskip("transformers")

VLLM_PYTHON = os.environ.get("CMPQ_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="vLLM tests need CMPQ_VLLM_PYTHON=<python of a vLLM "
                                                        "environment> (bash scripts/vllm_venv.sh makes one)")
SERVE = Path(__file__).resolve().parent.parent / "bench" / "vllm_serve.py"
MAX_TOKENS = 12
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}


def serve(model_dir: Path, out: Path, tp: int = 1) -> dict:
    """Run bench/vllm_serve.py under the vLLM environment; its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CACHE_ROOT": str(out.parent / "vllm-cache"),
           "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "0"}
    cmd = [VLLM_PYTHON, str(SERVE), str(model_dir), "--out", str(out), "--tp", str(tp), "--max-tokens",
           str(MAX_TOKENS)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"vLLM run failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return json.loads(out.read_text())


def own_tokens(model_dir: Path, load=load_quantized) -> list[list[int]]:
    """Greedy tokens of the checkpoint through cmpq_kernels' own path (``load`` + generate)."""
    model, tokenizer = load(str(model_dir)), load_tokenizer(str(model_dir))
    return [generate(model, tokenizer, p, MAX_TOKENS, echo=False)["token_ids"]
            for p in import_bench("vllm_serve").PROMPTS]


def expected_layers(model_dir: Path) -> set[str]:
    """vLLM's layer names for the checkpoint's quantized modules (q/k/v -> qkv_proj, gate/up -> gate_up_proj)."""
    qconfig = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    names = set()
    for name in qconfig["modules"]:
        parent, _, leaf = name.rpartition(".")
        names.add(f"{parent}.{FUSED.get(leaf, leaf)}")
    return names


TINY_TEXT = ["The cat sat on the mat while the dog ran in the park. " * 30]


def tiny_llama(tokenizer, hidden: int = 128) -> "transformers.LlamaForCausalLM":
    """A random 2-block Llama with 4 heads (2 KV heads) of width ``hidden``."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                   max_position_embeddings=512, initializer_range=0.1,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def quantize_tiny(directory: Path, tokenizer, **options) -> Path:
    """:func:`tiny_llama` quantized with CMPQ at 3 bits and saved."""
    model = tiny_llama(tokenizer)
    report = cmpq_kernels.quantize_model(model, TINY_TEXT, bits=3.0, tokenizer=tokenizer, n_samples=4, seq_len=64,
                                         progress=False, **options)
    cmpq_kernels.save_quantized(model, str(directory), tokenizer=tokenizer, report=report)
    return directory


def quantize_tiny_mixllm(directory: Path, tokenizer, act_bits: int = 8) -> Path:
    """:func:`tiny_llama` 256 wide (so o_proj's and down_proj's inputs split into whole 128-channel groups at
    tp = 2) quantized with MixLLM at p = 10 and saved."""
    model = tiny_llama(tokenizer, hidden=256)
    report = cmpq_kernels.quantize_model_mixllm(model, TINY_TEXT, 10.0, tokenizer=tokenizer, n_samples=4, seq_len=64,
                                                act_bits=act_bits, progress=False)
    cmpq_kernels.save_mixllm(model, str(directory), tokenizer=tokenizer, report=report)
    return directory


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("smollm2-135m")[1]


@pytest.fixture(scope="module")
def tiny_dir(tokenizer, tmp_path_factory) -> Path:
    return quantize_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", tokenizer)


def test_smollm2_serves_through_the_cmpq_op(tmp_path):
    """A real model: every quantized linear runs the CMPQ op, and vLLM's greedy tokens are cmpq_kernels' own."""
    model, tokenizer = load_model("smollm2-135m")
    report = cmpq_kernels.quantize_model(model, [read_text("lee-train")], bits=3.0, tokenizer=tokenizer, n_samples=8,
                                         seq_len=128, progress=False)
    directory = tmp_path / "smollm2-cmpq3"
    cmpq_kernels.save_quantized(model, str(directory), tokenizer=tokenizer, report=report)
    result = serve(directory, tmp_path / "result.json")
    assert result["quantization"] == "cmpq"
    calls = result["quantized_calls"]
    assert set(calls) == expected_layers(directory) and len(calls) == 30 * 4
    assert min(calls.values()) >= MAX_TOKENS  # prefill, then one call per decode step at least
    assert result["token_ids"] == own_tokens(directory)


def test_tensor_parallel_2_matches_tp1_and_own_path(tiny_dir, tmp_path):
    """tp = 2: column-parallel qkv/gate_up (one KV head per rank) and row-parallel o/down (repacked) shards."""
    tp1 = serve(tiny_dir, tmp_path / "tp1.json", tp=1)
    tp2 = serve(tiny_dir, tmp_path / "tp2.json", tp=2)
    assert set(tp1["quantized_calls"]) == expected_layers(tiny_dir)
    own = own_tokens(tiny_dir)
    assert tp1["token_ids"] == own
    assert tp2["token_ids"] == own
    assert len({tuple(t) for t in own}) > 1  # the prompts do not all collapse to one continuation


def test_unfused_checkpoint_still_serves(tokenizer, tmp_path):
    """Parts quantized with their own permutations run as separate products: slower, same tokens."""
    directory = quantize_tiny(tmp_path / "unfused", tokenizer, share_input_widths=False)
    result = serve(directory, tmp_path / "result.json")
    assert set(result["quantized_calls"]) == expected_layers(directory)
    assert result["token_ids"] == own_tokens(directory)


def test_quantized_lm_head_is_refused_clearly(tokenizer, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    report = cmpq_kernels.quantize_model(model, ["A short text to calibrate on. " * 20], bits=3.0, tokenizer=tokenizer,
                                         n_samples=2, seq_len=32, progress=False, quantize_lm_head=True)
    directory = tmp_path / "head"
    cmpq_kernels.save_quantized(model, str(directory), tokenizer=tokenizer, report=report)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CACHE_ROOT": str(tmp_path / "cache")}
    run = subprocess.run([VLLM_PYTHON, str(SERVE), str(directory), "--out", str(tmp_path / "r.json")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "a quantized lm_head is not supported" in run.stdout + run.stderr


@pytest.mark.parametrize("act_bits", [8, 16])
def test_mixllm_serves_at_tp1_and_tp2_with_its_own_tokens(tokenizer, tmp_path, act_bits):
    """The "mixllm" method: every quantized linear runs the MixLLM op; tp = 2 shards rows (qkv, gate_up) and whole
    input-channel groups (o, down); both give cmpq_kernels' own greedy tokens."""
    directory = quantize_tiny_mixllm(tmp_path / "mixllm", tokenizer, act_bits)
    tp1 = serve(directory, tmp_path / "tp1.json", tp=1)
    assert tp1["quantization"] == "mixllm" and set(tp1["quantized_calls"]) == expected_layers(directory)
    own = own_tokens(directory, load=cmpq_kernels.load_mixllm)
    assert tp1["token_ids"] == own
    assert len({tuple(t) for t in own}) > 1
    if act_bits == 8:
        assert serve(directory, tmp_path / "tp2.json", tp=2)["token_ids"] == own
