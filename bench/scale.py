"""Scale benchmark: quantize, save and load a Llama-2-7B-shaped model block by block, measuring memory and time.

Method:
  1. Write a Llama checkpoint of the 7B shape (hidden 4096, MLP 11008, 32 heads, vocab 32000) with random BF16
     weights (std 0.02) and ``--blocks`` decoder blocks, sharded, tensor by tensor (the writer holds one tensor).
     Random weights say nothing about accuracy (that is ``bench/accuracy.py``'s job); they only have the
     sizes. The full 32-block model's bytes are computed from the same shapes.
  2. In a fresh process: ``quantize_checkpoint`` at ``--bits`` with ``--samples`` x ``--seq-len`` random
     calibration tokens; peak RSS (getrusage, over the process's baseline after imports), seconds per block.
  3. In a fresh process: ``load_quantized`` and one forward pass of 16 tokens; peak RSS, seconds, against the
     seconds to read the checkpoint's files once (cold or warm page cache as the OS has it: both are reported
     as measured, nothing is dropped).
  4. Projection: seconds per block x 32 / 40 / 80 blocks (7B / 13B / 70B block counts), scaled by each model's
     per-block weight count (n*k) for the k-means and packing work and by k^2 for the Hessian work -- a
     prediction, labelled as such.

Writes ``<out>.json`` and ``<out>.md``. Run alone on the machine: other load distorts both time and memory.

    python bench/scale.py --blocks 2 --out bench/results/scale
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_json_and_markdown  # noqa: E402

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
#: (blocks, hidden, intermediate) of the Llama-2 family, for the projection.
FAMILY = {"7B": (32, 4096, 11008), "13B": (40, 5120, 13824), "70B": (80, 8192, 28672)}


def write_source(directory: str, blocks: int, shard_bytes: int) -> dict:
    """A random BF16 Llama checkpoint of the 7B shape with ``blocks`` blocks; returns its sizes and seconds."""
    import transformers

    from cmpq_kernels.shards import ShardWriter

    start = time.perf_counter()
    config = transformers.LlamaConfig(num_hidden_layers=blocks, **SHAPE)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    os.makedirs(directory)
    writer = ShardWriter(directory, shard_bytes)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in skeleton.state_dict().items():
        value = torch.ones(tensor.shape) if name.endswith("norm.weight") else \
            torch.randn(tensor.shape, generator=generator) * 0.02
        writer.add(name, value.to(torch.bfloat16))
    writer.finish()
    config.dtype = "bfloat16"
    config.save_pretrained(directory)
    block_params = sum(t.numel() for n, t in skeleton.state_dict().items() if ".layers.0." in n)
    other_params = sum(t.numel() for n, t in skeleton.state_dict().items() if ".layers." not in n)
    return {"seconds": time.perf_counter() - start, "block_params": block_params, "other_params": other_params,
            "bytes": writer.total_bytes, "model_bytes_32_blocks_bf16": 2 * (32 * block_params + other_params)}


_QUANTIZE = """
import json, resource, sys, time, torch, transformers
from cmpq_kernels.from_disk import quantize_checkpoint
with torch.device("meta"):
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(num_hidden_layers=1))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
source, out, bits, samples, seq_len = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ids = [torch.randint(0, 32000, (samples * seq_len,), generator=torch.Generator().manual_seed(1))]
start = time.perf_counter()
report = quantize_checkpoint(source, out, ids, bits, n_samples=samples, seq_len=seq_len, max_shard_bytes=2 * 10**9)
seconds = time.perf_counter() - start
per_block = {}
for layer in report.layers:
    block = int(layer["name"].split(".")[2])
    per_block[block] = per_block.get(block, 0.0) + layer["seconds"]
print(json.dumps({"seconds": seconds, "seconds_per_block_quantize": per_block, "stage_seconds": report.stage_seconds,
                  "effective_bits": report.effective_bits, "memory_estimate": report.settings["memory_estimate"],
                  "base_rss": base, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

_LOAD = """
import json, resource, sys, time, torch, transformers
import cmpq_kernels
from cmpq_kernels.shards import weight_files
with torch.device("meta"):
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(num_hidden_layers=1))
directory = sys.argv[1]
start = time.perf_counter()
for name in weight_files(directory):
    with open(f"{directory}/{name}", "rb") as f:
        while f.read(1 << 24):
            pass
read_seconds = time.perf_counter() - start
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
model = cmpq_kernels.load_quantized(directory)
load_seconds = time.perf_counter() - start
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
with torch.no_grad():
    logits = model(input_ids=torch.arange(16)[None]).logits
print(json.dumps({"read_seconds": read_seconds, "load_seconds": load_seconds, "forward_seconds":
                  time.perf_counter() - start, "finite": bool(torch.isfinite(logits).all()), "base_rss": base,
                  "peak_rss": load_peak}))
"""


def run(script: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"subprocess failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def projection(seconds_per_block: float) -> dict:
    """Predicted quantize seconds for the Llama-2 family from the measured 7B-shaped block (see the docstring)."""
    _, h7, i7 = FAMILY["7B"]
    out = {}
    for name, (blocks, h, i) in FAMILY.items():
        weights = (4 * h * h + 3 * h * i) / (4 * h7 * h7 + 3 * h7 * i7)
        hessian = (4 * h * h + 3 * i * i) / (4 * h7 * h7 + 3 * i7 * i7)
        out[name] = {"blocks": blocks, "seconds_low": blocks * seconds_per_block * weights,
                     "seconds_high": blocks * seconds_per_block * max(weights, hessian)}
    return out


def markdown(doc: dict) -> str:
    q, l, s = doc["quantize"], doc["load"], doc["source"]
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    per_block = sorted(q["seconds_per_block_quantize"].values())
    lines = [
        f"# Scale: Llama-2-7B-shaped model, block by block ({doc['meta']['date']})",
        "",
        f"Machine: {doc['meta']['machine']}, torch {doc['meta']['torch']}, {doc['meta']['threads']} threads. "
        f"Random BF16 weights (sizes only: no accuracy claim). {doc['blocks']} of 32 blocks written and quantized "
        f"at {doc['bits']} bits; calibration {doc['samples']} x {doc['seq_len']} tokens.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| source written ({doc['blocks']} blocks, BF16) | {gb(s['bytes'])} in {s['seconds']:.0f} s |",
        f"| full 32-block model (BF16, computed) | {gb(s['model_bytes_32_blocks_bf16'])} |",
        f"| quantize: peak RSS above imports | {gb(q['peak_rss'] - q['base_rss'])} "
        f"(estimate {gb(q['memory_estimate']['total'])}) |",
        f"| quantize: seconds per block (quantizer only) | {', '.join(f'{x:.0f}' for x in per_block)} |",
        f"| quantize: total seconds | {q['seconds']:.0f} |",
        f"| effective bits | {q['effective_bits']:.3f} |",
        f"| checkpoint on disk | {gb(doc['checkpoint_bytes'])} |",
        f"| load: peak RSS above imports | {gb(l['peak_rss'] - l['base_rss'])} "
        f"({(l['peak_rss'] - l['base_rss']) / doc['checkpoint_bytes']:.2f}x the checkpoint) |",
        f"| load seconds / reading the files once | {l['load_seconds']:.1f} s / {l['read_seconds']:.1f} s "
        f"({l['load_seconds'] / max(l['read_seconds'], 1e-9):.1f}x) |",
        f"| forward of 16 tokens after load | {l['forward_seconds']:.1f} s, finite logits: {l['finite']} |",
        "",
        "Memory estimate by part (prediction from `memory_estimate`): "
        + ", ".join(f"{k} {gb(v)}" for k, v in q["memory_estimate"].items() if k != "total") + ".",
        "",
        "Projected quantize time on this CPU (a **prediction** from the measured block: low = scaled by weights "
        "per block, high = by the Hessian term k^2 where that grows faster):",
        "",
        "| model | blocks | hours (low - high) |",
        "|---|---|---|",
    ]
    lines += [f"| Llama-2-{name} | {p['blocks']} | {p['seconds_low'] / 3600:.1f} - {p['seconds_high'] / 3600:.1f} |"
              for name, p in doc["projection"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2, help="decoder blocks to write and quantize (of 32)")
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--work", help="folder for the checkpoints (default: a temporary one, removed)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "scale"))
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="cmpq-scale-")
    source, quantized = os.path.join(work, "llama-7b-shape"), os.path.join(work, "llama-7b-shape-cmpq")
    try:
        print(f"writing a {args.blocks}-block 7B-shaped BF16 checkpoint under {work} ...", flush=True)
        src = write_source(source, args.blocks, 2 * 10**9)
        print(f"  {src['bytes'] / 1e9:.2f} GB in {src['seconds']:.0f} s; quantizing ...", flush=True)
        q = run(_QUANTIZE, source, quantized, str(args.bits), str(args.samples), str(args.seq_len))
        print(f"  {q['seconds']:.0f} s, peak RSS +{(q['peak_rss'] - q['base_rss']) / 1e9:.2f} GB; loading ...",
              flush=True)
        from cmpq_kernels.checkpoint import checkpoint_bytes

        loaded = run(_LOAD, quantized)
        per_block = sum(q["seconds_per_block_quantize"].values()) / len(q["seconds_per_block_quantize"])
        doc = {"blocks": args.blocks, "bits": args.bits, "samples": args.samples, "seq_len": args.seq_len,
               "source": src, "quantize": q, "load": loaded, "checkpoint_bytes": checkpoint_bytes(quantized)["weights"],
               "model_bytes": src["model_bytes_32_blocks_bf16"], "quantize_peak_rss_bytes": q["peak_rss"] - q["base_rss"],
               "load_peak_rss_bytes": loaded["peak_rss"] - loaded["base_rss"],
               "calibration_tokens": args.samples * args.seq_len, "blocks_quantized": args.blocks,
               "seconds_per_block": per_block, "projection": projection(per_block),
               "meta": {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} cores", "torch": torch.__version__, "threads": torch.get_num_threads()}}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    write_json_and_markdown(doc, markdown(doc), Path(args.out))
    print(markdown(doc))


if __name__ == "__main__":
    main()
