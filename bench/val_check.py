"""Is ``val_ppl`` (bench/accuracy.py) a stable basis for choosing settings? One quantization per setting, scored on
the 16 validation windows accuracy.py records, on 64 evenly spaced unused windows (16,384 tokens), and
on the test text at 4,096 and 16,384 tokens. Prints one JSON line per setting.

Example: ``python bench/val_check.py --model gemma3-270m --methods cmpq-eff-greedy-r4:3.0 cmpq-eff-paper-r1:3.0``
(16 x 256 calibration, as the committed accuracy rows). The committed runs, one at a time with 1 thread on a machine
shared with other jobs (load average 1.3-4.3 on 2 cores, in each line), are ``bench/results/val_check.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accuracy as acc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calib, evaluation = acc.lee_split()
    for spec in args.methods:
        model, tok = acc.load_gguf_model(args.model)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        info = acc.run_method(spec, model, tok, calib, args) if spec != "fp32" else {}
        quant_s = time.perf_counter() - start
        prefix = acc.bos_prefix(tok)
        row = {"model": args.model, "method": spec, "quantize_seconds": round(quant_s, 1), "load": round(load, 2),
               "effective_bits": info.get("effective_bits", 32.0)}
        for n in (16, 64):
            row[f"val_ppl_{n}w"] = acc.windows_perplexity(
                model, acc.validation_ids(calib, tok, args.calib_samples, args.calib_len, n), prefix)
        for tokens in (4096, 16384):
            row[f"test_ppl_{tokens}"] = acc.perplexity(model, tok, evaluation, 512, tokens, progress=False)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
