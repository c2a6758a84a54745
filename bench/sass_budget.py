"""Static SASS budget of the CUDA kernels: instructions and shared loads per weight, read from the compiled
code, and the throughput they *predict* on an H100 SXM and an H200. Every number is a **PREDICTION from static
SASS counts, not a measurement**.

What it does
  1. Compiles each kernel file of ``csrc/cuda`` once per target (``nvcc -cubin``, sm_90a and sm_80, the flags of
     the CI compile check). One cubin holds every instantiation: gemv m = 1..8, gemm MT = 1, 2, 4 and
     decode, each for fp16 and bf16.
  2. Disassembles it with ``nvdisasm``, and reads registers and shared memory with ``cuobjdump -res-usage``.
     Neither ships with the toolkit here; the ``nvidia-cuda-nvdisasm`` and ``nvidia-cuda-cuobjdump`` wheels
     provide them, and :func:`find_tool` looks them up among the installed package files.
  3. Builds each kernel's control-flow graph (basic blocks and their branch edges), finds its dominators and
     the natural loop of every back edge (an edge to a block that dominates its source).
  4. Finds the steady-state loop of each width b: the innermost loop that loads width-b groups. A weight load is
     a run of read-only (``__ldg``: LDG...CONSTANT) global loads from one base register at consecutive offsets
     that together read one packed group, 4·b bytes (``load_group`` in decode.cuh: one 128-bit load for 4-bit,
     one 64-bit load for 2-bit, three 32-bit loads for 3-bit); a thread may load several groups from one base
     at immediate offsets. The GEMV, the GEMM and the decode (the same K split, ``tile_decode.cuh``) run one
     loop per segment.
  5. Counts one iteration of that loop per width: the cheapest path through one iteration (back edges
     removed) that passes every width-b weight load and every staging loop. The cheapest path skips what
     the steady state never runs: rows or groups out of range, the other widths, and the peeled remainder
     of an unrolled staging loop (skipped when the per-thread element count is a multiple of the unroll,
     which is checked). Code for rare values is excluded outright, because it can be cheaper than the
     common case: blocks with the fp16 infinity exponent 0x7f800000 (the inf/NaN case of
     ``half_bits_to_float``) and inner loops without memory accesses (its subnormal renormalisation).
     An inner loop that stores to shared memory is a staging loop (x gathered through ``perm``). It counts
     (elements per thread / its stores per iteration) times its own cheapest iteration.
  6. Divides by the weights a thread consumes per iteration, derived from the kernel source:
       gemv<T, M>: per iteration a lane decodes kLaneGroups groups of each of its kLaneRows rows (rows g and
         g + 8 of the mma tile), so kLaneGroups · kLaneRows · kGroupCodes weights; x was gathered by a
         separate kernel, so no staging.
       gemm<T, MT>: the same, with its own kLaneGroups (4 at MT = 1, else 1) and every decoded fragment
         feeding 2 · MT n8 batch tiles; x was gathered by the same separate kernel, so no staging.
       decode<T>: the GEMV's split, kLaneGroups groups of each of its kLaneRows rows per lane, stored instead
         of multiplied; no staging.
     The constants are read from the ``.cu`` files (and the local headers they include, first) and template
     arguments from the symbol names. The
     weight-load bytes on the path must equal weights · b / 8, which cross-checks both.

MixLLM (``mixllm_gemm.cu``, ``mixllm<T, NT=tiles>``): the int8 tensor-core GEMM has one loop over 128-wide
groups per part (8-bit rows, 4-bit rows), with the group's four MMA steps unrolled inside. Its steady state is the
cheapest path through one group iteration that passes every block holding an IMMA (a full group: the partial last
group exits early). A loop is the 4-bit one when it loads 32-bit words (a 4-bit row's 8 codes per lane and step);
the 8-bit one loads 64-bit words only. Weights per iteration per thread: kWarpRows · kGroup / kWarpSize (16 rows ×
128 columns per warp) per group; the IMMA count (kGroup / kStepK · NT per group: ptxas may unroll the group loop,
so an iteration can hold several groups) and the weight-load bytes cross-check the path.
Predictions mix the two parts at ``MIXLLM_EIGHT_BIT_SHARE`` of the rows (the quantizer's default p = 10 %).

Per kernel it reports registers, shared memory (static plus the most dynamic shared memory a launch requests:
the GEMV's pair tables, ``kTablesBytes``), blocks per SM (occupancy from the published compute capability 9.0
limits), and per width and weight: issued instructions by class, shared-memory
wavefronts, and global bytes. A warp issues in order, and none of these kernels prefetches across iterations,
so at most one iteration's weight loads per warp are in flight. Times the warps resident on an SM, that
gives the weight bytes in flight per SM.

Model (per device; a layer's bits mix the widths by ``segment_sizes``):
  issue bound   SMs · 4 schedulers · 1 warp-instruction/clock · clock · 32 lanes / instructions per weight
  shared bound  SMs · 32 banks · 4 B/clock · clock / shared bytes moved per weight, counted in 128-byte
                wavefronts per warp access (a 128-bit access or an ldmatrix.x4 takes 4), with no bank conflicts
  HBM bound     bandwidth / (stored code bytes per weight + global bytes stored per weight)
The two SM-side bounds are scaled by the block balance: the busiest SM runs ceil(blocks / SMs) blocks.
The prediction is the smallest bound, and ``predicted_hbm_fraction`` is that bound divided by the HBM
bound. ``sm_headroom`` is the tighter SM-side bound (issue or shared) divided by the HBM bound: above 1 the
HBM bound binds, with that much to spare.

Large batches (m > 128, decode + cuBLAS): :func:`predict_decoded_gemm` puts the decode's time (its own bounds, with
the decoded tile kept in L2 or written through HBM) next to a cuBLAS FP16 GEMM's (datasheet tensor peak or HBM) for
m in ``LARGE_M``, as extra time over cuBLAS alone.

What the model cannot see is listed in ``BLIND_SPOTS`` (and printed with the report).

Output: ``<out>.json`` and ``<out>.md`` (default ``bench/results/sass_budget``). ``--check`` compares each
kernel's per-weight instruction and LDS counts with the committed ceilings in ``bench/sass_budget_limits.json``
and exits 1, naming the kernel and the count, when one is exceeded. ``--update-limits`` rewrites them from
the current counts plus a margin.
"""
from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import math
import operator
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
from bench_common import markdown_table, write_json_and_markdown
from cmpq_kernels.format import SEGMENT_BITS
from cmpq_kernels.quantize.allocate import segment_sizes

REPO = BENCH.parent
CUDA_DIR = REPO / "csrc" / "cuda"
LIMITS = BENCH / "sass_budget_limits.json"
DEFAULT_OUT = BENCH / "results" / "sass_budget"
PREDICTION_LABEL = "PREDICTION from static SASS counts, not a measurement"
ARCHS = ("sm_90a", "sm_80")
PREDICTION_ARCH = "sm_90a"  # the H100 and H200 run sm_90a code
NVCC_FLAGS = ("-std=c++17", "-O3")  # those of the CI compile check and setup.py
TOOL_PACKAGES = {"nvdisasm": "nvidia-cuda-nvdisasm", "cuobjdump": "nvidia-cuda-cuobjdump"}
LIMIT_MARGIN = 0.03  # ceilings sit 3 % above the counts they were written from
LIMIT_KEYS = ("instructions_per_weight", "lds_per_weight")

# Shapes (n x k) and bits of the report; m = 1 and 4 on the GEMV path, every MT on the GEMM path.
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (8192, 28672), (28672, 8192), (128256, 4096))
BITS = (2.0, 2.5, 3.0, 4.0)
GEMV_REPORT_M = (1, 4)

BLIND_SPOTS = (
    "Latency: the in-flight bytes only say how much latency the loads in flight could cover. Occupancy effects "
    "beyond the resident-warp count, scheduling stalls and dependency chains. Dual issue and per-pipe limits: an "
    "HMMA's tensor-pipe time, MUFU, and IMAD on the FMA pipe all count as one issue slot. Bank conflicts: "
    "accesses are assumed conflict-free. Cache hits: x, perm and the codebooks are assumed to stay in L1/L2 "
    "and cost no HBM traffic. Work outside the steady-state loop: codebook tables (the GEMV fills 16-row pair "
    "tables once per block: 16 + 4 sixteen-byte stores per thread with 4- and 3-bit segments), the GEMV's "
    "separate gather launch (x[:, perm] to an fp16 workspace), outliers (≈ 0.16 bits per weight of traffic at "
    "0.5 % density), the reduction and the epilogue. MixLLM: the activation quantizer's launch, the scattered "
    "output stores, IMMA's tensor-pipe time, and the activation codes re-read by every warp (assumed L1/L2 hits). "
    "Large batches: cuBLAS is taken at peak on every 16 MiB tile, but a tile is a small GEMM (m x 2,048 rows at "
    "k = 4096, m x 288 at k = 28672) that may not fill 132 SMs; launch costs, two per tile, are not counted.")
WARP_LANES = 32
SHARED_WAVEFRONT_BYTES = 128  # 32 banks x 4 B: what shared memory serves per clock per SM


# ---- devices: published specifications --------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    """A GPU as its datasheet and the CUDA programming guide describe it (nothing here was measured)."""

    name: str
    sms: int
    clock_hz: float           # boost clock
    hbm_bytes_per_s: float
    tensor_flops: float       # dense FP16 tensor-core FLOP/s, FP32 accumulation (datasheet figure without sparsity)
    source: str
    schedulers_per_sm: int = 4            # each issues one warp-instruction per clock
    max_warps_per_sm: int = 64            # compute capability 9.0
    max_blocks_per_sm: int = 32
    registers_per_sm: int = 65536
    register_unit: int = 256              # registers are allocated per warp in units of 256
    shared_per_sm: int = 228 * 1024
    shared_reserved_per_block: int = 1024  # the runtime's per-block reservation

    def issue_rate(self) -> float:
        """Lane-instructions per second the SMs can issue."""
        return self.sms * self.schedulers_per_sm * self.clock_hz * WARP_LANES

    def shared_rate(self) -> float:
        """Lane shares of 128-byte shared-memory wavefronts per second: one wavefront (32 lanes' 4-byte
        accesses) per SM per clock."""
        return self.sms * self.clock_hz * WARP_LANES


SM90_SOURCE = ("CUDA C++ Programming Guide, compute capability 9.0 (64 warps, 32 blocks, 64 K registers, "
               "228 KB shared memory per SM; 32 banks of 4 bytes); Hopper tuning guide (4 warp schedulers per SM)")
DEVICES = (
    Device("H100 SXM", sms=132, clock_hz=1.98e9, hbm_bytes_per_s=3.35e12, tensor_flops=989.4e12,
           source="NVIDIA H100 Tensor Core GPU datasheet (SXM5: 132 SMs, 3.35 TB/s HBM3, 1.98 GHz boost, FP16 "
                  "tensor core 1,979 TFLOPS with sparsity = 989 dense); " + SM90_SOURCE),
    Device("H200", sms=132, clock_hz=1.98e9, hbm_bytes_per_s=4.8e12, tensor_flops=989.4e12,
           source="NVIDIA H200 Tensor Core GPU datasheet (4.8 TB/s HBM3e, FP16 tensor core 1,979 TFLOPS with "
                  "sparsity; the H100's GH100 SM count and clock); " + SM90_SOURCE),
)


# ---- tools ----------------------------------------------------------------------------------------------------

class ToolMissing(RuntimeError):
    """nvcc or a disassembler is not installed."""


def find_tool(name: str) -> Path:
    """``nvdisasm`` / ``cuobjdump``: from the installed NVIDIA wheel's files, else from PATH or the toolkit."""
    try:
        for entry in importlib.metadata.files(TOOL_PACKAGES[name]) or ():
            if entry.name == name and entry.parent.name == "bin":
                return Path(entry.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    for candidate in (shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise ToolMissing(f"{name} not found: pip install {TOOL_PACKAGES[name]}")


def find_nvcc() -> Path:
    """``$NVCC``, else nvcc on PATH, else the default toolkit location."""
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise ToolMissing("nvcc not found (set NVCC or install the CUDA toolkit)")


def tool_version(path: Path) -> str:
    """``<tool> --version``'s release line, e.g. "Cuda compilation tools, release 13.0, V13.0.88"."""
    out = subprocess.run([str(path), "--version"], check=True, capture_output=True, text=True).stdout
    return next(line for line in out.splitlines() if "release" in line).strip()


def compile_cubin(source: Path, arch: str, out_dir: Path, include: Path = REPO / "csrc") -> Path:
    """``source`` compiled for one SM target to ``out_dir/<stem>.<arch>.cubin``; a cubin there that is newer than
    every file under ``include`` is reused."""
    cubin = out_dir / f"{source.stem}.{arch}.cubin"
    newest_source = max(p.stat().st_mtime for p in [source, *include.rglob("*")] if p.is_file())
    if cubin.exists() and cubin.stat().st_mtime > newest_source:
        return cubin
    subprocess.run([str(find_nvcc()), *NVCC_FLAGS, f"-I{include}", "-cubin", f"-arch={arch}", str(source),
                    "-o", str(cubin)], check=True, capture_output=True, text=True)
    return cubin


# ---- SASS -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str   # "" when unpredicated
    opcode: str      # with modifiers, e.g. "LDG.E.128.CONSTANT"
    operands: str

    @property
    def root(self) -> str:
        return self.opcode.split(".")[0]


@dataclass
class Function:
    name: str
    instructions: list[Instruction] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)  # label -> index of the instruction it marks


INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[T0-7])\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)"
                         r"\s*(.*?)\s*;")
LABEL_LINE = re.compile(r"^(\.L_x_\d+):")
FUNCTION = re.compile(r"^\.text\.(\S+):$")
TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def parse_sass(text: str) -> dict[str, Function]:
    """Functions of an ``nvdisasm -c`` listing, by mangled name."""
    functions: dict[str, Function] = {}
    current: Optional[Function] = None
    for line in text.splitlines():
        if match := FUNCTION.match(line):
            current = functions.setdefault(match.group(1), Function(match.group(1)))
        elif current is None:
            continue
        elif match := LABEL_LINE.match(line):
            current.labels[match.group(1)] = len(current.instructions)
        elif match := INSTRUCTION.match(line):
            current.instructions.append(Instruction(int(match.group(1), 16), match.group(2) or "",
                                                    match.group(3), match.group(4)))
    return functions


def disassemble(cubin: Path) -> dict[str, Function]:
    text = subprocess.run([str(find_tool("nvdisasm")), "-c", str(cubin)], check=True, capture_output=True,
                          text=True).stdout
    return parse_sass(text)


RESOURCE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: Path) -> dict[str, dict[str, int]]:
    """Registers, stack, static shared and local bytes per function (``cuobjdump -res-usage``)."""
    text = subprocess.run([str(find_tool("cuobjdump")), "-res-usage", str(cubin)], check=True,
                          capture_output=True, text=True).stdout
    return {m.group(1): {"registers": int(m.group(2)), "stack": int(m.group(3)), "shared_bytes": int(m.group(4)),
                         "local_bytes": int(m.group(5))} for m in RESOURCE.finditer(text)}


# ---- instruction classes --------------------------------------------------------------------------------------

CLASS_OF_ROOT = {
    **dict.fromkeys(("LDG",), "ldg"), **dict.fromkeys(("STG",), "stg"),
    **dict.fromkeys(("LDS", "LDSM"), "lds"), **dict.fromkeys(("STS",), "sts"),
    **dict.fromkeys(("FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "HFMA2", "HADD2", "HMUL2", "HMNMX2",
                     "HSETP2", "FCHK"), "fp"),
    **dict.fromkeys(("HMMA", "IMMA", "DMMA", "HGMMA", "IGMMA", "QGMMA"), "mma"),
    **dict.fromkeys(("F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP", "FRND"), "convert"),
    **dict.fromkeys(("IMAD", "IADD3", "IADD", "LOP3", "SHF", "LEA", "ISETP", "SEL", "IABS", "VIADD", "VIMNMX",
                     "IMNMX", "PLOP3", "PRMT", "POPC", "FLO", "BREV", "IDP", "VIADDMNMX", "BMSK", "SGXT",
                     "UIADD3", "ULOP3", "USHF", "ULEA", "UISETP", "UIMAD", "USEL", "UPRMT", "UPLOP3", "UFLO",
                     "UPOPC", "UBMSK", "USGXT", "UIABS", "UIMNMX", "UBREV", "ULOP", "ULOP32I"), "int"),
    **dict.fromkeys(("MOV", "MOV32I", "UMOV", "CS2R", "S2R", "S2UR", "LDC", "ULDC", "R2UR", "P2R", "R2P", "UP2UR",
                     "UR2UP"), "move"),
    **dict.fromkeys(("BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "WARPSYNC", "BREAK",
                     "BMOV", "YIELD", "KILL", "ENDCOLLECTIVE"), "branch"),
    **dict.fromkeys(("BAR", "MEMBAR", "DEPBAR", "ERRBAR", "SYNCS", "ARRIVES", "WARPGROUP"), "barrier"),
}
CLASSES = ("ldg", "stg", "lds", "sts", "fp", "mma", "convert", "int", "move", "branch", "barrier", "other")
ACCESS_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}  # LD/ST size modifiers; none: 4 bytes


def classify(ins: Instruction) -> str:
    """The class of an issued instruction (``CLASSES``). Idioms by operands: ``HFMA2.MMA R, -RZ, RZ, …``
    materialises a constant, ``HADD2.F32 R, -RZ, R.H0_H0`` converts fp16 to fp32, ``IMAD.MOV`` moves."""
    if ins.opcode.startswith("HFMA2.MMA") and ins.operands.split(", ")[1:3] == ["-RZ", "RZ"]:
        return "move"
    if ins.opcode.startswith("HADD2.F32") and ", -RZ, " in ins.operands:
        return "convert"
    if ins.opcode.startswith("IMAD.MOV"):
        return "move"
    return CLASS_OF_ROOT.get(ins.root, "other")


def access_bytes(ins: Instruction) -> int:
    """Bytes one lane moves with a load or store."""
    return next((ACCESS_BYTES[m] for m in ins.opcode.split(".")[1:] if m in ACCESS_BYTES), 4)


def shared_wavefronts(ins: Instruction) -> int:
    """128-byte shared-memory wavefronts of one warp access, conflict-free: ``ldmatrix.x4`` moves 4 × 128 B,
    a 128-bit LDS/STS 32 × 16 B; narrow accesses still take one."""
    if ins.root == "LDSM":
        return int(ins.opcode.rsplit(".", 1)[1]) if re.search(r"\.M88\.\d$|\.MT88\.\d$", ins.opcode) else 1
    return max(1, WARP_LANES * access_bytes(ins) // SHARED_WAVEFRONT_BYTES)


def instruction_cost(ins: Instruction) -> Counter:
    """What one issued instruction adds to a count: its class, 1 instruction, and bytes / wavefronts."""
    cost = Counter({classify(ins): 1, "instructions": 1})
    if ins.root in ("LDG", "STG"):
        cost[f"{ins.root.lower()}_bytes"] += access_bytes(ins)
    if ins.root in ("LDS", "LDSM", "STS"):
        cost["shared_wavefronts"] += shared_wavefronts(ins)
    return cost


# ---- control flow -----------------------------------------------------------------------------------------------

ENDS_BLOCK = {"BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "KILL"}


@dataclass
class Block:
    index: int
    instructions: list[Instruction]
    successors: list[int] = field(default_factory=list)
    predecessors: list[int] = field(default_factory=list)

    def cost(self) -> Counter:
        total: Counter = Counter()
        for ins in self.instructions:
            total.update(instruction_cost(ins))
        return total


@dataclass
class Loop:
    header: int
    blocks: frozenset[int]
    latches: frozenset[int]  # sources of the back edges


class ControlFlow:
    """Basic blocks, dominators and natural loops of one function."""

    def __init__(self, function: Function):
        self.function = function
        self.blocks = self._split(function)
        self.idom = self._dominators()
        self.loops = self._natural_loops()

    @staticmethod
    def _split(function: Function) -> list[Block]:
        instructions = function.instructions
        leaders = {0, *function.labels.values()}
        leaders.update(i + 1 for i, ins in enumerate(instructions) if ins.root in ENDS_BLOCK)
        starts = sorted(i for i in leaders if i < len(instructions))
        block_at = {start: b for b, start in enumerate(starts)}
        blocks = [Block(b, instructions[start:end]) for b, (start, end)
                  in enumerate(zip(starts, starts[1:] + [len(instructions)]))]
        for block, start in zip(blocks, starts):
            last = block.instructions[-1]
            end = start + len(block.instructions)
            targets = TARGET.findall(last.operands) if last.root in ("BRA", "JMP") else []
            block.successors = [block_at[function.labels[t]] for t in targets]
            falls_through = last.root not in ENDS_BLOCK or bool(last.predicate) or last.opcode == "BRA.DIV"
            if falls_through and end in block_at:
                block.successors.append(block_at[end])
            block.successors = list(dict.fromkeys(block.successors))
        for block in blocks:
            for s in block.successors:
                blocks[s].predecessors.append(block.index)
        return blocks

    def _reverse_postorder(self) -> list[int]:
        seen, order, stack = {0}, [], [(0, iter(self.blocks[0].successors))]
        while stack:
            node, successors = stack[-1]
            nxt = next((s for s in successors if s not in seen), None)
            if nxt is None:
                order.append(node)
                stack.pop()
            else:
                seen.add(nxt)
                stack.append((nxt, iter(self.blocks[nxt].successors)))
        return order[::-1]

    def _dominators(self) -> dict[int, int]:
        """Immediate dominators of the blocks reachable from the entry (Cooper, Harvey and Kennedy)."""
        order = self._reverse_postorder()
        rank = {b: i for i, b in enumerate(order)}
        idom = {0: 0}

        def intersect(a: int, b: int) -> int:
            while a != b:
                while rank[a] > rank[b]:
                    a = idom[a]
                while rank[b] > rank[a]:
                    b = idom[b]
            return a

        changed = True
        while changed:
            changed = False
            for b in order[1:]:
                done = [p for p in self.blocks[b].predecessors if p in idom]
                new = done[0]
                for p in done[1:]:
                    new = intersect(p, new)
                if idom.get(b) != new:
                    idom[b], changed = new, True
        return idom

    def dominates(self, a: int, b: int) -> bool:
        while b != a and b != 0:
            b = self.idom[b]
        return b == a

    def _natural_loops(self) -> list[Loop]:
        """One loop per header: the blocks that reach a back edge's source without passing the header."""
        latches: dict[int, set[int]] = {}
        for block in self.blocks:
            for s in block.successors:
                if block.index in self.idom and self.dominates(s, block.index):
                    latches.setdefault(s, set()).add(block.index)
        loops = []
        for header, sources in latches.items():
            body, stack = {header}, [s for s in sources if s != header]
            body.update(stack)
            while stack:
                for p in self.blocks[stack.pop()].predecessors:
                    if p not in body and p in self.idom:
                        body.add(p)
                        stack.append(p)
            loops.append(Loop(header, frozenset(body), frozenset(sources)))
        return sorted(loops, key=lambda loop: len(loop.blocks))

    def inner_loops(self, loop: Loop) -> list[Loop]:
        """The loops directly inside ``loop`` (not inside another loop inside it)."""
        inside = [other for other in self.loops if other.blocks < loop.blocks]
        return [a for a in inside if not any(a.blocks < b.blocks for b in inside)]


# ---- cheapest path through one iteration -------------------------------------------------------------------------

class PathError(ValueError):
    """No iteration path satisfies the constraints: the kernel no longer has the shape this script models."""


InnerCost = Callable[[Loop], Optional[Counter]]  # an inner loop's total cost per outer iteration; None: skipped


def iteration_cost(cfg: ControlFlow, loop: Loop, must_pass: Sequence[int] = (),
                   inner_cost: InnerCost = lambda _: None, avoid: Iterable[int] = ()) -> Counter:
    """Class counts along the cheapest path from ``loop``'s header to one of its latches.

    Inner loops are collapsed into one node each, costing ``inner_cost(inner)``; ``None`` removes them, as
    do the ``avoid`` blocks. The path passes every block of ``must_pass`` (a block inside an inner loop
    stands for that loop); they must be ordered by reachability. Raises :class:`PathError` if no such path
    exists.
    """
    inner = cfg.inner_loops(loop)
    node_of = {b: ("loop", i) for i, lp in enumerate(inner) for b in lp.blocks}
    node_of.update({b: ("block", b) for b in loop.blocks if b not in node_of})
    avoid = set(avoid)
    costs: dict[tuple, Optional[Counter]] = {}
    for b in loop.blocks:
        node = node_of[b]
        if node[0] == "block":
            costs[node] = None if b in avoid else cfg.blocks[b].cost()
        elif node not in costs:
            costs[node] = inner_cost(inner[node[1]])
    edges: dict[tuple, set[tuple]] = {node: set() for node in costs}
    for b in loop.blocks:
        for s in cfg.blocks[b].successors:
            if s != loop.header and s in loop.blocks and node_of[s] != node_of[b]:
                edges[node_of[b]].add(node_of[s])
    sinks = {node_of[b] for b in loop.latches}
    order = _topological(edges)
    waypoints = [node_of[loop.header], *(node_of[b] for b in must_pass)]
    total: Counter = Counter()
    for i, start in enumerate(waypoints):
        goals = {waypoints[i + 1]} if i + 1 < len(waypoints) else sinks
        total.update(_cheapest(order, edges, costs, start, goals, first=(i == 0)))
    return total


def _topological(edges: dict[tuple, set[tuple]]) -> list[tuple]:
    indegree = Counter(t for targets in edges.values() for t in targets)
    ready = sorted(n for n in edges if indegree[n] == 0)
    order = []
    while ready:
        node = ready.pop()
        order.append(node)
        for t in sorted(edges[node]):
            indegree[t] -= 1
            if indegree[t] == 0:
                ready.append(t)
    if len(order) != len(edges):
        raise PathError("the loop body is not acyclic once inner loops are collapsed (irreducible control flow)")
    return order


def _cheapest(order: list[tuple], edges: dict[tuple, set[tuple]], costs: dict[tuple, Optional[Counter]],
              start: tuple, goals: set[tuple], first: bool) -> Counter:
    """Cheapest (fewest instructions) path from ``start`` to a goal; ``start`` itself counts only if ``first``."""
    if costs[start] is None:
        raise PathError(f"a required node {start} is excluded")
    best: dict[tuple, Counter] = {start: costs[start] if first else Counter()}
    for node in order[order.index(start):]:
        if node not in best or node in goals:
            continue
        for t in edges[node]:
            if costs[t] is None:
                continue
            candidate = best[node] + costs[t]
            if t not in best or candidate["instructions"] < best[t]["instructions"]:
                best[t] = candidate
    reached = [best[g] for g in goals if g in best]
    if not reached:
        raise PathError(f"no path from {start} to {sorted(goals)}")
    return min(reached, key=lambda c: c["instructions"])


# ---- kernel source facts -------------------------------------------------------------------------------------------

CONSTEXPR = re.compile(r"constexpr\s+int\s+(\w+)\s*=\s*([^;]+);")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Div: operator.floordiv, ast.Mod: operator.mod}


def _evaluate(expression: str, names: dict[str, int]) -> int:
    """An integer C++ constant expression of names, literals and + - * / %."""
    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](value(node.left), value(node.right))
        raise ValueError(expression)
    return value(ast.parse(expression.strip(), mode="eval").body)


def source_constants(path: Path, known: dict[str, int]) -> dict[str, int]:
    """Every ``constexpr int`` of a source whose value follows from ``known`` and earlier constants."""
    names = dict(known)
    for name, expression in CONSTEXPR.findall(re.sub(r"//[^\n]*", "", path.read_text())):
        try:
            names[name] = _evaluate(expression, names)
        except (ValueError, SyntaxError, ZeroDivisionError):
            pass  # uses sizeof or a runtime value: not needed here
    return names


def template_parameters(path: Path, kernel: str) -> list[str]:
    """The ``int`` template parameter names of a kernel, in order."""
    text = re.sub(r"//[^\n]*", "", path.read_text())
    match = re.search(r"template\s*<([^>]*)>\s*__global__[^;{]*?\b" + kernel + r"\s*\(", text)
    if match is None:
        raise ValueError(f"{kernel}: template header not found in {path.name}")
    return re.findall(r"\bint\s+(\w+)", match.group(1))


DTYPES = {"6__half": "fp16", "13__nv_bfloat16": "bf16"}
MANGLED = re.compile(r"(cmpq_\w+?_kernel)I(6__half|13__nv_bfloat16)((?:Li\d+E)*)E")


@dataclass(frozen=True)
class Family:
    """How one kernel template maps to per-iteration work (see the module docstring)."""

    name: str
    source: str
    symbol: str
    weights_per_thread: Callable[[dict], int]   # weights one thread consumes per hot-loop iteration
    staged_per_thread: Callable[[dict], int]    # elements one thread stores in staging loops per iteration
    threads: Callable[[dict], int]
    rows_per_block: Callable[[dict], int]
    batch_rows: Callable[[dict], Optional[int]]  # the m a block covers; None: the decode path (m > kGemmMaxM)
    label: Callable[[dict], str]
    dynamic_shared: Callable[[dict], int] = lambda c: 0  # the most dynamic shared memory a launch requests


FAMILIES = (
    Family("gemv", "gemv.cu", "cmpq_gemv_kernel",
           weights_per_thread=lambda c: c["kLaneGroups"] * c["kLaneRows"] * c["kGroupCodes"],
           staged_per_thread=lambda c: 0,
           threads=lambda c: c["kThreads"], rows_per_block=lambda c: c["kTileRows"],
           batch_rows=lambda c: c["M"], label=lambda c: f"m={c['M']}",
           dynamic_shared=lambda c: c["kTablesBytes"]),
    Family("gemm", "gemm_tc.cu", "cmpq_gemm_kernel",
           weights_per_thread=lambda c: c["kLaneGroups"] * c["kLaneRows"] * c["kGroupCodes"],
           staged_per_thread=lambda c: 0,
           threads=lambda c: c["kThreads"], rows_per_block=lambda c: c["kTileRows"],
           batch_rows=lambda c: c["kBatchRows"], label=lambda c: f"MT={c['MT']}",
           dynamic_shared=lambda c: max(c["kTablesBytes"], c["kWarps"] * c["kTileRows"] * c["kBatchRows"] * 4)),
    Family("decode", "dequant.cu", "cmpq_decode_kernel",
           weights_per_thread=lambda c: c["kLaneGroups"] * c["kLaneRows"] * c["kGroupCodes"],
           staged_per_thread=lambda c: 0,
           threads=lambda c: c["kThreads"], rows_per_block=lambda c: c["kTileRows"],
           batch_rows=lambda c: None, label=lambda c: "", dynamic_shared=lambda c: c["kTablesBytes"]),
)
INF_EXPONENT = "0x7f800000"  # fp32 infinity: marks half_bits_to_float's inf/NaN branch


@dataclass
class Instance:
    """One compiled kernel instantiation."""

    family: Family
    dtype: str
    constants: dict[str, int]  # source constants with the template arguments

    @property
    def name(self) -> str:
        params = ",".join(p for p in (self.dtype, self.family.label(self.constants)) if p)
        return f"{self.family.name}<{params}>"


def instances(functions: Iterable[str], family: Family) -> dict[str, Instance]:
    """The family's instantiations among the mangled function names, with their constants."""
    path = CUDA_DIR / family.source
    layout = source_constants(REPO / "csrc" / "cmpq_layout.h", {})
    for header in re.findall(r'^#include "(\w+\.cuh)"', path.read_text(), re.M):  # shared constants first
        layout = source_constants(CUDA_DIR / header, layout)
    params = template_parameters(path, family.symbol)
    found = {}
    for name in functions:
        match = MANGLED.search(name)
        if match is None or match.group(1) != family.symbol:
            continue
        values = [int(v) for v in re.findall(r"Li(\d+)E", match.group(3))]
        constants = source_constants(path, {**layout, **dict(zip(params, values))})
        found[name] = Instance(family, DTYPES[match.group(2)], constants)
    return found


# ---- MixLLM (mixllm_gemm.cu) -----------------------------------------------------------------------------------

MIXLLM_SOURCE = "mixllm_gemm.cu"
MIXLLM_MANGLED = re.compile(r"mixllm_gemm_kernelI(6__half|13__nv_bfloat16|f)Li(\d+)EE")
MIXLLM_DTYPES = {**DTYPES, "f": "fp32"}
MIXLLM_WIDTHS = (8, 4)
MIXLLM_EIGHT_BIT_SHARE = 0.10  # cmpq_kernels/quantize/mixllm.py DEFAULT_P: 10 % of the output rows at 8 bits


def mixllm_constants() -> dict[str, int]:
    return source_constants(CUDA_DIR / MIXLLM_SOURCE, source_constants(REPO / "csrc" / "mixllm_layout.h", {}))


def _loads_words(cfg: ControlFlow, loop: Loop) -> bool:
    """Whether the loop holds 32-bit read-only global loads (a 4-bit row's 8 codes per lane and MMA step)."""
    return any(ins.root == "LDG" and "CONSTANT" in ins.opcode.split(".") and access_bytes(ins) == 4
               for b in loop.blocks for ins in cfg.blocks[b].instructions)


def width_counts(counts: dict, weights: int, weight_bytes: int) -> dict:
    """One width's row of a kernel: ``counts`` per steady-state iteration (one thread) divided by the ``weights``
    it consumes; ``weight_bytes`` = the thread's weight loads per iteration."""
    return {
        "weights_per_iteration": weights,
        "instructions_per_iteration": counts["instructions"],
        "instructions_per_weight": counts["instructions"] / weights,
        "lds_per_weight": counts["lds"] / weights,
        "sts_per_weight": counts["sts"] / weights,
        "shared_wavefronts_per_weight": counts["shared_wavefronts"] / weights,
        "ldg_bytes_per_weight": counts["ldg_bytes"] / weights,
        "stg_bytes_per_weight": counts["stg_bytes"] / weights,
        "weight_bytes_per_warp_iteration": WARP_LANES * weight_bytes,
        "classes_per_weight": {c: counts[c] / weights for c in CLASSES},
    }


def analyse_mixllm(function: Function, name: str, tiles: int, constants: dict[str, int]) -> dict[int, dict]:
    """Per part width (8, 4): the counts per weight of one full-group iteration (see the module docstring)."""
    cfg = ControlFlow(function)
    steps = constants["kGroup"] // constants["kStepK"]
    out = {}
    for loop in cfg.loops:
        mma_blocks = [b for b in sorted(loop.blocks) if any(i.root == "IMMA" for i in cfg.blocks[b].instructions)]
        if not mma_blocks:
            continue
        width = 4 if _loads_words(cfg, loop) else 8
        if width in out:
            raise PathError(f"{name}: two group loops of the {width}-bit part")
        counts = iteration_cost(cfg, loop, mma_blocks)
        # ptxas may unroll the group loop: an iteration then covers several whole groups
        groups, rest = divmod(counts["mma"], steps * tiles)
        if groups < 1 or rest:
            raise PathError(f"{name}: {width}-bit group iteration issues {counts['mma']} IMMA, the source says "
                            f"{steps} steps x {tiles} token tiles per group")
        weights = groups * constants["kWarpRows"] * constants["kGroup"] // constants["kWarpSize"]
        path = [ins for b in mma_blocks for ins in cfg.blocks[b].instructions
                if ins.root == "LDG" and "CONSTANT" in ins.opcode.split(".")]
        word_bytes = sum(access_bytes(i) for i in path if access_bytes(i) == 4)
        wide_bytes = sum(access_bytes(i) for i in path if access_bytes(i) == 8)
        x_bytes = groups * steps * tiles * 8  # B fragments: 8 activation codes per lane, step and token tile
        weight_bytes = word_bytes if width == 4 else wide_bytes - x_bytes
        if weight_bytes * 8 != weights * width or (width == 4 and wide_bytes != x_bytes):
            raise PathError(f"{name}: {width}-bit path loads {weight_bytes} weight bytes per thread, the source says "
                            f"{weights} weights per iteration ({weights * width // 8} bytes)")
        out[width] = width_counts(counts, weights, weight_bytes)
    if set(out) != set(MIXLLM_WIDTHS):
        raise PathError(f"{name}: group loops found for widths {sorted(out)}, expected {MIXLLM_WIDTHS}")
    return dict(sorted(out.items(), reverse=True))


def analyse_mixllm_cubin(functions: dict[str, Function], resources: dict[str, dict]) -> dict[str, dict]:
    constants = mixllm_constants()
    result = {}
    for mangled, function in functions.items():
        match = MIXLLM_MANGLED.search(mangled)
        if match is None:
            continue
        dtype, tiles = MIXLLM_DTYPES[match.group(1)], int(match.group(2))
        name = f"mixllm<{dtype},NT={tiles}>"
        result[name] = {
            "family": "mixllm", "dtype": dtype, "symbol": mangled, "threads": constants["kThreads"],
            "rows_per_block": constants["kBlockRows"], "batch_rows": tiles * constants["kTokens"],
            **resources[mangled], "dynamic_shared_bytes": 0,
            "widths": {str(w): v for w, v in analyse_mixllm(function, name, tiles, constants).items()},
        }
    return result


# ---- analysis of one kernel ---------------------------------------------------------------------------------------

BASE = re.compile(r"\[(R\d+)(?:\.64)?(?:\+(0x[0-9a-f]+))?\]")


def weight_loads(block: Block) -> list[int]:
    """Bit widths of the packed groups this block loads: runs of 32-, 64- or 128-bit read-only global loads
    (``load_group``'s ``__ldg``: LDG...CONSTANT) from one base register at consecutive offsets, each run totalling
    4·b bytes for b in ``SEGMENT_BITS``. A thread may load several groups from one base at immediate offsets; a
    run of any other length (the GEMV's 64-byte activation slices) is not a group, nor are plain loads (CSR
    indices in the outlier loops)."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for ins in block.instructions:
        weight = ins.root == "LDG" and "CONSTANT" in ins.opcode.split(".") and access_bytes(ins) >= 4
        match = BASE.search(ins.operands) if weight else None
        if match:
            spans.setdefault(match.group(1), []).append((int(match.group(2) or "0", 16), access_bytes(ins)))
    widths = []
    for pieces in spans.values():
        pieces.sort()
        runs = [[pieces[0]]]
        for piece in pieces[1:]:
            if runs[-1][-1][0] + runs[-1][-1][1] == piece[0]:
                runs[-1].append(piece)
            else:
                runs.append([piece])
        for run in runs:
            total = sum(n for _, n in run)
            if total % 4 == 0 and total // 4 in SEGMENT_BITS:
                widths.append(total // 4)
    return widths


def hot_loops(cfg: ControlFlow) -> dict[int, tuple[Loop, list[int]]]:
    """Per width: the innermost loop holding weight loads of that width, and its load blocks in address order.
    Every kernel runs one loop per segment."""
    found: dict[int, tuple[Loop, list[int]]] = {}
    for loop in cfg.loops:  # smallest first
        for width in SEGMENT_BITS:
            blocks = [b for b in sorted(loop.blocks) if width in weight_loads(cfg.blocks[b])]
            if blocks and width not in found:
                found[width] = (loop, blocks)
    missing = set(SEGMENT_BITS) - set(found)
    if missing:
        raise PathError(f"{cfg.function.name}: no loop loads groups of width {sorted(missing)}")
    return found


def per_iteration(cfg: ControlFlow, loop: Loop, staged_per_thread: int) -> Callable[[Sequence[int]], Counter]:
    """The cost function of the hot loop's iterations, with its inner loops classified (see the docstring)."""
    def inner_cost(inner: Loop) -> Optional[Counter]:
        blocks = [cfg.blocks[b] for b in inner.blocks]
        if not any(ins.root in ("LDG", "LDS", "STS", "STG", "LDSM") for blk in blocks for ins in blk.instructions):
            return None  # a data-dependent scalar loop (fp16 subnormal renormalisation): not the steady state
        once = iteration_cost(cfg, inner)
        if once["sts"] == 0 or staged_per_thread == 0 or staged_per_thread % once["sts"]:
            raise PathError(f"{cfg.function.name}: inner loop at block {inner.header} is not a staging loop of "
                            f"{staged_per_thread} elements per thread ({once['sts']} stores per iteration)")
        return Counter({k: v * (staged_per_thread // once["sts"]) for k, v in once.items()})

    avoid = [b for b in loop.blocks if any(INF_EXPONENT in ins.operands for ins in cfg.blocks[b].instructions)]
    staging = [inner.header for inner in cfg.inner_loops(loop) if inner_cost(inner) is not None]

    def cost(must_pass: Sequence[int]) -> Counter:
        ordered = sorted([*must_pass, *staging], key=lambda b: cfg.blocks[b].instructions[0].address)
        return iteration_cost(cfg, loop, ordered, inner_cost, avoid)
    return cost


def analyse_function(function: Function, instance: Instance) -> dict[int, dict]:
    """Per width: the counts per weight of one steady-state iteration (see the module docstring)."""
    cfg = ControlFlow(function)
    constants = instance.constants
    weights = instance.family.weights_per_thread(constants)
    out = {}
    for width, (loop, loads) in hot_loops(cfg).items():
        counts = per_iteration(cfg, loop, instance.family.staged_per_thread(constants))(loads)
        weight_bytes = sum(4 * w for b in loads for w in weight_loads(cfg.blocks[b]) if w == width)
        if weight_bytes * 8 != weights * width:
            raise PathError(f"{instance.name}: {width}-bit path loads {weight_bytes} weight bytes per thread, the "
                            f"source says {weights} weights per iteration ({weights * width // 8} bytes)")
        out[width] = width_counts(counts, weights, weight_bytes)
    return dict(sorted(out.items(), reverse=True))


def analyse_cubin(cubin: Path) -> dict[str, dict]:
    """Every kernel instantiation in a cubin: resources, launch shape and per-width counts, by instance name."""
    functions = disassemble(cubin)
    resources = resource_usage(cubin)
    result = {}
    for family in FAMILIES:
        for mangled, instance in instances(functions, family).items():
            c = instance.constants
            result[instance.name] = {
                "family": family.name, "dtype": instance.dtype, "symbol": mangled,
                "threads": family.threads(c), "rows_per_block": family.rows_per_block(c),
                "batch_rows": family.batch_rows(c), **resources[mangled],
                "dynamic_shared_bytes": family.dynamic_shared(c),
                "widths": {str(w): v for w, v in analyse_function(functions[mangled], instance).items()},
            }
    result.update(analyse_mixllm_cubin(functions, resources))
    return result


def analyse_all(archs: Sequence[str], work: Path, jobs: int) -> dict[str, dict[str, dict]]:
    """``{arch: {instance: counts}}`` for every kernel file, one compile per file and arch."""
    sources = sorted([*(CUDA_DIR / f.source for f in FAMILIES), CUDA_DIR / MIXLLM_SOURCE])
    tasks = [(src, arch) for arch in archs for src in sources]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        cubins = list(pool.map(lambda t: compile_cubin(t[0], t[1], work), tasks))
    kernels: dict[str, dict[str, dict]] = {arch: {} for arch in archs}
    for (_, arch), cubin in zip(tasks, cubins):
        kernels[arch].update(analyse_cubin(cubin))
    rank = {**{f.name: i for i, f in enumerate(FAMILIES)}, "mixllm": len(FAMILIES)}
    return {arch: dict(sorted(per_arch.items(), key=lambda item: (rank[item[1]["family"]], item[1]["dtype"] != "fp16",
                                                                  item[1]["batch_rows"] or 0)))
            for arch, per_arch in kernels.items()}


# ---- throughput model -----------------------------------------------------------------------------------------------

def blocks_per_sm(device: Device, registers: int, shared_bytes: int, threads: int) -> int:
    """Resident blocks per SM by the registers, shared memory, warp and block limits."""
    warps = math.ceil(threads / WARP_LANES)
    per_warp = math.ceil(registers * WARP_LANES / device.register_unit) * device.register_unit
    limits = [device.max_blocks_per_sm, device.max_warps_per_sm // warps,
              device.registers_per_sm // (per_warp * warps) if registers else device.max_blocks_per_sm,
              device.shared_per_sm // (shared_bytes + device.shared_reserved_per_block)]
    return min(limits)


def block_shared_bytes(kernel: dict) -> int:
    """Static shared memory plus the most dynamic shared memory a launch requests."""
    return kernel["shared_bytes"] + kernel.get("dynamic_shared_bytes", 0)


def width_mix(k: int, bits: float) -> dict[int, float]:
    """Fraction of a layer's weights at each width (the allocator's two-width split)."""
    return {w: size / k for w, size in zip(SEGMENT_BITS, segment_sizes(k, bits)) if size}


def mixed(widths: dict[str, dict], mix: dict[int, float], key: str) -> float:
    return sum(fraction * widths[str(w)][key] for w, fraction in mix.items())


def predict(kernel: dict, device: Device, n: int, k: int, bits: float) -> dict:
    """One row of the report: the kernel's counts at this layer's width mix and the three bounds."""
    mix = width_mix(k, bits)
    widths = kernel["widths"]
    instructions = mixed(widths, mix, "instructions_per_weight")
    wavefronts = mixed(widths, mix, "shared_wavefronts_per_weight")
    hbm_bytes = sum(f * w / 8 for w, f in mix.items()) + mixed(widths, mix, "stg_bytes_per_weight")
    grid = math.ceil(n / kernel["rows_per_block"])
    balance = grid / (device.sms * math.ceil(grid / device.sms))  # the busiest SM runs ceil(grid / SMs) blocks
    resident = min(blocks_per_sm(device, kernel["registers"], block_shared_bytes(kernel), kernel["threads"]),
                   math.ceil(grid / device.sms))
    warps = resident * kernel["threads"] // WARP_LANES
    in_flight = warps * mixed(widths, mix, "weight_bytes_per_warp_iteration")
    bounds = {"issue": balance * device.issue_rate() / instructions,
              "shared": balance * device.shared_rate() / wavefronts if wavefronts else None,  # None: unused
              "hbm": device.hbm_bytes_per_s / hbm_bytes}
    binding = min((b for b in bounds if bounds[b] is not None), key=bounds.get)
    return {
        "instructions_per_weight": instructions, "lds_per_weight": mixed(widths, mix, "lds_per_weight"),
        "shared_wavefronts_per_weight": wavefronts, "hbm_bytes_per_weight": hbm_bytes,
        "grid_blocks": grid, "sm_balance": balance, "resident_warps_per_sm": warps,
        "weight_bytes_in_flight_per_sm": in_flight,
        "latency_covered_ns": in_flight / (device.hbm_bytes_per_s / device.sms) * 1e9,
        **{f"{name}_bound_weights_per_s": bound for name, bound in bounds.items()}, "binding_bound": binding,
        "predicted_hbm_fraction": bounds[binding] / bounds["hbm"],
        "sm_headroom": min(b for name, b in bounds.items() if name != "hbm" and b is not None) / bounds["hbm"],
    }


ROWS_CONTENT = ("fp16 instantiations compiled for sm_90a; m is the batch rows a block covers (gemm: 16 · MT; "
                "m = 65..128 runs two 64-row blocks per row tile, twice the MT = 4 counts), null for decode (the "
                "path for m > 128)")


def report_rows(kernels: dict[str, dict]) -> list[dict]:
    """Rows kernel x device x shape x bits x m for the reported batch sizes (GEMV m in ``GEMV_REPORT_M``, every
    GEMM MT, decode), fp16 only: the bf16 instantiations' counts (in ``kernels``) differ by a few per cent at
    most."""
    rows = []
    for kernel in kernels.values():
        m = kernel["batch_rows"]
        if kernel["dtype"] != "fp16" or kernel["family"] == "mixllm" or \
                (kernel["family"] == "gemv" and m not in GEMV_REPORT_M):
            continue
        for device in DEVICES:
            for n, k in SHAPES:
                for bits in BITS:
                    rows.append({"kernel": kernel["family"], "device": device.name, "n": n, "k": k, "bits": bits,
                                 "m": m, "label": PREDICTION_LABEL, **predict(kernel, device, n, k, bits)})
    return rows


def mixllm_hbm_bytes(width: int, constants: dict[str, int]) -> float:
    """Stored bytes per weight of a MixLLM row: its codes, an fp16 scale per group and (4-bit) a 4-bit zero."""
    group = constants["kGroup"]
    return width / 8 + 2 / group + (0.5 / group if width == 4 else 0)


def predict_mixllm(kernel: dict, device: Device, n: int, k: int, share8: float = MIXLLM_EIGHT_BIT_SHARE) -> dict:
    """One MixLLM row: the two parts' counts mixed at ``share8`` of the rows; issue and HBM bounds (no shared
    memory), scaled by the block balance like :func:`predict`."""
    constants = mixllm_constants()
    mix = {8: share8, 4: 1 - share8}
    widths = kernel["widths"]
    instructions = sum(f * widths[str(w)]["instructions_per_weight"] for w, f in mix.items())
    hbm_bytes = sum(f * mixllm_hbm_bytes(w, constants) for w, f in mix.items())
    grid = sum(math.ceil(round(n * f) / kernel["rows_per_block"]) for f in mix.values())
    balance = grid / (device.sms * math.ceil(grid / device.sms))
    bounds = {"issue": balance * device.issue_rate() / instructions, "hbm": device.hbm_bytes_per_s / hbm_bytes}
    binding = min(bounds, key=bounds.get)
    return {"instructions_per_weight": instructions, "lds_per_weight": 0.0, "hbm_bytes_per_weight": hbm_bytes,
            "grid_blocks": grid, "sm_balance": balance,
            **{f"{name}_bound_weights_per_s": bound for name, bound in bounds.items()}, "binding_bound": binding,
            "predicted_hbm_fraction": bounds[binding] / bounds["hbm"], "sm_headroom": bounds["issue"] / bounds["hbm"]}


def mixllm_rows(kernels: dict[str, dict]) -> list[dict]:
    """Rows MixLLM kernel x device x shape (fp16, every NT): the W8/W4 mix at the quantizer's default share."""
    return [{"kernel": "mixllm", "device": device.name, "n": n, "k": k, "eight_bit_share": MIXLLM_EIGHT_BIT_SHARE,
             "m": kernel["batch_rows"], "label": PREDICTION_LABEL, **predict_mixllm(kernel, device, n, k)}
            for kernel in kernels.values() if kernel["family"] == "mixllm" and kernel["dtype"] == "fp16"
            for device in DEVICES for n, k in SHAPES]


LARGE_M = (512, 2048)  # batch rows of the large-batch (decode + cuBLAS) prediction


def predict_decoded_gemm(decode: dict, device: Device, n: int, k: int, bits: float, m: int) -> dict:
    """The large-batch path (m > kGemmMaxM) against cuBLAS alone on an FP16 W, as extra time over cuBLAS.

    cuBLAS: the larger of its tensor-core time at the datasheet's dense FP16 peak (2·m·n·k FLOP) and its HBM
    time (W, x and y once); the peak flatters cuBLAS, so the overhead is overstated, not understated. Decode:
    the larger of its issue and shared-memory times (every SM busy: the launch splits K until it is) and its
    memory time, in two cases, since whether the workspace tile (kDecodeTileBytes, 16 MiB) stays in the 50 MB
    L2 until cuBLAS reads it is not something static counts can say: ``l2`` (only the codes come from HBM)
    and ``hbm`` (the decoded tile is also written to HBM; cuBLAS then reads it from there, as it reads an FP16
    W anyway). Decode and cuBLAS run one after the other on one stream."""
    mix = width_mix(k, bits)
    widths = decode["widths"]
    weights = n * k
    cublas_s = max(2 * m * weights / device.tensor_flops,
                   2 * (weights + m * k + m * n) / device.hbm_bytes_per_s)
    sm_s = weights * max(mixed(widths, mix, "instructions_per_weight") / device.issue_rate(),
                         mixed(widths, mix, "shared_wavefronts_per_weight") / device.shared_rate())
    code_bytes = sum(f * w / 8 for w, f in mix.items())
    l2_s = max(sm_s, weights * code_bytes / device.hbm_bytes_per_s)
    hbm_s = max(sm_s, weights * (code_bytes + mixed(widths, mix, "stg_bytes_per_weight")) / device.hbm_bytes_per_s)
    return {"cublas_us": cublas_s * 1e6, "decode_l2_us": l2_s * 1e6, "decode_hbm_us": hbm_s * 1e6,
            "overhead_l2": l2_s / cublas_s, "overhead_hbm": hbm_s / cublas_s}


def decoded_gemm_rows(kernels: dict[str, dict]) -> list[dict]:
    """Rows device x shape x bits x m (``LARGE_M``) of :func:`predict_decoded_gemm`, from decode<fp16>."""
    decode = next(k for k in kernels.values() if k["family"] == "decode" and k["dtype"] == "fp16")
    return [{"kernel": "decode+cublas", "device": device.name, "n": n, "k": k, "bits": bits, "m": m,
             "label": PREDICTION_LABEL, **predict_decoded_gemm(decode, device, n, k, bits, m)}
            for device in DEVICES for m in LARGE_M for n, k in SHAPES for bits in BITS]


def affordable(device: Device, bits: float) -> dict[str, float]:
    """Instructions and 4-byte LDS per weight at which the issue or shared bound equals the HBM bound."""
    weights_per_s = device.hbm_bytes_per_s * 8 / bits
    return {"instructions_per_weight": device.issue_rate() / weights_per_s,
            "lds_per_weight": device.shared_rate() / weights_per_s}


# ---- budgets -------------------------------------------------------------------------------------------------------

def limits_from(kernels: dict[str, dict[str, dict]], margin: float = LIMIT_MARGIN) -> dict:
    """Ceilings per arch, kernel and width: the counts plus ``margin``, rounded up to 0.01."""
    return {arch: {name: {w: {key: math.ceil(round(v[key] * (1 + margin) * 100, 6)) / 100 for key in LIMIT_KEYS}
                          for w, v in kernel["widths"].items()}
                   for name, kernel in sorted(per_arch.items())}
            for arch, per_arch in kernels.items()}


def check(kernels: dict[str, dict[str, dict]], limits: dict) -> list[str]:
    """Every count above its ceiling, and every kernel without one or gone, as readable lines."""
    problems = []
    for arch, per_arch in kernels.items():
        ceilings = limits.get(arch, {})
        for name in sorted(set(per_arch) | set(ceilings)):
            if name not in ceilings:
                problems.append(f"{arch} {name}: no committed budget (run bench/sass_budget.py --update-limits)")
            elif name not in per_arch:
                problems.append(f"{arch} {name}: budgeted kernel not found in the compiled code")
            else:
                for width, counts in per_arch[name]["widths"].items():
                    for key in LIMIT_KEYS:
                        if counts[key] > ceilings[name][width][key]:
                            problems.append(f"{arch} {name} {width}-bit: {key} = {counts[key]:.3f} exceeds the "
                                            f"budget {ceilings[name][width][key]:.2f}")
    return problems


def run_check(kernels: dict[str, dict[str, dict]], limits_path: Path) -> int:
    """``--check``: print every problem to stderr; the exit status (1 if any)."""
    problems = check(kernels, json.loads(limits_path.read_text()))
    for line in problems:
        print(f"SASS budget exceeded: {line}", file=sys.stderr)
    if not problems:
        print(f"SASS budget: every kernel within {limits_path.name}")
    return 1 if problems else 0


# ---- report --------------------------------------------------------------------------------------------------------

def counts_table(per_arch: dict[str, dict], device: Optional[Device]) -> list[str]:
    header = ["kernel", "regs", "shared B", "threads"] + (["blocks/SM"] if device else []) + \
        [f"{key} {w}-bit" for key in ("instr/w", "LDS/w", "smem wf/w") for w in SEGMENT_BITS]
    keys = ("instructions_per_weight", "lds_per_weight", "shared_wavefronts_per_weight")
    cells = []
    for name, kernel in per_arch.items():
        if kernel["family"] == "mixllm":
            continue  # its own table (mixllm_counts_table): 8- and 4-bit rows, not CMPQ widths
        occupancy = [str(blocks_per_sm(device, kernel["registers"], block_shared_bytes(kernel), kernel["threads"]))] \
            if device else []
        cells.append([name, str(kernel["registers"]), str(block_shared_bytes(kernel)), str(kernel["threads"]),
                      *occupancy, *(f"{kernel['widths'][str(w)][key]:.2f}" for key in keys for w in SEGMENT_BITS)])
    return markdown_table(header, cells)


def mixllm_counts_table(per_arch: dict[str, dict], device: Optional[Device]) -> list[str]:
    header = ["kernel", "regs", "tokens/block", "threads"] + (["blocks/SM"] if device else []) + \
        [f"{key} {w}-bit" for key in ("instr/w", "LDS/w", "LDG B/w") for w in MIXLLM_WIDTHS]
    keys = ("instructions_per_weight", "lds_per_weight", "ldg_bytes_per_weight")
    cells = []
    for name, kernel in per_arch.items():
        if kernel["family"] != "mixllm":
            continue
        occupancy = [str(blocks_per_sm(device, kernel["registers"], block_shared_bytes(kernel), kernel["threads"]))] \
            if device else []
        cells.append([name, str(kernel["registers"]), str(kernel["batch_rows"]), str(kernel["threads"]), *occupancy,
                      *(f"{kernel['widths'][str(w)][key]:.2f}" for key in keys for w in MIXLLM_WIDTHS)])
    return markdown_table(header, cells)


def mixllm_prediction_table(rows: list[dict], device: Device) -> list[str]:
    header = ["m (tokens/block)", "n × k", "instr/w", "HBM B/w", "predicted fraction (bound)"]
    cells = [[str(r["m"]), f"{r['n']}×{r['k']}", f"{r['instructions_per_weight']:.2f}",
              f"{r['hbm_bytes_per_weight']:.3f}", cell(r)] for r in rows if r["device"] == device.name]
    return markdown_table(header, cells, text_columns=(1,))


def cell(row: dict) -> str:
    """Predicted HBM fraction and the binding bound; where HBM binds, the SM-side headroom (×1.15: the issue or
    shared bound is 15 % above it)."""
    if row["binding_bound"] == "hbm":
        return f"{row['predicted_hbm_fraction']:.2f} (hbm ×{row['sm_headroom']:.2f})"
    return f"{row['predicted_hbm_fraction']:.2f} ({row['binding_bound']})"


def prediction_table(rows: list[dict], device: Device) -> list[str]:
    """One line per kernel and shape, one cell per bits: predicted HBM fraction and its binding bound."""
    header = ["kernel", "m", "n × k", *(f"{b:g} bits" for b in BITS), "in flight / SM (3 bits)"]
    lines: dict[tuple, dict] = {}
    for r in rows:
        if r["device"] == device.name:
            lines.setdefault((r["kernel"], r["m"], r["n"], r["k"]), {})[r["bits"]] = r
    cells = []
    for (name, m, n, k), by_bits in lines.items():
        cells.append([name, "> 128" if m is None else str(m), f"{n}×{k}",
                      *(cell(by_bits[b]) for b in BITS),
                      f"{by_bits[3.0]['weight_bytes_in_flight_per_sm'] / 1024:.1f} KiB = "
                      f"{by_bits[3.0]['latency_covered_ns']:.0f} ns"])
    return markdown_table(header, cells, text_columns=(0, 2))


def decoded_gemm_table(rows: list[dict], device: Device) -> list[str]:
    """One line per m and shape, one cell per bits: extra time over cuBLAS, L2-resident – written to HBM."""
    lines: dict[tuple, dict] = {}
    for r in rows:
        if r["device"] == device.name:
            lines.setdefault((r["m"], r["n"], r["k"]), {})[r["bits"]] = r
    cells = [[str(m), f"{n}×{k}", f"{by_bits[3.0]['cublas_us']:.1f}",
              *(f"+{by_bits[b]['overhead_l2']:.0%} – +{by_bits[b]['overhead_hbm']:.0%}" for b in BITS)]
             for (m, n, k), by_bits in lines.items()]
    return markdown_table(["m", "n × k", "cuBLAS µs (model)", *(f"{b:g} bits" for b in BITS)], cells,
                          text_columns=(1,))


def markdown(doc: dict) -> str:
    kernels, rows = doc["kernels"], doc["rows"]
    budget_cells = [[d.name, *(f"{affordable(d, b)['instructions_per_weight']:.2f} / "
                               f"{affordable(d, b)['lds_per_weight']:.2f}" for b in BITS)] for d in DEVICES]
    out = [
        "# Static SASS budget of the CUDA kernels",
        "",
        f"**{PREDICTION_LABEL}.** Generated by `bench/sass_budget.py` ({doc['toolchain']['nvcc']}; "
        f"{doc['toolchain']['nvdisasm']}). Every number below is read from the compiled code or derived from "
        "published specifications. No kernel ran.",
        "",
        "Method (details in the script's docstring): each kernel's steady-state loop is the innermost loop "
        "holding the packed-group loads of all three widths. Per width, the cheapest path through one iteration "
        "that loads every group the iteration owns is counted; it skips out-of-range rows, the other widths and "
        "the fp16 inf/NaN/subnormal branches. Staging loops count once per element. The total is divided by "
        "the weights a thread consumes per iteration (from the kernel source). Per weight means per stored "
        "weight, for all m batch rows together. `smem wf` counts 128-byte shared-memory wavefronts, with wide "
        "and ldmatrix accesses counting several. A layer's bits mix two widths as `segment_sizes` splits "
        "them.",
        "",
        "## What an H100 / H200 can afford per weight (instructions / 4-byte LDS) to stay HBM-bound",
        "",
        *markdown_table(["device", *(f"{b:g} bits" for b in BITS)], budget_cells),
        "",
    ]
    for arch, per_arch in kernels.items():
        device = DEVICES[0] if arch == PREDICTION_ARCH else None
        out += [f"## Static counts per weight, {arch}" + (" (blocks/SM: compute capability 9.0 limits)" if device
                                                            else ""), "", *counts_table(per_arch, device), ""]
    for device in DEVICES:
        out += [f"## {device.name}: predicted fraction of HBM bandwidth (fp16; {PREDICTION_LABEL})", "",
                f"{device.sms} SMs, {device.clock_hz / 1e9:.2f} GHz, {device.hbm_bytes_per_s / 1e12:.2f} TB/s. "
                "Cell: predicted fraction (binding bound: issue, shared or hbm; where hbm binds, ×h: the nearer "
                "SM-side bound is h times the HBM bound). Last column: weight bytes in flight per SM at 3 bits, and "
                "the DRAM latency they would cover at full bandwidth.", "",
                *prediction_table(rows, device), ""]
    for device in DEVICES:
        out += [f"## {device.name}: large batches, decode + cuBLAS over cuBLAS FP16 alone ({PREDICTION_LABEL})", "",
                f"Extra time of the decode over a cuBLAS GEMM on an FP16 W ({device.tensor_flops / 1e12:.0f} dense "
                "FP16 TFLOPS, HBM for W, x, y): from 'the decoded 16 MiB tile stays in L2' to 'it goes through "
                "HBM' (`predict_decoded_gemm`). Launch overheads (two launches per tile) are not counted.", "",
                *decoded_gemm_table(doc["decoded_gemm_rows"], device), ""]
    for arch, per_arch in kernels.items():
        device = DEVICES[0] if arch == PREDICTION_ARCH else None
        out += [f"## MixLLM (`mixllm_gemm.cu`): static counts per weight, {arch}", "",
                "Per stored weight of one full 128-wide group, all tokens of a block together (tokens/block = "
                "8 · NT); LDG bytes include the activation codes and the scales.", "",
                *mixllm_counts_table(per_arch, device), ""]
    for device in DEVICES:
        out += [f"## MixLLM on the {device.name}: predicted fraction of HBM bandwidth (fp16; {PREDICTION_LABEL})", "",
                f"{MIXLLM_EIGHT_BIT_SHARE:.0%} of the rows at 8 bits (the quantizer's default), the rest at 4; HBM "
                "bytes per weight = codes + fp16 scale per group (+ 4-bit zero). Issue and HBM bounds only.", "",
                *mixllm_prediction_table(doc["mixllm_rows"], device), ""]
    out += ["## What the static model cannot see", "", doc["blind_spots"], ""]
    return "\n".join(out)


def rounded(value):
    """``value`` with every float rounded to 4 significant digits (the counts' own precision is 1 / 64)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def toolchain() -> dict[str, str]:
    return {"nvcc": tool_version(find_nvcc()), "nvdisasm": tool_version(find_tool("nvdisasm")),
            "cuobjdump": tool_version(find_tool("cuobjdump"))}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="write <out>.json and <out>.md")
    p.add_argument("--check", action="store_true", help=f"fail when a count exceeds {LIMITS.name}")
    p.add_argument("--update-limits", action="store_true", help=f"rewrite {LIMITS.name} from the current counts")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc runs")
    p.add_argument("--cubins", type=Path, default=None,
                   help="keep the cubins in this folder and reuse those newer than the sources (default: a temp dir)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as temp:
        work = args.cubins or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        kernels = analyse_all(ARCHS, work, args.jobs)
    doc = {"label": PREDICTION_LABEL, "toolchain": toolchain(), "nvcc_flags": list(NVCC_FLAGS),
           "devices": [vars(d) for d in DEVICES], "blind_spots": BLIND_SPOTS,
           "rows_content": ROWS_CONTENT,
           "kernels": kernels, "rows": report_rows(kernels[PREDICTION_ARCH]),
           "mixllm_rows": mixllm_rows(kernels[PREDICTION_ARCH]),
           "decoded_gemm_rows": decoded_gemm_rows(kernels[PREDICTION_ARCH])}
    write_json_and_markdown(rounded(doc), markdown(doc), args.out)
    print(f"wrote {args.out}.json / .md ({len(doc['rows'])} rows; {PREDICTION_LABEL})")
    for name, kernel in kernels[PREDICTION_ARCH].items():
        print(f"{PREDICTION_ARCH} {name:22s} " + "  ".join(
            f"{w}-bit {v['instructions_per_weight']:.2f} instr {v['lds_per_weight']:.2f} LDS"
            for w, v in kernel["widths"].items()))
    if args.update_limits:
        text = json.dumps(limits_from(kernels), indent=1)
        LIMITS.write_text(re.sub(r"\{[^{}]*\}", lambda m: " ".join(m.group(0).split()), text) + "\n")  # a width a line
        print(f"wrote {LIMITS}")
    return run_check(kernels, LIMITS) if args.check else 0


if __name__ == "__main__":
    sys.exit(main())
