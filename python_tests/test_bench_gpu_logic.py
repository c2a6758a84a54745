"""CPU checks of bench/bench_gpu.py and bench/gpu_session.sh: everything but the GPU itself.

The GPU benchmark runs once, unattended, on a lent GPU, so its logic is proven here: the timing plan, the
command line, the budget and partial results, the correctness gate, the recorded environment, and the
CUDA-only branches (events, graphs, nvidia-smi) against fakes of the torch.cuda API. The whole benchmark also
runs end to end with ``--device cpu``. Its shared helpers are checked in ``test_bench_helpers.py``. Fast: a few
seconds.
"""
from __future__ import annotations

import ast
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import pytest
import torch

from cmpq_kernels import ops
from conftest import BENCH_DIR, import_bench, strict_json

bg = import_bench("bench_gpu")
gpu_results = import_bench("gpu_results")
gpu_gate = import_bench("gpu_gate")
gpu_env = import_bench("gpu_env")

TINY = ["--device", "cpu", "--shapes", "64x128,40x96", "--batch", "1,9,130", "--bits", "2.5,4", "--reps", "2",
        "--warmup", "0", "--flush-mb", "1", "--copy-mb", "1", "--case-seconds", "0.2"]


# ---- timing plan and command line -------------------------------------------------------------------------


def test_plan_reps_caps_slow_cases():
    assert bg.plan_reps(1e-4, 50, 2.0) == 50
    assert bg.plan_reps(0.1, 50, 2.0) == 20
    assert bg.plan_reps(10.0, 50, 2.0) == bg.MIN_REPS
    assert bg.plan_reps(10.0, 3, 2.0) == 3
    assert bg.plan_reps(0.0, 50, 2.0) == 50 and bg.plan_reps(float("nan"), 50, 2.0) == 50


def test_parser_refuses_bad_lists_and_has_the_documented_defaults():
    p = bg.build_parser()
    for bad in (["--shapes", "4096"], ["--shapes", "4096x100"], ["--shapes", "ax32"], ["--batch", "0"],
                ["--batch", "1,x"], ["--bits", "1.5"], ["--bits", "4.5"], ["--bits", ""], ["--flush-mode", "x"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    args = p.parse_args([])
    assert args.graph and args.device == "cuda" and args.max_seconds is None and not args.stop_on_fail
    assert not p.parse_args(["--no-graph"]).graph


# ---- end to end on the CPU -------------------------------------------------------------------------------------


def test_end_to_end_cpu_dry_run(tmp_path, capsys):
    rc = bg.main(TINY + ["--out", str(tmp_path) + "/"])
    assert rc == 0
    doc = strict_json(tmp_path / "gpu_cpu-dryrun.json")
    gpu_results.check_doc(doc)
    assert doc["partial"] is False and doc["stop_reason"] is None and doc["failures"] == []
    assert len(doc["rows"]) == 2 * 3 * 2 and len(doc["cublas"]) == 2 * 3
    assert all(r["status"] == "ok" and r["cmpq_us"] > 0 and r["gate_rel_err"] < gpu_gate.MAX_GEMM_ERR
               for r in doc["rows"])
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
    gpu_results.check_doc(doc)
    assert doc["partial"] is True and "--max-seconds" in doc["stop_reason"] and doc["rows"] == []
    assert "PARTIAL RESULTS" in (tmp_path / "p.md").read_text()


def test_gate_failure_is_recorded_and_never_timed(tmp_path, monkeypatch):
    real = ops.gemm

    def wrong_for_large_m(x, layer, bias=None):
        y = real(x, layer, bias)
        return y * 1.1 if x.shape[0] > gpu_results.GEMM_MAX_M else y

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
    meta = gpu_env.metadata(args, dev, shapes, batches, bits_list)
    dev.cuda = True  # from here on the CUDA branches run, on CPU tensors
    return bg.Runner(args, dev, gpu_results.Budget(None), tmp_path / "f", meta, shapes, batches, bits_list,
                     log=lambda s: None)


def test_cuda_branches_with_fake_events_and_graphs(tmp_path, fake_cuda):
    r = _runner(tmp_path, TINY[2:] + ["--shapes", "64x128", "--bits", "3"])
    r.run()
    doc = r.write(partial=False)
    gpu_results.check_doc(doc)
    assert r.stop_reason is None and r.failures == []
    assert doc["meta"]["copy_bandwidth"]["gbps"] > 0
    small = [x for x in doc["rows"] if x["m"] <= gpu_results.GEMV_MAX_M]
    assert small and all(x["graph_us"] > 0 and x["lat_graph_us"] > 0 and x["graph_status"] == "ok" for x in small)
    assert all(x["graph_us"] is None for x in doc["rows"] if x["m"] > gpu_results.GEMV_MAX_M)
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
    assert gpu_env.nvidia_smi_query(["name", "driver_version"]) == {"name": "NVIDIA H100 80GB HBM3",
                                                               "driver_version": "580.65.06"}
    # one bad field fails the batched call: the others still come back, one by one
    assert gpu_env.nvidia_smi_query(["driver_version", "bogus.field", "clocks.sm"], index=0) == {
        "driver_version": "580.65.06", "clocks.sm": "1980 MHz"}
    info = gpu_env.nvidia_smi_info(None)
    assert info["driver_version"] == "580.65.06" and info["clocks_event_reasons.active"] == "0x0"
    assert "clocks_throttle_reasons.active" not in info
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_env.nvidia_smi_query(["name"]) == {} and gpu_env.nvidia_smi_info(None) == {}


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
    meta = gpu_env.metadata(args, dev, bg.SHAPES, bg.BATCHES, bg.BITS)
    assert set(gpu_results.META_KEYS) <= set(meta)
    assert meta["driver_version"] == "580.65.06" and meta["sm_count"] == 132 and meta["l2_bytes"] == 50 * 2**20
    assert meta["compute_capability"] == "9.0"
    assert meta["theoretical_dram_gbps"] == pytest.approx(2 * 2619e6 * 5120 / 8 / 1e9)
    assert "1980 MHz" in meta["clocks_start_text"]
    assert gpu_results.device_slug(meta["device_name"]) == "nvidia-h100-80gb-hbm3"


# ---- what the GPU machine can import, and the session script ---------------------------------------------------


def imported_roots(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports (absolute imports only: bench/ has no package)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_bench_imports_only_stdlib_numpy_torch_cmpq():
    """bench_gpu.py and every bench/ module it pulls in, directly or not: the GPU machine has nothing else."""
    siblings = {p.stem for p in BENCH_DIR.glob("*.py")}
    todo, seen, external = ["bench_gpu"], set(), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            roots = imported_roots(BENCH_DIR / f"{name}.py")
            todo += sorted(roots & siblings)
            external |= roots - siblings
    assert {"gpu_results", "gpu_gate", "random_layers"} <= seen
    assert external - set(sys.stdlib_module_names) <= {"numpy", "torch", "cmpq_kernels"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_session_script_check_phase_on_cpu(tmp_path):
    script = BENCH_DIR / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = dict(os.environ, OUT=str(tmp_path), CMPQ_CHECK_DEVICE="cpu", CMPQ_CHECK_SMALL="1",
               PYTHON=sys.executable)
    res = subprocess.run(["bash", str(script), "check"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    log = (tmp_path / "check.log").read_text()
    assert "check: 20 passed, 0 failed" in log and "FAIL" not in log.replace("0 failed", "")
    assert "check" in (tmp_path / "summary.txt").read_text() and (tmp_path / "session.log").exists()
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) <= 8, files  # the device tool returns at most 8 files
    with tarfile.open(tmp_path / "logs.tar.gz") as archive:  # the rest is archived, not lost
        assert "gpu_check.py" in archive.getnames()


def test_priority_lists_what_a_short_session_measures_first(tmp_path, monkeypatch):
    monkeypatch.setattr(bg.Runner, "run", lambda self: None)  # the lists only: no layer is built or timed
    assert bg.main(TINY[:2] + ["--priority", "--copy-mb", "1", "--flush-mb", "1", "--out", str(tmp_path / "p")]) == 0
    meta = strict_json(tmp_path / "p.json")["meta"]
    assert meta["priority"] and meta["shapes"] == ["8192x28672", "4096x4096", "28672x8192"]
    assert meta["batches"] == [1, 4, 16, 64, 512] and meta["bits"] == [2.5, 3.0, 4.0]
    with pytest.raises(SystemExit, match="--quick and --priority"):
        bg.main(TINY + ["--quick", "--priority"])


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
    if not timed:  # the noise would fail the gate; this test is about the graph check
        monkeypatch.setattr(bg, "gate_layer", lambda *a: {1: (0.0, "ok")})
    r = _runner(tmp_path, TINY[2:] + ["--shapes", "64x128", "--bits", "3", "--batch", "1"])
    r.run()
    row = r.rows[0]
    if timed:
        assert row["graph_us"] is not None, (row, r.failures)
        assert row["graph_status"].startswith("ok (replay not bit-identical")
    else:
        assert row["graph_us"] is None and "differs from eager" in row["graph_status"]
        assert any("CUDA graph" in f["what"] for f in r.failures)
