"""CPU checks of bench/bench_gpu.py and bench/gpu_session.sh: everything but the GPU itself.

The GPU benchmark runs once, unattended, on a lent GPU, so its logic is proven here: the bytes / floor
formulas, the random layers (same storage as the stand-in quantizer's), parsing, the tables, the JSON
schema, the budget and partial results, the correctness gate, and the CUDA-only branches (events, graphs,
nvidia-smi) against fakes of the torch.cuda API. The whole benchmark also runs end to end with
``--device cpu``. Fast: a few seconds.
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from cmpq_kernels import ops, reference
from cmpq_kernels.format import SEGMENT_BITS
from cmpq_kernels.standin import quantize_standin, segment_sizes

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
bg = importlib.util.module_from_spec(_spec)
sys.modules["bench_gpu"] = bg
_spec.loader.exec_module(bg)

TINY = ["--device", "cpu", "--shapes", "64x128,40x96", "--batch", "1,9,130", "--bits", "2.5,4", "--reps", "2",
        "--warmup", "0", "--flush-mb", "1", "--copy-mb", "1", "--case-seconds", "0.2"]


def strict_json(path: Path) -> dict:
    def bad(token):
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(path.read_text(), parse_constant=bad)


# ---- formulas ---------------------------------------------------------------------------------------------


def test_path_labels_mirror_the_cuda_dispatch_table():
    header = (ROOT / "csrc" / "cuda" / "launchers.h").read_text()
    gemv = int(re.search(r"kGemvMaxM\s*=\s*(\d+)", header).group(1))
    gemm = int(re.search(r"kGemmMaxM\s*=\s*(\d+)", header).group(1))
    assert (bg.GEMV_MAX_M, bg.GEMM_MAX_M) == (gemv, gemm)
    assert [bg.path_for(m) for m in (1, 8, 9, 128, 129, 512)] == \
        ["gemv", "gemv", "gemm_tc", "gemm_tc", "decode+cublas", "decode+cublas"]


def test_bytes_formula_by_hand():
    n, k, bits = 4096, 4096, 3.0
    layer = bg.make_random_layer(n, k, bits)
    nnz = round(0.005 * n * k)
    expected = (n * (k // 32 * 3) * 4          # 3-bit code words, int32
                + n * 8 * 2                    # one fp16 codebook row per output row (3-bit, the only segment)
                + (n + 1) * 4 + nnz * 2 + nnz * 2  # CSR: row_ptr int32, col int16 (k <= 32767), val fp16
                + k * 4)                       # perm int32
    assert layer.nnz == nnz
    assert bg.layer_bytes(layer) == expected == sum(layer.storage_bits().values()) // 8
    for m in (1, 16, 512):
        assert bg.cmpq_bytes(expected, n, k, m) == expected + 2 * m * k + 2 * m * n
        assert bg.dense_bytes(n, k, m) == 2 * n * k + 2 * m * k + 2 * m * n


def test_bandwidth_floor_and_percentages():
    assert bg.copy_gbps(2**30, 1e-3) == pytest.approx(2 * 2**30 / 1e-3 / 1e9)  # a copy reads and writes
    assert bg.floor_us(10**9, 1000.0) == pytest.approx(1000.0)
    assert bg.gbps(3 * 10**9, 1000.0) == pytest.approx(3000.0)
    info = {"layer_bytes": 10**6, "code_bits": 3.0, "effective_bits": 3.3, "nnz": 5}
    n, k, m = 1000, 2000, 4
    nbytes = 10**6 + 2 * m * (k + n)
    fl = nbytes / 2000e9 * 1e6
    row = bg.make_row(n=n, k=k, m=m, bits=3.0, info=info, status="ok", gate_err=1e-4,
                      cmpq={"median_us": 2 * fl, "min_us": fl, "reps": 7}, cublas_us=3 * fl, copy_bw_gbps=2000.0)
    assert row["cmpq_bytes"] == nbytes and row["floor_us"] == pytest.approx(fl)
    assert row["pct_floor"] == pytest.approx(50.0) and row["speedup"] == pytest.approx(1.5)
    assert row["cmpq_gbps"] == pytest.approx(nbytes / (2 * fl) / 1e3) and row["path"] == "gemv" and row["reps"] == 7
    assert set(bg.ROW_KEYS) <= set(row)
    missing = bg.make_row(n=n, k=k, m=m, bits=3.0, info=info, status="gate_failed", gate_err=None, cmpq=None,
                          cublas_us=None, copy_bw_gbps=None)
    assert all(missing[key] is None for key in ("cmpq_us", "speedup", "floor_us", "pct_floor", "cmpq_gbps"))
    cub = bg.make_cublas_row(n=n, k=k, m=m, timing={"median_us": 10.0, "min_us": 9.0, "reps": 5}, copy_bw_gbps=2000.0)
    assert set(bg.CUBLAS_KEYS) <= set(cub)
    assert cub["pct_floor"] == pytest.approx(100 * bg.dense_bytes(n, k, m) / 2000e3 / 10)


def test_plan_reps_caps_slow_cases():
    assert bg.plan_reps(1e-4, 50, 2.0) == 50
    assert bg.plan_reps(0.1, 50, 2.0) == 20
    assert bg.plan_reps(10.0, 50, 2.0) == bg.MIN_REPS
    assert bg.plan_reps(10.0, 3, 2.0) == 3
    assert bg.plan_reps(0.0, 50, 2.0) == 50 and bg.plan_reps(float("nan"), 50, 2.0) == 50


# ---- layers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k,bits", [(64, 256, 2.0), (64, 256, 2.5), (33, 128, 3.0), (48, 896, 3.5), (40, 32800, 4.0)])
def test_random_layer_has_the_standin_storage(n, k, bits):
    """Same tensors (dtypes, shapes, nnz) as quantize_standin, hence the same bytes and effective bits."""
    fast = bg.make_random_layer(n, k, bits, seed=3)
    slow = quantize_standin(torch.randn(n, k) * 0.02, bits, outlier_fraction=0.005)
    assert fast.seg_k == slow.seg_k == segment_sizes(k, bits)
    assert fast.nnz == slow.nnz
    assert fast.storage_bits() == slow.storage_bits()
    assert fast.effective_bits == slow.effective_bits and fast.code_bits == slow.code_bits
    for a, b in zip((fast.perm, *fast.codes, *fast.codebooks, fast.row_ptr, fast.col, fast.val),
                    (slow.perm, *slow.codes, *slow.codebooks, slow.row_ptr, slow.col, slow.val)):
        assert a.dtype == b.dtype and a.shape == b.shape


def test_random_layer_is_valid_random_and_runs():
    layer = bg.make_random_layer(96, 320, 2.5, seed=5, bias=torch.float16)
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
    again = bg.make_random_layer(96, 320, 2.5, seed=5, bias=torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(layer.codes, again.codes))  # seeded


def test_slice_rows_decodes_to_the_same_rows():
    layer = bg.make_random_layer(300, 256, 3.5, seed=1)
    full = reference.dequantize(layer)
    for a, b in [(0, 128), (150, 278), (172, 300), (0, 300)]:
        part = bg.slice_rows(layer, a, b)
        assert part.n == b - a
        assert torch.equal(reference.dequantize(part), full[a:b])
    with pytest.raises(ValueError):
        bg.slice_rows(layer, 10, 5)
    assert bg.gate_slices(200) == [(0, 200)]
    sl = bg.gate_slices(151936)
    assert len(sl) == 3 and sl[0] == (0, 128) and sl[-1] == (151936 - 128, 151936)
    assert all(a < b <= c for (a, b), (c, _) in zip(sl, sl[1:]))


def test_rel_err_flags_nan_and_inf():
    ref = torch.ones(4)
    assert bg.rel_err(ref, ref) == 0.0
    assert not bg.rel_err(torch.tensor([1.0, float("nan"), 1, 1]), ref) < 1.0
    assert not bg.rel_err(torch.tensor([1.0, float("inf"), 1, 1]), ref) < 1.0
    assert bg.rel_err(torch.ones(2), torch.zeros(2)) == math.inf


# ---- parsing, names -------------------------------------------------------------------------------------------


def test_parsers():
    assert bg.parse_shapes("4096x4096, 151936×896") == ((4096, 4096), (151936, 896))
    assert bg.parse_batches("1,2,512") == (1, 2, 512)
    assert bg.parse_bits("2,2.5,4") == (2.0, 2.5, 4.0)
    p = bg.build_parser()
    for bad in (["--shapes", "4096"], ["--shapes", "4096x100"], ["--shapes", "ax32"], ["--batch", "0"],
                ["--batch", "1,x"], ["--bits", "1.5"], ["--bits", "4.5"], ["--bits", ""], ["--flush-mode", "x"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    args = p.parse_args([])
    assert args.graph and args.device == "cuda" and args.max_seconds is None and not args.stop_on_fail
    assert not p.parse_args(["--no-graph"]).graph


def test_slug_and_output_paths(tmp_path):
    assert bg.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bg.device_slug("NVIDIA H200") == "nvidia-h200" and bg.device_slug("  ") == "unknown"
    assert bg.resolve_out(None, "nvidia-h100", False, tmp_path) == tmp_path / "gpu_nvidia-h100"
    assert bg.resolve_out(None, "nvidia-h100", True, tmp_path) == tmp_path / "gpu_nvidia-h100_quick"
    assert bg.resolve_out(str(tmp_path), "x", False) == tmp_path / "gpu_x"  # existing directory
    assert bg.resolve_out(str(tmp_path / "new") + "/", "x", False) == tmp_path / "new" / "gpu_x"
    assert bg.resolve_out(str(tmp_path / "run.json"), "x", False) == tmp_path / "run"
    assert bg.resolve_out(str(tmp_path / "gpu_bench"), "x", False) == tmp_path / "gpu_bench"


# ---- tables and JSON -------------------------------------------------------------------------------------------


def _row(n, k, m, bits, speedup):
    info = {"layer_bytes": 1000, "code_bits": bits, "effective_bits": bits + 0.3, "nnz": 1}
    cmpq = {"median_us": 10.0, "min_us": 9.0, "reps": 5}
    return bg.make_row(n=n, k=k, m=m, bits=bits, info=info, status="ok", gate_err=1e-4, cmpq=cmpq,
                       cublas_us=10.0 * speedup, copy_bw_gbps=3000.0)


def test_crossover():
    rows = [_row(64, 128, m, 3.0, s) for m, s in ((1, 3.0), (8, 2.0), (16, 0.9), (64, 1.1), (512, 0.5))]
    rows += [_row(64, 128, m, 2.5, 2.0) for m in (1, 16)]
    rows += [_row(32, 64, 4, 4.0, 0.5)]
    rows.append(bg.make_row(n=32, k=64, m=1, bits=2.0, info=rows[0] and {"layer_bytes": 1, "code_bits": 2,
                            "effective_bits": 2.5, "nnz": 0}, status="gate_failed", gate_err=None, cmpq=None,
                            cublas_us=5.0, copy_bw_gbps=None))
    assert bg.crossover(rows) == {"64x128": {"3": 16, "2.5": "none"}, "32x64": {"4": 4, "2": None}}


def test_markdown_tables_are_well_formed():
    rows = [_row(64, 128, m, 3.0, 1.2) for m in (1, 16)]
    rows[0]["graph_us"] = 8.5
    rows.append(bg.make_row(n=64, k=128, m=512, bits=3.0, info={"layer_bytes": 1, "code_bits": 3,
                            "effective_bits": 3.3, "nnz": 0}, status="gate_failed", gate_err=None, cmpq=None,
                            cublas_us=None, copy_bw_gbps=None))
    cub = [bg.make_cublas_row(n=64, k=128, m=1, timing={"median_us": 12.0, "min_us": 11.0, "reps": 5},
                              copy_bw_gbps=3000.0, lat_eager_us=20.0)]
    meta = {k: None for k in bg.META_KEYS}
    meta.update(device_name="NVIDIA H100 80GB HBM3", sm_count=132, l2_bytes=50 * 2**20, driver_version="580",
                torch="2.11", torch_cuda="13.0", date="2026-01-01", reps=50, warmup=5, flush_mode="zero",
                flush_bytes=256 << 20, bits=[3.0], copy_bandwidth={"gbps": 3000.0, "bytes": 2**30})
    doc = bg.results_doc(meta, rows, cub, [{"case": "64x128 bits=3 M=512", "what": "GATE FAILED: x"}], True,
                         "--max-seconds 10 reached")
    md = bg.markdown(doc)
    assert "PARTIAL RESULTS" in md and "GATE FAILED" in md and "GATE_FAILED" in md and "8.50" in md
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.count("|") for ln in lines}) == 1, block  # every row has the header's columns
    main_table = [ln for ln in md.splitlines() if ln.startswith("| 64×128 | 1 | 3 |")][0]
    cells = [c.strip() for c in main_table.strip("|").split("|")]
    assert cells == ["64×128", "1", "3", "3.300", "gemv", "10.00", "12.00", "1.20", "0", "0", "8.50"]


def test_results_json_is_strict_and_complete(tmp_path):
    meta = {k: None for k in bg.META_KEYS}
    meta["weird"] = (float("nan"), np.float32(1.5), np.int64(3), float("inf"))
    rows = [_row(64, 128, 1, 3.0, 1.0)]
    rows[0]["gate_rel_err"] = float("nan")
    doc = bg.results_doc(meta, rows, [], [], False, None)
    bg.check_doc(doc)
    meta2 = dict(meta, device_name="x", sm_count=1, l2_bytes=0, driver_version="d", torch="t", torch_cuda="c",
                 date="d", reps=1, warmup=0, flush_mode="zero", flush_bytes=0, bits=[3.0], copy_bandwidth=None)
    bg.write_results(bg.results_doc(meta2, rows, [], [], False, None), tmp_path / "r")
    back = strict_json(tmp_path / "r.json")
    assert back["meta"]["weird"] == [None, 1.5, 3, None] and back["rows"][0]["gate_rel_err"] is None
    assert (tmp_path / "r.md").read_text().startswith("# CMPQ GPU benchmark")
    with pytest.raises(ValueError, match="rows\\[0\\]"):
        bad = json.loads(json.dumps(doc))
        del bad["rows"][0]["pct_floor"]
        bg.check_doc(bad)
    with pytest.raises(ValueError, match="meta"):
        bg.check_doc({**doc, "meta": {}})


def test_budget():
    now = [100.0]
    b = bg.Budget(10, clock=lambda: now[0])
    assert b.remaining() == 10 and not b.exceeded()
    now[0] = 108.0
    assert b.exceeded(reserve=3) and not b.exceeded()
    now[0] = 111.0
    assert b.exceeded() and b.elapsed() == 11
    assert bg.Budget(None).remaining() == math.inf and bg.Budget(0).remaining() == math.inf


# ---- end to end on the CPU -------------------------------------------------------------------------------------


def test_end_to_end_cpu_dry_run(tmp_path, capsys):
    rc = bg.main(TINY + ["--out", str(tmp_path) + "/"])
    assert rc == 0
    doc = strict_json(tmp_path / "gpu_cpu-dryrun.json")
    bg.check_doc(doc)
    assert doc["partial"] is False and doc["stop_reason"] is None and doc["failures"] == []
    assert len(doc["rows"]) == 2 * 3 * 2 and len(doc["cublas"]) == 2 * 3
    assert all(r["status"] == "ok" and r["cmpq_us"] > 0 and r["gate_rel_err"] < bg.MAX_GEMM_ERR for r in doc["rows"])
    assert {r["path"] for r in doc["rows"]} == {"gemv", "gemm_tc", "decode+cublas"}
    assert all(r["lat_eager_us"] is not None for r in doc["rows"] if r["m"] == 1)  # latency path exercised
    assert doc["meta"]["copy_bandwidth"]["gbps"] > 0
    assert set(doc["crossover"]) == {"64x128", "40x96"}
    md = (tmp_path / "gpu_cpu-dryrun.md").read_text()
    assert "| 40×96 | 130 | 4 |" in md
    assert "Crossover" in capsys.readouterr().out


def test_budget_exhaustion_writes_partial_results(tmp_path):
    rc = bg.main(TINY + ["--max-seconds", "1e-6", "--out", str(tmp_path / "p")])
    assert rc == 0
    doc = strict_json(tmp_path / "p.json")
    bg.check_doc(doc)
    assert doc["partial"] is True and "--max-seconds" in doc["stop_reason"] and doc["rows"] == []
    assert "PARTIAL RESULTS" in (tmp_path / "p.md").read_text()


def test_gate_failure_is_recorded_and_never_timed(tmp_path, monkeypatch):
    real = ops.gemm

    def wrong_for_large_m(x, layer, bias=None):
        y = real(x, layer, bias)
        return y * 1.1 if x.shape[0] > bg.GEMM_MAX_M else y

    monkeypatch.setattr(bg.ops, "gemm", wrong_for_large_m)
    rc = bg.main(TINY + ["--out", str(tmp_path / "g")])
    assert rc == 2
    doc = strict_json(tmp_path / "g.json")
    bad = [r for r in doc["rows"] if r["m"] == 130]
    assert len(bad) == 4 and all(r["status"] == "gate_failed" and r["cmpq_us"] is None for r in bad)
    assert all(r["status"] == "ok" for r in doc["rows"] if r["m"] != 130)
    assert len(doc["failures"]) == 4 and all("GATE FAILED" in f["what"] for f in doc["failures"])

    rc = bg.main(TINY + ["--stop-on-fail", "--out", str(tmp_path / "s")])
    doc = strict_json(tmp_path / "s.json")
    assert rc == 2 and doc["partial"] and "--stop-on-fail" in doc["stop_reason"] and doc["rows"] == []


def test_wrong_decode_fails_the_whole_layer(tmp_path, monkeypatch):
    real = ops.dequantize
    monkeypatch.setattr(bg.ops, "dequantize", lambda layer, dtype=torch.float32: real(layer, dtype) * 0.5)
    rc = bg.main(TINY + ["--shapes", "64x128", "--bits", "3", "--out", str(tmp_path / "d")])
    doc = strict_json(tmp_path / "d.json")
    assert rc == 2 and len(doc["rows"]) == 3
    assert [r["status"] for r in doc["rows"]] == ["ok", "ok", "gate_failed"]  # the decode path is the one not timed
    assert "ops.dequantize" in doc["failures"][0]["what"] and len(doc["failures"]) == 1


def test_op_that_raises_fails_only_its_m(tmp_path, monkeypatch):
    real = ops.gemm

    def raises_for_m9(x, layer, bias=None):
        if x.shape[0] == 9:
            raise RuntimeError("cmpq: gemm failed: bad shape (m=9, n=64, k=128)")
        return real(x, layer, bias)

    monkeypatch.setattr(bg.ops, "gemm", raises_for_m9)
    rc = bg.main(TINY + ["--shapes", "64x128", "--bits", "3", "--out", str(tmp_path / "r")])
    doc = strict_json(tmp_path / "r.json")
    assert rc == 2 and [r["status"] for r in doc["rows"]] == ["ok", "gate_failed", "ok"]
    assert "raised RuntimeError: cmpq: gemm failed" in doc["failures"][0]["what"]


# ---- the CUDA-only branches, against fakes of the torch.cuda API ----------------------------------------------


class FakeEvent:
    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3  # ms, like torch.cuda.Event


class FakeStream:
    def wait_stream(self, other):
        assert isinstance(other, FakeStream)


class FakeGraph:
    replays = 0

    def replay(self):
        FakeGraph.replays += 1


@contextlib.contextmanager
def fake_graph_ctx(graph, *args, **kwargs):
    assert isinstance(graph, FakeGraph)
    yield


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph_ctx)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    FakeGraph.replays = 0


def _runner(tmp_path, argv):
    args = bg.build_parser().parse_args(argv)
    args.reps, args.warmup = args.reps or 3, args.warmup or 0
    shapes, batches, bits_list = args.shapes, args.batch, args.bits
    dev = bg.Device("cpu", 1 << 20, "zero")
    meta = bg.metadata(args, dev, shapes, batches, bits_list)
    dev.cuda = True  # from here on the CUDA branches run, on CPU tensors
    return bg.Runner(args, dev, bg.Budget(None), tmp_path / "f", meta, shapes, batches, bits_list, log=lambda s: None)


def test_cuda_branches_with_fake_events_and_graphs(tmp_path, fake_cuda):
    r = _runner(tmp_path, TINY[2:] + ["--shapes", "64x128", "--bits", "3"])
    r.run()
    doc = r.write(partial=False)
    bg.check_doc(doc)
    assert r.stop_reason is None and r.failures == []
    assert doc["meta"]["copy_bandwidth"]["gbps"] > 0
    small = [x for x in doc["rows"] if x["m"] <= bg.GEMV_MAX_M]
    assert small and all(x["graph_us"] > 0 and x["lat_graph_us"] > 0 and x["graph_status"] == "ok" for x in small)
    assert all(x["graph_us"] is None for x in doc["rows"] if x["m"] > bg.GEMV_MAX_M)
    assert doc["cublas"][0]["graph_us"] > 0 and doc["cublas"][0]["lat_graph_us"] > 0
    assert FakeGraph.replays > 0


def test_graph_capture_failure_is_recorded_not_fatal(tmp_path, fake_cuda, monkeypatch):
    class Broken(FakeGraph):
        def __init__(self):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Broken)
    r = _runner(tmp_path, TINY[2:] + ["--shapes", "64x128", "--bits", "3", "--batch", "1"])
    r.run()
    row = r.rows[0]
    assert row["status"] == "ok" and row["graph_us"] is None and row["graph_status"].startswith("capture failed")
    assert any("CUDA graph" in f["what"] for f in r.failures) and r.stop_reason is None


def test_sticky_device_error_stops_the_run(tmp_path, fake_cuda, monkeypatch):
    r = _runner(tmp_path, TINY[2:] + ["--shapes", "64x128,40x96", "--bits", "3"])
    real = ops.gemm
    calls = {"n": 0}

    def flaky(x, layer, bias=None):
        calls["n"] += 1
        if calls["n"] > 8:  # after the gate
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(x, layer, bias)

    monkeypatch.setattr(bg.ops, "gemm", flaky)
    monkeypatch.setattr(r.dev, "healthy", lambda: "RuntimeError: CUDA error: an illegal memory access")
    r.run()
    assert r.stop_reason.startswith("device unusable")
    assert [x["status"] for x in r.rows] == ["error"]
    doc = r.write(partial=True)
    assert doc["partial"] and doc["stop_reason"].startswith("device unusable")


def _fake_nvidia_smi(tmp_path: Path) -> Path:
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text("""#!/usr/bin/env python3
import sys
q = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--query-gpu=")][0].split(",")
vals = {"name": "NVIDIA H100 80GB HBM3", "driver_version": "580.65.06", "clocks.sm": "1980 MHz",
        "clocks.max.sm": "1980 MHz", "clocks.mem": "2619 MHz", "clocks_event_reasons.active": "0x0"}
for f in q:
    if f in ("bogus.field", "clocks_throttle_reasons.active"):
        print(f'Field "{f}" is not a valid field to query.', file=sys.stderr)
        sys.exit(2)
print(", ".join(vals.get(f, "[N/A]") for f in q))
""")
    script.chmod(0o755)
    return script.parent


def test_nvidia_smi_parsing_and_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(_fake_nvidia_smi(tmp_path)) + os.pathsep + os.environ["PATH"])
    assert bg.nvidia_smi_query(["name", "driver_version"]) == {"name": "NVIDIA H100 80GB HBM3",
                                                               "driver_version": "580.65.06"}
    # one bad field fails the batched call: the others still come back, one by one
    assert bg.nvidia_smi_query(["driver_version", "bogus.field", "clocks.sm"], index=0) == {
        "driver_version": "580.65.06", "clocks.sm": "1980 MHz"}
    info = bg.nvidia_smi_info(None)
    assert info["driver_version"] == "580.65.06" and info["clocks_event_reasons.active"] == "0x0"
    assert "clocks_throttle_reasons.active" not in info
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert bg.nvidia_smi_query(["name"]) == {} and bg.nvidia_smi_info(None) == {}


def test_cuda_metadata_from_device_properties(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(_fake_nvidia_smi(tmp_path)) + os.pathsep + os.environ["PATH"])
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                                  L2_cache_size=50 * 2**20, total_memory=80 * 2**30, memory_clock_rate=2619000,
                                  memory_bus_width=5120)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    args = bg.build_parser().parse_args(["--reps", "3", "--warmup", "1"])
    dev = bg.Device("cpu", 0, "zero")
    dev.cuda = True
    meta = bg.metadata(args, dev, bg.SHAPES, bg.BATCHES, bg.BITS)
    assert set(bg.META_KEYS) <= set(meta)
    assert meta["driver_version"] == "580.65.06" and meta["sm_count"] == 132 and meta["l2_bytes"] == 50 * 2**20
    assert meta["compute_capability"] == "9.0"
    assert meta["theoretical_dram_gbps"] == pytest.approx(2 * 2619e6 * 5120 / 8 / 1e9)
    assert "1980 MHz" in meta["clocks_start_text"]
    assert bg.device_slug(meta["device_name"]) == "nvidia-h100-80gb-hbm3"


# ---- what the GPU machine can import, and the session script ---------------------------------------------------


def test_bench_imports_only_stdlib_numpy_torch_cmpq():
    tree = ast.parse((ROOT / "bench" / "bench_gpu.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots - set(sys.stdlib_module_names) <= {"numpy", "torch", "cmpq_kernels"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_session_script_check_phase_on_cpu(tmp_path):
    script = ROOT / "bench" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = dict(os.environ, OUT=str(tmp_path), CMPQ_CHECK_DEVICE="cpu", CMPQ_CHECK_SMALL="1",
               PYTHON=sys.executable)
    res = subprocess.run(["bash", str(script), "check"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    log = (tmp_path / "check.log").read_text()
    assert "check: 20 passed, 0 failed" in log and "FAIL" not in log.replace("0 failed", "")
    assert "check" in (tmp_path / "summary.txt").read_text() and (tmp_path / "session.log").exists()


def test_internal_error_and_sigterm_still_write_partial_results(tmp_path, monkeypatch):
    real_run = bg.Runner.run

    def run_then_bug(self):
        real_run(self)
        raise KeyError("bug")

    monkeypatch.setattr(bg.Runner, "run", run_then_bug)
    rc = bg.main(TINY + ["--shapes", "64x128", "--bits", "3", "--out", str(tmp_path / "i")])
    doc = strict_json(tmp_path / "i.json")
    assert rc == 3 and doc["partial"] and doc["stop_reason"].startswith("internal error: KeyError")
    assert len(doc["rows"]) == 3  # the finished cases survive

    def run_then_sigterm(self):
        real_run(self)
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends
        time.sleep(5)
        raise AssertionError("SIGTERM was not turned into a clean stop")

    monkeypatch.setattr(bg.Runner, "run", run_then_sigterm)
    rc = bg.main(TINY + ["--shapes", "64x128", "--bits", "3", "--out", str(tmp_path / "t")])
    doc = strict_json(tmp_path / "t.json")
    assert rc == 0 and doc["partial"] and doc["stop_reason"].startswith("interrupted (Terminated")
    assert len(doc["rows"]) == 3
    assert signal.getsignal(signal.SIGTERM) is not bg._on_sigterm  # handler restored


@pytest.mark.parametrize("noise,timed", [(3e-3, True), (0.5, False)])
def test_graph_replay_is_checked_against_eager(tmp_path, fake_cuda, monkeypatch, noise, timed):
    real = ops.gemm
    calls = [0]

    def noisy(x, layer, bias=None):  # run-to-run different results, as a non-deterministic kernel gives
        calls[0] += 1
        return (real(x, layer, bias).float() * (1 + noise * (calls[0] % 2))).to(x.dtype)

    monkeypatch.setattr(bg.ops, "gemm", noisy)
    r = _runner(tmp_path, TINY[2:] + ["--shapes", "64x128", "--bits", "3", "--batch", "1"])
    if not timed:
        r.gate = lambda *a: {1: (0.0, "ok")}  # the noise would fail the gate; this test is about the graph check
    r.run()
    row = r.rows[0]
    if timed:
        assert row["graph_us"] is not None, (row, r.failures)
        assert row["graph_status"].startswith("ok (replay not bit-identical")
    else:
        assert row["graph_us"] is None and "differs from eager" in row["graph_status"]
        assert any("CUDA graph" in f["what"] for f in r.failures)
