#!/usr/bin/env bash
# One-shot GPU session for cmpq_kernels: build from source, correctness checks, CUDA tests, GPU benchmark.
# Everything it produces lands in $OUT (the device tool's output folder, which comes back).
#
# Run from the repository root on the GPU machine (device tool, one call, < 10 min):
#     bash bench/gpu_session.sh                 # all phases: info build check tests bench (<= 8 min)
#     bash bench/gpu_session.sh build check     # any subset, in the order given (a warm machine keeps the build)
# Phases:
#   info   nvidia-smi -q (nvidia-smi.txt), versions (env.txt)
#   build  CMPQ_FORCE_CUDA=1 CMPQ_BUILD_EMU=0 CMPQ_CUDA_ARCHS=90a pip install -v -e . --no-build-isolation --no-deps
#          (no emulated-kernel extension: a CPU test tool; build.log; ptxas registers/spills -> ptxas.txt; falls
#          back to setup.py build_ext --inplace when pip
#          itself, not a compiler, fails), then cmpq_kernels.backends() (backends.txt)
#   check  plain-Python correctness check, no pytest needed (check.log): ops.gemm on the GPU vs the float64
#          reference for M in 1,3,8,9,16,33,128,129,512, fp16 + bf16, 5 layers (bias, odd n, K=896), determinism, graphs
#   tests  python -m pytest -q python_tests -k cuda (tests.log): the CUDA tests only, if pytest is installed
#   bench  python bench/bench_gpu.py --priority --max-seconds S --out $OUT/results/ (bench.log,
#          results/gpu_<device>.{json,md}): the prioritised subset (bench_gpu.py --help), one summary table
# At the end everything but the KEEP files below goes into one archive, logs.tar.gz, so $OUT holds at most 8
# files (the device tool returns no more): summary.txt session.log env.txt check.log ptxas.txt + results JSON/md.
# A failing phase is recorded and the session goes on (except: no bench/tests without a successful build).
# Environment: OUT (default: new temp dir); CMPQ_SESSION_BUDGET seconds for the whole call (default 480: a lent
# GPU gives 15 minutes in all, machine start included; lower it if `status` shows less device time);
# CMPQ_BENCH_SECONDS (cap for the benchmark, default 240); CMPQ_BENCH_ARGS (bench_gpu.py list flags, default
# "--priority"; e.g. "--quick", or "--shapes 4096x4096 --bits 3");
# CMPQ_CUDA_ARCHS (default 90a); CMPQ_CUDA_PTX (default empty); PYTHON (default python); CMPQ_CHECK_DEVICE=cpu and CMPQ_CHECK_SMALL=1 run the
# check phase on the CPU with small shapes (how the CPU test suite exercises this script).
set -u

OUT=${OUT:-}
if [ -z "$OUT" ]; then OUT=$(mktemp -d); echo "OUT not set: writing to $OUT"; fi
mkdir -p "$OUT" "$OUT/results"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
START=$(date +%s)
BUDGET=${CMPQ_SESSION_BUDGET:-480}
BENCH_CAP=${CMPQ_BENCH_SECONDS:-240}
BENCH_ARGS=${CMPQ_BENCH_ARGS---priority}
PY=${PYTHON:-python}
command -v "$PY" > /dev/null 2>&1 || PY=python3
touch "$OUT/.session_start"

elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( BUDGET - $(elapsed) )); }
step() { printf '\n=== [%s] t=%ss (%ss left) %s\n' "$(date -u +%H:%M:%S)" "$(elapsed)" "$(remaining)" "$*"; }
record() { printf '%-8s rc=%-4s %5ss  %s\n' "$1" "$2" "$3" "${4:-}" >> "$OUT/summary.txt"; }
clamp() { local v=$1 lo=$2 hi=$3; [ "$v" -lt "$lo" ] && v=$lo; [ "$v" -gt "$hi" ] && v=$hi; echo "$v"; }
BUILD_OK=unknown
OVERALL=0

# cmpq_kernels importable from anywhere? If not but an in-place build exists, put the checkout on PYTHONPATH.
ensure_import() {
  if (cd /tmp && "$PY" -c "import cmpq_kernels" > /dev/null 2>&1); then return 0; fi
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  (cd /tmp && "$PY" -c "import cmpq_kernels" > /dev/null 2>&1)
}

phase_info() {
  step "info: nvidia-smi, versions"
  local t0; t0=$(date +%s)
  if command -v nvidia-smi > /dev/null 2>&1; then
    timeout 60 nvidia-smi -q > "$OUT/nvidia-smi.txt" 2>&1
    timeout 30 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu \
      --format=csv 2>&1 | head -5
  else
    echo "nvidia-smi not found" | tee "$OUT/nvidia-smi.txt"
  fi
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo "host: $(hostname)"; echo "nproc: $(nproc)"
    free -g 2>/dev/null | head -2
    echo "python: $("$PY" --version 2>&1) ($PY)"
    "$PY" -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-'); print('numpy', numpy.__version__)" 2>&1
    NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
    echo "nvcc: $NVCC"; "$NVCC" --version 2>&1 | tail -2
    echo "ninja: $(ninja --version 2>&1)"
    "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|numpy|setuptools|wheel|ninja|pytest|safetensors) ' || true
    echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"; echo "CUDA_HOME=${CUDA_HOME:-}"
    git -C "$REPO" rev-parse HEAD 2>/dev/null && git -C "$REPO" status --short 2>/dev/null | head -20
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
  record info 0 $(( $(date +%s) - t0 ))
}

phase_build() {
  step "build: CMPQ_FORCE_CUDA=1 CMPQ_BUILD_EMU=0 CMPQ_CUDA_ARCHS=${CMPQ_CUDA_ARCHS:-90a} pip install -v -e . --no-build-isolation --no-deps"
  local t0 rc limit; t0=$(date +%s)
  # No JIT PTX and no emulated kernels (a CPU test tool): both only cost build time here.
  export CMPQ_FORCE_CUDA=1 CMPQ_BUILD_EMU=0 CMPQ_CUDA_ARCHS=${CMPQ_CUDA_ARCHS:-90a} CMPQ_CUDA_PTX=${CMPQ_CUDA_PTX-}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
  limit=$(clamp $(( $(remaining) - 120 )) 60 360)
  timeout -k 10 "$limit" "$PY" -m pip install -v -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "pip install failed (rc=$rc, limit ${limit}s); last lines of build.log:"; tail -30 "$OUT/build.log"
    if ! grep -q -E 'FAILED: |Error compiling objects|error: command .* failed' "$OUT/build.log" && [ "$rc" -ne 124 ]; then
      echo "no compiler failure in the log: retrying as python setup.py build_ext --inplace"
      limit=$(clamp $(( $(remaining) - 120 )) 60 360)
      timeout -k 10 "$limit" "$PY" setup.py build_ext --inplace > "$OUT/build_inplace.log" 2>&1
      rc=$?
      cat "$OUT/build_inplace.log" >> "$OUT/build.log"
      [ "$rc" -eq 0 ] && export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    fi
  fi
  tail -300 "$OUT/build.log" > "$OUT/build_tail.log"  # small copy, in case the full verbose log is too big to return
  # ptxas resource usage of every kernel (nvcc -Xptxas=-v output inside the build log), demangled.
  local filt=cat; command -v c++filt > /dev/null 2>&1 && filt=c++filt
  grep -E 'ptxas (info|warning|error|fatal)|bytes stack frame' "$OUT/build.log" | $filt \
    > "$OUT/ptxas.txt" 2>/dev/null
  if [ ! -s "$OUT/ptxas.txt" ] && [ "$(remaining)" -gt 240 ]; then  # up-to-date build printed nothing: compile again
    local NVCC src; NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
    for src in csrc/cuda/*.cu; do
      echo "--- $src sm_${CMPQ_CUDA_ARCHS%%;*}" >> "$OUT/ptxas.txt"
      timeout 60 "$NVCC" -std=c++17 -O3 -Icsrc -Xptxas=-v -gencode "arch=compute_${CMPQ_CUDA_ARCHS%%;*},code=sm_${CMPQ_CUDA_ARCHS%%;*}" \
        -c "$src" -o /dev/null 2>&1 | grep -E 'ptxas (info|warning|error|fatal)|bytes stack frame|error' | $filt \
        >> "$OUT/ptxas.txt"
    done
  fi
  echo "ptxas: $(grep -c 'registers' "$OUT/ptxas.txt") kernel entries; $(grep -c -E '[1-9][0-9]* bytes spill' "$OUT/ptxas.txt") with spills; max registers: $(grep -o -E 'Used [0-9]+ registers' "$OUT/ptxas.txt" | awk '{print $2}' | sort -n | tail -1)"
  ensure_import
  "$PY" -c "import cmpq_kernels; print(cmpq_kernels.backends())" > "$OUT/backends.txt" 2>&1
  local brc=$?
  echo "backends: $(cat "$OUT/backends.txt")"
  if [ "$rc" -eq 0 ] && [ "$brc" -eq 0 ] && grep -q "'cuda': True" "$OUT/backends.txt"; then
    BUILD_OK=yes
  else
    BUILD_OK=no; OVERALL=1
    echo "BUILD NOT USABLE (build rc=$rc, import rc=$brc); see build.log"
  fi
  record build "$rc" $(( $(date +%s) - t0 )) "cuda usable: $BUILD_OK"
}

phase_check() {
  step "check: ops.gemm vs float64 reference (plain Python)"
  local t0 rc limit; t0=$(date +%s)
  ensure_import
  cat > "$OUT/gpu_check.py" <<'PYCHECK'
"""ops.gemm on the GPU vs the float64 reference (= reference.linear without its output rounding), no pytest."""
import math, os, sys, time
import torch
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import cmpq_kernels
from cmpq_kernels import ops, reference
from gpu_results import path_for
from random_layers import make_random_layer

dev = os.environ.get("CMPQ_CHECK_DEVICE", "cuda")
small = os.environ.get("CMPQ_CHECK_SMALL") == "1"
if dev == "cuda" and not cmpq_kernels.backends()["cuda"]:
    sys.exit(f"check: CUDA backend unavailable: {cmpq_kernels.backends()}")
TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
MS = (1, 3, 8, 9, 16, 33, 128, 129, 512) if not small else (1, 3, 9, 33, 129)
LAYERS = ([(256, 512, 3.0, None), (1000, 2048, 2.5, torch.float32), (2048, 896, 2.0, torch.float16),
           (4096, 4096, 3.5, None), (384, 11008, 4.0, None)] if not small else
          [(64, 128, 3.0, None), (100, 256, 2.5, torch.float32)])
passed = failed = 0
torch.backends.cuda.matmul.allow_tf32 = False

def poison():
    if dev == "cuda":
        torch.full((1 << 24,), float("nan"), device=dev)  # freed at once: fresh outputs land on NaN memory

for n, k, bits, bias in LAYERS:
    layer_cpu = make_random_layer(n, k, bits, seed=n + k, bias=bias)
    layer = layer_cpu.to(dev)
    w64 = reference.dequantize(layer_cpu, torch.float64)
    b64 = None if bias is None else layer_cpu.bias.double()
    for dtype in (torch.float16, torch.bfloat16):
        for m in MS:
            gen = torch.Generator().manual_seed(m)
            x = torch.randn(m, k, generator=gen).to(dtype)
            ref = x.double() @ w64.T + (0 if b64 is None else b64)
            try:
                poison()
                y = ops.gemm(x.to(dev), layer)
                y2 = ops.gemm(x.to(dev), layer)
                yc = y.cpu()
                err = float((yc.double() - ref).norm() / ref.norm())
                finite = bool(torch.isfinite(yc).all())
                same = bool(torch.equal(y, y2))
                ok = finite and err <= TOL[dtype] and same and yc.shape == (m, n) and yc.dtype == dtype
                msg = f"rel_err {err:.2e} (tol {TOL[dtype]:g}) finite={finite} deterministic={same}"
            except Exception as e:  # noqa: BLE001
                ok, msg = False, f"ERROR {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            passed += ok
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'} {n}x{k} bits={bits:g} bias={bias} {str(dtype)[6:]} M={m} [{path_for(m)}] {msg}",
                  flush=True)
    if dev == "cuda" and n == 256:  # CUDA graph replay of each path: capture once, replay with new input
        for m in (1, 16, 200):
            try:
                x = torch.randn(m, k, device=dev, dtype=torch.float16)
                s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    ops.gemm(x, layer)
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    y = ops.gemm(x, layer)
                x.copy_(torch.randn(m, k, device=dev, dtype=torch.float16))
                g.replay(); torch.cuda.synchronize()
                ok = bool(torch.equal(y, ops.gemm(x, layer)))
                msg = "graph replay == eager" if ok else "graph replay differs from eager"
            except Exception as e:  # noqa: BLE001
                ok, msg = False, f"ERROR {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            passed += ok
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'} graph {n}x{k} M={m} [{path_for(m)}] {msg}", flush=True)
    del layer
    if dev == "cuda":
        torch.cuda.empty_cache()
print(f"check: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PYCHECK
  limit=$(clamp $(( $(remaining) - 200 )) 30 120)
  timeout -k 10 "$limit" "$PY" "$OUT/gpu_check.py" > "$OUT/check.log" 2>&1
  rc=$?
  grep -E '^FAIL|Error|error' "$OUT/check.log" | head -20
  tail -1 "$OUT/check.log"
  [ "$rc" -ne 0 ] && OVERALL=1
  record check "$rc" $(( $(date +%s) - t0 )) "$(tail -1 "$OUT/check.log")"
}

phase_tests() {
  step "tests: pytest -k cuda"
  local t0 rc limit; t0=$(date +%s)
  ensure_import
  if ! "$PY" -c "import pytest" > /dev/null 2>&1; then
    echo "pytest is not installed here (no network): the check phase is the correctness record" | tee "$OUT/tests.log"
    record tests skip $(( $(date +%s) - t0 )) "pytest missing"
    return
  fi
  limit=$(clamp $(( $(remaining) - 180 )) 30 150)
  timeout -k 10 "$limit" "$PY" -m pytest -q python_tests -k cuda -rfEs -p no:cacheprovider \
    --durations=10 > "$OUT/tests.log" 2>&1
  rc=$?
  grep -E '^(FAILED|ERROR)' "$OUT/tests.log" | head -20
  tail -3 "$OUT/tests.log"
  [ "$rc" -eq 124 ] && echo "tests hit the ${limit}s limit"
  [ "$rc" -ne 0 ] && OVERALL=1
  record tests "$rc" $(( $(date +%s) - t0 )) "$(tail -1 "$OUT/tests.log")"
}

phase_bench() {
  step "bench: bench/bench_gpu.py"
  local t0 rc secs; t0=$(date +%s)
  ensure_import
  secs=$(clamp $(( $(remaining) - 40 )) 30 "$BENCH_CAP")
  echo "benchmark budget ${secs}s (--max-seconds), list args: ${BENCH_ARGS:-none}"
  # shellcheck disable=SC2086  # BENCH_ARGS is a flag list on purpose
  timeout -k 10 $(( secs + 30 )) "$PY" bench/bench_gpu.py --max-seconds "$secs" --out "$OUT/results/" \
    ${BENCH_ARGS} > "$OUT/bench.log" 2>&1
  rc=$?
  grep -E '!!|ABORT|FAILURES|PARTIAL|Traceback|Error' "$OUT/bench.log" | head -20
  tail -2 "$OUT/bench.log"
  # results bench_gpu.py may have written elsewhere (e.g. its default bench/results/) during this session
  find "$REPO/bench/results" -maxdepth 1 -name 'gpu_*' -newer "$OUT/.session_start" -exec cp -f {} "$OUT/results/" \; \
    2>/dev/null
  [ "$rc" -ne 0 ] && OVERALL=1
  record bench "$rc" $(( $(date +%s) - t0 )) "$(tail -1 "$OUT/bench.log" | cut -c1-150)"
}

summary() {
  step "summary"
  command -v nvidia-smi > /dev/null 2>&1 && timeout 60 nvidia-smi -q > "$OUT/nvidia-smi-after.txt" 2>&1
  local json
  json=$(ls -t "$OUT"/results/gpu_*.json 2>/dev/null | head -1)
  if [ -n "$json" ]; then
    "$PY" - "$json" <<'PYSUM' 2>&1 | head -80
import json, sys
d = json.load(open(sys.argv[1]))
m = d["meta"]
bw = (m.get("copy_bandwidth") or {}).get("gbps")
print(f"{sys.argv[1]}: {m['device_name']}, partial={d['partial']} ({d['stop_reason']}), {len(d['rows'])} rows, "
      f"copy bandwidth {bw and round(bw)} GB/s, failures {len(d['failures'])}")
for f in d["failures"][:10]:
    print("  failure:", f["case"], "-", f["what"][:160])
print("M=1 / M=16 / M=128: speedup vs cuBLAS (pct of BW floor)")
cell = {}
for r in d["rows"]:
    if r["m"] in (1, 16, 128) and r["speedup"] is not None:
        cell[(r["n"], r["k"], r["bits"], r["m"])] = f"{r['speedup']:.2f}x ({r['pct_floor']:.0f}%)" if r["pct_floor"] else f"{r['speedup']:.2f}x"
for (n, k, bits) in sorted({(a, b, c) for a, b, c, _ in cell}):
    print(f"  {n}x{k} bits={bits:g}: " + "  ".join(f"M={mm} {cell.get((n, k, bits, mm), '-')}" for mm in (1, 16, 128)))
print("crossover (smallest M with cuBLAS faster):", json.dumps(d["crossover"]))
PYSUM
  else
    echo "no benchmark results"
  fi
  echo; echo "phases:"; cat "$OUT/summary.txt" 2>/dev/null
  pack_outputs
  echo "files in $OUT:"; (cd "$OUT" && find . -type f | sort | sed 's|^\./|  |')
  echo "session done in $(elapsed)s, overall rc=$OVERALL"
}

# The device tool returns at most 8 files: keep the ones read first, archive the rest into logs.tar.gz.
KEEP=(summary.txt session.log env.txt check.log ptxas.txt)
pack_outputs() {
  local json md keep=("${KEEP[@]}") rest=() f k
  json=$(cd "$OUT" && ls -t results/gpu_*.json 2>/dev/null | head -1)
  md=$(cd "$OUT" && ls -t results/gpu_*.md 2>/dev/null | head -1)
  [ -n "$json" ] && keep+=("$json"); [ -n "$md" ] && keep+=("$md")
  while IFS= read -r f; do
    for k in "${keep[@]}"; do [ "$f" = "$k" ] && continue 2; done
    rest+=("$f")
  done < <(cd "$OUT" && find . -type f ! -name logs.tar.gz ! -name .session_start | sed 's|^\./||' | sort)
  [ ${#rest[@]} -eq 0 ] && return
  if (cd "$OUT" && tar -czf logs.tar.gz "${rest[@]}" && rm -f "${rest[@]}"); then
    echo "archived ${#rest[@]} more files into logs.tar.gz: ${rest[*]}"
  else
    echo "could not archive ${rest[*]}; the device tool may leave some out"
  fi
}

main() {
  local phases=() p
  for p in "$@"; do
    if [ "$p" = all ]; then phases+=(info build check tests bench); else phases+=("$p"); fi
  done
  [ ${#phases[@]} -eq 0 ] && phases=(info build check tests bench)
  echo "cmpq GPU session: phases ${phases[*]}; budget ${BUDGET}s; output $OUT"
  for p in "${phases[@]}"; do
    case "$p" in
      info) phase_info ;;
      build) phase_build ;;
      check|tests|bench)
        if [ "$BUILD_OK" = no ]; then
          echo "skipping $p: the build is not usable"; record "$p" skip 0 "build not usable"; continue
        fi
        "phase_$p" ;;
      *) echo "unknown phase '$p' (info build check tests bench)"; OVERALL=1 ;;
    esac
  done
  summary
  return "$OVERALL"
}

main "$@" 2>&1 | tee -a "$OUT/session.log"
rc=${PIPESTATUS[0]}
rm -f "$OUT/.session_start"
exit "$rc"
