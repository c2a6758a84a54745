"""CPU checks of the benchmarks' shared helpers (bench/bench_common.py, gpu_results.py, gpu_gate.py,
random_layers.py): the bytes / floor formulas, the random layers (same storage as the stand-in quantizer's),
the tables, the JSON schema and the budget. Fast: a few seconds.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from cmpq_kernels import ops, reference
from cmpq_kernels.format import SEGMENT_BITS
from cmpq_kernels.quantize import quantize_standin
from cmpq_kernels.quantize.allocate import segment_sizes
from conftest import BENCH_DIR, import_bench, strict_json

bench_common = import_bench("bench_common")
gpu_results = import_bench("gpu_results")
gpu_gate = import_bench("gpu_gate")
random_layers = import_bench("random_layers")


# ---- formulas ---------------------------------------------------------------------------------------------


def test_path_labels_mirror_the_cuda_dispatch_table():
    header = (BENCH_DIR.parent / "csrc" / "cuda" / "launchers.h").read_text()
    gemv = int(re.search(r"kGemvMaxM\s*=\s*(\d+)", header).group(1))
    gemm = int(re.search(r"kGemmMaxM\s*=\s*(\d+)", header).group(1))
    assert (gpu_results.GEMV_MAX_M, gpu_results.GEMM_MAX_M) == (gemv, gemm)
    assert [gpu_results.path_for(m) for m in (1, 8, 9, 128, 129, 512)] == \
        ["gemv", "gemv", "gemm_tc", "gemm_tc", "decode+cublas", "decode+cublas"]


def test_bytes_formula_by_hand():
    n, k, bits = 4096, 4096, 3.0
    layer = random_layers.make_random_layer(n, k, bits)
    nnz = round(0.005 * n * k)
    expected = (n * (k // 32 * 3) * 4          # 3-bit code words, int32
                + n * 8 * 2                    # one fp16 codebook row per output row (3-bit, the only segment)
                + (n + 1) * 4 + nnz * 2 + nnz * 2  # CSR: row_ptr int32, col int16 (k <= 32767), val fp16
                + k * 4)                       # perm int32
    assert layer.nnz == nnz
    assert bench_common.layer_bytes(layer) == expected == sum(layer.storage_bits().values()) // 8
    for m in (1, 16, 512):
        assert gpu_results.cmpq_bytes(expected, n, k, m) == expected + 2 * m * k + 2 * m * n
        assert gpu_results.dense_bytes(n, k, m) == 2 * n * k + 2 * m * k + 2 * m * n


def test_bandwidth_floor_and_percentages():
    assert gpu_results.copy_gbps(2**30, 1e-3) == pytest.approx(2 * 2**30 / 1e-3 / 1e9)  # a copy reads and writes
    assert gpu_results.floor_us(10**9, 1000.0) == pytest.approx(1000.0)
    assert gpu_results.gbps(3 * 10**9, 1000.0) == pytest.approx(3000.0)
    info = {"layer_bytes": 10**6, "code_bits": 3.0, "effective_bits": 3.3, "nnz": 5}
    n, k, m = 1000, 2000, 4
    nbytes = 10**6 + 2 * m * (k + n)
    fl = nbytes / 2000e9 * 1e6
    row = gpu_results.make_row(n=n, k=k, m=m, bits=3.0, info=info, status="ok", gate_err=1e-4,
                       cmpq={"median_us": 2 * fl, "min_us": fl, "reps": 7}, cublas_us=3 * fl, copy_bw_gbps=2000.0)
    assert row["cmpq_bytes"] == nbytes and row["floor_us"] == pytest.approx(fl)
    assert row["pct_floor"] == pytest.approx(50.0) and row["speedup"] == pytest.approx(1.5)
    assert row["cmpq_gbps"] == pytest.approx(nbytes / (2 * fl) / 1e3) and row["path"] == "gemv" and row["reps"] == 7
    assert set(gpu_results.ROW_KEYS) <= set(row)
    missing = gpu_results.make_row(n=n, k=k, m=m, bits=3.0, info=info, status="gate_failed", gate_err=None, cmpq=None,
                           cublas_us=None, copy_bw_gbps=None)
    assert all(missing[key] is None for key in ("cmpq_us", "speedup", "floor_us", "pct_floor", "cmpq_gbps"))
    cub = gpu_results.make_cublas_row(n=n, k=k, m=m, timing={"median_us": 10.0, "min_us": 9.0, "reps": 5},
                              copy_bw_gbps=2000.0)
    assert set(gpu_results.CUBLAS_KEYS) <= set(cub)
    assert cub["pct_floor"] == pytest.approx(100 * gpu_results.dense_bytes(n, k, m) / 2000e3 / 10)


# ---- layers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k,bits", [(64, 256, 2.0), (64, 256, 2.5), (33, 128, 3.0), (48, 896, 3.5), (40, 32800, 4.0)])
def test_random_layer_has_the_standin_storage(n, k, bits):
    """Same tensors (dtypes, shapes, nnz) as quantize_standin, hence the same bytes and effective bits."""
    fast = random_layers.make_random_layer(n, k, bits, seed=3)
    slow = quantize_standin(torch.randn(n, k) * 0.02, bits, outlier_fraction=random_layers.OUTLIER_FRACTION)
    assert fast.seg_k == slow.seg_k == segment_sizes(k, bits)
    assert fast.nnz == slow.nnz
    assert fast.storage_bits() == slow.storage_bits()
    assert fast.effective_bits == slow.effective_bits and fast.code_bits == slow.code_bits
    for a, b in zip((fast.perm, *fast.codes, *fast.codebooks, fast.row_ptr, fast.col, fast.val),
                    (slow.perm, *slow.codes, *slow.codebooks, slow.row_ptr, slow.col, slow.val)):
        assert a.dtype == b.dtype and a.shape == b.shape


def test_random_layer_is_valid_random_and_runs():
    layer = random_layers.make_random_layer(96, 320, 2.5, seed=5, bias=torch.float16)
    layer.validate()
    assert layer.bias is not None and layer.bias.dtype == torch.float16
    for s, b in enumerate(SEGMENT_BITS):  # codes cover the whole range; codebooks sorted per row
        if layer.seg_k[s]:
            codes = layer.unpacked_codes(s)
            assert codes.min() == 0 and codes.max() == (1 << b) - 1
            cb = layer.codebooks[s].float()
            assert bool((cb[:, 1:] >= cb[:, :-1]).all())
    rows = np.repeat(np.arange(layer.n), np.diff(layer.row_ptr.numpy()))
    flat = rows * layer.k + layer.col.numpy().astype(np.int64)
    assert len(np.unique(flat)) == layer.nnz  # distinct positions
    x = torch.randn(3, 320)
    torch.testing.assert_close(ops.gemm(x, layer), reference.linear(x, layer), rtol=1e-4, atol=1e-4)
    again = random_layers.make_random_layer(96, 320, 2.5, seed=5, bias=torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(layer.codes, again.codes))  # seeded


def test_slice_rows_decodes_to_the_same_rows():
    layer = random_layers.make_random_layer(300, 256, 3.5, seed=1)
    full = reference.dequantize(layer)
    for a, b in [(0, 128), (150, 278), (172, 300), (0, 300)]:
        part = random_layers.slice_rows(layer, a, b)
        assert part.n == b - a
        assert torch.equal(reference.dequantize(part), full[a:b])
    with pytest.raises(ValueError):
        random_layers.slice_rows(layer, 10, 5)
    assert gpu_gate.gate_slices(200) == [(0, 200)]
    sl = gpu_gate.gate_slices(151936)
    assert len(sl) == 3 and sl[0] == (0, 128) and sl[-1] == (151936 - 128, 151936)
    assert all(a < b <= c for (a, b), (c, _) in zip(sl, sl[1:]))


def test_rel_err_flags_nan_and_inf():
    ref = torch.ones(4)
    assert gpu_gate.rel_err(ref, ref) == 0.0
    assert not gpu_gate.rel_err(torch.tensor([1.0, float("nan"), 1, 1]), ref) < 1.0
    assert not gpu_gate.rel_err(torch.tensor([1.0, float("inf"), 1, 1]), ref) < 1.0
    assert gpu_gate.rel_err(torch.ones(2), torch.zeros(2)) == math.inf


# ---- parsing, names -------------------------------------------------------------------------------------------


def test_case_list_parsers():
    assert bench_common.parse_shapes("4096x4096, 151936×896") == ((4096, 4096), (151936, 896))
    assert bench_common.parse_batches("1,2,512") == (1, 2, 512)
    assert bench_common.parse_bits("2,2.5,4") == (2.0, 2.5, 4.0)


def test_slug_and_output_paths(tmp_path):
    assert gpu_results.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_results.device_slug("NVIDIA H200") == "nvidia-h200" and gpu_results.device_slug("  ") == "unknown"
    assert gpu_results.resolve_out(None, "nvidia-h100", False, tmp_path) == tmp_path / "gpu_nvidia-h100"
    assert gpu_results.resolve_out(None, "nvidia-h100", True, tmp_path) == tmp_path / "gpu_nvidia-h100_quick"
    assert gpu_results.resolve_out(str(tmp_path), "x", False) == tmp_path / "gpu_x"  # existing directory
    assert gpu_results.resolve_out(str(tmp_path / "new") + "/", "x", False) == tmp_path / "new" / "gpu_x"
    assert gpu_results.resolve_out(str(tmp_path / "run.json"), "x", False) == tmp_path / "run"
    assert gpu_results.resolve_out(str(tmp_path / "gpu_bench"), "x", False) == tmp_path / "gpu_bench"


# ---- tables and JSON -------------------------------------------------------------------------------------------


def _row(n, k, m, bits, speedup):
    info = {"layer_bytes": 1000, "code_bits": bits, "effective_bits": bits + 0.3, "nnz": 1}
    cmpq = {"median_us": 10.0, "min_us": 9.0, "reps": 5}
    return gpu_results.make_row(n=n, k=k, m=m, bits=bits, info=info, status="ok", gate_err=1e-4, cmpq=cmpq,
                        cublas_us=10.0 * speedup, copy_bw_gbps=3000.0)


def test_crossover():
    rows = [_row(64, 128, m, 3.0, s) for m, s in ((1, 3.0), (8, 2.0), (16, 0.9), (64, 1.1), (512, 0.5))]
    rows += [_row(64, 128, m, 2.5, 2.0) for m in (1, 16)]
    rows += [_row(32, 64, 4, 4.0, 0.5)]
    rows.append(gpu_results.make_row(n=32, k=64, m=1, bits=2.0, info={"layer_bytes": 1, "code_bits": 2,
                             "effective_bits": 2.5, "nnz": 0}, status="gate_failed", gate_err=None, cmpq=None,
                             cublas_us=5.0, copy_bw_gbps=None))
    assert gpu_results.crossover(rows) == {"64x128": {"3": 16, "2.5": "none"}, "32x64": {"4": 4, "2": None}}


def test_markdown_table_aligns_numbers_right_and_text_left():
    assert bench_common.markdown_table(("shape", "M", "path"), [("4×8", "1", "gemv")], text_columns=(0, 2)) == [
        "| shape | M | path |", "|---|---:|---|", "| 4×8 | 1 | gemv |"]


def test_markdown_tables_are_well_formed():
    rows = [_row(64, 128, m, 3.0, 1.2) for m in (1, 16)]
    rows[0]["graph_us"] = 8.5
    rows.append(gpu_results.make_row(n=64, k=128, m=512, bits=3.0, info={"layer_bytes": 1, "code_bits": 3,
                             "effective_bits": 3.3, "nnz": 0}, status="gate_failed", gate_err=None, cmpq=None,
                             cublas_us=None, copy_bw_gbps=None))
    cub = [gpu_results.make_cublas_row(n=64, k=128, m=1, timing={"median_us": 12.0, "min_us": 11.0, "reps": 5},
                               copy_bw_gbps=3000.0, lat_eager_us=20.0)]
    meta = {k: None for k in gpu_results.META_KEYS}
    meta.update(device_name="NVIDIA H100 80GB HBM3", sm_count=132, l2_bytes=50 * 2**20, driver_version="580",
                torch="2.11", torch_cuda="13.0", date="2026-01-01", reps=50, warmup=5, flush_mode="zero",
                flush_bytes=256 << 20, bits=[3.0], copy_bandwidth={"gbps": 3000.0, "bytes": 2**30})
    doc = gpu_results.results_doc(meta, rows, cub, [{"case": "64x128 bits=3 M=512", "what": "GATE FAILED: x"}], True,
                          "--max-seconds 10 reached")
    md = gpu_results.markdown(doc)
    assert "PARTIAL RESULTS" in md and "GATE FAILED" in md and "GATE_FAILED" in md and "8.50" in md
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.count("|") for ln in lines}) == 1, block  # every row has the header's columns
    main_table = [ln for ln in md.splitlines() if ln.startswith("| 64×128 | 1 | 3 |")][0]
    cells = [c.strip() for c in main_table.strip("|").split("|")]
    assert cells == ["64×128", "1", "3", "3.300", "gemv", "10.00", "12.00", "1.20", "0", "0", "8.50"]


def test_results_json_is_strict_and_complete(tmp_path):
    meta = {k: None for k in gpu_results.META_KEYS}
    meta["weird"] = (float("nan"), np.float32(1.5), np.int64(3), float("inf"))
    rows = [_row(64, 128, 1, 3.0, 1.0)]
    rows[0]["gate_rel_err"] = float("nan")
    doc = gpu_results.results_doc(meta, rows, [], [], False, None)
    gpu_results.check_doc(doc)
    meta2 = dict(meta, device_name="x", sm_count=1, l2_bytes=0, driver_version="d", torch="t", torch_cuda="c",
                 date="d", reps=1, warmup=0, flush_mode="zero", flush_bytes=0, bits=[3.0], copy_bandwidth=None)
    gpu_results.write_results(gpu_results.results_doc(meta2, rows, [], [], False, None), tmp_path / "r")
    back = strict_json(tmp_path / "r.json")
    assert back["meta"]["weird"] == [None, 1.5, 3, None] and back["rows"][0]["gate_rel_err"] is None
    assert (tmp_path / "r.md").read_text().startswith("# CMPQ GPU benchmark")
    with pytest.raises(ValueError, match="rows\\[0\\]"):
        bad = json.loads(json.dumps(doc))
        del bad["rows"][0]["pct_floor"]
        gpu_results.check_doc(bad)
    with pytest.raises(ValueError, match="meta"):
        gpu_results.check_doc({**doc, "meta": {}})


def test_budget():
    now = [100.0]
    b = gpu_results.Budget(10, clock=lambda: now[0])
    assert b.remaining() == 10 and not b.exceeded()
    now[0] = 108.0
    assert b.exceeded(reserve=3) and not b.exceeded()
    now[0] = 111.0
    assert b.exceeded() and b.elapsed() == 11
    assert gpu_results.Budget(None).remaining() == math.inf and gpu_results.Budget(0).remaining() == math.inf


# ---- bench_mixllm_cpu.py --------------------------------------------------------------------------------


def test_mixllm_cpu_bench_quick_writes_complete_json(tmp_path):
    out = tmp_path / "mixllm_cpu"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(BENCH_DIR / "bench_mixllm_cpu.py"), "--quick", "--out", str(out)], env=env,
                   check=True, capture_output=True, timeout=600)
    doc = strict_json(out.with_suffix(".json"))
    meta, rows = doc["meta"], doc["rows"]
    assert meta["threads"] == 1 and meta["quick"] is True and isinstance(meta["unavailable"], dict)
    assert len(meta["load_avg_before"]) == len(meta["load_avg_after"]) == 3
    measured = {r["method"] for r in rows}
    assert {"fp32", "mixllm-p0", "mixllm-p10"} <= measured
    assert measured | set(k.split()[0] for k in meta["unavailable"]) == {"fp32", "int8", "int4-g128", "mixllm-p0",
                                                                       "mixllm-p10"}
    cases = {(r["n"], r["k"], r["m"], r["method"]) for r in rows}
    assert len(cases) == len(rows) == 2 * 2 * len(measured)  # two quick shapes x M in (1, 4), each once
    by = {(r["n"], r["k"], r["m"], r["method"]): r for r in rows}
    for r in rows:  # one thread: ratios on the thread's CPU time, which the scheduler's slices do not inflate
        assert r["ms"] > 0 and r["cpu_ms"] > 0
        assert r["speedup"] == pytest.approx(by[r["n"], r["k"], r["m"], "fp32"]["cpu_ms"] / r["cpu_ms"])
    # 256 x 512: 4-bit codes + fp16 scale and 4-bit zero per 128 weights + an int32 row index per 512 weights;
    # p10 moves round(25.6) = 26 rows to 8-bit codes + fp16 scales.
    assert by[256, 512, 1, "mixllm-p0"]["effective_bits"] == 4 + 20 / 128 + 32 / 512
    assert by[256, 512, 1, "mixllm-p10"]["effective_bits"] == pytest.approx(
        (230 * (4 + 20 / 128) + 26 * (8 + 16 / 128)) / 256 + 32 / 512)
    assert by[256, 512, 1, "mixllm-p10"]["rel_err"] < 0.2  # a W4A8 layer of the same weights, not garbage
    summary = {(s["n"], s["k"], s["m"], s["method"]): s for s in doc["summary"]}
    s = summary[512, 256, 4, "mixllm-p10"]
    assert s["fp32_over_mixllm"] == pytest.approx(by[512, 256, 4, "fp32"]["cpu_ms"] / s["cpu_ms"])
    assert meta["ratio_clock"].startswith("thread CPU time")
    assert "mixllm-p10" in out.with_suffix(".md").read_text()
