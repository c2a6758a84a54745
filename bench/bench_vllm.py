"""vLLM serving benchmark: FP vs CMPQ 3/4-bit SmolLM2 through the real vLLM engine, tokens/s and agreement.

Method. The FP model is the offline SmolLM2-135M (the cached Hugging Face copy of its GGUF); CMPQ checkpoints
are quantized here as `cmpq quantize` does by default (lee-train, 32 x 256 calibration windows, defaults).
Each model is served by ``bench/vllm_serve.py`` in its own process under the vLLM environment
(``CMPQ_VLLM_PYTHON``, made by ``scripts/vllm_venv.sh``): ``enforce_eager``, one warm-up request, then the
prompts as one batch of greedy requests of ``--max-tokens`` new tokens (``ignore_eos``), timed end to end.
Throughput is generated tokens over wall seconds of that batch, per dtype (bfloat16, what vLLM serves on CPU,
and float32). Agreement: the fraction of a CMPQ model's greedy tokens equal to the FP model's at the same
dtype, up to the first difference per prompt (a quantized model legitimately diverges), and whether the
float32 CMPQ tokens follow cmpq_kernels' own ``generate()`` on the same checkpoint (same weights, same
arithmetic up to summation order; batched prompts change the order, so a near-tie can flip a token). With
``--reuse``, a model's result already in ``--work`` is read instead of served again. CPU timings: run alone.

    CMPQ_VLLM_PYTHON=.venv-vllm/bin/python python bench/bench_vllm.py [--bits 3 4] [--out bench/results/vllm_cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import cpu_model, markdown_table, write_json_and_markdown  # noqa: E402
from vllm_serve import PROMPTS  # noqa: E402

PROMPTS_8 = PROMPTS + ["In the year 2050, cities will", "The best way to learn a language is",
                       "Water boils at a temperature of", "My favourite book is"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=float, nargs="+", default=[3.0, 4.0])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--work", help="directory for checkpoints and raw results (default: a temporary one)")
    p.add_argument("--reuse", action="store_true", help="read results already in --work instead of serving again")
    p.add_argument("--out", default=str(HERE / "results" / "vllm_cpu"), help="writes OUT.json and OUT.md")
    return p.parse_args()


def serve(python: str, model: Path, dtype: str, max_tokens: int, work: Path, reuse: bool) -> dict:
    out = work / f"{model.name}-{dtype}.json"
    if reuse and out.exists():
        return json.loads(out.read_text())
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS_8))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "VLLM_CACHE_ROOT": str(work / "cache")}
    cmd = [python, str(HERE / "vllm_serve.py"), str(model), "--out", str(out), "--dtype", dtype,
           "--max-tokens", str(max_tokens), "--prompts", str(prompts)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"vLLM run of {model} ({dtype}) failed:\n{run.stderr[-4000:]}")
    return json.loads(out.read_text())


def quantize(bits: float, work: Path) -> Path:
    out = work / f"smollm2-cmpq{bits:g}"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "cmpq_kernels.cli", "quantize", "--model", "smollm2-135m", "--bits",
                        str(bits), "--calib", "lee-train", "--out", str(out)], check=True)
    return out


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Tokens equal up to each prompt's first difference, over the tokens both produced (``generate()`` stops at
    EOS, the vLLM runs do not)."""
    same = 0
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if u != v:
                break
            same += 1
    return same / sum(min(len(x), len(y)) for x, y in zip(a, b))


def own_tokens(model: Path, max_tokens: int) -> list[list[int]]:
    from cmpq_kernels.checkpoint import load_quantized
    from cmpq_kernels.generation import generate
    from cmpq_kernels.models import load_tokenizer

    m, tok = load_quantized(str(model)), load_tokenizer(str(model))
    return [generate(m, tok, p, max_tokens, echo=False)["token_ids"] for p in PROMPTS_8]


def main() -> int:
    args = parse_args()
    python = os.environ.get("CMPQ_VLLM_PYTHON")
    if not python:
        sys.exit("set CMPQ_VLLM_PYTHON to the Python of a vLLM environment (bash scripts/vllm_venv.sh makes one)")
    from cmpq_kernels.checkpoint import read_quantization_config
    from cmpq_kernels.models import CACHE_DIR, load_gguf_model

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_vllm_"))
    work.mkdir(parents=True, exist_ok=True)
    load_gguf_model("smollm2-135m")  # makes the cached HF copy served as the FP model
    models = {"FP": Path(CACHE_DIR) / "smollm2-135m", **{f"CMPQ {b:g}-bit": quantize(b, work) for b in args.bits}}
    runs = {(name, dtype): serve(python, path, dtype, args.max_tokens, work, args.reuse)
            for dtype in args.dtypes for name, path in models.items()}
    rows = []
    for (name, dtype), r in runs.items():
        quantized = name != "FP"
        row = {"model": name, "dtype": dtype, "tokens_per_s": r["tokens_per_s"], "load_seconds": r["load_seconds"],
               "vs_fp_tokens_per_s": r["tokens_per_s"] / runs[("FP", dtype)]["tokens_per_s"],
               "agreement_with_fp": prefix_agreement(r["token_ids"], runs[("FP", dtype)]["token_ids"]),
               "effective_bits": (read_quantization_config(str(models[name]))[1]["effective_bits"]
                                  if quantized else 16.0 if dtype != "float32" else 32.0)}
        if quantized and dtype == "float32":
            row["agreement_with_own_generate"] = prefix_agreement(r["token_ids"], own_tokens(models[name], args.max_tokens))
        rows.append(row)
    doc = {"method": __doc__.split("\n\n")[1], "machine": cpu_model(), "torch_threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d"), "prompts": PROMPTS_8, "max_tokens": args.max_tokens, "rows": rows}
    table = "\n".join(markdown_table(
        ["model", "dtype", "eff. bits", "tokens/s", "× FP", "agreement with FP", "agreement with own generate()"],
        [[r["model"], r["dtype"], f"{r['effective_bits']:.2f}", f"{r['tokens_per_s']:.1f}",
          f"{r['vs_fp_tokens_per_s']:.2f}", f"{r['agreement_with_fp']:.2f}",
          f"{r['agreement_with_own_generate']:.2f}" if "agreement_with_own_generate" in r else "—"] for r in rows],
        text_columns=(0, 1)))
    markdown = (f"# vLLM (CPU build) serving SmolLM2-135M: FP vs CMPQ\n\n{doc['method']}\n\nMachine: {doc['machine']}, "
                f"{doc['torch_threads']} threads, {doc['date']}; {len(PROMPTS_8)} prompts × {args.max_tokens} "
                f"tokens per batch.\n\n{table}\n")
    write_json_and_markdown(doc, markdown, Path(args.out))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
