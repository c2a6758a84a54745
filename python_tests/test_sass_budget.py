"""bench/sass_budget.py: the SASS parser, loop finder and per-class counts (on a hand-written listing and on
tiny kernels compiled here), the decode kernel's counts, the throughput model against DESIGN.md's rule of
thumb, the budget check, and the committed results against the committed ceilings.

The compiling tests skip when nvcc or the disassemblers (``pip install nvidia-cuda-nvdisasm
nvidia-cuda-cuobjdump``) are absent; CI installs both.
"""
from __future__ import annotations

import json

import pytest

from conftest import BENCH_DIR, import_bench, strict_json

sb = import_bench("sass_budget")

# A loop that dispatches on the bit width like with_segment_bits: 4-bit (one 128-bit load), 3-bit (three
# 32-bit loads), else 2-bit (one 64-bit load). The 3-bit body has a rare branch marked by the fp32 infinity
# exponent that is cheaper than its common branch (2 instructions against 3).
LISTING = """
.text.synthetic:
        /*0000*/                   MOV R0, RZ ;
.L_x_0:
        /*0010*/                   ISETP.NE.AND P0, PT, R1, 0x4, PT ;
        /*0020*/               @P0 BRA `(.L_x_1) ;
        /*0030*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0040*/                   FFMA R8, R4, R5, R8 ;
        /*0050*/                   BRA `(.L_x_4) ;
.L_x_1:
        /*0060*/                   ISETP.NE.AND P0, PT, R1, 0x3, PT ;
        /*0070*/               @P0 BRA `(.L_x_3) ;
        /*0080*/                   LDG.E.CONSTANT R4, desc[UR4][R2.64] ;
        /*0090*/                   LDG.E.CONSTANT R5, desc[UR4][R2.64+0x4] ;
        /*00a0*/                   LDG.E.CONSTANT R6, desc[UR4][R2.64+0x8] ;
        /*00b0*/                   ISETP.NE.AND P1, PT, R4, RZ, PT ;
        /*00c0*/              @!P1 BRA `(.L_x_2) ;
        /*00d0*/                   LOP3.LUT R7, R7, 0x7f800000, RZ, 0xc0, !PT ;
        /*00e0*/                   BRA `(.L_x_4) ;
.L_x_2:
        /*00f0*/                   IMAD R7, R4, R5, R6 ;
        /*0100*/                   IMAD R7, R7, R5, R6 ;
        /*0110*/                   LDS R9, [R7] ;
        /*0120*/                   BRA `(.L_x_4) ;
.L_x_3:
        /*0130*/                   LDG.E.64.CONSTANT R4, desc[UR4][R2.64] ;
        /*0140*/                   STS.128 [R0], R4 ;
.L_x_4:
        /*0150*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0160*/                   ISETP.LT.AND P2, PT, R1, R9, PT ;
        /*0170*/              @P2 BRA `(.L_x_0) ;
        /*0180*/                   EXIT ;
.L_x_5:
        /*0190*/                   BRA `(.L_x_5);
"""


@pytest.fixture(scope="module")
def synthetic():
    function = sb.parse_sass(LISTING)["synthetic"]
    cfg = sb.ControlFlow(function)
    loops = sb.hot_loops(cfg)
    assert len({loop.header for loop, _ in loops.values()}) == 1  # one mixed-width loop, as in GEMM and decode
    return cfg, loops[4][0], {width: blocks for width, (_, blocks) in loops.items()}


def test_parser_reads_predicates_opcodes_and_labels():
    function = sb.parse_sass(LISTING)["synthetic"]
    assert len(function.instructions) == 26
    assert function.instructions[2] == sb.Instruction(0x20, "@P0", "BRA", "`(.L_x_1)")
    assert function.labels[".L_x_4"] == 21


def test_loop_finder_ignores_the_unreachable_trailer(synthetic):
    cfg, loop, _ = synthetic
    assert len(cfg.loops) == 1  # the self-loop after EXIT is unreachable
    assert cfg.blocks[loop.header].instructions[0].address == 0x10
    assert [cfg.blocks[b].instructions[-1].address for b in loop.latches] == [0x170]


def test_weight_loads_by_width(synthetic):
    cfg, _, loads = synthetic
    assert {w: [cfg.blocks[b].instructions[0].address for b in blocks] for w, blocks in loads.items()} == \
        {4: [0x30], 3: [0x80], 2: [0x130]}


def test_cheapest_path_per_width(synthetic):
    cfg, loop, loads = synthetic
    four = sb.iteration_cost(cfg, loop, loads[4])
    assert (four["instructions"], four["ldg_bytes"], four["fp"], four["branch"]) == (8, 16, 1, 3)
    two = sb.iteration_cost(cfg, loop, loads[2])
    assert (two["instructions"], two["ldg_bytes"], two["sts"], two["shared_wavefronts"]) == (9, 8, 1, 4)


def test_rare_branch_is_cheaper_but_excluded(synthetic):
    cfg, loop, loads = synthetic
    assert sb.iteration_cost(cfg, loop, loads[3])["instructions"] == 14  # through the 0x7f800000 block
    cost = sb.per_iteration(cfg, loop, staged_per_thread=0)(loads[3])
    assert (cost["instructions"], cost["lds"], cost["ldg"]) == (16, 1, 3)


def test_impossible_constraints_raise(synthetic):
    cfg, loop, loads = synthetic
    with pytest.raises(sb.PathError):
        sb.iteration_cost(cfg, loop, [loads[4][0], loads[2][0]])  # two widths in one iteration


def test_instruction_classes():
    def cls(text: str) -> str:
        op, _, operands = text.partition(" ")
        return sb.classify(sb.Instruction(0, "", op, operands))
    assert cls("HFMA2.MMA R7, -RZ, RZ, 0, 0") == "move"
    assert cls("HFMA2 R7, R1, R2, R3") == "fp"
    assert cls("HADD2.F32 R14, -RZ, R12.H0_H0") == "convert"
    assert cls("IMAD.MOV.U32 R4, RZ, RZ, R7") == "move"
    assert cls("IMAD.SHL.U32 R4, R7, 0x2, RZ") == "int"
    assert cls("HMMA.16816.F32 R4, R8, R12, R4") == "mma"
    assert cls("BAR.SYNC.DEFER_BLOCKING 0x0") == "barrier"
    assert cls("BSSY B0, `(.L_x_1)") == "branch"
    ldsm = sb.Instruction(0, "", "LDSM.16.M88.4", "R4, [R2]")
    assert sb.shared_wavefronts(ldsm) == 4


def test_model_reproduces_the_rule_of_thumb():
    """DESIGN.md §3.5: an H200 at 3 bits affords ≈ 2.6 instructions and ≈ 0.65 LDS per weight."""
    h200 = next(d for d in sb.DEVICES if d.name == "H200")
    budget = sb.affordable(h200, 3.0)
    assert budget["instructions_per_weight"] == pytest.approx(2.6, abs=0.05)
    assert budget["lds_per_weight"] == pytest.approx(0.65, abs=0.01)


def test_occupancy_limits():
    h100 = sb.DEVICES[0]
    assert sb.blocks_per_sm(h100, registers=32, shared_bytes=0, threads=256) == 8      # 64 warps
    assert sb.blocks_per_sm(h100, registers=128, shared_bytes=0, threads=128) == 4     # 64 K registers
    assert sb.blocks_per_sm(h100, registers=32, shared_bytes=56 * 1024, threads=128) == 4  # 228 KB + 1 KB each


def test_check_names_the_kernel_and_count(tmp_path, capsys):
    kernels = {"sm_90a": {"gemv<fp16,m=1>": {"widths": {"3": {"instructions_per_weight": 12.0,
                                                              "lds_per_weight": 2.0}}}}}
    limits = sb.limits_from(kernels)
    assert limits["sm_90a"]["gemv<fp16,m=1>"]["3"] == {"instructions_per_weight": 12.36, "lds_per_weight": 2.06}
    assert sb.check(kernels, limits) == []
    kernels["sm_90a"]["gemv<fp16,m=1>"]["widths"]["3"]["instructions_per_weight"] = 12.5
    path = tmp_path / "limits.json"
    path.write_text(json.dumps(limits))
    assert sb.run_check(kernels, path) == 1
    err = capsys.readouterr().err
    assert "sm_90a gemv<fp16,m=1> 3-bit: instructions_per_weight = 12.500 exceeds the budget 12.36" in err
    kernels["sm_90a"]["gemv<fp16,m=2>"] = kernels["sm_90a"]["gemv<fp16,m=1>"]
    assert any("gemv<fp16,m=2>: no committed budget" in p for p in sb.check(kernels, limits))


def test_committed_results_are_labelled_and_within_the_committed_budget():
    doc = strict_json(BENCH_DIR / "results" / "sass_budget.json")
    assert doc["label"] == sb.PREDICTION_LABEL
    required = {"kernel", "device", "n", "k", "bits", "m", "instructions_per_weight", "lds_per_weight",
                "binding_bound", "predicted_hbm_fraction", "label"}
    assert doc["rows"] and all(required <= set(row) for row in doc["rows"])
    assert {row["device"] for row in doc["rows"]} == {d.name for d in sb.DEVICES}
    assert all(0 < row["predicted_hbm_fraction"] <= 1 for row in doc["rows"])
    assert sb.check(doc["kernels"], json.loads(sb.LIMITS.read_text())) == []
    assert sb.PREDICTION_LABEL in (BENCH_DIR / "results" / "sass_budget.md").read_text()


# ---- compiled with nvcc ------------------------------------------------------------------------------------

TINY = r"""
// One FFMA and one LDS per iteration of a loop the compiler must not unroll.
__global__ void fma_loop(const float* __restrict__ in, float* out, int n) {
  __shared__ float s[256];
  s[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  float acc = 0.f;
#pragma unroll 1
  for (int i = 0; i < n; ++i) acc = fmaf(s[(threadIdx.x + i) & 255], acc, 1.f);
  out[threadIdx.x] = acc;
}

// An outer loop holding two barriers, a staging loop (one STS per iteration) and eight FFMA with eight LDS.
__global__ void staged(const float* __restrict__ in, float* out, int chunks) {
  __shared__ float s[1024];
  float acc = 0.f;
#pragma unroll 1
  for (int c = 0; c < chunks; ++c) {
    __syncthreads();
#pragma unroll 1
    for (int i = threadIdx.x; i < 1024; i += blockDim.x) s[i] = in[c * 1024 + i];
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 8; ++j) acc = fmaf(s[(threadIdx.x + 128 * j) & 1023], acc, 1.f);
  }
  out[threadIdx.x] = acc;
}
"""


@pytest.fixture(scope="module")
def tools():
    try:
        sb.find_nvcc(), sb.find_tool("nvdisasm"), sb.find_tool("cuobjdump")
    except sb.ToolMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tiny(tools, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("tiny")
    source = work / "tiny.cu"
    source.write_text(TINY)
    functions = sb.disassemble(sb.compile_cubin(source, "sm_90a", work, include=work))
    return {name: sb.ControlFlow(f) for name, f in functions.items()}


def test_tiny_loop_counts(tiny):
    cfg = tiny["_Z8fma_loopPKfPfi"]
    (loop,) = cfg.loops
    cost = sb.iteration_cost(cfg, loop)
    assert (cost["fp"], cost["lds"], cost["sts"], cost["barrier"], cost["ldg"]) == (1, 1, 0, 0, 0)
    assert cost["branch"] == 1  # the back edge
    assert cost["instructions"] == sum(cost[c] for c in sb.CLASSES)


def test_tiny_nested_loops(tiny):
    cfg = tiny["_Z6stagedPKfPfi"]
    inner, outer = cfg.loops  # smallest first
    assert cfg.inner_loops(outer) == [inner]
    once = sb.iteration_cost(cfg, inner)
    assert (once["ldg"], once["sts"], once["branch"]) == (1, 1, 1)
    assert sb.iteration_cost(cfg, outer, inner_cost=lambda loop: once)["sts"] == 0  # cheapest: zero trips
    cost = sb.iteration_cost(cfg, outer, [inner.header], inner_cost=lambda loop: once + once + once + once)
    assert (cost["barrier"], cost["fp"], cost["lds"], cost["sts"], cost["ldg"]) == (2, 8, 8, 4, 4)


def test_decode_kernel_counts(tools, tmp_path):
    """decode<T>: the GEMV's split (4 groups of 2 rows per lane and iteration, 256 weights), one pair-table LDS
    per 2 weights at every width (2-bit too: its codes are needed in order), a 16-byte store per 8 weights and no
    global load but the codes."""
    kernels = sb.analyse_cubin(sb.compile_cubin(sb.CUDA_DIR / "dequant.cu", "sm_90a", tmp_path))
    assert set(kernels) == {"decode<fp16>", "decode<bf16>"}
    for kernel in kernels.values():
        assert (kernel["threads"], kernel["rows_per_block"], kernel["batch_rows"]) == (256, 16, None)
        assert kernel["dynamic_shared_bytes"] == 84 * 1024
        for width, counts in kernel["widths"].items():
            assert counts["weights_per_iteration"] == 256
            assert counts["ldg_bytes_per_weight"] == pytest.approx(int(width) / 8)
            assert counts["stg_bytes_per_weight"] == pytest.approx(2)
            assert counts["classes_per_weight"]["stg"] == pytest.approx(1 / 8)
            assert counts["lds_per_weight"] == pytest.approx(0.5)
            assert counts["weight_bytes_per_warp_iteration"] == 32 * 8 * 4 * int(width)


def test_decoded_gemm_prediction():
    """decode + cuBLAS: cuBLAS at m = 512 on 4096 x 4096 is tensor-bound (2 m n k / peak); a decode of 1 instruction
    and no shared loads per weight costs its issue time when the tile stays in L2, and its code + tile bytes when
    it goes through HBM."""
    device = sb.DEVICES[1]
    widths = {str(w): {"instructions_per_weight": 1.0, "shared_wavefronts_per_weight": 0.0,
                       "stg_bytes_per_weight": 2.0} for w in (4, 3, 2)}
    row = sb.predict_decoded_gemm({"widths": widths}, device, 4096, 4096, 4.0, 512)
    weights = 4096 * 4096
    assert row["cublas_us"] == pytest.approx(2 * 512 * weights / device.tensor_flops * 1e6)
    issue = weights / device.issue_rate()
    assert row["decode_l2_us"] == pytest.approx(max(issue, weights * 0.5 / device.hbm_bytes_per_s) * 1e6)
    assert row["decode_hbm_us"] == pytest.approx(weights * 2.5 / device.hbm_bytes_per_s * 1e6)
    assert row["overhead_hbm"] == pytest.approx(row["decode_hbm_us"] / row["cublas_us"])


def test_gemv_kernel_counts(tools, tmp_path):
    """gemv<T, M>: one loop per segment; per iteration a lane decodes 4 groups of 2 rows (256 weights), with one
    mma per 8 weights, one pair-table LDS per 2 weights at 4 and 3 bits and none at 2 bits (register PRMT)."""
    kernels = sb.analyse_cubin(sb.compile_cubin(sb.CUDA_DIR / "gemv.cu", "sm_90a", tmp_path))
    assert set(kernels) == {f"gemv<{t},m={m}>" for t in ("fp16", "bf16") for m in range(1, 9)}
    for kernel in kernels.values():
        assert (kernel["threads"], kernel["rows_per_block"]) == (256, 16)
        assert kernel["dynamic_shared_bytes"] == 80 * 1024
        for width, counts in kernel["widths"].items():
            assert counts["weights_per_iteration"] == 256
            assert counts["classes_per_weight"]["mma"] == pytest.approx(1 / 8)
            assert counts["lds_per_weight"] == pytest.approx(0.5 if width != "2" else 0)
            # the codes, and each group's 32 fp16 activations (64 bytes) for the lane's 2 rows
            assert counts["ldg_bytes_per_weight"] == pytest.approx(int(width) / 8 + 64 / 64)
            assert counts["weight_bytes_per_warp_iteration"] == 32 * 256 * int(width) // 8


def test_mixllm_kernel_counts(tools, tmp_path):
    """mixllm<T, NT>: one group loop per part; per group a lane owns 64 weights of a 16 x 128 warp tile
    (64 weights), with one IMMA per step and token tile (4 NT per group), no shared memory, and loads of its codes
    (8 or 4 bits a weight), 8 activation bytes per step and tile, and the fp16 scales (+ the 4-bit zero byte)."""
    kernels = sb.analyse_cubin(sb.compile_cubin(sb.CUDA_DIR / "mixllm_gemm.cu", "sm_90a", tmp_path))
    assert set(kernels) == {f"mixllm<{t},NT={nt}>" for t in ("fp16", "bf16", "fp32") for nt in (1, 2, 4)}
    for kernel in kernels.values():
        nt = kernel["batch_rows"] // 8
        assert (kernel["threads"], kernel["rows_per_block"], kernel["shared_bytes"]) == (128, 64, 0)
        for width, counts in kernel["widths"].items():
            groups = counts["weights_per_iteration"] // 64
            assert groups >= 1 and counts["weights_per_iteration"] == 64 * groups
            assert counts["classes_per_weight"]["mma"] == pytest.approx(4 * nt / 64)
            assert counts["lds_per_weight"] == 0 and counts["sts_per_weight"] == 0
            scales = (2 * 2 + 2 * 2 * nt + (2 if width == "4" else 0)) / 64
            assert counts["ldg_bytes_per_weight"] == pytest.approx(int(width) / 8 + 4 * nt * 8 / 64 + scales)
            assert counts["weight_bytes_per_warp_iteration"] == 32 * counts["weights_per_iteration"] * int(width) // 8


def test_gemm_kernel_counts(tools, tmp_path):
    """gemm<T, MT>: the GEMV's loops, with each decoded fragment feeding 2·MT n8 batch tiles: per iteration a
    lane decodes 4 / MT groups of 2 rows, one mma per 8 weights and n8 tile, the same pair-table LDS as the
    GEMV, and 64 bytes of activations per group, row pair and n8 tile."""
    kernels = sb.analyse_cubin(sb.compile_cubin(sb.CUDA_DIR / "gemm_tc.cu", "sm_90a", tmp_path))
    assert set(kernels) == {f"gemm<{t},MT={mt}>" for t in ("fp16", "bf16") for mt in (1, 2, 4)}
    for kernel in kernels.values():
        tiles = kernel["batch_rows"] // 8
        assert (kernel["threads"], kernel["rows_per_block"]) == (256, 16)
        assert kernel["dynamic_shared_bytes"] == 80 * 1024
        for width, counts in kernel["widths"].items():
            assert counts["weights_per_iteration"] == 512 // tiles
            assert counts["classes_per_weight"]["mma"] == pytest.approx(tiles / 8)
            assert counts["lds_per_weight"] == pytest.approx(0.5 if width != "2" else 0)
            assert counts["ldg_bytes_per_weight"] == pytest.approx(int(width) / 8 + tiles)
